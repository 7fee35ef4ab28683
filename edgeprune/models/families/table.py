"""transformers 5 MoE families on the common fused layout, one row of data each (:func:`~edgeprune.models.fused.fused_family`).

A row names what differs from the common case: the router's attribute (``gate`` unless ``router``) and the block
attributes the router takes after the hidden states (``router_args``: a score-correction bias kept on the block).
The rest is read from transformers when the row is registered: the config key that holds the expert count (the
one of ``EXPERT_KEYS`` the config class serialises), the group-limit keys where the config has them, and, where
transformers has only a causal LM for the family, a label-word classifier class
(:func:`edgeprune.models.label_words.classifier_class`). None of these families has a dense sibling in
transformers: k = 1 keeps the family's class with one expert per layer.

Families whose layout is not the common one have a file of their own (gpt_oss, switch_transformers, the
DeepSeek-style folds); families not listed here or there are refused with the reason (``edgeprune families``).
Probed and left out for now: afmoe (its router call fails in calibration), kolibri1_1 (``index_layers`` does not
follow two layers), laguna (per-layer head counts), cohere2_moe and ernie4_5_moe (ONNX Runtime cannot load their
exported graph), lara_mini (``linalg_solve_triangular`` has no ONNX export), and the hybrid / latent-attention families whose tiny configs
need more than the common keys (qwen3_5_moe, qwen3_next, nemotron_h, kimi_linear, granitemoehybrid, mistral4,
glm4_moe_lite, deepseek_v32, longcat_flash, ...).
"""
from __future__ import annotations

import importlib

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from edgeprune.models.fused import fused_family
from edgeprune.models.label_words import classifier_class

EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")

def group_top2(adapter, block, k):
    """DeepSeek-style group routers score a group by its top-2 experts: one expert cannot be routed (the exported
    graph fails on it, top-2 of one); their weight is a sigmoid, not constant, either."""
    if k < 2:
        from edgeprune.errors import ConfigError

        raise ConfigError(f"{adapter.model_type} routes by group top-2 scores and cannot keep one expert per layer; "
                          "use --experts 2 or more")


ROWS: dict[str, dict] = {
    "dots1": dict(check_k=group_top2),
    "exaone_moe": dict(check_k=group_top2),
    "flex_olmo": {},
    "flint": {},
    "granitemoe_swa": dict(router_attr="router"),
    "hunyuan_v1_moe": {},
    "hy_v3": dict(router_args=("e_score_correction_bias",)),
    "kolibri1": {},
    "mellum": {},
    "mimo_v2_flash": dict(check_k=group_top2),
    "minicpm5_moe": dict(check_k=group_top2),
    "minimax": {},
    "minimax_m2": dict(router_args=("e_score_correction_bias",)),
    "solar_open": dict(check_k=group_top2),
}


def row_adapter(model_type: str, row: dict):
    """The adapter of one row, with what transformers says about the family filled in."""
    config = AutoConfig.for_model(model_type)
    saved = config.to_dict()
    key = next((k for k in EXPERT_KEYS if k in saved), None)
    if key is None:
        raise RuntimeError(f"{model_type}: no expert count among {EXPERT_KEYS} in its config")
    groups = tuple(k for k in ("n_group", "topk_group") if k in saved)
    kw = dict(num_experts_key=key, group_keys=groups, note="transformers 5 family (models/families/table.py)",
              fold_exact="no sibling: keeps its class with one expert per layer")
    if row.get("check_k") is group_top2:
        kw["fold_exact"] = "k = 1 refused (group top-2 routing needs two experts); k >= 2 keeps its class"
    if type(config) not in AutoModelForSequenceClassification._model_mapping:
        lm = AutoModelForCausalLM._model_mapping[type(config)]
        module = importlib.import_module(lm.__module__)
        pretrained = next(v for n, v in vars(module).items() if n.endswith("PreTrainedModel") and isinstance(v, type))
        classifier_class(type(config), pretrained, lm.__name__.replace("ForCausalLM", "ForSequenceClassification"))
        kw["heads"] = ("causal-lm",)
    return fused_family(model_type, **{**kw, **row})


ADAPTERS = [row_adapter(mt, row) for mt, row in ROWS.items()]
