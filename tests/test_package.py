""" The package's shape: every module imports the others in one direction only (no import cycles, lazy imports
inside functions included), and the model module needs none of the command, file or Hub code. """
import ast
from pathlib import Path

import timm_dirac

PACKAGE = Path(timm_dirac.__file__).parent
MODEL_MODULES = ('layers', 'diracnet', 'diracify')  # what `import timm_dirac` needs to build and fold models
COMMAND_AND_IO = ('cli', 'convert', 'validate', 'export', 'quantize', 'benchmark', 'demo', 'hub', 'train', 'loading',
                  'checkpoint_io', 'data')


def _module_name(path: Path) -> str:
    """ `a.b` for a/b.py and for a/b/__init__.py; '' for the package's own __init__.py. """
    parts = path.relative_to(PACKAGE).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _is_module(name: str) -> bool:
    """ Whether `name` ('' for the package itself) is a module or a package of ours. """
    path = PACKAGE / name.replace('.', '/')
    if not name:
        return True
    return path.with_suffix('.py').is_file() or (path / '__init__.py').is_file()


def _imports(path: Path) -> set:
    """ Modules of this package that `path` imports, anywhere in the file (relative or absolute imports). """
    here = [part for part in _module_name(path).split('.') if part]
    package = here if path.name == '__init__.py' else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] + ([node.module] if node.module else [])
            elif node.module and node.module.startswith('timm_dirac'):
                base = node.module.split('.')[1:]
            else:
                continue
            names = ['.'.join(base)] if node.module or node.level == 0 else []
            names += ['.'.join(base + [alias.name]) for alias in node.names]  # `from . import x` imports module x
            found.update(n for n in names if _is_module(n))
        elif isinstance(node, ast.Import):
            found.update('.'.join(a.name.split('.')[1:]) for a in node.names if a.name.split('.')[0] == 'timm_dirac')
    found.discard(_module_name(path))
    return found


def _graph() -> dict:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob('*.py')}


def test_modules_import_each_other_in_one_direction():
    graph = _graph()
    state = {}

    def visit(module, trail):
        if state.get(module) == 'done':
            return
        assert state.get(module) != 'open', f'import cycle: {" -> ".join(trail + [module])}'
        state[module] = 'open'
        for dep in sorted(graph.get(module, ())):
            visit(dep, trail + [module])
        state[module] = 'done'

    for module in sorted(graph):
        visit(module, [])


def test_the_model_modules_need_no_command_file_or_hub_code():
    graph = _graph()
    reached, todo = set(), list(MODEL_MODULES)
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph.get(module, ()))
    assert not reached & set(COMMAND_AND_IO), sorted(reached & set(COMMAND_AND_IO))
