""" Test-side launcher for `accelerate launch`: trains as `train.py` does, then writes what this rank did to
`<dump dir>/rank<RANK>-<tag>.pt`: where it ran (rank, node, backend), its final weights and BatchNorm statistics,
the samples it loaded in order ('train' or 'eval' transform, index in the split: held-out validation images come
from the train split too), and the files it moved into place (atomic writes).

    accelerate launch ... tests/rank_probe.py DUMP_DIR TAG <timm-dirac-train flags>
"""
import os
import sys

import torch
from accelerate import PartialState

import timm_dirac.data as data
from timm_dirac.train import parse_args, train

dump_dir, tag, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
seen, replaced = [], []

load_sample = data.Images.__getitem__


def record_sample(self, index):
    training = any(type(t).__name__ == 'RandomCrop' for t in self.transform.transforms)
    seen.append(('train' if training else 'eval', index))
    return load_sample(self, index)


move = os.replace


def record_move(src, dst, *args, **kwargs):
    replaced.append(os.fspath(dst))
    return move(src, dst, *args, **kwargs)


data.Images.__getitem__ = record_sample
os.replace = record_move
model = train(parse_args(argv))
os.replace = move

state = PartialState()
torch.save(dict(
    rank=state.process_index, world=state.num_processes, node=int(os.environ['GROUP_RANK']), backend=state.backend,
    weights=model.state_dict(), seen=seen, replaced=replaced,
), os.path.join(dump_dir, f'rank{state.process_index}-{tag}.pt'))
