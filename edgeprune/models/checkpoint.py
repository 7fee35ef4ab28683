"""Reading a user's checkpoint directory safely: local directories only, safetensors only, no remote code,
and a config that must match its tensors. Every problem is one line (:class:`~edgeprune.errors.ModelError`,
exit 4) naming what is wrong and how to fix it; nothing is written.

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused rather than loaded: unpickling executes
code. The Hugging Face ecosystem's fix is to convert them once, where the file is trusted::

    python -c "from transformers import AutoModel as M; M.from_pretrained('DIR').save_pretrained('DIR-st')"

(``save_pretrained`` writes safetensors by default).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from edgeprune.errors import ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def read_config(model_dir: str | Path) -> dict:
    """``config.json`` of a local checkpoint directory, as a dict, or a one-line error."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelError(f"{model_dir}: no such directory; give a local Hugging Face checkpoint directory")
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: is a file; give the checkpoint's directory (with config.json)")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not UTF-8 text; re-save the checkpoint with save_pretrained") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: invalid JSON (line {exc.lineno}: {exc.msg}); re-save the checkpoint "
                         "with save_pretrained") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise ModelError(f"{path}: no \"model_type\"; re-save the checkpoint with save_pretrained")
    for key in SIZES:
        v, least = cfg.get(key), int(key not in MAY_BE_ZERO)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < least):
            raise ModelError(f"{path}: {key} = {v!r} should be a {'positive' if least else 'non-negative'} integer; "
                             "re-save the checkpoint with save_pretrained")
    return cfg


SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
         "vocab_size", "max_position_embeddings", "num_local_experts", "num_experts", "num_experts_per_tok",
         "moe_intermediate_size", "num_layers", "num_decoder_layers", "d_model", "d_ff", "head_dim")
"""Config sizes that must be positive integers (a string or a negative number fails deep inside transformers)."""
MAY_BE_ZERO = {"head_dim"}
"""Sizes that may be 0: GLM-5-Next's attention has no rotary part, and its config's ``head_dim`` (the rotary
width) is 0."""


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint (every shard of a sharded one), checked to be readable."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index}: not a valid safetensors index (no weight_map); re-save the checkpoint") from None
        files = [inside(model_dir, s, index.name) for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{model_dir}: {len(missing)} shard(s) named in model.safetensors.index.json are "
                             f"missing ({missing[0]}{', ...' if len(missing) > 1 else ''}); copy every shard")
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelError(f"{model_dir}: only pickle weights ({pickles[0]}), which edgeprune does not load "
                             "(unpickling runs code); convert once where the file is trusted: "
                             "AutoModel.from_pretrained(DIR).save_pretrained(NEW_DIR) writes safetensors")
        raise ModelError(f"{model_dir}: no weights (model.safetensors); save the model with save_pretrained")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # SafetensorError, OSError: truncated or not safetensors at all
            raise ModelError(f"{f}: not a readable safetensors file ({str(exc).splitlines()[0][:120]}); "
                             "the file is truncated or corrupt: copy it again") from None
    return files


def inside(folder: str | Path, name, where: str) -> Path:
    """``folder / name`` for a file name read from ``where`` (a file of ``folder``), refused (exit 4) when it is not
    a plain relative path that stays inside ``folder``: an index or a manifest never sends edgeprune elsewhere."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise ModelError(f"{folder / where}: names {name!r}, which is not a file inside {folder}; re-save it")
    path = folder / name
    real, root = path.resolve(), folder.resolve()
    if root not in real.parents:
        raise ModelError(f"{folder / where}: names {name!r}, which lies outside {folder}; re-save it (edgeprune "
                         "reads nothing outside the folder it was given)")
    return path


def check_finite(tensors, where) -> None:
    """Refuse (exit 4, naming the tensor) weights with NaN or infinity: ``tensors`` is ``name -> tensor`` (a
    state dict, or a lazy view of a checkpoint). Measured cost: one pass over the weights (``torch.isfinite``
    on each floating-point tensor's fp32 sum, 12 ms per 100 MB here against 200 ms for ``isfinite`` on every
    element; a NaN or an infinity makes the sum non-finite, and only then, or on an overflow of the sum, is every
    element looked at)."""
    import torch

    for name in list(tensors.keys()):
        t = tensors[name]
        if not (torch.is_tensor(t) and t.is_floating_point() and t.numel()):
            continue
        if bool(torch.isfinite(t.detach().sum(dtype=torch.float32))) or bool(torch.isfinite(t.detach()).all()):
            continue
        bad = "NaN" if bool(torch.isnan(t).any()) else "infinity"
        raise ModelError(f"{where}: tensor {name} holds {bad}; the checkpoint is damaged (re-save or re-train it; "
                         "edgeprune does not prune non-finite weights)")


def torch_dtype(name: Optional[str], config: dict):
    """The dtype to load in: ``--dtype`` or, by default, the checkpoint's own (``torch_dtype`` / ``dtype``)."""
    import torch

    name = name or "auto"
    if name not in DTYPES:
        raise ModelError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    if name == "auto":
        name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def load_checked(model_class, model_dir: str | Path, dtype=None, **kwargs):
    """``model_class.from_pretrained`` from local safetensors only, refusing tensors that do not match the
    config (missing, unexpected or differently shaped weights would otherwise be re-initialised silently)."""
    model_dir = Path(model_dir)
    try:
        model, info = model_class.from_pretrained(model_dir, local_files_only=True, use_safetensors=True,
                                                  trust_remote_code=False, output_loading_info=True,
                                                  **({"dtype": dtype} if dtype is not None else {}), **kwargs)
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        first = str(exc).strip().splitlines()
        detail = next((l.strip() for l in first if "size mismatch" in l), first[0] if first else type(exc).__name__)
        raise ModelError(f"{model_dir}: the weights do not match config.json ({detail[:200]}); is the config the "
                         "one saved with these weights?") from None
    bad = [k for k in info.get("missing_keys", []) if not k.endswith("rotary_emb.inv_freq")]
    if bad or info.get("mismatched_keys"):
        what = (f"{len(bad)} weight(s) missing, e.g. {bad[0]}" if bad
                else f"shape mismatch, e.g. {info['mismatched_keys'][0][0]}")
        raise ModelError(f"{model_dir}: the weights do not match config.json ({what}); they would be "
                         "re-initialised at random. Is the config the one saved with these weights?")
    check_finite(dict(model.named_parameters()), model_dir)
    return model.eval()


META = "edgeprune_original.json"
"""edgeprune's record of an original it built (what it is, how it was trained, its pretrained MoE)."""


def load_meta(model_dir: str | Path) -> dict:
    """The record ``edgeprune_original.json`` of ``model_dir`` ({} for a checkpoint edgeprune did not build)."""
    path = Path(model_dir) / META
    return json.loads(path.read_text()) if path.is_file() else {}
