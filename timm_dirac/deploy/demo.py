""" `timm-dirac demo`: build a DiracNet, fold it, check that both forms agree and time them. """
import argparse
import copy
import statistics

import timm
import torch
from torch.optim.swa_utils import update_bn

from .timing import time_interleaved


def add_arguments(parser: argparse.ArgumentParser):
    from ..errors import number

    parser.add_argument('--model', default='diracnet18', help='registered diracnet* model name')
    parser.add_argument('--batch-size', type=number(int, 1), default=8)
    parser.add_argument('--repeats', type=number(int, 1), default=5,
                        help='interleaved timing rounds (median reported)')


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    model = timm.create_model(args.model)
    x = torch.randn(args.batch_size, *model.pretrained_cfg['input_size'])
    # untrained: BatchNorm statistics from the batch, else the logits nearly vanish and the folded biases are all 0
    update_bn([x], model)
    model.eval()
    folded = copy.deepcopy(model)
    folded.reparameterize()
    with torch.inference_mode():
        reference, output = model(x), folded(x)
    rel_err = ((output - reference).abs().max() / reference.abs().max()).item()

    def count(m):
        return sum(p.numel() for p in m.parameters())

    def layers(m):
        return sorted({type(mod).__name__ for mod in m.modules() if not list(mod.children())})

    print(f'{args.model}: {count(model):,} parameters in train form, {count(folded):,} folded')
    print(f'train-form layers: {", ".join(layers(model))}')
    print(f'folded layers:     {", ".join(layers(folded))}')
    print(f'max |folded - train| / max |train| = {rel_err:.2e} (eval mode, batch {args.batch_size})')
    with torch.inference_mode():
        times, _ = time_interleaved({'train': lambda: model(x), 'folded': lambda: folded(x)}, repeats=args.repeats,
                                    min_time=0.2)
    train_s, folded_s = statistics.median(times['train']), statistics.median(times['folded'])
    print(f'forward, median of {args.repeats} interleaved rounds: train form {train_s * 1e3:.1f} ms, folded '
          f'{folded_s * 1e3:.1f} ms, speedup {train_s / folded_s:.2f}x ({torch.get_num_threads()} threads)')
    if not rel_err <= 1e-5:  # NaN fails too
        print('ERROR: the folded model does not reproduce the train form')
        return 1
    return 0
