""" Run the README's main job and record it: its test scores, wall time, command, CPU and versions, as the report the
README's and docs' main-job numbers are checked against (tests/test_docs.py).

    python benchmarks/main_job.py            # -> docs/reports/main_job-<cpu>.json (e.g. main_job-amd-epyc.json)

The job runs as a user runs it (`python train.py --config train_configs/quick_cifar10.yaml`, one process, the
machine's default threads) in a fresh output folder; the wall time is the whole command, start-up and the final
fp32 scoring included. Run it on an otherwise idle machine: the time is only worth reporting there.
"""
import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timm_dirac.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ['python', 'train.py', '--config', 'train_configs/quick_cifar10.yaml']


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default=None, help='report path (default docs/reports/main_job-<cpu>.json)')
    args = parser.parse_args()
    machine = machine_info()
    out = Path(args.out or ROOT / 'docs' / 'reports' /
               f"main_job-{re.sub(r'[^a-z0-9]+', '-', machine['cpu'].lower()).strip('-')}.json")
    with tempfile.TemporaryDirectory() as output:
        start = time.perf_counter()
        subprocess.run([sys.executable, *COMMAND[1:], '--output', output], cwd=ROOT, check=True)
        minutes = (time.perf_counter() - start) / 60
        (test_csv,) = Path(output).glob('*/test.csv')
        row = next(csv.DictReader(test_csv.open()))
    load = os.getloadavg()[0]
    report = dict(
        command=' '.join(COMMAND), top1=round(float(row['top1']), 2), top5=round(float(row['top5']), 2),
        loss=round(float(row['loss']), 4), split=row['split'], images=int(float(row['count'])), best_epoch=int(row['epoch']),
        minutes=round(minutes, 1), load_average_after=round(load, 2), machine=machine)
    out.write_text(json.dumps(report, indent=2) + '\n')
    print(f'{out}: top-1 {report["top1"]:.2f}, top-5 {report["top5"]:.2f} in {report["minutes"]} min ({machine["cpu"]})')


if __name__ == '__main__':
    main()
