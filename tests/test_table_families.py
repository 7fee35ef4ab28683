"""The transformers 5 families registered from one row of data each (edgeprune/models/families/table.py): a tiny
checkpoint of each, built from its config class the way a user's directory looks, through score (two methods),
prune to k = 2 and to one expert, and the build on a CPU target with export parity at both k."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

from edgeprune.cli import main
from edgeprune.models.families.table import ROWS
from edgeprune.models.registry import adapter_for
from edgeprune.pruning.apply import apply_plan
from tests.test_families import plan_keeping

# a tiny configuration: these keys where the family's config has them (hidden 32, 2 layers, 4 experts, top-2)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=48, moe_intermediate_size=16, max_position_embeddings=128, num_experts_per_tok=2,
            shared_expert_intermediate_size=16, first_k_dense_replace=0, n_shared_experts=1, n_group=1,
            topk_group=1, num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4,
            decoder_sparse_step=1, moe_layer_freq=1, mlp_only_layers=[], pad_token_id=0, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)
# what a family needs beyond TINY to build at that size
EXTRA: dict[str, dict] = {}
FAST = ["--calibration-examples", "32", "--recovery-steps", "0", "--eval-examples", "24", "--latency-iters", "5"]


def tiny_config(model_type: str, vocab: int):
    config = AutoConfig.for_model(model_type)
    for k, v in {**TINY, **EXTRA.get(model_type, {}), "vocab_size": vocab}.items():
        if hasattr(config, k):
            setattr(config, k, v)
    for key, value in list(config.to_dict().items()):  # per-layer lists follow the two layers
        if key.endswith("layer_types") and isinstance(value, list) and len(value) > config.num_hidden_layers:
            setattr(config, key, value[: config.num_hidden_layers])
    return config


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory, tiny_tokenizer):
    """The family's tiny checkpoint directory (built on first use)."""
    tok, vocab = tiny_tokenizer
    made = {}

    def make(mt: str):
        if mt not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(mt, vocab)).eval()
            with torch.no_grad():  # routers that spread tokens over the experts
                for name, p in model.named_parameters():
                    if name.endswith(("gate.weight", "router.weight")) and p.dim() == 2:
                        p.normal_(0, 1.0)
            d = tmp_path_factory.mktemp(mt)
            model.save_pretrained(d)
            tok.save_pretrained(d)
            made[mt] = d
        return made[mt]
    return make


def cli(args, code=0):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


WORDS = ["--verbalisers", "bad,good"]


@pytest.mark.parametrize("family", sorted(ROWS))
def test_a_table_family_scores_prunes_and_builds(family, table_dir, tmp_path, cache, loose_targets):
    from edgeprune.models.loading import load_model
    from edgeprune.tasks import get_task

    d = table_dir(family)
    for method in ("reap", "frequency"):
        plan = tmp_path / f"{method}.json"
        cli(["score", "--model", str(d), "--method", method, "--experts", "2", "--calibration-examples", "32",
             "--out", str(plan)] + WORDS)
        assert all(len(lp["groups"]) == 2 for lp in json.loads(plan.read_text())["layers"])
    model = load_model(d, task=get_task("sst2"), verbalisers=("bad", "good"))
    adapter = adapter_for(model.config)
    x = {"input_ids": torch.randint(5, 100, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():  # keeping every expert is the original, exactly
        ref = model(**x).logits
        assert torch.equal(apply_plan(model, plan_keeping(model, list(range(4))))(**x).logits, ref)
    for k in (2, 1):
        out = tmp_path / f"art{k}"
        res = CliRunner().invoke(main, ["build", "--model", str(d), "--target", "x86_64", "--experts", str(k),
                                        "--out", str(out)] + FAST + WORDS, catch_exceptions=False)
        if k == 1 and res.exit_code == 2:  # a family whose router cannot route one expert says so
            assert "one expert" in res.output, res.output
            continue
        assert res.exit_code == 0, res.output
        report = json.loads((out / "report.json").read_text())
        assert report["export"]["parity_fp32"]["max_abs_logit_diff"] < 1e-3
        assert adapter.blocks(model)
