""" The run folder and its checkpoints: written atomically, verified on every read, resumable after a kill anywhere

A run folder holds args.yaml, summary.csv, `checkpoint-<epoch>/` folders (the last and the `--checkpoint-hist` best),
the links `last` and `best`, and at the end test.csv and Hub folders; a run stopped by SIGTERM inside an epoch also
`checkpoint-<epochs done>-step<batches done>/`, which continues at the same sample. A checkpoint is accelerate's
`save_state` plus our `train_state.pt` and `checkpoint.sha256`; the newest checkpoint is the one source of truth, from
which `publish` (re)makes `last`, `best`, the pruning and summary.csv after each save and on resume.
"""
import contextlib
import csv
import errno
import fcntl
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from ..loading import file_sha256
from ..errors import first_sentence

__all__ = ['CheckpointError', 'MANIFEST', 'write_atomic', 'to_csv', 'create_run_folder', 'lock_run_folder',
           'checkpoint_epoch', 'checkpoint_position', 'checkpoint_name', 'describe_checkpoint', 'complete_checkpoints',
           'find_resume_checkpoint', 'verify_checkpoint', 'save_checkpoint', 'load_checkpoint', 'publish', 'rank_best',
           'saved_processes']

MANIFEST = 'checkpoint.sha256'  # `sha256sum -c` reads it too


class CheckpointError(OSError):
    """ A run folder or checkpoint that cannot be written, read or resumed; the message names the fix. """


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(text, encoding='utf-8')
    os.replace(tmp, path)


def _link_atomic(run_dir: Path, name: str, target: str) -> None:
    tmp = run_dir / f'.{name}.tmp'
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, run_dir / name)


def to_csv(rows: List[Dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def create_run_folder(run_dir: Path, args_yaml: str) -> None:
    """ `run_dir` with its args.yaml, made whole by renaming a temp folder into place (over an empty folder, which a
    kill during an earlier start can leave); a folder with anything in it is never reused. """
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = run_dir.with_name(f'.{run_dir.name}.{os.getpid()}.new')  # mkdir, not mkdtemp: the umask's mode
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            (tmp / 'args.yaml').write_text(args_yaml, encoding='utf-8')
            os.replace(tmp, run_dir)  # over an empty folder only (rename(2)); EEXIST or ENOTEMPTY else
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # a flag's mistake, not the disk's
            from .args import ConfigError
            raise ConfigError(f'run folder {run_dir} exists; nothing was overwritten. Pass another --experiment, '
                                  f'or --resume {run_dir} to continue it.') from e
        raise CheckpointError(f'cannot write the run folder {run_dir} ({e.strerror}); pass an --output folder you can '
                              f'write to.') from e


@contextlib.contextmanager
def lock_run_folder(run_dir: Path) -> Iterator[None]:
    """ Hold an exclusive lock on `run_dir` for the block; the kernel drops it when the process ends, however it
    ends. A second process that would train in the same folder is refused. """
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(f'another process is training in {run_dir} (it holds the folder\'s lock); wait for '
                                  f'it to end or stop it, then --resume {run_dir}.') from None
        yield
    finally:
        os.close(fd)


def checkpoint_position(path: Path) -> Optional[Tuple[int, int]]:
    """ (epochs done, batches done of the next epoch) of a folder named `checkpoint-N` (N, 0) or `checkpoint-N-stepS`
    (N, S), else None. """
    match = re.fullmatch(r'checkpoint-(\d+)(?:-step(\d+))?', path.name)
    return (int(match[1]), int(match[2] or 0)) if match else None


def checkpoint_epoch(path: Path) -> Optional[int]:
    """ The epochs done of a checkpoint folder (`checkpoint_position`), else None. """
    position = checkpoint_position(path)
    return position[0] if position else None


def checkpoint_name(state: Dict[str, Any]) -> str:
    """ The folder name of the checkpoint of `state` (a train_state): inside an epoch with `state['partial']`. """
    partial = state.get('partial')
    return f'checkpoint-{state["epoch"]}' + (f'-step{partial["batches"]}' if partial else '')


def describe_checkpoint(path: Path) -> str:
    """ e.g. 'checkpoint-2 (epoch 2)' or 'checkpoint-2-step150 (epoch 3 at batch 150)'. """
    epochs, batches = checkpoint_position(path)
    return f'{path.name} ({f"epoch {epochs + 1} at batch {batches}" if batches else f"epoch {epochs}"})'


def complete_checkpoints(run_dir: Path) -> List[Path]:
    """ The run's checkpoint folders, oldest first (each appeared whole, by a rename). """
    found = [p for p in run_dir.glob('checkpoint-*') if checkpoint_position(p) is not None and not p.is_symlink()
             and (p / MANIFEST).is_file()]
    return sorted(found, key=checkpoint_position)


def saved_processes(checkpoint: Path) -> int:
    """ The number of processes that wrote `checkpoint` (each saves its random number state). """
    from accelerate.utils import RNG_STATE_NAME
    return len(list(checkpoint.glob(f'{RNG_STATE_NAME}_*.pkl')))


def find_resume_checkpoint(resume: str) -> Tuple[Path, Optional[Path]]:
    """ (run folder, checkpoint to continue from) for `--resume`: a run folder or its `last` link means its newest
    checkpoint (None if it has none yet, or if the folder is empty: the run starts from epoch 1); `best` or
    `checkpoint-N` means that one, which must be the newest (continuing an older one would overwrite the later). """
    path = Path(resume)
    run_dir = path if path.is_dir() and not path.is_symlink() and checkpoint_position(path) is None else path.parent
    if not run_dir.is_dir():
        raise CheckpointError(f'--resume {resume}: {run_dir} does not exist; pass a run folder or one of its '
                              f'checkpoint folders.')
    done = complete_checkpoints(run_dir)
    odd = [p.name for p in run_dir.glob('checkpoint-*') if checkpoint_position(p) is not None and p not in done]
    if odd:  # never made by a save (each appears whole, by a rename): a copy, or an older version's
        raise CheckpointError(f'{run_dir / odd[0]} has no {MANIFEST}, so it cannot be verified: move it out of the run '
                              f'folder (a checkpoint of an earlier timm-dirac: resume it with that version).')
    if run_dir == path or path.name == 'last':
        ours = not any(p for p in run_dir.iterdir() if not p.name.startswith('.'))  # empty: a kill at its creation
        if not done and not ours and not (run_dir / 'args.yaml').is_file():
            raise CheckpointError(f'--resume {resume}: {run_dir} is not a run folder (no args.yaml, no checkpoint-N '
                                  f'folder with {MANIFEST}); pass <output>/<run> or <run>/last.')
        return run_dir, (done[-1] if done else None)
    chosen = path.resolve()
    if checkpoint_position(chosen) is None or not (chosen / MANIFEST).is_file():
        raise CheckpointError(f'--resume {resume} is not a complete checkpoint folder (checkpoint-N with {MANIFEST}); '
                              f'pass its run folder to continue from the newest checkpoint.')
    if done and checkpoint_position(chosen) < checkpoint_position(done[-1]):
        raise CheckpointError(f'{run_dir} has checkpoints after {chosen.name} (up to {done[-1].name}), which '
                              f'continuing it would overwrite: --resume {run_dir} continues from {done[-1].name}; '
                              f'to branch off {chosen.name}, copy it into a new folder and resume that copy.')
    return run_dir, chosen


def verify_checkpoint(checkpoint: Path) -> None:
    """ Refuse a checkpoint whose files are not exactly those its SHA-256 list recorded, byte for byte. """
    # why our own: accelerate's load_state reads whatever files are there; a damaged one would resume another run
    fix = (f'{checkpoint.name} is damaged: restore it from a copy, or move it out of the run folder (--resume then '
           f'continues from the newest checkpoint left, a finished run exports from its newest)')
    try:
        listed = {name: digest for digest, _, name in
                  (line.partition('  ') for line in (checkpoint / MANIFEST).read_text().splitlines())}
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f'cannot read {checkpoint / MANIFEST} ({type(e).__name__}): {fix}.') from e
    present = {p.name for p in checkpoint.iterdir() if p.name != MANIFEST}
    for name in sorted(present | set(listed)):
        path = checkpoint / name
        if name not in listed:
            what = f'not in {MANIFEST}'
        elif name not in present:
            what = 'missing'
        elif not path.is_file() or file_sha256(path) != listed[name]:
            what = 'not the file this checkpoint saved (changed or corrupt)'
        else:
            continue
        raise CheckpointError(f'{path} is {what}: {fix}.')


def _write_error(run_dir: Path, name: str, error: Exception) -> CheckpointError:
    free = shutil.disk_usage(run_dir).free
    last = complete_checkpoints(run_dir)
    needed = sum(f.stat().st_size for f in last[-1].iterdir()) if last else 0
    full = getattr(error, 'errno', None) == errno.ENOSPC or free < max(needed, 1 << 20)
    cause = 'no space left on the device' if full else f'{type(error).__name__}: {str(error).strip().splitlines()[-1]}'
    then = f'the run is intact up to {last[-1].name}: free space, then --resume {run_dir}' if last else \
        'free space, then run the command again'
    return CheckpointError(f'cannot write {name} in {run_dir} ({cause}; {free / 2**20:.0f} MiB free, a checkpoint '
                           f'takes about {needed / 2**20:.0f} MiB); {then}.')


def save_checkpoint(accelerator, run_dir: Path, state: Dict[str, Any]) -> None:
    """ Write `checkpoint-<epoch>` (`-step<batches>` inside an epoch: `checkpoint_name`; accelerate's state,
    train_state.pt, the SHA-256 list) into a temp folder, rename it into place, then `publish` the run folder from
    it. A failed write names the cause and leaves the last checkpoint as it was. """
    name = checkpoint_name(state)
    tmp = run_dir / f'.{name}.tmp'
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash during an earlier save
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # why our own: accelerate's save_custom_state is read back by load_custom_state with weights_only=False
            torch.save(state, tmp / 'train_state.pt')
            sums = ''.join(f'{file_sha256(p)}  {p.name}\n' for p in sorted(tmp.iterdir()) if p.is_file())
            (tmp / MANIFEST).write_text(sums, encoding='utf-8')
            os.replace(tmp, run_dir / name)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as "unexpected pos ..."
        raise _write_error(run_dir, name, e) from e
    if accelerator.is_main_process:
        publish(run_dir, state)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, checkpoint: Path) -> Dict[str, Any]:
    """ Restore model, optimizer, scaler and RNG states from a verified `checkpoint`; returns its train_state. The
    RNG state is compared with the one restored (accelerate skips an unreadable one silently), except on a process
    that the run did not have (a resume on more processes: it keeps its own seed). """
    from accelerate.utils import RNG_STATE_NAME, load as accelerate_load

    verify_checkpoint(checkpoint)
    try:  # tensors and plain containers only, never arbitrary unpickling
        state = torch.load(checkpoint / 'train_state.pt', map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'cannot read {checkpoint / "train_state.pt"} ({first_sentence(e)}): {checkpoint.name} '
                              f'is damaged: restore it from a copy, or move it out of the run folder to resume from '
                              f'the one before.') from e
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:
        raise CheckpointError(f'cannot restore {checkpoint} ({first_sentence(e)}): a checkpoint of another model or '
                              f'other flags? Resume with the flags of that run.') from e
    rng_file = checkpoint / f'{RNG_STATE_NAME}_{accelerator.process_index}.pkl'
    if not rng_file.exists() and accelerator.process_index >= saved_processes(checkpoint):
        return state
    try:  # accelerate skips an RNG file it cannot read, silently
        restored = torch.equal(accelerate_load(rng_file)['torch_manual_seed'], torch.get_rng_state())
    except Exception:
        restored = False
    if not restored:
        raise CheckpointError(f'cannot restore the random number state from {rng_file} (listed in {MANIFEST}, so '
                              f'it was written so): the resumed run would not continue the interrupted one exactly; '
                              f'{checkpoint.name} is damaged: restore it from a copy, or move it out of the run folder '
                              f'to resume from the one before.')
    return state


def publish(run_dir: Path, state: Dict[str, Any]) -> None:
    """ Point `last` at the checkpoint of `state` and `best` at its best epoch, remove checkpoints that are neither
    (but for a checkpoint inside an epoch, the newest epoch's is kept too) and temp leftovers of a killed save, write
    summary.csv. Idempotent: every step can be redone after a kill. """
    name = checkpoint_name(state)
    _link_atomic(run_dir, 'last', name)
    best = state['best']
    if best:
        _link_atomic(run_dir, 'best', f'checkpoint-{best[0][1]}')
    keep = {name} | {f'checkpoint-{epoch}' for _, epoch in best}
    if state.get('partial'):
        keep.add(f'checkpoint-{state["epoch"]}')
    for old in run_dir.glob('checkpoint-*'):
        if old.name not in keep and checkpoint_position(old) is not None and not old.is_symlink():
            doomed = run_dir / f'.{old.name}.del'  # renamed first, so a half-deleted folder is never a checkpoint
            os.replace(old, doomed)
            shutil.rmtree(doomed)
    for leftover in run_dir.glob('.checkpoint-*'):
        shutil.rmtree(leftover, ignore_errors=True)
    if state['summary']:
        write_atomic(run_dir / 'summary.csv', to_csv(state['summary']))


def rank_best(best: List[Tuple[float, int]], metric: float, epoch: int, keep: int, lower_is_better: bool
              ) -> List[Tuple[float, int]]:
    """ The `keep` best (metric, epoch) pairs with this epoch's added; ties go to the earlier epoch. """
    # why our own: timm's CheckpointSaver ranks single torch.save files written in place, not accelerate's folders
    best = best + [(metric, epoch)]
    best.sort(key=lambda x: (x[0] if lower_is_better else -x[0], x[1]))
    return best[:keep]
