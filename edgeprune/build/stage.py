"""The prune stage, which both kinds of build share (:func:`stage_prune`), on the cache contract of every stage
(:class:`edgeprune.cache.Stage`: a directory named by the fingerprint of its inputs, reused only when every file
it wrote verifies against its SHA-256 record and the stage's own check passes, else written atomically and
sealed)."""
from __future__ import annotations

from pathlib import Path

from edgeprune.build.config import BuildConfig, log
from edgeprune.cache import Stage, cache_root
from edgeprune.training.resume import checkpoints_under


def prune_key(cfg: BuildConfig, original_dir: Path) -> dict:
    """The prune options that change the pruned model: not where memory goes (--max-memory, --offload-dir), and
    the path only when it is layer-wise (its recovery has no teacher)."""
    from edgeprune.pruning.pipeline import memory_path

    key = {k: v for k, v in cfg.prune.to_dict().items()
           if k not in ("layerwise", "max_memory_gb", "offload_dir", "device")}  # where, not what, is computed
    if memory_path(original_dir, cfg.task, cfg.prune)[0]:
        key["layerwise"] = True
    return key


def stage_prune(cfg: BuildConfig, original_dir: Path, original_hash: str) -> Path:
    """The pruned (and recovered) checkpoint of ``cfg``, with its plan and record (``edgeprune_prune.json``)."""
    from edgeprune.pruning.pipeline import prune
    from edgeprune.pruning.plan import PrunePlan
    from edgeprune.pruning.save import save_pruned

    plan = PrunePlan.load(cfg.plan_file) if cfg.plan_file else None
    stage = Stage("prune", original_hash, prune_key(cfg, original_dir), cfg.data.key(), cfg.task.name,
                  plan.to_json() if plan else None)

    if stage.reuse():
        return stage.dir
    log(f"prune: {cfg.prune.method}, k={cfg.prune.experts or 'adaptive'}, recovery {cfg.prune.recovery_steps} steps")
    with checkpoints_under(cache_root() / "partial" / stage.dir.name):  # an interrupted recovery resumes
        model, plan, info = prune(original_dir, cfg.task, cfg.data, cfg.prune, plan=plan)
    with stage.write() as tmp:  # under torchrun, only rank 0 gets here (the others left after the shared work)
        save_pruned(model, original_dir, tmp, plan, info)
    return stage.dir
