"""Parallel presets (``performance.parallel``): how a run spreads its model over the processes of a launch.

    single | ddp      base.Replicated   whole parameters everywhere; one all-reduce per tensor
    fsdp2             fsdp2.Fsdp2       torch FSDP2: parameters, gradients, optimizer state sharded along dim 0
    zero1 | zero2 |   zero.Zero         DeepSpeed ZeRO stage 1 / 2 / 3 (3-offload: optimizer state on the CPU)
    zero3 | zero3-offload

``build_parallel`` wraps a freshly built model and its optimizer; the recipe then talks to the ``Parallel``
protocol only (base.py). Which (preset, method) pairs are covered by a test is stated in ``SUPPORTED``;
anything else is refused before any work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from privtune.errors import UserError

from .base import Parallel, Replicated

SHARDED = ("fsdp2", "zero1", "zero2", "zero3", "zero3-offload")
METHODS = ("full", "lora", "dp", "dp-lora")
# (preset, method) pairs a test runs (tests/trainers/test_parallel_*.py, test_recipe_parallel.py); others are refused.
# zero3-offload: tested with lora only.
SUPPORTED = frozenset(
    [(preset, method) for preset in ("single", "ddp", "fsdp2") for method in METHODS]
    + [(preset, method) for preset in ("zero1", "zero2", "zero3") for method in METHODS]
    + [("zero3-offload", "lora")]
)


def check_parallel(cfg) -> None:
    """Preflight (before any work): the preset suits this launch, and (preset, method) is covered by a test."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    preset, method = cfg.performance.parallel, cfg.train.method
    check_launch(preset, world_size=world, device_type=device_type)
    if method != "none" and (preset, method) not in SUPPORTED:
        raise UserError(f"performance.parallel={preset} with train.method={method} is not covered by privtune's "
                        "tests, so it is refused",
                        f"use one of: {', '.join(sorted({p for p, m in SUPPORTED if m == method}))}")


def check_launch(preset: str, *, world_size: int, device_type: str) -> None:
    """Refuse a launch that cannot do what the config asks (one line, before any work)."""
    import os

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") and device_type == "cpu":
        # `accelerate launch --cpu --num_processes N` starts ONE process whatever N is, and turns FSDP / DeepSpeed
        # configs into plain DDP on the CPU: the processes and the sharding the launch asks for silently vanish.
        raise UserError("`accelerate launch --cpu` starts one process whatever --num_processes says, and drops "
                        "FSDP / DeepSpeed sharding on the CPU",
                        "launch with torchrun --nproc_per_node N -m privtune run CONFIG (or privtune run CONFIG "
                        "for one process)")
    if preset == "single" and world_size > 1:
        raise UserError(f"performance.parallel=single but {world_size} processes were launched",
                        "use performance.parallel=ddp (or fsdp2 / zero*) or launch one process")


def build_parallel(preset: str, model: nn.Module, *, make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                   make_scheduler: Callable[[torch.optim.Optimizer], object], rank: int, world_size: int,
                   precision: str, is_dp: bool) -> Parallel:
    """Wrap ``model`` (all ranks built it identically) for ``preset``; the optimizer is built on the parameters
    the preset leaves (FSDP2 replaces them by sharded DTensors)."""
    if preset in ("single", "ddp"):
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(trainable)
        return Replicated(model, trainable, optimizer, make_scheduler(optimizer), preset=preset, rank=rank,
                          world_size=world_size)
    if preset == "fsdp2":
        from .fsdp2 import Fsdp2

        parallel = Fsdp2(model, rank=rank, world_size=world_size, precision=precision)
        optimizer = make_optimizer(parallel.trainable)
        parallel.attach(optimizer, make_scheduler(optimizer))
        return parallel
    from .zero import Zero

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable)
    return Zero(model, trainable, optimizer, make_scheduler(optimizer), preset=preset, rank=rank,
                world_size=world_size, precision=precision, is_dp=is_dp)


__all__ = ["SHARDED", "SUPPORTED", "Parallel", "Replicated", "build_parallel", "check_launch", "check_parallel"]
