"""JetMoE: its attention experts (MoA) are pruned with its MLP experts to the same k (models/families/jetmoe.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgeprune.errors import ConfigError
from edgeprune.models.families.jetmoe import MOA, moa_path
from edgeprune.models.registry import adapter_for
from edgeprune.pruning.apply import apply_plan
from edgeprune.pruning.calibration import collect_routing
from edgeprune.pruning.plan import LayerPlan, PrunePlan, make_plan
from edgeprune.tasks.encoding import Encoded
from tests.test_table_families import BUILT

X = {"input_ids": torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(1)),
     "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5])}


@pytest.fixture(scope="module")
def model():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model("jetmoe", **BUILT["jetmoe"], vocab_size=100, num_labels=2)
    m = AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("router.layer.weight"):
                p.normal_(0, 1.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return m


def plan(model, mlp: list[int], moa: list[int] | None) -> PrunePlan:
    adapter = adapter_for(model.config)
    return PrunePlan("manual", [LayerPlan(l, 4, [0.0] * 4, [[(e, 1.0)] for e in mlp], 1.0,
                                          {MOA: moa} if moa is not None else {})
                                for l in adapter.blocks(model)])


@torch.no_grad()
def masked_logits(model, mlp: list[int], moa: list[int]) -> torch.Tensor:
    """The original with the dropped experts' logits of both routers set to -inf (JetMoE's rule unchanged)."""
    adapter = adapter_for(model.config)
    paths = adapter.block_paths(model).values()
    drop = {model.get_submodule(f"{p}.router.layer").weight.data_ptr(): torch.tensor([e not in mlp for e in range(4)])
            for p in paths}
    drop.update({model.get_submodule(f"{moa_path(p)}.router.layer").weight.data_ptr():
                 torch.tensor([e not in moa for e in range(4)]) for p in paths})
    linear = F.linear

    def masked(x, w, *a, **kw):
        out = linear(x, w, *a, **kw)
        return out.masked_fill(drop[w.data_ptr()], float("-inf")) if w.data_ptr() in drop else out

    F.linear = masked
    try:
        return model(**X).logits
    finally:
        F.linear = linear


def test_pruning_mlp_and_attention_experts_is_the_original_with_their_routers_masked(model):
    """k = 2 of 4, the MoA keeping other experts than the MLP: equal to the original whose two routers never pick
    the dropped experts (atol 1e-6: the sums run in another order)."""
    pruned = apply_plan(model, plan(model, [1, 3], [0, 2]))
    assert pruned.config.num_local_experts == 2 and pruned.config.num_attention_heads == 4
    with torch.no_grad():
        out = pruned(**X).logits
    assert torch.allclose(out, masked_logits(model, [1, 3], [0, 2]), atol=1e-6)
    assert not torch.allclose(out, masked_logits(model, [1, 3], [1, 3]), atol=1e-3)  # the MoA choice matters


def test_one_expert_of_each_is_plain_attention_and_one_mlp(model):
    pruned = apply_plan(model, plan(model, [2], [1]))
    assert pruned.config.num_experts_per_tok == 1 and pruned.config.num_attention_heads == 2
    with torch.no_grad():
        assert torch.allclose(pruned(**X).logits, masked_logits(model, [2], [1]), atol=1e-6)


def test_export_dispatch_of_both_expert_sets_equals_jetmoe(model):
    """The dense dispatch that export runs (MLP and MoA) against JetMoE's own forward (atol 1e-6), at k = 4 and 1."""
    adapter = adapter_for(model.config)
    for m in (model, apply_plan(model, plan(model, [2], [1]))):
        with torch.no_grad():
            ref = m(**X).logits
            with adapter_for(m.config).export_patch(m):
                out = m(**X).logits
        assert torch.allclose(out, ref, atol=1e-6), (out - ref).abs().max()
    assert adapter.blocks(model)


def test_calibration_records_the_attention_routing_and_the_plan_keeps_its_heaviest(model):
    ids = X["input_ids"]
    rows = [ids[i].tolist()[: int(X["attention_mask"][i].sum())] for i in range(3)]
    enc = Encoded(rows, [[0] * len(r) for r in rows], [0, 1, 0])
    stats = collect_routing(model, enc, max_examples=3, batch_size=3, progress=False)
    real = int(X["attention_mask"].sum())
    for st in stats.values():  # softmax weights of the chosen experts sum to 1 per real token
        assert st.companions[MOA].sum() == pytest.approx(real)
    p = make_plan("frequency", {l: st.counts for l, st in stats.items()}, {l: 4 for l in stats}, {l: 2 for l in stats},
                  k=2, stats=stats)
    for lp in p.layers:
        mass = stats[lp.layer].companions[MOA]
        assert lp.companions[MOA] == sorted(mass.argsort()[::-1][:2].tolist())
    assert PrunePlan.from_dict(__import__("json").loads(p.to_json())).layers[0].companions == p.layers[0].companions


def test_a_plan_without_the_attention_choice_is_refused(model):
    with pytest.raises(ConfigError, match="which attention \\(MoA\\) experts to keep"):
        apply_plan(model, plan(model, [0, 1], None))
    with pytest.raises(ConfigError, match="attention experts \\[0\\] must be 2 distinct"):
        apply_plan(model, plan(model, [0, 1], [0]))
    assert torch.equal(apply_plan(model, plan(model, [0, 1, 2, 3], None))(**X).logits, model(**X).logits)
