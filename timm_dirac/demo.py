""" `timm-dirac demo`: build a DiracNet, fold it, check that both forms agree and time them. """
import argparse
import copy
import time

import timm
import torch


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument('--model', default='diracnet18', help='registered diracnet* model name')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=5, help='timed forward passes per form (median reported)')


def _median_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    folded = copy.deepcopy(model)
    folded.reparameterize()
    x = torch.randn(args.batch_size, *model.pretrained_cfg['input_size'])
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
    train_s, folded_s = _median_seconds(model, x, args.repeats), _median_seconds(folded, x, args.repeats)
    print(f'forward, median of {args.repeats}: train form {train_s * 1e3:.1f} ms, folded {folded_s * 1e3:.1f} ms, '
          f'speedup {train_s / folded_s:.2f}x ({torch.get_num_threads()} threads)')
    if rel_err > 1e-5:
        print('ERROR: the folded model does not reproduce the train form')
        return 1
    return 0
