""" How the command-line tools end on an error: one line that names the problem, exit code 2, no traceback; and the
numeric flag type that refuses what a number flag cannot mean (NaN, infinities, out-of-range values) before any work.

`--debug` (on `timm-dirac` and `timm-dirac-train`) re-raises instead, so the traceback is there when a developer
wants it. The messages of the project's own errors name the fix; an error from deeper down (torch, PIL, datasets)
is reduced to its last line with its type, which is what a user can search for.
"""
import argparse
import math
import sys
from typing import Callable, Optional, Union

__all__ = ['one_line', 'first_sentence', 'run_refusing', 'number']


def one_line(error: BaseException) -> str:
    """ The last line of `error`'s message (a DataLoader worker wraps the original in a traceback whose last line
    holds it), without a repeated `module.Type: ` prefix; the type's name where the message says nothing alone. """
    lines = str(error).strip().splitlines()
    if not lines:
        return f'{type(error).__name__} (no message)'
    last = lines[-1].strip()
    for prefix in (f'{type(error).__module__}.{type(error).__qualname__}: ', f'{type(error).__name__}: '):
        if last.startswith(prefix):
            last = last[len(prefix):]
    if isinstance(error, (KeyError, IndexError, EOFError)) or len(last) < 20:
        return f'{type(error).__name__}: {last}'
    return last


def first_sentence(error: BaseException) -> str:
    """ `Type: first sentence` of an error from a library (torch's zip errors run to five sentences). """
    text = str(error).strip().splitlines()[0] if str(error).strip() else 'no message'
    return f'{type(error).__name__}: {text.split(". ")[0].rstrip(".")}'


def run_refusing(prog: str, func: Callable[[], int], debug: bool = False) -> int:
    """ `func()`, with any error ending as one line on stderr and exit code 2 (unless `debug`). """
    try:
        return func() or 0
    except Exception as e:  # noqa: BLE001  the one place every error of a command ends
        if debug:
            raise
        print(f'{prog}: error: {one_line(e)} (--debug shows the traceback)'
              if not isinstance(e, (ValueError, OSError)) else f'{prog}: error: {one_line(e)}', file=sys.stderr)
        return 2


def number(kind: type = int, low: Optional[float] = None, high: Optional[float] = None, above: bool = False
           ) -> Callable[[str], Union[int, float]]:
    """ An argparse `type` for a numeric flag: an int (or a float) that is finite, at least `low` (more than it with
    `above`) and at most `high`; anything else is refused naming the range. """
    def parse(text: str) -> Union[int, float]:
        try:
            value = kind(text)
        except ValueError:
            value = None
        in_range = value is not None and math.isfinite(value) and (
            low is None or (value > low if above else value >= low)) and (high is None or value <= high)
        if not in_range:
            what = 'an integer' if kind is int else 'a finite number'
            bounds = [f'{"above" if above else "at least"} {low:g}'] if low is not None else []
            bounds += [f'at most {high:g}'] if high is not None else []
            raise argparse.ArgumentTypeError(f'{text!r} is not {what}{" " + " and ".join(bounds) if bounds else ""}')
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse
