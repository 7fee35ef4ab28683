import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from edgeprune.errors import ConfigError
from edgeprune.pruning.apply import apply_plan
from edgeprune.pruning.calibration import OUTPUT_ROWS, collect_routing
from edgeprune.pruning.merge import align_to, merge_experts, uncurl_clusters
from edgeprune.models.families.bert_moe import ADAPTER as BERT_ADAPTER

ROLES = BERT_ADAPTER.expert_roles
from edgeprune.pruning.methods import method_config, score_experts
from edgeprune.pruning.config import PruneConfig
from edgeprune.pruning.plan import PrunePlan, adaptive_k, make_plan, validate_k
from edgeprune.pruning.progressive import ProgressiveDropper
from edgeprune.tasks.encoding import Encoded
from edgeprune.training.loop import TeacherCache, TrainConfig, train
from tests.conftest import tiny_moe
from tests.test_model import batch


def enc(n=24, seed=0, vocab=200):
    rng = np.random.default_rng(seed)
    ids = [[2] + rng.integers(5, vocab, rng.integers(3, 12)).tolist() + [3] for _ in range(n)]
    return Encoded(ids, [[0] * len(i) for i in ids], rng.integers(0, 2, n).tolist())


def plan_for(model, k, method="frequency", gate_scale=False, **kw):
    e = enc()
    stats = collect_routing(model, e, progress=False,
                            output_rows=OUTPUT_ROWS if method_config(method).expert_outputs else 0)
    scores = score_experts(method_config(method, **kw), model, stats)
    blocks = model.moe_blocks()
    return make_plan(method, scores, {i: b.num_experts for i, b in blocks.items()},
                     {i: b.top_k for i, b in blocks.items()}, k=k, stats=stats,
                     clusters=method_config(method).clusters if method_config(method).merges else None,
                     merge_rule=method_config(method).merge_rule, gate_scale=gate_scale)


@pytest.mark.parametrize("gate_scale", [False, True])
def test_keeping_every_expert_changes_nothing(gate_scale):
    model = tiny_moe(num_experts=4, layers=4)
    plan = plan_for(model, 4, gate_scale=gate_scale)
    assert all(lp.output_scale == 1.0 for lp in plan.layers)
    pruned = apply_plan(model, plan)
    torch.testing.assert_close(pruned(**batch()).logits, model(**batch()).logits, atol=0, rtol=0)


def test_fold_equals_moe_restricted_to_the_expert_with_gate_one(tmp_path):
    model = tiny_moe(num_experts=4, layers=4)
    plan = plan_for(model, 1)
    one = apply_plan(model, plan, fold=False)
    assert all(b.num_experts == 1 for b in one.moe_blocks().values())
    dense = apply_plan(model, plan)
    assert type(dense) is BertForSequenceClassification
    torch.testing.assert_close(dense(**batch()).logits, one(**batch()).logits, atol=1e-6, rtol=1e-6)
    # by hand: the expert's FFN with gate 1 in every MoE layer
    for layer, lp in zip(model.config.moe_layers, plan.layers):
        src = model.moe_blocks()[layer].experts[lp.kept[0]]
        dst = dense.bert.encoder.layer[layer]
        assert torch.equal(dst.intermediate.dense.weight, src.w_in.weight)
        assert torch.equal(dst.output.dense.weight, src.w_out.weight)
    dense.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"
    assert type(AutoModelForSequenceClassification.from_pretrained(tmp_path)) is BertForSequenceClassification


def test_plan_round_trips_through_json(tmp_path):
    model = tiny_moe(num_experts=8)
    plan = plan_for(model, 2, method="uncurl")
    plan.save(tmp_path / "p.json")
    again = PrunePlan.load(tmp_path / "p.json")
    assert again == plan
    torch.testing.assert_close(apply_plan(model, again)(**batch()).logits,
                               apply_plan(model, plan)(**batch()).logits)


def test_merging_identical_experts_gives_that_expert_back():
    model = tiny_moe(num_experts=2)
    e = model.moe_blocks()[1].experts[0]
    sd = {k: v.detach() for k, v in e.state_dict().items()}
    perm = torch.randperm(sd["w_in.weight"].shape[0])
    shuffled = {"w_in.weight": sd["w_in.weight"][perm], "w_in.bias": sd["w_in.bias"][perm],
                "w_out.weight": sd["w_out.weight"][:, perm], "w_out.bias": sd["w_out.bias"]}
    merged = merge_experts([sd, shuffled], [0.3, 0.7], ROLES)
    for k in sd:
        torch.testing.assert_close(merged[k], sd[k])
    assert torch.equal(align_to(sd, shuffled, ROLES)["w_in.weight"], sd["w_in.weight"])


def test_uncurl_clusters_cover_all_experts_reference_first():
    model = tiny_moe(num_experts=8)
    stats = collect_routing(model, enc(), progress=False)[1]
    groups = uncurl_clusters(stats, 3)
    assert len(groups) == 3
    assert sorted(e for g in groups for e, _ in g) == list(range(8))
    for g in groups:
        assert np.isclose(sum(w for _, w in g), 1.0, atol=1e-5)
        assert stats.counts[g[0][0]] == max(stats.counts[e] for e, _ in g)


@pytest.mark.parametrize("method", ["frequency", "chen2022", "reap", "random", "uncurl", "hc-smoe", "m-smoe", "ties"])
def test_every_method_makes_a_valid_plan(method):
    model = tiny_moe(num_experts=8)
    for k in (1, 2, 4):
        plan = plan_for(model, k, method=method)
        assert all(lp.k == k for lp in plan.layers)
        out = apply_plan(model, plan)(**batch()).logits
        assert torch.isfinite(out).all()


def test_chowdhury_router_norm_change(tmp_path):
    pre = tiny_moe(num_experts=4)
    pre.bert.save_pretrained(tmp_path)
    ft = tiny_moe(num_experts=4)
    ft.load_state_dict(pre.state_dict())
    with torch.no_grad():
        ft.moe_blocks()[1].router.weight[2] *= 3.0
    scores = score_experts(method_config("chowdhury2024", pretrained=str(tmp_path)), ft, None)
    assert int(np.argmax(scores[1])) == 2 and np.allclose(np.delete(scores[1], 2), 0, atol=1e-6)
    with pytest.raises(ConfigError, match="chowdhury2024 needs the pretrained MoE's router: pass --pretrained"):
        score_experts(method_config("chowdhury2024"), ft, None)


def test_k_validation_messages():
    with pytest.raises(ConfigError, match="layer 1: k=0 experts; keep at least 1"):
        validate_k(0, 8, 1, 1)
    with pytest.raises(ConfigError, match="layer 3: k=9 experts but the layer has only Z=8"):
        validate_k(9, 8, 1, 3)
    with pytest.raises(ConfigError, match="k=2 is below the model's top-4 routing; use k=1"):
        validate_k(2, 8, 4, 1)
    validate_k(1, 8, 4, 1)
    with pytest.raises(ConfigError, match="unknown pruning method 'magic'"):
        PruneConfig(method="magic").validate()
    with pytest.raises(ConfigError, match="method random has no option 'beta'"):
        method_config("random", beta=1)
    with pytest.raises(ConfigError, match="give exactly one of --experts K or --coverage SHARE"):
        PruneConfig(experts=2, coverage=0.9).validate()


def test_adaptive_k_covers_mass():
    assert adaptive_k(np.array([0.5, 0.3, 0.1, 0.1]), 0.8) == 2
    assert adaptive_k(np.array([0.5, 0.3, 0.1, 0.1]), 0.81) == 3
    assert adaptive_k(np.array([0.25] * 4), 1.0) == 4


def test_bad_plan_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"method": "x"}')
    with pytest.raises(ConfigError, match="p.json: not a valid prune plan"):
        PrunePlan.load(f)
    model = tiny_moe(num_experts=4)
    plan = plan_for(model, 1)
    plan.layers[0].groups = [[(7, 1.0)]]
    with pytest.raises(ConfigError, match=r"layer 1: expert index out of range 0..3"):
        apply_plan(model, plan)


@pytest.mark.parametrize("eager", [False, True])
def test_progressive_dropping_reaches_one_expert(eager):
    model = tiny_moe(num_experts=8)
    model.train()
    steps = 40
    dropper = ProgressiveDropper(model, steps, window=5, beta=0.9, eager=eager)
    train(model, enc(64), TrainConfig(max_steps=steps, batch_size=8, bf16=False), on_step=dropper, progress=False)
    alive = int(model.moe_blocks()[1].alive.sum())
    assert alive == 1 if eager else alive < 8
    plan = dropper.plan("chen2022-progressive")
    assert plan.layers[0].k == alive
    if eager:
        assert dropper.history[0]["step"] == steps // 2


def test_fold_keeps_the_switch_gate_scale():
    model = tiny_moe(num_experts=4, layers=2)
    e = enc()
    stats = collect_routing(model, e, progress=False)
    scores = score_experts(method_config("frequency"), model, stats)
    plan = make_plan("frequency", scores, {1: 4}, {1: 1}, k=1, stats=stats)
    g = stats[1].gate_sum.sum() / stats[1].tokens
    assert plan.layers[0].output_scale == pytest.approx(g, abs=1e-6)
    assert 0.25 <= g < 1.0
    plain = make_plan("frequency", scores, {1: 4}, {1: 1}, k=1, stats=stats, gate_scale=False)
    assert plain.layers[0].output_scale == 1.0
    a, b = apply_plan(model, plan), apply_plan(model, plain)
    kept = plan.layers[0].kept[0]
    src = model.moe_blocks()[1].experts[kept]
    torch.testing.assert_close(a.bert.encoder.layer[1].output.dense.weight, src.w_out.weight * g)
    torch.testing.assert_close(b.bert.encoder.layer[1].output.dense.weight, src.w_out.weight)
    assert PrunePlan.from_dict(json.loads(plan.to_json())).layers[0].output_scale == plan.layers[0].output_scale


@pytest.mark.parametrize("method", ["frequency", "uncurl"])
def test_pruned_top1_layer_keeps_the_mean_gate_of_the_original(method):
    """k = 2 of 4: the renormalised gate grows; output_scale = mean original / mean pruned top-1 gate, checked
    against the pruned model's own routing on the calibration tokens (merged router rows included)."""
    model = tiny_moe(num_experts=4, layers=2)
    e = enc()
    stats = collect_routing(model, e, progress=False)
    plan = plan_for(model, 2, method=method, gate_scale=True)
    plain = apply_plan(model, plan_for(model, 2, method=method, gate_scale=False))
    after = collect_routing(plain, e, progress=False)
    mean_gate = lambda st: st.gate_sum.sum() / st.tokens  # noqa: E731
    expected = mean_gate(stats[1]) / mean_gate(after[1])
    assert expected < 0.95  # the renormalised gate did grow
    assert plan.layers[0].output_scale == pytest.approx(expected, rel=1e-4)
    scaled = apply_plan(model, plan)
    for a, b in zip(scaled.moe_blocks()[1].experts, plain.moe_blocks()[1].experts):
        torch.testing.assert_close(a.w_out.weight, b.w_out.weight * plan.layers[0].output_scale)
        torch.testing.assert_close(a.w_in.weight, b.w_in.weight)


def test_teacher_cache_distils_exactly_like_the_teacher_and_runs_it_once_per_batch():
    teacher = tiny_moe(seed=1)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    cfg = TrainConfig(max_steps=6, batch_size=8, bf16=False, distill_alpha=0.5)
    plain, cached = tiny_moe(), tiny_moe()
    train(plain, enc(32), cfg, teacher=teacher, progress=False)
    direct_calls = len(calls)
    memo = TeacherCache(teacher)
    train(cached, enc(32), cfg, teacher=memo, progress=False)
    for a, b in zip(plain.parameters(), cached.parameters()):
        torch.testing.assert_close(a, b)
    calls.clear()
    train(tiny_moe(), enc(32), cfg, teacher=memo, progress=False)  # same seeded batches: all from the memo
    assert direct_calls == 6 and 0 < len(memo.memo) <= 6 and calls == []
    # under bf16 autocast the cache's family is asked through its teacher (it has no config of its own)
    train(tiny_moe(), enc(32), TrainConfig(max_steps=2, batch_size=8, bf16=True, distill_alpha=0.5), teacher=memo,
          progress=False)


def _folded(seed=0):
    model = tiny_moe(num_experts=4, layers=2, seed=seed)
    return apply_plan(model, plan_for(model, 1))


def test_ffn_slimming_drops_exactly_the_neurons_that_contribute_nothing(tmp_path):
    """Neurons whose W_out column is zero have saliency 0: slimming them away leaves the logits as they were."""
    from edgeprune.models.families.bert_moe import ADAPTER as BERT_MOE
    from edgeprune.pruning.neurons import neuron_saliency, slim_ffn

    dense = _folded()
    dead = {0: [1, 5, 9, 12, 17, 20, 26, 31, 33, 40, 41, 47, 50, 55, 58, 63], 1: list(range(0, 64, 4))}
    with torch.no_grad():
        for layer, cols in dead.items():
            dense.bert.encoder.layer[layer].output.dense.weight[:, cols] = 0
    sal = neuron_saliency(dense, BERT_MOE, enc(), progress=False)
    assert all(np.all(sal[l][c] == 0) and np.sum(sal[l] > 0) == 64 - 16 for l, c in dead.items())
    slim, info = slim_ffn(dense, BERT_MOE, sal, keep=0.75)
    assert info["intermediate_size"] == [64, 48] and slim.config.intermediate_size == 48
    assert slim.bert.encoder.layer[1].intermediate.dense.weight.shape == (48, 32)
    torch.testing.assert_close(slim(**batch()).logits, dense(**batch()).logits, atol=1e-5, rtol=1e-5)
    slim.save_pretrained(tmp_path)
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(back) is BertForSequenceClassification and back.config.intermediate_size == 48
    full, _ = slim_ffn(dense, BERT_MOE, sal, keep=1.0)
    torch.testing.assert_close(full(**batch()).logits, dense(**batch()).logits, atol=0, rtol=0)


def test_neuron_saliency_is_mean_abs_activation_times_output_column_norm():
    """s_j = mean over non-padding tokens of |a_j| * ||W_out[:, j]||_2, checked against a direct computation."""
    from edgeprune.models.families.bert_moe import ADAPTER as BERT_MOE
    from edgeprune.pruning.neurons import neuron_saliency
    from edgeprune.tasks.encoding import collate

    dense = _folded(seed=1)
    e = enc(n=10)
    seen = []
    layer = dense.bert.encoder.layer[1]
    h = layer.intermediate.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    b = collate(e, list(range(10)))
    b.pop("labels")
    with torch.no_grad():
        dense(**b)
    h.remove()
    mask = b["attention_mask"].reshape(-1).bool()
    want = seen[0].reshape(-1, 64)[mask].abs().mean(0) * layer.output.dense.weight.detach().norm(dim=0)
    got = neuron_saliency(dense, BERT_MOE, e, batch_size=3, progress=False)[1]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)


def test_ffn_keep_messages():
    with pytest.raises(ConfigError, match=r"--ffn-keep must be in \(0, 1\], got 0"):
        PruneConfig(ffn_keep=0).validate()
    with pytest.raises(ConfigError, match="--ffn-keep prunes neurons of the folded dense FFN: use it with --experts 1"):
        PruneConfig(experts=2, ffn_keep=0.5).validate()
    with pytest.raises(ConfigError, match="--ffn-keep needs a one-shot method"):
        PruneConfig(method="chen2022-eager", ffn_keep=0.5).validate()
    PruneConfig(ffn_keep=0.5).validate()
