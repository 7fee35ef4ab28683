"""DeepSeek-V4 (``deepseek_v4``): the common fused experts, two routing rules, attention that compresses the sequence.

Experts: ``DeepseekV4Experts`` on the common layout (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) with a
clamped SwiGLU (``_apply_gate``: ``silu(min(g, L)) * clamp(u, -L, L)``, L = ``swiglu_limit``), which the shared
dense dispatch calls. A shared expert beside them. Routing differs by layer (``config.mlp_layer_types``):

* ``moe``: ``DeepseekV4TopKRouter``, scores s = sqrt(softplus(W x)), top-k of s + a correction bias, weights
  s_i / sum_k s_k times ``routed_scaling_factor``: the router's own forward, as for every fused family;
* ``hash_moe`` (the first layers, DeepSeek-V4 paper section 2.1): ``DeepseekV4HashRouter`` picks the experts by a
  frozen token-id table, ``tid2eid[input_ids]`` [V, top-k], and weights them with the same normalised scores. The
  choice reads the input ids, so calibration records them beside the block's input (``routing_kwargs``) and
  calls the router with them.

Pruning a hash layer rewrites its table (:func:`remap_table`): an entry naming a kept expert names its new index;
an entry naming a dropped expert goes to the kept expert whose router row is closest to the dropped one's (cosine),
so the tokens hashed to it go where the learnt router sees the most similar expert; a merged expert's members all
name the merged one. When k <= top-k every token takes every kept expert, as a top-k router then does. A plan
that keeps every expert leaves the table as it is (exact). Rows with a repeated expert (a freshly initialised table
is all zeros) count that expert once per entry, as the family's expert loop does, and so does the shared dense
dispatch of the export (:func:`edgeprune.models.fused.dense_dispatch` sums one-hot rows).

Export: the compressed attentions (CSA and HCA) compress whole windows of ``compress_rate`` tokens and branch on the
sequence length in Python, so the graph is traced at one shape (``fixed_shapes``: batch 1 x the task's maximum
length, right padding, which a causal window never reads before the real tokens end). Run-time top-k is off (a
hash layer's k is its table's width). No dense sibling: one expert keeps the class.

Ties in the CSA indexer: its scores are sums of ReLUs, exactly 0 for many entries of a small or random model, and
which of equal scores ``topk`` keeps is unspecified: PyTorch's CPU ``topk`` picks by its partition (neither the lower
nor the higher index), ONNX Runtime's ``TopK`` the lower index. A CSA graph then differed from PyTorch by 2e-3 on a
tiny checkpoint, and PyTorch from itself between a padded and an unpadded input. Importing this module makes the
indexer's top-k stable, in PyTorch and in the traced graph alike (:func:`stable_indexer`: a stable descending sort,
lower index first among equals, the rule of ONNX's TopK): the same entries as before wherever scores differ, and one
fixed choice among equal ones. Measured on the tiny checkpoints (tests/test_deepseek_v4.py): export parity 1e-7.
"""
from __future__ import annotations

import functools
from unittest import mock

import numpy as np
import torch
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as modeling
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4PreTrainedModel

from edgeprune.errors import ConfigError
from edgeprune.models.fused import FusedAdapter, fused_family
from edgeprune.models.label_words import classifier_class

CLASSIFIER = classifier_class(DeepseekV4Config, DeepseekV4PreTrainedModel, "DeepseekV4ForSequenceClassification")


_TOPK = torch.Tensor.topk


def stable_topk(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """``Tensor.topk`` with ties kept in index order: a stable sort, then the first ``k``. While tracing, ``topk``
    itself: it becomes ONNX TopK, whose rule for equal elements is the same (the lower index first)."""
    if torch.jit.is_tracing():
        return _TOPK(x, k, dim=dim, largest=largest, sorted=sorted)
    values, indices = torch.sort(x, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


def stable_indexer(forward):
    """The CSA indexer's forward with :func:`stable_topk` for its ``topk`` (see the module docstring)."""
    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        with mock.patch.object(torch.Tensor, "topk", stable_topk):
            return forward(self, *args, **kwargs)
    wrapped.edgeprune_stable = True
    return wrapped


if not getattr(modeling.DeepseekV4Indexer.forward, "edgeprune_stable", False):
    modeling.DeepseekV4Indexer.forward = stable_indexer(modeling.DeepseekV4Indexer.forward)


def remap_table(table: torch.Tensor, groups: list, old_rows: torch.Tensor, new_rows: torch.Tensor,
                width: int) -> torch.Tensor:
    """The hash table [V, top-k] of old expert ids rewritten for the plan's ``groups`` (new expert j = the old
    experts of ``groups[j]``), ``width`` columns (the pruned top-k); see the module docstring."""
    k = len(groups)
    if width == k:  # k <= top-k: every token takes every kept expert
        return torch.arange(k, dtype=table.dtype).expand(table.shape[0], k).clone()
    home = np.full(old_rows.shape[0], -1)
    for j, group in enumerate(groups):
        for e, _ in group:
            home[e] = j
    a = torch.nn.functional.normalize(old_rows.double(), dim=-1)
    b = torch.nn.functional.normalize(new_rows.double(), dim=-1)
    nearest = (a @ b.T).argmax(dim=-1).numpy()
    home = np.where(home >= 0, home, nearest)
    return torch.from_numpy(home[table.numpy()][:, :width]).to(table.dtype)


class DeepseekV4Adapter(FusedAdapter):
    routing_kwargs = ("input_ids",)

    def routing(self, block, x, input_ids=None):
        if block.is_hash:
            if input_ids is None or input_ids.numel() != x.shape[0]:
                raise ConfigError(f"{self.model_type}: a hash-routed layer picks experts by the input ids, which this "
                                  "pass does not record (layer-wise calibration); score it in memory")
            logits, weight, idx = block.gate(x, input_ids.reshape(-1))
        else:
            logits, weight, idx = block.gate(x)
        return logits.float(), idx, weight.float()

    def one_expert_weight(self, block, hidden, weight):
        """No 0/0 to guard: both routers divide by ``sum + 1e-20`` (and the hash router cannot be called without
        input ids, which the shared guard's zero-vector call does not have)."""
        return weight

    def prune_layer_state(self, src, dst, path, lp):
        """The hash layer's token table follows the plan (:func:`remap_table`)."""
        key = f"{path}.{self.router_attr}.tid2eid"
        if key in dst:
            rows = f"{path}.{self.router_attr}.weight"
            dst[key] = remap_table(src[key], lp.groups, src[rows], dst[rows], dst[key].shape[1])


ADAPTER = fused_family(
    "deepseek_v4", num_experts_key="n_routed_experts", cls=DeepseekV4Adapter, heads=("causal-lm",),
    runtime_top_k=False, fixed_shapes="compressed attention (windows of compress_rate tokens, branches on the length)",
    fold_exact="no sibling: keeps its class with one expert per layer (a hash layer's table then names it for every "
               "token)",
    note="transformers 5 family: hash-routed first layers (token-id table remapped when pruning), compressed "
         "attention exported at one shape",
)
