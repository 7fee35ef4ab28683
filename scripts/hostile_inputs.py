"""Hostile inputs against every command: each case must end in one ``error:`` line with a documented exit code
(or succeed where the input is merely unusual), never a traceback, never exit 70 (unexpected), never a
half-written output, never a changed input.

    python scripts/hostile_inputs.py            # -> results/hostile_inputs.md / .json

Tiny models built from config classes (a BERT-MoE, a Mixtral classifier, an OLMoE language model, the tiny
WordPiece tokenizer of the tests) and one tiny artifact built once; every case runs the CLI in-process
(click's CliRunner) in a fresh copy of what it may damage. Verdicts: ``ok`` (exit 0 where success is right, or
one error line with a documented code), ``weak`` (exit 0 where the input is wrong, or an error of several
lines), ``bad`` (traceback, exit 70, output left behind, input changed).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from click.testing import CliRunner  # noqa: E402

from edgeprune.cli import main  # noqa: E402
from edgeprune.validate.results import command_line, write_results  # noqa: E402

DOCUMENTED = {1: "budget", 2: "usage / config", 3: "data", 4: "model", 5: "export", 130: "interrupted"}
FAST = ["--calibration-examples", "16", "--recovery-steps", "1", "--eval-examples", "16", "--latency-iters", "5"]


@dataclass
class Case:
    name: str
    args: Callable[["World"], list[str]]  # the command line, given the prepared world
    setup: Callable[["World"], None] = lambda w: None  # damage a copy before the run
    expect: str = "error"  # "error" or "ok"
    watch: Callable[["World"], list[Path]] = lambda w: []  # inputs that must stay untouched
    out: Callable[["World"], Optional[Path]] = lambda w: None  # an output that must not exist after a failure
    group: str = ""


@dataclass
class World:
    root: Path
    bert: Path = None
    mixtral: Path = None
    lm: Path = None
    gen: Path = None  # a causal-LM Mixtral with a byte-level BPE tokenizer (chat template): the --generate path
    artifact: Path = None
    decoder: Path = None  # a `build --generate` artifact
    files: dict = field(default_factory=dict)

    def p(self, name: str) -> Path:
        return self.root / name

    def copy(self, src: Path, name: str) -> Path:
        dst = self.root / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        return dst


def tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    paths = sorted(d.rglob("*")) if d.is_dir() else [d]
    for p in paths:
        h.update(str(p).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# -- the world ----------------------------------------------------------------------------------------------------
def build_world(root: Path) -> World:
    from tests.conftest import make_tokenizer, tiny_moe
    from tests.families import tiny_family_checkpoint

    w = World(root)
    tok, vocab = make_tokenizer(root / "tok")
    for name, model in (("bert", tiny_moe(num_experts=4, vocab=vocab)),
                        ("mixtral", tiny_family_checkpoint("mixtral", vocab=vocab)),
                        ("lm", tiny_family_checkpoint("olmoe", vocab=vocab))):
        d = root / "models" / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        setattr(w, name, d)
    targets = root / "targets"
    targets.mkdir()
    repo = Path(__file__).resolve().parents[1] / "targets"
    for f in repo.glob("*.toml"):  # budgets a random tiny model can meet
        text = f.read_text().replace("max_accuracy_drop = ", "max_accuracy_drop = 100.0 #").replace(
            "min_agreement = ", "min_agreement = 0.0 #")
        text = re.sub(r"drop_layers = \d+", "drop_layers = 1", text)  # the tiny models have 2 layers
        text = re.sub(r"\n(max_perplexity_ratio|max_quantization_perplexity_ratio|max_label_accuracy_drop|"
                      r"min_decode_speedup) = [0-9.]+", "", text)  # [generate] budgets: no random model meets them
        (targets / f.name).write_text(text)
    os.environ["EDGEPRUNE_TARGETS"] = str(targets)
    os.environ["EDGEPRUNE_CACHE"] = str(root / "cache")
    w.artifact = root / "artifact"
    res = CliRunner().invoke(main, ["build", "--model", str(w.bert), "--target", "x86_64", "--out", str(w.artifact)]
                             + FAST)
    if res.exit_code != 0:
        raise SystemExit(f"could not build the tiny artifact: {res.output[-400:]}")
    from tests.conftest import make_bpe_tokenizer
    from tests.test_generation_build import tiny_causal_lm

    bpe, bpe_vocab = make_bpe_tokenizer(root / "bpe")
    w.gen = root / "models" / "gen"
    tiny_causal_lm("mixtral", bpe_vocab).save_pretrained(w.gen)
    bpe.save_pretrained(w.gen)
    w.decoder = root / "decoder"
    res = CliRunner().invoke(main, ["build", "--generate", "--model", str(w.gen), "--target", "x86_64", "--out",
                                    str(w.decoder)] + FAST[:4] + ["--eval-examples", "8"])
    if res.exit_code != 0:
        raise SystemExit(f"could not build the tiny decoder artifact: {res.output[-400:]}")
    return w


# -- data files ---------------------------------------------------------------------------------------------------
GOOD_TSV = "sentence\tlabel\n" + "".join(f"a fine film number {i}\t{i % 2}\n" for i in range(40))


def data_case(name: str, content: bytes | str, suffix: str = ".tsv", expect: str = "error", extra=()) -> Case:
    def setup(w: World, content=content):
        f = w.p(f"data{suffix}")
        f.write_bytes(content if isinstance(content, bytes) else content.encode())

    return Case(f"data: {name}", lambda w: ["score", "--model", str(w.bert), "--train-file", str(w.p(f"data{suffix}")),
                                           "--eval-file", str(w.p(f"data{suffix}")), "--experts", "1",
                                           "--calibration-examples", "8", "--out", str(w.p("plan.json")), *extra],
                setup, expect, out=lambda w: w.p("plan.json"), group="data")


def data_cases() -> list[Case]:
    long_field = "sentence\tlabel\n" + "x" * 2_000_000 + "\t1\n" + GOOD_TSV.split("\n", 1)[1]
    return [
        data_case("non-UTF-8 bytes", b"sentence\tlabel\n\xff\xfe\xfa bad\t1\n" * 3),
        data_case("fake .gz (plain text)", GOOD_TSV, ".tsv.gz"),
        data_case("truncated .gz", gzip.compress(GOOD_TSV.encode())[:40], ".tsv.gz"),
        data_case("valid .gz", gzip.compress(GOOD_TSV.encode()), ".tsv.gz", expect="ok"),
        data_case("UTF-8 byte-order mark", "\ufeff" + GOOD_TSV, expect="ok"),
        data_case("unclosed quote (CSV)", 'sentence,label\n"a fine film,1\n' + "b,0\n" * 10, ".csv"),
        data_case("quote in TSV (literal, as GLUE)", 'sentence\tlabel\n"a fine film\t1\n' + GOOD_TSV.split("\n", 1)[1],
                  expect="ok"),
        data_case("field of 2 MB", long_field),
        data_case("empty file", ""),
        data_case("header only", "sentence\tlabel\n"),
        data_case("missing label column", "sentence\tother\n" + "a film\t1\n" * 5),
        data_case("unknown label", "sentence\tlabel\n" + "a film\tmaybe\n" * 5),
        data_case("empty label", "sentence\tlabel\n" + "a film\t\n" * 5),
        data_case("too few columns", "sentence\tlabel\n" + "a film\n" * 5),
        data_case("too many columns", "sentence\tlabel\n" + "a film\t1\textra\n" * 5),
        data_case("binary junk", bytes(range(256)) * 8),
        data_case("NUL bytes in text", "sentence\tlabel\n" + "a\x00film\t1\n" * 5, expect="ok"),
        data_case("CSV given .tsv name", "sentence,label\n" + "a film,1\n" * 5),
        data_case("CSV", "sentence,label\n" + "".join(f"film {i},{i % 2}\n" for i in range(20)), ".csv", "ok"),
        data_case("JSONL", "".join(json.dumps({"sentence": f"film {i}", "label": i % 2}) + "\n" for i in range(20)),
                  ".jsonl", "ok"),
        data_case("JSONL with a broken line", '{"sentence": "a", "label": 1}\n{"sentence": \n', ".jsonl"),
        data_case("JSONL not objects", "[1, 2]\n[3, 4]\n", ".jsonl"),
        data_case("JSONL label as list", json.dumps({"sentence": "a", "label": [1]}) + "\n", ".jsonl"),
        data_case("unknown extension", GOOD_TSV, ".parquet"),
        data_case("only one class", "sentence\tlabel\n" + "a film\t1\n" * 10, expect="ok"),
        data_case("whitespace-only texts", "sentence\tlabel\n" + "   \t1\n \t0\n" * 5),
        data_case("some empty texts (dropped, counted)", GOOD_TSV + "\t1\n  \t0\n", expect="ok"),
        data_case("JSONL with null texts (dropped, counted)", "".join(json.dumps({"sentence": None if i % 3 == 0 else
                  f"film {i}", "label": i % 2}) + "\n" for i in range(20)), ".jsonl", "ok"),
        data_case("JSONL whose texts are all null", "".join(json.dumps({"sentence": None, "label": i % 2}) + "\n"
                                                           for i in range(20)), ".jsonl"),
        data_case("JSONL with a null label", json.dumps({"sentence": "a film", "label": None}) + "\n", ".jsonl"),
        Case("data: a named pipe as file", lambda w: ["score", "--model", str(w.bert), "--train-file", str(w.p("fifo")),
                                                      "--eval-file", str(w.p("fifo")), "--out", str(w.p("plan.json"))],
             setup=lambda w: None if w.p("fifo").exists() else os.mkfifo(w.p("fifo")), group="data"),
        Case("data: /dev/null as file", lambda w: ["score", "--model", str(w.bert), "--train-file", "/dev/null",
                                                   "--eval-file", "/dev/null", "--out", str(w.p("plan.json"))],
             group="data"),
        data_case("CRLF line ends", GOOD_TSV.replace("\n", "\r\n"), expect="ok"),
        data_case("emoji and right-to-left text", "sentence\tlabel\n" + "🎬 فيلم رائع\t1\nשלום 😀\t0\n" * 10, expect="ok"),
        Case("data: file does not exist", lambda w: ["score", "--model", str(w.bert), "--train-file", str(w.p("nope.tsv")),
                                                     "--eval-file", str(w.p("nope.tsv")), "--out", str(w.p("plan.json"))],
             group="data"),
        Case("data: a directory as file", lambda w: ["score", "--model", str(w.bert), "--train-file", str(w.root),
                                                     "--eval-file", str(w.root), "--out", str(w.p("plan.json"))],
             group="data"),
        Case("data: unreadable file", lambda w: ["score", "--model", str(w.bert), "--train-file", str(w.p("locked.tsv")),
                                                 "--eval-file", str(w.p("locked.tsv")), "--out", str(w.p("plan.json"))],
             setup=lambda w: (w.p("locked.tsv").write_text(GOOD_TSV), w.p("locked.tsv").chmod(0)), group="data",
             expect="ok" if os.geteuid() == 0 else "error"),  # root reads it anyway
        Case("data: unknown --text-column", lambda w: ["score", "--model", str(w.bert), "--train-file", str(w.p("d.tsv")),
                                                       "--eval-file", str(w.p("d.tsv")), "--text-column", "nope",
                                                       "--out", str(w.p("plan.json"))],
             setup=lambda w: w.p("d.tsv").write_text(GOOD_TSV), group="data"),
        Case("data: a task without data and no files", lambda w: ["score", "--task", "completion", "--model",
                                                                   str(w.bert), "--out", str(w.p("plan.json"))],
             group="data"),
        Case("data: --text-pair-column on a single-text task",
             lambda w: ["score", "--model", str(w.bert), "--train-file", str(w.p("d.tsv")), "--eval-file",
                        str(w.p("d.tsv")), "--text-pair-column", "label", "--out", str(w.p("plan.json"))],
             setup=lambda w: w.p("d.tsv").write_text(GOOD_TSV), group="data"),
    ]


# -- model directories --------------------------------------------------------------------------------------------
def model_case(name: str, damage: Callable[[Path], None], command: str = "score", expect: str = "error",
               base: str = "bert", extra=()) -> Case:
    def args(w: World):
        d = w.p("model")
        if command == "score":
            return ["score", "--model", str(d), "--experts", "1", "--calibration-examples", "8",
                    "--out", str(w.p("plan.json")), *extra]
        if command == "prune":
            return ["prune", "--model", str(d), "--experts", "1", "--calibration-examples", "8", "--recovery-steps",
                    "0", "--out", str(w.p("pruned")), *extra]
        return ["build", "--model", str(d), "--target", "x86_64", "--out", str(w.p("art")), *FAST, *extra]

    def setup(w: World):
        damage(w.copy(getattr(w, base), "model"))

    outs = {"score": "plan.json", "prune": "pruned", "build": "art"}
    return Case(f"{command}: {name}", args, setup, expect, out=lambda w: w.p(outs[command]), group="model")


def _json_edit(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def _onnx(d: Path) -> Path:
    """The artifact's ONNX file (the manifest's model_file)."""
    return d / json.loads((d / "edgeprune.json").read_text())["model_file"]


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _poison(d: Path, which: str, value: float) -> None:
    """A non-finite value in the first tensor whose name contains ``which``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    name = next(k for k in sorted(tensors) if which in k and tensors[k].is_floating_point())
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def model_cases() -> list[Case]:
    cases = []
    damages = [
        ("no config.json", lambda d: (d / "config.json").unlink()),
        ("config.json not JSON", lambda d: (d / "config.json").write_text("{ not json")),
        ("config.json not UTF-8", lambda d: (d / "config.json").write_bytes(b"\xff\xfe{}")),
        ("config.json is a list", lambda d: (d / "config.json").write_text("[1, 2]")),
        ("no model_type", lambda d: _json_edit(d / "config.json", model_type=None)),
        ("unknown model_type", lambda d: _json_edit(d / "config.json", model_type="llama_moe_9000")),
        ("dense model_type (bert)", lambda d: _json_edit(d / "config.json", model_type="bert")),
        ("no weights", lambda d: (d / "model.safetensors").unlink()),
        ("pickle-only weights", lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin")),
        ("truncated safetensors", lambda d: _truncate(d / "model.safetensors", 1000)),
        ("safetensors header garbage", lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}" + b"\x00" * 64)),
        ("empty safetensors file", lambda d: (d / "model.safetensors").write_bytes(b"")),
        ("weights of another width (hidden_size)", lambda d: _json_edit(d / "config.json", hidden_size=64, intermediate_size=128)),
        ("fewer experts in config than weights", lambda d: _json_edit(d / "config.json", num_experts_per_layer=[2])),
        ("labels differ from the task", lambda d: _json_edit(d / "config.json", id2label={"0": "a", "1": "b", "2": "c"},
                                                             label2id={"a": 0, "b": 1, "c": 2})),
        ("no tokenizer.json", lambda d: (d / "tokenizer.json").unlink()),
        ("tokenizer.json not JSON", lambda d: (d / "tokenizer.json").write_text("{ nope")),
        ("index names a missing shard", lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"x": "model-00002-of-00002.safetensors"}}))),
        ("index without weight_map", lambda d: (d / "model.safetensors.index.json").write_text("{}")),
        ("architectures name a missing class", lambda d: _json_edit(d / "config.json", architectures=["NoSuchModel"])),
        ("top-k above the expert count", lambda d: _json_edit(d / "config.json", num_experts_per_tok=9)),
        ("negative expert count", lambda d: _json_edit(d / "config.json", num_experts_per_layer=[-1])),
        ("MoE layer index out of range", lambda d: _json_edit(d / "config.json", moe_layers=[7])),
        ("directory of one file named config.json/", lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir())),
        ("num_hidden_layers a string", lambda d: _json_edit(d / "config.json", num_hidden_layers="two")),
        ("hidden_size negative", lambda d: _json_edit(d / "config.json", hidden_size=-32)),
        ("NaN in an expert weight", lambda d: _poison(d, "experts", float("nan"))),
        ("infinity in a router weight", lambda d: _poison(d, "router", float("inf"))),
        ("NaN in an attention weight", lambda d: _poison(d, "attention.self.query.weight", float("nan"))),
        ("index names a file outside the checkpoint", lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"x": "../../../../etc/passwd"}}))),
        ("index names an absolute path", lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"x": "/etc/passwd"}}))),
    ]
    for name, damage in damages:
        cases.append(model_case(name, damage))
    cases += [model_case(name + " (layer-wise)", damage, extra=("--layerwise",)) for name, damage in damages
              if name.startswith(("NaN", "infinity"))]  # the streaming check of the layer-wise path
    for name, damage in damages[:8] + damages[9:12]:
        cases.append(model_case(name, damage, command="prune"))
    for name, damage in damages[:2] + damages[8:10]:
        cases.append(model_case(name, damage, command="build"))
    cases += [
        model_case("labels named otherwise (bad, good)", lambda d: _json_edit(d / "config.json", id2label={
            "0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1})),
        model_case("labels the task's in another order", lambda d: _json_edit(d / "config.json", id2label={
            "0": "positive", "1": "negative"}, label2id={"positive": 0, "negative": 1}), expect="ok"),
        model_case("labels mapped with --label-map", lambda d: _json_edit(d / "config.json", id2label={
            "0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1}), expect="ok",
            extra=("--label-map", "bad=negative,good=positive")),
        model_case("Mixtral pad id differs from the tokenizer", lambda d: _json_edit(d / "config.json", pad_token_id=5),
                   base="mixtral"),
        model_case("Mixtral causal LM architectures with classifier weights",
                   lambda d: _json_edit(d / "config.json", architectures=["MixtralForCausalLM"]), base="mixtral"),
        model_case("LM: verbalisers collide", lambda d: None, base="lm", extra=("--verbalisers", "zzz,yyy")),
        model_case("LM: verbaliser count differs", lambda d: None, base="lm", extra=("--verbalisers", "bad")),
        model_case("LM: prompt without {text}", lambda d: None, base="lm", extra=("--prompt", "Label:")),
        model_case("LM: prompt with an unknown field", lambda d: None, base="lm", extra=("--prompt", "{text} {x}")),
        model_case("LM: default label words", lambda d: None, base="lm", expect="error"),
        model_case("LM: good label words", lambda d: None, base="lm", expect="ok", extra=("--verbalisers", "bad,good")),
        model_case("classifier given --prompt", lambda d: None, base="mixtral", extra=("--prompt", "{text} x")),
        Case("score: --model does not exist", lambda w: ["score", "--model", str(w.p("none")), "--out", str(w.p("p.json"))],
             out=lambda w: w.p("p.json"), group="model"),
        Case("score: --model is a file", lambda w: ["score", "--model", str(w.bert / "config.json"),
                                                    "--out", str(w.p("p.json"))], out=lambda w: w.p("p.json"), group="model"),
        Case("score: --dtype bfloat16", lambda w: ["score", "--model", str(w.bert), "--dtype", "bfloat16",
                                                   "--calibration-examples", "8", "--out", str(w.p("p.json"))],
             expect="ok", group="model"),
        Case("score: --dtype int8", lambda w: ["score", "--model", str(w.bert), "--dtype", "int8",
                                               "--out", str(w.p("p.json"))], group="model"),
    ]
    return cases


# -- artifacts: check and predict ---------------------------------------------------------------------------------
def artifact_case(name: str, damage: Callable[[Path], None], command: str, expect: str = "error", extra=()) -> Case:
    def args(w: World):
        d = w.p("art")
        if command == "check":
            return ["check", str(d), *extra]
        return ["predict", str(d), "a fine film", *extra]

    def setup(w: World):
        damage(w.copy(w.artifact, "art"))

    return Case(f"{command}: {name}", args, setup, expect, group="artifact")


def artifact_cases() -> list[Case]:
    damages = [
        ("no edgeprune.json", lambda d: (d / "edgeprune.json").unlink()),
        ("edgeprune.json not JSON", lambda d: (d / "edgeprune.json").write_text("{")),
        ("edgeprune.json a list", lambda d: (d / "edgeprune.json").write_text("[]")),
        ("manifest without labels", lambda d: _json_edit(d / "edgeprune.json", labels=None)),
        ("manifest labels not a list", lambda d: _json_edit(d / "edgeprune.json", labels="negative")),
        ("manifest with three labels for two outputs", lambda d: _json_edit(d / "edgeprune.json", labels=["a", "b", "c"])),
        ("manifest max_length a string", lambda d: _json_edit(d / "edgeprune.json", max_length="long")),
        ("manifest max_length 0", lambda d: _json_edit(d / "edgeprune.json", max_length=0)),
        ("no report.json", lambda d: (d / "report.json").unlink()),
        ("report.json not JSON", lambda d: (d / "report.json").write_text("nope")),
        ("report without budgets", lambda d: _json_edit(d / "report.json", budgets=None)),
        ("no tokenizer.json", lambda d: (d / "tokenizer.json").unlink()),
        ("tokenizer.json not JSON", lambda d: (d / "tokenizer.json").write_text("{")),
        ("tokenizer.json of another kind", lambda d: (d / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))),
        ("no ONNX model", lambda d: _onnx(d).unlink()),
        ("ONNX model truncated", lambda d: _truncate(_onnx(d), 2000)),
        ("ONNX model empty", lambda d: _onnx(d).write_bytes(b"")),
        ("ONNX model is text", lambda d: _onnx(d).write_text("hello")),
        ("manifest model_file outside the artifact", lambda d: _json_edit(d / "edgeprune.json", model_file="../x.onnx")),
        ("manifest model_file a number", lambda d: _json_edit(d / "edgeprune.json", model_file=3)),
        ("manifest label_words without template", lambda d: _json_edit(d / "edgeprune.json", label_words={"verbalisers": []})),
        ("manifest pad_id outside the vocabulary", lambda d: _json_edit(d / "edgeprune.json", pad_id=1000000000)),
        ("manifest threads 100000", lambda d: _json_edit(d / "edgeprune.json", threads=100000)),
        ("manifest fixed_shape of a billion tokens", lambda d: _json_edit(d / "edgeprune.json", fixed_shape=[1, 10 ** 9])),
        ("manifest max_length of a billion", lambda d: _json_edit(d / "edgeprune.json", max_length=10 ** 9)),
        ("manifest ort_disabled_optimizers a string", lambda d: _json_edit(d / "edgeprune.json",
                                                                           ort_disabled_optimizers="all")),
        ("manifest threads a string", lambda d: _json_edit(d / "edgeprune.json", threads="all")),
        ("manifest input_names bogus", lambda d: _json_edit(d / "edgeprune.json", input_names=["pixels"])),
        ("manifest input_names not the graph's", lambda d: _json_edit(d / "edgeprune.json", input_names=["input_ids"])),
        ("manifest model_file a link outside", lambda d: (_onnx(d).unlink(), _onnx(d).symlink_to("/etc/hostname"))),
    ]
    report_only = ("no report.json", "report.json not JSON", "report without budgets")  # predict does not read it
    cases = [artifact_case(n, f, "predict", expect="ok" if n in report_only else "error") for n, f in damages]
    cases += [artifact_case(n, f, "check", expect="ok" if n == "report without budgets" else "error")
              for n, f in damages]
    cases += [
        artifact_case("intact", lambda d: None, "predict", expect="ok"),
        Case("serve: not an artifact", lambda w: ["serve", str(w.p("empty"))], setup=lambda w: w.p("empty").mkdir(exist_ok=True),
             group="artifact"),
        Case("serve: manifest input_names not the graph's", lambda w: ["serve", str(w.p("art")), "--port", "0"],
             setup=lambda w: _json_edit(w.copy(w.artifact, "art") / "edgeprune.json", input_names=["input_ids"]),
             group="artifact"),
        Case("serve: manifest pad_id outside the vocabulary", lambda w: ["serve", str(w.p("art")), "--port", "0"],
             setup=lambda w: _json_edit(w.copy(w.artifact, "art") / "edgeprune.json", pad_id=10 ** 9),
             group="artifact"),
        Case("serve: no demo page", lambda w: ["serve", str(w.p("art"))],
             setup=lambda w: (w.copy(w.artifact, "art") / "demo" / "index.html").unlink(), group="artifact"),
        Case("serve: --lib without transformers.min.js",
             lambda w: ["serve", str(w.p("art")), "--lib", str(w.p("empty")), "--port", "0"],
             setup=lambda w: (w.copy(w.artifact, "art"), w.p("empty").mkdir(exist_ok=True)), group="artifact"),
        artifact_case("intact", lambda d: None, "check", expect="ok"),
        artifact_case("--max-size-mb nan", lambda d: None, "check", extra=("--max-size-mb", "nan")),
        artifact_case("--max-size-mb inf", lambda d: None, "check", extra=("--max-size-mb", "inf")),
        artifact_case("--max-size-mb -1", lambda d: None, "check", extra=("--max-size-mb", "-1")),
        artifact_case("--min-agreement 2", lambda d: None, "check", extra=("--min-agreement", "2")),
        artifact_case("--max-p95-latency-ms 0.0001 (a real violation: exit 1)", lambda d: None, "check",
                      extra=("--max-p95-latency-ms", "0.0001")),
        artifact_case("--budget missing file", lambda d: None, "check", extra=("--budget", "/nonexistent.toml")),
        Case("check: --budget not TOML", lambda w: ["check", str(w.artifact), "--budget", str(w.p("b.toml"))],
             setup=lambda w: w.p("b.toml").write_text("max = = 1"), group="artifact"),
        Case("check: --budget unknown key", lambda w: ["check", str(w.artifact), "--budget", str(w.p("b.toml"))],
             setup=lambda w: w.p("b.toml").write_text("max_speed = 1\n"), group="artifact"),
        Case("check: --budget NaN value", lambda w: ["check", str(w.artifact), "--budget", str(w.p("b.toml"))],
             setup=lambda w: w.p("b.toml").write_text("max_size_mb = nan\n"), group="artifact"),
        artifact_case("empty text", lambda d: None, "predict", expect="ok", extra=("",)),
        artifact_case("10,000-word text", lambda d: None, "predict", expect="ok", extra=("word " * 10000,)),
        artifact_case("emoji and right-to-left", lambda d: None, "predict", expect="ok", extra=("😀 فيلم שלום",)),
        artifact_case("NUL and control characters", lambda d: None, "predict", expect="ok", extra=("a\x00b\x07c",)),
        artifact_case("--pair on a single-text task", lambda d: None, "predict", extra=("--pair", "x")),
        artifact_case("--proba", lambda d: None, "predict", expect="ok", extra=("--proba",)),
        Case("predict: directory does not exist", lambda w: ["predict", str(w.p("none")), "x"], group="artifact"),
        Case("predict: no texts", lambda w: ["predict", str(w.artifact)], group="artifact"),
        Case("check: directory does not exist", lambda w: ["check", str(w.p("none"))], group="artifact"),
        Case("check: a checkpoint, not an artifact", lambda w: ["check", str(w.bert)], group="artifact"),
        Case("predict: a checkpoint, not an artifact", lambda w: ["predict", str(w.bert), "x"], group="artifact"),
    ]
    return cases


# -- target profiles ----------------------------------------------------------------------------------------------
def target_case(name: str, toml: str, expect: str = "error") -> Case:
    def setup(w: World):
        base = (Path(os.environ["EDGEPRUNE_TARGETS"]) / "x86_64.toml").read_text()
        w.p("t.toml").write_text(base + "\n" + toml if toml.startswith("#append") else toml)

    return Case(f"target: {name}", lambda w: ["build", "--model", str(w.bert), "--target", str(w.p("t.toml")),
                                             "--out", str(w.p("art")), *FAST],
                setup, expect, out=lambda w: w.p("art"), group="target")


def target_cases() -> list[Case]:
    return [
        target_case("not TOML", "name = = x"),
        target_case("unknown top-level key", 'speed = "max"'),
        target_case("unknown section key", "[export]\nopset = 17\nfast = true\n"),
        target_case("section not a table", "export = 3\n"),
        target_case("opset a string", '[export]\nopset = "17"\n'),
        target_case("opset 7 (too old)", "[export]\nopset = 7\n"),
        target_case("opset 99 (too new)", "[export]\nopset = 99\n"),
        target_case("batch_size 0", "[export]\nfixed_shapes = true\nbatch_size = 0\n"),
        target_case("sequence_length -4", "[export]\nfixed_shapes = true\nsequence_length = -4\n"),
        target_case("sequence_length beyond the model's positions", "[export]\nfixed_shapes = true\nsequence_length = 100000\n"),
        target_case("moe_operator unknown", '[export]\nmoe_operator = "fast"\n'),
        target_case("[generate].moe_operator unknown", '[generate]\nmoe_operator = "ort"\n'),
        target_case("precision unknown", '[quantization]\nprecision = "int3"\n'),
        target_case("calibration_examples 0", '[quantization]\nprecision = "int8-static"\ncalibration_examples = 0\n'),
        target_case("threads 0", "[runtime]\nthreads = 0\n"),
        target_case("provider unknown", '[runtime]\nprovider = "TPUExecutionProvider"\n'),
        target_case("max_size_mb nan", "[budgets]\nmax_size_mb = nan\n"),
        target_case("max_size_mb -1", "[budgets]\nmax_size_mb = -1.0\n"),
        target_case("max_p95_latency_ms inf", "[budgets]\nmax_p95_latency_ms = inf\n"),
        target_case("min_agreement 1.5", "[budgets]\nmin_agreement = 1.5\n"),
        target_case("latency_batch 0", "[budgets]\nlatency_batch = 0\n"),
        target_case("latency_seq_len 0", "[budgets]\nlatency_seq_len = 0\n"),
        target_case("budget violated (tiny size budget)", "[budgets]\nmax_size_mb = 0.001\nmax_accuracy_drop = 100.0\n"
                    "min_agreement = 0.0\n"),
        target_case("empty profile (all defaults)", "", expect="ok"),
        Case("target: unknown name", lambda w: ["build", "--model", str(w.bert), "--target", "riscv", "--out",
                                                str(w.p("art"))], out=lambda w: w.p("art"), group="target"),
        Case("target: path does not exist", lambda w: ["build", "--model", str(w.bert), "--target", str(w.p("no.toml")),
                                                       "--out", str(w.p("art"))], out=lambda w: w.p("art"), group="target"),
    ]


# -- plans --------------------------------------------------------------------------------------------------------
def plan_case(name: str, edit: Callable[[dict], object], expect: str = "error") -> Case:
    def setup(w: World):
        res = CliRunner().invoke(main, ["score", "--model", str(w.bert), "--experts", "2", "--calibration-examples", "8",
                                        "--out", str(w.p("plan.json"))])
        assert res.exit_code == 0, res.output
        plan = json.loads(w.p("plan.json").read_text())
        new = edit(plan)
        w.p("plan.json").write_text(new if isinstance(new, str) else json.dumps(plan if new is None else new))

    return Case(f"plan: {name}", lambda w: ["prune", "--model", str(w.bert), "--plan", str(w.p("plan.json")),
                                           "--recovery-steps", "0", "--out", str(w.p("pruned"))],
                setup, expect, out=lambda w: w.p("pruned"), group="plan")


def _set_group(plan, value):
    plan["layers"][0]["groups"][0] = value


def plan_cases() -> list[Case]:
    return [
        plan_case("intact", lambda p: None, expect="ok"),
        plan_case("not JSON", lambda p: "{"),
        plan_case("a list", lambda p: "[]"),
        plan_case("no layers", lambda p: (p.pop("layers"), None)[1]),
        plan_case("unknown method", lambda p: p.__setitem__("method", "magic")),
        plan_case("expert id a string", lambda p: _set_group(p, [["0", 1.0]])),
        plan_case("expert id a float", lambda p: _set_group(p, [[0.5, 1.0]])),
        plan_case("expert id negative", lambda p: _set_group(p, [[-1, 1.0]])),
        plan_case("expert id out of range", lambda p: _set_group(p, [[99, 1.0]])),
        plan_case("expert kept twice", lambda p: p["layers"][0].__setitem__("groups", [[[0, 1.0]], [[0, 1.0]]])),
        plan_case("merge weights summing to 0", lambda p: _set_group(p, [[0, 1.0], [1, -1.0]])),
        plan_case("merge weight NaN", lambda p: _set_group(p, [[0, float("nan")]])),
        plan_case("output_scale inf", lambda p: p["layers"][0].__setitem__("output_scale", float("inf"))),
        plan_case("output_scale a string", lambda p: p["layers"][0].__setitem__("output_scale", "x")),
        plan_case("layer that does not exist", lambda p: p["layers"][0].__setitem__("layer", 42)),
        plan_case("layer listed twice", lambda p: p["layers"].append(p["layers"][0])),
        plan_case("empty group", lambda p: _set_group(p, [])),
        plan_case("no groups in a layer", lambda p: p["layers"][0].__setitem__("groups", [])),
        plan_case("num_experts differs from the model", lambda p: p["layers"][0].__setitem__("num_experts", 3)),
        plan_case("a group removed by hand (k = 1: folds)", lambda p: (p["layers"][0]["groups"].pop(), None)[1],
                  expect="ok"),
        Case("plan: file does not exist", lambda w: ["prune", "--model", str(w.bert), "--plan", str(w.p("none.json")),
                                                     "--out", str(w.p("pruned"))], out=lambda w: w.p("pruned"), group="plan"),
    ]


# -- options and outputs ------------------------------------------------------------------------------------------
def option_cases() -> list[Case]:
    def score(*extra):
        return lambda w: ["score", "--model", str(w.bert), "--calibration-examples", "8", *extra,
                          "--out", str(w.p("plan.json"))]

    def prune(*extra):
        return lambda w: ["prune", "--model", str(w.bert), "--calibration-examples", "8", "--recovery-steps", "0", *extra,
                          "--out", str(w.p("pruned"))]

    watch_bert = lambda w: [w.bert]  # noqa: E731
    return [
        Case("score: --experts 0", score("--experts", "0"), group="option"),
        Case("score: --experts -1", score("--experts", "-1"), group="option"),
        Case("score: --experts 100", score("--experts", "100"), group="option"),
        Case("score: --experts abc", score("--experts", "abc"), group="option"),
        Case("score: --coverage 0", score("--coverage", "0"), group="option"),
        Case("score: --coverage 1.5", score("--coverage", "1.5"), group="option"),
        Case("score: --coverage nan", score("--coverage", "nan"), group="option"),
        Case("score: --experts and --coverage", score("--experts", "1", "--coverage", "0.5"), group="option"),
        Case("score: --calibration-examples 0", lambda w: ["score", "--model", str(w.bert), "--calibration-examples", "0",
                                                           "--out", str(w.p("plan.json"))], group="option"),
        Case("score: unknown method", score("--method", "magic"), group="option"),
        Case("score: unknown task", score("--task", "imdb"), group="option"),
        Case("score: chowdhury2024 without --pretrained", score("--method", "chowdhury2024", "--experts", "2"),
             group="option"),
        Case("score: chowdhury2024 --pretrained missing dir", score("--method", "chowdhury2024", "--experts", "2",
                                                                    "--pretrained", "/nonexistent"), group="option"),
        Case("score: progressive method", score("--method", "chen2022-progressive"), group="option"),
        Case("score: --out is a directory", lambda w: ["score", "--model", str(w.bert), "--out", str(w.root)],
             group="option"),
        Case("score: --out under a file", lambda w: ["score", "--model", str(w.bert), "--out",
                                                     str(w.bert / "config.json" / "plan.json")], watch=watch_bert,
             group="option"),
        Case("score: --out over the model's config", lambda w: ["score", "--model", str(w.bert), "--out",
                                                                str(w.bert / "config.json")], watch=watch_bert,
             group="option"),
        Case("score: --out in /proc", lambda w: ["score", "--model", str(w.bert), "--out", "/proc/edgeprune/plan.json"],
             group="option"),
        Case("prune: --out equals --model", lambda w: ["prune", "--model", str(w.bert), "--out", str(w.bert)],
             watch=watch_bert, group="option"),
        Case("prune: --out inside --model", lambda w: ["prune", "--model", str(w.bert), "--out", str(w.bert / "x")],
             watch=watch_bert, group="option"),
        Case("prune: --out the model's parent", lambda w: ["prune", "--model", str(w.bert), "--out", str(w.bert.parent)],
             watch=watch_bert, group="option"),
        Case("build: --out equals --model", lambda w: ["build", "--model", str(w.bert), "--out", str(w.bert)],
             watch=watch_bert, group="option"),
        Case("build: --out inside the cache", lambda w: ["build", "--model", str(w.bert), "--out",
                                                         os.environ["EDGEPRUNE_CACHE"] + "/x"], group="option"),
        Case("build: --out over the data file", lambda w: ["build", "--model", str(w.bert), "--train-file", str(w.p("d.tsv")),
                                                           "--eval-file", str(w.p("d.tsv")), "--out", str(w.p("d.tsv"))],
             setup=lambda w: w.p("d.tsv").write_text(GOOD_TSV), watch=lambda w: [w.p("d.tsv")], group="option"),
        Case("build: --out unwritable parent", lambda w: ["build", "--model", str(w.bert), "--out", "/proc/x/art"],
             group="option"),
        Case("build: --out a user's folder", lambda w: ["build", "--model", str(w.bert), "--out", str(w.p("mine"))],
             setup=_users_folder, watch=lambda w: [w.p("mine")], group="output"),
        Case("prune: --out a user's folder", lambda w: ["prune", "--model", str(w.bert), "--out", str(w.p("mine"))],
             setup=_users_folder, watch=lambda w: [w.p("mine")], group="output"),
        Case("upcycle: --out a user's folder", lambda w: ["upcycle", "--out", str(w.p("mine"))],
             setup=_users_folder, watch=lambda w: [w.p("mine")], group="output"),
        Case("export-lm: --out a user's folder", lambda w: ["export-lm", str(w.bert), "--out", str(w.p("mine"))],
             setup=_users_folder, watch=lambda w: [w.p("mine")], group="output"),
        Case("build: --out a link to a user's folder", lambda w: ["build", "--model", str(w.bert), "--out",
                                                                  str(w.p("link"))],
             setup=lambda w: (_users_folder(w), _relink(w.p("link"), w.p("mine"))),
             watch=lambda w: [w.p("mine")], group="output"),
        Case("build: --out a dangling link", lambda w: ["build", "--model", str(w.bert), "--out", str(w.p("link"))],
             setup=lambda w: _relink(w.p("link"), w.p("nowhere")), group="output"),
        Case("build: --out the current folder", lambda w: ["build", "--model", str(w.bert), "--out", "."],
             group="output"),
        Case("build: --out a folder around the current one", lambda w: ["build", "--model", str(w.bert), "--out",
                                                                        str(Path.cwd().parent)], group="output"),
        Case("prune: --ffn-keep 0", prune("--experts", "1", "--ffn-keep", "0"), group="option"),
        Case("prune: --ffn-keep 1.5", prune("--experts", "1", "--ffn-keep", "1.5"), group="option"),
        Case("prune: --ffn-keep with --experts 2", prune("--experts", "2", "--ffn-keep", "0.5"), group="option"),
        Case("prune: --recovery-steps -1", lambda w: ["prune", "--model", str(w.bert), "--recovery-steps", "-1",
                                                      "--out", str(w.p("pruned"))], group="option"),
        Case("upcycle: --top-k above --num-experts", lambda w: ["upcycle", "--top-k", "4", "--num-experts", "2",
                                                                "--out", str(w.p("up"))], group="option"),
        Case("upcycle: --num-experts 0", lambda w: ["upcycle", "--num-experts", "0", "--out", str(w.p("up"))],
             group="option"),
        Case("upcycle: duplicate --moe-layers", lambda w: ["upcycle", "--moe-layers", "1,1",
                                                           "--out", str(w.p("up"))], group="option"),
        Case("upcycle: --moe-layers out of range", lambda w: ["upcycle", "--moe-layers", "40", "--out", str(w.p("up"))],
             group="option"),
        Case("upcycle: --dense is a MoE", lambda w: ["upcycle", "--dense", str(w.bert), "--out", str(w.p("up"))],
             group="option"),
        Case("upcycle: --drop-fraction 2", lambda w: ["upcycle", "--drop-fraction", "2", "--out", str(w.p("up"))],
             group="option"),
        Case("original: --steps 0", lambda w: ["original", "--steps", "0"], group="option"),
        Case("baseline: --dense missing", lambda w: ["baseline", "--dense", "/nonexistent"], group="option"),
        Case("unknown command", lambda w: ["shrink"], group="option"),
        Case("unknown option", lambda w: ["build", "--speed", "max"], group="option"),
        Case("families", lambda w: ["families"], expect="ok", group="option"),
        Case("tasks", lambda w: ["tasks"], expect="ok", group="option"),
        Case("targets", lambda w: ["targets"], expect="ok", group="option"),
    ]


def _users_folder(w: World) -> None:
    """A folder of the user's own, which an --out must never replace."""
    d = w.p("mine")
    if d.exists():
        shutil.rmtree(d)
    (d / "src").mkdir(parents=True)
    (d / "notes.txt").write_text("mine")


def _relink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


# -- running ------------------------------------------------------------------------------------------------------
def run_case(w: World, case: Case) -> dict:
    for leftover in ("plan.json", "pruned", "art", "up", "model", "t.toml", "dec", "art.rejected", "mine", "link"):
        p = w.p(leftover)
        if p.is_symlink():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    case.setup(w)
    watched = {p: tree_hash(p) for p in case.watch(w) if p.exists()}
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, case.args(w))
    seconds = time.perf_counter() - t0
    text = res.output or ""
    errors = [l for l in text.splitlines() if l.startswith(("error:", "Error:"))]
    if res.exit_code == 1:  # budget violations: one line each, by design
        errors = [l for l in text.splitlines() if l.startswith("budget violated:")][:1] or errors
    first = errors[0] if errors else (text.strip().splitlines() or [""])[0]
    traceback = "Traceback" in text or (res.exception is not None and not isinstance(res.exception, SystemExit))
    out = case.out(w)
    problems = []
    if traceback:
        problems.append(f"traceback ({type(res.exception).__name__})")
    if res.exit_code == 70:
        problems.append("unexpected error (exit 70)")
    if res.exit_code not in (0, 70) and res.exit_code not in DOCUMENTED:
        problems.append(f"undocumented exit code {res.exit_code}")
    if res.exit_code != 0 and out is not None and out.exists():
        problems.append(f"output left behind: {out.name}")
    for p, h in watched.items():
        if tree_hash(p) != h:
            problems.append(f"input changed: {p.name}")
    if problems:
        verdict = "bad"
    elif case.expect == "error" and res.exit_code == 0:
        verdict, problems = "weak", ["accepted"]
    elif case.expect == "ok" and res.exit_code not in (0,):
        verdict, problems = "weak", ["refused a valid input"]
    elif res.exit_code != 0 and len(errors) != 1:
        verdict, problems = "weak", [f"{len(errors)} error lines"]
    else:
        verdict = "ok"
    return {"group": case.group, "case": case.name, "command": case.args(w)[0], "exit_code": res.exit_code,
            "first_line": first[:160], "verdict": verdict, "problems": problems, "seconds": round(seconds, 2)}


GEN_FAST = ["--calibration-examples", "8", "--recovery-steps", "1", "--eval-examples", "8"]


def _no_chat_template(d: Path) -> None:
    (d / "chat_template.jinja").unlink(missing_ok=True)
    _json_edit(d / "tokenizer_config.json", chat_template=None)


def generation_cases() -> list[Case]:
    """``--generate`` (build, score, prune), ``generate``, ``export-lm`` and ``check`` of a decoder artifact."""
    def build(*extra, model="gen"):
        return lambda w: ["build", "--generate", "--model", str(getattr(w, model)), "--target", "x86_64", *GEN_FAST,
                          *extra, "--out", str(w.p("art"))]

    def write(name, text):
        return lambda w: w.p(name).write_text(text)

    good = "".join(f'{{"prompt": "Q: film {i}?\\nA:", "completion": " yes {i}"}}\n' for i in range(12))
    chat = "".join('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   for _ in range(12))
    out = lambda w: w.p("art")  # noqa: E731
    watch = lambda w: [w.gen]  # noqa: E731
    cases = [
        Case("build --generate: a classifier checkpoint", build(model="bert"), out=out),
        Case("build --generate: a sequence-classification MoE", build(model="mixtral"), out=out),
        Case("build --generate: the tiny Mixtral LM", build(), expect="ok", watch=watch),
        Case("build --generate: prompt/completion JSONL", lambda w: build("--task", "completion", "--train-file",
             str(w.p("g.jsonl")), "--eval-file", str(w.p("g.jsonl")))(w), setup=write("g.jsonl", good), expect="ok",
             watch=watch),
        Case("build --generate: chat messages", lambda w: build("--task", "completion", "--train-file",
             str(w.p("c.jsonl")), "--eval-file", str(w.p("c.jsonl")))(w), setup=write("c.jsonl", chat), expect="ok"),
        Case("build --generate: chat messages, tokenizer without a chat template",
             lambda w: ["build", "--generate", "--model", str(w.p("model")), "--target", "x86_64", "--task",
                        "completion", "--train-file", str(w.p("c.jsonl")), "--eval-file", str(w.p("c.jsonl")),
                        *GEN_FAST, "--out", str(w.p("art"))],
             setup=lambda w: (write("c.jsonl", chat)(w), w.copy(w.gen, "model"), _no_chat_template(w.p("model"))),
             out=out),
        Case("build --generate: JSONL line not JSON", lambda w: build("--task", "completion", "--train-file",
             str(w.p("g.jsonl")))(w), setup=write("g.jsonl", good + "{oops\n"), out=out),
        Case("build --generate: JSONL without completion", lambda w: build("--task", "completion", "--train-file",
             str(w.p("g.jsonl")))(w), setup=write("g.jsonl", good + '{"prompt": "x"}\n'), out=out),
        Case("build --generate: empty completion", lambda w: build("--task", "completion", "--train-file",
             str(w.p("g.jsonl")))(w), setup=write("g.jsonl", good + '{"prompt": "x", "completion": " "}\n'), out=out),
        Case("build --generate: last message not the assistant's", lambda w: build(
             "--task", "completion", "--train-file", str(w.p("c.jsonl")))(w), out=out,
             setup=write("c.jsonl", '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", '
                                    '"content": "b"}]}\n')),
        Case("build --generate: completion task without files", build("--task", "completion"), out=out),
        Case("score: generation JSONL without --generate", lambda w: ["score", "--model", str(w.gen), "--task",
             "completion", "--train-file", str(w.p("g.jsonl")), "--eval-file", str(w.p("g.jsonl")), "--out",
             str(w.p("plan.json"))], setup=write("g.jsonl", good), out=lambda w: w.p("plan.json")),
        Case("build --generate: --drop-layers", build("--drop-layers", "1"), out=out),
        Case("build --generate: --ffn-keep", build("--ffn-keep", "0.5"), out=out),
        Case("build --generate: --search", build("--search", "2"), out=out),
        Case("build --generate: --embedding-bits", build("--embedding-bits", "4"), out=out),
        Case("build --generate: --layerwise under a --max-memory it cannot fit", build("--layerwise", "--max-memory",
                                                                                   "0.001"), out=out),
        Case("build --generate: --fsdp without torchrun", build("--fsdp"), out=out),
        Case("build --generate: chen2022-eager", build("--method", "chen2022-eager", "--recovery-steps", "60"), out=out),
        Case("build --generate: --experts 9 of 6", build("--experts", "9"), out=out),
        Case("build --generate: a profile's [generate] weights int3", lambda w: ["build", "--generate", "--model",
             str(w.gen), "--target", str(w.p("t.toml")), "--out", str(w.p("art"))],
             setup=write("t.toml", 'name = "t"\n[generate]\nweights = "int3"\n'), out=out),
        Case("build --generate: [generate] budgets fail", lambda w: ["build", "--generate", "--model", str(w.gen),
             "--target", str(w.p("t.toml")), *GEN_FAST, "--out", str(w.p("art"))],
             setup=write("t.toml", 'name = "t"\n[generate]\nmax_size_mb = 0.0001\n'), out=out),
        Case("prune --generate: the tiny Mixtral LM", lambda w: ["prune", "--generate", "--model", str(w.gen),
             "--calibration-examples", "8", "--recovery-steps", "1", "--out", str(w.p("pruned"))], expect="ok",
             watch=watch),
        Case("score --generate: a classifier checkpoint", lambda w: ["score", "--generate", "--model", str(w.bert),
             "--out", str(w.p("plan.json"))], out=lambda w: w.p("plan.json")),
        Case("generate: the decoder artifact", lambda w: ["generate", str(w.decoder), "a fine film",
             "--max-new-tokens", "4"], expect="ok"),
        Case("generate: sampling, seeded, a stop string", lambda w: ["generate", str(w.decoder), "a fine film",
             "--max-new-tokens", "6", "--temperature", "0.8", "--top-p", "0.9", "--seed", "1", "--stop", "e"],
             expect="ok"),
        Case("generate: an empty prompt (BOS)", lambda w: ["generate", str(w.decoder), ""], expect="ok"),
        Case("generate: a prompt longer than the context", lambda w: ["generate", str(w.decoder), "film " * 400,
             "--max-new-tokens", "2"], expect="ok"),
        Case("generate: --max-new-tokens past the context", lambda w: ["generate", str(w.decoder), "hi",
             "--max-new-tokens", "5000"]),
        Case("generate: a classifier artifact", lambda w: ["generate", str(w.artifact), "hi"]),
        Case("generate: directory does not exist", lambda w: ["generate", str(w.p("none")), "hi"]),
        Case("generate: unknown --variant", lambda w: ["generate", str(w.decoder), "hi", "--variant", "int2"]),
        Case("generate: --top-p 0", lambda w: ["generate", str(w.decoder), "hi", "--top-p", "0"]),
        Case("generate: graph missing", lambda w: ["generate", str(w.p("dec")), "hi"],
             setup=lambda w: (w.copy(w.decoder, "dec"), (w.p("dec") / json.loads(
                 (w.p("dec") / "edgeprune.json").read_text())["model_file"]).unlink())),  # the graph it names
        Case("export-lm: a classifier checkpoint", lambda w: ["export-lm", str(w.bert), "--out", str(w.p("art"))],
             out=out),
        Case("export-lm: the tiny Mixtral MoE (not folded)", lambda w: ["export-lm", str(w.gen), "--out",
             str(w.p("art"))], expect="ok"),
        Case("check: the decoder artifact", lambda w: ["check", str(w.decoder)], expect="ok"),
        Case("check: decoder artifact, size over --max-size-mb", lambda w: ["check", str(w.decoder), "--max-size-mb",
             "0.0001"]),
        Case("check: decoder artifact, --budget NaN", lambda w: ["check", str(w.decoder), "--budget", str(w.p("b.toml"))],
             setup=write("b.toml", "[generate]\nmax_perplexity_ratio = nan\n")),
        Case("check: decoder artifact without report", lambda w: ["check", str(w.p("dec"))],
             setup=lambda w: (w.copy(w.decoder, "dec"), (w.p("dec") / "report.json").unlink())),
        Case("generate: manifest model_file outside the artifact", lambda w: ["generate", str(w.p("dec")), "hi"],
             setup=lambda w: _json_edit(w.copy(w.decoder, "dec") / "edgeprune.json", model_file="../x.onnx")),
        Case("generate: manifest variant file outside the artifact", lambda w: ["generate", str(w.p("dec")), "hi",
             "--variant", "int4"], setup=lambda w: _json_edit(w.copy(w.decoder, "dec") / "edgeprune.json",
                                                              variants={"int4": {"model_file": "/etc/hostname"}})),
        Case("generate: manifest threads 100000", lambda w: ["generate", str(w.p("dec")), "hi"],
             setup=lambda w: _json_edit(w.copy(w.decoder, "dec") / "edgeprune.json", threads=100000)),
        Case("generate: manifest eos ids not integers", lambda w: ["generate", str(w.p("dec")), "hi"],
             setup=lambda w: _json_edit(w.copy(w.decoder, "dec") / "edgeprune.json", eos_token_ids=["</s>"])),
    ]
    for c in cases:
        c.group = "generation"
    return cases


def all_cases() -> list[Case]:
    return (data_cases() + model_cases() + artifact_cases() + target_cases() + plan_cases() + option_cases()
            + generation_cases())


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/hostile_inputs")
    ap.add_argument("-k", dest="only", help="run only the cases whose name contains this")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        w = build_world(Path(tmp))
        cases = [c for c in all_cases() if not args.only or args.only in c.name]
        for i, case in enumerate(cases, 1):
            row = run_case(w, case)
            rows.append(row)
            print(f"[{i}/{len(cases)}] {row['verdict']:4s} {row['exit_code']:3d} {case.name}: {row['first_line'][:90]}",
                  flush=True)
    totals = {v: sum(r["verdict"] == v for r in rows) for v in ("ok", "weak", "bad")}
    commands = sorted({r["command"] for r in rows})
    md = ["# Hostile inputs", "", f"Command: `{command_line()}`", "",
          f"{len(rows)} cases across {len(commands)} commands ({', '.join(commands)}): "
          f"**{totals['ok']} ok, {totals['weak']} weak, {totals['bad']} bad**. ok: exit 0 where success is right, or "
          "exactly one `error:` line with a documented exit code (2 usage/config, 3 data, 4 model, 5 export, 1 budget); "
          "weak: accepted a wrong input, refused a valid one, or several error lines; bad: a traceback, exit 70 "
          "(unexpected), an output left behind after a failure, or an input changed.", "",
          "| group | case | exit | first line | verdict |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        line = r["first_line"].replace("|", "\\|")
        verdict = r["verdict"] + (f" ({'; '.join(r['problems'])})" if r["problems"] else "")
        md.append(f"| {r['group']} | {r['case']} | {r['exit_code']} | {line} | {verdict} |")
    write_results(args.out, {"totals": totals, "rows": rows}, md)
    print(f"{len(rows)} cases: {totals}")


if __name__ == "__main__":
    main_()
