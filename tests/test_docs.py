""" The documentation: a README a timm user reads first (short, the set-up commands CI runs, the CPU hint before
them), no relative link anywhere in the docs that leads nowhere, and no measured number typed by hand.

Every measured number in README.md and docs/ carries, right after it, an HTML comment (invisible when rendered)
naming its source and the value's place in it:

    89.96%<!-- docs/reports/quantize-x.json: flows/chain/int8_top1 -->
    1.22x<!-- docs/reports/benchmark.json: rows/model=diracnet18,form=folded,precision=fp32,batch_size=32/vs_resnet -->
    4.8<!-- docs/reports/d.json: {runs/network=resnet,depth=28/test_top1} - {runs/network=dirac,depth=28/test_top1} -->

The source is a report in docs/reports/ (a JSON, which records its command, CPU and versions, or a run's CSV
beside it, read as a list of rows) or, for another project's numbers, a Python object that names their source
(`timm_dirac.hub.card.REPORTED_RESULTS`). A path's steps are separated by `/`: a key, a list index, `key=value,...`
(the one list item with those values; a value may be a shell-style pattern, `diracnet*`), or `*` (every item) and
`[key=value,...]` (every matching item), which give a list. An expression puts its paths in braces (`{<source>:
path}` for a path of another source) and may use + - * / and min, max, median, mean, sum, len, abs and sub (two
lists, item by item). The number must equal the value formatted with the number's own decimals (or exponent).
"""
import csv
import fnmatch
import importlib
import io
import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
DOCS = [README, ROOT / 'CONTRIBUTING.md', *sorted((ROOT / 'docs').rglob('*.md'))]
REPORTS = ROOT / 'docs' / 'reports'
SETUP = ('pip install -e ".[train]" && python train.py --config train_configs/quick_cifar10.yaml',
         'pip install -e ".[test]" && python -m pytest')
# reports the docs cite before they exist: the main job's, re-measured and added by hand (checked once it is there)
PENDING_REPORTS = ('docs/reports/main_job-',)

NUMBER = r'(?:(?<=[\s(|])-)?(?<![\w.])\d[\d,]*(?:\.\d+)?(?:e-?\d+)?'  # a minus sign only where no range dash
ANNOTATED = re.compile(rf'({NUMBER})(%|x)?<!--\s*(.*?)\s*-->', re.S)
FUNCTIONS = dict(min=min, max=max, median=statistics.median, mean=statistics.mean, abs=abs, len=len, sum=sum,
                 sub=lambda a, b: [x - y for x, y in zip(a, b, strict=True)])  # sub: item by item


def test_readme_is_short_and_keeps_the_setup_commands():
    text = README.read_text()
    assert len(README.read_bytes()) <= 12_000
    positions = [text.index(command) for command in SETUP]  # .ci/run runs the second one
    cpu_hint = text.index('--index-url https://download.pytorch.org/whl/cpu')
    assert cpu_hint < min(positions)  # read top-down, the CPU build comes first
    assert 'torchvision::nms' in text[:cpu_hint + 200]  # and why torch and torchvision come from one index


def test_readme_says_how_to_recover_torch_and_torchvision_from_two_sources_and_what_to_do_on_a_busy_machine():
    text = README.read_text()
    cpu_hint = text.index('--index-url https://download.pytorch.org/whl/cpu')
    fallback = text[cpu_hint:cpu_hint + 800]
    assert 'cannot be reached' in fallback and re.search(r'pip install [^`]*torch torchvision', fallback)
    assert 'torchvision::nms' in fallback, 'the same command repairs the mixed pair, named by its error'
    main_job = text.index(SETUP[0])
    assert 'OMP_NUM_THREADS=1' in text[main_job:main_job + 1500], 'the busy-machine advice sits by the main job'


def _anchors(path: Path) -> set:
    """ GitHub's anchors of the headings of a Markdown file. """
    headings = re.findall(r'^#+ (.*)$', re.sub(r'```.*?```', '', path.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-') for h in headings}


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = re.sub(r'```.*?```', '', doc.read_text(), flags=re.S)
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'[a-z]+:', target):
            continue  # an address outside the repository
        path, _, anchor = target.partition('#')
        resolved = (doc.parent / path).resolve() if path else doc
        assert resolved.exists(), f'{doc.name}: {target}'
        if anchor and resolved.suffix == '.md':
            assert anchor in _anchors(resolved), f'{doc.name}: {target}'


# ------------------------------------------------------------------------------------------- measured numbers
def _source(name: str):
    """ A report's JSON, or its CSV as a list of rows of numbers (None while a pending report is missing), or a
    Python object named by its dotted path. """
    if name.endswith(('.json', '.csv')):
        path = ROOT / name
        if not path.is_file() and name.startswith(PENDING_REPORTS):
            return None
        assert path.is_file() and path.parent == REPORTS, f'{name}: not a report in docs/reports/'
        if name.endswith('.csv'):
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(path.read_text()))]
        return json.loads(path.read_text())
    module, _, attribute = name.rpartition('.')
    return getattr(importlib.import_module(module), attribute)


def _matching(items, selector: str) -> list:
    """ The items whose values match every `key=pattern` of `selector` (shell-style patterns: `diracnet*`). """
    wanted = dict(pair.split('=', 1) for pair in selector.split(','))
    return [item for item in items if all(fnmatch.fnmatchcase(str(item.get(k)), v) for k, v in wanted.items())]


def _step(value, step: str, path: str):
    if step == '*':
        return list(value.values()) if isinstance(value, dict) else list(value)
    if isinstance(value, dict):
        assert step in value, f'{path}: no key {step!r} (keys: {", ".join(map(str, value))})'
        return value[step]
    if re.fullmatch(r'-?\d+', step):
        return value[int(step)]
    found = _matching(value, step)
    assert len(found) == 1, f'{path}: {len(found)} items match {step!r}'
    return found[0]


def _lookup(data, path: str):
    """ The value at `path`. A `*` step (every item) or a `[key=value,...]` step (every item with those values)
    maps the rest of the path over the items and gives the list of results, items without a value dropped. """
    value = data
    steps = path.strip().split('/')
    for i, step in enumerate(steps):
        if step == '*' or step.startswith('['):
            items = _step(value, '*', path)
            items = items if step == '*' else _matching(items, step.strip('[]'))
            assert items, f'{path}: no item matches {step!r}'
            rest = '/'.join(steps[i + 1:])
            found = [_lookup(item, rest) if rest else item for item in items]
            return [v for f in found for v in (f if isinstance(f, list) else [f]) if v is not None]  # flat
        value = _step(value, step, path)
    return value


def _evaluate(data, expression: str) -> float:
    """ A path, or an arithmetic expression over the FUNCTIONS and `{path}`s of `data` or `{<source>: path}`s of
    another source. """
    if '{' not in expression:
        return _lookup(data, expression)
    values = {}

    def name(match):
        source, sep, path = match.group(1).rpartition(': ')
        values[f'_v{len(values)}'] = _lookup(_source(source.strip()) if sep else data, path)
        return f'_v{len(values) - 1}'
    code = re.sub(r'\{([^}]*)\}', name, expression)
    assert re.fullmatch(r'[\w\s+\-*/().,]*', code), f'not an arithmetic expression: {expression}'
    return eval(code, {'__builtins__': {}}, {**FUNCTIONS, **values})  # noqa: S307 (arithmetic on report values)


def _annotations(text: str):
    """ (number as written, source, expression, line) of every annotated number outside code blocks. """
    prose = re.sub(r'```.*?```', lambda m: '\n' * m.group(0).count('\n'), text, flags=re.S)
    prose = re.sub(r'`[^`\n]*`', '``', prose)  # inline code: commands and names, never a cited number
    for match in ANNOTATED.finditer(prose):
        source, sep, expression = match.group(3).partition(': ')
        assert sep, f'annotation without "<source>: <path>": {match.group(0)}'
        yield match.group(1), source.strip(), expression, prose.count('\n', 0, match.start()) + 1


def _check(number: str, source: str, expression: str) -> str:
    """ '' where `number` is what the source holds, else what is wrong. """
    data = _source(source)
    if data is None:
        return ''
    value = _evaluate(data, expression)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f'{source}: {expression} is {value!r}, not a number'
    mantissa, e, _ = number.replace(',', '').partition('e')
    decimals = len(mantissa.partition('.')[2])
    shown = format(value, f'{"," if "," in number else ""}.{decimals}{"e" if e else "f"}')
    return '' if shown == number else f'{number} but {source}: {expression} is {value!r} ({shown})'


ANNOTATED_DOCS = [README, *sorted((ROOT / 'docs').rglob('*.md'))]


@pytest.mark.parametrize('doc', ANNOTATED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_annotated_number_is_what_its_report_records(doc):
    wrong = [f'{doc.name}:{line}: {problem}' for number, source, expression, line in _annotations(doc.read_text())
             if (problem := _check(number, source, expression))]
    assert wrong == []


def test_readme_shows_no_measured_figure_without_its_source():
    """ A percentage, an `x` ratio, and any decimal in a table column of top-1 accuracy, anywhere in the README's
    prose or tables, is annotated: a new figure typed by hand fails here. """
    prose = re.sub(r'```.*?```', '', README.read_text(), flags=re.S)
    prose = re.sub(r'(?m)^    .*$', '', prose)  # indented code
    bare = []
    annotation = r'(?:%|x)?<!--.*?-->'
    for line in prose.splitlines():
        plain = re.sub(r'`[^`]*`', '', line)  # inline code: names and commands, not figures
        figures = re.finditer(rf'({NUMBER})(?!{annotation})(?=(?:[-\u2013]\d[\d.,]*(?:{annotation})?)?(?:%|x\b))',
                              plain)
        bare += [f'{m.group(1)} in: {line.strip()[:100]}' for m in figures]
    table = []
    for block in re.findall(r'(?m)((?:^\|.*\n)+)', prose):
        rows = block.strip('\n').splitlines()
        columns = [i for i, name in enumerate(rows[0].split('|')) if 'top-1' in name]
        for row in rows[2:]:
            cells = row.split('|')
            for i in (i for i in columns if i < len(cells)):
                unannotated = re.sub(r'<!--.*?-->', '', ANNOTATED.sub('', cells[i]))
                table += [f'{m.group(0)} in: {row.strip()[:100]}'
                          for m in re.finditer(r'(?<![\w.])\d+\.\d+', unannotated)]
    assert bare + table == []


def test_an_edited_figure_fails_the_check():
    """ The bar of the check itself: every accuracy figure of the README moved by 0.01 is caught. """
    found = [a for a in _annotations(README.read_text()) if '.' in a[0] and _source(a[1]) is not None]
    assert len(found) >= 5
    for number, source, expression, _ in found:
        decimals = len(number.partition('.')[2])
        edited = f'{float(number.replace(",", "")) + 10 ** -decimals:.{decimals}f}'
        assert _check(edited, source, expression), f'{number} -> {edited} passed: {source}: {expression}'


def test_every_report_records_its_command_cpu_and_versions():
    for path in sorted(REPORTS.glob('*.json')):
        report = json.loads(path.read_text())
        machine = report.get('machine') or {}
        cpu = report.get('cpu') or machine.get('cpu')
        versions = report.get('versions') or machine.get('versions') or {}
        assert report.get('command'), f'{path.name}: no command'
        assert cpu, f'{path.name}: no CPU (machine.cpu or cpu)'
        assert versions.get('torch'), f'{path.name}: no torch version (machine.versions or versions)'


def test_reports_name_only_paths_that_exist():
    """ A report's checkpoint and calibration data are where the repository keeps them; placeholders (`<...>`)
    and weights the report says how to get (its `weights` key) aside. """
    for path in sorted(REPORTS.glob('*.json')):
        report = json.loads(path.read_text())
        for run in [report, *report.get('runs', [])]:
            for key in ('checkpoint', 'calib_data'):
                value = run.get(key)
                if value and '<' not in value and not report.get('weights', '').startswith(f'{value}:'):
                    assert (ROOT / value.removeprefix('hfds/')).exists(), f'{path.name}: {key} {value} does not exist'


def test_the_shipped_card_is_what_the_card_writer_makes_of_the_reports():
    """ The shipped weights' card holds no typed number: benchmarks/shipped_card.py writes it from docs/reports/. """
    import importlib.util

    script = ROOT / 'benchmarks' / 'shipped_card.py'
    if not script.is_file():
        pytest.skip(f'{script} is not here (the benchmarks are in the source tree only)')
    spec = importlib.util.spec_from_file_location('shipped_card', script)
    shipped_card = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shipped_card)
    written = (shipped_card.FOLDER / 'README.md').read_text(encoding='utf-8')
    assert written == shipped_card.card(), 'edited by hand? regenerate it: python benchmarks/shipped_card.py'


def test_readme_model_table_is_what_the_models_count():
    """ The README's parameters and MACs are counted from the models (the card's own counter), to the digits shown. """
    import timm
    import timm_dirac  # noqa: F401
    from timm_dirac.hub.card import count_params_macs

    rows = re.findall(r'^\| `(\w+)` \| (\d+) \| ([\d.]+) / ([\d.]+) \| ([\d.]+) \|$', README.read_text(), flags=re.M)
    assert len(rows) >= 7
    for name, size, train, folded, gmacs in rows:
        model = timm.create_model(name, device='meta')
        counted = count_params_macs(model)
        shown = (train, folded, gmacs)
        assert shown == (f'{counted["train"][0]:.2f}', f'{counted["folded"][0]:.2f}',
                         f'{counted["folded"][1]:.{len(gmacs.partition(".")[2])}f}'), name
        assert int(size) == model.pretrained_cfg['input_size'][-1], name
