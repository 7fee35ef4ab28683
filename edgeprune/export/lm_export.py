"""A dense causal LM (a folded MoE from ``edgeprune prune --generate``) to ONNX with a KV cache.

optimum's exporter does it (``task="text-generation-with-past"``: Mistral, Llama, Qwen3, Granite, ...), then the
parity gate runs every prompt through ONNX Runtime (:class:`edgeprune.lm_runtime.EdgeLM`, the app's runtime) and
through PyTorch: the greedy continuations must be equal token for token and the first step's logits within
``atol``; otherwise nothing is written. The artifact: ``onnx/model.onnx``, tokenizer files, ``config.json``,
``generation_config.json`` and ``edgeprune.json`` (``kind: causal-lm``, the model file, the context length, EOS /
BOS ids, the parity record), and with ``int4`` a 4-bit ``MatMulNBits`` variant (:func:`int4_variant`).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from edgeprune.errors import ExportError, ModelError

PROMPTS = ("a gorgeous , witty , seductive movie .", "the story is bland and the acting is flat", "it 's a charming film")


def export_lm(model_dir: str | Path, out: str | Path, prompts: Optional[Sequence[str]] = None,
              max_new_tokens: int = 8, atol: float = 1e-4, int4: bool = False, block: int = 32) -> dict:
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import AutoModelForCausalLM

    from edgeprune.lm_runtime import EdgeLM
    from edgeprune.models.checkpoint import load_checked, read_config, weight_files

    model_dir, out = Path(model_dir), Path(out)
    raw = read_config(model_dir)
    weight_files(model_dir)
    if not any("CausalLM" in a for a in raw.get("architectures") or []):
        raise ModelError(f"{model_dir}: export-lm takes a causal language model (...ForCausalLM), not "
                         f"{', '.join(raw.get('architectures') or ['unknown'])}")
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelError(f"{model_dir}: no tokenizer.json; save the tokenizer with the model")
    model = load_checked(AutoModelForCausalLM, model_dir)
    with tempfile.TemporaryDirectory(prefix="edgeprune-lm-") as tmp:
        try:
            main_export(str(model_dir), output=tmp, task="text-generation-with-past", device="cpu")
        except Exception as exc:  # optimum raises ValueError / KeyError for unsupported architectures
            raise ExportError(f"optimum cannot export {raw['model_type']} with a KV cache "
                              f"({str(exc).splitlines()[0][:160]})") from None
        (out / "onnx").mkdir(parents=True, exist_ok=True)
        for f in Path(tmp).iterdir():
            shutil.move(str(f), out / ("onnx" if f.suffix in (".onnx", ".onnx_data") or f.name.endswith(".onnx.data")
                                       else "") / f.name)
    gen = json.loads((out / "generation_config.json").read_text()) if (out / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id", raw.get("eos_token_id"))
    manifest = {"kind": "causal-lm", "model_file": "onnx/model.onnx", "model_type": raw["model_type"],
                "context": int(raw.get("max_position_embeddings") or 2048),
                "eos_token_ids": eos if isinstance(eos, list) else [eos] if eos is not None else [],
                "bos_token_id": gen.get("bos_token_id", raw.get("bos_token_id")), "precision": "fp32"}
    (out / "edgeprune.json").write_text(json.dumps(manifest, indent=1))
    lm = EdgeLM(out)
    diffs, n = [], 0
    for prompt in prompts or PROMPTS:
        got = list(lm.tokens(prompt, max_new_tokens))
        ids = lm.tokenizer.encode(prompt).ids or [lm.bos]
        with torch.no_grad():
            x = torch.tensor([ids])
            ref = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=raw.get("pad_token_id") or 0,
                                 eos_token_id=list(lm.eos) or None)[0, len(ids):].tolist()
            first = model(x).logits[0, -1].float().numpy()
        onnx_first = lm.logits(ids)[-1]
        diffs.append(float(np.abs(first - onnx_first).max()))
        if got != ref[: len(got)] or diffs[-1] > atol:
            raise ExportError(f"parity: ONNX Runtime's greedy continuation of {prompt!r} differs from PyTorch's "
                              f"({got[:8]} vs {ref[:8]}; first-step logits differ by {diffs[-1]:.2e}, tolerance {atol})")
        n += 1
    manifest["parity"] = {"prompts": n, "max_new_tokens": max_new_tokens, "greedy_equal": True,
                          "max_abs_logit_diff": max(diffs), "atol": atol}
    if int4:
        manifest["variants"] = {"int4": int4_variant(out, lm, list(prompts or PROMPTS), max_new_tokens, block)}
    (out / "edgeprune.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def int4_variant(out: Path, fp32, prompts: list[str], max_new_tokens: int, block: int) -> dict:
    """``onnx/model_q4.onnx``: every MatMul as ONNX Runtime's 4-bit ``MatMulNBits`` (symmetric blocks of
    ``block``, round to nearest), with how often its greedy tokens agree with the fp32 graph's on the prompts
    (not gated: 4 bits change some tokens; the measured agreement is recorded)."""
    from edgeprune.export.quantize import weight_only
    from edgeprune.lm_runtime import EdgeLM

    weight_only(out / "onnx" / "model.onnx", out / "onnx" / "model_q4.onnx", 4, ("MatMul",), block=block)
    q4 = EdgeLM(out, variant="int4", model_file="onnx/model_q4.onnx")
    same = total = 0
    for prompt in prompts:
        a, b = list(fp32.tokens(prompt, max_new_tokens)), list(q4.tokens(prompt, max_new_tokens))
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
    return {"model_file": "onnx/model_q4.onnx", "bits": 4, "block_size": block, "algorithm": "RTN",
            "greedy_token_agreement_with_fp32": round(same / max(1, total), 4),
            "size_mb": round((out / "onnx" / "model_q4.onnx").stat().st_size / 1e6, 3)}
