"""Exporter side of slimengine: checkpoint loading, the SD3 model and its stages, the PyTorch
reference sampler, ONNX lowering and the engine-bundle writer."""
