""" How the command-line tools end on an error: one line that names the problem, exit code 2, no traceback.

`--debug` (on `timm-dirac` and `timm-dirac-train`) re-raises instead, so the traceback is there when a developer
wants it. The messages of the project's own errors name the fix; an error from deeper down (torch, PIL, datasets)
is reduced to its last line with its type, which is what a user can search for.
"""
import sys
from typing import Callable

__all__ = ['one_line', 'first_sentence', 'run_refusing']


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
