""" `timm-dirac` command line: one subcommand per job, each defined in its own module.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`; it is imported only when used,
so `timm-dirac convert` does not pay for onnxruntime and `timm-dirac benchmark` does not need huggingface_hub.
A bad flag is refused as any error is, in one line with exit code 2, before the command runs: numeric flags take
their checks from `number` (finite, within the range that means something).
"""
import argparse
import importlib
import sys
from typing import List, Optional

from .errors import run_refusing

# subcommand -> (module, one-line help)
COMMANDS = {
    'demo': ('timm_dirac.deploy.demo', 'build a DiracNet, fold it, check the outputs match and time both forms'),
    'benchmark': ('timm_dirac.deploy.benchmark', 'inference speed of DiracNets (train form, folded) vs ResNet/RepVGG'),
    'export-onnx': ('timm_dirac.deploy.export',
                    'export a folded model to ONNX, checked with ONNX Runtime on real images'),
    'quantize': ('timm_dirac.deploy.quantize',
                 'post-training static int8 of a folded model, calibrated on real images'),
    'convert': ('timm_dirac.hub.convert', "convert a checkpoint (ours or the authors', path or URL) into a Hub folder"),
    'push': ('timm_dirac.hub.push', 'upload a Hub folder to the Hugging Face Hub (--dry-run lists the files)'),
    'validate': ('timm_dirac.validate', 'top-1/top-5 and loss on an image folder or a datasets dataset'),
}


class _Refused(Exception):
    """ A flag argparse refused; `main` says it in one line. """


class _Parser(argparse.ArgumentParser):
    """ argparse, its refusals one line (`prog: error: message`) instead of the usage and a line, exit code 2. """

    def error(self, message: str):
        raise _Refused(f'{self.prog}: error: {message} (see --help)')


def main(argv: Optional[List[str]] = None) -> int:
    parser = _Parser(
        prog='timm-dirac', description='DiracNets for timm: fold, benchmark, export to ONNX, quantize to int8, convert '
                                       'checkpoints, publish to the Hub and validate.')
    parser.add_argument('--debug', action='store_true', help='show the Python traceback of an error (default: one '
                        'line naming the problem, exit code 2)')
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    chosen = [a for a in (argv if argv is not None else sys.argv[1:]) if a != '--debug'][:1]
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                         help='show the Python traceback of an error')
        if name in chosen:
            importlib.import_module(module_name).add_arguments(sub)
    try:
        args = parser.parse_args(argv)
    except _Refused as e:
        print(e, file=sys.stderr)
        return 2
    module = COMMANDS[args.command][0]
    return run_refusing(f'timm-dirac {args.command}', lambda: importlib.import_module(module).run(args), args.debug)


if __name__ == '__main__':
    sys.exit(main())
