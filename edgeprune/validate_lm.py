"""A decoder artifact against its original, side by side in one run (issue 14, validation): on task text, the
perplexity of each model and how often its next-token choice agrees with the original's; at batch 1 on the
target's threads, the time to first token and the decode speed (tokens/s) with the KV cache.

Task text: the task's validation examples rendered as a language model sees them in edgeprune (the task prompt
followed by the gold label's verbaliser), so the measurement is on the kind of text the model was pruned for.
The original is the MoE in PyTorch (fp32, its own cache); the artifact runs in ONNX Runtime (:class:`EdgeLM`).
"""
from __future__ import annotations

import time
from statistics import median
from typing import Optional, Sequence

import numpy as np


def task_texts(task, data, words, limit: int = 64) -> list[str]:
    """The first ``limit`` validation examples as prompt + gold verbaliser."""
    examples = data.load(task, "validation", limit=limit)
    return [words.render(ex.text, getattr(ex, "text_pair", None)) + " " + words.verbalisers[ex.label] for ex in examples]


def _nll_and_choice(logits: np.ndarray, ids: list[int]) -> tuple[float, np.ndarray]:
    z = logits[:-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nxt = np.asarray(ids[1:])
    return float(-logp[np.arange(len(nxt)), nxt].sum()), logits[:-1].argmax(-1)


def compare(original, artifacts: dict, tokenizer, texts: Sequence[str], prompt: str, new_tokens: int = 32,
            repeats: int = 3, threads: int = 1) -> dict:
    """``original``: a PyTorch causal LM; ``artifacts``: name -> EdgeLM. Perplexity and next-token agreement
    on ``texts``; time to first token (ms) and decode tokens/s for ``prompt`` (greedy, ``new_tokens``)."""
    import torch

    torch.set_num_threads(threads)
    rows: dict = {"original": {"nll": 0.0}, **{k: {"nll": 0.0, "agree": 0} for k in artifacts}}
    n = 0
    for text in texts:
        ids = tokenizer.encode(text).ids
        if len(ids) < 2:
            continue
        with torch.no_grad():
            ref = original(torch.tensor([ids])).logits[0].float().numpy()
        nll, choice = _nll_and_choice(ref, ids)
        rows["original"]["nll"] += nll
        for name, lm in artifacts.items():
            nll_a, choice_a = _nll_and_choice(lm.logits(ids), ids)
            rows[name]["nll"] += nll_a
            rows[name]["agree"] += int((choice_a == choice).sum())
        n += len(ids) - 1
    out = {}
    for name, r in rows.items():
        out[name] = {"perplexity": round(float(np.exp(r["nll"] / max(1, n))), 3)}
        if "agree" in r:
            out[name]["next_token_agreement"] = round(r["agree"] / max(1, n), 4)
    ids = tokenizer.encode(prompt).ids
    out["original"].update(_torch_speed(original, ids, new_tokens, repeats))
    for name, lm in artifacts.items():
        out[name].update(_onnx_speed(lm, prompt, new_tokens, repeats))
    for name in artifacts:
        o, a = out["original"], out[name]
        a["decode_speedup"] = round(a["decode_tokens_per_s"] / o["decode_tokens_per_s"], 2)
        a["ttft_speedup"] = round(o["ttft_ms"] / a["ttft_ms"], 2)
    return {"tokens": n, "texts": len(texts), "threads": threads, "models": out}


def _torch_speed(model, ids: list[int], new_tokens: int, repeats: int) -> dict:
    import torch

    ttft, rate = [], []
    for _ in range(repeats):
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(torch.tensor([ids]), use_cache=True)
            t1 = time.perf_counter()
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            for _ in range(new_tokens - 1):
                out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            t2 = time.perf_counter()
        ttft.append((t1 - t0) * 1000)
        rate.append((new_tokens - 1) / (t2 - t1))
    return {"ttft_ms": round(median(ttft), 3), "decode_tokens_per_s": round(median(rate), 1)}


def _onnx_speed(lm, prompt: str, new_tokens: int, repeats: int) -> dict:
    ttft, rate = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stamps = []
        for _tok in lm.tokens(prompt, new_tokens, ignore_eos=True):
            stamps.append(time.perf_counter())
        ttft.append((stamps[0] - t0) * 1000)
        rate.append((len(stamps) - 1) / max(1e-9, stamps[-1] - stamps[0]))
    return {"ttft_ms": round(median(ttft), 3), "decode_tokens_per_s": round(median(rate), 1)}


def validate_artifact(art, original_dir, task_name: str, verbalisers: Optional[str], manifest: dict) -> dict:
    """``export-lm --original``: :func:`compare` of the original MoE LM with the artifact's fp32 graph (and its
    int4 variant when ``manifest`` lists one) on the task's validation text, one thread."""
    from transformers import AutoModelForCausalLM

    from edgeprune.lm_runtime import EdgeLM
    from edgeprune.models.checkpoint import load_checked
    from edgeprune.original import DataSpec
    from edgeprune.prompts import for_task
    from edgeprune.tasks import get_task

    task = get_task(task_name)
    words = for_task(task, None, tuple(w.strip() for w in verbalisers.split(",")) if verbalisers else None)
    original = load_checked(AutoModelForCausalLM, original_dir)
    artifacts = {"artifact fp32": EdgeLM(art, threads=1)}
    if "int4" in (manifest.get("variants") or {}):
        artifacts["artifact int4"] = EdgeLM(art, threads=1, variant="int4")
    texts = task_texts(task, DataSpec(), words)
    return compare(original, artifacts, artifacts["artifact fp32"].tokenizer, texts, texts[0])
