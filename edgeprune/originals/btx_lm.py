"""Branch-Train-MiX for the decoder original: SmolLM2-135M branches mixed into a Mixtral (Sukhbaatar et al. 2024,
arXiv 2403.07816), the causal-LM counterpart of :mod:`edgeprune.originals.btx`.

1. **Branch.** Copies of the seed (the packaged SmolLM2-135M, :func:`edgeprune.originals.decoder.ensure_dense_lm`)
   are trained with the next-token loss, each on one domain's text (:mod:`edgeprune.originals.domains`; texts
   joined by EOS and cut into ``chunk``-token sequences); the seed itself is kept as one expert (BTX's general
   expert). Optionally each branch first re-initialises ``drop_fraction`` of its MLP units (Drop-Upcycling).
2. **MiX.** ``MixtralForCausalLM`` with one expert per domain in every layer: expert i = branch i's MLP (gate and up
   as the fused ``gate_up_proj``, down as ``down_proj``); attention, norms and embeddings the branches' mean.
3. **Router.** Each layer's router starts from the domain centroids of its input (centred, normalised, unit logit
   spread: our addition for a short CPU budget, as for the classifier), then the whole MoE is trained on the
   mixture of domains with the next-token loss and Mixtral's load-balancing loss.

What 2 CPU cores allow (said in the record and the README): a SmolLM2 step of 8 x 64 tokens costs about 20x a
MiniLM masked-LM step, so the default is 4 experts (the seed + 3 domains: movies, world news, MNLI) with 100 steps
per branch and 100 on the mixture, where the classifier's BTX trains 7 branches of 300. Every finished stage is
kept (:mod:`edgeprune.originals.btx_stages`), so a run cut by the end of a session goes on at its next branch.
"""
from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from edgeprune.originals.btx import centroid_routers, domain_chunks, mean_into, mlm_train
from edgeprune.originals.decoder import drop_gated_units, upcycle_lm

RECORD = "edgeprune_btx.json"


@dataclass(frozen=True)
class LmBtxRecipe:
    """What a decoder BTX MoE is made of (every field names its cache entry). One expert per domain, top-k routing."""

    domains: tuple[str, ...] = ("seed", "movies", "world", "mnli")
    top_k: int = 2
    branch_steps: int = 100
    mix_steps: int = 100
    drop_fraction: float = 0.0
    texts_per_domain: int = 3000
    held_texts: int = 100
    chunk: int = 64
    batch_size: int = 8
    learning_rate: float = 5e-5
    router_learning_rate: float = 1e-3
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def causal_chunks(texts: list[str], tokenizer, chunk: int) -> list[list[int]]:
    """Token sequences of ``chunk`` ids: the texts' tokens joined by EOS, cut (the remainder dropped)."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        stream.extend(ids + [tokenizer.eos_token_id])
    return [stream[i:i + chunk] for i in range(0, len(stream) - chunk + 1, chunk)]


class CausalBatches:
    """Endless seeded batches of ``chunks`` for the next-token loss (labels = inputs; the model shifts them)."""

    def __init__(self, chunks: list[list[int]], batch_size: int, seed: int = 0):
        if not chunks:
            raise ValueError("no text to train on")
        self.chunks, self.batch_size, self.rng = chunks, batch_size, random.Random(seed)

    def __next__(self) -> dict[str, torch.Tensor]:
        ids = torch.tensor([self.chunks[self.rng.randrange(len(self.chunks))] for _ in range(self.batch_size)])
        return {"input_ids": ids, "labels": ids}

    def __iter__(self):
        return self


class CausalLoss(torch.nn.Module):
    """The causal LM's loss in :func:`~edgeprune.originals.btx.mlm_train`'s calling convention (+ Mixtral's
    load-balancing loss, weighted by the config's ``router_aux_loss_coef``, where the model is an MoE)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels) -> torch.Tensor:
        moe = hasattr(self.model.config, "num_local_experts")
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          **({"output_router_logits": True} if moe else {})).loss


def _train(model, chunks, recipe: LmBtxRecipe, steps: int, seed: int, desc: str, progress: bool) -> dict:
    return mlm_train(CausalLoss(model), CausalBatches(chunks, recipe.batch_size, seed), steps, recipe.learning_rate,
                     recipe.router_learning_rate, desc, progress=progress, frozen="embed_tokens",
                     router_marker=".mlp.gate.")


def mix_lm(seed: torch.nn.Module, branches: list[torch.nn.Module], top_k: int):
    """The decoder BTX MoE: expert i of every layer = branch i's MLP, every other parameter the branches' mean."""
    moe = upcycle_lm(seed, num_experts=len(branches), top_k=top_k, drop_fraction=0.0)
    states = [b.state_dict() for b in branches]
    dst = moe.state_dict()
    mean_into(dst, states)
    for layer in range(moe.config.num_hidden_layers):
        mlp = f"model.layers.{layer}.mlp."
        for e, s in enumerate(states):
            dst[mlp + "experts.gate_up_proj"][e] = torch.cat([s[mlp + "gate_proj.weight"], s[mlp + "up_proj.weight"]])
            dst[mlp + "experts.down_proj"][e] = s[mlp + "down_proj.weight"]
    moe.load_state_dict(dst)
    return moe.eval()


def _branches(seed, chunks, recipe: LmBtxRecipe, stages, record: dict, progress: bool) -> list:
    """One copy of the seed per domain, trained on its text (the seed domain's copy untrained); kept ones loaded."""
    branches = []
    for i, name in enumerate(recipe.domains):
        branch = copy.deepcopy(seed)
        if chunks[i]:
            if recipe.drop_fraction > 0:
                for layer in branch.model.layers:
                    m = layer.mlp
                    drop_gated_units(m.gate_proj.weight.data, m.up_proj.weight.data, m.down_proj.weight.data,
                                     recipe.drop_fraction, stages.gen)
            stages.run(f"branch {name}", branch, lambda: _train(
                branch, chunks[i], recipe, recipe.branch_steps, recipe.seed + i,
                f"btx-lm: branch {i + 1}/{len(recipe.domains)} ({name})", progress), record)
        branches.append(branch)
    return branches


def build_lm_btx(dense_dir: Path, out_dir: Path, recipe: LmBtxRecipe, progress: bool = True,
                 resume_dir: Optional[Path] = None) -> dict:
    """Branch, mix and train the router (module docstring); writes the Mixtral and its record to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeprune.originals.btx_stages import BtxStages
    from edgeprune.originals.specialisation import specialisation, usage_by_domain

    torch.manual_seed(recipe.seed)
    stages = BtxStages(resume_dir, {"recipe": recipe.to_dict(), "dense": str(dense_dir), "kind": "lm"},
                       torch.Generator().manual_seed(recipe.seed))
    tok = AutoTokenizer.from_pretrained(dense_dir)
    chunks, held = domain_chunks(recipe, tok, chunker=causal_chunks)
    record: dict = {"recipe": recipe.to_dict(), "dense": str(dense_dir), "kind": "causal-lm",
                    "chunks": {n: len(c) for n, c in zip(recipe.domains, chunks)}, "stages": {}}
    seed = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    moe = mix_lm(seed, _branches(seed, chunks, recipe, stages, record, progress), recipe.top_k)
    centroid_routers(moe, chunks, per_domain=16)
    record["specialisation_after_mix"] = specialisation(usage_by_domain(moe, held, batch_size=8))
    record["stages"]["router"] = _train(moe, [c for cs in chunks for c in cs], recipe, recipe.mix_steps, recipe.seed,
                                       "btx-lm: router + MoE on the mixture", progress)
    usage = usage_by_domain(moe, held, batch_size=8)
    record.update(usage_held=usage, specialisation=specialisation(usage),
                  experts={str(e): n for e, n in enumerate(recipe.domains)})
    out_dir = Path(out_dir)
    moe.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / RECORD).write_text(json.dumps(record, indent=1))
    return record


__all__ = ["LmBtxRecipe", "build_lm_btx", "mix_lm", "causal_chunks", "CausalBatches"]
