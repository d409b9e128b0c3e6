""" timm_dirac.train across machines: `accelerate launch` as two machines on this host (`--num_machines 2
--machine_rank 0/1 --main_process_ip 127.0.0.1`), two gloo ranks each on CPU, a tiny DiracNet on the shipped CIFAR-10
sample.

Four ranks end with the same weights and BatchNorm statistics; each epoch's training shards are disjoint and cover
the data once, its evaluation shards cover theirs (metrics count each sample once); rank 0 alone writes the run
folder (checkpoints, links, summary.csv, Hub folders) while every rank's RNG state goes into the checkpoint; and the
4-rank run resumed from its epoch-1 checkpoint sees the same samples and ends with the same weights and metrics as
the uninterrupted run.

Faults, on one machine with two ranks: SIGTERM to the launcher stops both ranks at the same step with a checkpoint
there, which a resume on one process continues at the same sample with the same global batch (and a one-process
run's on two); a rank killed, or stopped past --dist-timeout, is named by the other with the run to resume.
"""
import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Tuple

import yaml

import psutil
import pytest
import torch
from accelerate.utils import RNG_STATE_NAME

from timm_dirac.data import fixed_subset, load_split
from timm_dirac.train.data import holdout_indices

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / 'timm_dirac' / 'assets' / 'cifar10_sample'
PROBE = ROOT / 'tests' / 'rank_probe.py'
MACHINES, PER_MACHINE, BATCH, TRAIN, HOLDOUT, VAL, EPOCHS = 2, 2, 8, 128, 1000, 50, 2
WORLD = MACHINES * PER_MACHINE
TIMEOUT_S = 240  # a rank that waits forever for a peer fails the test instead of blocking CI

FLAGS = ['--model', 'diracnet34_1_cifar', '--model-kwargs', 'layers=(1,1,1)', '--dataset', f'hfds/{SAMPLE}',
         '--holdout', str(HOLDOUT), '--train-num-samples', str(TRAIN), '--val-num-samples', str(VAL), '-b', str(BATCH),
         '--opt', 'momentum', '--lr', '0.05', '--sched', 'step', '--decay-epochs', '1', '--decay-rate', '0.5',
         '--warmup-epochs', '0', '--workers', '0', '--log-interval', '1', '--epochs', str(EPOCHS)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _launch_two_machines(dump_dir: Path, tag: str, flags: list) -> list:
    """ One `accelerate launch` per machine rank, both on this host; returns their stdouts (machine 0 first). """
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    procs = []
    for machine_rank in range(MACHINES):
        cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_machines', str(MACHINES),
               '--num_processes', str(WORLD), '--machine_rank', str(machine_rank), '--main_process_ip', '127.0.0.1',
               '--main_process_port', str(port), '--mixed_precision', 'no', '--dynamo_backend', 'no',
               str(PROBE), str(dump_dir), tag, *flags]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      start_new_session=True))
    outputs = []
    try:
        for machine_rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
            assert proc.returncode == 0, f'machine {machine_rank} failed:\n{out[-4000:]}'
    finally:
        for proc in procs:
            if proc.poll() is None:  # the whole launcher session: the launcher, torchrun and its ranks
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return outputs


def _dumps(dump_dir: Path, tag: str) -> list:
    return [torch.load(dump_dir / f'rank{r}-{tag}.pt', weights_only=True) for r in range(WORLD)]


def _summary(run_dir: Path) -> list:
    with open(run_dir / 'summary.csv') as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _per_epoch(seen: list, split: str, epochs: int) -> list:
    """ A rank's sample indices of `split`, cut into its `epochs` equal passes (workers=0: loaded in order). """
    indices = [i for s, i in seen if s == split]
    assert len(indices) % epochs == 0, (split, len(indices))
    n = len(indices) // epochs
    return [indices[e * n:(e + 1) * n] for e in range(epochs)]


def _assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f'{what}: {k}'


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT_S + 60)
def test_two_machines_four_ranks_train_and_resume(tmp_path):
    dump = tmp_path / 'dump'
    dump.mkdir()
    out = tmp_path / 'out'
    log0, log1 = _launch_two_machines(dump, 'straight', FLAGS + ['--output', str(out), '--experiment', 'straight'])
    ranks = _dumps(dump, 'straight')

    # four gloo ranks, two per machine
    assert [(d['rank'], d['world'], d['node'], d['backend']) for d in ranks] == [
        (r, WORLD, r // PER_MACHINE, 'gloo') for r in range(WORLD)]
    assert f'{WORLD} process(es) on cpu' in log0 and f'global batch {BATCH} x {WORLD} x 1 = {BATCH * WORLD}' in log0

    # the same weights and BatchNorm statistics everywhere (ranks saw other batches: the stats were averaged)
    for d in ranks[1:]:
        _assert_same_weights(ranks[0]['weights'], d['weights'], f'rank {d["rank"]} vs rank 0')
    running_var = [v for k, v in ranks[0]['weights'].items() if k.endswith('running_var')]
    assert running_var and not all(torch.equal(v, torch.ones_like(v)) for v in running_var)  # BN stats did move

    # every epoch: disjoint training shards that together cover their set once, evaluation shards that cover theirs
    # (indices in the train split: the validation images are held out of it)
    kept, held = holdout_indices(len(load_split(f'hfds/{SAMPLE}', None, 'train')[0]), HOLDOUT)
    train_set, val_set = list(fixed_subset(kept, TRAIN, 'train')), list(fixed_subset(held, VAL, 'holdout'))
    assert not set(train_set) & set(val_set)
    train_shards = [_per_epoch(d['seen'], 'train', EPOCHS) for d in ranks]
    val_shards = [_per_epoch(d['seen'], 'eval', EPOCHS + 1) for d in ranks]  # and the final fp32 score
    for epoch in range(EPOCHS):
        train_epoch = [shards[epoch] for shards in train_shards]
        assert [len(s) for s in train_epoch] == [TRAIN // WORLD] * WORLD
        assert sorted(i for s in train_epoch for i in s) == sorted(train_set)
        val_epoch = [shards[epoch] for shards in val_shards]  # accelerate pads the last batches; the metrics drop them
        assert sorted(set(i for s in val_epoch for i in s)) == sorted(val_set)
    assert [s[EPOCHS] for s in val_shards] == [s[0] for s in val_shards]  # the score reads the validation images
    assert train_shards[0][0] != train_shards[0][1]  # reshuffled each epoch
    assert log0.count(f'val ({VAL} images)') == EPOCHS

    # one writer: only rank 0 moves files into the run folder (each machine's first rank prints the global metrics)
    run = out / 'straight'
    for d in ranks[1:]:
        assert not [p for p in d['replaced'] if p.startswith(str(out))], d['rank']
    written = {Path(p).name for p in ranks[0]['replaced']}
    assert {'straight', 'summary.csv', 'last', 'checkpoint-1', 'checkpoint-2'} <= written  # the run folder, whole
    val_lines = [re.findall(r'val \(\d+ images\) loss \S+ top1 \S+ top5 \S+', log) for log in (log0, log1)]
    assert len(val_lines[0]) == EPOCHS and val_lines[0] == val_lines[1]
    assert [r['epoch'] for r in _summary(run)] == list(range(1, EPOCHS + 1))
    assert sorted(p.name for p in run.iterdir()) == [
        'args.yaml', 'best', 'checkpoint-1', 'checkpoint-2', 'hub-folded', 'hub-train', 'last', 'summary.csv']
    for epoch in range(1, EPOCHS + 1):  # each rank's RNG state, as accelerate names its file
        rng = sorted(p.name for p in (run / f'checkpoint-{epoch}').glob(f'{RNG_STATE_NAME}_*.pkl'))
        assert rng == sorted(f'{RNG_STATE_NAME}_{r}.pkl' for r in range(WORLD))
    state = torch.load(run / 'last' / 'train_state.pt', weights_only=True)
    assert state['num_updates'] == EPOCHS * TRAIN // (BATCH * WORLD)

    # resume the 4-rank run from its epoch-1 checkpoint (copied to a new run folder): epoch 2 as before
    shutil.copytree(run / 'checkpoint-1', out / 'resumed' / 'checkpoint-1')
    _launch_two_machines(dump, 'resumed', FLAGS + ['--resume', str(out / 'resumed' / 'checkpoint-1')])
    # (to float rounding: DDP regroups its gradient buckets after a process's first step, so the first step after
    # the resume sums the four ranks' gradients in another order; without the regrouping it matched bit for bit)
    resumed = _dumps(dump, 'resumed')
    for before, after in zip(ranks, resumed):
        assert _per_epoch(after['seen'], 'train', 1)[0] == train_shards[before['rank']][1]
        _assert_same_weights(resumed[0]['weights'], after['weights'], f'resumed rank {after["rank"]} vs rank 0')
        for k, v in before['weights'].items():
            torch.testing.assert_close(after['weights'][k], v, rtol=0, atol=1e-6, msg=k)
    straight_rows, resumed_rows = _summary(run), _summary(out / 'resumed')
    assert [r['epoch'] for r in resumed_rows] == [1, 2] and not list((out / 'resumed').glob('.*'))  # no leftovers
    assert len(list((out / 'resumed' / 'checkpoint-2').glob(f'{RNG_STATE_NAME}_*.pkl'))) == WORLD
    for a, b in zip(straight_rows, resumed_rows):
        assert [a[m] for m in ('lr', 'train_top1', 'val_top1', 'val_top5')] == [
            b[m] for m in ('lr', 'train_top1', 'val_top1', 'val_top5')]
        assert (a['train_loss'], a['val_loss']) == pytest.approx((b['train_loss'], b['val_loss']), rel=1e-6)


# ------------------------------------------------------------------------------------------- faults
def _launch(dump_dir: Path, tag: str, flags: list, processes: int = 2, fault: str = '', until: str = ''
            ) -> Tuple[int, str]:
    """ `rank_probe.py` on `processes` processes of this machine (`accelerate launch --multi_gpu`; plain `python` for
    one), `fault` as its PROBE_FAULT; returns (exit code, output). With `until`, the launcher's whole session is
    killed 2 s after that text appears (a rank it cannot end itself stays stopped for its 30 s). """
    env = dict(os.environ, OMP_NUM_THREADS='1', PROBE_FAULT=fault,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', str(processes),
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port',
              str(_free_port())] if processes > 1 else [sys.executable]
    proc = subprocess.Popen(launch + [str(PROBE), str(dump_dir), tag, *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines, seen_at = [], [None]

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if until and until in line and seen_at[0] is None:
                seen_at[0] = time.monotonic()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if seen_at[0] is not None and time.monotonic() > seen_at[0] + 2:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:  # its ranks too: torchrun starts each in a session of its own
            for process in psutil.Process(proc.pid).children(recursive=True):
                process.kill()
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(10)
    return proc.returncode, ''.join(lines)


def _trained(dump_dir: Path, tag: str, rank: int) -> list:
    return [i for s, i in torch.load(dump_dir / f'rank{rank}-{tag}.pt', weights_only=True)['seen'] if s == 'train']


@pytest.mark.slow
@pytest.mark.timeout(3 * TIMEOUT_S)
def test_sigterm_to_the_launcher_stops_every_rank_and_one_process_resumes_at_the_same_sample(tmp_path):
    """ SIGTERM to `accelerate launch` of 2 ranks (batch 8 each) in epoch 1: both stop at the same step with a
    checkpoint there, exit 143 with the resume line and no traceback; resumed on 1 process the global batch of 16
    stays (batch 8 x 2 accumulation, said and recorded), and epoch 1 trains on each of its samples once. """
    out = tmp_path / 'out'
    flags = FLAGS + ['--output', str(out), '--experiment', 'run']
    code, log = _launch(tmp_path, 'stopped', flags, fault='0:9:sigterm-launcher')  # in step 1
    run = out / 'run'
    assert code == 143 and 'Traceback' not in log, log[-3000:]
    (line,) = [l for l in log.splitlines() if l.startswith('timm-dirac-train: stopped by SIGTERM')]
    (stopped,) = list(run.glob('checkpoint-0-step*'))
    assert f'keeps {stopped.name}' in line and f'--resume {run}' in line
    steps = int(stopped.name.rsplit('step', 1)[1])
    assert 0 < steps < TRAIN // (BATCH * 2)

    code, log = _launch(tmp_path, 'resumed', flags[:-2] + ['--resume', str(run)], processes=1)
    assert code == 0, log[-3000:]
    said = [l for l in log.splitlines() if l.startswith('resume: 1 process(es) instead of 2')]
    assert len(said) == 1 and f'the global batch stays {BATCH * 2} (-b {BATCH} x 1 x 2 accumulation' in said[0]
    assert yaml.safe_load((run / 'args.yaml').read_text())['grad_accum_steps'] == 2
    first = [_trained(tmp_path, 'stopped', r)[:steps * BATCH] for r in (0, 1)]  # (each read one batch ahead)
    rest = _trained(tmp_path, 'resumed', 0)[:TRAIN - 2 * steps * BATCH]
    kept, _ = holdout_indices(len(load_split(f'hfds/{SAMPLE}', None, 'train')[0]), HOLDOUT)
    assert sorted(first[0] + first[1] + rest) == sorted(fixed_subset(kept, TRAIN, 'train'))
    state = torch.load(run / 'last' / 'train_state.pt', weights_only=True)
    assert state['epoch'] == EPOCHS and state['num_updates'] == EPOCHS * TRAIN // (BATCH * 2)


@pytest.mark.slow
@pytest.mark.timeout(3 * TIMEOUT_S)
def test_a_one_process_run_resumes_on_two_processes_with_its_global_batch(tmp_path):
    """ Stopped by SIGTERM inside epoch 1 on one process (batch 16), resumed on two: batch 8 each, said once and
    recorded in args.yaml; the checkpoint is continued, never refused. """
    out = tmp_path / 'out'
    flags = FLAGS[:FLAGS.index('-b')] + ['-b', '16'] + FLAGS[FLAGS.index('-b') + 2:] + ['--output', str(out),
                                                                                          '--experiment', 'run']
    code, log = _launch(tmp_path, 'one', flags, processes=1, fault='0:20:sigterm')
    run = out / 'run'
    assert code == 143, log[-3000:]
    (stopped,) = list(run.glob('checkpoint-0-step*'))
    steps = int(stopped.name.rsplit('step', 1)[1])
    code, log = _launch(tmp_path, 'two', flags[:-2] + ['--resume', str(run)])
    assert code == 0, log[-3000:]
    said = [l for l in log.splitlines() if l.startswith('resume: 2 process(es) instead of 1')]
    assert len(said) == 1 and 'the global batch stays 16 (-b 8 x 2 x 1 accumulation, was -b 16 x 1 x 1)' in said[0]
    recorded = (run / 'args.yaml').read_text()
    assert yaml.safe_load(recorded)['batch_size'] == 8 and '2 process(es) instead of 1' in recorded
    first = _trained(tmp_path, 'one', 0)[:steps * 16]
    rest = [_trained(tmp_path, 'two', r)[:(TRAIN - steps * 16) // 2] for r in (0, 1)]
    kept, _ = holdout_indices(len(load_split(f'hfds/{SAMPLE}', None, 'train')[0]), HOLDOUT)
    assert sorted(first + rest[0] + rest[1]) == sorted(fixed_subset(kept, TRAIN, 'train'))


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT_S)
@pytest.mark.parametrize('fault', ['kill', 'stop'])
def test_a_rank_that_ends_or_hangs_is_named_with_the_run_to_resume(tmp_path, fault):
    """ Rank 1 SIGKILLed (rank 0's gloo says only `Connection reset by peer`) or SIGSTOPped (rank 0 waits until
    --dist-timeout) in epoch 2: rank 0 names rank 1 and the run to resume, in one line, and ends with code 2. """
    out = tmp_path / 'out'
    flags = FLAGS + ['--output', str(out), '--experiment', 'run', '--dist-timeout', '15']
    code, log = _launch(tmp_path, fault, flags, fault=f'1:{TRAIN // 2 + 20}:{fault}', until='timm-dirac-train: error')
    assert code != 0
    (line,) = [l for l in log.splitlines() if l.startswith('timm-dirac-train: error')]
    what = 'did not answer within --dist-timeout 15 s' if fault == 'stop' else 'stopped answering'
    assert f"rank 1 (on {socket.gethostname()}) of the run's 2 processes {what}" in line, log[-3000:]
    assert f'keeps checkpoint-1 (epoch 1): continue with --resume {out / "run"}' in line
    assert torch.load(tmp_path / f'rank0-{fault}.pt', weights_only=True)['code'] == 2
