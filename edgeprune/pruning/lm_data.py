"""The task's generation data tokenised for a language-model checkpoint (``--generate``): prompts with their
completions (:mod:`edgeprune.tasks.generation`), and the label words' token ids of a task cast as generation."""
from __future__ import annotations

from typing import Optional

from edgeprune.models.tokenizer import load_tokenizer
from edgeprune.tasks.generation import encode_lm, is_generation_file, load_examples
from edgeprune.tasks.prompts import for_task


def lm_examples(original_dir, task, data, cfg, split: str, limit: Optional[int] = None):
    """The generation data of ``split`` tokenised for the checkpoint in ``original_dir``; ``cfg`` (a
    :class:`~edgeprune.pruning.config.PruneConfig`) gives the prompt and verbalisers."""
    words = for_task(task, cfg.prompt, cfg.verbalisers)
    return encode_lm(load_examples(task, data, split, words, limit), load_tokenizer(original_dir), task.max_length)


def verbaliser_ids(original_dir, task, cfg, data=None) -> Optional[tuple]:
    """The label words' first token ids (the task metric of a cast classification task), or None when the
    task has no labels or the validation data are the user's prompt / completion file."""

    if not task.labels or (data is not None and is_generation_file(data.eval_file)):
        return None
    return for_task(task, cfg.prompt, cfg.verbalisers).resolve(load_tokenizer(original_dir)).token_ids
