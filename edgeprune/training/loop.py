"""The CPU fine-tuning loop shared by the original, the dense baseline, progressive pruning and recovery.

Engineered for 2 CPU cores (DESIGN.md section 2): examples are tokenised once, batches are drawn from
length-sorted buckets and padded to the longest in the batch (SST-2 phrases average ~10 tokens, so most
batches are far shorter than ``max_length``), bf16 autocast where the CPU has native bf16, and the word
embeddings are frozen by default (half of MiniLM's parameters; fewer optimizer updates).

Optional knowledge distillation from a teacher's logits (Hinton et al. 2015):
loss = (1 - a) * CE(y, z_s) + a * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edgeprune.errors import ConfigError
from edgeprune.tasks.encoding import Encoded, bucketed_batches, collate, model_inputs
from edgeprune.training.resume import for_loop, resume


def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX); bf16 autocast is slower elsewhere."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_safe(model: torch.nn.Module) -> bool:
    """False for families whose own forward breaks under bf16 autocast (Switch writes bf16 expert outputs into
    an fp32 buffer): they train in their own dtype."""
    from edgeprune.errors import ModelError
    from edgeprune.models.registry import adapter_for

    try:
        return adapter_for(model.config).autocast_safe
    except ModelError:  # a dense sibling
        return True


@dataclass
class TrainConfig:
    """Hyper-parameters of one fine-tuning run (recorded next to the checkpoint)."""

    max_steps: int = 600
    batch_size: int = 32
    learning_rate: float = 5e-5
    router_learning_rate: Optional[float] = None
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    bf16: bool = field(default_factory=cpu_has_bf16)
    freeze_embeddings: bool = True
    only_router: bool = False
    distill_alpha: float = 0.0
    distill_temperature: float = 2.0
    fsdp: bool = False  # under torchrun: shard the training over the processes (FSDP2) instead of DDP
    seed: int = 0
    max_length: int = 128
    device: str = "cpu"  # edgeprune.scale.device: the model and its batches go there for the run, and back

    def to_dict(self) -> dict:
        return asdict(self)


def router_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the router parameters of an MoE of a registered family (empty for a dense model)."""
    from edgeprune.errors import ModelError
    from edgeprune.models.registry import adapter_for

    try:
        adapter = adapter_for(model.config)
    except ModelError:
        return set()
    return {k for layer in adapter.blocks(model) for k in adapter.router_keys(model, layer)}


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    router_lr = cfg.router_learning_rate or cfg.learning_rate
    groups = {"decay": [], "no_decay": [], "router": []}
    routers = router_parameter_names(model)
    for name, p in model.named_parameters():
        if cfg.only_router and name not in routers:
            p.requires_grad_(False)
        elif cfg.freeze_embeddings and ("word_embeddings" in name or "embed_tokens" in name or name == "shared.weight"):
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        if name in routers:
            groups["router"].append(p)
        elif p.ndim < 2 or "LayerNorm" in name or "norm" in (name.split(".")[-2:-1] or [""])[0]:
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    return [{"params": groups["decay"], "weight_decay": cfg.weight_decay},
            {"params": groups["no_decay"], "weight_decay": 0.0},
            {"params": groups["router"], "weight_decay": 0.0, "lr": router_lr}]


StepCallback = Callable[[int, torch.nn.Module, dict[str, torch.Tensor]], None]


class TeacherCache:
    """A teacher whose logits are memoised by batch content: runs that share a teacher and a seed see the same
    bucketed batches, so a sweep over pruning methods pays for the teacher's forward passes once."""

    def __init__(self, teacher: torch.nn.Module):
        self.teacher = teacher
        self.memo: dict[bytes, torch.Tensor] = {}

    def eval(self) -> "TeacherCache":
        self.teacher.eval()
        return self

    def __call__(self, **batch: torch.Tensor) -> SimpleNamespace:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        key = bytes(str(tuple(ids.shape)), "ascii") + ids.cpu().numpy().tobytes() + mask.cpu().numpy().tobytes()
        if key not in self.memo:
            self.memo[key] = self.teacher(**batch).logits
        return SimpleNamespace(logits=self.memo[key])


def train(model: torch.nn.Module, enc: Encoded, cfg: TrainConfig, teacher: Optional[torch.nn.Module] = None,
          on_step: Optional[StepCallback] = None, desc: str = "fine-tune", progress: bool = True,
          checkpoint: Optional[str] = None, checkpoint_every: int = 50) -> dict:
    """Fine-tune ``model`` in place for ``cfg.max_steps`` steps; returns timing and loss statistics.

    ``on_step(step, model, batch)`` runs after every optimizer step (progressive pruning hooks in here). Every
    ``checkpoint_every`` steps the run is checkpointed (``checkpoint``, or the directory
    :func:`edgeprune.training.resume.checkpoints_under` names) and a rerun resumes from it
    (:mod:`edgeprune.training.resume`).
    """
    from edgeprune.scale.device import borrowed

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    with borrowed(cfg.device, model, getattr(teacher, "teacher", teacher)) as device:  # a TeacherCache's module
        return _train(model, enc, cfg, teacher, on_step, desc, progress, checkpoint, checkpoint_every, rng, device)


def _train(model, enc, cfg, teacher, on_step, desc, progress, checkpoint, checkpoint_every, rng, device) -> dict:
    from edgeprune.scale.device import autocast_type, to
    from edgeprune.scale import distributed

    model.train()
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1 and on_step is not None:
        raise ConfigError("this method changes the model at every step, which runs in one process; run it "
                          "without torchrun")
    run = _Parallel(model, cfg, world)
    sched = torch.optim.lr_scheduler.LambdaLR(run.opt, _warmup_then_linear(cfg))
    if teacher is not None:
        teacher.eval()
    batches: list[list[int]] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    ck = for_loop(desc, cfg.to_dict(), len(enc), enc.input_ids[:8], enc.labels[:64], explicit=checkpoint) \
        if world == 1 and on_step is None else None  # state outside the loop (torchrun, a hook) is not saved
    state = resume(ck, model, run.opt, sched, rng, desc, cfg.max_steps, progress)
    start, losses, batches = state["step"], state["losses"], state["batches"]
    bar = tqdm(total=cfg.max_steps, initial=start, desc=desc, disable=not (progress and rank == 0), unit="step",
               dynamic_ncols=True)
    bf16 = cfg.bf16 and autocast_safe(model) and (teacher is None or autocast_safe(getattr(teacher, "teacher", teacher)))
    for step in range(start, cfg.max_steps):
        if len(batches) < world:
            batches = bucketed_batches(enc, cfg.batch_size, rng)
        step_batches = [batches.pop() for _ in range(world)]  # the same sequence in every process
        batch = to(collate(enc, step_batches[rank]), device)
        with torch.autocast(autocast_type(device), dtype=torch.bfloat16, enabled=bf16):
            loss = _loss(run.net, model, batch, teacher, cfg)
        run.step(loss)
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, model, batch)
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step == start + 9 and progress and rank == 0:
            _estimate(desc, cfg.max_steps - start, (time.perf_counter() - t0) / 10, ck, checkpoint_every)
        if ck is not None and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.max_steps:
            ck.save(step + 1, model, run.opt, sched, losses, batches, rng.getstate())
    bar.close()
    if ck is not None:
        ck.clear()
    run.finish()
    return {"steps": cfg.max_steps, "seconds": round(time.perf_counter() - t0, 1), "processes": world,
            "parallel": "fsdp" if run.sharded else "ddp" if world > 1 else "none",
            "final_loss": float(np.mean(losses[-50:])) if losses else math.nan}


def _estimate(desc: str, steps: int, per_step: float, ck, every: int) -> None:
    """One line, after the first ten steps: how long the rest will take at the measured rate."""
    total = steps * per_step
    if total < 60:
        return
    where = f"; checkpointed every {every} steps, an interrupted run resumes" if ck is not None else ""
    print(f"\n[edgeprune] {desc}: {steps} steps at {per_step:.2f} s a step on this machine now: about "
          f"{total / 60:.0f} min{where}", flush=True)


def _warmup_then_linear(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0."""
    warmup = int(cfg.warmup_ratio * cfg.max_steps)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - warmup))

    return lr_lambda


def _loss(net, model: torch.nn.Module, batch: dict, teacher, cfg: TrainConfig) -> torch.Tensor:
    """Cross-entropy on the labels, mixed with Hinton et al.'s distillation from ``teacher`` (module docstring)."""
    out = net(**model_inputs(model, batch))
    loss = out.loss
    if teacher is not None and cfg.distill_alpha > 0:
        with torch.no_grad():
            t_logits = teacher(**model_inputs(model, {k: v for k, v in batch.items() if k != "labels"})).logits.float()
        temp = cfg.distill_temperature
        kd = F.kl_div(F.log_softmax(out.logits.float() / temp, -1), F.softmax(t_logits / temp, -1),
                      reduction="batchmean") * temp * temp
        loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
    return loss


class _Parallel:
    """Where the optimizer steps: one process, data-parallel under torchrun (DDP through accelerate, each process
    a share of every step, gradients averaged), or sharded with ``cfg.fsdp`` (FSDP2, :mod:`edgeprune.scale.fsdp`)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, world: int):
        self.model, self.accelerator, self.net = model, None, model
        self.sharded = world > 1 and cfg.fsdp
        if cfg.fsdp and world == 1:
            raise ConfigError("--fsdp shards the recovery over the processes of torchrun; run the command under "
                              "`torchrun --no-python --nproc_per_node N edgeprune ...` or drop --fsdp")
        if self.sharded:
            from edgeprune.scale import fsdp

            self.net = fsdp.shard(model)
        self.groups = [g for g in _param_groups(self.net, cfg) if g["params"]]
        self.opt = torch.optim.AdamW(self.groups, lr=cfg.learning_rate)
        if world > 1 and not self.sharded:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
            self.net, self.opt = self.accelerator.prepare(model, self.opt)  # DDP around the same module

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.accelerator is not None:
            self.accelerator.backward(loss)  # gradients averaged over the processes
            self.accelerator.clip_grad_norm_(self.net.parameters(), 1.0)
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in self.groups for p in g["params"]], 1.0)
        self.opt.step()

    def finish(self) -> None:
        if self.sharded:
            from edgeprune.scale import fsdp

            fsdp.gather_into(self.net, self.model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(True)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, enc: Encoded, batch_size: int = 64, progress: bool = False,
                   desc: str = "evaluate") -> np.ndarray:
    """Logits for every example, in order (length-sorted internally for speed)."""
    model.eval()
    order = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i]))
    out = np.zeros((len(enc), model.config.num_labels), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
        idx = order[start : start + batch_size]
        batch = collate(enc, idx)
        batch.pop("labels")
        out[idx] = model(**model_inputs(model, batch)).logits.float().numpy()
    return out


def accuracy(logits: np.ndarray, labels: Sequence[int]) -> float:
    """Share of argmax predictions equal to the labels."""
    return float((logits.argmax(-1) == np.asarray(labels)).mean())
