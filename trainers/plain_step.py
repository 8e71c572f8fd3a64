"""One non-private step (full fine-tuning, LoRA): the same shape as ``trainers.dp.step.DPStep``, without privacy.

Owns: ``PlainStep`` — micro-batches -> mean of per-example losses over the logical batch -> one backward each
-> gradients summed over ranks (by the parallel preset's ``finish_plain_step``: an all-reduce under ddp; FSDP2
and ZeRO reduce inside their backward). The objective is the DP methods' one (the mean over the batch of each
example's mean token loss), so the two methods differ only in clipping and noise.

Profiler labels: ``full.forward``, ``full.backward``, ``full.reduce``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.profiler import record_function


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


class PlainStep:
    def __init__(self, *, batch_size: int, backward: Callable[[torch.Tensor], None] = _backward,
                 finish: Callable[[], None] | None = None):
        self.batch_size, self.backward, self.finish = batch_size, backward, finish

    def run(self, micro_batches: Iterable[Any], loss_fn: Callable[[Any], torch.Tensor], *, step: int) -> None:
        """``loss_fn(inputs)`` runs the forward and returns one loss per row; padding rows return 0."""
        for inputs in micro_batches:
            with record_function("full.forward"):
                losses = loss_fn(inputs)
            with record_function("full.backward"):
                self.backward(losses.sum() / self.batch_size)
        if self.finish is not None:
            with record_function("full.reduce"):
                self.finish()
