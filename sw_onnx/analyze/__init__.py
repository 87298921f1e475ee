"""Analysis: what sw-onnx measures on a model before deciding anything (runs onnxruntime, rewrites nothing
that is saved). `instrument` adds small statistics outputs to a copy, `input_stats` turns linear-layer
inputs into super-activation channels and int8 ranges, `sensitivity` picks MatMulNBits accuracy levels.
The rewrite passes (`sw_onnx.passes`) never import this package: they read the plan."""
