""" The one top-1 / top-5 evaluation of the package: `validate`, training, `quantize` and the benchmarks score
through it. """
import math
import sys
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = ['evaluate', 'check_classifier']


def check_classifier(model: torch.nn.Module) -> None:
    """ Refuse to score a model without a classifier (`num_classes=0`, timm's feature extractors): its outputs are
    pooled features, which an evaluation would take for class scores and report a top-1 of. """
    if getattr(model, 'num_classes', None) == 0:
        name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
        raise ValueError(f'{name} has no classifier (num_classes=0): its outputs are features, not class scores, '
                         f'so no accuracy can be measured and none is claimed; use a checkpoint with its classifier.')


@torch.no_grad()
def evaluate(
        predict: Callable[[torch.Tensor], torch.Tensor],
        batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        progress: bool = False,
        desc: str = 'eval',
) -> Dict[str, float]:
    """ Top-1 / top-5 accuracy (%) and mean cross-entropy of `predict` (a batch of images -> logits) over
    (images, labels) batches: the one top-1/top-5 evaluation of the package (validate, training, quantize, the
    benchmarks).

    `gather` collects the per-sample results of every rank (accelerate's `gather_for_metrics`, which also drops the
    samples a sharded loader repeats to even out its last batch): why our own loop, not timm's `accuracy`, whose
    batch means cannot drop them. A label the classifier does not have, an empty
    dataset and non-finite logits are refused: no number is reported for them.
    """
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits
    count = 0
    for images, labels in tqdm(batches, desc=desc, unit='batch', disable=not progress, file=sys.stderr, leave=False):
        logits = predict(images)
        labels = labels.to(logits.device)
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < logits.shape[1]:
            label = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())  # cross-entropy skips -100
            raise ValueError(f'The data has label {label} but the model has {logits.shape[1]} classes: '
                             f'evaluate a model trained on this label set (or pass --num-classes).')
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        loss = F.cross_entropy(logits.float(), labels, reduction='none')
        per_sample = torch.stack([loss, hits[:, 0], hits.any(1)], 1).double()
        if gather is not None:
            per_sample = gather(per_sample)
        totals += per_sample.sum(0).cpu()
        count += per_sample.shape[0]
    if count == 0:
        raise ValueError('The dataset is empty: check the path and the split.')
    loss_sum, top1, top5 = totals.tolist()
    if not math.isfinite(loss_sum):
        raise ValueError(f'The model gave non-finite logits (loss {loss_sum}): its weights or inputs are broken; '
                         f'no result is reported. Check the checkpoint (or use an earlier one).')
    return dict(top1=100. * top1 / count, top5=100. * top5 / count, loss=loss_sum / count, count=count)
