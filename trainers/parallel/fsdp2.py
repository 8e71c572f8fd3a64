"""The ``fsdp2`` preset: torch FSDP2 (``fully_shard``) with privtune's one-backward DP step.

Owns: ``Fsdp2`` (shard the model, step, save, gather) and ``Fsdp2Reduction`` (the DP step's clipped sums ->
this rank's shards of the released update).

How sharding is applied: every decoder layer is its own FSDP2 group and the root holds the rest (embeddings,
LM head, final norm), so a tied embedding / LM head weight is one parameter in one group. Parameters are
DTensors sharded along dim 0; inside a module's forward the DP engine's hooks see the gathered weight, and its
"trainable ``requires_grad`` off" trick carries over (FSDP2 copies the flag on every unshard), so no ordinary
weight gradient is formed and FSDP2 skips its own reduce-scatter.

The DP reduction, per parameter in the engine's order: each rank holds its own units' clipped sum of the whole
parameter (fp32); one ``reduce_scatter_tensor`` (SUM) leaves rank r with rows [r·c, (r+1)·c) of the total
(c = ceil(rows / world), FSDP2's own chunking; the padding rows are dropped); rank r adds the keyed noise of
exactly those coordinates (``Piece`` with their offset) and the result becomes ``.grad`` as a DTensor with the
parameter's mesh, placements, shape and stride (checked by ``DPEngine.set_grads``). Every coordinate is noised
once, by its owner, with the value one process would add: the release does not depend on the world size.

Sensitive: the clipped sums before the reduce-scatter (private); the noise is added only after it, on shards.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from privtune.errors import UserError
from privtune.trainers.dp.errors import DPInvariantError, DPRefusal
from privtune.trainers.dp.noise import Piece


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a decoder (the longest ModuleList of modules of one class)."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len({type(m) for m in module}) == 1:
            best = list(module)
    return best


def _check_tied_parameters_stay_in_one_group(model: nn.Module, layers: list[nn.Module]) -> None:
    """A parameter used in two groups (two layers, or a layer and the root) would be sharded and reduced twice:
    refuse. With decoder layers as groups a tied embedding / LM head lives in the root and is fine."""
    in_layers: dict[int, set[int]] = {}
    for index, layer in enumerate(layers):
        for p in layer.parameters():
            in_layers.setdefault(id(p), set()).add(index)
    layer_modules = {id(m) for layer in layers for m in layer.modules()}
    in_root = {id(p) for m in model.modules() if id(m) not in layer_modules for p in m.parameters(recurse=False)}
    if any(len(where) > 1 or pid in in_root for pid, where in in_layers.items()):
        raise DPRefusal("a parameter is shared between two FSDP2 shard groups (two decoder layers, or a layer and "
                        "the root), which would split its gradient across groups",
                        "untie it, or use performance.parallel=ddp or zero2")


class Fsdp2Reduction:
    """Reduce-scatter of each whole clipped sum into this rank's dim-0 shard; the owner adds its noise."""

    def __init__(self, params: dict[str, nn.Parameter], *, rank: int, world_size: int):
        self.params, self.rank, self.world_size = params, rank, world_size

    def combine(self, sums, *, privatize):
        from torch.distributed.tensor import DTensor

        if list(sums) != list(self.params):
            raise DPInvariantError("the clipped sums are not in the engine's parameter order",
                                   "pass the engine's ClippedSum.grads unchanged")
        shards, pieces = {}, []
        for index, (name, total) in enumerate(sums.items()):
            p = self.params[name]
            if not isinstance(p, DTensor):
                raise DPInvariantError(f"{name} is not sharded by FSDP2", "build Fsdp2 before the DP engine")
            rows = total.shape[0]
            per = math.ceil(rows / self.world_size)  # FSDP2's chunk size along dim 0
            width = total[0].numel() if rows else 0
            local_rows = p.to_local().shape[0]
            if local_rows != max(0, min(per, rows - self.rank * per)):
                raise DPInvariantError(f"{name}: the local shard has {local_rows} rows, not FSDP2's even chunking",
                                       "report this with the torch version")
            padded = total if rows == per * self.world_size else torch.cat(
                [total, total.new_zeros((per * self.world_size - rows, *total.shape[1:]))])
            out = total.new_empty((per, *total.shape[1:]))
            dist.reduce_scatter_tensor(out, padded.contiguous(), op=dist.ReduceOp.SUM)
            local = out[:local_rows]  # the padding rows are nobody's coordinates: never noised, never released
            pieces.append(Piece(local, index, total.numel(), offset=self.rank * per * width))
            shards[name] = local
        privatize(pieces, noise=True)  # privacy-critical: each rank noises only the coordinates it owns
        return {name: DTensor.from_local(local.to(self.params[name].dtype), self.params[name].device_mesh,
                                         self.params[name].placements, shape=self.params[name].shape,
                                         stride=self.params[name].stride())
                for name, local in shards.items()}

    def write(self, engine, update):
        engine.set_grads(update, copy=False)


class Fsdp2:
    """The ``fsdp2`` preset (see the module docstring). Build it on the unwrapped model, before the optimizer."""

    preset = "fsdp2"

    def __init__(self, model: nn.Module, *, rank: int, world_size: int, precision: str = "fp32"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise UserError("performance.parallel=fsdp2 needs a process group",
                            "launch with torchrun (torchrun --nproc_per_node N -m privtune run CONFIG)")
        self.rank, self.world_size = rank, world_size
        layers = decoder_layers(model)
        if not layers:
            raise UserError(f"{type(model).__name__} has no repeated decoder layers to shard",
                            "use performance.parallel=ddp for this model")
        _check_tied_parameters_stay_in_one_group(model, layers)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16" else MixedPrecisionPolicy()
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        for module in model.modules():  # non-private steps: gradients SUMMED over ranks, as under ddp
            if hasattr(module, "set_gradient_divide_factor"):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = self.scheduler = None

    def attach(self, optimizer: torch.optim.Optimizer, scheduler) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler

    def reduction(self):
        names = {id(p): n for n, p in self.model.named_parameters()}
        return Fsdp2Reduction({names[id(p)]: p for p in self.trainable}, rank=self.rank, world_size=self.world_size)

    def plain_backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # FSDP2 reduce-scatters (sum) into the sharded .grad after each backward

    def finish_plain_step(self) -> None:
        pass

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _trainable_names(self) -> list[str]:
        ids = {id(p) for p in self.trainable}
        return [n for n, p in self.model.named_parameters() if id(p) in ids]

    def full_trainable_state(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        return {name: full[name].contiguous() for name in self._trainable_names()}

    def save_state(self, directory: Path) -> None:
        """Gathered through torch.distributed.checkpoint's state-dict API: loads under any world size."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from privtune.trainers.checkpoint import save_weights_and_optimizer

        weights = self.full_trainable_state()
        optimizer = get_optimizer_state_dict(self.model, self.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            save_weights_and_optimizer(directory, weights, optimizer=optimizer, scheduler=self.scheduler.state_dict())

    def load_state(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from privtune.trainers.checkpoint import load_weights_and_optimizer

        weights, optimizer, scheduler = load_weights_and_optimizer(directory)
        options = StateDictOptions(full_state_dict=True, strict=False)  # frozen base weights are not saved
        set_model_state_dict(self.model, weights, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(scheduler)
