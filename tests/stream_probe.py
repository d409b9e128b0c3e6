""" Test-side launcher for `accelerate launch`: trains as `train.py` does and appends every training sample it
decodes (the sample's number, from its first pixel: red + 256 x green) to `<dump dir>/seen-<rank>-<pid>.txt`, one
file per rank and loader worker.

    accelerate launch ... tests/stream_probe.py DUMP_DIR <timm-dirac-train flags>
"""
import os
import sys

import timm_dirac.train.data as data
from timm_dirac.train import parse_args, train

dump_dir, argv = sys.argv[1], sys.argv[2:]
make_transform = data.train_transform


def recording_transform(*args, **kwargs):
    transform = make_transform(*args, **kwargs)

    def record(image):
        red, green, _ = image.getpixel((0, 0))
        with open(os.path.join(dump_dir, f'seen-{os.environ.get("RANK", "0")}-{os.getpid()}.txt'), 'a') as f:
            f.write(f'{red + 256 * green}\n')
        return transform(image)
    return record


data.train_transform = recording_transform
train(parse_args(argv))
