"""DeepSeek-V4 (edgeprune/models/families/deepseek_v4.py): hash-routed layers calibrated by their input ids, the
token table rewritten by a prune, and the export's dispatch equal to the family's expert loop also where a table
row repeats an expert. (Score, prune and build at k = 2 and 1 run in tests/test_table_families.py.)"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgeprune.models.families.deepseek_v4 import remap_table
from edgeprune.models.registry import adapter_for
from edgeprune.pruning.apply import apply_plan
from edgeprune.pruning.plan import LayerPlan, PrunePlan
from tests.test_table_families import tiny_config

VOCAB = 100


def tiny(table: str = "random", seed: int = 0):
    """Layer 0 hash-routed, layer 1 top-k (sqrt-softplus scores, correction bias); 4 experts, top-2."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("deepseek_v4", VOCAB)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 1.0)
        gate = model.model.layers[0].mlp.gate
        if table == "random":  # two distinct experts per token, as a trained table has
            gate.tid2eid.copy_(torch.stack([torch.randperm(4)[:2] for _ in range(VOCAB)]))
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    assert model.model.layers[0].mlp.is_hash and not model.model.layers[1].mlp.is_hash
    return model


def plan(model, groups: list[list[int]]) -> PrunePlan:
    a = adapter_for(model.config)
    return PrunePlan("manual", [LayerPlan(l, 4, [0.0] * 4, [[(e, 1.0 / len(g)) for e in g] for g in groups])
                                for l in a.blocks(model)])


def batch(n: int = 3, s: int = 11):
    g = torch.Generator().manual_seed(1)
    return torch.randint(5, VOCAB, (n, s), generator=g)


def test_the_table_keeps_kept_experts_and_sends_a_dropped_one_to_its_nearest_kept_expert():
    table = torch.tensor([[0, 1], [2, 3], [3, 0]])
    rows = torch.tensor([[1.0, 0], [0, 1.0], [0.9, 0.1], [-1.0, 0]])
    keep = [[(0, 1.0)], [(1, 1.0)], [(2, 1.0)]]  # expert 3 dropped: its row is closest to ... none positive
    new_rows = rows[:3]
    out = remap_table(table, keep, rows, new_rows, 2)
    assert out.tolist() == [[0, 1], [2, 1], [1, 0]]  # 3 -> the kept row of highest cosine with [-1, 0]: expert 1
    assert remap_table(table, [[(e, 1.0)] for e in range(4)], rows, rows, 2).tolist() == table.tolist()
    assert remap_table(table, [[(2, 1.0)], [(0, 1.0)]], rows, rows[[2, 0]], 2).tolist() == [[0, 1]] * 3  # k <= top-k
    merged = remap_table(table, [[(0, 0.5), (3, 0.5)], [(1, 1.0)], [(2, 1.0)]], rows, new_rows, 2)
    assert merged.tolist() == [[0, 1], [2, 0], [0, 0]]  # a merged group's members name it


@torch.no_grad()
def test_a_pruned_model_equals_the_original_routed_as_the_plan_says():
    """k = 3 of 4 (above top-2: the table is remapped) and k = 2 (every token takes both kept experts): equal to the
    original whose hash table names the same experts by their old ids and whose top-k router cannot pick the
    dropped expert (its correction bias -inf)."""
    ids = batch()
    for kept in ([0, 1, 3], [3, 1]):
        model = tiny()
        pruned = apply_plan(model, plan(model, [[e] for e in kept]), fold=False)
        new_table = pruned.model.layers[0].mlp.gate.tid2eid
        ref = tiny()
        ref.model.layers[0].mlp.gate.tid2eid = torch.tensor(kept)[new_table]  # the same experts, old ids
        bias = ref.model.layers[1].mlp.gate.e_score_correction_bias
        bias[[e for e in range(4) if e not in kept]] = float("-inf")
        assert torch.allclose(pruned(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)
        assert pruned.config.n_routed_experts == len(kept) and pruned.config.num_experts_per_tok == min(2, len(kept))
        assert set(new_table.unique().tolist()) <= set(range(len(kept)))


@torch.no_grad()
def test_keeping_every_expert_is_exact_also_with_a_fresh_all_zero_table():
    ids = batch()
    for table in ("random", "zeros"):
        model = tiny(table)
        assert torch.equal(apply_plan(model, plan(model, [[e] for e in range(4)]), fold=False)(input_ids=ids).logits,
                           model(input_ids=ids).logits)


@torch.no_grad()
@pytest.mark.parametrize("table", ["random", "zeros"])
def test_the_export_dispatch_equals_the_family_also_where_a_row_repeats_an_expert(table):
    """A fresh table is all zeros (expert 0 twice per token): the family's loop adds it twice; so does the dispatch."""
    model = tiny(table)
    ids = batch()
    ref = model(input_ids=ids).logits
    with adapter_for(model.config).export_patch(model):
        got = model(input_ids=ids).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_calibration_routes_a_hash_layer_by_the_input_ids_of_the_real_tokens():
    from edgeprune.pruning.calibration import collect_routing
    from edgeprune.tasks.encoding import Encoded

    model = tiny()
    rows = [r[:n] for r, n in zip(batch(4, 9).tolist(), (9, 5, 9, 7))]  # padded in batches of 2
    enc = Encoded(input_ids=rows, token_type_ids=[[0] * len(r) for r in rows], labels=[0, 1, 0, 1])
    stats = collect_routing(model, enc, batch_size=2, progress=False)
    table = model.model.layers[0].mlp.gate.tid2eid
    real = torch.tensor([t for r in rows for t in r])
    want = torch.bincount(table[real].reshape(-1), minlength=4).double().numpy()
    assert stats[0].counts.tolist() == want.tolist() and stats[0].tokens == len(real) == 30
    assert stats[1].counts.sum() == 2 * len(real)


def test_a_hash_layer_without_its_input_ids_is_one_line():
    from edgeprune.errors import ConfigError

    model = tiny()
    block = model.model.layers[0].mlp
    with pytest.raises(ConfigError, match="picks experts by the input ids"):
        adapter_for(model.config).routing(block, torch.zeros(3, model.config.hidden_size))


@torch.no_grad()
def test_the_sparse_indexer_breaks_ties_by_index_so_padding_changes_nothing():
    """A tiny CSA indexer scores many entries exactly 0 (sums of ReLUs); with ties broken by index (the rule of
    ONNX's TopK, which the export then reproduces), a right-padded input gives the real tokens' states of the
    unpadded one. With PyTorch's own topk these differed by 0.33 from position 24 of a 37-token input."""
    from edgeprune.models.families.deepseek_v4 import stable_topk

    x = torch.zeros(16)
    x[2], x[9] = 5.0, 3.0
    assert stable_topk(x, 4).indices.tolist() == [2, 9, 0, 1]
    torch.manual_seed(0)
    cfg = tiny_config("deepseek_v4", VOCAB)
    cfg.layer_types = ["compressed_sparse_attention"] * 2
    lm = AutoModelForCausalLM.from_config(cfg).eval().model
    ids = torch.randint(5, VOCAB, (1, 64), generator=torch.Generator().manual_seed(0))
    n = 37
    mask = torch.zeros(1, 64, dtype=torch.long)
    mask[0, :n] = 1
    padded = lm(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask).last_hidden_state[0, :n]
    alone = lm(input_ids=ids[:, :n]).last_hidden_state[0]
    assert torch.allclose(padded, alone, atol=1e-5, rtol=0)
