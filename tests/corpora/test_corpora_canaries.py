"""Canaries: distinct seeded secrets, never occurring in the data, `repetitions` copies in the training split only."""

from __future__ import annotations

import pytest

from privtune.corpora import build_corpus, split_corpus
from privtune.corpora.canaries import make_canaries, secrets_in_text
from privtune.errors import UserError
from privtune.launch.config import CanaryConfig, DataConfig


def _cfg(**canary) -> DataConfig:
    return DataConfig(source="customersim", num_examples=60, canaries=CanaryConfig(**canary))


def test_canary_copies_counts_and_spans():
    corpus = build_corpus(_cfg(count=3, repetitions=5, secret_digits=6))
    assert len(corpus.canaries) == 3
    assert len({c.secret for c in corpus.canaries}) == 3
    copies = [r for r in corpus.records if r.canary_id is not None]
    assert len(copies) == 15
    for canary in corpus.canaries:
        mine = [r for r in copies if r.canary_id == canary.canary_id]
        assert len(mine) == canary.repetitions == 5
        assert canary.text == f"My ID is {canary.secret}."
        assert len(canary.secret) == 6 and canary.secret.isdigit()
        assert canary.candidates_size() == 10**6
        assert canary.candidate(int(canary.secret)) == canary.text
        for record in mine:
            assert record.text == canary.text
            [span] = record.spans
            assert span.label == "canary" and record.text[span.start : span.end] == canary.secret


def test_canaries_only_in_train_and_do_not_move_real_records():
    with_canaries = build_corpus(_cfg(count=2, repetitions=4))
    without = build_corpus(DataConfig(source="customersim", num_examples=60, canaries=None))
    train, test = split_corpus(with_canaries, test_fraction=0.25, seed=3)
    plain_train, plain_test = split_corpus(without, test_fraction=0.25, seed=3)
    assert not any(r.canary_id is not None for r in test)
    assert sum(r.canary_id is not None for r in train) == 8
    assert [r.id for r in test] == [r.id for r in plain_test]
    assert [r.id for r in train if r.canary_id is None] == [r.id for r in plain_train]
    assert all(c.secret not in r.text for c in with_canaries.canaries for r in test)


def test_secrets_are_seeded():
    a = build_corpus(_cfg(count=4)).canaries
    assert build_corpus(_cfg(count=4)).canaries == a
    b = build_corpus(DataConfig(source="customersim", num_examples=60, seed=1, canaries=CanaryConfig(count=4))).canaries
    assert [c.secret for c in a] != [c.secret for c in b]


def test_secrets_never_occur_in_the_corpus():
    # Three-digit secrets against a corpus full of phone, card and order numbers: many are taken.
    corpus = build_corpus(DataConfig(source="customersim", num_examples=200, canaries=CanaryConfig(
        count=20, secret_digits=3)))
    real = [r.text for r in corpus.records if r.canary_id is None]
    taken = secrets_in_text(real, 3)
    assert len(taken) > 100
    for canary in corpus.canaries:
        assert canary.secret not in taken
        assert not any(canary.secret in text for text in real)


def test_only_free_secrets_are_drawn_and_exhaustion_is_a_user_error():
    texts = [f"number {i:02d}" for i in range(100) if i != 42]
    [canary] = make_canaries(CanaryConfig(count=1, secret_digits=2), seed=0, corpus_texts=texts)
    assert canary.secret == "42"
    with pytest.raises(UserError, match="secret_digits") as err:
        make_canaries(CanaryConfig(count=2, secret_digits=2), seed=0, corpus_texts=texts)
    assert "\n" not in str(err.value)


def test_twelve_digit_secrets():
    canaries = make_canaries(CanaryConfig(count=5, secret_digits=12), seed=0, corpus_texts=["123456789012"])
    assert len({c.secret for c in canaries}) == 5
    assert all(len(c.secret) == 12 and c.secret != "123456789012" for c in canaries)


def test_grouped_corpora_give_each_canary_its_own_user():
    corpus = build_corpus(DataConfig(source="synbio", num_examples=20, group_by="user",
                                     canaries=CanaryConfig(count=2, repetitions=3)))
    copies = [r for r in corpus.records if r.canary_id is not None]
    assert {r.group for r in copies} == {"privtune:canary-0", "privtune:canary-1"}
    assert all(r.group == r.id for r in corpus.records if r.canary_id is None)


def test_zero_canaries():
    corpus = build_corpus(_cfg(count=0))
    assert corpus.canaries == [] and all(r.canary_id is None for r in corpus.records)
