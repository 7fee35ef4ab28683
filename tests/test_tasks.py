import json

import pytest

from edgeprune.errors import ConfigError, DataError
from edgeprune.tasks import get_task, load_split, read_table
from edgeprune.tasks.loading import Columns


def test_shipped_tasks_load_with_labels():
    for name, n_labels in (("sst2", 2), ("agnews", 4), ("rte", 2)):
        task = get_task(name)
        assert task.num_labels == n_labels
        for split in ("train", "validation"):
            rows = load_split(task, split, limit=50)
            assert len(rows) == 50
            assert {r.label for r in rows} <= set(range(n_labels))
            assert all((r.text_pair is not None) == task.is_pair for r in rows)


def test_agnews_validation_is_fixed_and_disjoint_from_train():
    task = get_task("agnews")
    val = load_split(task, "validation")
    train = load_split(task, "train")
    assert len(val) == 1000 and 8900 < len(train) < 9001
    assert not {r.text for r in val} & {r.text for r in train}
    assert [r.text for r in load_split(task, "validation")] == [r.text for r in val]


def test_unknown_task():
    with pytest.raises(ConfigError, match="unknown task 'qnli'; known tasks: agnews, completion, mnli, rte, sst2"):
        get_task("qnli")


def test_a_task_without_data_says_what_to_pass():
    with pytest.raises(DataError, match="task completion ships no data; pass --train-file"):
        load_split(get_task("completion"), "train")
    with pytest.raises(DataError, match="pass --eval-file"):
        load_split(get_task("completion"), "validation")


def test_mnli_ships_its_training_pairs_and_half_of_dev_matched():
    """The package carries the shipped MNLI subset as it carries sst2's (../shared/data/mnli, its README): 29,169
    training pairs, 4,907 validation pairs, three labels in GLUE order, premise and hypothesis as the pair."""
    import collections

    task = get_task("mnli")
    train, val = load_split(task, "train"), load_split(task, "validation")
    assert (len(train), len(val)) == (29169, 4907)
    assert set(collections.Counter(e.label for e in train)) == {0, 1, 2} and all(e.text_pair for e in val[:50])
    assert not {(e.text, e.text_pair) for e in val} & {(e.text, e.text_pair) for e in train}


def test_mnli_from_jsonl_and_csv(tmp_path):
    task = get_task("mnli")
    jl = tmp_path / "train.jsonl"
    jl.write_text("\n".join(json.dumps({"premise": f"p{i}", "hypothesis": f"h{i}", "label": lab})
                            for i, lab in enumerate(["entailment", "neutral", "2"])) + "\n")
    rows = load_split(task, "train", train_file=jl)
    assert [r.label for r in rows] == [0, 1, 2] and rows[0].text_pair == "h0"
    csvf = tmp_path / "dev.csv"
    csvf.write_text('a,b,gold\n"x, y",z,contradiction\n')
    rows = load_split(task, "validation", eval_file=csvf,
                      columns=Columns.for_task(task, text="a", text_pair="b", label="gold"))
    assert rows[0].text == "x, y" and rows[0].label == 2


def test_missing_column(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("text\tlabel\nhello\t1\n")
    with pytest.raises(DataError, match=r"d.tsv: line 2: missing column 'sentence' \(found: label, text\)"):
        read_table(f, get_task("sst2"))


def test_unknown_label(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("sentence\tlabel\ngood\t1\nbad\tmeh\n")
    with pytest.raises(DataError, match=r"d.tsv: line 3: unknown label 'meh' for task sst2 \(expected one of: "
                                        r"negative, positive\)"):
        read_table(f, get_task("sst2"))


def test_empty_file(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="d.tsv: empty file"):
        read_table(f, get_task("sst2"))


def test_wrong_delimiter(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("sentence,label\ngood,1\n")
    with pytest.raises(DataError, match="d.tsv: line 1: header has a single column .*comma-separated"):
        read_table(f, get_task("sst2"))


def test_ragged_row(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("sentence\tlabel\ngood\t1\textra\n")
    with pytest.raises(DataError, match="d.tsv: line 2: 3 fields where the header has 2"):
        read_table(f, get_task("sst2"))


def test_bad_json_and_format_and_missing(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"sentence": "a", "label": 1}\n{oops\n')
    with pytest.raises(DataError, match="d.jsonl: line 2: not valid JSON"):
        read_table(f, get_task("sst2"))
    g = tmp_path / "d.parquet"
    g.write_text("x")
    with pytest.raises(DataError, match="unknown file format '.parquet'"):
        read_table(g, get_task("sst2"))
    with pytest.raises(DataError, match="nope.tsv: file not found"):
        read_table(tmp_path / "nope.tsv", get_task("sst2"))
