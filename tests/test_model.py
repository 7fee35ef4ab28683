import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

from edgeprune.models import BertMoeForSequenceClassification
from edgeprune.models.registry import adapter_for
from edgeprune.originals.upcycle import upcycle_model
from edgeprune.pruning.calibration import collect_routing
from edgeprune.tasks.encoding import Encoded
from tests.conftest import tiny_config, tiny_moe


def batch(seed=0, b=3, s=9, vocab=200):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("num_experts", [4, 8, 16, 32])
def test_save_load_bit_exact(tmp_path, num_experts):
    model = tiny_moe(num_experts=num_experts)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BertMoeForSequenceClassification)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(model(**batch()).logits, loaded(**batch()).logits)


def test_default_moe_layers_every_other():
    cfg = tiny_config(layers=6)
    assert cfg.moe_layers == [1, 3, 5] and cfg.num_experts_per_layer == [4, 4, 4]
    with pytest.raises(ValueError, match="out of range"):
        tiny_config(layers=2, moe_layers=[2])


def _dense(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    return BertModel(cfg).eval()


@pytest.mark.parametrize("z,top_k", [(4, 4), (1, 1), (8, 8)])
def test_upcycle_without_drop_reproduces_dense(z, top_k):
    dense = _dense()
    moe = upcycle_model(dense, num_experts=z, num_experts_per_tok=top_k, drop_fraction=0.0).eval()
    b = batch()
    ref = dense(**b).last_hidden_state
    out = moe(**b).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_drop_upcycling_makes_experts_differ():
    moe = upcycle_model(_dense(), num_experts=4, drop_fraction=0.5)
    experts = moe.moe_blocks()[1].experts
    w = [e.w_in.weight for e in experts]
    assert not torch.equal(w[0], w[1])
    same_rows = (w[0] == w[1]).all(dim=1).float().mean().item()
    assert 0.1 < same_rows < 0.4  # ~ (1 - 0.5)^2 of the units untouched in both


def test_routing_statistics_add_up():
    model = tiny_moe(num_experts=4, top_k=2)
    enc = Encoded([[2, 7, 9, 11, 3], [2, 8, 3], [2, 5, 6, 7, 8, 9, 3]], [[0] * 5, [0] * 3, [0] * 7], [0, 1, 0])
    stats = collect_routing(model, enc, batch_size=2, progress=False)
    for st in stats.values():
        assert st.tokens == 15  # padding excluded
        assert st.counts.sum() == 15 * 2
        assert np.isclose(st.usage.sum(), 1.0)
        assert np.isclose(st.prob_sum.sum(), 15.0, atol=1e-4)
        assert np.isclose(st.gate_sum.sum(), 15.0, atol=1e-4)  # top-2 renormalised: gates sum to 1 per token
        assert st.logit_matrix().shape[1] == 4


def test_dense_dispatch_matches_sparse_and_is_undone():
    model = tiny_moe(num_experts=4, top_k=2)
    b = batch()
    sparse = model(**b).logits
    with adapter_for(model.config).export_patch(model):
        assert all("forward" in vars(blk) for blk in model.moe_blocks().values())
        dense = model(**b).logits
    assert not any("forward" in vars(blk) for blk in model.moe_blocks().values())
    torch.testing.assert_close(dense, sparse, atol=1e-5, rtol=1e-5)


def test_aux_losses_present_and_balanced_router_is_minimal():
    model = tiny_moe(num_experts=4)
    out = model(**batch(), labels=torch.tensor([0, 1, 0]))
    assert out.aux_loss >= 0.99  # Switch loss is >= 1 for any routing, 1 when perfectly balanced
    assert out.z_loss > 0
    out.loss.backward()
    assert model.moe_blocks()[1].router.weight.grad is not None
