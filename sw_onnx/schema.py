"""Names and versions of the JSON documents sw-onnx writes (fields may be added; a rename or removal bumps
the version). One place, so a reader of a report and its writer cannot disagree."""

DETECT_SCHEMA = "sw-onnx/detect"
DETECT_SCHEMA_VERSION = 1
QUANTIZE_SCHEMA = "sw-onnx/quantize"
QUANTIZE_SCHEMA_VERSION = 1
EVAL_SCHEMA = "sw-onnx/eval"
COMPARE_SCHEMA = "sw-onnx/compare"
ABLATE_SCHEMA = "sw-onnx/ablate"
SCHEMA_VERSION = 1
"""Version of the eval, compare and ablate documents."""
