"""Recovery of a pruned language model by distillation of the original's next-token distribution.

On the completion tokens of the task's training split (``LMEncoded.starts`` onward), the loss is

    L = alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE(z_student, y)

averaged over completion positions (Hinton et al. 2015; the token-level KD of Kim & Rush 2016 that MoE-pruning
recoveries use, e.g. Chen et al. 2022 distil the dense model from the MoE). The teacher is the original MoE in
memory; a bounded number of steps (AdamW, linear warm-up and decay), batches sorted by length, the word
embeddings (and a tied LM head with them) frozen, progress shown. The step's prompt positions only condition.
"""
from __future__ import annotations

import random
import time
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edgeprune.tasks.generation import LMEncoded


def completion_mask(enc: LMEncoded, idx: list[int], width: int) -> torch.Tensor:
    """(batch, width - 1) bool: position p predicts token p + 1, a completion token of its row."""
    m = torch.zeros(len(idx), width - 1, dtype=torch.bool)
    for row, i in enumerate(idx):
        m[row, enc.starts[i] - 1 : len(enc.input_ids[i]) - 1] = True
    return m


def batch(enc: LMEncoded, idx: list[int]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` of the examples ``idx``."""
    width = max(len(enc.input_ids[i]) for i in idx)
    ids = torch.full((len(idx), width), enc.pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        n = len(enc.input_ids[i])
        ids[row, :n] = torch.tensor(enc.input_ids[i])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def trainer(model: torch.nn.Module, enc: LMEncoded, steps: int, learning_rate: float, batch_size: int):
    """AdamW over every parameter but the word embedding (and an LM head tied to it), a linear warm-up over a tenth
    of the steps then linear decay, and the length-sorted batches to draw from; the model in training mode."""
    frozen = {id(p) for p in model.get_input_embeddings().parameters()}
    params = [p for p in model.parameters() if id(p) not in frozen]
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    order = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i]))
    model.train()
    return params, opt, sched, [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


CHECKPOINT_EVERY = 50  # steps between checkpoints of a run inside checkpoints_under (edgeprune.training.resume)


def done(model: torch.nn.Module) -> None:
    """Back to evaluation mode with every parameter trainable again (as it was loaded)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)


def distill(student: torch.nn.Module, teacher: Optional[torch.nn.Module], enc: LMEncoded, steps: int,
            alpha: float = 1.0, temperature: float = 1.0, learning_rate: float = 5e-5, batch_size: int = 8,
            seed: int = 0, progress: bool = True, device: str = "cpu") -> dict:
    """Train ``student`` for ``steps`` steps (see the module docstring); without a teacher, CE alone. Returns
    the record: steps, losses at the start and the end, seconds. ``device`` (:mod:`edgeprune.scale.device`): student and
    teacher compute there for the run and come back."""
    if steps <= 0:
        return {"steps": 0, "seconds": 0.0}
    from edgeprune.scale.device import borrowed

    with borrowed(device, student, teacher) as dev:
        return _distill(student, teacher, enc, steps, alpha, temperature, learning_rate, batch_size, seed, progress,
                        dev)


def _distill(student, teacher, enc, steps, alpha, temperature, learning_rate, batch_size, seed, progress, dev) -> dict:
    from edgeprune.scale.device import to

    alpha = alpha if teacher is not None else 0.0
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params, opt, sched, batches = trainer(student, enc, steps, learning_rate, batch_size)
    if teacher is not None:
        teacher.eval()
    from edgeprune.training.resume import for_loop, resume

    ck = for_loop("distil", steps, alpha, temperature, learning_rate, batch_size, seed, len(enc), enc.input_ids[:4])
    state = resume(ck, student, opt, sched, rng, "distil", steps, progress)
    start, losses, kls = state["step"], state["losses"], state["extra"].get("kls", [])
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), desc="distil", disable=not progress, unit="step", initial=start, total=steps)
    for step in bar:
        idx = rng.choice(batches)
        feeds = to(batch(enc, idx), dev)
        mask = completion_mask(enc, idx, feeds["input_ids"].shape[1]).to(dev)
        logits = student(**feeds).logits[:, :-1][mask].float()
        target = feeds["input_ids"][:, 1:][mask]
        loss = torch.zeros((), device=dev)
        if alpha < 1:
            loss = loss + (1 - alpha) * F.cross_entropy(logits, target)
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(**feeds).logits[:, :-1][mask].float()
            kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                          log_target=True, reduction="batchmean") * temperature ** 2
            kls.append(float(kl.detach()))
            loss = loss + alpha * kl
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if ck is not None and (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < steps:
            ck.save(step + 1, student, opt, sched, losses, [], rng.getstate(), {"kls": kls})
    if ck is not None:
        ck.clear()
    done(student)
    head = max(1, min(10, steps // 5))
    out = {"steps": steps, "objective": f"{alpha:g} * KL(T={temperature:g}) + {1 - alpha:g} * CE on completion tokens",
           "first_loss": round(sum(losses[:head]) / head, 5), "last_loss": round(sum(losses[-head:]) / head, 5),
           "seconds": round(time.perf_counter() - t0, 1), "batch_size": batch_size, "learning_rate": learning_rate}
    if kls:
        out["first_kl"], out["last_kl"] = round(sum(kls[:head]) / head, 5), round(sum(kls[-head:]) / head, 5)
    return out
