#!/usr/bin/env python3
""" Train DiracNets with accelerate: `python train.py --config train_configs/quick_cifar10.yaml`, or
`accelerate launch [--multi_gpu --num_processes N] train.py ...`. The logic lives in `timm_dirac.train`. """
import sys


def _two_indexes(error: RuntimeError) -> str:
    """ The one line for a torchvision built for another torch (`operator torchvision::nms does not exist` at its
    import: the pair came from two package indexes, e.g. torch from the CPU index and torchvision from PyPI). """
    from importlib.metadata import PackageNotFoundError, version
    try:
        pair = f'torch {version("torch")} and torchvision {version("torchvision")}'
    except PackageNotFoundError:
        pair = 'torch and torchvision'
    return (f'timm-dirac-train: error: {pair} do not match ({error}): they come from two package indexes; install '
            f'both from one index, e.g. pip install --force-reinstall torch torchvision --index-url '
            f'https://download.pytorch.org/whl/cpu (or both without --index-url).')


if __name__ == '__main__':
    try:
        from timm_dirac.train import main
    except RuntimeError as e:  # raised while timm imports torchvision
        if 'torchvision::' not in str(e) or '--debug' in sys.argv:
            raise
        print(_two_indexes(e), file=sys.stderr)
        sys.exit(2)
    main()
