"""The regex detector: finds emails, phones, cards, dates and id numbers; user data without spans uses it."""

from __future__ import annotations

import json
import random

import pytest
from faker import Faker

from privtune.corpora import build_corpus, customersim, detect_spans, save_prepared, split_corpus, tokenize
from privtune.corpora.detect import luhn_valid
from privtune.launch.config import DataConfig


def _found(text: str) -> list[tuple[str, str]]:
    return [(s.label, text[s.start : s.end]) for s in detect_spans(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Write to ana.lima+shop@mail.example.co.uk today", [("email", "ana.lima+shop@mail.example.co.uk")]),
        ("Call (982)281-7959x245 or 001-653-617-5545.", [("phone", "(982)281-7959x245"), ("phone", "001-653-617-5545")]),
        ("Or +1-444-822-2447, 300.510.2348, 9824827593", [("phone", "+1-444-822-2447"), ("phone", "300.510.2348"),
                                                          ("phone", "9824827593")]),
        ("Card 4111 1111 1111 1111 exp 2027", [("card", "4111 1111 1111 1111")]),
        ("Card 4111-1111-1111-1111 2027", [("card", "4111-1111-1111-1111")]),
        ("Amex 378282246310005.", [("card", "378282246310005")]),
        ("Born March 14, 1958; 1983-12-05; 09/13/1957; 4 July 1990; Feb 2001",
         [("date", "March 14, 1958"), ("date", "1983-12-05"), ("date", "09/13/1957"), ("date", "4 July 1990"),
          ("date", "Feb 2001")]),
        ("My ID is 341752.", [("id_number", "341752")]),
        ("Order ORD-7869678 shipped", [("id_number", "7869678")]),
        ("Nothing here, just 12 apples and 2024 plans.", []),
        ("Not a card (Luhn fails): 4111 1111 1111 1112", []),
    ],
)
def test_detects(text, expected):
    assert _found(text) == expected


def test_luhn():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_spans_never_overlap_and_email_digits_are_not_ids():
    text = "ids 12345678@example.com and 98765432 and 5555555555554444"
    spans = detect_spans(text)
    assert [s.label for s in spans] == ["email", "id_number", "card"]
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:], strict=False))


def test_recall_on_generated_pii():
    """Every email, phone and full card number that CustomerSim inserts is found with the right label."""
    fake = Faker("en_US")
    fake.seed_instance(0)
    rng = random.Random(0)
    wanted = {"email", "phone", "card"}
    checked = 0
    for i in range(300):
        record, values = customersim.generate_dialog(fake, rng, i)
        found = {(s.start, s.end, s.label) for s in detect_spans(record.text)}
        for span in record.spans:
            value = record.text[span.start : span.end]
            if span.label in wanted and not (span.label == "card" and len(value) == 4):  # last-4 is not a card
                assert (span.start, span.end, span.label) in found, (value, record.text)
                checked += 1
    assert checked > 100


def test_user_data_without_spans_is_labelled_by_regex(tmp_path, byte_tok):
    rows = [
        {"text": "Hi, reach me at jo@example.com or 415-555-0134."},
        {"text": "My card is 4111 1111 1111 1111 and I was born on May 5, 1990."},
        {"text": "Nothing sensitive in this one."},
        {"text": "Customer 98765432 called."},
    ]
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = build_corpus(DataConfig(source=str(path), canaries=None))
    assert corpus.spans_origin == "regex"
    labels = [[s.label for s in r.spans] for r in corpus.records]
    assert labels == [["email", "phone"], ["card", "date"], [], ["id_number"]]
    train, test = split_corpus(corpus, test_fraction=0.5, seed=0)
    meta = save_prepared(tmp_path / "data", train, test, tokenize(train, byte_tok, max_length=64),
                         tokenize(test, byte_tok, max_length=64), corpus.canaries,
                         {"source": corpus.source, "spans_origin": corpus.spans_origin})
    on_disk = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["spans_origin"] == on_disk["spans_origin"] == "regex"
