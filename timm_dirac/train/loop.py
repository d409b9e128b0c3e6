""" The engine of a run: the accelerator in the precision that is fast here, one training epoch, an evaluation. """
import argparse
import contextlib
import math
import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3, accuracy

from .. import metrics
from ..machine import auto_precision

__all__ = ['pick_precision', 'make_accelerator', 'build_optimizer', 'train_one_epoch', 'evaluate', 'young_batchnorm']


def _has_accelerator() -> bool:
    accel = getattr(torch, 'accelerator', None)
    return accel.is_available() if accel is not None else torch.cuda.is_available()


def pick_precision(args: argparse.Namespace) -> Tuple[Optional[str], str]:
    """ accelerate's mixed_precision for `args` ('bf16', 'fp16', 'no'; None: the launch setting) and why. """
    if not args.amp:
        return None, 'no --amp: the accelerate launch setting'
    if args.amp_dtype != 'auto':
        return ('bf16' if args.amp_dtype == 'bfloat16' else 'fp16'), f'--amp-dtype {args.amp_dtype}'
    device = 'cuda' if torch.cuda.is_available() else 'cpu' if not _has_accelerator() else 'other'
    precision, why = auto_precision(device)
    return {'fp32': 'no'}.get(precision, precision), f'--amp auto: {why}'


def make_accelerator(args: argparse.Namespace):
    """ Accelerator on the GPU(s) if any, else on CPU (so `accelerate launch --multi_gpu` gives gloo ranks), in the
    precision `pick_precision` chooses, named with its reason in the run's first line (the only one naming it). """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    precision, why = pick_precision(args)
    accelerator = Accelerator(
        cpu=not _has_accelerator(),
        mixed_precision=precision,
        gradient_accumulation_steps=args.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        step_scheduler_with_optimizer=False,
    )
    names = {'bf16': 'bf16 autocast', 'fp16': 'fp16 autocast with a loss scaler', 'no': 'fp32'}
    accelerator.print(f'precision: {names.get(accelerator.mixed_precision, accelerator.mixed_precision)} ({why})')
    return accelerator


def build_optimizer(model: nn.Module, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    """ timm's optimizer for `args`; `--weight-decay-1d` decays the 1-d parameters too (the authors' grouping). """
    return create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
                               filter_bias_and_bn=not args.weight_decay_1d)


def train_one_epoch(
        model: nn.Module, loader, optimizer, scheduler, loss_fn: nn.Module, accelerator, args: argparse.Namespace,
        epoch: int, num_updates: int, mixup: Optional[Mixup] = None, ema: Optional[ModelEmaV3] = None,
) -> Tuple[Dict[str, float], int]:
    """ One pass over this rank's shard; returns global train loss/top-1/images-per-second and the update count. """
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, correct, samples
    bar = tqdm(loader, desc=f'train {epoch + 1}', disable=not accelerator.is_main_process, dynamic_ncols=True,
               leave=False)
    start = time.perf_counter()
    for step, (images, labels) in enumerate(bar):
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
        if accelerator.sync_gradients:
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=num_updates)
        n = labels.shape[0]
        top1 = accuracy(logits.detach(), labels, topk=(1,))[0]
        totals += torch.stack([loss.detach() * n, top1 * n / 100, torch.full_like(top1, n)]).double()
        if accelerator.is_main_process and (step + 1) % args.log_interval == 0:
            seen = (step + 1) * n * accelerator.num_processes
            bar.set_postfix(loss=f'{totals[0].item() / totals[2].item():.3f}',
                            img_s=f'{seen / (time.perf_counter() - start):.0f}')
    elapsed = time.perf_counter() - start
    totals = accelerator.reduce(totals, reduction='sum')
    loss_sum, correct, count = totals.tolist()
    return dict(loss=loss_sum / count, top1=100 * correct / count, img_s=count / elapsed), num_updates


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
