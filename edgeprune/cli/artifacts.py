"""Commands on built artifacts: ``check`` (budgets), ``predict`` and ``generate`` (ONNX Runtime only), ``serve``
(the demo page), and ``export-lm`` (a saved dense causal LM into a decoder artifact)."""
from __future__ import annotations

import json
import sys

import click

from edgeprune.cli.app import main
from edgeprune.cli.options import guard_output
from edgeprune.errors import ConfigError


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--budget", "budget_file", type=click.Path(dir_okay=False),
              help="TOML with a [budgets] table (a target profile works; its [generate] table for a decoder artifact) "
                   "replacing the artifact's target budgets.")
@click.option("--max-size-mb", type=float)
@click.option("--max-p95-latency-ms", type=float)
@click.option("--max-accuracy-drop", type=float, help="Points of accuracy vs the original.")
@click.option("--min-agreement", type=float)
def check(directory, budget_file, **overrides) -> None:
    """Check an artifact's report against budgets: exit 0 if all hold, 1 with one line per violation."""
    from edgeprune.validate.budgets import check as violated

    bad = violated(directory, budget_file, overrides)
    if bad:
        for line in bad:
            click.echo(f"budget violated: {line}", err=True)
        sys.exit(1)
    click.echo(f"all budgets hold ({directory})")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("texts", nargs=-1, required=True)
@click.option("--pair", "pairs", multiple=True, help="Second text of a pair task, once per text.")
@click.option("--proba", is_flag=True, help="Print the probabilities of every label (JSON).")
@click.option("--top-k", type=int, help="Experts per token, for an artifact whose routers read it at run time "
                                        "(its report lists accuracy and speed at each k); default: the model's own.")
def predict(directory, texts, pairs, proba, top_k) -> None:
    """Classify TEXTS with a built artifact (ONNX Runtime only)."""
    from edgeprune.runtime import EdgeModel

    try:
        model = EdgeModel(directory, top_k=top_k)
    except ValueError as exc:
        raise ConfigError(f"--top-k: {exc}") from None
    if pairs and len(pairs) != len(texts):
        raise click.UsageError(f"{len(texts)} texts but {len(pairs)} --pair values; give one --pair per text")
    if bool(pairs) != bool(model.manifest.get("pair")):
        raise ConfigError("--pair: this artifact classifies text pairs; give one --pair per text"
                          if model.manifest.get("pair") else "--pair: this artifact classifies single texts; drop --pair")
    if proba:
        for text, p in zip(texts, model.predict_proba(list(texts), list(pairs) or None)):
            click.echo(json.dumps({"text": text, **{l: round(float(x), 4) for l, x in zip(model.labels, p)}}))
    else:
        for text, label in zip(texts, model.predict(list(texts), list(pairs) or None)):
            click.echo(f"{label}\t{text}")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("prompt")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0),
              help="0: greedy; otherwise sampling at this temperature.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", type=int, help="Sampling seed (default: random).")
@click.option("--stop", multiple=True, help="Stop before this string; repeatable.")
@click.option("--variant", help="A variant of the artifact (e.g. int4) instead of its fp32 graph.")
@click.option("--top-k", type=int, help="Experts per token, for a k > 1 artifact whose routers read it at run time "
                                        "(fewer is faster).")
def generate(directory, prompt, max_new_tokens, temperature, top_p, seed, stop, variant, top_k) -> None:
    """Generate from a decoder artifact with its KV cache (onnxruntime + tokenizers only), streaming."""
    from edgeprune.runtime import EdgeLM

    try:
        lm = EdgeLM(directory, variant=variant, top_k=top_k)
    except ValueError as exc:  # the artifact's routing cannot take it, or outside 1..Z
        raise ConfigError(f"--top-k: {exc}") from None
    for piece in lm.stream(prompt, max_new_tokens, temperature, top_p, stop, seed):
        click.echo(piece, nl=False)
    click.echo()
    if lm.last.get("truncated"):
        click.echo(f"[edgeprune] the prompt's first {lm.last['truncated']} tokens were dropped to fit the "
                   f"{lm.context}-token context", err=True)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback by default).")
@click.option("--lib", type=click.Path(file_okay=False, exists=True), multiple=True,
              help="Local folders served at /lib/ (repeatable): @huggingface/transformers' dist/ and onnxruntime-web's "
                   "dist/ (its WASM files); default: the page loads both from jsDelivr.")
def serve(directory, port, host, lib) -> None:
    """Serve an artifact's demo page (demo/index.html) to try it in a browser."""
    from edgeprune.runtime.serve import server

    srv = server(directory, host, port, lib)
    click.echo(f"demo: http://{host}:{srv.server_address[1]}/demo/index.html  (Ctrl-C stops)")
    try:
        srv.serve_forever()
    finally:
        srv.server_close()


@main.command("export-lm")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--prompt", "prompts", multiple=True, help="Parity prompts (default: three sst2 sentences); repeatable.")
@click.option("--int4", is_flag=True, help="Also write a 4-bit MatMulNBits variant (onnx/model_q4.onnx).")
@click.option("--original", "original_dir", type=click.Path(file_okay=False),
              help="The MoE language model it was pruned from: validate side by side on task text (perplexity, "
                   "next-token agreement, time to first token, decode tokens/s) into edgeprune.json.")
@click.option("--task", "task_name", default="sst2", show_default=True, help="Task whose text --original validates on.")
@click.option("--verbalisers", help="Label words for the task text (default: the label names).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Artifact directory.")
def export_lm_command(model_dir, prompts, int4, original_dir, task_name, verbalisers, out) -> None:
    """Export a dense causal LM (from `prune --generate` at k = 1) to ONNX with a KV cache, parity-gated."""
    from edgeprune.build.decoder import export_lm_artifact
    from edgeprune.guard import output_lock

    out = guard_output(out, {"checkpoint": model_dir})
    with output_lock(out):
        info = export_lm_artifact(model_dir, out, prompts, int4, original_dir, task_name, verbalisers)
    click.echo(f"parity: greedy tokens equal on {info['parity']['prompts']} prompts, max first-step logit diff "
               f"{info['parity']['max_abs_logit_diff']:.2e}; artifact: {out}")
    for name, m in (info.get("validation") or {}).get("models", {}).items():
        click.echo(f"{name}: perplexity {m['perplexity']}" +
                   (f", next-token agreement {m['next_token_agreement']}" if "next_token_agreement" in m else "") +
                   f", first token {m['ttft_ms']} ms, decode {m['decode_tokens_per_s']} tokens/s")
