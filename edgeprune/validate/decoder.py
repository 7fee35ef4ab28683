"""A decoder artifact against its original, side by side in one run (issue 14, validation).

On the task's validation split (prompt + completion, :mod:`edgeprune.tasks.generation`), for the original MoE in
PyTorch (fp32) and each ONNX graph of the artifact (:class:`~edgeprune.runtime.decoder.EdgeLM`):

* **perplexity on the completions**: exp of the mean negative log-likelihood of the completion tokens given
  everything before them (``text_perplexity``: over every token of prompt and completion);
* **next-token agreement**: the share of positions (prompt and completion) where the graph's most likely next
  token is the original's;
* **greedy-continuation agreement**: for the first ``greedy_prompts`` prompts, ``new_tokens`` greedy tokens from
  the prompt alone; ``greedy_exact`` is the share of prompts whose continuation equals the original's,
  ``greedy_prefix`` the mean share of tokens before the first difference;
* **label accuracy** where the completion is a label word (the shipped tasks): the label whose verbaliser's
  first token is the most likely at the completion's first position, among the labels' (label-word scoring);
* at batch 1 on the target's threads: **time to first token** (the prompt's pass) and **decode tokens/s** (the
  following tokens with the KV cache), median of ``repeats``, the original and the graphs alternating;
* **peak memory** of a fresh process that loads the graph and generates (VmHWM above the bare import).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Optional, Sequence

import numpy as np


def evaluate(original, artifacts: dict, enc, label_ids: Optional[Sequence[int]] = None, greedy_prompts: int = 16,
             new_tokens: int = 32, repeats: int = 3, threads: int = 1, speed_prompt: Optional[list[int]] = None,
             progress: bool = True) -> dict:
    """``original``: the PyTorch causal LM, or a :class:`~edgeprune.validate.decoder_reference.LayerwiseReference`
    (an original that does not fit: its figures computed one layer at a time, its speed not measured);
    ``artifacts``: name -> EdgeLM; ``enc``: an ``LMEncoded`` validation split. See the module docstring for what is
    measured."""
    import torch

    from edgeprune.validate.decoder_reference import InMemoryReference

    ref = original if hasattr(original, "row") else InMemoryReference(original)
    torch.set_num_threads(threads)
    names = ["original", *artifacts]
    acc = {n: {"nll": 0.0, "text_nll": 0.0, "agree": 0, "correct": 0, "exact": 0, "prefix": 0.0} for n in names}
    counts = _teacher_forced(ref, artifacts, enc, label_ids, acc, progress)
    greedy_n = _greedy(ref, artifacts, enc, min(greedy_prompts, len(enc)), new_tokens, acc)
    out = {name: _row(name, acc[name], counts, greedy_n) for name in names}
    prompt = speed_prompt if speed_prompt is not None else enc.prompt_ids(0)
    timed = [n for n in names if n != "original" or getattr(ref, "speed", True)]
    speeds = {n: {"ttft": [], "rate": []} for n in timed}
    for _ in range(repeats):  # alternating rounds: the machine's drift hits every model alike
        if "original" in timed:
            _torch_speed(original, prompt, new_tokens, speeds["original"])
        for name, lm in artifacts.items():
            _onnx_speed(lm, prompt, new_tokens, speeds[name])
    for name in timed:
        out[name]["ttft_ms"] = round(median(speeds[name]["ttft"]), 3)
        out[name]["decode_tokens_per_s"] = round(median(speeds[name]["rate"]), 1)
    for name in artifacts:
        o, a = out["original"], out[name]
        if "original" in timed:
            a["decode_speedup"] = round(a["decode_tokens_per_s"] / o["decode_tokens_per_s"], 2)
            a["ttft_speedup"] = round(o["ttft_ms"] / a["ttft_ms"], 2)
        a["perplexity_ratio"] = round(a["perplexity"] / o["perplexity"], 4)
    return {"examples": len(enc), "completion_tokens": counts["completion"], "tokens": counts["all"],
            "labelled": counts["labelled"], "greedy_prompts": greedy_n, "new_tokens": new_tokens, "threads": threads,
            "speed_prompt_tokens": len(prompt), "models": out,
            **({} if "original" in timed else {"original_speed": "not measured: the original does not fit in memory "
                                                                  "(validated one layer at a time)"})}


def _teacher_forced(ref, artifacts: dict, enc, label_ids, acc: dict, progress: bool) -> dict:
    """Completion and whole-text negative log-likelihood, next-token agreement with the original and label
    accuracy, accumulated into ``acc`` over the split; returns the token counts."""
    from tqdm.auto import tqdm

    from edgeprune.validate.decoder_reference import row_of

    counts = {"completion": 0, "all": 0, "labelled": 0}
    for i in tqdm(range(len(enc)), desc="validate", disable=not progress, unit="example"):
        ids, start = enc.input_ids[i], enc.starts[i]
        span = slice(start - 1, len(ids) - 1)
        label = enc.labels[i] if label_ids else None
        rows = {"original": ref.row(enc, i, label_ids)}
        rows.update({name: row_of(lm.logits(ids), ids, start, label_ids) for name, lm in artifacts.items()})
        choice = rows["original"][1]
        for name, (token_lp, best, label_z) in rows.items():
            acc[name]["nll"] -= float(token_lp[span].sum())
            acc[name]["text_nll"] -= float(token_lp.sum())
            acc[name]["agree"] += int((best == choice).sum())
            if label is not None:
                acc[name]["correct"] += int(int(np.argmax(label_z)) == label)
        counts["completion"] += len(ids) - start
        counts["all"] += len(ids) - 1
        counts["labelled"] += label is not None
    return counts


def _greedy(ref, artifacts: dict, enc, n: int, new_tokens: int, acc: dict) -> int:
    """Greedy continuations of the first ``n`` prompts against the original's: exact and common-prefix share."""
    eos = next(iter(artifacts.values())).eos if artifacts else set()
    prompts = [enc.prompt_ids(i) for i in range(n)]
    for prompt in prompts:
        want = ref.greedy(prompt, new_tokens, eos)
        for name, lm in artifacts.items():
            got = list(lm.generate_ids(prompt, new_tokens))
            same = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            acc[name]["exact"] += int(got == want)
            acc[name]["prefix"] += same / max(1, len(want))
    return n


def _row(name: str, a: dict, counts: dict, greedy_n: int) -> dict:
    row = {"perplexity": round(float(np.exp(a["nll"] / max(1, counts["completion"]))), 4),
           "text_perplexity": round(float(np.exp(a["text_nll"] / max(1, counts["all"]))), 4)}
    if name != "original":
        row["next_token_agreement"] = round(a["agree"] / max(1, counts["all"]), 4)
        row["greedy_exact"] = round(a["exact"] / max(1, greedy_n), 4)
        row["greedy_prefix"] = round(a["prefix"] / max(1, greedy_n), 4)
    if counts["labelled"]:
        row["label_accuracy"] = round(a["correct"] / counts["labelled"], 4)
    return row


def _torch_speed(model, ids: list[int], new_tokens: int, into: dict) -> None:
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        t1 = time.perf_counter()
        past, tok = out.cache, int(out.logits[0, -1].argmax())  # transformers 5: cache, not past_key_values
        for _ in range(new_tokens - 1):
            out = model(torch.tensor([[tok]]), cache=past, use_cache=True)
            past, tok = out.cache, int(out.logits[0, -1].argmax())
        t2 = time.perf_counter()
    into["ttft"].append((t1 - t0) * 1000)
    into["rate"].append((new_tokens - 1) / (t2 - t1))


def _onnx_speed(lm, ids: list[int], new_tokens: int, into: dict) -> None:
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _tok in lm.generate_ids(ids, new_tokens, ignore_eos=True)]
    into["ttft"].append((stamps[0] - t0) * 1000)
    into["rate"].append((len(stamps) - 1) / max(1e-9, stamps[-1] - stamps[0]))


_MEM_PROBE = """
import json, resource, sys
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) / 1024
import numpy, onnxruntime, tokenizers
base = hwm()
from edgeprune.runtime.decoder import EdgeLM
lm = EdgeLM(sys.argv[1], threads=int(sys.argv[3]), model_file=sys.argv[2])
list(lm.generate_ids(list(range(4, 36)), 16, ignore_eos=True))
print(json.dumps({"peak_mb": hwm(), "session_mb": hwm() - base}))
"""


_TORCH_PROBE = """
import json, sys
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) / 1024
import torch, transformers
torch.set_num_threads(int(sys.argv[2]))
base = hwm()
from edgeprune.models.loading import load_language_model
m = load_language_model(sys.argv[1], moe=False)
with torch.no_grad():
    x = torch.arange(4, 36)[None]
    m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, min_new_tokens=16, do_sample=False)
print(json.dumps({"peak_mb": hwm(), "session_mb": hwm() - base}))
"""


def torch_memory(model_dir: Path, threads: int = 1) -> dict:
    """The same for a checkpoint in PyTorch (the original): load, then 16 greedy tokens after 32."""
    out = subprocess.run([sys.executable, "-c", _TORCH_PROBE, str(model_dir), str(threads)], capture_output=True,
                         text=True, timeout=1200)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "probe failed"}
    return {k: round(v, 1) for k, v in json.loads(out.stdout).items()}


def process_memory(directory: Path, model_file: str, threads: int = 1) -> dict:
    """Peak RSS of a fresh process that loads ``model_file`` of the artifact and generates 16 tokens after a
    32-token prompt; ``session_mb`` is the part above the bare onnxruntime + tokenizers import."""
    out = subprocess.run([sys.executable, "-c", _MEM_PROBE, str(directory), model_file, str(threads)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "probe failed"}
    return {k: round(v, 1) for k, v in json.loads(out.stdout).items()}


def validate_artifact(art, original_dir, task_name: str, verbalisers: Optional[str], manifest: dict) -> dict:
    """``export-lm --original``: :func:`evaluate` of the original MoE LM with the artifact's fp32 graph (and its
    int4 variant when ``manifest`` lists one) on the task's validation split cast as generation data, one
    thread."""
    from edgeprune.runtime.decoder import EdgeLM
    from edgeprune.tasks.spec import DataSpec
    from edgeprune.pruning.config import PruneConfig
    from edgeprune.pruning.lm_data import lm_examples, verbaliser_ids
    from edgeprune.models.loading import load_language_model
    from edgeprune.tasks import get_task

    task = get_task(task_name)
    cfg = PruneConfig(generate=True, verbalisers=tuple(w.strip() for w in verbalisers.split(",")) if verbalisers
                      else None)
    original = load_language_model(original_dir)
    artifacts = {"artifact fp32": EdgeLM(art, threads=1)}
    if "int4" in (manifest.get("variants") or {}):
        artifacts["artifact int4"] = EdgeLM(art, threads=1, variant="int4")
    enc = lm_examples(original_dir, task, DataSpec(), cfg, "validation", 64)
    return evaluate(original, artifacts, enc, verbaliser_ids(original_dir, task, cfg), progress=False)
