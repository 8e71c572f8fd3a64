"""DP-SFT inside TRL: ``DPSFTTrainer``, an ``SFTTrainer`` whose optimizer steps are privtune's one DP step.

Owns: how privtune's DP-SGD is plugged into TRL's ``SFTTrainer`` (transformers' ``Trainer`` loop), and the
refusals of the TRL settings that DP cannot honour. Everything the guarantee rests on comes from the
privtune run config through ``trainers/plan.py`` (q, σ, C, T: resolved once, never re-derived here) and runs
through ``trainers/dp/`` (``PoissonBatchSampler``, ``DPEngine``, ``DPStep``). TRL keeps what does not touch
privacy: dataset preparation (tokenising prompt/completion, the completion mask as labels = -100 on the
prompt), the optimizer and scheduler, the loop, logging, evaluation, saving.

What is overridden, and why:

- ``get_train_dataloader``: TRL's sampler (shuffled fixed-size batches) and collator are replaced by
  ``PoissonShares``: one Poisson logical batch per optimizer step, cut into fixed-count micro-batches of
  ``per_device_train_batch_size`` rows and dealt to the G = ``gradient_accumulation_steps`` calls of
  ``training_step`` that the loop makes per optimizer step.
- ``training_step``: the only place gradients are made. The first G - 1 calls of a step keep their share; the
  last one runs ``DPStep`` over the whole step's micro-batches — a plain logits forward (TRL's fused LM head
  calls ``lm_head`` outside its module, so the engine's hooks would not see it), the recipe's per-example loss
  (mean over each example's target tokens; prompt and padding carry label -100), per-unit clipping, noise
  σ·C once, division by the expected batch q·N — and leaves the released update in ``.grad``. TRL's
  ``compute_loss`` and accelerate's ``backward`` never run under DP. The loop then clips nothing
  (``max_grad_norm=0`` is required) and steps the optimizer once.
- The accountant (the run's ledger, ``privtune.accounting``) counts one step per DP step, i.e. per optimizer
  step, whatever G is; the same event the recipe records (``PoissonGaussianEvent``, stage ``train``).

Refused under DP, one line each (``DPRefusal``): packing and padding-free batching (several examples in one
row: per-row clipping would clip packs), gradient checkpointing (the engine does not support it), fp16 (its
loss scaler would unscale an update that was never scaled), ``max_grad_norm > 0``, DFT / label-smoothed /
custom losses, NEFTune (its noise scale depends on the batch's padded width), liger kernels, a custom data
collator, MoE load-balancing losses (they couple the batch), user-level units, several processes, and resuming
from a Trainer checkpoint (the secret key and the ledger state live in privtune's checkpoints, not TRL's).

Sensitive: the training rows, which rows each step sampled, the per-unit norms (logged only as the clipped
fraction), the randomness key (drawn from the OS CSPRNG unless ``privacy.reproducible``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

from privtune.progress import info
from privtune.trainers.batches import collate
from privtune.trainers.config import DP_METHODS, TrainingRun
from privtune.trainers.dp import DPEngine, PoissonBatchSampler, per_example_loss, secret_seed
from privtune.trainers.dp.errors import DPInvariantError, DPRefusal
from privtune.trainers.dp.step import DPStep, MicroBatchInputs, ReplicatedReduction
from privtune.trainers.lora import unique_trainable
from privtune.trainers.output import trainable_parameter_count
from privtune.trainers.plan import resolve_plan

from .shares import PoissonShares, Share

STAGE = "train"  # the ledger stage of training, as the recipe records it


def check_dp_args(args: SFTConfig) -> None:
    """The TRL / Trainer settings DP-SFT refuses, each with its fix; run before TRL touches the data."""
    def refuse(what: str, fix: str) -> None:
        raise DPRefusal(f"DP-SFT: {what}", fix)

    if args.packing:
        refuse("packing=True puts several examples in one row, so per-row clipping would clip packs, not examples",
               "set packing=False")
    if args.padding_free:
        refuse("padding_free=True flattens the batch into one row, so examples cannot be clipped one by one",
               "set padding_free=False")
    if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
        refuse("gradient checkpointing is not supported by the DP engine", "set gradient_checkpointing=False")
    if args.fp16:
        refuse("fp16 scales the loss for a backward that DP does not run", "use bf16=True or fp32")
    if args.max_grad_norm and args.max_grad_norm > 0:
        refuse(f"max_grad_norm={args.max_grad_norm} would clip the privatised update a second time",
               "set max_grad_norm=0 (privacy.clip_norm is the per-example clip)")
    if args.loss_type != "nll":
        refuse(f"loss_type={args.loss_type!r} is not the per-example loss the DP step clips", "set loss_type='nll'")
    if args.label_smoothing_factor:
        refuse("label smoothing is not supported", "set label_smoothing_factor=0")
    if args.neftune_noise_alpha:
        refuse("NEFTune's noise scale depends on the batch's padded width, which couples examples",
               "set neftune_noise_alpha=None")
    if args.use_liger_kernel:
        refuse("liger kernels replace the modules the DP engine hooks", "set use_liger_kernel=False")
    if args.world_size > 1:
        refuse(f"{args.world_size} processes: DP-SFT through TRL runs in one process for now",
               "launch one process, or use `privtune run` for data parallel DP")


class DPSFTTrainer(SFTTrainer):
    """``SFTTrainer`` for dp / dp-lora: Poisson batches, privtune's ``DPStep`` per optimizer step, the ledger.

    ``run`` is the privtune run config (its ``privacy`` and ``train`` sections give the plan); ``run_dir`` holds
    the ledger. ``args`` carries the performance side: ``per_device_train_batch_size`` is the micro-batch size
    (rows per forward), ``gradient_accumulation_steps`` how many ``training_step`` calls make one optimizer step.
    """

    def __init__(self, model, args: SFTConfig, train_dataset, processing_class, *, run: TrainingRun,
                 run_dir: Path, eval_dataset=None, callbacks=None, peft_config=None, replay_key: int | None = None):
        if run.train.method not in DP_METHODS:
            raise ValueError(f"DPSFTTrainer is for {' / '.join(DP_METHODS)}; method {run.train.method} "
                             "trains with trl.SFTTrainer")
        if run.privacy.unit != "example":
            raise DPRefusal("DP-SFT through TRL supports privacy.unit=example only for now",
                            "set privacy.unit=example, or use `privtune run` for user-level DP")
        if not isinstance(args, SFTConfig):
            raise TypeError(f"DPSFTTrainer takes an SFTConfig (see trainers.sft.run.sft_args), got {type(args).__name__}")
        check_dp_args(args)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, peft_config=peft_config)
        if self.aux_loss_enabled:
            raise DPRefusal("DP-SFT: a mixture-of-experts load-balancing loss couples the examples of a batch",
                            "set router_aux_loss_coef=0")
        self.run_config, self.run_dir = run, Path(run_dir)
        num_units = len(self.train_dataset)  # after TRL's preparation: every row left is one privacy unit
        self.plan = resolve_plan(run, num_units)
        if args.max_steps > 0 and args.max_steps != self.plan.steps:
            raise DPRefusal(f"DP-SFT: max_steps={args.max_steps} but the DP plan has T={self.plan.steps} steps",
                            "leave max_steps unset (-1) or set train.max_steps in the run config")
        self.args.max_steps = self.plan.steps  # the loop's optimizer steps are the plan's T
        self.randomness_key = self._randomness_key(replay_key)
        self.engine = DPEngine(self.model, trainable=unique_trainable(self.model), clip_norm=self.plan.clip_norm,
                               clipping=self.plan.clipping)
        self.dp_step = DPStep(self.engine, noise_multiplier=self.plan.noise_multiplier,
                              expected_batch_size=self.plan.expected_batch_size, randomness_key=self.randomness_key,
                              secure_rng=self.plan.secure_rng, reduction=ReplicatedReduction())
        self.sampler = PoissonBatchSampler(num_units, sample_rate=self.plan.sample_rate, steps=self.plan.steps,
                                           seed=self.randomness_key,
                                           micro_batch_size=args.per_device_train_batch_size)
        self.ledger = self._open_ledger(num_units)
        self._rows = (list(self.train_dataset["input_ids"]), list(self.train_dataset["labels"]))
        self._pending: list = []  # this optimizer step's micro-batches, until its last share
        self.dp_steps_run = 0
        info(self.plan.describe(trainable_parameter_count(self.model)))

    # ---------------------------------------------------------------------------------------------------------
    def _randomness_key(self, replay_key: int | None) -> int:
        """The key of the Poisson sample and the noise: the public seed only under privacy.reproducible."""
        if self.plan.reproducible:
            return self.run_config.seed
        return replay_key if replay_key is not None else secret_seed()

    def _open_ledger(self, num_units: int):
        from privtune.accounting.ledger import Ledger

        return Ledger.open(self.run_dir, privacy_unit="example", dataset_size=num_units,
                           dataset=self.run_config.data.source)

    def _send_telemetry(self):  # private training data: nothing leaves the machine
        return None

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        if resume_from_checkpoint:
            raise DPRefusal("DP-SFT cannot resume from a Trainer checkpoint: it holds neither the secret key nor "
                            "the ledger state", "start the run again in a fresh run dir")
        return super().train(resume_from_checkpoint=None, trial=trial, **kwargs)

    def get_train_dataloader(self) -> PoissonShares:
        return PoissonShares(self.sampler, accumulation=self.args.gradient_accumulation_steps)

    # ---------------------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        share: Share = inputs["dp_share"]
        if self.accelerator.gradient_state.sync_gradients != share.last:
            raise DPInvariantError(f"DP-SFT: share {share.index + 1}/{share.of} of step {share.step} does not line up "
                                   "with the loop's optimizer steps", "report this bug")
        self._pending.extend(share.micro_batches)
        if not share.last:
            return torch.zeros((), device=self.args.device)
        step = self.state.global_step
        if share.step != step:
            raise DPInvariantError(f"DP-SFT: the loop is at optimizer step {step} but the sample is step "
                                   f"{share.step}", "report this bug")
        micro, self._pending = self._pending, []
        model.train()
        every = self.run_config.train.self_check_every
        if every is not None and (self.dp_steps_run == 0 or step % every == 0):
            self._self_check(micro)
        loss_sum = [0.0]
        done = self.dp_step.run(self._micro_inputs(micro), self._loss_fn(model, loss_sum), step=step)
        self._check_every_parameter_has_a_gradient(step)
        self.dp_steps_run += 1
        self._count_step(step + 1)  # the update exists (in .grad): record it before the optimizer applies it
        self._metrics["train"]["dp_units"].append(float(done.num_units))
        self._metrics["train"]["dp_clipped_fraction"].append(done.clipped_fraction)
        return torch.tensor(loss_sum[0] / max(done.num_units, 1), device=self.args.device)

    def _inputs(self, rows: list[int]):
        ids, labels = self._rows
        return collate(rows, ids, labels=labels, pad_id=self.processing_class.pad_token_id).to(self.args.device)

    def _micro_inputs(self, micro_batches):
        for m in micro_batches:  # collated one at a time: only one micro-batch's tensors are alive
            inputs = self._inputs(m.rows.tolist())
            yield MicroBatchInputs(m.unit_ids.to(self.args.device), inputs, sequence_length=inputs.input_ids.shape[1])

    def _loss_fn(self, model, loss_sum: list[float]):
        def loss_fn(inputs) -> torch.Tensor:
            with self.compute_loss_context_manager():
                # A plain logits forward: TRL's fused LM head would bypass the lm_head module's hooks.
                logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                               use_cache=False).logits
            losses = per_example_loss(logits, inputs.labels)  # the recipe's loss: mean over each row's targets
            loss_sum[0] += float(losses.detach().sum())  # padding rows have loss exactly 0
            return losses

        return loss_fn

    def _self_check(self, micro_batches) -> None:
        """Plain autograd against the engine on two units of the step's first non-empty micro-batch."""
        from privtune.trainers.dp.selfcheck import pick_units, self_check

        first = next((m for m in micro_batches if m.num_real_rows), None)
        if first is None:
            return
        units = pick_units(first.unit_ids, first.rows, count=2,
                           generator=torch.Generator().manual_seed(self.state.global_step))

        def inputs(rows: list[int]):
            x = self._inputs(rows)
            return x.input_ids, x.attention_mask, x.labels

        self_check(self.engine, inputs, units)

    def _check_every_parameter_has_a_gradient(self, step: int) -> None:
        """Guardrail: an optimizer step must update every trainable parameter (opacus #820: LoRA never updated)."""
        missing = [n for n, p in self.engine.params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
        if missing:
            raise DPInvariantError(f"DP-SFT step {step}: no finite gradient for {missing[:3]}", "report this bug")

    def _count_step(self, steps: int) -> None:
        """One accountant step per optimizer step, never per micro-batch or accumulation call."""
        if not self.plan.formal:
            return  # no guarantee claimed: recorded once, as non-private, when the model is released
        self.ledger.record_training(self.training_event(steps), stage=STAGE, run_id=self.run_config.name,
                                    note=f"{self.run_config.train.method} SFT (TRL) on {self.run_config.data.source}")

    def training_event(self, steps: int):
        from privtune.accounting.events import PoissonGaussianEvent

        return PoissonGaussianEvent(sample_rate=self.plan.sample_rate, noise_multiplier=self.plan.noise_multiplier,
                                    steps=steps, randomness=self.plan.randomness)
