""" The files shipped in timm_dirac/assets (the CIFAR-10 sample, our trained weights) are found where the package
is, and an installed wheel carries them: pretrained=True and the default images work outside a clone, offline. """
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm

import timm_dirac
from timm_dirac.assets import asset_path
from timm_dirac.loading import default_data

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(timm_dirac.__file__).parent / 'assets'
SHIPPED = [
    'cifar10_sample/README.md',
    'cifar10_sample/data/train-00000-of-00001.parquet',
    'cifar10_sample/data/test-00000-of-00001.parquet',
    'weights/diracnet16_4_cifar.td_cifar10/README.md',
    'weights/diracnet16_4_cifar.td_cifar10/config.json',
    'weights/diracnet16_4_cifar.td_cifar10/model.safetensors',
]

# run outside any clone with only the installed wheel on PYTHONPATH: where everything resolves, then a validation
PROBE = """
import json, sys
import timm, timm_dirac
from timm_dirac.cli import main
from timm_dirac.loading import default_data
model = timm.create_model('diracnet16_4_cifar', pretrained=True)
print(json.dumps(dict(package=timm_dirac.__file__, data=default_data(), weights=model.pretrained_cfg['file'])))
sys.exit(main(['validate', '--model', 'diracnet16_4_cifar', '--pretrained', '--dataset', default_data(),
               '--split', 'test[:100]', '--workers', '0', '--no-progress', '--json', '-']))
"""


def test_shipped_files_resolve_inside_the_package():
    assert all(asset_path(relative).is_file() for relative in SHIPPED)
    assert asset_path('cifar10_sample') == ASSETS / 'cifar10_sample'
    assert default_data() == f"hfds/{ASSETS / 'cifar10_sample'}"
    cfg = timm.models.get_pretrained_cfg('diracnet16_4_cifar.td_cifar10')
    assert cfg.file == str(ASSETS / 'weights' / 'diracnet16_4_cifar.td_cifar10' / 'model.safetensors')


@pytest.mark.slow
def test_an_installed_wheel_loads_the_weights_and_the_sample_outside_a_clone(tmp_path):
    pytest.importorskip('setuptools', reason='the wheel is built offline with this environment\'s setuptools')
    source = tmp_path / 'source'  # what the build reads, without build/ or *.egg-info left over in the clone
    for folder in ('timm_dirac', 'train_configs'):  # train_configs/ ships as timm_dirac/train_configs/
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    subprocess.run(pip + ['wheel', '--no-deps', '--no-build-isolation', '--no-index', '-w', str(tmp_path / 'dist'),
                          str(source)], check=True, capture_output=True)
    wheel, = (tmp_path / 'dist').glob('timm_dirac-*.whl')
    in_wheel = {info.filename: info.file_size for info in zipfile.ZipFile(wheel).infolist()}
    for relative in SHIPPED:
        assert in_wheel.get(f'timm_dirac/assets/{relative}') == asset_path(relative).stat().st_size, relative

    site = tmp_path / 'site'
    subprocess.run(pip + ['install', '--no-deps', '--no-index', '--target', str(site), str(wheel)], check=True,
                   capture_output=True)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', PROBE], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    found, results = (json.loads(line) for line in proc.stdout.splitlines()[-2:])
    installed = site / 'timm_dirac'
    assert found == dict(package=str(installed / '__init__.py'), data=f"hfds/{installed / 'assets' / 'cifar10_sample'}",
                         weights=str(installed / 'assets' / 'weights' / 'diracnet16_4_cifar.td_cifar10' /
                                     'model.safetensors'))
    assert results['samples'] == 100 and results['top1'] > 85, results
