"""A pruned model on disk: checkpoint, tokenizer (the pruned vocabulary's, if any), ``prune_plan.json`` and
``edgeprune_prune.json`` (the record of what was done); and the streamed checkpoint of the layer-wise path,
handed on without being loaded."""
from __future__ import annotations

import json
from pathlib import Path

from edgeprune.models.tokenizer import copy_tokenizer
from edgeprune.models.checkpoint import load_meta
from edgeprune.pruning.plan import PrunePlan


def tokenizer_json(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))


def save_pruned(model, original_dir: str | Path, out: str | Path, plan: PrunePlan,
                info: dict) -> None:
    """Checkpoint + tokenizer + ``prune_plan.json`` + ``edgeprune_prune.json`` into ``out``."""
    out = Path(out)
    model.save_pretrained(out)
    copy_tokenizer(original_dir, out)
    slim = getattr(model, "edgeprune_tokenizer_json", None)
    if slim is not None:  # a pruned vocabulary: tokenizer.json (and vocab.txt) rewritten to the kept tokens
        (out / "tokenizer.json").write_text(json.dumps(slim, ensure_ascii=False))
        if (out / "vocab.txt").is_file():
            vocab = slim["model"]["vocab"]
            (out / "vocab.txt").write_text("".join(t + "\n" for t in sorted(vocab, key=vocab.get)), encoding="utf-8")
    plan.save(out / "prune_plan.json")
    meta = load_meta(original_dir)
    (out / "edgeprune_prune.json").write_text(json.dumps({"original": str(original_dir), "task": meta.get("task"),
                                                          "plan": plan.summary(), **info}, indent=1, default=str))


class StreamedCheckpoint:
    """A pruned checkpoint written by :func:`edgeprune.pruning.stream.stream_apply` into a temporary directory and
    returned as it is when nothing after the plan needs the model in memory (``save_pretrained`` moves its files)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self._config = None

    @property
    def config(self):
        if self._config is None:
            from transformers import AutoConfig

            self._config = AutoConfig.from_pretrained(self.dir, local_files_only=True)
        return self._config

    def save_pretrained(self, out: str | Path) -> None:
        import shutil

        self.config  # read before the files move
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for f in self.dir.iterdir():
            shutil.move(str(f), out / f.name)
        self.discard()

    def discard(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def write_plan(plan: PrunePlan, out: str | Path) -> None:
    """``edgeprune score --out``: the plan as JSON (one line, exit 2, where it cannot be written)."""
    from edgeprune.errors import ConfigError

    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(plan.to_json())
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write the plan ({exc.strerror}); choose a writable path") from None


def save_atomic(model, original_dir: str | Path, out: str | Path, plan: PrunePlan, info: dict) -> None:
    """:func:`save_pruned` into ``out``, replacing what was there only once everything is written."""
    from edgeprune.cache import atomic_dir

    with atomic_dir(out) as tmp:
        save_pruned(model, original_dir, tmp, plan, info)
