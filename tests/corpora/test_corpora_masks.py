"""Span -> token mask alignment: a token is sensitive iff its character range overlaps a span.

Checked with hypothesis on random texts and random non-overlapping spans, against a naive reference, for the byte
tokenizer (one token per UTF-8 byte, offsets exact per character) and the embedded SmolLM2 BPE tokenizer.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privtune.corpora import Record, Span, sensitive_mask, tokenize
from privtune.corpora.tokenization import UnencodableChars, encode_with_offsets

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def texts_with_spans(draw, max_size=60):
    # Mix ASCII words, digits, whitespace, control characters SmolLM2 drops, and arbitrary unicode (multi-byte
    # characters split across byte tokens).
    text = draw(st.one_of(
        st.text(alphabet=st.sampled_from("abc XYZ 0123456789@.-\n\t\x06\x16é中😀\U00040000"), max_size=max_size),
        st.text(max_size=max_size),
    ))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), unique=True, max_size=8)))
    spans = tuple(Span(a, b, "x") for a, b in zip(cuts[0::2], cuts[1::2], strict=False))
    return text, spans


def _reference_sensitive(offsets, spans) -> list[bool]:
    return [b > a and any(s.start < b and a < s.end for s in spans) for a, b in offsets]


def _dropped(tokenizer, ch: str) -> bool:
    """A character the tokenizer cannot encode (SmolLM2: U+0016, U+40000, ...); tokenize() removes it first."""
    return bool(UnencodableChars(tokenizer)(ch))


def _check(tokenizer, text, spans, max_length):
    record = Record(id="r", text=text, spans=spans)
    [example] = tokenize([record], tokenizer, max_length=max_length).examples
    [(ids, offsets, truncated)] = encode_with_offsets(tokenizer, [text], max_length=max_length)
    assert example.truncated == truncated
    assert example.input_ids[: len(ids)] == ids
    if not any(_dropped(tokenizer, ch) for ch in text):
        # Plain texts are encoded exactly as the documented tokenizer call does.
        plain = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, truncation=True,
                          max_length=max_length)
        assert ids == plain["input_ids"] and offsets == [tuple(o) for o in plain["offset_mapping"]]
    # The offsets are faithful: each token's characters are the text it decodes to (dropped characters aside).
    for token_id, (a, b) in zip(ids, offsets, strict=True):
        decoded = tokenizer.backend_tokenizer.decode([token_id], skip_special_tokens=False)
        if b > a and "\ufffd" not in decoded:  # a token holding part of a multi-byte character decodes to U+FFFD
            assert decoded == "".join(ch for ch in text[a:b] if not _dropped(tokenizer, ch)), (token_id, a, b)
    assert len(example.sensitive) == len(example.input_ids) <= max_length
    assert example.sensitive[: len(ids)] == _reference_sensitive(offsets, spans)
    # Appended EOS (if any) is never sensitive.
    assert not any(example.sensitive[len(ids) :])
    if len(ids) < max_length:
        assert example.input_ids[-1] == tokenizer.eos_token_id
    # Every span character inside the encoded part of the text lies in some sensitive token, except a character
    # the tokenizer has no token for: it never reaches the model, so it cannot leak through it.
    covered = max((b for _, b in offsets), default=0)
    for span in spans:
        for c in range(span.start, min(span.end, covered)):
            if _dropped(tokenizer, text[c]):
                continue
            assert any(a <= c < b and sens for (a, b), sens in zip(offsets, example.sensitive, strict=False)), (c, span)
    if not example.truncated:
        assert all(_dropped(tokenizer, ch) or ch.isspace() for ch in text[covered:])
    return example, offsets


@SETTINGS
@given(texts_with_spans())
def test_byte_tokenizer_masks_exactly_the_span_bytes(byte_tok, case):
    text, spans = case
    example, offsets = _check(byte_tok, text, spans, max_length=512)
    # One token per UTF-8 byte: the sensitive tokens are exactly the bytes of the span characters.
    expected = sum(len(text[s.start : s.end].encode()) for s in spans)
    assert sum(example.sensitive) == expected
    assert len(offsets) == len(text.encode())


@SETTINGS
@given(texts_with_spans())
def test_smollm2_tokenizer_mask_matches_reference(smollm2, case):
    text, spans = case
    _check(smollm2, text, spans, max_length=512)


@SETTINGS
@given(texts_with_spans(max_size=120), st.integers(8, 40))
def test_truncated_examples_keep_aligned_masks(smollm2, byte_tok, case, max_length):
    text, spans = case
    for tokenizer in (byte_tok, smollm2):
        example, offsets = _check(tokenizer, text, spans, max_length=max_length)
        assert len(example.input_ids) <= max_length


def test_sensitive_mask_edge_cases():
    spans = (Span(4, 8, "name"),)
    # (0, 0) special token, a token straddling the span start, one inside, one after, an empty-range token inside.
    offsets = [(0, 0), (3, 5), (5, 8), (8, 10), (6, 6)]
    assert sensitive_mask(10, spans, offsets) == [False, True, True, False, False]


def test_batching_does_not_change_results(smollm2):
    records = [Record(id=str(i), text=f"Call {i:04d} now, Jo{i}", spans=(Span(5, 9, "phone"),)) for i in range(1100)]
    whole = tokenize(records, smollm2, max_length=32)
    one_by_one = [tokenize([r], smollm2, max_length=32).examples[0] for r in records[:600:37]]
    assert [whole.examples[i] for i in range(0, 600, 37)] == one_by_one
    assert [e.example_id for e in whole] == [r.id for r in records]


def test_tokenizer_without_offsets_is_a_user_error():
    from privtune.errors import UserError

    class SlowTokenizer:
        eos_token_id = 0

        def __call__(self, *args, **kwargs):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")

    with pytest.raises(UserError, match="fast"):
        tokenize([Record(id="a", text="hi", spans=())], SlowTokenizer(), max_length=8)
