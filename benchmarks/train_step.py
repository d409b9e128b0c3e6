""" Training-step speed of a DiracNet (train form) against its ResNet peer, measured side by side.

Each model runs `timm.create_model(name).train()` in channels_last with an SGD step on random images; fp32 and
bf16 autocast rounds are interleaved (the two models alternate within every round, their order flips each round),
so load from other work on the machine hits both alike. Prints img/s medians and the DiracNet / peer ratio per
round (median and best round), with the CPU and the load average:

    python benchmarks/train_step.py                      # diracnet18 vs resnet18, batch 32 at 112 px
    python benchmarks/train_step.py --compile            # the same through torch.compile
    python benchmarks/train_step.py --profile 20         # where the time goes (torch.profiler, 3 steps each)

On a machine that other jobs load, `--threads 1` gives far steadier rounds: with more runnable threads than cores,
torch's OpenMP threads wait on each other and single rounds swing by 3x.
"""
import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import timm
import torch
import torch.nn.functional as F

import timm_dirac  # noqa: F401  registers the diracnet* models
from timm_dirac.machine import cpu_features, cpu_name

PRECISIONS = ('fp32', 'bf16')


def make_step(name: str, batch_size: int, img_size: int, precision: str, compile_model: bool) -> Callable[[], None]:
    """ One SGD training step of `name` in channels_last, as a closure over its own model, data and optimizer. """
    torch.manual_seed(0)
    model = timm.create_model(name).train().to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, model.num_classes, (batch_size,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'):
            loss = F.cross_entropy(forward(x), target)
        loss.backward()
        optimizer.step()
    return step


def time_steps(step: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def profile(steps: Dict[str, Callable[[], None]], rows: int):
    """ Print torch.profiler's top operators by self CPU time over 3 steps of each model. """
    for key, step in steps.items():
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(f'\n== {key}: 3 steps')
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='diracnet18')
    parser.add_argument('--peer', default='resnet18')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=112)
    parser.add_argument('--precisions', nargs='+', choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument('--rounds', type=int, default=8)
    parser.add_argument('--steps', type=int, default=4, help='timed steps per model per round')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per model and precision first')
    parser.add_argument('--compile', action='store_true', help='torch.compile each model (inductor) first')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s own)')
    parser.add_argument('--profile', type=int, default=0, metavar='ROWS',
                        help='instead of timing, print the top ROWS operators of 3 profiled steps per model')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models = (args.model, args.peer)
    steps = {(name, precision): make_step(name, args.batch_size, args.img_size, precision, args.compile)
             for precision in args.precisions for name in models}
    features = sorted(cpu_features() & {'amx_tile', 'amx_bf16', 'avx512_bf16', 'avx512_vnni'})
    print(f'CPU: {cpu_name()}, {os.cpu_count()} cores, {" ".join(features) or "no bf16/vnni units"}; '
          f'torch {torch.__version__}, {torch.get_num_threads()} threads; '
          f'batch {args.batch_size} at {args.img_size} px, channels_last, SGD, '
          f'{"torch.compile" if args.compile else "eager"}')
    print(f'load average before: {" ".join(f"{v:.2f}" for v in os.getloadavg())}')
    if args.profile:
        profile({f'{name} {precision}': step for (name, precision), step in steps.items()}, args.profile)
        return
    for step in steps.values():
        for _ in range(args.warmup):
            step()

    rates: Dict[tuple, List[float]] = {key: [] for key in steps}
    for r in range(args.rounds):
        for precision in args.precisions:
            for name in (models if r % 2 == 0 else models[::-1]):
                seconds = time_steps(steps[name, precision], args.steps)
                rates[name, precision].append(args.steps * args.batch_size / seconds)
    print(f'load average after:  {" ".join(f"{v:.2f}" for v in os.getloadavg())}')

    print(f'\n{"precision":9} {args.model + " img/s":>18} {args.peer + " img/s":>18} '
          f'{"ratio of medians":>16} {"round ratio: median":>20} {"best":>6} {"worst":>6}')
    for precision in args.precisions:
        ours, peer = rates[args.model, precision], rates[args.peer, precision]
        ratios = [a / b for a, b in zip(ours, peer)]
        print(f'{precision:9} {statistics.median(ours):18.1f} {statistics.median(peer):18.1f} '
              f'{statistics.median(ours) / statistics.median(peer):16.3f} {statistics.median(ratios):20.3f} '
              f'{max(ratios):6.3f} {min(ratios):6.3f}')
    print(f'({args.rounds} interleaved rounds of {args.steps} steps per model)')


if __name__ == '__main__':
    main()
