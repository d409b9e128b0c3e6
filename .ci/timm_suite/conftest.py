""" Runs timm's own model test-suite (downloaded by .ci/run from timm's sdist) over the diracnet* models. """
import timm_dirac  # noqa: F401  registers the models before test_models.py is collected

TIMM_MARKERS = ('base', 'forward', 'backward', 'cfg', 'cfg_nonstd', 'torchscript', 'features', 'fxforward',
                'fxbackward')


def pytest_configure(config):
    for marker in TIMM_MARKERS:
        config.addinivalue_line('markers', f'{marker}: timm model test group')
