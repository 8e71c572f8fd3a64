"""The DeepSpeed ZeRO presets: ``zero1``, ``zero2``, ``zero3`` and ``zero3-offload``, with privtune's DP step.

Owns: ``deepspeed_config`` (the preset's DeepSpeed JSON; pure, so the recipe also writes it into the run dir for
users to read and reuse), ``Zero`` (the ``Parallel`` of base.py on a DeepSpeed engine) and the two DP reductions.

What DeepSpeed is allowed to do on its own: nothing that changes an update. The config fixes
``gradient_clipping: 0`` (DeepSpeed's default 1.0 rescaled a DP update by 0.81), one micro-batch per DeepSpeed
step (``gradient_accumulation_steps: 1``: privtune forms its own logical batches), no fp16 loss scaling (refused:
it skips or rescales steps), and ``bf16`` only as DeepSpeed's bf16 weights with fp32 master weights and fp32
gradient partitions. Its one averaging is used on purpose: its gradient hooks average over the world size, so the
non-private backward is scaled by the world size (the SUM-over-ranks convention of ``Replicated``), and the
ZeRO-1/2 update is handed over identical on every rank, where the average of W copies is the copy. Several
backwards between two steps (micro-batches) accumulate: ZeRO-3 does so as it is; ZeRO-1/2, whose every backward
would be a boundary that overwrites the last, run with ``managed_gradient_accumulation: false`` (``backward``
accumulates, ``step`` reduces).

The DP reductions (``Reduction`` of ``trainers/dp/step.py``), per parameter in the DP engine's order:

- ZeRO-1/2 (``ReplicatedZeroReduction``): every rank holds whole parameters in the forward, so the released sum is
  formed as under ddp — rank 0 adds the keyed noise to its own scaled sum, one all-reduce per tensor — and every
  rank ends with the same update U. DeepSpeed's partitioned optimizer only accepts gradients from inside a
  backward (a backward without parameter gradients crashes its post-backward hook, ``safe_set_full_grad``
  refuses outside one), so U is handed over as the gradient of ``Σ_p <p, U_p>``: ``engine.backward`` of that
  scalar gives every parameter the gradient U_p exactly, and DeepSpeed's average over ranks of identical copies
  is U again. Forwards of the DP step run through the unwrapped module (``Zero.model``), never through the
  engine, whose output hooks would start a DeepSpeed backward with no gradients.
- ZeRO-3 (``PartitionZeroReduction``): DeepSpeed keeps each parameter as a flat partition per rank —
  ``p.ds_tensor``, ``ceil(numel / world)`` values, rank r holding flat values [r·s, (r+1)·s), the padding at the
  end of the last partitions. Each whole fp32 clipped sum is flattened, padded to world·s and reduce-scattered
  (SUM), so rank r holds exactly its partition of the total; it adds the keyed noise of its real coordinates only
  (a ``Piece`` with offset r·s; the padding is nobody's coordinate, never noised, stays 0) and writes the
  partition with ``deepspeed.utils.safe_set_local_grad``, then runs the optimizer's
  ``independent_gradient_partition_epilogue()`` — without it DeepSpeed's ``step()`` applied a zero update,
  silently. ``safe_set_local_grad`` also returns silently while ``requires_grad`` is False: checked before.

After every DP step the preset checks that the optimizer was handed the update computed here: a step pre-hook on
the torch optimizer inside DeepSpeed sums the squares of the gradients it is about to apply; summed over ranks this
must equal the squared norm of the released update (1e-3 relative; bf16: 2e-2, DeepSpeed's bf16 gradients round
U). A zero update, a rescaled one (clipping, an average too many) or a skipped step raises ``DPInvariantError``.

Checkpoints are DeepSpeed's own (``save_checkpoint`` / ``load_checkpoint``, every rank writing its partitions into
the shared directory, frozen base weights excluded); a resume needs the same world size and stage (refused
otherwise, naming DeepSpeed's universal-checkpoint converter). ``full_trainable_state`` gathers the fp32 master
weights on rank 0 under the unwrapped model's names (PEFT names for LoRA).

Sensitive: the clipped sums before the reduction (private); the noise is added inside ``combine`` only.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from privtune.errors import UserError
from privtune.trainers.dp.errors import DPInvariantError, DPRefusal
from privtune.trainers.dp.noise import Piece
from privtune.trainers.dp.step import ReplicatedReduction

ZERO_PRESETS = ("zero1", "zero2", "zero3", "zero3-offload")
_STAGE = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3-offload": 3}
_TAG = "zero"  # the one DeepSpeed checkpoint tag inside a privtune checkpoint folder
_META = "zero.json"
_CHECK_RTOL = {"fp32": 1e-3, "bf16": 2e-2}


def deepspeed_config(preset: str, *, precision: str = "fp32") -> dict:
    """The DeepSpeed config a ZeRO preset runs with (the same dict ``Zero`` hands ``deepspeed.initialize``)."""
    if preset not in _STAGE:
        raise UserError(f"'{preset}' is not a DeepSpeed preset", f"choose one of {', '.join(ZERO_PRESETS)}")
    if precision == "fp16":
        raise DPRefusal("fp16 under DeepSpeed ZeRO needs dynamic loss scaling, which skips or rescales updates",
                        "set performance.precision: bf16 (or fp32)")
    if precision not in ("fp32", "bf16"):
        raise UserError(f"unknown precision '{precision}' for {preset}", "set performance.precision: fp32 or bf16")
    stage = _STAGE[preset]
    zero: dict = {"stage": stage}
    if preset == "zero3-offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    config = {
        # privtune forms its logical batches itself: one DeepSpeed micro-batch per DeepSpeed step, never averaged
        # or accumulated behind its back.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default 1.0 would rescale a DP update (clipping is privtune's)
        "zero_allow_untested_optimizer": True,  # the run's torch AdamW / SGD
        "zero_force_ds_cpu_optimizer": False,  # zero3-offload: the same torch optimizer, on the CPU
        "zero_optimization": zero,
        # ZeRO-1/2 with one DeepSpeed micro-batch per step would reduce at every backward, each overwriting the
        # last: the caller (privtune) owns the boundary instead, backward() accumulates and step() reduces.
        # ZeRO-3 accumulates the partitions of several backwards between steps as it is.
        "managed_gradient_accumulation": stage == 3,
        "fp16": {"enabled": False},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # privtune logs its own steps
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["data_types"] = {"grad_accum_dtype": "fp32"}  # DP updates land in fp32 gradient partitions
    return config


def _check_config(config: dict) -> None:
    """The settings without which DeepSpeed would change the update on its own (a hand-edited config)."""
    zero = config.get("zero_optimization", {})
    problems = []
    if float(config.get("gradient_clipping", 1.0)) != 0.0:
        problems.append("gradient_clipping must be 0")
    if int(config.get("gradient_accumulation_steps", 1)) != 1:
        problems.append("gradient_accumulation_steps must be 1")
    if config.get("fp16", {}).get("enabled", False):
        problems.append("fp16 must be off")
    if float(config.get("gradient_predivide_factor", 1.0)) != 1.0:
        problems.append("gradient_predivide_factor must be 1")
    if int(zero.get("stage", 0)) in (1, 2) and config.get("managed_gradient_accumulation", True):
        problems.append("ZeRO-1/2 need managed_gradient_accumulation false (each backward would overwrite the last)")
    if int(zero.get("zero_hpz_partition_size", 1)) != 1 or "mics_shard_size" in zero:
        problems.append("hpZ / MiCS secondary partitions are not supported")
    if problems:
        raise DPRefusal(f"the DeepSpeed config would change updates on its own ({'; '.join(problems)})",
                        "use the config privtune generates for the preset")


def _squared_norm(t: torch.Tensor) -> float:
    """|t|^2, accumulated in float64 chunk by chunk (no fp64 copy of a whole partition: they are large).

    Not ``vector_norm`` or ``dot``: their CPU kernels accumulate in float32 lanes and read 0.989 of the true
    squared norm of a 67M-value partition, which made this check refuse correct updates."""
    flat = t.detach().reshape(-1)
    return float(sum(torch.sum(chunk.float().square(), dtype=torch.float64) for chunk in flat.split(1 << 22)))


class _UpdateCheck:
    """What the torch optimizer inside DeepSpeed is about to apply, against what the DP reduction released.

    A step pre-hook sums the squared gradients of the parameters of each ``optimizer.step()`` call (DeepSpeed
    calls it once per parameter group / ZeRO-3 sub-group, on this rank's fp32 partitions)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, precision: str):
        self.rtol = _CHECK_RTOL[precision]
        self.expected: float | None = None  # this rank's share of the released update's squared norm
        self.seen = 0.0
        self.calls = 0
        optimizer.register_step_pre_hook(self._pre_step)

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if self.expected is None:
            return
        self.calls += 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.seen += _squared_norm(p.grad)

    def expect(self, squared_norm: float) -> None:
        self.expected, self.seen, self.calls = squared_norm, 0.0, 0

    def verify(self, *, device: torch.device) -> None:
        """Collective (when a DP step was written): raise unless the optimizer applied the released update."""
        if self.expected is None:
            return
        totals = torch.tensor([self.expected, self.seen, float(self.calls)], dtype=torch.float64, device=device)
        self.expected = None
        if dist.is_initialized():
            dist.all_reduce(totals)
        expected, seen, calls = (float(v) for v in totals.cpu())
        if calls == 0 or abs(seen - expected) > self.rtol * expected + 1e-30:
            what = "skipped the optimizer step" if calls == 0 else (
                f"applied an update of squared norm {seen:.6g} instead of the released {expected:.6g}"
                f" (ratio {seen / expected:.4g})" if expected > 0 else f"applied a non-zero update ({seen:.6g})")
            raise DPInvariantError(f"DeepSpeed {what}", "this DeepSpeed version changes DP updates on its own; "
                                   "report it with the DeepSpeed version, and use performance.parallel=ddp or fsdp2")


class ReplicatedZeroReduction(ReplicatedReduction):
    """ZeRO-1/2: the ddp release (rank 0 noises, one all-reduce), handed to DeepSpeed inside a backward."""

    def __init__(self, zero: Zero):
        super().__init__(rank=zero.rank, world_size=zero.world_size)
        self.zero = zero

    def write(self, engine, update):
        zero = self.zero
        params = zero.checked_params(engine, update)
        # Every rank holds the same U: rank 0's share of the check is the whole squared norm.
        squared = sum(_squared_norm(u) for u in update.values()) if self.rank == 0 else 0.0
        zero.check.expect(squared)
        # The gradient of sum_p <p, U_p> with respect to p is U_p exactly (1 * U_p); DeepSpeed averages the W
        # identical copies back to U_p (loss scale 1: no fp16).
        inject = sum(torch.dot(p.reshape(-1), update[name].reshape(-1).to(p.dtype)) for name, p in params.items())
        zero.engine.backward(inject)


class PartitionZeroReduction:
    """ZeRO-3: each whole clipped sum reduce-scattered into DeepSpeed's flat partitions; each owner noises its own."""

    def __init__(self, zero: Zero):
        self.zero = zero
        self.rank, self.world_size = zero.rank, zero.world_size

    def combine(self, sums, *, privatize):
        params = self.zero.params
        if list(sums) != list(params):
            raise DPInvariantError("the clipped sums are not in the ZeRO preset's parameter order",
                                   "build the DP engine on Zero.model with Zero.trainable")
        partitions, pieces = {}, []
        for index, name in enumerate(list(sums)):
            total = sums.pop(name)  # freed as it goes: the whole sums are the step's largest buffers
            p = params[name]
            numel = total.numel()
            size = math.ceil(numel / self.world_size)  # DeepSpeed's partition size (padding at the end)
            if numel != p.ds_numel or p.ds_tensor.numel() != size:
                raise DPInvariantError(f"{name}: DeepSpeed's partition holds {p.ds_tensor.numel()} of {p.ds_numel} "
                                       f"values, not ceil({numel} / {self.world_size})",
                                       "report this with the DeepSpeed version")
            flat = total.reshape(-1)
            if size * self.world_size != numel:
                flat = torch.cat([flat, flat.new_zeros(size * self.world_size - numel)])
            local = flat.new_empty(size)
            dist.reduce_scatter_tensor(local, flat.contiguous(), op=dist.ReduceOp.SUM)
            start = self.rank * size
            real = max(0, min(numel, start + size) - start)
            if real:
                pieces.append(Piece(local[:real], index, numel, offset=start))
            partitions[name] = local
        privatize(pieces, noise=True)  # privacy-critical: each rank noises only the coordinates it owns
        return partitions

    def write(self, engine, update):
        from deepspeed.utils import safe_set_local_grad

        zero = self.zero
        params = zero.checked_params(engine, update)
        zero.check.expect(sum(_squared_norm(u) for u in update.values()))
        for name, p in params.items():
            safe_set_local_grad(p, update[name])
        zero.ds_optimizer.independent_gradient_partition_epilogue()


class Zero:
    """A ZeRO preset (see the module docstring). Build it on the unwrapped model and its torch optimizer."""

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler, *, preset: str, rank: int, world_size: int, precision: str = "fp32", is_dp: bool):
        self.deepspeed_config = deepspeed_config(preset, precision=precision)
        self._init(model, trainable, optimizer, scheduler, preset=preset, rank=rank, world_size=world_size,
                   precision=precision, is_dp=is_dp, config=self.deepspeed_config)

    @classmethod
    def with_config(cls, model, trainable, optimizer, scheduler, *, preset: str, rank: int, world_size: int,
                    precision: str, is_dp: bool, config: dict) -> Zero:
        """Tests and experts: a hand-edited DeepSpeed config (still checked: nothing that changes updates)."""
        self = cls.__new__(cls)
        self.deepspeed_config = config
        self._init(model, trainable, optimizer, scheduler, preset=preset, rank=rank, world_size=world_size,
                   precision=precision, is_dp=is_dp, config=config)
        return self

    def _init(self, model, trainable, optimizer, scheduler, *, preset, rank, world_size, precision, is_dp, config):
        _check_config(config)
        in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
        if {id(p) for p in in_optimizer} != {id(p) for p in trainable} or len(in_optimizer) != len(trainable):
            raise RuntimeError("the optimizer must hold exactly the trainable parameters, each once")
        dtypes = {p.dtype for p in trainable}
        if torch.float16 in dtypes or (torch.bfloat16 in dtypes and precision != "bf16"):
            raise UserError(f"the model's trainable weights are {', '.join(sorted(str(d) for d in dtypes))}; under "
                            f"{preset} DeepSpeed keeps fp32 master weights of low-precision weights only with bf16 "
                            "enabled (fp16 is not supported)", "set model.dtype: float32, or performance.precision: bf16")
        if not dist.is_initialized():
            raise UserError(f"performance.parallel={preset} needs a process group",
                            "launch with torchrun (torchrun --nproc_per_node N -m privtune run CONFIG)")
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(f"rank {rank} / world size {world_size} disagree with the process group's "
                               f"{dist.get_rank()} / {dist.get_world_size()}")
        import deepspeed  # picks its accelerator itself (the CPU where there is no GPU)
        import deepspeed.comm

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
        self.preset, self.rank, self.world_size, self.precision = preset, rank, world_size, precision
        self.stage, self.is_dp = _STAGE[preset], is_dp
        self.optimizer, self.scheduler = optimizer, scheduler  # the torch ones, stepped inside DeepSpeed
        self.check = _UpdateCheck(optimizer, precision=precision)
        self.engine, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=copy.deepcopy(config))
        self.module = self.engine.module
        # The DP step's forwards run through the module itself (the engine's output hooks would start a
        # DeepSpeed backward); non-private forwards through the engine, whose backward reduces the gradients.
        self.model = self.module if is_dp else self.engine
        self.trainable = list(trainable)  # the same Parameter objects (ZeRO-3 adds its ds_* attributes)
        names = {id(p): n for n, p in self.module.named_parameters()}  # a tied weight: its first name
        self.params = {names[id(p)]: p for p in self.trainable}
        if self.stage == 3:
            self._check_partitions()

    def _check_partitions(self) -> None:
        """Every trainable parameter is one DeepSpeed partition set, held once by the ZeRO-3 optimizer (a tied
        weight shared by two modules included); anything else would be reduced or noised twice."""
        held: dict[int, int] = {}
        for group in self.ds_optimizer.fp16_groups:
            for p in group:
                held[id(p)] = held.get(id(p), 0) + 1
        for name, p in self.params.items():
            if not hasattr(p, "ds_tensor") or held.get(id(p), 0) != 1:
                raise DPRefusal(f"DeepSpeed ZeRO-3 does not hold trainable parameter {name} as one partitioned "
                                "parameter (a tied weight split into copies?)",
                                "untie it, or use performance.parallel=zero2 or ddp")

    # ------------------------------------------------------------------------------------------------------
    def reduction(self):
        if not self.is_dp:
            raise RuntimeError("this Zero preset was built for a non-private method (is_dp=False)")
        return PartitionZeroReduction(self) if self.stage == 3 else ReplicatedZeroReduction(self)

    def checked_params(self, engine, update: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
        """The DP engine's parameters, once it is clear they are this preset's and can receive a gradient."""
        if list(engine.params) != list(self.params) or any(engine.params[n] is not p for n, p in self.params.items()):
            raise DPInvariantError("the DP engine's parameters are not the ZeRO preset's trainable parameters",
                                   "build the DP engine on Zero.model with Zero.trainable")
        if set(update) != set(self.params):
            raise DPInvariantError("the update does not cover exactly the trainable parameters",
                                   "pass the dict returned by the reduction unchanged")
        frozen = [n for n, p in self.params.items() if not p.requires_grad]
        if frozen:  # DeepSpeed drops a gradient written to a parameter that does not require grad, silently
            raise DPInvariantError(f"trainable parameter(s) {', '.join(frozen[:3])} have requires_grad=False "
                                   "while the update is written", "write the update outside engine.micro_batch")
        return self.params

    def plain_backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; privtune's convention is their sum (as ddp's all-reduce).
        self.engine.backward(loss * self.world_size)

    def finish_plain_step(self) -> None:
        pass  # DeepSpeed reduced (ZeRO-2/3: partitioned) the gradients inside each backward / at its step

    def step(self) -> None:
        self.engine.step()  # the torch optimizer on this rank's partitions, then the scheduler; grads cleared
        self.check.verify(device=self.engine.device)

    # ------------------------------------------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        directory = Path(directory)
        self.engine.save_checkpoint(str(directory), tag=_TAG, save_latest=False, exclude_frozen_parameters=True)
        if self.rank == 0:
            meta = {"preset": self.preset, "stage": self.stage, "world_size": self.world_size,
                    "precision": self.precision}
            (directory / _META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def load_state(self, directory: Path) -> None:
        directory = Path(directory)
        meta = json.loads((directory / _META).read_text())
        if (meta["stage"], meta["world_size"]) != (self.stage, self.world_size):
            raise UserError(f"checkpoint {directory} holds DeepSpeed ZeRO-{meta['stage']} partitions of "
                            f"{meta['world_size']} processes; this run is ZeRO-{self.stage} on {self.world_size}",
                            f"resume with {meta['world_size']} processes and performance.parallel={meta['preset']} "
                            "(or convert the checkpoint with DeepSpeed's ds_to_universal.py)")
        path, _ = self.engine.load_checkpoint(str(directory), tag=_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}")

    def full_trainable_state(self) -> dict[str, torch.Tensor] | None:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.params.items():  # collective, one parameter at a time (ZeRO-3: an all-gather each)
            full = safe_get_full_fp32_param(p)
            if full is None:
                raise RuntimeError(f"DeepSpeed holds no fp32 master weight for {name}")
            if self.rank == 0:
                shape = tuple(getattr(p, "ds_shape", p.shape))
                out[name] = full.detach().reshape(shape).to("cpu", copy=True).contiguous()
        return out if self.rank == 0 else None


__all__ = ["ZERO_PRESETS", "PartitionZeroReduction", "ReplicatedZeroReduction", "Zero", "deepspeed_config"]
