"""Every registered Hugging Face MoE family on tiny checkpoints: exact prunes, exact folds, reload, export
parity, every method, the build end to end. Tolerances: 1e-5 on fp32 logits (folds are bit-exact here)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeprune.models.registry import adapter_for
from edgeprune.pruning.apply import apply_plan
from edgeprune.pruning.plan import LayerPlan, PrunePlan
from tests.families import FAMILIES, NO_ONE_EXPERT, ONE_EXPERT_FOLDS_ONLY, is_lm, tiny_family_checkpoint, tiny_family_model

FAMS = list(FAMILIES)


def batch(vocab: int, seed: int = 1, b: int = 3, s: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 6:] = 0  # right padding, as edgeprune collates
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def plan_keeping(model, kept: list[int]) -> PrunePlan:
    adapter = adapter_for(model.config)
    layers = [LayerPlan(l, adapter.num_experts(b), [0.0] * adapter.num_experts(b), [[(e, 1.0)] for e in kept])
              for l, b in adapter.blocks(model).items()]
    return PrunePlan("manual", layers)


def masked_logits(model, kept: list[int], inputs) -> torch.Tensor:
    """The original with the dropped experts' router logits set to -inf (its own routing rule unchanged): every
    router computes its logits with ``F.linear`` on its weight, whose output columns are masked here; a
    score-correction bias (DeepSeek-V3) of a dropped expert is -inf too, so that it is never chosen."""
    return masked_per_layer(model, {l: kept for l in adapter_for(model.config).blocks(model)}, inputs)


@torch.no_grad()
def masked_per_layer(model, kept: dict[int, list[int]], inputs) -> torch.Tensor:
    """:func:`masked_logits` with each layer's own kept experts."""
    import torch.nn.functional as F

    adapter = adapter_for(model.config)
    blocks = adapter.blocks(model)
    z = adapter.num_experts(next(iter(blocks.values())))
    drop = {l: torch.tensor([e not in kept[l] for e in range(z)]) for l in blocks}
    by_weight = {adapter.router(b).weight.data_ptr(): drop[l] for l, b in blocks.items()}
    biases = [(buf, drop[l]) for l, b in blocks.items() for n, buf in
              list(adapter.router(b).named_buffers()) + list(b.named_buffers(recurse=False)) if "bias" in n]
    saved = [buf.clone() for buf, _ in biases]
    linear = F.linear

    def masked(x, w, *a, **kw):
        out = linear(x, w, *a, **kw)
        return out.masked_fill(by_weight[w.data_ptr()], float("-inf")) if w.data_ptr() in by_weight else out

    F.linear = masked
    try:
        for buf, d in biases:
            buf.masked_fill_(d, float("-inf"))
        return model(**inputs).logits
    finally:
        F.linear = linear
        for (buf, _), old in zip(biases, saved):
            buf.copy_(old)


@pytest.mark.parametrize("family", FAMS)
def test_keeping_every_expert_changes_no_logit(family):
    model = tiny_family_model(family, vocab=100)
    x = batch(100)
    same = apply_plan(model, plan_keeping(model, list(range(6))))
    with torch.no_grad():
        assert torch.equal(model(**x).logits, same(**x).logits)


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("kept", [[1, 4], [0, 2, 5], [3]])
def test_prune_equals_original_with_dropped_router_logits_at_minus_inf(family, kept):
    if len(kept) == 1 and family in NO_ONE_EXPERT:
        pytest.skip(f"{family} cannot keep one expert (test_one_expert_refused)")
    model = tiny_family_model(family, vocab=100)
    x = batch(100)
    folds_only = len(kept) == 1 and family in ONE_EXPERT_FOLDS_ONLY
    pruned = apply_plan(model, plan_keeping(model, kept), fold=folds_only)
    adapter = adapter_for(pruned.config)
    assert all(adapter.num_experts(b) == len(kept) for b in adapter.blocks(pruned).values())
    assert len(adapter.blocks(pruned)) == (0 if folds_only else 2)
    with torch.no_grad():
        got = pruned(**x).logits
    assert torch.allclose(got, masked_logits(model, kept, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMS)
def test_fold_equals_the_one_expert_model(family):
    if family in NO_ONE_EXPERT:
        pytest.skip(f"{family} cannot keep one expert (test_one_expert_refused)")
    model = tiny_family_model(family, vocab=100)
    x = batch(100)
    folded = apply_plan(model, plan_keeping(model, [2]), fold=True)
    adapter = adapter_for(model.config)
    if adapter.dense is not None:
        assert type(folded) is adapter.dense.classifier_class
        assert not adapter.block_paths(folded)
    with torch.no_grad():
        got = folded(**x).logits
        if family not in ONE_EXPERT_FOLDS_ONLY:  # the one-expert model of the family's own class
            one = apply_plan(model, plan_keeping(model, [2]), fold=False)
            assert (one(**x).logits - got).abs().max().item() <= 1e-5
    diff = (masked_logits(model, [2], x) - got).abs().max().item()
    assert diff <= 1e-5, diff


def test_qwen3_fold_zero_pads_dense_layers_of_another_width():
    model = tiny_family_model("qwen3_moe", vocab=100, mlp_only_layers=[0])
    x = batch(100)
    one = apply_plan(model, plan_keeping(model, [4]), fold=False)
    folded = apply_plan(model, plan_keeping(model, [4]))
    assert folded.config.intermediate_size == 64 and type(folded).__name__ == "Qwen3ForSequenceClassification"
    with torch.no_grad():
        assert (one(**x).logits - folded(**x).logits).abs().max().item() <= 1e-5


def test_mixtral_fold_keeps_sliding_window_none():
    model = tiny_family_model("mixtral", vocab=100)
    folded = apply_plan(model, plan_keeping(model, [0]))
    assert type(folded).__name__ == "MistralForSequenceClassification" and folded.config.sliding_window is None


@pytest.mark.parametrize("family", FAMS)
def test_k2_checkpoint_reloads_with_plain_transformers(family, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_family_model(family, vocab=100)
    pruned = apply_plan(model, plan_keeping(model, [0, 3]))
    pruned.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    adapter = adapter_for(family)
    assert cfg["model_type"] == family and cfg[adapter.num_experts_key] == 2
    assert cfg.get(adapter.top_k_key, 2) == 2 or family == "switch_transformers"  # top-1 by design
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    x = batch(100)
    with torch.no_grad():
        assert torch.equal(again(**x).logits, pruned(**x).logits)


@pytest.mark.parametrize("family", FAMS)
def test_export_forward_equals_the_family_forward(family):
    model = tiny_family_model(family, vocab=100)
    adapter = adapter_for(model.config)
    x = batch(100)
    with torch.no_grad():
        ref = model(**x).logits
        with adapter.export_patch(model):
            got = model(**x).logits
        again = model(**x).logits
    assert torch.allclose(ref, got, atol=1e-5, rtol=0) and torch.equal(ref, again)  # and the patch is undone


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_tokenizer):
    tok, vocab = tiny_tokenizer
    dirs = {}
    for family in FAMS:
        d = tmp_path_factory.mktemp(family)
        tiny_family_checkpoint(family, vocab=vocab).save_pretrained(d)
        tok.save_pretrained(d)
        dirs[family] = d
    return dirs


def words(family: str) -> list[str]:
    """Language-model checkpoints: verbalisers in the tiny tokenizer's vocabulary (the label names are not)."""
    return ["--verbalisers", "bad,good"] if is_lm(family) else []


FAST = ["--calibration-examples", "64", "--recovery-steps", "2", "--eval-examples", "40", "--latency-iters", "5"]


def cli(args, code=0):
    from click.testing import CliRunner

    from edgeprune.cli import main

    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


# families whose k = 2 artifact keeps a fixed top-k: Switch routes by argmax, PhiMoE's sparsemixer picks its two
# experts by argmax and masking (no TopK to feed)
FIXED_TOP_K = {"switch_transformers", "phimoe"}


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("k", [1, 2])
def test_build_end_to_end_and_edgemodel_predicts(family, k, family_dirs, tmp_path, cache, loose_targets):
    if k == 1 and family in NO_ONE_EXPERT:
        pytest.skip(f"{family} cannot keep one expert (test_one_expert_refused)")
    from edgeprune.runtime import EdgeModel

    out = tmp_path / "art"
    cli(["build", "--model", str(family_dirs[family]), "--target", "x86_64", "--experts", str(k), "--out", str(out)]
        + FAST + words(family))
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["parity_fp32"]["max_abs_logit_diff"] < 1e-3
    if k == 1 and family in ("mixtral", "qwen3_moe"):  # the folded Mistral / Qwen3: no MoE block left
        assert report["export"]["exporter"] == "torch.onnx"
    manifest = json.loads((out / "edgeprune.json").read_text())
    assert manifest["model_type"] == family and "token_type_ids" not in manifest["input_names"]
    model = EdgeModel(out)
    assert len(model.predict(["a gorgeous film", "dull"])) == 2
    # the artifact's logits are the quantized export of the pruned model: agreement with it on a few texts
    assert model.predict_proba(["a gorgeous film"]).shape == (1, 2)
    spec = manifest["top_k"]
    if k == 2 and family not in FIXED_TOP_K:  # the routers read top_k at run time: the report has every k
        assert spec == {"input": "top_k", "default": 2, "max": 2}
        assert [row["top_k"] for row in report["top_k"]["rows"]] == [1, 2]
        one = EdgeModel(out, top_k=1).logits(["a gorgeous film", "dull"])
        assert np.abs(one - model.logits(["a gorgeous film", "dull"])).max() > 0  # another routing, other numbers
        assert cli(["predict", str(out), "a gorgeous film", "--top-k", "1"]).output.endswith("\ta gorgeous film\n")
        res = cli(["predict", str(out), "a gorgeous film", "--top-k", "3"], code=2)
        assert "--top-k: top_k=3: this artifact keeps 2 experts per layer; give 1..2 (its own is 2)" in res.output
    else:
        assert spec is None and "top_k" not in report
        with pytest.raises(ValueError, match="fixed top-k"):
            EdgeModel(out, top_k=1)


@pytest.mark.parametrize("method", ["frequency", "chen2022", "reap", "uncurl", "hc-smoe", "random"])
def test_every_method_runs_on_every_family(method, family_dirs, tmp_path):
    for family in FAMS:
        plan = tmp_path / f"{family}-{method}.json"
        cli(["score", "--model", str(family_dirs[family]), "--method", method, "--experts", "2",
             "--calibration-examples", "48", "--out", str(plan)] + words(family))
        layers = json.loads(plan.read_text())["layers"]
        assert len(layers) == 2 and all(len(lp["groups"]) == 2 for lp in layers)


def test_chowdhury_on_a_family_needs_pretrained(family_dirs, tmp_path, tiny_tokenizer):
    res = cli(["score", "--model", str(family_dirs["mixtral"]), "--method", "chowdhury2024", "--experts", "2",
               "--out", str(tmp_path / "p.json")], code=2)
    assert "--pretrained DIR" in res.output
    tok, vocab = tiny_tokenizer
    pre = tmp_path / "pre"
    tiny_family_model("mixtral", vocab=vocab, seed=5).save_pretrained(pre)
    cli(["score", "--model", str(family_dirs["mixtral"]), "--method", "chowdhury2024", "--experts", "2",
         "--pretrained", str(pre), "--out", str(tmp_path / "p.json")])


def test_prune_reapplies_a_plan_to_k2_and_reloads(family_dirs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    plan = tmp_path / "plan.json"
    cli(["score", "--model", str(family_dirs["qwen3_moe"]), "--method", "reap", "--experts", "2", "--out", str(plan),
         "--calibration-examples", "48"])
    out = tmp_path / "pruned"
    cli(["prune", "--model", str(family_dirs["qwen3_moe"]), "--plan", str(plan), "--recovery-steps", "0",
         "--out", str(out)])
    m = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(m).__name__ == "Qwen3MoeForSequenceClassification" and m.config.num_experts == 2


def test_hook_calibration_equals_the_bert_moe_blocks_own_routing_record(tiny_tokenizer):
    """The family-agnostic calibration (hooks + adapter.route + adapter.expert_forward) reproduces what the BERT-MoE
    block itself records (its routing and REAP's expert-output norms): the BERT-MoE plans do not move."""
    from edgeprune.pruning.calibration import calibration_batches, collect_routing
    from edgeprune.tasks import get_task, load_split
    from edgeprune.tasks.encoding import encode
    from tests.conftest import tiny_moe

    tok, vocab = tiny_tokenizer
    for top_k in (1, 2):
        model = tiny_moe(num_experts=4, vocab=vocab, top_k=top_k)
        enc = encode(load_split(get_task("sst2"), "train", limit=40), tok, 64)
        stats = collect_routing(model, enc, max_examples=40, batch_size=16, progress=False)
        counts = {l: np.zeros(4) for l in stats}
        reap = {l: np.zeros(4) for l in stats}
        blocks = model.moe_blocks()
        for b in blocks.values():
            b.record_expert_norms = True
        with torch.no_grad():
            for x in calibration_batches(enc, 40, 16, "", progress=False):
                model(**x)
                keep = x["attention_mask"].reshape(-1).bool()
                for l, b in blocks.items():
                    idx, gate, norm = b.last.top_idx[keep], b.last.top_gate[keep], b.last.expert_out_norm[keep]
                    counts[l] += np.bincount(idx.reshape(-1).numpy(), minlength=4)
                    reap[l] += np.bincount(idx.reshape(-1).numpy(), weights=(gate * norm).reshape(-1).double().numpy(),
                                           minlength=4)
        for l in stats:
            assert np.array_equal(stats[l].counts, counts[l])
            assert np.allclose(stats[l].reap_sum, reap[l], rtol=1e-5)


def test_deepseek_v3_fold_zero_pads_its_dense_first_layers_and_keeps_an_active_group_limit_when_keeping_all():
    model = tiny_family_model("deepseek_v3", vocab=100, num_hidden_layers=3, first_k_dense_replace=1,
                              n_group=3, topk_group=1)
    x = batch(100)
    with torch.no_grad():  # keep-all: the group limit (1 of 3 groups) stays and nothing moves
        assert torch.equal(apply_plan(model, plan_keeping(model, list(range(6))))(**x).logits, model(**x).logits)
    folded = apply_plan(model, plan_keeping(model, [4]))
    assert folded.config.first_k_dense_replace == 3 and folded.config.intermediate_size == 48  # max(48, 16 + 16)
    # the reference: expert 4 alone, choice and weight by the family's own router (group limit irrelevant for one)
    model.config.n_group = 1
    for b in adapter_for(model.config).blocks(model).values():
        b.gate.num_group, b.gate.topk_group = 1, 1
    with torch.no_grad():
        assert (masked_logits(model, [4], x) - folded(**x).logits).abs().max().item() <= 1e-5


def test_deepseek_v3_without_norm_topk_prob_refuses_one_expert(tmp_path, tiny_tokenizer):
    from edgeprune.errors import ConfigError

    model = tiny_family_model("deepseek_v3", vocab=100, norm_topk_prob=False)
    with pytest.raises(ConfigError, match="without norm_topk_prob cannot keep one expert"):
        apply_plan(model, plan_keeping(model, [1]))
    tok, vocab = tiny_tokenizer
    d = tmp_path / "ds"
    tiny_family_model("deepseek_v3", vocab=vocab, norm_topk_prob=False).save_pretrained(d)
    tok.save_pretrained(d)
    res = cli(["score", "--model", str(d), "--experts", "1", "--out", str(tmp_path / "p.json")], code=2)
    assert "use --experts 2" in res.output and not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("family", sorted(NO_ONE_EXPERT))
def test_one_expert_refused(family, family_dirs, tmp_path):
    res = cli(["build", "--model", str(family_dirs[family]), "--experts", "1", "--out", str(tmp_path / "a")], code=2)
    errors = [line for line in res.output.splitlines() if not line.startswith("[edgeprune]")]  # the target's preset line
    assert len(errors) == 1 and "use --experts 2" in errors[0] and not (tmp_path / "a").exists()


def test_every_registered_family_has_a_tiny_checkpoint_here_and_is_listed():
    from edgeprune.models.registry import all_adapters

    from edgeprune.models.families.table import ROWS
    from tests.test_table_families import FILES

    registered = {a.model_type for a in all_adapters()} - {"bert_moe"}  # bert_moe: tests/test_model.py
    assert registered == set(FAMS) | set(ROWS) | set(FILES)  # the table's rows and FILES: tests/test_table_families.py
    from edgeprune.models.families.multimodal import VIA_TEXT
    from edgeprune.models.families.refused import REFUSED

    out = cli(["families"]).output.splitlines()  # then the multimodal and the refused types, a line each
    assert len(out) == len(registered) + 1 + len(VIA_TEXT) + len(REFUSED)
    assert all(any(line.startswith(f"{f} ") for line in out) for f in registered)
    assert any("causal-lm (label words)" in line for line in out if line.startswith("olmoe "))


def test_switch_export_forward_applies_the_expert_capacity_exactly():
    """Capacity 2 with 9-token sequences: most tokens skip the sparse layers, in the family's order."""
    model = tiny_family_model("switch_transformers", vocab=100, expert_capacity=2)
    adapter = adapter_for(model.config)
    x = batch(100)
    with torch.no_grad():
        ref = model(**x).logits
        with adapter.export_patch(model):
            got = model(**x).logits
        roomy = tiny_family_model("switch_transformers", vocab=100, expert_capacity=64)(**x).logits
    assert torch.allclose(ref, got, atol=1e-5, rtol=0) and not torch.allclose(ref, roomy, atol=1e-4)


ORT_MOE = [f for f in FAMS if adapter_for(f).ort_moe]


@pytest.mark.parametrize("family", ORT_MOE)
def test_ort_moe_operator_equals_the_family_in_pytorch_and_in_onnx_runtime(family, tmp_path):
    """The operator's semantics (PyTorch, the traced forward) equal the family's forward, and ONNX Runtime's
    com.microsoft.MoE equals both (fp32; 1e-5), at several batch and sequence shapes."""
    from dataclasses import replace

    import onnxruntime as ort

    from edgeprune.export.onnx_export import export_onnx
    from edgeprune.export.ort_moe import ort_moe_patch
    from edgeprune.targets import load_target

    model = apply_plan(tiny_family_model(family, vocab=100), plan_keeping(tiny_family_model(family, vocab=100),
                                                                           [0, 2, 3, 5]), fold=False)
    adapter = adapter_for(model.config)
    x = batch(100)
    with torch.no_grad():
        ref = model(**x).logits
        with ort_moe_patch(adapter, model):
            assert torch.allclose(model(**x).logits, ref, atol=1e-5, rtol=0)
    target = load_target("x86_64")
    target = replace(target, export=replace(target.export, moe_operator="ort"))
    assert export_onnx(model, tmp_path, tmp_path / "m.onnx", target) == "torch.onnx+ort_moe"
    import onnx

    assert any(n.op_type == "MoE" and n.domain == "com.microsoft" for n in onnx.load(str(tmp_path / "m.onnx")).graph.node)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for b, s in ((2, 7), (3, 9), (5, 17)):
        xs = batch(100, seed=b, b=b, s=s)
        got = sess.run(["logits"], {k: v.numpy() for k, v in xs.items()})[0]
        with torch.no_grad():
            want = model(**xs).logits.numpy()
        assert np.abs(got - want).max() <= 1e-5, (b, s)


def test_parity_gate_fails_a_trace_that_dropped_the_experts_its_example_did_not_reach(tmp_path, tiny_tokenizer):
    """The family's own forward, traced without the export patch, keeps only the experts the all-ones example
    reached; the parity gate on task inputs at several batch sizes must refuse that graph."""
    from edgeprune.errors import ExportError
    from edgeprune.export.onnx_export import parity
    from edgeprune.tasks import get_task, load_split
    from edgeprune.tasks.encoding import encode

    tok, vocab = tiny_tokenizer
    model = tiny_family_model("mixtral", vocab=vocab)
    model.set_experts_implementation("eager")  # the per-expert loop (grouped_mm does not export at all)

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).logits

    ones = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(Logits(model), (ones, ones), str(tmp_path / "bad.onnx"), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}},
                          opset_version=17, dynamo=False)
    enc = encode(load_split(get_task("sst2"), "validation", limit=40), tok, 64)
    with pytest.raises(ExportError, match="lost parity"):
        parity(tmp_path / "bad.onnx", model, enc)


@pytest.mark.parametrize("family", [f for f in FAMS if adapter_for(f).dense is not None])
def test_ffn_keep_slims_every_folded_sibling(family, family_dirs, tmp_path):
    """--ffn-keep 0.5 on the folded dense sibling: every FFN keeps half its neurons; the checkpoint reloads."""
    from edgeprune.models.registry import load_classifier

    out = tmp_path / "slim"
    cli(["prune", "--model", str(family_dirs[family]), "--experts", "1", "--ffn-keep", "0.5", "--recovery-steps", "0",
         "--calibration-examples", "16", "--out", str(out)] + words(family))
    info = json.loads((out / "edgeprune_prune.json").read_text())["ffn"]
    full, slim = info["intermediate_size"]
    assert slim == round(full / 2)
    model = load_classifier(out)
    adapter = adapter_for(family)
    from edgeprune.pruning.neurons import ffn_paths

    for _, out_path in ffn_paths(model, adapter).values():
        assert model.get_submodule(out_path).weight.shape[1] == slim


def test_a_bf16_checkpoint_loads_in_its_dtype_or_the_one_asked(tmp_path, tiny_tokenizer):
    from edgeprune.models.loading import load_model
    from edgeprune.tasks import get_task

    tok, vocab = tiny_tokenizer
    d = tmp_path / "bf16"
    tiny_family_checkpoint("qwen3_moe", vocab=vocab).to(torch.bfloat16).save_pretrained(d)
    tok.save_pretrained(d)
    assert next(load_model(d, task=get_task("sst2")).parameters()).dtype == torch.bfloat16
    assert next(load_model(d, task=get_task("sst2"), dtype="float32").parameters()).dtype == torch.float32
    for extra in ([], ["--dtype", "float32"]):
        cli(["score", "--model", str(d), "--experts", "2", "--calibration-examples", "16",
             "--out", str(tmp_path / "p.json")] + extra)


def test_reap_uses_renormalised_top_k_gates_where_the_family_does_not_renormalise(tiny_tokenizer):
    """Qwen3-MoE without norm_topk_prob routes with raw softmax gates; REAP's saliency sums g / sum(top-k g)."""
    from edgeprune.pruning.calibration import calibration_batches, collect_routing
    from edgeprune.tasks import get_task, load_split
    from edgeprune.tasks.encoding import encode, model_inputs

    tok, vocab = tiny_tokenizer
    model = tiny_family_model("qwen3_moe", vocab=vocab)
    adapter = adapter_for(model.config)
    enc = encode(load_split(get_task("sst2"), "train", limit=24), tok, 64)
    stats = collect_routing(model, enc, max_examples=24, batch_size=8, progress=False)
    want = {l: np.zeros(6) for l in stats}
    seen = {}
    hooks = [b.register_forward_pre_hook((lambda l: lambda m, a: seen.__setitem__(l, a[0].reshape(-1, a[0].shape[-1])))(l))
             for l, b in adapter.blocks(model).items()]
    with torch.no_grad():
        for x in calibration_batches(enc, 24, 8, "", progress=False):
            model(**model_inputs(model, x))
            keep = x["attention_mask"].reshape(-1).bool()
            for l, b in adapter.blocks(model).items():
                h = seen[l][keep]
                _, idx, gate = adapter.routing(b, h)
                assert not torch.allclose(gate.sum(-1), torch.ones(len(gate)))  # the family does not renormalise
                g = gate / gate.sum(-1, keepdim=True)
                for slot in range(idx.shape[1]):
                    for t in range(len(h)):
                        e = int(idx[t, slot])
                        want[l][e] += float(g[t, slot]) * float(adapter.expert_forward(b, e, h[t : t + 1]).norm())
    for h in hooks:
        h.remove()
    for l in stats:
        assert np.allclose(stats[l].reap_sum, want[l], rtol=1e-4)


def test_a_sharded_checkpoint_loads_like_the_single_file(tmp_path, tiny_tokenizer):
    from edgeprune.models.loading import load_model
    from edgeprune.tasks import get_task

    tok, vocab = tiny_tokenizer
    model = tiny_family_checkpoint("mixtral", vocab=vocab)
    one, shards = tmp_path / "one", tmp_path / "shards"
    model.save_pretrained(one)
    model.save_pretrained(shards, max_shard_size="30KB")
    for d in (one, shards):
        tok.save_pretrained(d)
    assert len(list(shards.glob("model-*.safetensors"))) >= 3 and (shards / "model.safetensors.index.json").is_file()
    x = batch(vocab)
    with torch.no_grad():
        a = load_model(one, task=get_task("sst2"))(**x).logits
        b = load_model(shards, task=get_task("sst2"))(**x).logits
    assert torch.equal(a, b)
    cli(["score", "--model", str(shards), "--experts", "2", "--calibration-examples", "16", "--out", str(tmp_path / "p.json")])


@pytest.mark.parametrize("fam,k", [("mixtral", 1), ("mixtral", 2), ("deepseek_v3", 1), ("gpt_oss", 2)])
def test_a_large_model_exports_with_dynamo_into_external_data(fam, k, family_dirs, tmp_path, cache, loose_targets,
                                                              monkeypatch):
    """Above LARGE_BYTES (here: any size) the export traces the model's skeleton on the meta device with the dynamo
    exporter and reads each weight into external data when the graph is written; PyTorch's parity logits are
    computed layer by layer. Same parity gate, every expert weight a 2-D int8 MatMul weight (the fused expert
    tensors sliced per expert, not gathered at run time), the quantizer run without its deep copy, no data file
    left in the artifact (the quantized graph holds its own weights). DeepSeek-V3: a router with a real correction
    bias (the trace runs wholly on the meta device), and its class folded in place at k = 1 (the layer list found
    without MoE blocks); gpt-oss: transposed fused experts with biases, attention sinks."""
    import onnx

    from edgeprune.export import onnx_export

    monkeypatch.setattr(onnx_export, "LARGE_BYTES", 0)
    out = tmp_path / "art"
    res = cli(["build", "--model", str(family_dirs[fam]), "--target", "x86_64", "--experts", str(k), "--out",
               str(out)] + FAST + words(fam))
    assert "(large: the dynamo exporter on the meta device, weights read one at a time into external data)" in res.output
    report = json.loads((out / "report.json").read_text())
    # k = 1: Mixtral folds into Mistral, DeepSeek-V3 into its own class with every layer dense: no experts left
    assert report["export"]["exporter"] == ("torch.onnx.dynamo" if k == 1 else "torch.onnx.dynamo+dense_dispatch")
    assert report["export"]["parity_fp32"]["max_abs_logit_diff"] < 1e-4
    assert "top_k" not in report  # no run-time top-k input on this path
    assert not list(out.rglob("*.data")) and not list(next(cache.glob("stages/export-*")).glob("*.data"))
    graph = onnx.load(str(out / "onnx" / "model_quantized.onnx")).graph
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type in ("Gather", "MatMul") and ranks.get(n.input[0], 0) > 2]
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in ranks]  # every weight int8
    int8 = {n.input[1] for n in graph.node if n.op_type == "MatMulInteger"}
    assert all(ranks[w] == 2 for w in int8)
    expert = 2 * 2 * k if k > 1 else 2 * 2  # layers x kept experts x (gate_up, down); k = 1: the folded MLP's
    assert len(int8) >= expert + 2 * 4  # and each layer's q, k, v, o
