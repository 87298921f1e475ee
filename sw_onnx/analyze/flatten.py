"""Flatten control flow for analysis: inline the If branch that the analysis feeds select.

optimum's older ``decoder_model_merged.onnx`` holds the decoder twice, with and without a past, in the two
branches of one If on a boolean graph input (``use_cache_branch``); both branches read the same outer-scope
weights. Analysis runs with an empty past, which selects the ``else_branch``: inlining it into the main graph
of the analysis copy lets instrumentation see its layers like any other. Super weights are initializer
coordinates, so what is found holds for both branches.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["inline_input_branches"]


def inline_input_branches(model: ir.Model) -> int:
    """Replace every main-graph If whose condition is a graph input by its ``else_branch`` (the condition is
    then fed False); returns how many were inlined. The condition input is removed once nothing reads it."""
    graph = model.graph
    graph_inputs = {id(v) for v in graph.inputs}
    inlined = 0
    for node in list(graph):
        cond = node.inputs[0] if node.inputs else None
        if node.op_type != "If" or node.domain not in ("", "ai.onnx") or cond is None or id(cond) not in graph_inputs:
            continue
        branch = node.attributes["else_branch"].as_graph()
        for name, value in list(branch.initializers.items()):
            branch.initializers.pop(name)
            graph.register_initializer(value)
        nodes = list(branch)
        for inner in nodes:
            branch.remove(inner)
        graph.insert_before(node, nodes)
        results = list(branch.outputs)
        branch.outputs.clear()
        for outer, inner_out in zip(node.outputs, results):
            name = outer.name
            outer.replace_all_uses_with(inner_out, replace_graph_outputs=True)
            outer.name = None
            inner_out.name = name
        graph.remove(node, safe=True)
        if not cond.uses():
            graph.inputs.remove(cond)
        inlined += 1
    return inlined
