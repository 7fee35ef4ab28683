"""The peers' merges (HC-SMoE, M-SMoE, TIES) and router-only recovery, on tiny BERT-MoEs built from configs.

Exactness: a merge of identical (or permuted) experts returns the expert itself for every rule, compared with
torch.testing.assert_close at its float32 default (rtol 1.3e-6, atol 1e-5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.errors import ConfigError
from edgeprune.models.families.bert_moe import ADAPTER as BERT_ADAPTER
from edgeprune.pruning.apply import apply_plan
from edgeprune.pruning.calibration import OUTPUT_ROWS, LayerStats, collect_routing
from edgeprune.pruning.config import PruneConfig
from edgeprune.pruning.merge import MERGE_RULES, dominant_clusters, hc_clusters, merge_experts, ties_merge
from edgeprune.pruning.plan import PrunePlan
from edgeprune.pruning.recover import recover
from tests.conftest import tiny_moe
from tests.test_model import batch
from tests.test_pruning import enc, plan_for

ROLES = BERT_ADAPTER.expert_roles


def _expert(model, e=0):
    return {k: v.detach().clone() for k, v in model.moe_blocks()[1].experts[e].state_dict().items()}


@pytest.mark.parametrize("rule", MERGE_RULES)
def test_every_rule_gives_identical_experts_back(rule):
    sd = _expert(tiny_moe(num_experts=2))
    merged = merge_experts([sd, {k: v.clone() for k, v in sd.items()}, sd], [0.2, 0.5, 0.3], ROLES, rule)
    for k in sd:
        torch.testing.assert_close(merged[k], sd[k])


def test_ties_trims_elects_and_adds_the_agreeing_deltas_to_the_reference():
    ref = {"w": torch.tensor([[1.0, 0.0, 4.0, -2.0]])}
    b = {"w": torch.tensor([[3.0, 1.0, 0.0, -2.0]])}
    c = {"w": torch.tensor([[2.5, -1.0, 6.0, -2.0]])}
    out = ties_merge([ref, b, c], [2.0, 1.0, 1.0], density=0.5)["w"]
    # shares 0.5, 0.25, 0.25; tau_b = [2, 1, -4, 0] -> trimmed [2, 0, -4, 0]; tau_c = [1.5, -1, 2, 0] -> [1.5, 0, 2, 0]
    # entry 0: both positive, delta 1.75; entry 2: 0.25 * (-4 + 2) < 0 -> only b agrees, delta -4
    # result = ref + (1 - 0.5) * delta
    torch.testing.assert_close(out, torch.tensor([[1.875, 0.0, 2.0, -2.0]]))


def _stats(counts, out_means=None, logits=None) -> LayerStats:
    z = len(counts)
    st = LayerStats(np.asarray(counts, float), np.zeros(z), np.zeros(z), np.zeros(z), tokens=int(sum(counts)))
    if out_means is not None:
        st.out_sum, st.out_rows = np.asarray(out_means, float) * 10, 10
    if logits is not None:
        st.logits = [np.asarray(logits, float)]
    return st


def test_hc_smoe_groups_experts_that_compute_alike():
    means = [[0, 0], [10, 10], [0.1, 0], [10, 10.2], [0, 0.1]]
    groups = hc_clusters(_stats([5, 1, 2, 3, 1], means), 2)
    assert [sorted(e for e, _ in g) for g in groups] == [[0, 2, 4], [1, 3]]
    assert groups[0][0][0] == 0 and groups[1][0][0] == 3  # the most used leads
    assert [[e] for e in range(5)] == [[e for e, _ in g] for g in hc_clusters(_stats([1] * 5, means), 5)]
    with pytest.raises(ValueError, match="out_sum"):
        hc_clusters(_stats([1, 1, 1]), 2)


def test_m_smoe_keeps_the_most_used_and_joins_the_rest_by_router_similarity():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(200, 2))
    logits = np.stack([h[:, 0], h[:, 1], h[:, 0] + 0.01 * rng.normal(size=200), -h[:, 1] * 0 + h[:, 1]], 1)
    groups = dominant_clusters(_stats([9, 8, 1, 1], logits=logits), 2)
    assert [[e for e, _ in g] for g in groups] == [[0, 2], [1, 3]]
    assert groups[0][1][1] == pytest.approx(0.1)  # usage weight within the group


def test_calibration_records_every_expert_on_a_sample_of_tokens():
    model = tiny_moe(num_experts=4)
    assert collect_routing(model, enc(), progress=False)[1].out_sum is None  # only when a method asks
    stats = collect_routing(model, enc(), progress=False, output_rows=OUTPUT_ROWS)[1]
    assert stats.out_sum.shape == (4, 32) and 0 < stats.out_rows <= OUTPUT_ROWS * 1 + stats.tokens
    assert not np.allclose(stats.out_sum[0], stats.out_sum[1])  # different experts, same tokens


@pytest.mark.parametrize("method", ["hc-smoe", "m-smoe", "ties"])
def test_merging_methods_keep_every_expert_exactly_at_k_equal_z(method):
    model = tiny_moe(num_experts=4)
    plan = plan_for(model, 4, method=method)
    assert plan.merge_rule == {"hc-smoe": "average-unaligned", "m-smoe": "average", "ties": "ties"}[method]
    same = PrunePlan.from_dict(__import__("json").loads(plan.to_json()))
    assert same.merge_rule == plan.merge_rule
    torch.testing.assert_close(apply_plan(model, same)(**batch()).logits, model(**batch()).logits, rtol=0, atol=1e-6)


def test_a_plan_with_an_unknown_merge_rule_is_refused(tmp_path):
    plan = plan_for(tiny_moe(num_experts=4), 2, method="m-smoe")
    d = __import__("json").loads(plan.to_json())
    d["merge_rule"] = "median"
    (tmp_path / "p.json").write_text(__import__("json").dumps(d))
    with pytest.raises(ConfigError, match="merge_rule 'median' is not one of average, average-unaligned, ties"):
        PrunePlan.load(tmp_path / "p.json")


def test_router_only_recovery_moves_only_the_routers():
    model = tiny_moe(num_experts=4)
    pruned = apply_plan(model, plan_for(model, 2, method="m-smoe"))
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    run = recover(pruned, enc(64), 5, teacher=model, progress=False, mode="router")
    assert run["steps"] == 5 and run["mode"] == "router"
    changed = {k for k, v in pruned.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith("moe.router.weight") for k in changed), changed
    folded = apply_plan(model, plan_for(model, 1))
    assert recover(folded, enc(64), 5, progress=False, mode="router")["steps"] == 0


@pytest.mark.parametrize("kw, message", [
    ({"recovery_mode": "router", "experts": 1}, "--experts 1 folds them away"),
    ({"recovery_mode": "all"}, "--recovery-mode 'all': give full or router"),
])
def test_recovery_mode_messages(kw, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**{"experts": 2, **kw}).validate()
