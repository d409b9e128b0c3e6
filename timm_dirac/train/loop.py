""" The engine of a run: the accelerator in the precision that is fast here, one training epoch, an evaluation, and how
a run learns that it must stop: SIGTERM (`StopSignal`) and a process that stopped answering (`RankWatch`). """
import argparse
import atexit
import contextlib
import math
import os
import signal
import socket
import threading
import time
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3, accuracy

from .. import metrics
from ..machine import auto_precision

__all__ = ['pick_precision', 'make_accelerator', 'build_optimizer', 'train_one_epoch', 'evaluate', 'young_batchnorm',
           'StopSignal', 'Preempted', 'RankWatch', 'SIGTERM_EXIT_CODE', 'workers_leave_sigterm']

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # 143: a shell's status for a SIGTERM-ended process, as accelerate launch's


def _has_accelerator() -> bool:
    accel = getattr(torch, 'accelerator', None)
    return accel.is_available() if accel is not None else torch.cuda.is_available()


def pick_precision(args: argparse.Namespace) -> Tuple[Optional[str], str]:
    """ accelerate's mixed_precision for `args` ('bf16', 'fp16', 'no'; None: the launch setting) and why. """
    if not args.amp:
        launched = os.environ.get('ACCELERATE_MIXED_PRECISION')  # set by `accelerate launch` (or its config)
        if launched:
            return None, f'no --amp: the accelerate launch setting --mixed_precision {launched}'
        return 'no', 'no --amp; --amp picks bf16 or fp16 where the hardware computes it'
    if args.amp_dtype != 'auto':
        return ('bf16' if args.amp_dtype == 'bfloat16' else 'fp16'), f'--amp-dtype {args.amp_dtype}'
    device = 'cuda' if torch.cuda.is_available() else 'cpu' if not _has_accelerator() else 'other'
    precision, why = auto_precision(device)
    return {'fp32': 'no'}.get(precision, precision), f'--amp auto: {why}'


def make_accelerator(args: argparse.Namespace):
    """ Accelerator on the GPU(s) if any, else on CPU (so `accelerate launch --multi_gpu` gives gloo ranks), in the
    precision `pick_precision` chooses, named with its reason in the run's first line (the only one naming it), its
    collectives waiting at most `--dist-timeout` seconds for a process. """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    precision, why = pick_precision(args)
    accelerator = Accelerator(
        cpu=not _has_accelerator(),
        mixed_precision=precision,
        gradient_accumulation_steps=args.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.dist_timeout))],
    )
    names = {'bf16': 'bf16 autocast', 'fp16': 'fp16 autocast with a loss scaler', 'no': 'fp32'}
    accelerator.print(f'precision: {names.get(accelerator.mixed_precision, accelerator.mixed_precision)} ({why})')
    return accelerator


# ------------------------------------------------------------------------------------------- stopping a run
class Preempted(KeyboardInterrupt):
    """ SIGTERM stopped the run: after `batches` batches of an epoch (per process; their global loss sum, correct
    count and sample count in `totals`, `num_updates` optimizer updates in all), or between epochs (batches None). """

    def __init__(self, batches: Optional[int] = None, totals: Optional[List[float]] = None,
                 num_updates: Optional[int] = None):
        super().__init__()
        self.batches, self.totals, self.num_updates = batches, totals, num_updates


class StopSignal:
    """ SIGTERM, what SLURM, Kubernetes and torchrun (passing on its own) send some seconds before a kill, handled
    as a request: inside `deferred()` (the epochs) the run stops at its next step, every process at the same one
    (`requested`); elsewhere it stops at once, as Ctrl-C does. A loader worker forked from the training process
    inherits the handler and ignores the signal: the training process ends it. Installed by `with StopSignal()`,
    in the main thread only (where Python runs signal handlers). """

    def __init__(self):
        self.received = False
        self._deferred = 0
        self._pid = os.getpid()
        self._previous = None

    def __enter__(self) -> 'StopSignal':
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        self.received = True
        if not self._deferred:
            raise Preempted()

    @contextlib.contextmanager
    def deferred(self):
        """ Within the block SIGTERM waits for `requested`. """
        self._deferred += 1
        try:
            yield self
        finally:
            self._deferred -= 1

    def requested(self, accelerator) -> bool:
        """ Whether any process received SIGTERM; a collective, so every process must ask at the same step. """
        if accelerator.num_processes == 1:
            return self.received
        if self.received:
            accelerator.set_trigger()
        return accelerator.check_trigger()


_KILL_AT_EXIT = False  # whether _kill_workers_at_exit is registered


class _WorkerLeavesSigterm:
    """ A loader's worker_init_fn that first makes the worker ignore SIGTERM: torch's workers die of a SIGTERM sent
    to their process group (SLURM, torchrun's shutdown), and the training process would then fail at its next batch
    instead of stopping at its next step; it ends its workers itself. """

    def __init__(self, init=None):
        self.init = init

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.init is not None:
            self.init(worker_id)


def _kill_workers_at_exit() -> None:
    """ At exit multiprocessing ends its daemonic children with SIGTERM and waits for them: loader workers, which
    ignore SIGTERM here (and which a run that failed inside an epoch leaves waiting for work), are killed instead. """
    import multiprocessing

    def ignores_sigterm(pid: int) -> bool:
        try:
            with open(f'/proc/{pid}/status') as f:
                mask = next(line.split()[1] for line in f if line.startswith('SigIgn:'))
            return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)
        except (OSError, StopIteration, ValueError):
            return True  # no /proc to ask: daemonic children end at exit anyway
    left = [child for child in multiprocessing.active_children() if child.daemon and ignores_sigterm(child.pid)]
    if left and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each as a failed worker
    for child in left:
        child.kill()
        child.join(5)


def workers_leave_sigterm(*loaders) -> None:
    """ Make the loader workers of `loaders` (accelerate's or torch's loaders; None skipped) ignore SIGTERM; at exit
    the workers left are killed. """
    global _KILL_AT_EXIT
    if not _KILL_AT_EXIT:  # runs before multiprocessing's own exit function, registered at its import (LIFO)
        atexit.register(_kill_workers_at_exit)
        _KILL_AT_EXIT = True
    for loader in loaders:
        if loader is None:
            continue
        base = getattr(loader, 'base_dataloader', loader)  # accelerate's loaders wrap torch's
        if not isinstance(base.worker_init_fn, _WorkerLeavesSigterm):
            base.worker_init_fn = _WorkerLeavesSigterm(base.worker_init_fn)


class RankWatch:
    """ Each process's heartbeat, a counter in the process group's store bumped every second by a daemon thread, so
    that a process whose collective failed (a peer ended: `Connection reset by peer`; or a peer hangs: the
    `--dist-timeout` expired) can name the processes that stopped answering, and their machines. Ours: torch.distributed
    keeps no record of which rank is alive that a rank can read. """
    interval_s = 1.0

    def __init__(self, rank: int, world: int):
        from torch.distributed.distributed_c10d import _get_default_store  # the store every launcher sets up
        self.rank, self.world = rank, world
        self.store = _get_default_store()
        prefix = f'timm_dirac/{os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}'
        self._beats = lambda r: f'{prefix}/heartbeat/{r}'
        self._host = lambda r: f'{prefix}/host/{r}'
        self.store.set(self._host(rank), socket.gethostname())
        threading.Thread(target=self._beat, name='timm-dirac-heartbeat', daemon=True).start()

    def _beat(self) -> None:
        while True:
            try:
                self.store.add(self._beats(self.rank), 1)
            except Exception:  # noqa: BLE001  the store is gone: so is the run
                return
            time.sleep(self.interval_s)

    def silent(self) -> Optional[Dict[int, str]]:
        """ The ranks whose heartbeat did not move for 3 beats, with their host names ('' if unknown); None if the
        store did not answer within 10 s. """
        found: List[Optional[Dict[int, str]]] = [None]

        def ask() -> None:
            counts = lambda: [self.store.add(self._beats(r), 0) for r in range(self.world)]  # noqa: E731
            before = counts()
            time.sleep(3 * self.interval_s)
            after = counts()
            found[0] = {r: (self.store.get(self._host(r)).decode() if self.store.check([self._host(r)]) else '')
                        for r in range(self.world) if after[r] == before[r]}
        asking = threading.Thread(target=ask, daemon=True)  # a store that died would block the caller for good
        asking.start()
        asking.join(3 * self.interval_s + 10)
        return found[0]


def build_optimizer(model: nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    """ timm's optimizer for `args`; `--weight-decay-1d` decays the 1-d parameters too (the authors' grouping). """
    return create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
                               filter_bias_and_bn=not args.weight_decay_1d)


def train_one_epoch(
        model: nn.Module, loader, optimizer, scheduler, loss_fn: nn.Module, accelerator, args: argparse.Namespace,
        epoch: int, num_updates: int, mixup: Optional[Mixup] = None, ema: Optional[ModelEmaV3] = None,
        stop: Optional[StopSignal] = None, skipped: int = 0, totals: Optional[List[float]] = None,
) -> Tuple[Dict[str, float], int]:
    """ One pass over this rank's shard; returns global train loss/top-1/images-per-second and the update count.

    A resume inside the epoch passes a `loader` that skips its first `skipped` batches, and the global `totals`
    (loss sum, correct, samples) of those. With `stop`, every rank asks after each optimizer update but the epoch's
    last whether SIGTERM came, and raises `Preempted` there with what the epoch has done. """
    model.train()
    # loss sum, correct, samples; a resume's earlier sums counted once, on rank 0
    earlier = totals if totals is not None and accelerator.is_main_process else [0., 0., 0.]
    totals_t = torch.tensor(earlier, dtype=torch.float64, device=accelerator.device)
    batches = skipped + len(loader)
    bar = tqdm(loader, desc=f'train {epoch + 1}', disable=not accelerator.is_main_process, dynamic_ncols=True,
               leave=False, initial=skipped, total=batches)
    start = time.perf_counter()
    for step, (images, labels) in enumerate(bar, start=skipped):
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels
        if mixup is not None:
            images, targets = mixup(images, labels)
        with accelerator.accumulate(model):
            logits = model(images)
            loss = loss_fn(logits, targets)
            accelerator.backward(loss)
            if args.clip_grad and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        n = labels.shape[0]
        top1 = accuracy(logits.detach(), labels, topk=(1,))[0]
        totals_t += torch.stack([loss.detach() * n, top1 * n / 100, torch.full_like(top1, n)]).double()
        if accelerator.sync_gradients:
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=num_updates)
            if stop is not None and step + 1 < batches and stop.requested(accelerator):
                bar.close()
                raise Preempted(step + 1, accelerator.reduce(totals_t.clone(), reduction='sum').tolist(), num_updates)
        if accelerator.is_main_process and (step + 1) % args.log_interval == 0:
            seen = (step + 1 - skipped) * n * accelerator.num_processes
            bar.set_postfix(loss=f'{totals_t[0].item() / totals_t[2].item():.3f}',
                            img_s=f'{seen / (time.perf_counter() - start):.0f}')
    elapsed = time.perf_counter() - start
    totals_t = accelerator.reduce(totals_t, reduction='sum')
    loss_sum, correct, count = totals_t.tolist()
    fresh = count - (sum(totals[2:3]) if totals is not None else 0.)  # the images this call trained on
    return dict(loss=loss_sum / count, top1=100 * correct / count, img_s=fresh / elapsed), num_updates


def evaluate(model: nn.Module, loader, accelerator, channels_last: bool = False, desc: str = 'eval',
             fp32: bool = False) -> Dict[str, float]:
    """ Loss, top-1 and top-5 over every rank's samples, each counted once (`gather_for_metrics` drops the samples
    a prepared loader repeats to even out the last batch): `timm_dirac.metrics.evaluate` with the model in the run's
    precision, or in fp32 with `fp32` (a model not prepared by the accelerator, whose forward would autocast). """
    model.eval()

    def predict(images: torch.Tensor) -> torch.Tensor:
        images = images.to(accelerator.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with contextlib.nullcontext() if fp32 else accelerator.autocast():
            return model(images)
    return metrics.evaluate(predict, loader, gather=accelerator.gather_for_metrics,
                             progress=accelerator.is_main_process, desc=desc)


def young_batchnorm(model: nn.Module, batches: int, tolerance: float = 0.01) -> str:
    """ A note when BatchNorm running statistics still hold more than `tolerance` of their initial values after
    `batches` training batches (momentum m keeps (1 - m)^batches of them): evaluation then understates the model. """
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum]
    if not momenta:
        return ''
    momentum = min(momenta)
    left = (1 - momentum) ** batches
    if left <= tolerance:
        return ''
    needed = math.ceil(math.log(tolerance) / math.log(1 - momentum))
    return (f'note: after {batches} batches the BatchNorm running statistics still hold {100 * left:.0f}% of their '
            f'initial values, so the validation numbers understate the model; they settle after about {needed} '
            f'batches (train more epochs).')
