"""Quantize an ONNX LLM's linear layers to int4/int8, keeping its super weights exact: the public entry.

The pipeline is `sw_onnx.api.quantize_model` (load -> analyze -> plan -> passes -> save -> verify -> publish);
the settings `sw_onnx.config.QuantizeConfig`. This module keeps their long-standing import path.

JSON summary schema ``sw-onnx/quantize``, version 1 (fields may be added; a rename or removal bumps it)::

    {"schema": "sw-onnx/quantize", "schema_version": 1, "tool_version": str,
     "input": {"path", "bytes", "sha256"}, "output": {"path", "bytes", "external_data"},
     "config": {every QuantizeConfig field, resolved},
     "opset": {"from", "to", "method": "unchanged" | "bumped" | "version_converter"},
     "keep": {"source": "auto" | "none" | <report path>, "super_weights": [{"node", "initializer", "index",
              "row", "col", "value", "quantized_layer": bool}], "unused": [...]},
     "layers": [{"node", "op_type", "initializer", "position", "layer", "k", "n", "action", "reason",
                 "form", "is_lm_head", "kept", "accuracy_level", "float_bytes", "quantized_bytes",
                 "quantized_node", then the plan's other fields: "bits", "block_size", "symmetric", "clip",
                 "zscore", "sa_channels", "activation", "bits_per_weight", "bit_count": {"codes", "scales",
                 "zero_points", "side"} | null}],
     "totals": {"linear_layers", "quantized", "skipped", "forms": {form: count}, "float_weight_bytes",
                "quantized_weight_bytes", "weights", "bit_count": {"codes", "scales", "zero_points", "side"},
                "bits_per_weight"},   # bits per weight: every bit written for the quantized layers (codes,
                                      # scales, zero points, float side paths) over their weights
     "verification": VerifyResult.to_dict() | null, "seconds": {"detect", "rewrite_and_save", "verify", "total"}}
"""

from sw_onnx.api import QuantizeSummary, default_output_path, quantize_model
from sw_onnx.config import CLIP_MODES, FORMATS, QuantizeConfig
from sw_onnx.schema import QUANTIZE_SCHEMA, QUANTIZE_SCHEMA_VERSION

__all__ = ["CLIP_MODES", "FORMATS", "QUANTIZE_SCHEMA", "QUANTIZE_SCHEMA_VERSION", "QuantizeConfig", "QuantizeSummary",
           "default_output_path", "quantize_model"]
