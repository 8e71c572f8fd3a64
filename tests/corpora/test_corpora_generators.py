"""Generated corpora: gold spans cover exactly the Faker values inserted, generation is seeded, lengths fit."""

from __future__ import annotations

import random
import re
import statistics

import pytest
from faker import Faker

from privtune.corpora import customersim, synbio
from privtune.corpora.records import check_spans
from privtune.corpora.textbuild import label_of

GENERATORS = {
    "customersim": (customersim.generate_dialog, customersim.generate, customersim.LABELS),
    "synbio": (synbio.generate_bio, synbio.generate, synbio.LABELS),
}
PLAIN = {"customersim": customersim.PLAIN, "synbio": synbio.PLAIN}


def _examples(name: str, n: int, seed: int = 0):
    one, _, _ = GENERATORS[name]
    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    return [one(fake, rng, i) for i in range(n)]


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_gold_spans_are_the_inserted_values(name):
    for record, values in _examples(name, 300):
        check_spans(record.text, record.spans, record.id, "generator bug")  # sorted, in range, no overlaps
        sensitive = {f: v for f, v in values.items() if f not in PLAIN[name]}
        for span in record.spans:
            inserted = {v for f, v in sensitive.items() if label_of(f) == span.label}
            assert record.text[span.start : span.end] in inserted, (record.text, span)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_no_sensitive_value_appears_outside_its_spans(name):
    """A value repeated elsewhere in the text unlabelled would be a sensitive token counted as non-sensitive."""
    for record, values in _examples(name, 300, seed=1):
        covered = bytearray(len(record.text))
        for span in record.spans:
            covered[span.start : span.end] = b"\x01" * (span.end - span.start)
        for field, value in values.items():
            if field in PLAIN[name]:
                continue
            for match in re.finditer(rf"(?<!\w){re.escape(value)}(?!\w)", record.text):
                assert all(covered[match.start() : match.end()]), (record.text, field, value)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_labels_are_the_documented_ones(name):
    _, _, labels = GENERATORS[name]
    seen = {s.label for record, _ in _examples(name, 300) for s in record.spans}
    assert seen == set(labels)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generation_is_seeded(name):
    _, generate, _ = GENERATORS[name]
    state = random.getstate()
    first = generate(50, seed=7)
    assert generate(50, seed=7) == first
    assert generate(50, seed=8) != first
    assert random.getstate() == state  # no global RNG touched
    assert len({r.id for r in first}) == 50


def test_customersim_dialogs_are_varied_and_sized_for_a_bpe_tokenizer(smollm2):
    records = customersim.generate(400, seed=3)
    lengths = [len(smollm2(r.text)["input_ids"]) for r in records]
    assert 60 <= min(lengths) and max(lengths) <= 200
    assert 80 <= statistics.median(lengths) <= 130
    # Turns alternate speakers in the "User: ... / Agent: ..." format and vary from dialog to dialog.
    for record in records:
        assert all(line.startswith(("User: ", "Agent: ")) for line in record.text.split("\n"))
    # The non-sensitive skeleton (spans replaced by their labels) must not be a handful of fixed dialogs.
    skeletons = {_skeleton(r) for r in records}
    assert len(skeletons) > 0.5 * len(records)


def _skeleton(record) -> str:
    parts, position = [], 0
    for span in record.spans:
        parts += [record.text[position : span.start], f"<{span.label}>"]
        position = span.end
    return "".join(parts) + record.text[position:]


def test_synbio_biographies_state_each_attribute():
    for record, _ in _examples("synbio", 100):
        labels = {s.label for s in record.spans}
        assert {"name", "birth_date", "birth_city", "university", "major", "employer", "job", "city"} <= labels
