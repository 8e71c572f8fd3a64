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
from privtune.corpora.records import Corpus
from privtune.corpora.userdata import load_user_records
from privtune.launch.config import DataConfig

GENERATORS = {"customersim": customersim.generate, "synbio": synbio.generate}


def build_corpus(cfg: DataConfig) -> Corpus:
    if cfg.source in GENERATORS:
        records = GENERATORS[cfg.source](cfg.num_examples, seed=cfg.seed)
        if cfg.group_by is not None:
            records = [replace(r, group=r.id) for r in records]
        spans_origin = "gold"
    else:
        records, spans_origin = load_user_records(
            cfg.source, text_field=cfg.text_field, spans_field=cfg.spans_field, group_by=cfg.group_by
        )
    canaries = []
    if cfg.canaries is not None and cfg.canaries.count > 0:
        canaries = make_canaries(cfg.canaries, seed=cfg.seed, corpus_texts=(r.text for r in records))
        records = records + canary_records(canaries, grouped=cfg.group_by is not None)
    return Corpus(records=records, canaries=canaries, source=cfg.source, spans_origin=spans_origin)
