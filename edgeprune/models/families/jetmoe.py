"""JetMoE (Shen et al. 2024, arXiv 2404.07413): an MoE MLP and a mixture of attention heads (MoA) in every layer.

The MLP (``JetMoeMoE``, the block): a router ``router.layer`` (Linear E x H), top-k on the logits then softmax over
the k chosen, experts stored as ``JetMoeParallelExperts``: ``input_linear.weight`` [E, 2I, H] (gate rows then up
rows) and ``output_linear.weight`` [E, H, I], expert e = ``W_out,e (act(W_gate,e x) * W_up,e x)``, and one bias
added after the weighted sum (shared by every expert: it stays).

The MoA (``self_attention.experts``, a companion of the block): E experts of query and output projections
(``input_linear.weight`` [E, D, H], ``output_linear.weight`` [E, H, D], D = kv_channels x num_key_value_heads), its
own router with the same rule; the top-k experts' queries attend over one shared key/value projection, and the
outputs are summed with the routing weights. The MLP and the MoA share the config's expert count and top-k
(``num_local_experts``, ``num_experts_per_tok``; ``num_attention_heads`` = kv heads x top-k), so pruning the MLP to k
experts prunes the MoA to k: the MoA keeps the k experts with the largest routing mass sum_t w_e(x_t) on the same
calibration tokens (Chen et al. 2022's frequency criterion, weighted by the gate), recorded in the plan's
``companions`` whatever the method that chose the MLP experts. At k = 1 both routers have one choice of weight
exactly 1 (softmax over one logit): attention with num_key_value_heads plain heads and a dense GLU MLP plus its
bias. transformers has no dense sibling: one expert keeps the class.

Export: both routers call ``.tolist()`` and split by expert counts (no ONNX trace); the MLP runs the adapter's
dense dispatch (its bias as the block's shared term) and the MoA's ``map`` / ``reduce`` run :func:`moa_map` / :func:`moa_reduce`, every expert's
projection computed and combined with exact zeros off the top-k (equal to JetMoE's sums in fp32).
"""
from __future__ import annotations

import contextlib

import torch
from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoE

from edgeprune.errors import ConfigError
from edgeprune.models.adapter import MoEAdapter, topk_then_softmax

ROLES = {"gate": "in", "up": "in", "down": "out"}
MOA = "attention"  # the companion's name in plans and statistics


def moa_path(block_path: str) -> str:
    return block_path.rsplit(".mlp", 1)[0] + ".self_attention.experts"


class JetMoeAdapter(MoEAdapter):
    def num_experts(self, block):
        return int(block.input_linear.weight.shape[0])

    def top_k(self, block):
        return min(int(block.router.top_k), self.num_experts(block))

    def route(self, block, logits):
        return topk_then_softmax(logits, self.top_k(block))

    def expert_forward(self, block, e, x):
        gate, up = torch.nn.functional.linear(x, block.input_linear.weight[e]).chunk(2, dim=-1)
        return torch.nn.functional.linear(block.activation(gate) * up, block.output_linear.weight[e])

    def shared_forward(self, block, x):
        return block.bias  # the one output bias every token gets after the weighted sum

    def block_output(self, out, logits):
        return out  # JetMoeMoE returns the hidden states alone

    # -- state ----------------------------------------------------------------------------------------------
    def expert_tensors(self, state, path, e):
        w_in = state[f"{path}.input_linear.weight"][e]
        half = w_in.shape[0] // 2
        return {"gate": w_in[:half], "up": w_in[half:], "down": state[f"{path}.output_linear.weight"][e]}

    def set_expert_tensors(self, state, path, e, tensors):
        state[f"{path}.input_linear.weight"][e] = torch.cat([tensors["gate"], tensors["up"]])
        state[f"{path}.output_linear.weight"][e] = tensors["down"]

    def router_keys(self, model, layer):
        return [f"{self.block_paths(model)[layer]}.router.layer.weight"]

    # -- the MoA: a companion expert set with the block's expert count ----------------------------------------
    def companions(self, model, block_path):
        router = model.get_submodule(moa_path(block_path)).router
        return {MOA: (router.layer, lambda logits: topk_then_softmax(logits, min(router.top_k, logits.shape[-1])))}

    def prune_layer_state(self, src, dst, path, lp):
        moa = moa_path(path)
        keep = lp.companions.get(MOA)
        if keep is None:
            if lp.k == lp.num_experts:
                keep = list(range(lp.k))  # every expert kept
            else:
                raise ConfigError("jetmoe: the plan does not say which attention (MoA) experts to keep; make it with "
                                  "`edgeprune score` (its in-memory calibration records the MoA's routing; the "
                                  "layer-wise path and progressive dropping do not yet)")
        if len(keep) != lp.k:
            raise ConfigError(f"jetmoe layer {lp.layer}: the plan keeps {lp.k} experts but {len(keep)} attention "
                              "(MoA) experts; they share one expert count: keep as many of each")
        idx = torch.tensor(keep)
        for name in ("input_linear.weight", "output_linear.weight", "router.layer.weight"):
            dst[f"{moa}.{name}"] = src[f"{moa}.{name}"][idx].clone()

    def resize_config(self, config, k_per_layer):
        super().resize_config(config, k_per_layer)
        config.num_attention_heads = config.num_key_value_heads * config.num_experts_per_tok

    @contextlib.contextmanager
    def export_patch(self, model):
        moas = [model.get_submodule(moa_path(p)) for p in self.block_paths(model).values()]
        try:
            for m in moas:
                m.map = (lambda mod: (lambda x: moa_map(mod, x)))(m)
                m.reduce = (lambda mod: (lambda a, topo: moa_reduce(mod, a, topo)))(m)
            with super().export_patch(model):
                yield model
        finally:
            for m in moas:
                m.__dict__.pop("map", None)
                m.__dict__.pop("reduce", None)


def moa_map(moa, x):
    """JetMoeMoA.map without data-dependent shapes: every expert's queries, the top-k chosen by one-hot sums.
    Returns ``(queries (B, L, k, D), router logits, (index, weight))``."""
    bsz, length, h = x.shape
    flat = x.reshape(-1, h)
    logits = moa.router.layer(flat)
    z, k = moa.input_linear.weight.shape[0], min(moa.top_k, moa.input_linear.weight.shape[0])
    idx, weight = topk_then_softmax(logits, k)
    if z == 1:
        q = torch.nn.functional.linear(flat, moa.input_linear.weight[0])[:, None]
    else:
        hot = torch.nn.functional.one_hot(idx, z).to(flat.dtype)  # (T, k, Z)
        q = sum(hot[:, :, e: e + 1] * torch.nn.functional.linear(flat, moa.input_linear.weight[e])[:, None]
                for e in range(z))
    return q.reshape(bsz, length, k, -1), logits, (idx, weight)


def moa_reduce(moa, a, topo):
    """JetMoeMoA.reduce as dense dispatch: slot j's output through expert idx_j, times its weight, summed."""
    bsz, length, k, d = a.shape
    idx, weight = topo
    slots = a.reshape(-1, k, d)
    z = moa.output_linear.weight.shape[0]
    if z == 1:
        out = torch.nn.functional.linear(slots[:, 0], moa.output_linear.weight[0]) * weight[:, :1].to(a.dtype)
    else:
        w = torch.nn.functional.one_hot(idx, z).to(a.dtype) * weight[:, :, None].to(a.dtype)  # (T, k, Z)
        out = sum(torch.nn.functional.linear((w[:, :, e: e + 1] * slots).sum(1), moa.output_linear.weight[e])
                  for e in range(z))
    return out.reshape(bsz, length, -1) + moa.bias


ADAPTER = JetMoeAdapter(model_type="jetmoe", block_class=JetMoeMoE, router_attr="router.layer", expert_roles=ROLES,
                        num_experts_key="num_local_experts", top_k_key="num_experts_per_tok",
                        fold_exact="no sibling: keeps its class with one expert per layer (MLP and MoA)",
                        runtime_top_k=False,  # its attention's head count is top-k x kv heads: fixed in the graph
                        note="MoE MLP plus a mixture of attention heads pruned to the same k "
                             "(models/families/jetmoe.py)")
