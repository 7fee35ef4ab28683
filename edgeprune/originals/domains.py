"""The shipped corpora as domains for Branch-Train-MiX (:mod:`edgeprune.originals.btx`), and masked-LM batches.

A domain is the text of one shipped training split, or of one class of it (AG News' four topics are four news
domains). Only training splits are read: the validation splits the reports show stay unseen. Each domain's last
``held`` texts are kept aside for measuring how the experts specialise (:mod:`edgeprune.originals.specialisation`).

Masked-LM data follow BERT (Devlin et al. 2019) as transformers' ``run_mlm`` does: texts are tokenised,
concatenated with [SEP] between them and cut into chunks of ``chunk`` tokens framed by [CLS] ... [SEP]; the
masking (15% of the tokens: 80% [MASK], 10% random, 10% kept) is transformers' ``DataCollatorForLanguageModeling``.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Domain:
    """One expert's domain: the texts of ``task``'s training split (of class ``label`` if given); ``task`` ""
    is the seed model's own domain, which gets no branch training (BTX keeps the seed as an expert)."""

    name: str
    task: str
    label: Optional[str] = None
    what: str = ""


DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("seed", "", what="the seed model itself, not trained further (general text)"),
    Domain("movies", "sst2", what="movie-review phrases (SST-2)"),
    Domain("world", "agnews", "World", "world news (AG News)"),
    Domain("sports", "agnews", "Sports", "sports news (AG News)"),
    Domain("business", "agnews", "Business", "business news (AG News)"),
    Domain("scitech", "agnews", "Sci/Tech", "science and technology news (AG News)"),
    Domain("mnli", "mnli", what="MNLI premises and hypotheses: fiction, government, slate, telephone, travel"),
    Domain("rte", "rte", what="RTE pairs: news and Wikipedia sentences"),
)}


def domain_texts(name: str, limit: int, held: int = 0, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(training texts, held-aside texts)`` of domain ``name`` from the shipped training split: a seeded
    shuffle, the first ``held`` kept aside, then up to ``limit`` for training. The seed domain has none."""
    d = DOMAINS[name]
    if not d.task:
        return [], []
    texts = [t for label, t in _training_texts(d.task) if d.label is None or label == d.label]
    random.Random(seed).shuffle(texts)
    return texts[held:held + limit], texts[:held]


@functools.lru_cache(maxsize=4)
def _training_texts(task_name: str) -> tuple[tuple[str, str], ...]:
    """``(label, text)`` of every text of the task's training split (both sides of a pair)."""
    from edgeprune.tasks import get_task, load_split

    task = get_task(task_name)
    out = []
    for ex in load_split(task, "train"):
        out += [(task.labels[ex.label], t) for t in (ex.text, ex.text_pair) if t]
    return tuple(out)


def mlm_chunks(texts: list[str], tokenizer, chunk: int) -> list[list[int]]:
    """Token chunks of ``chunk`` ids: [CLS] + the concatenated texts' word pieces ([SEP] between texts) + [SEP]."""
    body = chunk - 2
    stream: list[int] = []
    if not texts:
        return []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [tokenizer.sep_token_id])
    return [[tokenizer.cls_token_id] + stream[i:i + body] + [tokenizer.sep_token_id]
            for i in range(0, len(stream) - body + 1, body)]


class MaskedBatches:
    """Endless seeded batches of masked chunks drawn from ``chunks`` (lists of ids of equal length)."""

    def __init__(self, chunks: list[list[int]], tokenizer, batch_size: int, seed: int = 0):
        from transformers import DataCollatorForLanguageModeling

        if not chunks:
            raise ValueError("no text to train on")
        self.chunks, self.batch_size = chunks, batch_size
        self.rng = random.Random(seed)
        self.collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors="pt")

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = [self.chunks[self.rng.randrange(len(self.chunks))] for _ in range(self.batch_size)]
        return self.collate([{"input_ids": ids} for ids in picked])

    def __iter__(self):
        return self
