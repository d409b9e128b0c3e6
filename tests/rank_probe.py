""" Test-side launcher for `accelerate launch` (or plain `python`): runs `timm-dirac-train`'s main as `train.py`
does, then writes what this rank did to `<dump dir>/rank<RANK>-<tag>.pt`: where it ran (rank, node, backend), its
final weights and BatchNorm statistics (None where the run did not finish), the samples it loaded in order ('train'
or 'eval' transform, index in the split: held-out validation images come from the train split too), the files it
moved into place (atomic writes), and the exit code.

    accelerate launch ... tests/rank_probe.py DUMP_DIR TAG <timm-dirac-train flags>

`PROBE_FAULT=RANK:N:WHAT` makes rank RANK, when it (or one of its loader workers) loads its N-th training sample, do
WHAT: `sigterm-launcher` (SIGTERM to its parent, the `accelerate launch` process, as a scheduler does), `sigterm` (to
itself), `sigterm-group` (to its process group, loader workers included, as SLURM does), `kill` (SIGKILL itself) or
`stop` (SIGSTOP itself).
"""
import os
import signal
import sys

import torch
from accelerate import PartialState

import timm_dirac.data as data
import timm_dirac.train as train_module

dump_dir, tag, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
seen, replaced, trained = [], [], []
fault_rank, fault_at, fault = (os.environ.get('PROBE_FAULT') or '-1:0:none').split(':')
RANK = int(os.environ.get('RANK', 0))
SIGNALS = {'sigterm': (os.getpid, signal.SIGTERM), 'sigterm-launcher': (os.getppid, signal.SIGTERM),
           'sigterm-group': (lambda: -os.getpgid(0), signal.SIGTERM), 'kill': (os.getpid, signal.SIGKILL),
           'stop': (os.getpid, signal.SIGSTOP)}

load_sample = data.Images.__getitem__


def record_sample(self, index):
    training = any(type(t).__name__ == 'RandomCrop' for t in self.transform.transforms) if self.transform else None
    if training is not None:
        seen.append(('train' if training else 'eval', index))
    if training and RANK == int(fault_rank) and sum(s == 'train' for s, _ in seen) == int(fault_at):
        pid, sig = SIGNALS[fault]
        os.kill(pid(), sig)
    return load_sample(self, index)


move = os.replace


def record_move(src, dst, *args, **kwargs):
    replaced.append(os.fspath(dst))
    return move(src, dst, *args, **kwargs)


train = train_module.train


def record_train(args):
    trained.append(train(args))
    return trained[0]


data.Images.__getitem__ = record_sample
os.replace = record_move
train_module.train = record_train
code = 0
try:
    train_module.main(argv)
except SystemExit as e:
    code = e.code
finally:
    os.replace = move
    state = PartialState()
    torch.save(dict(
        rank=state.process_index, world=state.num_processes, node=int(os.environ.get('GROUP_RANK', 0)),
        backend=state.backend, weights=trained[0].state_dict() if trained else None, seen=seen, replaced=replaced,
        code=code), os.path.join(dump_dir, f'rank{state.process_index}-{tag}.pt'))
sys.exit(code)
