""" The one timing routine of the package: callables timed in turn, round after round, on a shared, noisy machine.

Each callable is warmed up (which also compiles or prepacks where a backend does that on the first call), its
iterations per round sized to take about `min_time` seconds, and then every callable runs once per round, in turn,
for `repeats` rounds: load from other processes hits all of them alike, and the median over rounds is robust to a
busy moment. `timm-dirac benchmark` and `timm-dirac quantize` both time with it. Ours rather than
`torch.utils.benchmark.Timer`, which times one callable at a time: the interleaving is what keeps the load off the
ratios between callables.
"""
import time
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

__all__ = ['time_interleaved']


def time_interleaved(
        runs: Dict[Hashable, Callable[[], Any]],
        repeats: int = 5,
        warmup: int = 2,
        min_time: float = 0.5,
        log: Optional[Callable[[str], None]] = None,
) -> Tuple[Dict[Hashable, List[float]], Dict[Hashable, int]]:
    """ Seconds per call of each callable in each of `repeats` interleaved rounds, and its calls per round. """
    iters = {}
    for key, run in runs.items():
        elapsed = 0.
        for _ in range(max(1, warmup)):
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
        iters[key] = max(1, round(min_time / max(elapsed, 1e-6)))
    times: Dict[Hashable, List[float]] = {key: [] for key in runs}
    for r in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            for _ in range(iters[key]):
                run()
            times[key].append((time.perf_counter() - start) / iters[key])
        if log is not None:
            log(f'repeat {r + 1}/{repeats} done')
    return times, iters
