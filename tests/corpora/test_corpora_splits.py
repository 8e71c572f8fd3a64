"""Train/test splits: seeded, by user when there are users, both sides non-empty."""

from __future__ import annotations

import pytest

from privtune.corpora import Corpus, Record, split_corpus
from privtune.errors import UserError


def _corpus(n: int, groups: int | None = None) -> Corpus:
    records = [Record(id=f"r{i}", text=f"text {i}", spans=(), group=None if groups is None else f"u{i % groups}")
               for i in range(n)]
    return Corpus(records=records, canaries=[], source="test", spans_origin="given")


def test_split_is_seeded_and_sized():
    corpus = _corpus(100)
    train, test = split_corpus(corpus, test_fraction=0.2, seed=0)
    assert len(test) == 20 and len(train) == 80
    assert {r.id for r in train} | {r.id for r in test} == {r.id for r in corpus.records}
    again = split_corpus(corpus, test_fraction=0.2, seed=0)
    assert again == (train, test)
    assert split_corpus(corpus, test_fraction=0.2, seed=1)[1] != test
    # Corpus order is kept inside each split.
    order = {r.id: i for i, r in enumerate(corpus.records)}
    assert [order[r.id] for r in train] == sorted(order[r.id] for r in train)


def test_group_split_keeps_each_user_on_one_side():
    corpus = _corpus(120, groups=30)
    train, test = split_corpus(corpus, test_fraction=0.2, seed=5)
    assert not {r.group for r in train} & {r.group for r in test}
    assert len({r.group for r in test}) == 6
    assert len(train) + len(test) == 120


@pytest.mark.parametrize(("n", "fraction", "side"), [(1, 0.2, "test"), (2, 0.2, "test"), (4, 0.9, "train")])
def test_empty_side_is_a_user_error(n, fraction, side):
    with pytest.raises(UserError, match=f"the {side} split would be empty") as err:
        split_corpus(_corpus(n), test_fraction=fraction, seed=0)
    assert "\n" not in str(err.value) and "test_fraction" in str(err.value)


def test_one_user_cannot_be_split():
    with pytest.raises(UserError, match="1 users"):
        split_corpus(_corpus(10, groups=1), test_fraction=0.5, seed=0)


def test_records_without_group_among_grouped_ones_are_refused():
    corpus = _corpus(4, groups=2)
    corpus.records.append(Record(id="lonely", text="x", spans=()))
    with pytest.raises(UserError, match="lonely"):
        split_corpus(corpus, test_fraction=0.5, seed=0)
