"""Data-parallel calibration under ``torchrun`` / ``accelerate launch``, on ``torch.distributed``.

Nothing to configure: when the launcher has set ``WORLD_SIZE`` > 1 (with ``RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), the first call joins the process group (gloo: CPUs; nccl where CUDA is there). Each
process then calibrates every world-size-th batch of the (length-sorted) calibration set, and the per-batch
contributions are gathered on every process and added in batch order, so the statistics, and the plan, are
those of one process, bit for bit (:func:`edgeprune.pruning.calibration.add_in_order`). Only rank 0 writes
outputs (:func:`is_writer`); the others exit after the calibration they share.

    torchrun --no-python --nproc_per_node 2 edgeprune score --task sst2 --model DIR --out plan.json
    torchrun --no-python --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
             --nproc_per_node 2 edgeprune score ...        # one line per machine, R = 0, 1
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

import torch.distributed as dist

T = TypeVar("T")
_released = False  # set by release_workers: from then on rank 0 works alone


def world_size() -> int:
    if _released:
        return 1
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def init() -> None:
    """Join the launcher's process group once (no-op for a single process)."""
    if world_size() > 1 and not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def rank() -> int:
    if world_size() == 1:
        return 0
    init()
    return dist.get_rank()


def is_writer() -> bool:
    """True in the one process that writes outputs (rank 0, or the only process)."""
    return rank() == 0


def my_batches(batches: Iterable[T]) -> Iterator[tuple[int, T]]:
    """``(batch index, batch)`` for this process's share: every world-size-th batch, from its rank."""
    w, r = world_size(), rank()
    for b, batch in enumerate(batches):
        if b % w == r:
            yield b, batch


def gather_parts(parts: dict) -> dict:
    """Every process's per-batch contributions, merged (the identity for one process)."""
    if world_size() == 1:
        return parts
    init()
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, parts)
    merged: dict = {}
    for p in everyone:
        merged.update(p)
    return merged


def barrier() -> None:
    if world_size() > 1:
        init()
        dist.barrier()


def release_workers() -> None:
    """After a shared calibration: every process but rank 0 leaves (exit 0); rank 0 leaves the group and goes on
    alone (pruning, recovery, export and outputs are one process's work)."""
    if world_size() == 1 or not dist.is_initialized():
        return
    global _released
    writer = dist.get_rank() == 0
    dist.barrier()
    dist.destroy_process_group()
    _released = True
    if not writer:
        raise SystemExit(0)
