""" The package's shape: every module imports the others in one direction only (no import cycles, lazy imports
inside functions included); the model files import only the standard library, torch, timm and each other, as a
timm model file does; no module resolves hosts or opens sockets itself. """
import ast
import sys
from pathlib import Path

import timm_dirac

PACKAGE = Path(timm_dirac.__file__).parent
MODEL_FILES = ('layers', 'diracnet', 'state_dict')  # what timm would merge: the model, its layers, its checkpoints


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


def _top_level_imports(path: Path) -> set:
    """ (kind, name) of every import in `path`: ('package', module) for our modules, ('external', top-level name)
    for anything else. """
    found = {('package', m) for m in _imports(path)}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(('external', a.name.split('.')[0]) for a in node.names
                         if a.name.split('.')[0] != 'timm_dirac')
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module.split('.')[0] != 'timm_dirac':
            found.add(('external', node.module.split('.')[0]))
    return found


def test_the_model_files_import_only_the_standard_library_torch_timm_and_each_other():
    allowed = {('package', m) for m in MODEL_FILES} | {('external', m) for m in ('torch', 'timm')}
    for module in MODEL_FILES:
        imports = _top_level_imports(PACKAGE / f'{module}.py')
        extra = {(kind, name) for kind, name in imports - allowed if kind == 'package' or
                 name not in sys.stdlib_module_names}
        assert not extra, f'{module}.py imports {sorted(name for _, name in extra)}'


def test_the_model_and_diracify_reach_no_other_module_of_the_package():
    """ What `import timm_dirac` needs to build and fold models, followed through every import. """
    graph = _graph()
    reached, todo = set(), list(MODEL_FILES) + ['diracify']
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph.get(module, ()))
    assert reached == set(MODEL_FILES) | {'diracify'}, sorted(reached - set(MODEL_FILES))


def test_no_module_resolves_hosts_or_opens_sockets():
    """ Downloads are timm's, torch hub's and huggingface_hub's, which honour proxies and offline settings. """
    for path in PACKAGE.rglob('*.py'):
        assert ('external', 'socket') not in _top_level_imports(path), path
        assert 'getaddrinfo' not in path.read_text(), path
