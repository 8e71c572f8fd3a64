"""Preflight: every check of a run that needs no real work, so bad input is refused before anything is written.

Owns: ``preflight(cfg)``. ``privtune validate`` calls it on every run of a config, so validate refuses exactly what
``run`` would; ``privtune run`` / ``data`` / ``sweep`` call it (through ``pipeline.ensure_data``) before a run dir
is created, and ``data`` and ``sweep`` call it on all their runs before the first one starts. A refusal is a
``UserError``: exit 2, one line, nothing on disk.

Each rule lives where it is enforced at run time; preflight only calls it earlier, on what it can know cheaply:

- DP settings that need only the config (``trainers.plan.check_privacy_settings``);
- the parallel preset suits the launch and is tested with the method (``trainers.parallel.check_parallel``);
- the model resolves locally and has weights and a tokenizer (``trainers.models.check_model_source``), and
  ``data.max_length`` fits its context (``model_context_length``: config.json only, no weights);
- listed LoRA target modules match a module of the model (``trainers.lora.apply_lora`` on a meta-device skeleton);
- the data: a user file is read and checked in full (text field, spans, group_by), canaries are drawn and the split
  is made on placeholders for generated corpora (``corpora.build_corpus(dry_run=True)``, ``split_corpus``), which
  gives the number of training units without generating or tokenizing anything;
- ``train.batch_size`` within those units (``trainers.plan.check_batch_size``) and, for a DP method, the whole
  plan (``resolve_plan``: an unreachable target ε is refused here, not after the data is prepared).
"""

from __future__ import annotations

from pathlib import Path

from privtune.errors import UserError
from privtune.launch.config import RunConfig

GENERATED = ("customersim", "synbio")


def _check_model(cfg: RunConfig) -> None:
    from privtune.trainers.models import check_model_source, model_context_length

    check_model_source(cfg.model.name)
    context = model_context_length(cfg.model.name)
    if context is not None and cfg.data.max_length > context:
        raise UserError(
            f"data.max_length={cfg.data.max_length} is beyond the context of model {cfg.model.name} "
            f"({context} tokens, max_position_embeddings of its config)",
            f"set data.max_length to at most {context}",
        )
    lora = cfg.train.lora
    if cfg.train.method in ("lora", "dp-lora") and lora.target_modules != "all-linear":
        from privtune.trainers.lora import apply_lora
        from privtune.trainers.models import model_skeleton

        skeleton = model_skeleton(cfg.model.name)
        if skeleton is not None:
            apply_lora(skeleton, lora)  # the same refusal as at training time, on a model without weights


def training_units(cfg: RunConfig) -> int:
    """The number of training units a run will have (examples, or users under a DP method with privacy.unit=group),
    from the data's shape only. Raises what preparing the data would raise about the records, canaries or split."""
    from privtune.corpora import build_corpus, split_corpus

    corpus = build_corpus(cfg.data, dry_run=True)
    train, _ = split_corpus(corpus, test_fraction=cfg.data.test_fraction, seed=cfg.data.seed)
    if cfg.is_dp and cfg.privacy.unit == "group":
        return len({str(r.group) for r in train})  # as the trainer counts them
    return len(train)


def preflight(cfg: RunConfig) -> None:
    """Cheap checks of everything a run needs, so bad input fails before any work starts."""
    from privtune.trainers.parallel import check_parallel
    from privtune.trainers.plan import check_batch_size, check_privacy_settings, resolve_plan

    check_privacy_settings(cfg)
    check_parallel(cfg)
    if cfg.data.source not in GENERATED and not Path(cfg.data.source).expanduser().exists():
        raise UserError(f"data source {cfg.data.source} does not exist",
                        "set data.source to a .jsonl or .csv file, a `datasets` directory, customersim or synbio")
    _check_model(cfg)
    units = training_units(cfg)
    if cfg.train.method != "none":
        check_batch_size(cfg, units)
    if cfg.is_dp:
        resolve_plan(cfg, units)
