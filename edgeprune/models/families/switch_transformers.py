"""Switch Transformers (Fedus et al. 2021), encoder-decoder: ``mlp`` of a sparse layer holds ``router.classifier``
(Linear, fp32 ``router_dtype``) and ``experts`` (a ModuleDict ``expert_i``: wi / wo, ReLU); top-1 by the softmax,
weighted by its probability (no renormalisation), and each expert takes at most ``expert_capacity`` tokens per
sequence, in order: tokens past it skip the layer (residual only). Layers are numbered encoder first, then
decoder. Only ``SwitchTransformersForConditionalGeneration`` exists: the checkpoint classifies by label words, the
decoder's first step scoring the verbalisers (:class:`~edgeprune.models.label_words.Seq2SeqLabelWords`).

Calibration counts the router's choice before the capacity cut (the tokens a layer would drop are still the
expert's demand). The export forward is capacity-aware (one-hot, cumulative sum along the sequence, compare), so
it equals the family's forward at every length. One expert (probability exactly 1) folds into T5 with the same
label-word head: exact where no sequence is longer than ``expert_capacity`` (T5 has no capacity); the build's
sequence lengths are the task's (<= 128), the default capacity is 64, so say so in the report when it is not."""
from __future__ import annotations

import torch
from transformers import SwitchTransformersConfig, T5Config
from transformers.models.switch_transformers.modeling_switch_transformers import (SwitchTransformersPreTrainedModel,
                                                                                  SwitchTransformersSparseMLP,
                                                                                  SwitchTransformersStack)
from transformers.models.t5.modeling_t5 import T5PreTrainedModel, T5Stack

from edgeprune.errors import ConfigError
from edgeprune.models.adapter import DenseSibling, MoEAdapter
from edgeprune.models.label_words import seq2seq_classifier_class

CLASSIFIER = seq2seq_classifier_class(SwitchTransformersPreTrainedModel, SwitchTransformersStack,
                                      "SwitchTransformersForSequenceClassification", SwitchTransformersConfig)
T5_CLASSIFIER = seq2seq_classifier_class(T5PreTrainedModel, T5Stack, "T5ForLabelWords")
ROLES = {"wi.weight": "in", "wo.weight": "out"}
T5_KEYS = ("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "relative_attention_num_buckets",
           "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon", "initializer_factor",
           "is_encoder_decoder", "use_cache", "pad_token_id", "eos_token_id", "decoder_start_token_id",
           "tie_word_embeddings", "vocab_size", "num_labels", "id2label", "label2id", "edgeprune_label_words")


class SwitchAdapter(MoEAdapter):
    def block_paths(self, model):
        names = [n for n, m in model.named_modules() if isinstance(m, self.block_class)]
        return dict(enumerate(names))  # encoder then decoder: their own layer numbers overlap

    def router_logits(self, block, x):
        return block.router.classifier(x.to(block.router.dtype))

    def num_experts(self, block):
        return len(block.experts)

    def top_k(self, block):
        return 1

    def route(self, block, logits):
        weight, idx = torch.softmax(logits.float(), dim=-1).max(dim=-1, keepdim=True)
        return idx, weight

    def expert_forward(self, block, e, x):
        return block.experts[f"expert_{e}"](x)

    def expert_tensors(self, state, path, e):
        return {n: state[f"{path}.experts.expert_{e}.{n}"] for n in self.expert_roles}

    def set_expert_tensors(self, state, path, e, tensors):
        for n, t in tensors.items():
            state[f"{path}.experts.expert_{e}.{n}"] = t

    def resize_config(self, config, k_per_layer):
        ks = set(k_per_layer.values())
        if len(ks) != 1:
            raise ConfigError(f"switch_transformers stores one expert count; the plan keeps {sorted(ks)}: use --experts K")
        config.num_experts = ks.pop()

    def export_forward(self, block, hidden):
        """The family's forward without data-dependent indexing: top-1, the capacity cut by a cumulative sum of
        the one-hot choice along the sequence, every expert computed and masked."""
        logits = self.router_logits(block, hidden)
        probs = torch.softmax(logits, dim=-1).to(hidden.dtype)
        weight, idx = probs.max(dim=-1, keepdim=True)
        z = self.num_experts(block)
        onehot = (idx == torch.arange(z)).to(torch.int64)
        keep = (onehot * (onehot.cumsum(dim=-2) <= block.router.expert_capacity)).to(hidden.dtype)
        out = sum(keep[..., e : e + 1] * self.expert_forward(block, e, hidden) for e in range(z))
        return weight * out

    def fold(self, model):
        """T5 with the same label-word head: each sparse layer's one expert becomes the T5 layer's DenseReluDense,
        dense layers map by name, the routers are dropped."""
        if any(self.num_experts(b) != 1 for b in self.blocks(model).values()):
            raise ValueError("fold needs exactly one expert in every MoE layer")
        src_cfg = model.config.to_dict()
        cfg = T5Config(feed_forward_proj=src_cfg["dense_act_fn"], **{k: src_cfg[k] for k in T5_KEYS if k in src_cfg})
        cfg.architectures = [T5_CLASSIFIER.__name__]
        dense = T5_CLASSIFIER(cfg).to(model.dtype)
        src, dst = model.state_dict(), dense.state_dict()
        for key in dst:
            candidates = [key, key.replace(".DenseReluDense.", ".mlp."),
                          key.replace(".DenseReluDense.", ".mlp.experts.expert_0.")]
            found = next((c for c in candidates if c in src), None)
            if found is None or src[found].shape != dst[key].shape:
                raise ValueError(f"fold of switch_transformers: no source for {key}")
            dst[key] = src[found].clone()
        dense.load_state_dict(dst)
        return dense.eval()


ADAPTER = SwitchAdapter(
    model_type="switch_transformers",
    block_class=SwitchTransformersSparseMLP,
    router_attr="router.classifier",
    expert_roles=ROLES,
    num_experts_key="num_experts",
    heads=("seq2seq-lm",),
    autocast_safe=False,  # its sparse MLP writes bf16 expert outputs into an fp32 buffer under autocast
    dense=DenseSibling(T5Config, T5_CLASSIFIER, {"wi.weight": "wi.weight", "wo.weight": "wo.weight"},
                       mlp_path=lambda path: path.replace(".mlp", ".DenseReluDense"),
                       extra_ffn={"modules": lambda m: [n for n, _ in m.named_modules() if n.endswith(".DenseReluDense")],
                                  "in": ("wi",), "out": "wo", "width": "d_ff"}),
    fold_exact="T5 with the label-word head: exact where no sequence exceeds expert_capacity (T5 has no capacity)",
    note="encoder-decoder; layers numbered encoder first, then decoder",
)
