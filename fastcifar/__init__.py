"""fastcifar: a GPU-optimized CIFAR-10 speedrun trainer for a custom ResNet-9.

    python -m fastcifar.data  --data-dir ../shared/data/cifar10-png.tar.gz   # counts and channel stats
    python -m fastcifar.train --data-dir ../shared/data/cifar10-png.tar.gz --out-dir runs/default
    python -m export.onnx     --checkpoint runs/default --out model.onnx --int8
"""

__version__ = "0.1.0"
