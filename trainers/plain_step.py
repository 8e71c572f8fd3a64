"""One non-private step (full fine-tuning, LoRA): the same shape as ``trainers.dp.step.DPStep``, without privacy.

Owns: ``PlainStep`` — micro-batches -> mean of per-example losses over the logical batch -> one backward each
-> gradients summed over ranks. The objective is the DP methods' one (the mean over the batch of each
example's mean token loss), so the two methods differ only in clipping and noise.

Profiler labels: ``full.forward``, ``full.backward``, ``full.reduce``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import record_function


class PlainStep:
    def __init__(self, trainable: list[torch.nn.Parameter], *, batch_size: int, world_size: int = 1):
        self.trainable, self.batch_size, self.world_size = trainable, batch_size, world_size

    def run(self, micro_batches: Iterable[Any], loss_fn: Callable[[Any], torch.Tensor], *, step: int) -> None:
        """``loss_fn(inputs)`` runs the forward and returns one loss per row; padding rows return 0."""
        for inputs in micro_batches:
            with record_function("full.forward"):
                losses = loss_fn(inputs)
            with record_function("full.backward"):
                (losses.sum() / self.batch_size).backward()
        if self.world_size > 1:
            with record_function("full.reduce"):
                for p in self.trainable:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
