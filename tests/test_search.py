"""``edgeprune search`` and ``build --search`` on a tiny MoE: a candidate within budgets in seconds, the Pareto
table and a valid PNG plot, the chosen candidate built into the artifact; bad input is one line."""
import json
from pathlib import Path

from click.testing import CliRunner

from edgeprune.cli import main
from edgeprune.build.search import SearchSpace, knob_options, run_search

FAST = ["--calibration-examples", "64", "--recovery-steps", "4", "--eval-examples", "48", "--latency-iters", "5"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_search_returns_a_candidate_within_budgets_and_a_plot(tmp_path, cache, tiny_original, loose_targets):
    from edgeprune.build.config import BuildConfig
    from edgeprune.targets import load_target
    from edgeprune.pruning.config import PruneConfig
    from edgeprune.tasks import get_task

    cfg = BuildConfig(task=get_task("sst2"), target=load_target("x86_64"), out=tmp_path / "unused",
                      model_dir=str(tiny_original), eval_examples=48, latency_iters=5,
                      prune=PruneConfig(calibration_examples=64, recovery_steps=4))
    space = SearchSpace(drop_layers=(0, 1, 2, 5), heads_keep=(1.0, 0.5), ffn_keep=(1.0,), vocab_reserve=(-1,))
    lines = []
    result = run_search(cfg, tmp_path / "s", space, trials=4, log=lines.append)
    assert 1 <= len(result.candidates) <= 4  # repeated combinations are not rebuilt
    assert all(c.knobs["drop_layers"] in (0, 1) for c in result.candidates)  # the tiny MoE has 2 layers
    assert result.chosen is not None and result.chosen.ok
    assert result.chosen.size_mb == min(c.size_mb for c in result.candidates if c.ok)
    assert any(c.pareto for c in result.candidates)
    assert (tmp_path / "s" / "pareto.png").read_bytes()[:8] == PNG
    table = (tmp_path / "s" / "pareto.md").read_text()
    assert "(chosen)" in table and "Pareto" in table
    assert json.loads((tmp_path / "s" / "pareto.json").read_text())["chosen"]["number"] == result.chosen.number
    assert any(l.startswith("[search] trial 1/4:") for l in lines)
    assert "accuracy on the selection split" in table
    for c in result.candidates:  # every candidate was measured on the selection split, not on validation
        report = json.loads((Path(c.artifact) / "report.json").read_text())
        assert report["data"]["validation_split"] == "selection"
        assert report["data"]["examples"] == 48
        assert "selection split (a seeded 10% of the training split)" in (Path(c.artifact) / "README.md").read_text()


def test_selection_split_is_carved_from_train_and_never_touches_validation():
    from edgeprune.tasks import get_task
    from edgeprune.tasks.spec import DataSpec

    task = get_task("rte")
    train = DataSpec().load(task, "train")
    sel_train, sel = DataSpec(selection=True).load(task, "train"), DataSpec(selection=True).load(task, "validation")
    key = lambda rows: {(e.text, e.text_pair, e.label) for e in rows}
    assert len(sel) == int(0.1 * len(train)) and not key(sel) & key(sel_train)
    assert key(sel) | key(sel_train) <= key(train) and len(sel) + len(sel_train) >= 0.99 * len(train)
    assert not {(e.text, e.text_pair) for e in sel} & {(e.text, e.text_pair) for e in DataSpec().load(task, "validation")}
    assert DataSpec(selection=True).key() != DataSpec().key()
    assert len(DataSpec(selection=True).load(task, "validation", limit=20)) == 20
    import pytest

    from edgeprune.errors import ConfigError

    for selection in (False, True):
        with pytest.raises(ConfigError, match="^unknown split 'test'; use train or validation$"):
            DataSpec(selection=selection).load(task, "test")


def test_knob_options_read_as_build_options():
    assert knob_options({"drop_layers": 2, "heads_keep": 0.5, "ffn_keep": 1.0, "vocab_reserve": 2000}) == \
        "--drop-layers 2 --heads-keep 0.5 --vocab-reserve 2000"
    assert knob_options({"drop_layers": 0, "heads_keep": 1.0, "ffn_keep": 0.75, "vocab_reserve": -1}) == \
        "--ffn-keep 0.75 (full vocabulary)"


def test_build_with_search_puts_the_front_in_the_artifact(tmp_path, cache, tiny_original, loose_targets):
    out = tmp_path / "art"
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--search", "2", "--out", str(out)] + FAST,
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "[edgeprune] search chose" in res.output
    assert (out / "search" / "pareto.png").read_bytes()[:8] == PNG and (out / "search" / "pareto.md").is_file()
    assert json.loads((out / "report.json").read_text())["search"] == ["search/pareto.json", "search/pareto.md",
                                                                        "search/pareto.png"]
    assert "`search/pareto.md`" in (out / "report.md").read_text()


def test_search_command_and_its_errors(tmp_path, cache, tiny_original, loose_targets):
    res = CliRunner().invoke(main, ["search", "--model", str(tiny_original), "--trials", "1", "--out",
                                    str(tmp_path / "s")] + FAST, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "build it: edgeprune build --task sst2 --target x86_64" in res.output
    res = CliRunner().invoke(main, ["search", "--model", str(tiny_original), "--experts", "2", "--out",
                                    str(tmp_path / "s2")] + FAST)
    assert res.exit_code == 2 and "error: search prunes the folded dense model: use --experts 1" in res.output
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--search", "1", "--plan", "p.json",
                                    "--out", str(tmp_path / "b")] + FAST)
    assert res.exit_code == 2 and "--search chooses the knobs itself; drop --plan" in res.output


def test_try_knobs_parse_and_refuse_in_one_line():
    import pytest

    from edgeprune.errors import ConfigError
    from edgeprune.build.search import parse_knobs, target_for
    from edgeprune.targets import load_target

    assert parse_knobs("drop_layers=2, heads-keep=0.75,vocab_reserve=2000,embedding_bits=4") == \
        {"drop_layers": 2, "heads_keep": 0.75, "vocab_reserve": 2000, "embedding_bits": 4}
    for bad, msg in (("depth=2", "unknown knob 'depth'"), ("drop_layers=two", "needs a number"),
                     ("heads_keep=0.6", "is not in the space")):
        with pytest.raises(ConfigError, match=msg):
            parse_knobs(bad)
    t = target_for(load_target("x86_64"), {"embedding_bits": 4})
    assert t.quantization.embedding_bits == 4 and t.name == "x86_64"


def test_a_tried_candidate_is_built_first_with_its_embedding_precision(tmp_path, cache, tiny_original, loose_targets):
    import onnx

    from edgeprune.build.config import BuildConfig
    from edgeprune.runtime.layout import model_file
    from edgeprune.targets import load_target
    from edgeprune.runtime.manifest import read_manifest
    from edgeprune.pruning.config import PruneConfig
    from edgeprune.tasks import get_task

    cfg = BuildConfig(task=get_task("sst2"), target=load_target("x86_64"), out=tmp_path / "unused",
                      model_dir=str(tiny_original), eval_examples=48, latency_iters=5,
                      prune=PruneConfig(calibration_examples=64, recovery_steps=4))
    seed = {"drop_layers": 0, "heads_keep": 1.0, "ffn_keep": 1.0, "vocab_reserve": -1, "embedding_bits": 4}
    result = run_search(cfg, tmp_path / "s", trials=1, log=lambda _: None, seeds=(seed,))
    assert [c.knobs for c in result.candidates] == [seed]
    art = Path(result.candidates[0].artifact)
    ops = {n.op_type for n in onnx.load(str(model_file(art, read_manifest(art)))).graph.node}
    assert "GatherBlockQuantized" in ops
    assert "--embedding-bits 4" in (tmp_path / "s" / "pareto.md").read_text()


def test_build_embedding_bits_4_needs_an_int8_dynamic_target(tmp_path, tiny_original):
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", "mobile-gpu",
                                    "--embedding-bits", "4", "--out", str(tmp_path / "b")] + FAST)
    assert res.exit_code == 2 and "--embedding-bits 4 goes with int8-dynamic targets" in res.output
