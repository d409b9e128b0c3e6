""" The private timm helpers the command and I/O modules of timm-dirac use, in one place: each is a private timm
symbol (`timm.models._*`, `timm.data.*._*`) with no public export in timm 1.0.x. If a timm release moves one, this
module is the import to fix. (The model file imports timm's private helpers directly, as timm's model files do.) """
from timm.models._builder import _resolve_pretrained_source as resolve_pretrained_source  # (load_from, location)
from timm.models._hub import download_cached_file  # a URL into torch hub's cache, as timm's pretrained loader does
from timm.models._hub import generate_readme  # timm's model card layout, from sections given as data
from timm.models._registry import _model_pretrained_cfgs as pretrained_cfg_registry  # registered PretrainedCfgs
# the folder create_dataset reads for a split (timm's synonyms: val, valid, eval, ...): to refuse a missing split
from timm.data.dataset_factory import _search_split as search_split


def wds_split_info(root: str, split: str):
    """ reader_wds._load_info + _parse_split_info: a shard folder's split (shard files and lengths) as timm's reader
    reads it, which a hold-out of whole shards needs. """
    from timm.data.readers.reader_wds import _load_info, _parse_split_info  # lazy: the module imports webdataset
    return _parse_split_info(split, _load_info(root))


def wds_pipeline(reader):
    """ The webdataset pipeline of a timm `ReaderWds`, built now if the reader has not built it yet (timm builds it
    lazily, in the loader worker): per-shard sample counting wraps it. """
    if reader.ds is None:
        reader._lazy_init()
    return reader.ds


def set_pretrained_file(model_name: str, file: str) -> None:
    """ Point the registered pretrained cfg `<arch>.<tag>` (the same object serves `<arch>` where the tag is its
    default) at a local weights file, which timm's loader reads before `hf_hub_id`. timm has no public setter:
    `get_pretrained_cfg` returns a copy. """
    for cfg in pretrained_cfg_registry.values():
        if f'{cfg.architecture}.{cfg.tag}' == model_name:
            cfg.file = file


__all__ = ['download_cached_file', 'generate_readme', 'pretrained_cfg_registry', 'resolve_pretrained_source',
           'search_split', 'set_pretrained_file', 'wds_pipeline', 'wds_split_info']
