from sw_onnx._version import __version__
