""" The training flags: named like timm's train.py, set by defaults < `--config FILE.yaml` < the command line.

The YAML is read as timm's train.py reads it (a config parser, then `parser.set_defaults`), but each value goes
through the flag's own parser first, so `epochs: true` or `lr: true` is refused as `--epochs True` would be, not
carried into the run; unknown keys are refused too. `--config NAME` that is no file names a config shipped with the
package (`train_configs/`, in the wheel as `timm_dirac/train_configs/`).
"""
import argparse
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import yaml
from timm.utils import ParseKwargs

import timm

__all__ = ['ConfigError', 'build_parser', 'parse_args', 'check_args', 'shipped_configs', 'args_yaml', 'read_config']

MAX_CONFIG_BYTES = 1 << 20  # a config is a page of flags; bigger is a mistake or an attack
MAX_CONFIG_DEPTH = 16  # nesting of YAML collections (model_kwargs: {layers: [..]} is 3)
NOT_RECORDED = ('config', 'resume', 'debug')  # how a run was invoked, not what it is: not in its args.yaml


class ConfigError(ValueError):
    """ Bad flags or config file; the message names the fix. """


class _Kwargs(ParseKwargs):
    """ timm's key=value parser, refusing a word without `=` in one line (timm's raises a ValueError). """
    def __call__(self, parser, namespace, values, option_string=None):
        bad = [v for v in values if v and '=' not in v]
        if bad:
            parser.error(f'argument {option_string}: expected key=value, got {bad[0]!r}')
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    """ Refuses in one line; for a config file (`source`), by raising ConfigError naming the file. """
    source = ''

    def error(self, message: str):
        if self.source:
            raise ConfigError(f'{self.source}: {message} (see timm-dirac-train --help).')
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


class _ConfigLoader(yaml.SafeLoader):
    """ `yaml.safe_load` bounded: aliases (`*name`) are refused, since values are parsed again from their text and a
    few nested aliases expand exponentially there (an alias bomb), and so is nesting deeper than MAX_CONFIG_DEPTH
    (PyYAML composes recursively). The file's size is bounded by `read_config`. """
    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, 'an alias (*name): configs take plain values only, write '
                                              'them out', self.peek_event().start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_CONFIG_DEPTH:
                raise yaml.composer.ComposerError(None, None, f'values nested deeper than {MAX_CONFIG_DEPTH} levels',
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def shipped_configs() -> Path:
    """ The folder of the configs shipped with the package: `timm_dirac/train_configs/` in an installed wheel, the
    clone's `train_configs/` beside the package otherwise. """
    package = Path(__file__).resolve().parents[1]
    installed = package / 'train_configs'
    return installed if installed.is_dir() else package.parent / 'train_configs'


def _find_config(name: str) -> Path:
    """ `name` as a path, else the shipped config of that name (with or without .yaml). """
    path = Path(os.path.expanduser(name))
    if path.exists() or path.parent != Path('.'):
        return path
    folder = shipped_configs()
    for candidate in (folder / name, folder / f'{name}.yaml'):
        if candidate.is_file():
            return candidate
    shipped = ', '.join(sorted(p.name for p in folder.glob('*.yaml'))) or 'none found'
    raise ConfigError(f'config file {name} not found: pass a path, or the name of a shipped config ({shipped}).')


def read_config(name: str) -> Tuple[Path, Dict[str, Any]]:
    """ The config file `name` (a path, or a shipped config's name) and its mapping, read with bounds. """
    path = _find_config(name)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f'config file {path} is {path.stat().st_size} bytes, more than a config of flags needs '
                              f'({MAX_CONFIG_BYTES}): pass a file of flag: value lines.')
        with open(path, encoding='utf-8') as f:
            cfg = yaml.load(f, Loader=_ConfigLoader) or {}
    except OSError as e:
        raise ConfigError(f'cannot read config file {path}: {e.strerror}.') from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # also python/object tags, which safe_load never constructs
        where = getattr(e, 'problem_mark', None)
        line = f' line {where.line + 1}' if where else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ConfigError(f'{path}{line} is not plain YAML ({problem}); write flag: value lines only.') from e
    if not isinstance(cfg, dict):
        raise ConfigError(f'{path} must be a YAML mapping of flag names to values.')
    return path, cfg


def args_yaml(args: argparse.Namespace, notes: Sequence[str] = ()) -> str:
    """ A run's args.yaml: its flags (reusable as `--config`), `notes` as comment lines above them. """
    values = {k: v for k, v in vars(args).items() if k not in NOT_RECORDED}
    header = ''.join(f'# {line}\n' for note in notes for line in note.splitlines())
    return header + yaml.safe_dump(values, sort_keys=False)


def build_parser() -> _Parser:
    p = _Parser(prog='timm-dirac-train', description='Train DiracNets (or any timm model) with accelerate.')
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML of flag: value (the command line wins)')
    g = p.add_argument_group('Data')
    g.add_argument('--data-dir', default=None, metavar='DIR', help='root of the dataset (image folders '
                   'DIR/<split>/<class>/<image>, or the shards of a streaming dataset)')
    g.add_argument('--dataset', '-d', default='', metavar='NAME', help="timm's dataset name: '' (image folders), "
                   'hfds/<Hub id or folder>, hfids/..., wds/..., tfds/...')
    g.add_argument('--dataset-download', action='store_true')
    g.add_argument('--train-split', default='train', metavar='NAME')
    g.add_argument('--val-split', default='validation', metavar='NAME',
                   help='split evaluated every epoch to choose `best`; a test split is only shown, and `best` is then '
                   'the last epoch (choose on held-out images with --holdout)')
    g.add_argument('--holdout', type=int, default=0, metavar='N',
                   help='validate on N fixed random images held out of the train split instead of --val-split')
    g.add_argument('--test-split', default=None, metavar='NAME',
                   help='split scored once (in fp32), at the end, with the weights that are exported (e.g. test)')
    g.add_argument('--train-num-samples', type=int, default=None, metavar='N', help='train on a fixed random N')
    g.add_argument('--val-num-samples', type=int, default=None, metavar='N', help='evaluate on a fixed random N')
    g.add_argument('-j', '--workers', type=int, default=None, metavar='N', help='default: up to 4, the CPUs allowing')
    g = p.add_argument_group('Model')
    g.add_argument('--model', default=None, metavar='NAME', help='e.g. diracnet34')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=_Kwargs, metavar='K=V',
                   help='extra model arguments, e.g. layers=(4,4,4) channels=(32,64,128)')
    g.add_argument('--pretrained', action='store_true')
    g.add_argument('--initial-checkpoint', default=None, metavar='PATH',
                   help='start from these weights (e.g. <run>/last/model.safetensors; train or folded form)')
    g.add_argument('--qat', action='store_true', help='quantization-aware fine-tuning for `timm-dirac quantize --flow '
                   'split`: fold, split the Dirac taps, train through the 7-bit int8 weight grid (start from trained '
                   'weights); exports the folded model')
    g.add_argument('--diracify', action=argparse.BooleanOptionalAction, default=False,
                   help='Dirac-parameterize the plain convs of any model (timm_dirac.diracify): alpha=1, beta=0.1, or '
                   'with --pretrained/--initial-checkpoint (plain weights) alpha=0, beta=||W|| (same function); fold '
                   'back with timm.utils.reparameterize_model')
    g.add_argument('--diracify-layers', nargs='+', default=None, metavar='GLOB',
                   help="with --diracify: only the convs whose module names match, e.g. 'features.*'")
    g.add_argument('--num-classes', type=int, default=None, metavar='N', help="default: the dataset's class count")
    g.add_argument('--img-size', type=int, default=None, metavar='N', help="default: the model cfg's")
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'))
    g.add_argument('--drop', type=float, default=0., metavar='PCT', help='dropout before the classifier')
    g.add_argument('--channels-last', action='store_true')
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='batch size per process')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='sgd', metavar='NAME', help="timm optimizer ('sgd' is Nesterov SGD, "
                   "'momentum' plain SGD with momentum)")
    g.add_argument('--lr', type=float, default=None, metavar='LR', help='default: lr-base scaled')
    g.add_argument('--lr-base', type=float, default=0.1, metavar='LR', help='lr at the global batch lr-base-size')
    g.add_argument('--lr-base-size', type=int, default=256, metavar='N', help='global batch of lr-base')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M')
    g.add_argument('--weight-decay', type=float, default=2e-5)
    g.add_argument('--weight-decay-1d', action=argparse.BooleanOptionalAction, default=False,
                   help="decay 1-d parameters too (biases, BatchNorm, Dirac alpha/beta), as the authors' train.py "
                   "does; default: timm's grouping, which exempts them")
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    g.add_argument('--grad-accum-steps', type=int, default=1, metavar='N', help='batches per optimizer step')
    g = p.add_argument_group('Schedule')
    g.add_argument('--sched', default='cosine', metavar='NAME', help='timm scheduler: cosine, step, multistep, ...')
    g.add_argument('--epochs', type=int, default=300, metavar='N')
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270], metavar='E',
                   help='multistep: epochs where the lr is multiplied by decay-rate')
    g.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='step: epochs between decays')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')
    g.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    g.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR')
    g.add_argument('--min-lr', type=float, default=0., metavar='LR')
    g = p.add_argument_group('Augmentation and regularization')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], metavar=('MIN', 'MAX'),
                   help='random-resized crop area range (inputs > 64 px)')
    g.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], metavar=('MIN', 'MAX'))
    g.add_argument('--color-jitter', type=float, default=0., metavar='PCT')
    g.add_argument('--aa', default=None, metavar='NAME', help='timm Auto/RandAugment policy, e.g. rand-m9-mstd0.5')
    g.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erasing probability')
    g.add_argument('--train-interpolation', default='random', metavar='NAME')
    g.add_argument('--mixup', type=float, default=0., help='mixup alpha (on if > 0)')
    g.add_argument('--cutmix', type=float, default=0., help='cutmix alpha (on if > 0)')
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch')
    g.add_argument('--smoothing', type=float, default=0.1)
    g = p.add_argument_group('EMA, precision, output')
    g.add_argument('--model-ema', action='store_true', help='keep and evaluate an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False,
                   help='mixed precision (--no-amp overrides a config: fp32 unless the accelerate launch sets one)')
    g.add_argument('--amp-dtype', default='auto', choices=['auto', 'float16', 'bfloat16'],
                   help='auto: bf16 where the hardware computes it (CUDA GPUs with bf16, CPUs with AMX or '
                   'AVX512-BF16), fp16 on other CUDA GPUs, fp32 on other CPUs')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--log-interval', type=int, default=50, metavar='N', help='progress bar update every N steps')
    g.add_argument('--output', default='./output/train', metavar='DIR', help='parent of the run folders')
    g.add_argument('--experiment', default='', metavar='NAME',
                   help='run folder name inside --output (default: time-model-size)')
    g.add_argument('--resume', default='', metavar='DIR', help='run folder to continue (or its last checkpoint)')
    g.add_argument('--checkpoint-hist', type=int, default=3, metavar='N', help='best checkpoints to keep')
    g.add_argument('--dist-timeout', type=float, default=600, metavar='S',
                   help='seconds a process waits for the others in a collective (torch.distributed) before the run '
                   'stops naming the process that did not answer; raise it where one process legitimately works '
                   'alone longer (e.g. rank 0 downloading a dataset the others wait for)')
    g.add_argument('--eval-metric', default='top1', choices=['top1', 'top5', 'loss'])
    g.add_argument('--debug', action='store_true', help='tracebacks instead of one-line refusals')
    return p


def _config_value(parser: _Parser, key: Any, value: Any, path: str) -> Any:
    """ A YAML value parsed as its flag's command-line words would be, so that it is checked the same way. """
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ('config', 'help')}
    dest = str(key).replace('-', '_')
    if dest not in actions:
        raise ConfigError(f'{path}: unknown key {key!r}; keys are the long flag names with _ for - '
                          f'(see timm-dirac-train --help).')
    action = actions[dest]
    flag = next(s for s in action.option_strings if s.startswith('--'))
    if value is None:  # null: no value
        return None
    if dest == 'model_kwargs':
        if not isinstance(value, dict):
            raise ConfigError(f'{path}: model_kwargs must be a mapping, e.g. {{layers: [4, 4, 4]}}.')
        words = [flag] + [f'{k}={v!r}' for k, v in value.items()]
    elif action.nargs == 0:  # a switch: its value as is
        if not isinstance(value, bool):
            raise ConfigError(f'{path}: key {key!r} is a switch: write true or false, not {value!r}.')
        return value
    elif isinstance(value, dict) or (isinstance(value, list) and action.nargs is None):
        raise ConfigError(f'{path}: key {key!r} takes one value, not {value!r}.')
    else:
        words = [flag] + [str(v) for v in (value if isinstance(value, list) else [value])]
    parser.source = f'{path}: key {key!r} = {value!r}'
    return getattr(parser.parse_args(words), dest)


def _resolve_paths(cfg: Dict[str, Any], config_dir: Path) -> Dict[str, Any]:
    """ A config's relative data and weights paths as a user expects: from the working directory if they exist
    there, else from the config file's folder, else from the folder that holds the installed package (so that the
    shipped configs' `timm_dirac/assets/...` resolves in a clone and from a wheel alike); other values unchanged. """
    bases = (config_dir, Path(__file__).resolve().parents[2])

    def resolve(path: str) -> str:
        if os.path.isabs(os.path.expanduser(path)) or os.path.exists(path):
            return path
        for base in bases:
            if (base / path).exists():
                return str((base / path).resolve())
        return path

    out = dict(cfg)
    for key in ('data_dir', 'data-dir', 'initial_checkpoint', 'initial-checkpoint'):
        if isinstance(out.get(key), str) and out[key]:
            out[key] = resolve(out[key])
    dataset = out.get('dataset')
    if isinstance(dataset, str) and '/' in dataset:
        prefix, rest = dataset.split('/', 1)
        if prefix in ('hfds', 'hfids') and rest:
            out['dataset'] = f'{prefix}/{resolve(rest)}'
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """ Flags from the defaults, then the `--config` YAML, then the command line. """
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        path, cfg = read_config(known.config)
        # a run's args.yaml of an earlier version records `config` (the file its values came from): not a value
        cfg = {k: v for k, v in cfg.items() if str(k) != 'config'}
        checker = build_parser()
        parser.set_defaults(**{str(key).replace('-', '_'): _config_value(checker, key, value, str(path))
                               for key, value in _resolve_paths(cfg, path.parent).items()})
    args = parser.parse_args(argv)
    if known.config:
        args.config = str(path)  # the file read (a shipped config's name found in the package)
    args.model_kwargs = {**parser.get_default('model_kwargs'), **args.model_kwargs}  # the command line's over YAML's
    return args


# the bounds of the numeric flags (any other numeric flag: a finite number >= 0; none may be NaN or infinite)
_AT_LEAST = dict(
    **dict.fromkeys(('batch_size', 'validation_batch_size', 'epochs', 'grad_accum_steps', 'log_interval',
                     'checkpoint_hist', 'lr_base_size', 'train_num_samples', 'val_num_samples', 'decay_milestones',
                     'img_size', 'input_size'), 1),
    num_classes=2)
_ABOVE_0 = ('decay_epochs', 'dist_timeout')  # a step every 0 epochs divides by zero; a 0 s timeout fails every wait
_AT_MOST_1 = ('drop', 'mixup_prob', 'mixup_switch_prob', 'model_ema_decay', 'reprob', 'hflip', 'scale')
_BELOW_1 = ('smoothing', 'momentum')  # smoothing 1 leaves no label, momentum 1 never forgets a gradient
_RANGES = ('scale', 'ratio')  # (min, max), both above 0


def _check_numbers(args: argparse.Namespace) -> None:
    """ Every numeric flag of the parser within its bounds (finite, not negative, and the bounds above). """
    for action in build_parser()._actions:
        if action.type not in (int, float) or getattr(args, action.dest, None) is None:
            continue
        name, value = action.dest, getattr(args, action.dest)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        flag = f'--{name.replace("_", "-")}'
        low = _AT_LEAST.get(name, 0)
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f'{flag} must be a finite number, got {value}.')
        if min(values) < low or (name in _ABOVE_0 + _RANGES and min(values) <= 0):
            what = 'above 0' if name in _ABOVE_0 + _RANGES else f'at least {low}'
            raise ConfigError(f'{flag} must be {what}, got {value}.')
        if name in _AT_MOST_1 and max(values) > 1:
            raise ConfigError(f'{flag} is a fraction between 0 and 1, got {value}.')
        if name in _BELOW_1 and max(values) >= 1:
            raise ConfigError(f'{flag} must be below 1, got {value}.')
        if name in _RANGES and values[0] > values[1]:
            raise ConfigError(f'{flag} is MIN MAX, got {value}: the first must not be larger.')
        if name == 'seed' and value >= 2 ** 32:
            raise ConfigError(f'{flag} must be below 2**32 (numpy\'s seeds), got {value}.')


def check_args(args: argparse.Namespace) -> None:
    """ Refuse impossible settings before anything is built or written. """
    if not args.model:
        raise ConfigError('no model: pass --model NAME (e.g. diracnet34_1_cifar) or set model: in the config.')
    if not args.model.startswith(('hf-hub:', 'local-dir:')) and not timm.is_model(args.model):
        dirac = ', '.join(timm.list_models('diracnet*'))
        raise ConfigError(f'unknown model {args.model!r}; DiracNets are {dirac} (any timm model name works too).')
    _check_numbers(args)
    if (args.mixup or args.cutmix) and args.batch_size % 2:
        raise ConfigError(f'mixup/cutmix pair samples within a batch: --batch-size must be even, '
                          f'got {args.batch_size}.')
    experiment = Path(args.experiment)
    if args.experiment and (experiment.is_absolute() or len(experiment.parts) != 1 or args.experiment in ('.', '..')):
        raise ConfigError(f'--experiment {args.experiment!r} must name one folder inside --output (no / or ..): pass '
                          f'--output for where runs go and a plain --experiment name.')
    if args.initial_checkpoint and not Path(args.initial_checkpoint).is_file():
        raise ConfigError(f'--initial-checkpoint {args.initial_checkpoint} is not a file; pass a weights file such as '
                          f'<run folder>/last/model.safetensors.')
    if args.initial_checkpoint and args.pretrained:
        raise ConfigError('--pretrained and --initial-checkpoint both choose the starting weights: pass one.')
    if args.qat and not (args.initial_checkpoint or args.pretrained):
        raise ConfigError('--qat fine-tunes trained weights for int8: pass --initial-checkpoint FILE or --pretrained.')
    if args.qat and args.diracify:
        raise ConfigError('--qat and --diracify exclude each other: --qat fine-tunes a DiracNet for int8, --diracify '
                          'makes a plain net Dirac-parameterized; pass one.')
    if args.diracify_layers and not args.diracify:
        raise ConfigError('--diracify-layers selects the convs of --diracify: add --diracify or drop it.')
    if args.qat and args.model_ema:
        raise ConfigError('--qat does not keep an EMA (its fake-quantized weights cannot be copied): drop --model-ema.')
