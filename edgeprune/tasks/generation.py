"""Generation task data: prompts with completions, tokenised with the completion's span marked.

Three sources, one :class:`GenExample` each:

* JSONL with ``prompt`` and ``completion`` per line (the completion follows the prompt as it is: give it its
  leading space where the text needs one);
* JSONL with chat ``messages`` (``[{"role": ..., "content": ...}, ...]``, the last one the assistant's): the
  turns before the last are rendered with the checkpoint's chat template (``apply_chat_template`` with
  ``add_generation_prompt=True``), the last turn's content is the completion;
* a shipped (or any labelled) task cast as an instruction: the label-word prompt of
  :mod:`edgeprune.tasks.prompts` after one line naming the choices, and the gold label's verbaliser as the
  completion, so ``--task sst2 --generate`` works out of the box and has a task metric (label accuracy).

Tokenised (:func:`encode_lm`): ``prompt tokens (the tokenizer's special tokens included, as the runtime encodes a
prompt) + completion tokens + EOS`` (the EOS teaches the model to stop; none when the tokenizer has no EOS), the
prompt truncated on the left when the whole does not fit. Calibration and every scoring method see prompt and
completion tokens; distillation and perplexity see the completion tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from edgeprune.errors import DataError, ModelError

INSTRUCTION = "Answer with one of: {choices}.\n"


@dataclass(frozen=True)
class GenExample:
    """A prompt and its completion; ``messages`` for a chat example (rendered by :meth:`texts`), ``label`` for
    a cast classification example (the task metric)."""

    prompt: str = ""
    completion: str = ""
    messages: Optional[tuple] = None
    label: Optional[int] = None

    def texts(self, tokenizer) -> tuple[str, str]:
        """(prompt text, completion text); a chat example through the tokenizer's chat template."""
        if self.messages is None:
            return self.prompt, self.completion
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError("the data has chat messages but the checkpoint's tokenizer has no chat template "
                             "(tokenizer_config.json chat_template); give prompt/completion lines instead")
        turns = [dict(m) for m in self.messages]
        prompt = tokenizer.apply_chat_template(turns[:-1], add_generation_prompt=True, tokenize=False)
        return prompt, turns[-1]["content"]


def is_generation_file(path: str | Path | None) -> bool:
    """A JSONL file whose first record has ``prompt`` + ``completion`` or ``messages``."""
    if path is None or not str(path).endswith((".jsonl", ".jsonl.gz", ".json")):
        return False
    try:
        first = next(_records(Path(path)))[1]
    except (StopIteration, DataError):
        return False
    return isinstance(first, dict) and ({"prompt", "completion"} <= set(first) or "messages" in first)


def _records(path: Path):
    import gzip

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno}: not JSON ({exc.msg}); one JSON object per line") from None


def read_generation_file(path: str | Path) -> list[GenExample]:
    """Every line of a prompt/completion or chat JSONL file, checked (one-line errors naming the line)."""
    path = Path(path)
    out = []
    for lineno, rec in _records(path):
        where = f"{path}: line {lineno}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with prompt/completion or messages")
        if "messages" in rec:
            msgs = rec["messages"]
            if (not isinstance(msgs, list) or len(msgs) < 2 or
                    not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in msgs)):
                raise DataError(f"{where}: messages must be a list of at least two {{role, content}} objects")
            if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
                raise DataError(f"{where}: the last message must be the assistant's, with content (the completion)")
            out.append(GenExample(messages=tuple(tuple(sorted(m.items())) for m in msgs)))
            continue
        prompt, completion = rec.get("prompt"), rec.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: needs string fields prompt and completion (found: {', '.join(sorted(rec))})")
        if not completion.strip():
            raise DataError(f"{where}: empty completion; every example needs text to learn and measure")
        out.append(GenExample(prompt, completion))
    if not out:
        raise DataError(f"{path}: empty file (no examples)")
    return out


def cast(examples, words) -> list[GenExample]:
    """Labelled examples as instructions: ``INSTRUCTION`` + the label-word prompt, completion the gold
    verbaliser (with its leading space, as it follows the prompt)."""
    head = INSTRUCTION.format(choices=", ".join(words.verbalisers))
    return [GenExample(head + words.render(e.text, e.text_pair), " " + words.verbalisers[e.label].strip(),
                       label=e.label) for e in examples]


def load_examples(task, data, split: str, words, limit: Optional[int] = None) -> list[GenExample]:
    """The ``split`` of the generation data: the user's JSONL file for it, else the task's labelled data cast."""
    import random

    user = data.train_file if split == "train" else data.eval_file
    if is_generation_file(user):
        rows = read_generation_file(user)
        if limit is not None and limit < len(rows):
            order = list(range(len(rows)))
            random.Random(0).shuffle(order)
            rows = [rows[i] for i in sorted(order[:limit])]
        return rows
    return cast(data.load(task, split, limit=limit), words)


@dataclass
class LMEncoded:
    """Tokenised prompt + completion per example; ``starts[i]`` is the index of example i's first completion
    token, ``prompt_ids`` the prompts alone (what a generation starts from)."""

    input_ids: list[list[int]]
    starts: list[int]
    labels: list[Optional[int]]
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def prompt_ids(self, i: int) -> list[int]:
        return self.input_ids[i][: self.starts[i]]

    def as_encoded(self):
        """The :class:`~edgeprune.training.loop.Encoded` that calibration takes (every token, no labels)."""
        from edgeprune.tasks.encoding import Encoded

        return Encoded(self.input_ids, [[0] * len(ids) for ids in self.input_ids], [0] * len(self), self.pad_id)


def encode_lm(examples: Sequence[GenExample], tokenizer, max_length: int) -> LMEncoded:
    """Tokenise prompt and completion apart (their boundary exact) and join them with EOS; the prompt loses
    its oldest tokens when the whole exceeds ``max_length`` (a completion keeps at most half of it)."""
    eos = tokenizer.eos_token_id
    ids, starts = [], []
    for ex in examples:
        prompt, completion = ex.texts(tokenizer)
        chat = ex.messages is not None  # the template wrote the special tokens as text
        p = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        c = c[: max(1, max_length // 2)]
        room = max(1, max_length - len(c))
        p = p[-room:] if p else ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
        if not p:
            raise DataError("an example has an empty prompt and the tokenizer has no BOS token to start from; "
                            "give every example prompt text")
        ids.append(p + c)
        starts.append(len(p))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    return LMEncoded(ids, starts, [ex.label for ex in examples], pad)
