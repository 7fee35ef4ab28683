"""transformers 5 MoE families on the common fused layout, one row of data each (:func:`~edgeprune.models.fused.fused_family`).

A row names what differs from the common case: the router's attribute (``gate`` unless ``router``) and the block
attributes the router takes after the hidden states (``router_args``: a score-correction bias kept on the block).
The rest is read from transformers when the row is registered: the config key that holds the expert count (the
one of ``EXPERT_KEYS`` the config class serialises), the group-limit keys where the config has them, and, where
transformers has only a causal LM for the family, a label-word classifier class
(:func:`edgeprune.models.label_words.classifier_class`). None of these families has a dense sibling in
transformers: k = 1 keeps the family's class with one expert per layer.

Families whose layout is not the common one have a file of their own (gpt_oss, switch_transformers, llama4, the
DeepSeek-style folds); the MoE model types of transformers that are not supported are in ``refused.py`` with the
reason (``edgeprune families`` lists both). Rows may also say: ``cls`` (a subclass with code beside the data),
``layout`` (the experts' storage flags), ``top_k_key`` (the config key of top-k), ``router_3d`` (the router reads
(batch, seq, hidden)), ``check_k`` (a k the router cannot route: ``group_top2``), ``fixed_shapes`` (what traces only
at one shape: the build exports at batch 1 x the task's maximum length).
"""
from __future__ import annotations

import importlib

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from edgeprune.models.families.gemma4 import Gemma4Adapter
from edgeprune.models.families.llama4 import LAYOUT as LLAMA4_LAYOUT, Llama4Adapter
from edgeprune.models.families.muse_spark import MuseSparkAdapter
from edgeprune.models.fused import NeedsTwo, fused_family
from edgeprune.models.label_words import classifier_class

EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")

# DeepSeek-style group routers score a group by its top-2 experts: one expert cannot be routed (the exported graph
# fails on it, top-2 of one); their weight is a sigmoid, not constant, either
group_top2 = NeedsTwo("routes by group top-2 scores and cannot keep one expert per layer",
                      "group top-2 routing needs two experts")
# Jamba builds a dense MLP where its config says one expert (num_experts == 1): a one-expert checkpoint is that
# MLP, a fold edgeprune does not write yet
no_one_expert_layer = NeedsTwo("with one expert per layer is its dense MLP in transformers (a fold not done yet) and "
                               "cannot keep one expert as an MoE",
                               "one expert is the family's dense MLP: fold not done yet")


ROWS: dict[str, dict] = {
    "afmoe": dict(router_attr="router", router_args=("expert_bias",), router_3d=True),
    "aria_text": dict(router_attr="router", top_k_key="moe_topk", layout=dict(is_transposed=True)),
    "axk1": dict(check_k=group_top2),
    "axk2": dict(check_k=group_top2),
    "bailing_hybrid": dict(check_k=group_top2),
    "beam": dict(check_k=group_top2),
    "cohere2_moe": {},
    "deepseek_v32": dict(check_k=group_top2),
    "dots1": dict(check_k=group_top2),
    "exaone_moe": dict(check_k=group_top2),
    "ernie4_5_moe": {},
    "flex_olmo": {},
    "flint": {},
    "gemma4_text": dict(cls=Gemma4Adapter, router_attr="router", top_k_key="top_k_experts"),
    "glm4_moe_lite": dict(check_k=group_top2),
    "glm4v_moe_text": dict(check_k=group_top2),
    "glm_moe_dsa": dict(check_k=group_top2),
    "granitemoe_swa": dict(router_attr="router"),
    "granitemoehybrid": dict(router_attr="router", fixed_shapes="Mamba layers"),
    "hunyuan_v1_moe": {},
    "hy_v3": dict(router_args=("e_score_correction_bias",)),
    "hy_v4": dict(check_k=group_top2),
    "hy_v4_vl_text": dict(check_k=group_top2),
    "inkling_text": {},
    "inkling2_text": {},
    "inkling2_loop_text": {},
    "jamba": dict(router_attr="router", fixed_shapes="Mamba layers", check_k=no_one_expert_layer),
    "kimi_linear": dict(check_k=group_top2),
    "kolibri1": {},
    "laguna": {},
    "lara_mini": {},
    "lfm2_moe": dict(router_args=("expert_bias",)),
    "llama4_text": dict(cls=Llama4Adapter, router_attr="router", layout=LLAMA4_LAYOUT),
    "mellum": {},
    "mimo_v2_flash": dict(check_k=group_top2),
    "minicpm5_moe": dict(check_k=group_top2),
    "minimax": {},
    "minimax_m2": dict(router_args=("e_score_correction_bias",)),
    "minimax_m3_vl_text": {},
    "mistral4": dict(check_k=group_top2),
    "muse_spark_text": dict(cls=MuseSparkAdapter),
    "nemotron_h": dict(layout=dict(has_gate=False), check_k=group_top2, fixed_shapes="Mamba layers"),
    "qwen3_5_moe_text": {},
    "qwen3_next": {},
    "qwen3_vl_moe_text": {},
    "mistral_large4_text": dict(check_k=group_top2),
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
    if isinstance(row.get("check_k"), NeedsTwo):
        kw["fold_exact"] = f"k = 1 refused ({row['check_k'].fold}); k >= 2 keeps its class"
    if type(config) not in AutoModelForSequenceClassification._model_mapping:
        label_word_class(config)
        kw["heads"] = ("causal-lm",)
    return fused_family(model_type, **{**kw, **row})


def label_word_class(config) -> type:
    """A label-word classifier class for a family that transformers gives only a causal LM, or (the text model of a
    multimodal family) only a base model: transformers' ``GenericForSequenceClassification`` over the family's
    base model, registered for its config class."""
    lm = AutoModelForCausalLM._model_mapping.get(type(config), None)
    module = importlib.import_module((lm or type(config)).__module__.replace(".configuration_", ".modeling_"))
    pretrained = next(v for n, v in vars(module).items() if n.endswith("PreTrainedModel") and isinstance(v, type)
                      and not any(w in n for w in ("Vision", "Audio")))
    name = (lm.__name__.replace("ForCausalLM", "") if lm else type(config).__name__.removesuffix("Config"))
    return classifier_class(type(config), pretrained, name + "ForSequenceClassification")


ADAPTERS = [row_adapter(mt, row) for mt, row in ROWS.items()]
