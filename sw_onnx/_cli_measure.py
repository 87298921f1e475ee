"""The measuring commands of the `sw-onnx` CLI: eval, compare, generate, ablate (library: sw_onnx.measure).

`register(app)` adds them to the main Typer app; errors are sw_onnx.errors types, mapped to exit codes by
`sw_onnx.cli.main` (compare's --fail-above-kl gate raises VerificationError: exit 3).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from sw_onnx._cli_common import ModelArg, ProviderOpt, TokenizerOpt, execution_providers, progress, write_json
from sw_onnx.errors import UsageError, VerificationError

_JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Write the result as JSON here ('-' for stdout).")]
_TextOpt = Annotated[Optional[Path], typer.Option("--text", help="UTF-8 text file to evaluate on.", show_default=False)]
_ContextOpt = Annotated[int, typer.Option("--context", min=2, help="Tokens per window (non-overlapping windows).")]
_MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", min=2, help="Evaluate at most this many tokens (whole windows). Default: the whole text.", show_default=False)]


def _write_json(data: dict, target: Path) -> None:
    try:
        write_json(data, target)
    except OSError as e:
        raise UsageError(f"--json {target}: cannot write it ({e.strerror or e})") from None


class _ProgressBar:
    """`progress(done, total)` on stderr: one self-rewriting line on a terminal, a few lines otherwise.
    Silent for runs of a single step."""

    def __init__(self, label: str, *, width: int = 28) -> None:
        self.label = label
        self.width = width
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        if total <= 1:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        text = f"{self.label} {done}/{total} windows, {elapsed:.0f} s elapsed, ~{eta:.0f} s left"
        if self.tty:
            filled = int(self.width * done / total)
            bar = "#" * filled + "-" * (self.width - filled)
            end = "\n" if done == total else ""
            print(f"\r[sw-onnx] [{bar}] {text}", end=end, file=sys.stderr, flush=True)
            return
        decile = 10 * done // total
        if decile != self.last_decile and (decile > self.last_decile):
            self.last_decile = decile
            progress(text)


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if x == x and abs(x) != float("inf") else str(x)


def eval_command(
    model: ModelArg,
    text: _TextOpt = None,
    tokenizer: TokenizerOpt = None,
    context: _ContextOpt = 512,
    max_tokens: _MaxTokensOpt = None,
    json_path: _JsonOpt = None,
    provider: ProviderOpt = "cpu",
    bos: Annotated[bool, typer.Option("--bos", help="Start every window with the model's BOS (config.json), then --context - 1 text tokens: for models that need it (Gemma).")] = False,
) -> None:
    """Perplexity on a text (default: WikiText-2 test): mean next-token NLL over windows of --context, exp."""
    from sw_onnx.evaluate import text_token_ids
    from sw_onnx.io import resolve_model_path
    from sw_onnx.measure import evaluate_model

    providers = execution_providers(provider)
    path = resolve_model_path(model)
    bos_id = None
    if bos:
        from sw_onnx.inputs import bos_convention

        bos_id, _ = bos_convention(path.parent)
        if bos_id is None:
            raise UsageError("--bos: no bos_token_id in the model's config.json")
    ids, source = text_token_ids(model, text=text, tokenizer=tokenizer)
    progress(f"text: {source}")
    result = evaluate_model(model, ids, context=context, max_tokens=max_tokens, providers=providers,
                            progress=_ProgressBar("eval"), source=source, bos=bos_id)
    if json_path is not None:
        _write_json(result.to_dict(), json_path)
    if str(json_path) != "-":
        note = "" if result.context == context else f" (text shorter than --context {context})"
        print(f"perplexity {_fmt(result.perplexity, 6)} (mean NLL {result.nll_mean:.5f} nats) over "
              f"{result.tokens:,} predicted tokens: {result.windows} window(s) of {result.context}{note}, "
              f"{result.seconds:.1f} s on {result.provider}")

def compare(
    reference: Annotated[Path, typer.Argument(help="The reference model (.onnx or export folder).", show_default=False)],
    candidate: Annotated[Path, typer.Argument(help="The model to check against it.", show_default=False)],
    text: Annotated[Optional[Path], typer.Option("--text", help="UTF-8 text file to compare on (needs a tokenizer). Default: the detection prompt, data-free.", show_default=False)] = None,
    tokenizer: TokenizerOpt = None,
    context: _ContextOpt = 512,
    max_tokens: _MaxTokensOpt = None,
    fail_above_kl: Annotated[Optional[float], typer.Option("--fail-above-kl", min=0.0, help="Exit with code 3 when the mean KL(reference || candidate) is above this.", show_default=False)] = None,
    json_path: _JsonOpt = None,
    provider: ProviderOpt = "cpu",
) -> None:
    """Compare two models' logits on the same tokens: max |diff|, mean KL, top-1 agreement, perplexities."""
    from sw_onnx.evaluate import text_token_ids
    from sw_onnx.inputs import prompt_token_ids
    from sw_onnx.io import resolve_model_path
    from sw_onnx.measure import compare_models

    providers = execution_providers(provider)
    resolve_model_path(reference)
    resolve_model_path(candidate)
    if text is not None:
        ids, source = text_token_ids(reference, text=text, tokenizer=tokenizer)
    else:
        ids, source = prompt_token_ids(reference, tokenizer=tokenizer)
    progress(f"tokens: {source}")
    result = compare_models(reference, candidate, ids, context=context, max_tokens=max_tokens,
                            providers=providers, progress=_ProgressBar("compare"),
                            fail_above_kl=fail_above_kl, source=source)
    if json_path is not None:
        _write_json(result.to_dict(), json_path)
    if str(json_path) != "-":
        r = result
        change = (r.candidate_perplexity / r.reference_perplexity - 1) * 100 if r.reference_perplexity else float("nan")
        print(f"compared {r.positions:,} positions ({r.windows} window(s) of {r.context}) in {r.seconds:.1f} s")
        print(f"  max |logit diff|          {_fmt(r.max_abs_logit_diff)}")
        print(f"  mean KL(ref || candidate) {_fmt(r.mean_kl)} nats (max {_fmt(r.max_kl)})")
        print(f"  top-1 agreement           {r.top1_agreement:.2%}")
        print(f"  perplexity                reference {_fmt(r.reference_perplexity, 6)}, candidate "
              f"{_fmt(r.candidate_perplexity, 6)} ({change:+.2f}%)")
    if not result.passed:
        raise VerificationError(f"mean KL {_fmt(result.mean_kl)} is above --fail-above-kl {fail_above_kl}",
                                hint="the candidate drifts too far from the reference")
    if fail_above_kl is not None and str(json_path) != "-":
        print(f"  passed: mean KL <= {fail_above_kl}")

def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.", show_default=False)],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=0, help="Tokens to generate at most.")] = 32,
    tokenizer: TokenizerOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the whole sequence each step even when the graph has a KV cache.")] = False,
    json_path: _JsonOpt = None,
    provider: ProviderOpt = "cpu",
) -> None:
    """Greedy continuation of a prompt (uses the KV cache when the graph has one); stops at EOS."""
    from sw_onnx.evaluate import load_tokenizer
    from sw_onnx.inputs import prompt_token_ids
    from sw_onnx.io import resolve_model_path
    from sw_onnx.measure import eos_token_ids
    from sw_onnx.measure import generate as run_generate

    providers = execution_providers(provider)
    path = resolve_model_path(model)
    tok = load_tokenizer(path, tokenizer)
    ids, _ = prompt_token_ids(path, tokenizer=tokenizer, prompt=prompt)
    result = run_generate(path, ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_ids(path),
                          providers=providers, use_cache=not no_cache)
    text = tok.decode(result.ids, skip_special_tokens=True)
    if json_path is not None:
        _write_json({**result.to_dict(), "text": text, "model": str(path)}, json_path)
    if str(json_path) != "-":
        print(text)
    progress(f"{len(result.new_ids)} new token(s), stopped by {result.stop_reason}, "
         f"{'with' if result.used_kv_cache else 'without'} KV cache, {result.seconds:.1f} s")

def ablate(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="The .onnx to write (never the input).", show_default=False)],
    scale: Annotated[float, typer.Option("--scale", help="Multiply the super weights by this (0 prunes them).")] = 0.0,
    keep: Annotated[str, typer.Option("--keep", "--weights", help="Which super weights: auto (run detect) or a sw-onnx detect --json report.")] = "auto",
    tokenizer: TokenizerOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    json_path: _JsonOpt = None,
    provider: ProviderOpt = "cpu",
) -> None:
    """Write a copy of the model with its super weights scaled (the paper's ablation)."""
    from sw_onnx.api import ablate_super_weights

    result = ablate_super_weights(model, output, keep=keep, scale=scale, tokenizer=tokenizer,
                                  providers=execution_providers(provider), force=force, progress=progress)
    if json_path is not None:
        _write_json(result.to_dict(), json_path)
    if str(json_path) != "-":
        for w in result.weights:
            print(f"  {w['initializer']} {tuple(w['index'])}: {_fmt(w['before'])} -> {_fmt(w['after'])}")
        extra = f"; copied {', '.join(result.copied)} beside it" if result.copied else ""
        print(f"scaled {len(result.weights)} weight(s) by {scale:g}; wrote {result.output_path}{extra}")


def register(app: typer.Typer) -> None:
    """Add eval, compare, generate and ablate to `app` (in this order: `sw-onnx --help` lists them so)."""
    app.command("eval", epilog="Example: sw-onnx eval ./smollm2-135m --max-tokens 4096 --json ppl.json")(eval_command)
    app.command(epilog="Example: sw-onnx compare model.onnx model.q4.onnx --text wiki.txt --max-tokens 4096 --fail-above-kl 0.05")(compare)
    app.command(epilog='Example: sw-onnx generate ./smollm2-135m --prompt "Summer is hot. Winter is"')(generate)
    app.command(epilog="Example: sw-onnx ablate ./smollm2-135m -o pruned/model.onnx --scale 0")(ablate)
