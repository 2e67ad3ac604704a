"""Leaving PyTorch: ONNX export (`python -m export.onnx`) and a torch-free predictor (`python -m export.predict`)."""
