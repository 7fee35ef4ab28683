"""Tokenised task examples and their batches: what calibration, training, export parity and validation feed a
model. Examples are tokenised once, unpadded; :func:`collate` pads a batch to its longest example with the
tokenizer's padding id (decoder classifiers find each text's last token by it)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from edgeprune.tasks.loading import Example


@dataclass
class Encoded:
    """Tokenised examples, unpadded."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[int]
    pad_id: int = 0  # the tokenizer's padding id (decoder classifiers find the last token by it)

    def __len__(self) -> int:
        return len(self.labels)


def encode(examples: Sequence[Example], tokenizer, max_length: int, prompt=None) -> Encoded:
    """Tokenise once (truncating to ``max_length``); pairs get token type ids. With ``prompt`` (a language
    model's :class:`~edgeprune.models.label_words.LabelWords`) each example is rendered into the template and
    truncated on the left, so the prompt's cue before the verbaliser always survives."""
    if prompt is not None:
        texts, pairs = [prompt.render(e.text, e.text_pair) for e in examples], None
    else:
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples] if examples and examples[0].text_pair is not None else None
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left" if prompt is not None else side
    try:
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
    finally:
        tokenizer.truncation_side = side
    tti = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(enc["input_ids"], tti, [e.label for e in examples], pad)


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` without the inputs that ``model``'s forward does not take (decoders have no token types)."""
    if "token_type_ids" in batch and not getattr(model.config, "type_vocab_size", 0):
        return {k: v for k, v in batch.items() if k != "token_type_ids"}
    return batch


def collate(enc: Encoded, idx: Sequence[int], pad_id: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Pad the examples ``idx`` to the longest of them (with the tokenizer's padding id)."""
    pad_id = enc.pad_id if pad_id is None else pad_id
    width = max(len(enc.input_ids[i]) for i in idx)
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    tti = np.zeros((len(idx), width), dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    for row, i in enumerate(idx):
        n = len(enc.input_ids[i])
        ids[row, :n] = enc.input_ids[i]
        tti[row, :n] = enc.token_type_ids[i]
        mask[row, :n] = 1
    return {"input_ids": torch.from_numpy(ids), "token_type_ids": torch.from_numpy(tti),
            "attention_mask": torch.from_numpy(mask), "labels": torch.tensor([enc.labels[i] for i in idx])}


def bucketed_batches(enc: Encoded, batch_size: int, rng: random.Random, bucket: int = 50) -> list[list[int]]:
    """One epoch of batches: shuffle, sort by length inside chunks of ``bucket`` batches, shuffle the batches."""
    order = list(range(len(enc)))
    rng.shuffle(order)
    batches = []
    chunk = batch_size * bucket
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(enc.input_ids[i]))
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches
