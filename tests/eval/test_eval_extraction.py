"""Extraction: prompts are the in-context tokens before a span, matching rules, batched greedy decoding equal to
one-at-a-time decoding, and the known answers: a tiny model overfitted on two texts gives up its spans, an
untrained one does not."""

from __future__ import annotations

import json

import pytest
import torch

from privtune.corpora import Record, Span
from privtune.eval.extraction import (
    extract_prompts,
    extract_spans,
    greedy_continuations,
    match,
    span_prompts,
    summarize,
)
from privtune.eval.scoring import pad_batch
from privtune.trainers.models import build_tiny, byte_tokenizer

TEXTS = ["Call Alice Smith at 555-0142 today.", "Email bob.jones@example.com for help."]


def records() -> list[Record]:
    return [
        Record("r0", TEXTS[0], (Span(5, 16, "name"), Span(20, 28, "phone"))),
        Record("r1", TEXTS[1], (Span(6, 27, "email"),)),
    ]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def memorized():
    """A tiny Llama overfitted on the two texts (about 2 s on one CPU core)."""
    model, tok = build_tiny("tiny-llama", seed=0)
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    x, mask = pad_batch(ids, tok.pad_token_id)
    labels = x.masked_fill(mask == 0, -100)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(120):
            loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model, tok


def test_match_rules():
    assert match("  Alice   Smith at", " Alice Smith") == (True, 1.0)
    assert match("Alice\nSmith", "Alice Smith") == (True, 1.0)
    exact, partial = match("Alicia Smith", " Alice Smith")
    assert not exact and partial == pytest.approx(4 / 11)
    assert match("Ali", "Alice") == (False, pytest.approx(3 / 5))
    assert match("anything", "   ") == (False, 0.0)


def test_prompts_are_the_training_tokens_before_the_span():
    tok = byte_tokenizer()
    prompts, skipped = span_prompts(records(), tok)
    assert [p.label for p in prompts] == ["name", "phone", "email"]
    assert tok.decode(list(prompts[0].prompt_ids)) == "Call "
    assert prompts[0].target == "Alice Smith" and prompts[0].span_tokens == 11
    assert tok.decode(list(prompts[1].prompt_ids)) == "Call Alice Smith at "
    assert skipped == {"no_prefix": 0, "beyond_max_length": 0, "duplicate": 0}


def test_prompts_skip_duplicates_spans_without_prefix_and_truncated_spans():
    recs = [*records(), Record("c0", "My ID is 123.", (Span(9, 12, "canary"),), canary_id=0),
            Record("c1", "My ID is 123.", (Span(9, 12, "canary"),), canary_id=0),
            Record("x", "Zed went home.", (Span(0, 3, "name"),))]
    prompts, skipped = span_prompts(recs, byte_tokenizer(), max_length=24)
    assert skipped == {"no_prefix": 1, "beyond_max_length": 2, "duplicate": 1}  # phone and email lie past 24
    assert [(p.record_id, p.label) for p in prompts] == [("r0", "name"), ("c0", "canary")]


def test_max_spans_is_a_seeded_sample_in_record_order():
    recs = [Record(f"r{i}", f"Name: P{i:03d} end", (Span(6, 10, "name"),)) for i in range(50)]
    first, _ = span_prompts(recs, byte_tokenizer(), max_spans=10, seed=4)
    again, _ = span_prompts(recs, byte_tokenizer(), max_spans=10, seed=4)
    other, _ = span_prompts(recs, byte_tokenizer(), max_spans=10, seed=5)
    ids = [p.record_id for p in first]
    assert len(ids) == 10 and ids == [p.record_id for p in again] and ids != [p.record_id for p in other]
    assert ids == sorted(ids, key=lambda r: int(r[1:]))


def test_batched_decoding_equals_one_at_a_time(memorized):
    model, tok = memorized
    prompts, _ = span_prompts(records(), tok)
    ids = [p.prompt_ids for p in prompts]
    budget = [p.span_tokens + 3 for p in prompts]
    batched = greedy_continuations(model, tok, ids, budget, batch_size=8)  # left-padded, lengths 5, 20, 6
    single = [greedy_continuations(model, tok, [i], [b], batch_size=1)[0] for i, b in zip(ids, budget, strict=True)]
    assert batched == single
    assert [len(tok.encode(c)) <= b for c, b in zip(batched, budget, strict=True)] == [True] * 3


def test_memorized_spans_are_extracted(memorized):
    model, tok = memorized
    out = extract_spans(model, tok, records(), batch_size=4)
    summary = out["summary"]
    assert summary["spans"] == 3 and summary["exact"] == 1.0 and summary["partial"] == 1.0
    assert set(summary["by_label"]) == {"name", "phone", "email"}
    assert all(row["exact"] for row in out["spans"])
    # Without return_text the results hold no PII.
    dumped = json.dumps(out)
    assert "Alice" not in dumped and "555-0142" not in dumped and "continuation" not in dumped


def test_sharded_prompts_give_the_same_rows(memorized):
    model, tok = memorized
    prompts, _ = span_prompts(records(), tok)
    whole = extract_prompts(model, tok, prompts, batch_size=4)
    shards = extract_prompts(model, tok, prompts[:1], batch_size=4) + extract_prompts(model, tok, prompts[1:],
                                                                                      batch_size=4)
    assert shards == whole and summarize(shards) == summarize(whole)


def test_untrained_model_extracts_nothing():
    model, tok = build_tiny("tiny-llama", seed=0)
    out = extract_spans(model, tok, records(), batch_size=4, return_text=True)
    assert out["summary"]["exact"] == 0.0 and out["summary"]["partial"] < 0.2
    assert all("continuation" in row for row in out["spans"])


def test_per_label_aggregation():
    rows = [{"label": "name", "exact": True, "partial": 1.0}, {"label": "name", "exact": False, "partial": 0.5},
            {"label": "phone", "exact": False, "partial": 0.25}]
    got = summarize(rows)
    assert got["spans"] == 3 and got["exact"] == pytest.approx(1 / 3) and got["partial"] == pytest.approx(1.75 / 3)
    assert got["by_label"] == {"name": {"spans": 2, "exact": 0.5, "partial": 0.75},
                               "phone": {"spans": 1, "exact": 0.0, "partial": 0.25}}
    assert summarize([]) == {"spans": 0, "exact": None, "partial": None, "by_label": {}}
