"""Branch-Train-MiX: an original whose experts are trained apart (Sukhbaatar et al. 2024, arXiv 2403.07816).

Sparse upcycling makes experts that are near copies of one dense FFN, so any expert serves any task and
random pruning does as well as a task-aware method. BTX makes the experts differ by training them on different
data first:

1. **Branch.** Copies of the seed dense model (the packaged MiniLM-L6) are trained, each on one domain's text
   (:mod:`edgeprune.originals.domains`: movie reviews, four AG News topics, MNLI's genres, RTE), with BERT's
   masked-LM objective, embarrassingly parallel and without communication. The seed itself is kept as one more
   expert (BTX keeps it: the general-domain expert). A masked-LM head is first trained on the frozen seed for
   ``head_steps`` so that no branch spends its steps on a random head (MiniLM ships without one).
   Optionally each branch re-initialises a fraction of its FFN units first (``drop_fraction``, Drop-Upcycling,
   Nakamura et al. 2025), which lets short branch runs move further apart; 0 is plain BTX.
2. **MiX.** In each MoE layer (every other layer, as the default original) expert i is branch i's FFN; every
   other parameter is the average of the branches' (BTX section 2.2), the masked-LM heads too.
3. **Router training.** A Switch top-1 router per MoE layer, then the whole MoE trained on the mixture of all
   domains with the masked-LM loss and the load-balancing loss (BTX trains all parameters at this stage).
   Our one addition, for a short CPU budget: the router starts from the domain centroids (row i = the centred,
   normalised mean input of layer l on branch i's text) instead of random, so routing by domain is where the
   training starts rather than what it must find in a few hundred steps.

The result is a BERT-MoE "pretrained MoE" like the upcycled one (``BertMoeModel``, one directory, safetensors,
tokenizer.json) with a record ``edgeprune_btx.json``: the recipe, the losses, the wall times, and the experts'
specialisation (:mod:`edgeprune.originals.specialisation`) on held-aside text of each domain. The task
fine-tune then runs as for every original (:func:`edgeprune.originals.classifier.ensure_original`).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edgeprune.originals.domains import DOMAINS, MaskedBatches, domain_texts, mlm_chunks

RECORD = "edgeprune_btx.json"


@dataclass(frozen=True)
class BtxRecipe:
    """What a BTX pretrained MoE is made of (every field names its cache entry). One expert per domain."""

    domains: tuple[str, ...] = tuple(DOMAINS)
    head_steps: int = 200
    branch_steps: int = 300
    mix_steps: int = 300
    drop_fraction: float = 0.0
    texts_per_domain: int = 6000
    held_texts: int = 300
    chunk: int = 64
    batch_size: int = 32
    learning_rate: float = 1e-4
    router_learning_rate: float = 1e-3
    centroid_router: bool = True
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class MaskedLM(torch.nn.Module):
    """A BERT(-MoE) body with a masked-LM head whose decoder is tied to the word embeddings; the loss is the
    cross-entropy at the masked positions only (+ the Switch load-balancing loss of an MoE body)."""

    def __init__(self, body: torch.nn.Module, head: Optional[torch.nn.Module] = None):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertOnlyMLMHead

        self.body = body
        self.head = head if head is not None else BertOnlyMLMHead(body.config)
        self.head.predictions.decoder.weight = body.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask, labels) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        at = labels != -100
        loss = F.cross_entropy(self.head(hidden[at]).float(), labels[at])
        if hasattr(self.body, "moe_blocks"):
            from edgeprune.models.bert_moe import router_losses

            aux, _ = router_losses([b.last for b in self.body.moe_blocks().values()], attention_mask)
            loss = loss + self.body.config.router_aux_loss_coef * aux
        return loss


def mlm_train(model: MaskedLM, batches, steps: int, lr: float, router_lr: float, desc: str,
              only_head: bool = False, progress: bool = True, frozen: str = "word_embeddings",
              router_marker: str = ".router.") -> dict:
    """AdamW with linear warm-up (6%) and decay; word embeddings (and the tied decoder) frozen (parameters named
    with ``frozen``); routers (named with ``router_marker``) at ``router_lr``."""
    from edgeprune.training.loop import cpu_has_bf16

    groups: dict[str, list] = {"base": [], "router": []}
    for name, p in model.named_parameters():
        train = (frozen not in name) and (not only_head or name.startswith("head."))
        p.requires_grad_(train)
        if train:
            groups["router" if router_marker in name else "base"].append(p)
    opt = torch.optim.AdamW([{"params": groups["base"], "lr": lr}, {"params": groups["router"], "lr": router_lr}],
                            weight_decay=0.01)
    warm = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else (steps - s) / (steps - warm))
    model.train()
    losses, t0 = [], time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
    for step in bar:
        batch = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_bf16()):
            loss = model(batch["input_ids"], torch.ones_like(batch["input_ids"]), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups.values() for p in g], 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    n = max(1, min(20, len(losses)))
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 1),
            "first_loss": round(sum(losses[:n]) / n, 4), "final_loss": round(sum(losses[-n:]) / n, 4)}


def _drop_units(body: torch.nn.Module, layers: list[int], fraction: float, gen: torch.Generator) -> None:
    """Drop-Upcycling in a dense branch: re-initialise ``fraction`` of the FFN units of ``layers`` in place."""
    from edgeprune.originals.upcycle import _drop_reinit

    for layer in layers:
        blk = body.encoder.layer[layer]
        state = {"w_in.weight": blk.intermediate.dense.weight.data, "w_in.bias": blk.intermediate.dense.bias.data,
                 "w_out.weight": blk.output.dense.weight.data}
        _drop_reinit(state, "", fraction, gen)


def mix(seed_body: torch.nn.Module, branches: list[torch.nn.Module], moe_layers: Optional[list[int]] = None):
    """The BTX MoE: expert i of each MoE layer = branch i's FFN, every other parameter the branches' mean."""
    from edgeprune.originals.upcycle import upcycle_model
    from edgeprune.models.registry import upcycle_adapter_for

    moe = upcycle_model(seed_body, num_experts=len(branches), moe_layers=moe_layers, drop_fraction=0.0)
    adapter = upcycle_adapter_for(seed_body.config)
    states = [b.state_dict() for b in branches]
    dst = moe.state_dict()
    mean_into(dst, states)
    prefix, ffn_map = adapter.extra["expert_prefix"], adapter.extra["ffn_map"]
    for layer in moe.config.moe_layers:
        for e, s in enumerate(states):
            for exp_key, dense_key in ffn_map.items():
                dst[prefix(layer, e) + exp_key] = s[adapter.extra["dense_prefix"](layer) + dense_key].clone()
    moe.load_state_dict(dst)
    return moe


def centroid_routers(moe, chunks: list[list[list[int]]], per_domain: int = 64) -> None:
    """Each MoE layer's router from the domain centroids of its input, layer by layer (a layer's input depends on
    the routers before it): row i = c_i - mean_j c_j, normalised; then scaled so the logits have unit spread. Any
    family the registry knows (the BERT-MoE here, the decoder BTX's Mixtral: :mod:`edgeprune.originals.btx_lm`)."""
    from edgeprune.models.registry import adapter_for

    adapter = adapter_for(moe.config)
    for layer, block in adapter.blocks(moe).items():
        seen: list[torch.Tensor] = []
        hook = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
        cents = []
        try:
            with torch.no_grad():
                for rows in chunks:
                    if not rows:
                        cents.append(None)
                        continue
                    seen.clear()
                    ids = torch.tensor(rows[:per_domain])
                    moe(input_ids=ids, attention_mask=torch.ones_like(ids))
                    cents.append(torch.cat(seen).mean(0))
        finally:
            hook.remove()
        known = torch.stack([c for c in cents if c is not None])
        mean = known.mean(0)
        w = torch.stack([(c - mean) if c is not None else torch.zeros_like(mean) for c in cents])
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        with torch.no_grad():
            spread = (torch.cat(seen) @ w.T).std().clamp_min(1e-6) if seen else torch.tensor(1.0)
            adapter.router(block).weight.copy_(w / spread)


def domain_chunks(recipe, tok, train: bool = True, chunker=mlm_chunks) -> tuple[list[list[list[int]]], dict]:
    """Each domain's training chunks (``chunker``: masked-LM's, or the decoder's ``btx_lm.causal_chunks``), in the
    recipe's order (none without ``train``), and the held-aside chunks of every domain that has text (what the
    specialisation is measured on)."""
    train_chunks, held_chunks = [], {}
    for name in recipe.domains:
        texts, held = domain_texts(name, recipe.texts_per_domain if train else 0, recipe.held_texts, recipe.seed)
        train_chunks.append(chunker(texts, tok, recipe.chunk))
        if held:
            held_chunks[name] = chunker(held, tok, recipe.chunk)
    return train_chunks, held_chunks


def mean_into(dst: dict, states: list[dict]) -> None:
    """Every tensor of ``dst`` that the ``states`` hold becomes their mean (BTX's merge of everything but the experts)."""
    for key in dst:
        if key in states[0]:
            dst[key] = torch.stack([s[key].float() for s in states]).mean(0).to(dst[key].dtype)


def _trained_head(lm: "MaskedLM", mixture, tok, recipe: BtxRecipe, stages, record: dict, progress: bool) -> None:
    """Stage 0: the masked-LM head on the frozen seed (or the kept one)."""
    stages.run("head", lm.head, lambda: mlm_train(
        lm, MaskedBatches(mixture, tok, recipe.batch_size, recipe.seed), recipe.head_steps, 1e-3, 1e-3,
        "btx: masked-LM head on the seed", only_head=True, progress=progress), record)


def _trained_branches(seed_body, head, train_chunks, tok, recipe: BtxRecipe, moe_layers, stages, record: dict,
                      progress: bool) -> tuple[list, list]:
    """Stage 1: one copy of the seed (body and head) per domain, trained on its text; kept branches are loaded."""
    bodies, heads = [], []
    for i, name in enumerate(recipe.domains):
        body, bhead = copy.deepcopy(seed_body), copy.deepcopy(head)
        if train_chunks[i]:
            if recipe.drop_fraction > 0:
                _drop_units(body, moe_layers, recipe.drop_fraction, stages.gen)
            branch = MaskedLM(body, bhead)
            stages.run(f"branch {name}", branch, lambda: mlm_train(
                branch, MaskedBatches(train_chunks[i], tok, recipe.batch_size, recipe.seed + i),
                recipe.branch_steps, recipe.learning_rate, recipe.router_learning_rate,
                f"btx: branch {i + 1}/{len(recipe.domains)} ({name})", progress=progress), record)
        bodies.append(body)
        heads.append(bhead)
    return bodies, heads


def build_btx(dense_dir: Path, out_dir: Path, recipe: BtxRecipe, progress: bool = True,
              resume_dir: Optional[Path] = None) -> dict:
    """Branch, mix and train the router (module docstring); writes the BERT-MoE and its record to ``out_dir``.
    With ``resume_dir`` every finished stage is kept there and a rerun goes on from the next one
    (:mod:`edgeprune.originals.btx_stages`)."""
    from transformers import AutoModel

    from edgeprune.models.bert_moe import BertMoeConfig
    from edgeprune.models.tokenizer import copy_tokenizer, load_tokenizer
    from edgeprune.originals.btx_stages import BtxStages
    from edgeprune.originals.specialisation import specialisation, usage_by_domain

    torch.manual_seed(recipe.seed)
    stages = BtxStages(resume_dir, {"recipe": recipe.to_dict(), "dense": str(dense_dir)},
                       torch.Generator().manual_seed(recipe.seed))
    tok = load_tokenizer(dense_dir)
    train_chunks, held_chunks = domain_chunks(recipe, tok)
    mixture = [c for cs in train_chunks for c in cs]
    record: dict = {"recipe": recipe.to_dict(), "dense": str(dense_dir),
                    "chunks": {n: len(c) for n, c in zip(recipe.domains, train_chunks)}, "stages": {}}
    seed_body = AutoModel.from_pretrained(dense_dir, add_pooling_layer=True).eval()
    lm = MaskedLM(seed_body)
    _trained_head(lm, mixture, tok, recipe, stages, record, progress)
    moe_layers = BertMoeConfig(num_hidden_layers=seed_body.config.num_hidden_layers).moe_layers
    bodies, heads = _trained_branches(seed_body, lm.head, train_chunks, tok, recipe, moe_layers, stages, record,
                                      progress)
    moe = mix(seed_body, bodies, moe_layers)
    head = copy.deepcopy(heads[0])
    mixed_head = head.state_dict()
    mean_into(mixed_head, [h.state_dict() for h in heads])
    head.load_state_dict(mixed_head)
    del bodies, heads
    if recipe.centroid_router:
        centroid_routers(moe, train_chunks)
    record["specialisation_after_mix"] = specialisation(usage_by_domain(moe, held_chunks))
    mixed = MaskedLM(moe, head)
    record["stages"]["router"] = mlm_train(mixed, MaskedBatches(mixture, tok, recipe.batch_size, recipe.seed),
                                           recipe.mix_steps, recipe.learning_rate, recipe.router_learning_rate,
                                           "btx: router + MoE on the mixture", progress=progress)
    usage = usage_by_domain(moe, held_chunks)
    record.update(usage_held=usage, specialisation=specialisation(usage),
                  experts={str(e): n for e, n in enumerate(recipe.domains)})
    out_dir = Path(out_dir)
    moe.save_pretrained(out_dir)
    copy_tokenizer(dense_dir, out_dir)
    (out_dir / RECORD).write_text(json.dumps(record, indent=1))
    return record


def build_dense_twin(dense_dir: Path, out_dir: Path, recipe: BtxRecipe, progress: bool = True) -> dict:
    """The dense baseline of equal budget: the seed trained with the same masked-LM head warm-up, then on the
    mixture of all domains for as many steps as BTX spends on its branches and its mixture together."""
    from transformers import AutoModel

    from edgeprune.models.tokenizer import copy_tokenizer, load_tokenizer

    torch.manual_seed(recipe.seed)
    tok = load_tokenizer(dense_dir)
    mixture = [c for cs in domain_chunks(recipe, tok)[0] for c in cs]
    body = AutoModel.from_pretrained(dense_dir, add_pooling_layer=True).eval()
    lm = MaskedLM(body)
    batches = MaskedBatches(mixture, tok, recipe.batch_size, recipe.seed)
    steps = (len(recipe.domains) - 1) * recipe.branch_steps + recipe.mix_steps
    record = {"recipe": recipe.to_dict(), "dense": str(dense_dir), "stages": {
        "head": mlm_train(lm, batches, recipe.head_steps, 1e-3, 1e-3, "dense twin: masked-LM head", only_head=True,
                          progress=progress),
        "mixture": mlm_train(lm, batches, steps, recipe.learning_rate, recipe.router_learning_rate,
                             "dense twin: masked LM on the mixture", progress=progress)}}
    out_dir = Path(out_dir)
    body.save_pretrained(out_dir)
    copy_tokenizer(dense_dir, out_dir)
    (out_dir / RECORD).write_text(json.dumps(record, indent=1))
    return record


def describe(record: dict) -> str:
    """One line: the specialisation per layer."""
    js = ", ".join(f"L{k}: {v:.3f}" for k, v in record["specialisation"].items())
    return f"BTX MoE, {len(record['recipe']['domains'])} experts; domains' mean pairwise JS per layer: {js} (ln 2 = 0.693)"


__all__ = ["BtxRecipe", "build_btx", "build_dense_twin", "describe", "mix", "MaskedLM", "RECORD"]
