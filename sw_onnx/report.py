"""Reports of sw-onnx commands: the versioned JSON schema, the human-readable table and the plot.

JSON schema `sw-onnx/detect`, version 1 (fields may be added; a rename or removal bumps the version):

```
{
  "schema": "sw-onnx/detect", "schema_version": 1, "tool_version": "0.1.0",
  "model": {"path": str, "bytes": int, "linear_layers": int},
  "config": {"max_iterations", "spike_ratio", "min_share", "min_persist_fraction", "provider", "prompt", "tokenizer"},
  "input": {"token_ids": [int], "source": str},
  "super_weights": [{
      "node": str, "initializer": str, "layer": int | null (from names), "position": int (topological index
      among linear layers), "row": int, "col": int (torch orientation [out, in]), "index": [int, int] (in the
      initializer's own layout), "layout": "KN" (ONNX MatMul [in, out]) | "NK" ([out, in]), "value": float,
      "contribution": float (x[t, col] * value), "share": float (of the output spike),
      "input_spike": {"channel", "token", "value", "ratio"}, "output_spike": {"channel", "token", "value"},
      "iteration": int, "effect": {"spike_before", "spike_after", "reduction"} (zeroing the group)}],
  "super_activations": [{"node", "layer", "position", "channel", "token", "value", "ratio_to_layer",
      "ratio_to_model", "kind", "reason", "residual_before", "carried_fraction", "explained_share", "iteration"}],
  "one_off_spikes": [same fields as super_activations],
  "input_ranges": [{"value": str (a linear-layer input), "nodes": [str] (the layers reading it), "k": int,
      "naive_range": float (max |x| on the prompt), "other_range": float (without the super-activation
      token), "channels": [int] (super-activation channels), "handled_range", "median", "gain": float,
      "sa_entries": [{"channel", "token", "window", "value"}]}] (first pass; what `quantize --keep REPORT`
      keeps out of activation quantization, so it needs no calibration run),
  "input_importance": [{"value": str, "nodes": [str], "k": int, "tokens": int, "windows": int,
      "sum_sq": [float] (per channel, sum of x^2 over the prompt's tokens), "first_sq": [float] (the first
      token's x^2)}] (first pass; quantize's activation-aware rounding and bit allocation),
  "iterations": int, "seconds": float
}
```
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from sw_onnx._version import __version__
from sw_onnx.detect import DetectConfig, DetectResult
from sw_onnx.schema import DETECT_SCHEMA, DETECT_SCHEMA_VERSION


def detect_report(result: DetectResult, *, model_path: Path, config: DetectConfig, prompt, tokenizer, source: str) -> dict:
    """The JSON-serialisable detect report (see the module docstring for the schema)."""
    return {
        "schema": DETECT_SCHEMA,
        "schema_version": DETECT_SCHEMA_VERSION,
        "tool_version": __version__,
        "model": {"path": str(model_path), "bytes": model_path.stat().st_size, "linear_layers": result.linear_layers},
        "config": {
            "max_iterations": config.max_iterations,
            "spike_ratio": config.spike_ratio,
            "min_share": config.min_share,
            "min_persist_fraction": config.min_persist_fraction,
            "provider": (config.providers or ["CPUExecutionProvider"])[0],
            "prompt": prompt,
            "tokenizer": str(tokenizer) if tokenizer else None,
        },
        "input": {"token_ids": result.token_ids, "source": source},
        "super_weights": [asdict(s) for s in result.super_weights],
        "super_activations": [asdict(s) for s in result.super_activations],
        "one_off_spikes": [asdict(s) for s in result.one_off_spikes],
        "input_ranges": [r.to_dict() for r in result.input_ranges.values()],
        "input_importance": [i.to_dict() for i in result.input_importance.values()],
        "iterations": result.iterations,
        "seconds": round(result.seconds, 3),
    }


def _layer_label(layer, position) -> str:
    return f"L{layer}" if layer is not None else f"#{position}"


def format_detect_table(result: DetectResult) -> str:
    """Human-readable summary: super weights, super activations, one-off spikes."""
    lines = []
    if result.super_weights:
        lines.append(f"Super weights ({len(result.super_weights)}):")
        header = f"  {'layer':>5}  {'node':<42} {'initializer':<28} {'row,col (torch)':>16} {'index':>12} {'value':>10} {'input spike':>13} {'output spike':>13} {'share':>6} {'zeroed: spike':>20}"
        lines.append(header)
        for s in result.super_weights:
            effect = s.effect
            zeroed = f"{effect['spike_before']:.4g} -> {effect['spike_after']:.3g}" if effect else "n/a"
            lines.append(
                f"  {_layer_label(s.layer, s.position):>5}  {_clip(s.node, 42):<42} {_clip(s.initializer, 28):<28} "
                f"{f'[{s.row}, {s.col}]':>16} {str(tuple(s.index)):>12} {s.value:>10.4g} "
                f"{s.input_spike['value']:>13.4g} {s.output_spike['value']:>13.4g} {s.share:>6.0%} {zeroed:>20}"
            )
    else:
        lines.append("No super weight found.")
    if result.super_activations:
        lines.append(f"Super activations ({len(result.super_activations)}):")
        for a in result.super_activations:
            lines.append(
                f"  {_layer_label(a.layer, a.position):>5}  {_clip(a.node, 42):<42} channel {a.channel:<6} token {a.token:<4} "
                f"value {a.value:>11.4g}  {a.ratio_to_layer:>8.0f}x layer median  ({a.reason})"
            )
    else:
        lines.append("No super activation found.")
    if result.one_off_spikes:
        lines.append(f"Other spikes, not super activations ({len(result.one_off_spikes)}):")
        for a in result.one_off_spikes[:12]:
            lines.append(
                f"  {_layer_label(a.layer, a.position):>5}  {_clip(a.node, 42):<42} channel {a.channel:<6} token {a.token:<4} "
                f"|value| {abs(a.value):>10.4g}  {a.ratio_to_layer:>8.0f}x  ({a.reason})"
            )
        if len(result.one_off_spikes) > 12:
            lines.append(f"  ... and {len(result.one_off_spikes) - 12} more (see --json)")
    lines.append(f"{result.linear_layers} linear layers, {result.iterations} pass(es), {result.seconds:.1f} s")
    return "\n".join(lines)


def _short(node_name: str) -> str:
    parts = [p for p in node_name.split("/") if p]
    return "/".join(parts[-3:-1]) if len(parts) >= 3 else node_name


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def plot_detect(result: DetectResult, path: Path, *, layers) -> None:
    """PNG of per-layer max |input| and max |output| of every linear layer (log scale), spikes marked.

    Uses the first pass (the unmodified model), like the paper's detection figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = result.history[0]
    positions = sorted(first["out_peak"])
    fig, ax = plt.subplots(figsize=(max(8, len(positions) * 0.06), 4.5), dpi=120)
    ax.plot(positions, [first["in_peak"][p] for p in positions], ".-", lw=0.8, ms=3, label="max |input|")
    ax.plot(positions, [first["out_peak"][p] for p in positions], ".-", lw=0.8, ms=3, label="max |output|")
    for spikes, marker, color, label in (
        ([a for a in result.super_activations if a.iteration == 0], "*", "red", "super activation"),
        ([a for a in result.one_off_spikes if a.iteration == 0], "x", "gray", "other spike"),
    ):
        if spikes:
            ax.scatter([a.position for a in spikes], [abs(a.value) for a in spikes], marker=marker, s=90, c=color, zorder=5, label=label)
    groups: dict[tuple[int, float], list] = {}
    for sw in result.super_weights:
        groups.setdefault((sw.position, abs(sw.output_spike["value"])), []).append(sw)
    legend_lines = []
    for number, ((position, height), group) in enumerate(sorted(groups.items()), start=1):
        ax.annotate(str(number), (position, height), textcoords="offset points", xytext=(5, 3), fontsize=8, color="red")
        where = _layer_label(group[0].layer, position)
        weights = ", ".join(f"[{sw.row}, {sw.col}]" for sw in group)
        legend_lines.append(f"{number}: {where} {_short(group[0].node)} {weights}")
    if legend_lines:
        ax.text(0.99, 0.98, "super weights, torch [row, col]\n" + "\n".join(legend_lines), transform=ax.transAxes,
                ha="right", va="top", fontsize=7, color="red", bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
    ax.set_yscale("log")
    ax.set_ylim(top=max(first["out_peak"].values()) * 100)  # headroom for the legend boxes
    ax.set_xlabel("linear layer (topological order)")
    ax.set_ylabel("max |activation| over tokens")
    ax.set_title("sw-onnx detect: linear-layer inputs and outputs")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)  # atomic: a failed or interrupted write never leaves half a PNG
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)

