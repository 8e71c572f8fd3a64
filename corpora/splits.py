"""Train/test split: seeded, by user when the data has users, canary copies always in train.

Owns: ``split_corpus``. Records keep their corpus order inside each split (the trainer does its own sampling);
canary copies are appended to train after the split, so they never change which real records land where.

Privacy unit: the group when records carry one (no user has records on both sides, otherwise the test split
would not measure generalisation to *unseen* people), else the record. Sensitive: nothing new; the test split
holds real people too and is never trained on.
"""

from __future__ import annotations

import random

from privtune.corpora.records import Corpus, Record
from privtune.errors import UserError


def _units(records: list[Record]) -> dict[str, list[int]]:
    """Record indices per privacy unit (the group, or the record itself), in first-seen order."""
    grouped = any(r.group is not None for r in records)
    units: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        if grouped and record.group is None:
            raise UserError(f"record {record.id} has no group while others do", "give every record its user id")
        units.setdefault(record.group if grouped else record.id, []).append(i)
    return units


def split_corpus(corpus: Corpus, *, test_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, test). ``round(test_fraction * units)`` shuffled units go to test; the rest, plus canaries, to train."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction {test_fraction} is not between 0 and 1", "set data.test_fraction, e.g. 0.2")
    real = [r for r in corpus.records if r.canary_id is None]
    canary_copies = [r for r in corpus.records if r.canary_id is not None]
    units = _units(real)
    names = list(units)
    random.Random(f"privtune.split:{seed}").shuffle(names)
    n_test = int(len(names) * test_fraction + 0.5)  # round half up, independent of banker's rounding
    kind = "users" if any(r.group is not None for r in real) else "examples"
    if n_test == 0 or n_test == len(names):
        side = "test" if n_test == 0 else "train"
        raise UserError(
            f"the {side} split would be empty: {len(names)} {kind} with data.test_fraction={test_fraction}",
            "add examples or change data.test_fraction",
        )
    test_indices = sorted(i for name in names[:n_test] for i in units[name])
    in_test = set(test_indices)
    train = [r for i, r in enumerate(real) if i not in in_test] + canary_copies
    test = [real[i] for i in test_indices]
    return train, test
