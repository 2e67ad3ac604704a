"""Leaving PyTorch: ONNX export (`python -m export.onnx`), a torch-free predictor (`python -m export.predict`)
and the runtimes both use (`export.backends`: onnxruntime, OpenVINO).

    python -m export.onnx --checkpoint runs/default --out model.onnx --int8 --data-dir ../shared/data/cifar10-png.tar.gz
"""
