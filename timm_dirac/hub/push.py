""" `timm-dirac push`: upload a Hub folder written by `timm-dirac convert` (or `save_hub_folder`) to the Hugging Face
Hub in one commit (`HfApi.create_commit`), with the user's usual credentials (`hf auth login` or `HF_TOKEN`).

The uploaded card names the repository in its usage examples (the local folder is left as it is); a folder whose
licence is unknown is refused unless the user says they may publish it; `--dry-run` lists the files offline.
"""
import argparse
import os
from pathlib import Path
from typing import List, Optional

from ..errors import first_sentence
from .card import REPO_ID_PLACEHOLDER
from .folder import check_hub_folder, upload_file_list

__all__ = ['HUB_NAMESPACE', 'push_hub_folder', 'add_arguments', 'run']

# Hub namespace (user or organisation) of the weights this project trains itself, e.g. `<ns>/diracnet34_1_cifar.<tag>`
HUB_NAMESPACE = 'timm-dirac'


def _card_license(folder: Path) -> Optional[str]:
    from huggingface_hub import ModelCard
    return ModelCard.load(folder / 'README.md').data.license


def push_hub_folder(
        folder: os.PathLike,
        repo_id: str,
        private: bool = False,
        dry_run: bool = False,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
        allow_unknown_license: bool = False,
) -> List[str]:
    """ Upload a Hub folder to `repo_id` (created if missing) in one commit; returns the uploaded repo paths
    (`upload_file_list`: hidden files stay local).

    The uploaded README.md names `repo_id` in its usage examples. A folder whose card says `license: unknown` (e.g.
    the authors' weights, which timm-dirac does not re-host) is refused unless `allow_unknown_license`. With
    `dry_run`, checks the folder and returns the files without contacting the Hub.
    """
    folder = Path(folder)
    check_hub_folder(folder)
    if repo_id.count('/') != 1:
        raise ValueError(f'--repo-id {repo_id!r} must be <namespace>/<name>, e.g. {HUB_NAMESPACE}/diracnet18.in1k.')
    license_id = _card_license(folder)
    if license_id in (None, 'unknown') and not allow_unknown_license:
        raise ValueError(
            f'{folder / "README.md"} gives the licence of these weights as {license_id or "nothing"}: nothing was '
            f'uploaded. Publish only weights you may re-host: set the licence in the card (convert --license ID), or '
            f'pass --allow-unknown-license if you have the right to publish them anyway.')
    files = upload_file_list(folder)
    if dry_run:
        return files
    from huggingface_hub import CommitOperationAdd, HfApi

    # one commit of the listed files, the card from memory: upload_folder would send the folder's card as it is
    card = (folder / 'README.md').read_text(encoding='utf-8').replace(REPO_ID_PLACEHOLDER, repo_id)
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=card.encode('utf-8') if f == 'README.md'
                                     else str(folder / f)) for f in files]
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    api.create_commit(repo_id=repo_id, repo_type='model', operations=operations,
                      commit_message=commit_message or f'Upload {folder.name} with timm-dirac')
    return files


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
