"""SFT through TRL from a privtune run config: the SFTConfig, the trainer, the release.

Owns: ``sft_args`` (the run config's train / performance sections as a TRL ``SFTConfig``), ``build_sft_trainer``
(privtune's model loading and LoRA, then ``DPSFTTrainer`` for dp / dp-lora or TRL's own ``SFTTrainer`` for
full / lora) and ``run_sft`` (train, then the ledger closed and ``model/`` written with the same model card,
``privtune.json`` and ``efficiency.json`` as ``privtune run``).

Data: a ``datasets.Dataset`` of prompt/completion records (``{"prompt": ..., "completion": ...}``); TRL
tokenises it and masks the prompt (labels -100), so the loss is on completion tokens only.

Sensitive: the training data; the ledger (written only through ``privtune.accounting``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from privtune.trainers.config import TrainingRun

STAGE = "train"


def sft_args(cfg: TrainingRun, output_dir: Path, **overrides):
    """The ``SFTConfig`` of a run: its optimisation from ``cfg.train``, its micro-batches from ``cfg.performance``.

    Under DP the logical batch is the Poisson sample (expected ``train.batch_size``), cut into micro-batches of
    ``performance.micro_batch_size`` rows; TRL's loop takes one ``training_step`` per optimizer step
    (``gradient_accumulation_steps=1``; another value only changes how the step's micro-batches are dealt to the
    loop's calls) and T comes from the DP plan. Without DP, ``train.batch_size`` rows per step are reached by
    accumulating micro-batches. ``overrides`` are SFTConfig fields (performance only: the privacy side is refused
    by ``DPSFTTrainer`` when it would change the guarantee)."""
    from trl import SFTConfig

    t, perf = cfg.train, cfg.performance
    micro = min(perf.micro_batch_size, t.batch_size)
    kwargs = dict(
        output_dir=str(output_dir), seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=1 if cfg.is_dp else math.ceil(t.batch_size / micro),
        max_steps=-1 if cfg.is_dp else _plain_steps(cfg), num_train_epochs=t.epochs,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        optim="adamw_torch" if t.optimizer == "adamw" else "sgd",
        lr_scheduler_type="constant_with_warmup", warmup_steps=t.warmup_steps,
        max_grad_norm=0.0,  # the recipe clips nothing besides DP's per-unit clip
        bf16=perf.precision == "bf16", fp16=False, activation_checkpointing=False,
        packing=False, padding_free=False,
        completion_only_loss=None,  # TRL's default: prompt/completion data trains on the completion only
        max_length=cfg.data.max_length,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def _plain_steps(cfg: TrainingRun) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return -1  # TRL counts the epochs over its prepared dataset


def build_sft_trainer(cfg: TrainingRun, run_dir: Path, train_dataset, *, args=None, callbacks=None,
                      replay_key: int | None = None):
    """(trainer, tokenizer): the model loaded and made trainable the privtune way, then TRL's trainer on it."""
    from privtune.trainers.lora import prepare_trainable
    from privtune.trainers.models import load_model

    torch.manual_seed(cfg.seed)  # the same initial weights (LoRA adapters included) as `privtune run`
    model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype, seed=cfg.seed)
    model, _ = prepare_trainable(model, cfg.train.method, cfg.train.lora)
    args = args if args is not None else sft_args(cfg, Path(run_dir) / "trl")
    if cfg.is_dp:
        from .trainer import DPSFTTrainer

        trainer = DPSFTTrainer(model, args, train_dataset, tokenizer, run=cfg, run_dir=Path(run_dir),
                               callbacks=callbacks, replay_key=replay_key)
    else:
        trainer = _plain_trainer_class()(model=model, args=args, train_dataset=train_dataset,
                                         processing_class=tokenizer, callbacks=callbacks)
    return trainer, tokenizer


def _plain_trainer_class():
    from trl import SFTTrainer

    class PlainSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer as is (full / lora: every TRL feature allowed), minus its usage ping."""

        def _send_telemetry(self):
            return None

    return PlainSFTTrainer


def run_sft(cfg: TrainingRun, run_dir: Path, out: Path, train_dataset, *, args=None, callbacks=None) -> dict:
    """The train stage through TRL: train, record the release in the ledger, write ``out`` (the model dir)."""
    from privtune.errors import UserError

    if cfg.train.method == "none":
        raise UserError("train.method=none has nothing to train", "choose full, lora, dp or dp-lora")
    run_dir = Path(run_dir)
    trainer, tokenizer = build_sft_trainer(cfg, run_dir, train_dataset, args=args, callbacks=callbacks)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    steps = trainer.state.global_step
    out.mkdir(parents=True, exist_ok=True)
    release(cfg, trainer, tokenizer, out, run_dir=run_dir, steps=steps)
    stats = {"steps": steps, "seconds": seconds}
    efficiency = {"method": cfg.train.method, "trainer": "trl-sft", "steps": steps,
                  "wall_seconds": round(seconds, 3), "world_size": 1, "device": str(trainer.args.device),
                  "trainable_parameters": _trainable(trainer.model)}
    if cfg.is_dp:
        efficiency["dp_plan"] = trainer.plan.to_dict()
    (out / "efficiency.json").write_text(json.dumps(efficiency, indent=2, sort_keys=True) + "\n")
    return stats


def release(cfg: TrainingRun, trainer, tokenizer, out: Path, *, run_dir: Path, steps: int) -> None:
    """Close the ledger's training entry (or record the non-private release), then write the model dir."""
    from privtune.accounting.events import NonPrivateEvent
    from privtune.accounting.ledger import Ledger
    from privtune.trainers.output import save_model_dir
    from privtune.trainers.recipe import guarantee_of

    plan = trainer.plan if cfg.is_dp else None
    if plan is not None:
        ledger = trainer.ledger
    else:
        ledger = Ledger.open(run_dir, privacy_unit="example", dataset_size=len(trainer.train_dataset),
                             dataset=cfg.data.source)
    training = None
    if plan is not None and plan.formal:
        training = ledger.close_training(stage=STAGE, run_id=cfg.name)
        pin = {"ledger_id": ledger.ledger_id, "seq": training.seq, "hash": ledger.hash_at(training.seq)}
    else:  # honest bookkeeping: this model was trained on the data without a DP guarantee
        reason = (f"method {cfg.train.method} adds no noise" if plan is None else
                  f"non-private debug run of {cfg.train.method} (sigma={plan.noise_multiplier})")
        ledger.record(NonPrivateEvent(reason=reason, steps=steps), stage=STAGE)
        pin = ledger.head
    save_model_dir(out, trainer.model, tokenizer, method=cfg.train.method, base_model=cfg.model.name,
                   data_source=cfg.data.source, guarantee=guarantee_of(cfg.train.method, plan), steps=steps,
                   ledger=pin, event=training.event.to_dict() if training else None)


def _trainable(model) -> int:
    from privtune.trainers.output import trainable_parameter_count

    return trainable_parameter_count(model)
