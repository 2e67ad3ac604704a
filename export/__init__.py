"""Leaving PyTorch: ONNX export (`python -m export.onnx`) and a torch-free predictor (`python -m export.predict`).

    python -m export.onnx --checkpoint runs/default --out model.onnx --int8 --data-dir ../shared/data/cifar10-png.tar.gz
    python -m export.predict model.int8.onnx cat.png dog.jpg --top 3
"""
