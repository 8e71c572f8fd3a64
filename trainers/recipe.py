"""The fine-tuning recipe: full | lora | dp | dp-lora in one loop that reads top to bottom.

    privtune run configs/paper_a/cpu/dp-lora.yaml                      # one process
    torchrun --nproc_per_node 2 -m privtune run CONFIG                 # data parallel (gloo on CPU, NCCL on GPU)
    torchrun ... -m privtune run CONFIG performance.parallel=fsdp2     # sharded: fsdp2 | zero1 | zero2 | zero3 ...

``setup`` loads data and model, wraps it for ``performance.parallel`` (``trainers/parallel/``: the preset owns
the optimizer step, the reduction of the DP sums, checkpoints and the gathered release), builds the DP engine,
sampler, accountant and ledger, and resumes from the newest complete checkpoint; ``train`` runs logical steps; ``save_checkpoint`` and ``save_model`` write the run dir;
``cleanup`` tears down. Each logical step is:

- non-private (full, lora), ``trainers.plain_step.PlainStep``: a shuffled fixed-size batch; mean of per-example
  losses; gradients summed over ranks.
- DP (dp, dp-lora), ``trainers.dp.step.DPStep``: a Poisson sample of units; per-unit clipped gradients summed by
  the DP engine (one backward per micro-batch); the preset's reduction sums them over ranks and adds Gaussian
  noise σ·C once per coordinate; divided by the expected batch size q·N; the optimizer steps; the ledger counts
  the step.

Privacy unit: one example, or one user (``privacy.unit=group``, ``data.group_by``). Sensitive: the training data,
which batches were drawn, the per-unit norms (logged only as aggregates).
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from privtune.errors import Preempted, TrainingInterrupted, UserError
from privtune.progress import info, progress
from privtune.trainers.batches import ShuffledBatches, collate
from privtune.trainers.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_secret,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from privtune.trainers.config import TrainingRun
from privtune.trainers.memory import PeakMemory
from privtune.trainers.output import Guarantee, save_model_dir, trainable_parameter_count
from privtune.trainers.plain_step import PlainStep
from privtune.trainers.train_log import TrainLog

STAGE = "train"


@dataclass
class StepStats:
    """What one step did on this rank: the sum of per-row losses, units, tokens and (DP) per-unit norms."""

    loss_sum: float = 0.0
    units: int = 0
    tokens: int = 0
    unit_norms: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    def add(self, losses: torch.Tensor, *, real_rows: int, tokens: int) -> None:
        self.loss_sum += float(losses.sum())  # padding rows have loss exactly 0
        self.units += real_rows
        self.tokens += tokens


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class FineTuneRecipe:
    def __init__(self, cfg: TrainingRun, run_dir: Path, *, train_key: str | None = None,
                 replay_key: int | None = None):
        self.cfg, self.run_dir = cfg, run_dir
        self.replay_key = replay_key  # tests only: replay a run's secret key instead of drawing a fresh one
        self.train_key = train_key  # digest of what this training reads; checkpoints carry it (stages.plan_run)
        self.is_dp = cfg.is_dp
        self.stop_signal: int | None = None
        self.last_checkpoint: int | None = None

    # ---------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from privtune.corpora import load_prepared
        from privtune.process import current
        from privtune.trainers.lora import prepare_trainable
        from privtune.trainers.models import load_model

        cfg = self.cfg
        self.state = current()
        self.rank, self.world = self.state.rank, self.state.world_size
        self.device = self.state.device
        if cfg.performance.num_threads:
            torch.set_num_threads(cfg.performance.num_threads)
        self.train_data = load_prepared(self.run_dir / "data").train
        torch.manual_seed(cfg.seed)  # the same initial weights (LoRA adapters included) on every rank
        model, self.tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype, seed=cfg.seed)
        model, _ = prepare_trainable(model, cfg.train.method, cfg.train.lora)
        torch.manual_seed(cfg.seed + 1 + self.rank)  # per-rank streams from here on (dropout)
        model.to(self.device)
        model.train()
        self.num_trainable = trainable_parameter_count(model)
        self._setup_parallel(model)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=cfg.performance.precision == "bf16")
        if self.is_dp:
            self._setup_dp()
        else:
            from privtune.trainers.plan import training_steps

            n = len(self.train_data)
            self.total_steps = training_steps(self.cfg, n)
            self.batches = ShuffledBatches(n, batch_size=cfg.train.batch_size, seed=cfg.seed,
                                           micro_batch_size=cfg.performance.micro_batch_size,
                                           world_size=self.world, rank=self.rank)
            self.update = PlainStep(batch_size=self.batches.batch_size, backward=self.parallel.plain_backward,
                                    finish=self.parallel.finish_plain_step)
            self.ledger = self._open_ledger(unit="example", num_units=n)
        self.step = 0
        self._resume()
        self.log = TrainLog(self.run_dir, resume_step=self.step) if self.rank == 0 else None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _setup_parallel(self, model: torch.nn.Module) -> None:
        """Wrap the model for performance.parallel; from here on forwards run through ``self.model`` and the
        optimizer holds the preset's parameters (sharded DTensors under fsdp2)."""
        from privtune.trainers.parallel import build_parallel, check_launch
        from privtune.trainers.parallel.fsdp2 import decoder_layers
        from privtune.trainers.parallel.launch_configs import write_launch_configs

        cfg = self.cfg
        preset = cfg.performance.parallel
        check_launch(preset, world_size=self.world, device_type=self.device.type)
        t, warmup = cfg.train, cfg.train.warmup_steps

        def make_optimizer(params):
            if t.optimizer == "adamw":
                return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
            return torch.optim.SGD(params, lr=t.learning_rate, weight_decay=t.weight_decay)

        def make_scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))

        layers = decoder_layers(model)
        layer_class = type(layers[0]).__name__ if layers else None  # before FSDP2 renames the class
        self.parallel = build_parallel(preset, model, make_optimizer=make_optimizer, make_scheduler=make_scheduler,
                                       rank=self.rank, world_size=self.world, precision=cfg.performance.precision,
                                       is_dp=self.is_dp)
        if self.rank == 0:  # the launcher configs this preset implies, for users to read and reuse
            write_launch_configs(self.run_dir, preset=preset, num_processes=self.world,
                                 precision=cfg.performance.precision, layer_class=layer_class,
                                 deepspeed=getattr(self.parallel, "deepspeed_config", None))
        self.model, self.trainable = self.parallel.model, self.parallel.trainable
        self.scheduler = self.parallel.scheduler
        self.sharded = preset not in ("single", "ddp")

    def _setup_dp(self) -> None:
        from privtune.trainers.dp import DPEngine, PoissonBatchSampler
        from privtune.trainers.dp.step import DPStep
        from privtune.trainers.plan import resolve_plan

        cfg, data = self.cfg, self.train_data
        unit_rows = None
        if cfg.privacy.unit == "group":
            groups: dict[str, list[int]] = {}
            for i, example in enumerate(data):
                groups.setdefault(str(example.group), []).append(i)
            unit_rows = list(groups.values())
        num_units = len(unit_rows) if unit_rows is not None else len(data)
        self.plan = resolve_plan(cfg, num_units)
        self.total_steps = self.plan.steps
        self.randomness_key = self._randomness_key()
        self.engine = DPEngine(self.model, trainable=self.trainable, clip_norm=self.plan.clip_norm,
                               clipping=self.plan.clipping)
        self.update = DPStep(self.engine, noise_multiplier=self.plan.noise_multiplier,
                             expected_batch_size=self.plan.expected_batch_size,
                             randomness_key=self.randomness_key, secure_rng=self.plan.secure_rng,
                             reduction=self.parallel.reduction())
        self.sampler = PoissonBatchSampler(num_units, sample_rate=self.plan.sample_rate, steps=self.plan.steps,
                                           seed=self.randomness_key, micro_batch_size=cfg.performance.micro_batch_size,
                                           unit_rows=unit_rows, world_size=self.world, rank=self.rank)
        self.ledger = self._open_ledger(unit=cfg.privacy.unit, num_units=num_units)
        if self.rank == 0:
            info(self.plan.describe(self.num_trainable))

    def _randomness_key(self) -> int:
        """What the Poisson sample and the noise are drawn from: a 128-bit secret from the OS CSPRNG (rank 0 draws
        it, every rank receives it over the process group; a resumed run takes it from its checkpoint), or the
        public seed under privacy.reproducible."""
        from privtune.trainers.dp import secret_seed

        if self.plan.reproducible:
            return self.cfg.seed
        if self.replay_key is not None:
            return self.replay_key
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None:
            key = load_secret(ckpt).get("randomness_key")
            if key is None:
                raise UserError(f"checkpoint {ckpt} holds no randomness key, so its run cannot continue in secret",
                                "delete the run dir's checkpoints/ to start over")
            return key
        box = [secret_seed() if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)  # the same sample and noise on every rank
        return box[0]

    def _open_ledger(self, *, unit: str, num_units: int):
        from privtune.accounting.ledger import Ledger

        if self.rank != 0:
            return None
        return Ledger.open(self.run_dir, privacy_unit=unit, dataset_size=num_units,
                           group_by=self.cfg.data.group_by if unit == "group" else None, dataset=self.cfg.data.source)

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return
        extra, rngs = load_checkpoint(ckpt, parallel=self.parallel)
        self.step = self.last_checkpoint = extra["step"]
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        if self.ledger is not None:
            self.ledger.rewind(extra["ledger"], stage=STAGE, run_id=self.cfg.name)
        info(f"[bold]train[/]  resumed from {ckpt.name}")

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.stop_signal == signal.SIGINT:  # Ctrl-C twice: stop now
            where = f"step-{self.last_checkpoint}" if self.last_checkpoint else "the start (no checkpoint yet)"
            raise TrainingInterrupted(f"interrupted twice during training; steps after the last checkpoint are "
                                      f"lost: the same command resumes from {where}")
        if signum == signal.SIGINT and self.rank == 0:
            info("[bold]train[/]  Ctrl-C: writing a checkpoint after this step, then stopping "
                 "(Ctrl-C again to stop at once)")
        self.stop_signal = signum  # acted on at the end of the current step: a checkpoint, then exit

    def _stop_requested(self) -> bool:
        """True on every rank if a stop signal reached any rank, so all ranks checkpoint the same step."""
        flag = self.stop_signal or 0
        if self.world > 1:
            t = torch.tensor([flag], dtype=torch.long, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        if flag and self.stop_signal is None:
            self.stop_signal = flag
        return bool(flag)

    # ---------------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        started, tokens = time.perf_counter(), 0
        first_step = self.first_step = self.step
        every = self.cfg.train.checkpoint_every
        with PeakMemory(self.device) as memory, \
                progress(total=self.total_steps - first_step, desc=f"train {self.cfg.train.method}", unit="steps") as bar:
            while self.step < self.total_steps:
                step_started = time.perf_counter()
                learning_rate = self.scheduler.get_last_lr()[0]
                stats = self._dp_step() if self.is_dp else self._plain_step()  # leaves the update in .grad
                self._check_every_parameter_has_a_gradient()
                self.parallel.step()  # optimizer + scheduler; ZeRO checks that the update it applied is ours
                self.step += 1
                self._count_step()
                self._log_step(stats, learning_rate=learning_rate, seconds=time.perf_counter() - step_started)
                tokens += stats.tokens  # summed over ranks by _log_step
                bar.update(1)
                stop = self._stop_requested()
                if stop or (every and self.step % every == 0):
                    self.save_checkpoint()
                if stop:
                    raise Preempted(f"signal {self.stop_signal} at step {self.step}", self.stop_signal)
        seconds = time.perf_counter() - started
        return {"steps": self.step - first_step, "seconds": seconds, "tokens": tokens,
                "peak_memory_bytes": memory.peak}

    def _log_step(self, stats: StepStats, *, learning_rate: float, seconds: float) -> None:
        """Aggregate this step's statistics over ranks and append them to the training log (rank 0)."""
        totals = torch.tensor([stats.loss_sum, stats.units, stats.tokens], dtype=torch.float64)
        norms = stats.unit_norms
        if self.world > 1:
            totals = totals.to(self.device)
            dist.all_reduce(totals)
            totals = totals.cpu()
            if self.is_dp:
                gathered = [None] * self.world
                dist.all_gather_object(gathered, norms)
                norms = torch.cat(gathered)
        stats.tokens = int(totals[2])
        if self.log is None:
            return
        loss_sum, units, step_tokens = totals.tolist()
        row = {"step": self.step, "loss": loss_sum / units if units else None, "learning_rate": learning_rate,
               "tokens": int(step_tokens), "seconds": round(seconds, 4),
               "tokens_per_second": round(step_tokens / max(seconds, 1e-9), 2)}
        if self.is_dp:
            norms = norms.to(torch.float64)
            q = (torch.quantile(norms, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
                 if norms.numel() else [None] * 3)
            row["clipped_fraction"] = float((norms > self.plan.clip_norm).double().mean()) if norms.numel() else None
            row["unit_norm_quantiles"] = {"p10": q[0], "p50": q[1], "p90": q[2],
                                          "max": float(norms.max()) if norms.numel() else None}
            row["epsilon"] = self._epsilon_so_far()
            row["delta"] = self.plan.delta
        self.log.write(row)

    def _epsilon_so_far(self) -> float | None:
        from privtune.accounting.calibrate import compute_epsilon

        if not self.plan.formal:
            return None
        return compute_epsilon(noise_multiplier=self.plan.noise_multiplier, delta=self.plan.delta,
                               sample_rate=self.plan.sample_rate, steps=self.step, accountant=self.plan.accountant)

    def _check_every_parameter_has_a_gradient(self) -> None:
        """Guardrail: an optimizer step must update every trainable parameter (opacus #820: LoRA never updated)."""
        if self.cfg.performance.parallel.startswith("zero"):
            return  # DeepSpeed holds the update in its partitions: its preset checks the step it applied
        local = [getattr(p.grad, "_local_tensor", p.grad) for p in self.trainable]  # FSDP2: this rank's shard
        missing = [i for i, g in enumerate(local) if g is None or not torch.isfinite(g).all()]
        if missing:
            names = {id(p): n for n, p in self.model.named_parameters()}
            raise RuntimeError(f"step {self.step}: no finite gradient for "
                               f"{[names[id(self.trainable[i])] for i in missing[:3]]}; refusing to step")

    def _inputs(self, rows: list[int]):
        return collate(rows, self.train_data.input_ids, pad_id=self.tokenizer.pad_token_id).to(self.device)

    def _loss_fn(self, stats: StepStats):
        """What the update objects call per micro-batch, on (inputs, real rows): forward, per-row losses, stats."""
        from privtune.trainers.dp import per_example_loss

        def loss_fn(item) -> torch.Tensor:
            inputs, real_rows = item
            with self.autocast:
                logits = self.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
            # Every method's objective: the mean over the batch of each example's mean token loss.
            losses = per_example_loss(logits.float(), inputs.labels)
            stats.add(losses.detach(), real_rows=real_rows, tokens=inputs.num_tokens)
            return losses

        return loss_fn

    def _plain_step(self) -> StepStats:
        stats = StepStats()
        micro_batches = ((self._inputs(rows), sum(1 for r in rows if r >= 0))
                         for rows in self.batches.micro_batches(self.step))
        self.update.run(micro_batches, self._loss_fn(stats), step=self.step)
        return stats

    def _dp_step(self) -> StepStats:
        from privtune.trainers.dp.step import MicroBatchInputs

        batch = self.sampler.batch(self.step)
        stats = StepStats()
        every = self.cfg.train.self_check_every
        if every is not None and not self.sharded and (self.step == self.first_step or self.step % every == 0):
            # Not under sharding: its plain-autograd backward would enter the engine's collectives on some ranks
            # only. The sharded step is checked against brute force by tests/trainers/test_parallel_*.py.
            self._self_check(batch)

        def micro_batches():  # built one at a time: only one micro-batch's inputs are alive
            for micro in (m.without_padding() for m in batch.micro_batches):
                inputs = self._inputs(micro.rows.tolist())
                yield MicroBatchInputs(micro.unit_ids.to(self.device), (inputs, micro.num_real_rows),
                                       sequence_length=inputs.input_ids.shape[1])

        done = self.update.run(micro_batches(), self._loss_fn(stats), step=self.step)
        stats.units = done.num_units  # a group unit's rows count once
        stats.unit_norms = done.unit_norms.detach().cpu()
        return stats

    def _self_check(self, batch) -> None:
        """Plain autograd against the engine on two units of this rank's first non-empty micro-batch."""
        from privtune.trainers.dp.selfcheck import pick_units, self_check

        micro = next((m for m in batch.micro_batches if m.num_real_rows), None)
        if micro is None:
            return
        units = pick_units(micro.unit_ids, micro.rows, count=2, generator=torch.Generator().manual_seed(self.step))

        def inputs(rows: list[int]):
            x = self._inputs(rows)
            return x.input_ids, x.attention_mask, x.labels

        self_check(self.engine, inputs, units)

    def _count_step(self) -> None:
        """The ledger counts optimizer steps, one per logical step, never micro-batches."""
        if self.ledger is None or not self.is_dp or not self.plan.formal:
            return  # runs without a guarantee are recorded once, as non-private, when the model is saved
        self.ledger.record_training(self._event(self.step), stage=STAGE, run_id=self.cfg.name,
                                    note=f"{self.cfg.train.method} on {self.cfg.data.source}")

    def _event(self, steps: int):
        from privtune.accounting.events import PoissonGaussianEvent

        return PoissonGaussianEvent(sample_rate=self.plan.sample_rate, noise_multiplier=self.plan.noise_multiplier,
                                    steps=steps, randomness=self.plan.randomness)

    # ---------------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        rngs = [rng_state()]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if self.rank == 0:
            extra = {"ledger": self.ledger.state_dict() if self.ledger is not None else None,
                     "train_key": self.train_key}
            secret = {"randomness_key": self.randomness_key} if self.is_dp and not self.plan.reproducible else None
        else:
            extra = secret = None
        save_checkpoint(self.run_dir, self.step, parallel=self.parallel, extra=extra, rank_rng=rngs, secret=secret)
        if self.rank == 0:
            prune_checkpoints(self.run_dir)
        self.last_checkpoint = self.step

    def guarantee(self) -> Guarantee:
        return guarantee_of(self.cfg.train.method, self.plan if self.is_dp else None)

    def released_model(self) -> torch.nn.Module | None:
        """Collective. Rank 0: an ordinary (unsharded) model holding the trained weights, for save_pretrained;
        under a sharded preset the trainable weights are gathered into a freshly built copy of the model."""
        if not self.sharded:
            return self.model if self.rank == 0 else None
        state = self.parallel.full_trainable_state()
        if self.rank != 0:
            return None
        from privtune.trainers.lora import prepare_trainable
        from privtune.trainers.models import load_model

        torch.manual_seed(self.cfg.seed)
        model, _ = load_model(self.cfg.model.name, dtype=self.cfg.model.dtype, seed=self.cfg.seed)
        model, _ = prepare_trainable(model, self.cfg.train.method, self.cfg.train.lora)
        params = dict(model.named_parameters())
        if set(state) - set(params):
            raise RuntimeError(f"gathered weights the model lacks: {sorted(set(state) - set(params))[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].dtype))
        return model

    def save_model(self, out: Path, stats: dict, model: torch.nn.Module) -> None:
        """Write model/ and efficiency.json into ``out`` (rank 0)."""
        from privtune.accounting.events import NonPrivateEvent

        if self.is_dp and self.plan.formal:
            self.ledger.close_training(stage=STAGE, run_id=self.cfg.name)
        else:  # honest bookkeeping: this model was trained on the data without a DP guarantee
            reason = (f"method {self.cfg.train.method} adds no noise" if not self.is_dp else
                      f"non-private debug run of {self.cfg.train.method} (sigma={self.plan.noise_multiplier})")
            self.ledger.record(NonPrivateEvent(reason=reason, steps=self.step), stage=STAGE)
        training = self.ledger.find(stage=STAGE, run_id=self.cfg.name) if self.is_dp and self.plan.formal else None
        # The card pins the ledger as it stands at release: `privtune budget` refuses a ledger changed since.
        save_model_dir(out, model, self.tokenizer, method=self.cfg.train.method, base_model=self.cfg.model.name,
                       data_source=self.cfg.data.source, guarantee=self.guarantee(), steps=self.step,
                       ledger=self._ledger_pin(training), event=training.event.to_dict() if training else None)
        seconds = stats["seconds"]
        efficiency = {
            "method": self.cfg.train.method,
            "steps": stats["steps"],
            "wall_seconds": round(seconds, 3),
            "tokens": stats["tokens"],
            "tokens_per_second": round(stats["tokens"] / max(seconds, 1e-9), 2),
            "peak_memory_bytes": stats["peak_memory_bytes"],
            "trainable_parameters": self.num_trainable,
            "world_size": self.world,
            "parallel": self.cfg.performance.parallel,
            "device": str(self.device),
        }
        if self.is_dp:
            efficiency["dp_plan"] = self.plan.to_dict()
        (out / "efficiency.json").write_text(json.dumps(efficiency, indent=2, sort_keys=True) + "\n")

    def _ledger_pin(self, training) -> dict:
        """The ledger hash the card records: right after this run's training entry (or its non-private record)."""
        if training is None:
            return self.ledger.head
        return {"ledger_id": self.ledger.ledger_id, "seq": training.seq, "hash": self.ledger.hash_at(training.seq)}

    def cleanup(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        if getattr(self, "log", None) is not None:
            self.log.close()


def guarantee_of(method: str, plan) -> Guarantee:
    """What a released model's card states: the plan's (ε, δ), or in words why there is no guarantee.

    ``plan``: the run's ``DPPlan``, or None for a method without noise. Shared by every trainer that releases
    (the recipe, DP-SFT through TRL), so their cards say the same thing for the same plan."""
    if plan is None:
        return Guarantee(None, None, None, "example", f"Method {method} adds no noise.")
    if not plan.formal:
        return Guarantee(None, plan.delta, None, plan.unit, "Non-private debug run of a DP method: no ε is claimed.")
    note = (f"DP-SGD with Poisson sampling q={plan.sample_rate:.6g}, σ={plan.noise_multiplier:.6g}, "
            f"C={plan.clip_norm:g}, T={plan.steps}.")
    if plan.reproducible:
        note += (" NOT A RELEASE: the sample and the noise are reproducible from the public seed "
                 "(privacy.reproducible), so this ε holds only against someone without the run's config.")
    return Guarantee(plan.epsilon, plan.delta, plan.accountant, plan.unit, note)


def run_training(cfg: TrainingRun, run_dir: Path, out: Path, *, train_key: str | None = None) -> dict:
    """The train stage: build the recipe, train, write the model into ``out`` (renamed to model/ by the caller)."""
    if cfg.train.method == "none":
        raise UserError("train.method=none has nothing to train", "choose full, lora, dp or dp-lora")
    recipe = FineTuneRecipe(cfg, run_dir, train_key=train_key)
    recipe.setup()
    try:
        stats = recipe.train()
        released = recipe.released_model()  # collective under sharding: the weights are gathered to rank 0
        if recipe.rank == 0:
            recipe.save_model(out, stats, released)
        return stats
    finally:
        recipe.cleanup()
