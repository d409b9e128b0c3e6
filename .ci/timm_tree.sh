#!/usr/bin/env bash
# The model file inside timm's own source tree: timm_dirac/diracnet.py, copied unchanged into the sdist of the
# installed timm with `from .diracnet import *` added to timm/models/__init__.py, passes timm's tests/test_models.py
# for every diracnet* model, while timm_dirac itself cannot be imported.
# Usage: .ci/timm_tree.sh WORK_DIR [pytest args...]   (WORK_DIR: an empty folder for the sdist; run in the CI venv)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$1; shift
timm_version=$(python -c "import timm; print(timm.__version__)")
pip download -q --no-deps --no-binary :all: "timm==${timm_version}" -d "${work}"
tar -xzf "${work}/timm-${timm_version}.tar.gz" -C "${work}"
tree="${work}/timm-${timm_version}"
cp "${repo}/timm_dirac/diracnet.py" "${tree}/timm/models/diracnet.py"
echo 'from .diracnet import *' >> "${tree}/timm/models/__init__.py"
# its forward_intermediates tests select models by timm module name: add ours, and fail loudly if that breaks
sed -i "s/^FEAT_INTER_FILTERS = \[/FEAT_INTER_FILTERS = ['diracnet', /" "${tree}/tests/test_models.py"
grep -q "^FEAT_INTER_FILTERS = \['diracnet', " "${tree}/tests/test_models.py"
# timm_dirac made unimportable: a package of that name, first on the path, that refuses to load
mkdir -p "${work}/no_timm_dirac/timm_dirac"
echo 'raise ImportError("timm_dirac must not be needed by timm tree check")' > "${work}/no_timm_dirac/timm_dirac/__init__.py"
cd "${tree}"
unset GITHUB_ACTIONS  # timm's suite leaves the pretrained tests out under it
PYTHONPATH="${work}/no_timm_dirac:${tree}" python - <<'PY'
import timm, timm.models.diracnet
assert timm.__file__.startswith('.') or '/timm-' in timm.__file__, timm.__file__  # the sdist's timm, not the wheel's
try:
    import timm_dirac  # noqa: F401
    raise SystemExit('timm_dirac is importable: the check would not prove the model file stands alone')
except ImportError:
    pass
print(f'timm {timm.__version__} from {timm.__file__}: {len(timm.list_models("diracnet*"))} diracnet* models')
PY
PYTHONPATH="${work}/no_timm_dirac:${tree}" python -m pytest tests/test_models.py -k diracnet -p no:cacheprovider "$@"
