""" The package's shape: the model file stands alone as a timm model file does, the rooms import in one direction,
the commands stand apart, timm's private modules are reached from two files only, `import timm_dirac` stays light,
and the shipped weights load with no network. """
import ast
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import timm_dirac
from timm_dirac.cli import COMMANDS

PACKAGE = Path(timm_dirac.__file__).parent


def _module_name(path: Path) -> str:
    """ `a.b` for a/b.py and for a/b/__init__.py; '' for the package's own __init__.py. """
    parts = path.relative_to(PACKAGE).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE / name.replace('.', '/')
    return not name or path.with_suffix('.py').is_file() or (path / '__init__.py').is_file()


def _imports(path: Path):
    """ (modules of this package, other modules) that `path` imports anywhere in the file, lazy imports included. """
    here = [part for part in _module_name(path).split('.') if part]
    package = here if path.name == '__init__.py' else here[:-1]
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] + ([node.module] if node.module else [])
            elif node.module.split('.')[0] == 'timm_dirac':
                base = node.module.split('.')[1:]
            else:
                others.add(node.module)
                others.update(f'{node.module}.{alias.name}' for alias in node.names)
                continue
            names = ['.'.join(base)] if node.module or node.level == 0 else []
            names += ['.'.join(base + [alias.name]) for alias in node.names]  # `from . import x` imports module x
            ours.update(n for n in names if _is_module(n))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split('.')[0] == 'timm_dirac':
                    ours.add('.'.join(alias.name.split('.')[1:]))
                else:
                    others.add(alias.name)
    ours.discard(_module_name(path))
    return ours, others


def _graph() -> dict:
    return {_module_name(p): _imports(p)[0] for p in PACKAGE.rglob('*.py')}


def _reached(graph: dict, start: str) -> set:
    reached, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph.get(module, ()))
    return reached - {start}


def test_modules_import_each_other_in_one_direction():
    graph = _graph()
    for module in graph:
        assert module not in _reached(graph, module), f'{module} imports itself through other modules'


def test_the_model_file_imports_only_the_standard_library_torch_and_timm():
    ours, others = _imports(PACKAGE / 'diracnet.py')
    assert not ours
    assert {name.split('.')[0] for name in others} - set(sys.stdlib_module_names) == {'torch', 'timm'}


def test_the_commands_never_import_one_another():
    graph = _graph()
    commands = {module.split('.', 1)[1] for module, _ in COMMANDS.values()}
    for command in commands:
        assert not _reached(graph, command) & (commands - {command}), command


def test_timms_private_modules_are_reached_from_two_files_only():
    """ The model file, as timm's own model files do, and one compat module: the one import to fix if timm moves. """
    users = set()
    for path in PACKAGE.rglob('*.py'):
        _, others = _imports(path)
        if any(name.split('.')[0] == 'timm' and any(p.startswith('_') for p in name.split('.')) for name in others):
            users.add(path.relative_to(PACKAGE).as_posix())
    assert users <= {'diracnet.py', '_timm_compat.py'}, users


def test_importing_the_package_loads_no_training_export_or_push_library():
    heavy = ('accelerate', 'datasets', 'webdataset', 'onnx', 'onnxruntime', 'matplotlib', 'torchao')
    code = f'import sys, timm_dirac; print(sorted(m for m in {heavy!r} if m in sys.modules))'
    loaded = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == '[]'


def test_the_model_file_alone_registers_and_folds_the_family(tmp_path):
    """ diracnet.py copied as a module of its own, with timm_dirac unimportable, builds, loads and folds a model
    (the full proof, timm's own test-suite over the file inside timm's source tree, is .ci/timm_tree.sh). """
    shutil.copy(PACKAGE / 'diracnet.py', tmp_path / 'diracnet_alone.py')
    code = (
        "import sys; sys.modules['timm_dirac'] = None\n"
        "import timm, torch, diracnet_alone\n"
        "m = timm.create_model('diracnet34_1_cifar', layers=(2, 2, 2)).eval()\n"
        "x = torch.randn(2, 3, 32, 32)\n"
        "y = m(x); m.reparameterize()\n"
        "assert torch.allclose(m(x), y, rtol=1e-4, atol=1e-4) and m.inference_mode\n"
        "print(len(timm.list_models('diracnet*')))\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 8


@pytest.fixture
def no_network(monkeypatch):
    """ Any attempt to resolve a host or open a connection fails the test. """
    def refuse(*args, **kwargs):
        raise AssertionError(f'network use: {args}')
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')


def test_the_shipped_weights_load_and_score_with_no_network(no_network, capsys):
    model = timm.create_model('diracnet16_4_cifar.td_cifar10', pretrained=True).eval()
    assert model.pretrained_cfg['label_names'][0] == 'airplane'
    from timm_dirac.cli import main
    assert main(['validate', '--model', 'diracnet16_4_cifar.td_cifar10', '--pretrained', '--dataset',
                 str(PACKAGE / 'assets' / 'cifar10_sample'), '--split', 'test[:64]', '--workers', '0',
                 '--no-progress']) == 0
    table = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.strip())
    assert float(table['top1']) > 60  # a trained CIFAR-10 model, far above chance (10%)
