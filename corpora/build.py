"""The entry point from a ``DataConfig`` to a ``Corpus``: generated data or the user's own, plus canaries.

Owns: ``build_corpus``. ``data.source`` is ``customersim``, ``synbio`` or a path (``userdata.py``);
``num_examples`` applies to generated sources only. Canaries are drawn last, so that their secrets can be checked
against every text of the corpus, and their copies are added to ``Corpus.records`` for ``split_corpus`` to route
into the training split.

Privacy unit: the record, or the user named by ``data.group_by``. Generated corpora have one fictitious person per
record, so with ``group_by`` set each generated record is its own group (user-level and example-level privacy
coincide there). Sensitive: see the generators and ``records.py``.
"""

from __future__ import annotations

from dataclasses import replace

from privtune.corpora import customersim, synbio
from privtune.corpora.canaries import canary_records, make_canaries
from privtune.corpora.config import DataConfig
from privtune.corpora.records import Corpus, Record
from privtune.corpora.userdata import load_user_records

GENERATORS = {"customersim": customersim.generate, "synbio": synbio.generate}


def spans_field_explicit(cfg: DataConfig) -> bool:
    """Whether the user named ``data.spans_field`` (set, and not to the default: a sweep's runs are built from a
    full dump of the base config, in which every field counts as set)."""
    return "spans_field" in cfg.model_fields_set and cfg.spans_field != DataConfig.model_fields["spans_field"].default


def build_corpus(cfg: DataConfig, *, dry_run: bool = False) -> Corpus:
    """The corpus of ``cfg``. ``dry_run``: its shape without its content, for preflight's checks before any work:
    a generated source gives one empty placeholder record per example (nothing is generated), user data is read
    and checked in full but gets no regex spans."""
    if cfg.source in GENERATORS:
        if dry_run:
            records = [Record(id=f"{cfg.source}-{i:06d}", text="", spans=()) for i in range(cfg.num_examples)]
        else:
            records = GENERATORS[cfg.source](cfg.num_examples, seed=cfg.seed)
        if cfg.group_by is not None:
            records = [replace(r, group=r.id) for r in records]
        spans_origin = "gold"
    else:
        records, spans_origin = load_user_records(
            cfg.source, text_field=cfg.text_field, spans_field=cfg.spans_field, group_by=cfg.group_by,
            spans_field_explicit=spans_field_explicit(cfg), detect=not dry_run,
        )
    canaries = []
    if cfg.canaries is not None and cfg.canaries.count > 0:
        canaries = make_canaries(cfg.canaries, seed=cfg.seed, corpus_texts=(r.text for r in records))
        records = records + canary_records(canaries, grouped=cfg.group_by is not None)
    return Corpus(records=records, canaries=canaries, source=cfg.source, spans_origin=spans_origin)
