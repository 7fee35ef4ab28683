"""The fine-tuning loops: an interrupted run resumes from its last checkpoint and ends where an uninterrupted run
ends, bit for bit (issue 29, item 3)."""
from __future__ import annotations

import contextlib
import random

import pytest
import torch

from edgeprune.tasks import get_task, load_split
from edgeprune.tasks.encoding import encode
from edgeprune.training import loop
from edgeprune.training.loop import TrainConfig, train
from edgeprune.training.resume import checkpoints_under
from tests.conftest import tiny_moe


@contextlib.contextmanager
def interrupted_at(monkeypatch, module, name: str, call: int):
    """``module.name`` raises KeyboardInterrupt (as Ctrl-C would) at its ``call``-th call inside the block, which
    expects it; the real function is back afterwards."""
    real = getattr(module, name)
    calls = {"n": 0}

    def stop(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(module, name, real)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def lm_data():
    """40 random token sequences as generation examples (completions from token 3)."""
    from edgeprune.tasks.generation import LMEncoded

    rng = random.Random(0)
    ids = [[rng.randrange(3, 90) for _ in range(rng.randrange(6, 14))] for _ in range(40)]
    return LMEncoded(ids, [3] * len(ids), [None] * len(ids))


@pytest.fixture
def data(tiny_tokenizer):
    tok, vocab = tiny_tokenizer
    task = get_task("sst2")
    return encode(load_split(task, "train", limit=256), tok, 32), vocab


def run(data, checkpoint):
    enc, vocab = data
    model = tiny_moe(num_experts=4, vocab=vocab).train()
    cfg = TrainConfig(max_steps=12, batch_size=8, learning_rate=1e-3, seed=3, max_length=32)
    record = train(model, enc, cfg, desc="fine-tune test", progress=False, checkpoint=checkpoint, checkpoint_every=4)
    return model, record


def test_an_interrupted_run_resumes_and_ends_where_an_uninterrupted_one_ends(data, tmp_path, monkeypatch, capsys):
    straight, record = run(data, tmp_path / "a")
    assert not (tmp_path / "a").exists()  # removed when the run completes
    with interrupted_at(monkeypatch, loop, "_loss", 7):
        run(data, tmp_path / "b")  # steps 0-5 done, checkpoint at 4
    assert (tmp_path / "b" / "state.json").is_file() and (tmp_path / "b" / "tensors.safetensors").is_file()
    resumed, record_b = run(data, tmp_path / "b")
    out = capsys.readouterr().out
    assert "resuming at step 4 of 12" not in out  # progress=False: quiet
    assert record_b["final_loss"] == record["final_loss"]
    assert same_weights(straight, resumed), "not bit for bit"
    assert not (tmp_path / "b").exists()


def test_a_checkpoint_of_another_run_is_ignored(data, tmp_path, monkeypatch):
    with interrupted_at(monkeypatch, loop, "_loss", 7):
        run(data, tmp_path / "c")
    enc, vocab = data
    model = tiny_moe(num_experts=4, vocab=vocab).train()
    cfg = TrainConfig(max_steps=6, batch_size=8, learning_rate=2e-3, seed=3, max_length=32)  # another run
    record = train(model, enc, cfg, desc="fine-tune test", progress=True, checkpoint=tmp_path / "c",
                   checkpoint_every=4)
    assert record["steps"] == 6


def test_the_decoders_distillation_resumes_bit_for_bit(tmp_path, monkeypatch):
    """The decoder's distillation (its own loop) checkpoints inside checkpoints_under and resumes exactly."""
    from transformers import MistralConfig, MistralForCausalLM

    from edgeprune.pruning import distill as distill_module
    from edgeprune.pruning.distill import distill

    enc = lm_data()

    def models():
        torch.manual_seed(1)
        cfg = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return MistralForCausalLM(cfg).eval(), MistralForCausalLM(cfg).eval()

    def run_distill(student, teacher):
        return distill(student, teacher, enc, 10, alpha=0.5, learning_rate=1e-3, progress=False)

    monkeypatch.setattr(distill_module, "CHECKPOINT_EVERY", 4)
    student, teacher = models()
    with checkpoints_under(tmp_path / "a"):
        straight = run_distill(student, teacher)
    with interrupted_at(monkeypatch, distill_module, "completion_mask", 7), checkpoints_under(tmp_path / "b"):
        run_distill(*models())
    assert (tmp_path / "b" / "distil" / "state.json").is_file()
    resumed, teacher = models()
    with checkpoints_under(tmp_path / "b"):
        again = run_distill(resumed, teacher)
    assert again["last_loss"] == straight["last_loss"] and again["last_kl"] == straight["last_kl"]
    assert same_weights(student, resumed) and not (tmp_path / "b" / "distil").exists()


def test_the_decoder_originals_fine_tune_resumes_bit_for_bit(tmp_path, monkeypatch):
    from transformers import MixtralConfig, MixtralForCausalLM

    from edgeprune.originals import decoder as decoder_module
    from edgeprune.pruning import distill as distill_module

    enc = lm_data()

    def model():
        torch.manual_seed(2)
        return MixtralForCausalLM(MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                num_local_experts=4, num_experts_per_tok=2,
                                                max_position_embeddings=64)).eval()

    monkeypatch.setattr(distill_module, "CHECKPOINT_EVERY", 4)
    straight = model()
    with checkpoints_under(tmp_path / "a"):
        decoder_module.fine_tune(straight, enc, 10, 8, 1e-3, 0, False)
    with interrupted_at(monkeypatch, distill_module, "batch", 7), checkpoints_under(tmp_path / "b"):
        decoder_module.fine_tune(model(), enc, 10, 8, 1e-3, 0, False)
    resumed = model()
    with checkpoints_under(tmp_path / "b"):
        decoder_module.fine_tune(resumed, enc, 10, 8, 1e-3, 0, False)
    assert same_weights(straight, resumed)
