"""Task-aware vocabulary pruning of a WordPiece model (``--vocab-reserve N``): the artifact keeps the word
embedding rows of the tokens the task uses and rewrites ``tokenizer.json`` to match.

Half of a folded MiniLM's bytes are its 30,522 x 384 word embedding, of which a task uses a small part. Kept:

* every token of the task's *training* split (its segmentation there does not change at all);
* the special tokens, and every single character and ``##`` character piece, so that any word still has a
  WordPiece segmentation: a dropped word falls back to the longest sub-word pieces that remain (WordPiece's greedy
  longest-match-first), never to ``[UNK]`` unless its characters were unknown before;
* a reserve of the ``N`` most frequent whole words: BERT's vocabulary lists its words by corpus frequency after
  the character block, so they are the first ``N`` word tokens by id.

Kept tokens keep their order (new id = rank of the old id), so ``tokenizers`` and :class:`EdgeModel` give the
same ids from the rewritten ``tokenizer.json``; the embedding is the kept rows, exactly. The share of validation
tokens that had to be re-segmented is measured and reported (validation is read for that measurement only).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from edgeprune.errors import ConfigError


def _is_piece(token: str) -> bool:
    """A single character or ``##`` + one character: the pieces every word can fall back to."""
    return len(token) == 1 or (token.startswith("##") and len(token) == 3)


def kept_ids(tok_json: dict, used: set[int], reserve: int) -> list[int]:
    """Old ids to keep, ascending (see the module docstring)."""
    vocab: dict[str, int] = tok_json["model"]["vocab"]
    specials = {t["id"] for t in tok_json.get("added_tokens", [])}
    keep = set(used) | specials | {i for t, i in vocab.items() if _is_piece(t)}
    words = [i for t, i in sorted(vocab.items(), key=lambda kv: kv[1])
             if i not in keep and not t.startswith(("[unused", "##")) and not _is_piece(t)]
    keep |= set(words[:reserve])
    return sorted(keep)


def slim_tokenizer_json(tok_json: dict, keep: Sequence[int]) -> dict:
    """``tokenizer.json`` with only the ``keep`` tokens, renumbered by rank; special-token ids (added tokens,
    the post-processor's template, padding) follow."""
    new_id = {old: new for new, old in enumerate(keep)}
    out = copy.deepcopy(tok_json)
    out["model"]["vocab"] = {t: new_id[i] for t, i in sorted(tok_json["model"]["vocab"].items(), key=lambda kv: kv[1])
                             if i in new_id}
    for t in out.get("added_tokens", []):
        t["id"] = new_id[t["id"]]
    post = out.get("post_processor") or {}
    for spec in (post.get("special_tokens") or {}).values():
        spec["ids"] = [new_id[i] for i in spec["ids"]]
    for key in ("cls", "sep"):  # BertProcessing form: [token, id]
        if isinstance(post.get(key), list):
            post[key] = [post[key][0], new_id[post[key][1]]]
    if out.get("padding"):
        out["padding"]["pad_id"] = new_id[out["padding"]["pad_id"]]
    return out


@torch.no_grad()
def slim_embeddings(model: torch.nn.Module, keep: Sequence[int]) -> None:
    """Keep the ``keep`` rows of the input embedding (in place) and update the config (vocab size, pad id)."""
    emb = model.get_input_embeddings()
    idx = torch.tensor(list(keep))
    new = torch.nn.Embedding(len(keep), emb.weight.shape[1], padding_idx=None).to(emb.weight.dtype)
    new.weight.copy_(emb.weight[idx])
    model.set_input_embeddings(new)
    rank = {old: new_id for new_id, old in enumerate(keep)}
    model.config.vocab_size = len(keep)
    if model.config.pad_token_id is not None:
        model.config.pad_token_id = rank[model.config.pad_token_id]


def require_wordpiece(tok_json: dict, where) -> None:
    """One line (exit 2) for a tokenizer this pruning cannot rewrite (BPE, Unigram, ...)."""
    kind = tok_json.get("model", {}).get("type")
    if kind != "WordPiece":
        raise ConfigError(f"--vocab-reserve prunes WordPiece vocabularies; {where}'s tokenizer is {kind} "
                          "(drop the option)")


def prune_vocabulary(model: torch.nn.Module, tok_json: dict, train_ids: Sequence[Sequence[int]],
                     val_ids: Sequence[Sequence[int]], reserve: int) -> tuple[dict, dict]:
    """Slim ``model``'s word embedding (in place) to the task's tokens; returns the rewritten ``tokenizer.json``
    (a dict, from the original ``tok_json``) and a record: kept / total, bytes saved, and the share of validation
    tokens re-segmented."""
    require_wordpiece(tok_json, "the checkpoint")
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        raise ConfigError("--vocab-reserve: the input embedding is tied to an output layer; drop the option")
    total = len(tok_json["model"]["vocab"])
    if reserve < 0:
        raise ConfigError(f"--vocab-reserve must be >= 0, got {reserve}")
    used = {i for ids in train_ids for i in ids}
    keep = kept_ids(tok_json, used, reserve)
    kept = set(keep)
    flat_val = [i for ids in val_ids for i in ids]
    resegmented = sum(i not in kept for i in flat_val) / max(1, len(flat_val))
    width = model.get_input_embeddings().weight.shape[1]
    slim_embeddings(model, keep)
    record = {"reserve": reserve, "kept": len(keep), "of": total, "from_training_split": len(used),
              "embedding_fp32_mb_saved": round((total - len(keep)) * width * 4 / 1e6, 2),
              "validation_tokens_resegmented": round(resegmented, 4)}
    return slim_tokenizer_json(tok_json, keep), record
