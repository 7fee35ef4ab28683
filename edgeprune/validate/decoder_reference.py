"""What a decoder artifact is validated against (:func:`edgeprune.validate.decoder.evaluate`): the original causal LM's
per-example figures and greedy continuations, from the model in memory (:class:`InMemoryReference`) or, for an
original that does not fit, computed one layer at a time from its checkpoint (:class:`LayerwiseReference`, issue 26).

Per example (:func:`row_of`): the log-probability of each next token, the most likely next token at each position
(next-token agreement) and the label words' logits at the completion's first position (label accuracy). Layer by
layer, each batch's logits are reduced to those as soon as its head has run
(:func:`edgeprune.pruning.layerwise.logits_layerwise`), so the vocabulary-wide logits of the whole split are never
held. Greedy continuations there recompute the whole sequence at every step (no cache), every prompt in one batch
(right-padded: the real positions compute what they compute alone, up to float rounding); the original's speed is
not measured (it never runs whole).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def row_of(z: np.ndarray, ids: Sequence[int], start: int, label_ids: Optional[Sequence[int]]) -> tuple:
    """(log-probability of each next token, most likely next token at each position, the label words' logits at
    the completion's first position or None) from the logits ``z`` [len(ids), vocab] of one example."""
    nxt = np.asarray(ids[1:])
    lp = log_softmax(z[:-1])[np.arange(len(nxt)), nxt]
    return lp, z[:-1].argmax(-1), (np.asarray(z[start - 1])[list(label_ids)] if label_ids else None)


class InMemoryReference:
    """The original in memory (PyTorch), run when asked."""

    def __init__(self, model):
        self.model = model

    def row(self, enc, i: int, label_ids) -> tuple:
        import torch

        with torch.no_grad():
            z = self.model(torch.tensor([enc.input_ids[i]])).logits[0].float().numpy()
        return row_of(z, enc.input_ids[i], enc.starts[i], label_ids)

    def greedy(self, prompt: list[int], new_tokens: int, eos: set) -> list[int]:
        import torch

        with torch.no_grad():
            x = torch.tensor([prompt])
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=self.model.config.get_text_config().pad_token_id
                                      or 0, eos_token_id=sorted(eos) or None)
        return out[0, len(prompt):].tolist()


class LayerwiseReference:
    """The original's figures computed from its checkpoint one layer at a time (see the module docstring), all of
    them here, before any graph is loaded beside them: the rows of every example of ``enc`` and the greedy
    continuations of its first ``greedy_prompts`` prompts (``new_tokens`` each, stopping at ``eos``; all batched)."""

    speed = False  # never run whole: no time to first token or decode rate

    def __init__(self, model_dir: str | Path, enc, label_ids, greedy_prompts: int = 0, new_tokens: int = 0,
                 eos: frozenset = frozenset(), progress: bool = True, batch_size: int = 16):
        from edgeprune.pruning.layerwise import logits_layerwise

        self.model_dir, self.pad = Path(model_dir), enc.pad_id
        self.rows = logits_layerwise(
            model_dir, enc.as_encoded(), batch_size=batch_size, progress=progress, lm=True,
            reduce=lambda z, i: row_of(z, enc.input_ids[i], enc.starts[i], label_ids))
        self._greedy: dict[tuple, list[int]] = {}
        n = min(greedy_prompts, len(enc))
        if n and new_tokens:
            self.prepare_greedy([enc.prompt_ids(i) for i in range(n)], new_tokens, set(eos))

    def row(self, enc, i: int, label_ids) -> tuple:
        return self.rows[i]

    def prepare_greedy(self, prompts: list[list[int]], new_tokens: int, eos: set) -> None:
        """The greedy continuations of ``prompts``, ``new_tokens`` whole-sequence steps, every prompt batched."""
        from edgeprune.export.lm_large import greedy_layerwise

        for p, tokens in zip(prompts, greedy_layerwise(self.model_dir, prompts, self.pad, new_tokens, eos)):
            self._greedy[tuple(p)] = tokens

    def greedy(self, prompt: list[int], new_tokens: int, eos: set) -> list[int]:
        if tuple(prompt) not in self._greedy:
            raise ValueError("LayerwiseReference: greedy continuations are computed at construction "
                             "(greedy_prompts, new_tokens); this prompt was not among them")
        return self._greedy[tuple(prompt)]
