"""What every parallel preset provides to the training recipe: the ``Parallel`` protocol.

Owns: the protocol, and the two presets that keep whole parameters on every rank (``Replicated``: ``single``
and ``ddp``). The sharding presets live one per module beside it (``fsdp2.py``, ``zero.py``).

A preset wraps the model and optimizer once (``setup``) and then answers, for each logical step: where the DP
step's clipped sums go (``reduction``), how a non-private backward is taken and its gradients combined
(``plain_backward`` / ``finish_plain_step``), how the optimizer steps (``step``), and how the state is saved,
restored and gathered (``save_state`` / ``load_state`` / ``full_trainable_state``). Every method marked
*collective* must be called by every rank in the same order.

Sensitive: the DP presets' ``reduction`` is where the noise is added (see ``trainers/dp/step.py``: every
coordinate of the released sum gets noise of std σ·C exactly once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from privtune.trainers.dp.step import Reduction, ReplicatedReduction


class Parallel(Protocol):
    preset: str
    rank: int
    world_size: int
    model: nn.Module  # what forwards run through
    trainable: list[nn.Parameter]  # in the model's parameter order (the order the keyed noise follows)

    def reduction(self) -> Reduction: ...

    def plain_backward(self, loss: torch.Tensor) -> None:
        """Non-private methods: backpropagate ``loss`` (a micro-batch's share of the logical-batch mean)."""

    def finish_plain_step(self) -> None:
        """Collective. After a non-private step's last backward: every rank's gradients summed over ranks."""

    def step(self) -> None:
        """Collective under sharding. The optimizer and scheduler step on the update in ``.grad``; grads cleared."""

    def save_state(self, directory: Path) -> None:
        """Collective. Write the trainable weights and the optimizer/scheduler state under ``directory``
        (rank 0 writes what is gathered; sharded formats write from every rank)."""

    def load_state(self, directory: Path) -> None:
        """Collective. Restore what ``save_state`` wrote, under any world size."""

    def full_trainable_state(self) -> dict[str, torch.Tensor] | None:
        """Collective. Rank 0: every trainable tensor, whole, on the CPU, under the unwrapped model's names."""


class Replicated:
    """``single`` and ``ddp``: whole parameters on every rank; gradients summed by one all-reduce per tensor.

    The model is not wrapped in ``DistributedDataParallel``: its reducer expects ordinary gradients, and the DP
    step forms per-unit gradients itself. The same all-reduce serves the non-private methods."""

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler, *, preset: str, rank: int, world_size: int):
        self.preset, self.rank, self.world_size = preset, rank, world_size
        self.model, self.trainable, self.optimizer, self.scheduler = model, trainable, optimizer, scheduler

    def reduction(self) -> Reduction:
        return ReplicatedReduction(rank=self.rank, world_size=self.world_size)

    def plain_backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def finish_plain_step(self) -> None:
        if self.world_size > 1:
            for p in self.trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save_state(self, directory: Path) -> None:
        """The optimizer state keyed by parameter name (torch.distributed.checkpoint's form), as ``fsdp2`` writes
        it: a checkpoint of either preset resumes under the other, on any number of processes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from privtune.trainers.checkpoint import save_weights_and_optimizer

        if self.rank == 0:
            optimizer = get_optimizer_state_dict(self.model, self.optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            save_weights_and_optimizer(directory, self.full_trainable_state(), optimizer=optimizer,
                                       scheduler=self.scheduler.state_dict())

    def load_state(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from privtune.trainers.checkpoint import load_weights_and_optimizer

        weights, optimizer, scheduler = load_weights_and_optimizer(directory)
        params = dict(self.model.named_parameters())
        missing = [name for name in weights if name not in params]
        if missing:
            raise RuntimeError(f"checkpoint {directory} has parameters the model lacks: {missing[:3]}")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(scheduler)

    def full_trainable_state(self) -> dict[str, torch.Tensor] | None:
        from privtune.trainers.checkpoint import trainable_state

        return trainable_state(self.model) if self.rank == 0 else None
