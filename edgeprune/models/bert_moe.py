"""BERT-MoE: a BERT whose FFNs in chosen layers are Switch-style mixtures of experts.

Hugging Face form (``model_type = "bert_moe"``): :class:`BertMoeConfig`, :class:`BertMoeModel` and
:class:`BertMoeForSequenceClassification` save and load with ``save_pretrained`` / ``from_pretrained`` from a
local directory (safetensors) once ``edgeprune`` is imported; no remote code.

Routing (Fedus et al. 2022, Switch Transformers): router logits h(x) = W x (no bias), gate g = softmax(h).
Top-1 (default) sends each token to argmax g and scales the expert output by g_top (so the router gets a
gradient); top-k > 1 renormalises the k largest gates to sum to one (Mixtral convention).
Auxiliary losses, computed over non-padding tokens only:

* load balancing (Switch eq. 4): L_aux = Z * sum_e f_e * P_e, f_e = share of tokens whose top-1 is e,
  P_e = mean gate of e;
* router z-loss (Zoph et al. 2022, ST-MoE eq. 5): L_z = mean_t (logsumexp_e h_e(x_t))^2.

Experts may differ in number per layer (``num_experts_per_layer``): a pruned model keeps k of Z.
A layer with one expert has gate exactly 1 and is a plain FFN; :mod:`edgeprune.pruning.fold` turns a
model whose every MoE layer has one expert into ``BertForSequenceClassification``.

The block gathers the tokens of each expert (training and inference in PyTorch). ``torch.onnx.export`` of
data-dependent gathers fails (DESIGN.md section 2): the export runs the family adapter's dense dispatch
instead (:meth:`edgeprune.models.adapter.MoEAdapter.export_patch`), as for every family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, BertConfig
from transformers.activations import ACT2FN
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertLayer, BertModel, BertPreTrainedModel


class BertMoeConfig(BertConfig):
    """BERT config plus the MoE fields.

    Args:
        moe_layers: indices of the layers whose FFN is an MoE (default: every other layer, 1, 3, 5, ...:
            the Switch Transformer convention).
        num_experts: experts per MoE layer Z (default 8).
        num_experts_per_layer: per-MoE-layer expert counts, aligned with ``moe_layers`` (set by pruning);
            defaults to ``num_experts`` everywhere.
        num_experts_per_tok: experts each token is routed to, top-k (1 = Switch; Mixtral naming).
        router_aux_loss_coef: weight of the load-balancing loss (Switch: 0.01).
        router_z_loss_coef: weight of the router z-loss (ST-MoE: 0.001).
        router_jitter: multiplicative input jitter during training (Switch: 0.01; 0 disables).
    """

    model_type = "bert_moe"

    def __init__(self, moe_layers: Optional[list[int]] = None, num_experts: int = 8,
                 num_experts_per_layer: Optional[list[int]] = None, num_experts_per_tok: int = 1,
                 router_aux_loss_coef: float = 0.01, router_z_loss_coef: float = 0.001,
                 router_jitter: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if moe_layers is None:
            moe_layers = list(range(1, self.num_hidden_layers, 2))
        self.moe_layers = [int(i) for i in moe_layers]
        self.num_experts = int(num_experts)
        if num_experts_per_layer is None:
            num_experts_per_layer = [self.num_experts] * len(self.moe_layers)
        self.num_experts_per_layer = [int(z) for z in num_experts_per_layer]
        self.num_experts_per_tok = int(num_experts_per_tok)
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.router_jitter = router_jitter
        if len(self.num_experts_per_layer) != len(self.moe_layers):
            raise ValueError("num_experts_per_layer must have one entry per MoE layer")
        if any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
            raise ValueError(f"moe_layers {self.moe_layers} out of range for {self.num_hidden_layers} layers")

    def experts_in(self, layer_idx: int) -> int:
        """Number of experts of layer ``layer_idx`` (0 for a dense layer)."""
        if layer_idx not in self.moe_layers:
            return 0
        return self.num_experts_per_layer[self.moe_layers.index(layer_idx)]


class BertMoeExpert(nn.Module):
    """One FFN expert, shaped like BERT's: ``w_in`` (H -> I), activation, ``w_out`` (I -> H)."""

    def __init__(self, config: BertMoeConfig):
        super().__init__()
        self.w_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(self.act(self.w_in(x)))


@dataclass
class RoutingRecord:
    """What one MoE layer saw in its last forward (flattened over batch x sequence)."""

    router_logits: torch.Tensor  # (T, Z), float32
    top_idx: torch.Tensor  # (T, k)
    top_gate: torch.Tensor  # (T, k) weights the expert outputs were combined with
    expert_out_norm: Optional[torch.Tensor] = None  # (T, k) ||E_j(x)||_2 of the routed experts (REAP)


class BertMoeBlock(nn.Module):
    """Router plus experts (see the module docstring for the routing equations)."""

    def __init__(self, config: BertMoeConfig, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = min(config.num_experts_per_tok, num_experts)
        self.jitter = config.router_jitter
        self.router = nn.Linear(config.hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(BertMoeExpert(config) for _ in range(num_experts))
        self.record_expert_norms = False
        self.last: Optional[RoutingRecord] = None
        # Experts dropped during fine-tuning (Chen et al. 2022) get no tokens and no gradient.
        self.register_buffer("alive", torch.ones(num_experts, dtype=torch.bool), persistent=False)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (float32), top-k indices and their combination weights."""
        if self.training and self.jitter > 0:
            flat = flat * torch.empty_like(flat).uniform_(1 - self.jitter, 1 + self.jitter)
        logits = self.router(flat).float()
        if not bool(self.alive.all()):
            logits = logits.masked_fill(~self.alive, float("-inf"))
        probs = logits.softmax(dim=-1)
        top_gate, top_idx = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            top_gate = top_gate / top_gate.sum(dim=-1, keepdim=True)
        return logits, top_idx, top_gate

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])
        logits, top_idx, top_gate = self.route(flat)
        out = torch.zeros_like(flat)
        norms = torch.zeros_like(top_gate) if self.record_expert_norms else None
        for e, expert in enumerate(self.experts):
            tok, slot = (top_idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            y = expert(flat[tok])
            if norms is not None:
                norms[tok, slot] = y.float().norm(dim=-1)
            out.index_add_(0, tok, (y * top_gate[tok, slot].unsqueeze(-1).to(y.dtype)).to(out.dtype))
        self.last = RoutingRecord(logits, top_idx, top_gate, norms)
        return out.reshape(shape)


class BertMoeOutput(nn.Module):
    """Residual + LayerNorm after the MoE (BERT's ``BertOutput`` without its dense layer)."""

    def __init__(self, config: BertMoeConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, ffn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(ffn_out) + residual)


class BertMoeLayer(BertLayer):
    """A BERT layer whose FFN is a :class:`BertMoeBlock`."""

    def __init__(self, config: BertMoeConfig, layer_idx: int):
        super().__init__(config, layer_idx=layer_idx)
        del self.intermediate
        self.output = BertMoeOutput(config)
        self.moe = BertMoeBlock(config, config.experts_in(layer_idx))

    def feed_forward_chunk(self, attention_output: torch.Tensor) -> torch.Tensor:
        return self.output(self.moe(attention_output), attention_output)


class BertMoePreTrainedModel(BertPreTrainedModel):
    config_class = BertMoeConfig

    def _init_weights(self, module):
        """BERT's, and every expert alive: transformers 5 builds a model on the meta device and fills what is not in
        the checkpoint here (a non-persistent buffer left out would be uninitialised memory)."""
        super()._init_weights(module)
        if isinstance(module, BertMoeBlock):
            with torch.no_grad():
                module.alive.fill_(True)


class BertMoeModel(BertMoePreTrainedModel, BertModel):
    """``BertModel`` with :class:`BertMoeLayer` at ``config.moe_layers``."""

    def __init__(self, config: BertMoeConfig, add_pooling_layer: bool = True):
        BertModel.__init__(self, config, add_pooling_layer=add_pooling_layer)
        for i in config.moe_layers:
            self.encoder.layer[i] = BertMoeLayer(config, i)
        self.post_init()

    def moe_blocks(self) -> dict[int, BertMoeBlock]:
        return {i: self.encoder.layer[i].moe for i in self.config.moe_layers}


def router_losses(records: list[RoutingRecord], mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch load-balancing loss and ST-MoE z-loss, averaged over MoE layers, non-padding tokens only."""
    lb, z = [], []
    for rec in records:
        logits = rec.router_logits
        keep = mask.reshape(-1).bool() if mask is not None else torch.ones(logits.shape[0], dtype=torch.bool,
                                                                           device=logits.device)
        logits = logits[keep]
        n_exp = logits.shape[-1]
        if n_exp == 1 or logits.shape[0] == 0:
            continue
        probs = logits.softmax(-1)
        f = F.one_hot(rec.top_idx[keep][:, 0], n_exp).float().mean(0)
        lb.append(n_exp * (f * probs.mean(0)).sum())
        z.append(torch.logsumexp(logits, dim=-1).pow(2).mean())
    zero = torch.zeros(())
    return (torch.stack(lb).mean() if lb else zero), (torch.stack(z).mean() if z else zero)


@dataclass
class MoeSequenceClassifierOutput(SequenceClassifierOutput):
    aux_loss: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None


class BertMoeForSequenceClassification(BertMoePreTrainedModel):
    """Sequence classifier on :class:`BertMoeModel`, laid out like ``BertForSequenceClassification``."""

    def __init__(self, config: BertMoeConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertMoeModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def moe_blocks(self) -> dict[int, BertMoeBlock]:
        """MoE blocks by layer index: the one accessor pruning, hooks and export use."""
        return self.bert.moe_blocks()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        outputs = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            return_dict=True)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = aux = zl = None
        if labels is not None:
            records = [b.last for b in self.moe_blocks().values() if b.last is not None]
            aux, zl = router_losses(records, attention_mask)
            loss = (F.cross_entropy(logits.float(), labels) + self.config.router_aux_loss_coef * aux
                    + self.config.router_z_loss_coef * zl)
        return MoeSequenceClassifierOutput(loss=loss, logits=logits, aux_loss=aux, z_loss=zl)


AutoConfig.register("bert_moe", BertMoeConfig)
AutoModel.register(BertMoeConfig, BertMoeModel)
AutoModelForSequenceClassification.register(BertMoeConfig, BertMoeForSequenceClassification)
