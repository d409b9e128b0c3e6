#!/usr/bin/env python3
""" Train DiracNets with accelerate: `python train.py --config train_configs/quick_cifar10.yaml`, or
`accelerate launch [--multi_gpu --num_processes N] train.py ...`. The logic lives in `timm_dirac.train`. """
from timm_dirac.train import main

if __name__ == '__main__':
    main()
