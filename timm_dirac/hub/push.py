""" `timm-dirac push`: upload a Hub folder written by `timm-dirac convert` (or `hub.save_hub_folder`) to the Hugging
Face Hub with the user's usual credentials (`hf auth login` or `HF_TOKEN`). """
import argparse
from pathlib import Path

from ..errors import first_sentence
from .folder import HUB_NAMESPACE, push_hub_folder

__all__ = ['add_arguments', 'run']


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument('folder', help='Hub folder written by `timm-dirac convert` (or save_hub_folder)')
    parser.add_argument('--repo-id', required=True, help=f'Hub repository, e.g. {HUB_NAMESPACE}/diracnet18.in1k')
    parser.add_argument('--private', action='store_true', help='create the repository as private')
    parser.add_argument('--dry-run', action='store_true', help='show the files that would be uploaded, upload nothing')
    parser.add_argument('--allow-unknown-license', action='store_true',
                        help="upload even though the card's licence is unknown (you have the right to publish them)")
    parser.add_argument('--commit-message', default=None)


def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    try:
        files = push_hub_folder(folder, args.repo_id, private=args.private, dry_run=args.dry_run,
                                commit_message=args.commit_message, allow_unknown_license=args.allow_unknown_license)
    except (ValueError, FileNotFoundError):  # the folder or the licence: already one line that names the fix
        raise
    except Exception as e:  # the Hub client's own errors (no network, offline mode, login, permissions) by their type
        raise ConnectionError(
            f'nothing was uploaded to https://huggingface.co/{args.repo_id} ({first_sentence(e)}): push needs the '
            f'network (and HF_HUB_OFFLINE unset) and a Hugging Face login with write access (`hf auth login` or '
            f'HF_TOKEN); run it again then.') from e
    verb = 'would upload' if args.dry_run else 'uploaded'
    print(f'{verb} to https://huggingface.co/{args.repo_id}{" (private)" if args.private else ""}:')
    for f in files:
        print(f'  {f}  ({(folder / f).stat().st_size:,} bytes)')
    return 0
