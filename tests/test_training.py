"""The fine-tuning loop: an interrupted run resumes from its last checkpoint and ends where an uninterrupted run
ends, bit for bit (issue 29, item 3)."""
from __future__ import annotations

import pytest
import torch

from edgeprune.tasks import get_task, load_split
from edgeprune.tasks.encoding import encode
from edgeprune.training import loop
from edgeprune.training.loop import TrainConfig, train
from tests.conftest import tiny_moe


@pytest.fixture
def data(tiny_tokenizer):
    tok, vocab = tiny_tokenizer
    task = get_task("sst2")
    return encode(load_split(task, "train", limit=256), tok, 32), vocab


def run(data, checkpoint, interrupt_at=None, monkeypatch=None):
    enc, vocab = data
    model = tiny_moe(num_experts=4, vocab=vocab).train()
    cfg = TrainConfig(max_steps=12, batch_size=8, learning_rate=1e-3, seed=3, max_length=32)
    if interrupt_at is not None:
        calls = {"n": 0}
        real = loop._loss

        def loss(*a, **k):
            calls["n"] += 1
            if calls["n"] == interrupt_at:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(loop, "_loss", loss)
    try:
        record = train(model, enc, cfg, desc="fine-tune test", progress=False, checkpoint=checkpoint,
                       checkpoint_every=4)
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()
    return model, record


def test_an_interrupted_run_resumes_and_ends_where_an_uninterrupted_one_ends(data, tmp_path, monkeypatch, capsys):
    straight, record = run(data, tmp_path / "a")
    assert not (tmp_path / "a").exists()  # removed when the run completes
    with pytest.raises(KeyboardInterrupt):
        run(data, tmp_path / "b", interrupt_at=7, monkeypatch=monkeypatch)  # steps 0-5 done, checkpoint at 4
    assert (tmp_path / "b" / "state.json").is_file() and (tmp_path / "b" / "tensors.safetensors").is_file()
    resumed, record_b = run(data, tmp_path / "b")
    out = capsys.readouterr().out
    assert "resuming at step 4 of 12" not in out  # progress=False: quiet
    assert record_b["final_loss"] == record["final_loss"]
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "not bit for bit"
    assert not (tmp_path / "b").exists()


def test_a_checkpoint_of_another_run_is_ignored(data, tmp_path, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        run(data, tmp_path / "c", interrupt_at=7, monkeypatch=monkeypatch)
    enc, vocab = data
    model = tiny_moe(num_experts=4, vocab=vocab).train()
    cfg = TrainConfig(max_steps=6, batch_size=8, learning_rate=2e-3, seed=3, max_length=32)  # another run
    record = train(model, enc, cfg, desc="fine-tune test", progress=True, checkpoint=tmp_path / "c",
                   checkpoint_every=4)
    assert record["steps"] == 6
