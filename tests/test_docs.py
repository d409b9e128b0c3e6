""" The documentation: a README a timm user reads first (short, the set-up commands CI runs, the CPU hint before
them), and no relative link anywhere in the docs that leads nowhere. """
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
DOCS = [README, ROOT / 'CONTRIBUTING.md', *sorted((ROOT / 'docs').rglob('*.md'))]
SETUP = ('pip install -e ".[train]" && python train.py --config train_configs/quick_cifar10.yaml',
         'pip install -e ".[test]" && python -m pytest')


def test_readme_is_short_and_keeps_the_setup_commands():
    text = README.read_text()
    assert len(README.read_bytes()) <= 12_000
    positions = [text.index(command) for command in SETUP]  # .ci/run runs the second one
    cpu_hint = text.index('--index-url https://download.pytorch.org/whl/cpu')
    assert cpu_hint < min(positions)  # read top-down, the CPU build comes first
    assert 'torchvision::nms' in text[:cpu_hint + 200]  # and why torch and torchvision come from one index


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
