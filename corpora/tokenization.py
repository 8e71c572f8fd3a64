"""Tokenization with a per-token sensitive mask, aligned through the fast tokenizer's offset mapping.

Owns: ``tokenize(records, tokenizer, max_length=...)`` and the ``TokenizedSplit`` it returns. Each text is
encoded with ``tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, truncation=True,
max_length=max_length)``; EOS is appended when there is room, so the model learns where an example ends. No BOS is
added beyond what the tokenizer adds itself (SmolLM2 and the byte tokenizer add none), so the first token of an
example is never predicted; the generators never start a text with a sensitive value.

Characters the tokenizer cannot encode (SmolLM2's vocabulary lacks six control bytes, e.g. U+0016, and the
lead bytes of the unassigned planes 4-11) are removed before encoding and the offsets mapped back: the fast
tokenizer silently drops their bytes and shifts every later offset, which would misplace the mask.

Privacy unit: the example (``example_id``), or its ``group``. Sensitive: a token is sensitive iff its character
range [a, b) is non-empty and overlaps a sensitive span. A token that straddles a span boundary (" John" with a
leading space) is sensitive, so the mask never under-counts. Special tokens and tokens with empty offsets
(BOS/EOS/padding, (0, 0)) are not sensitive.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from privtune.corpora.records import Record, Span
from privtune.errors import UserError

_BATCH = 512  # texts per tokenizer call: the fast tokenizer parallelises within a batch


@dataclass(frozen=True)
class TokenizedExample:
    example_id: str
    input_ids: list[int]
    sensitive: list[bool]  # aligned with input_ids
    group: str | None = None
    canary_id: int | None = None
    truncated: bool = False  # text did not fit into max_length; spans past the cut are not represented


@dataclass
class TokenizedSplit:
    examples: list[TokenizedExample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[TokenizedExample]:
        return iter(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]

    @property
    def input_ids(self) -> list[list[int]]:
        return [e.input_ids for e in self.examples]

    @property
    def sensitive(self) -> list[list[bool]]:
        return [e.sensitive for e in self.examples]

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def num_sensitive(self) -> int:
        return sum(sum(e.sensitive) for e in self.examples)

    @property
    def num_truncated(self) -> int:
        return sum(e.truncated for e in self.examples)


def sensitive_mask(text_length: int, spans: Sequence[Span], offsets: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token: does its non-empty character range overlap any span? O(text + tokens) via prefix sums."""
    flags = [0] * text_length
    for span in spans:
        flags[span.start : span.end] = [1] * (span.end - span.start)
    prefix = [0, *accumulate(flags)]  # prefix[i] = sensitive characters before position i
    return [end > start and prefix[end] - prefix[start] > 0 for start, end in offsets]


def _encode(tokenizer, texts: str | list[str], max_length: int | None = None, *, special: bool = True):
    try:
        return tokenizer(
            texts,
            add_special_tokens=special,
            return_offsets_mapping=True,
            truncation=max_length is not None,
            max_length=max_length,
        )
    except NotImplementedError:
        raise UserError(
            f"tokenizer {type(tokenizer).__name__} gives no character offsets, so sensitive tokens cannot be found",
            "use a model with a fast (Rust) tokenizer",
        ) from None


class UnencodableChars:
    """Which characters a tokenizer cannot encode faithfully, probed once per distinct character.

    A character is unencodable when the offsets of a sentinel after it come out wrong: the tokenizer dropped
    some of its bytes (SmolLM2's vocabulary lacks six control bytes and the UTF-8 lead bytes 0xF1/0xF2 of planes
    4-11) and shifted every later offset. Plain whitespace is never removed: its handling is the tokenizer's
    business, and removing it would change the tokens of every text.
    """

    # A dropped byte shifts the offsets of what follows it inside the same pre-token ("word"), so the probe puts
    # a sentinel of each pre-token class (letter, punctuation, digit, new word) right after the character.
    _SENTINELS = ("Q", ":", "0", " Q")

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._known: dict[str, bool] = {}

    def _probe(self, ch: str) -> bool:
        if ch in " \t\n\r":
            return False
        for sentinel in self._SENTINELS:
            probe = ch + sentinel
            offsets = _encode(self._tokenizer, probe, special=False)["offset_mapping"]
            if not offsets or offsets[-1][1] != len(probe):
                return True
        return False

    def __call__(self, text: str) -> set[str]:
        chars = set(text)
        for ch in chars - self._known.keys():
            self._known[ch] = self._probe(ch)
        return {ch for ch in chars if self._known[ch]}


def encode_with_offsets(
    tokenizer, texts: Sequence[str], *, max_length: int
) -> list[tuple[list[int], list[tuple[int, int]], bool]]:
    """Per text: (token ids, character offsets into the original text, truncated?). No EOS appended here."""
    unencodable = UnencodableChars(tokenizer)
    cleaned, keeps = [], []
    for text in texts:
        bad = unencodable(text)
        keep = [i for i, ch in enumerate(text) if ch not in bad] if bad else None
        cleaned.append("".join(text[i] for i in keep) if keep is not None else text)
        keeps.append(keep)
    results = []
    for begin in range(0, len(texts), _BATCH):
        encoded = _encode(tokenizer, cleaned[begin : begin + _BATCH], max_length)
        for j, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)):
            clean, keep = cleaned[begin + j], keeps[begin + j]
            offsets = [(int(a), int(b)) for a, b in offsets]
            covered = max((b for _, b in offsets), default=0)
            # Truncated iff some non-whitespace text lies past the last token.
            truncated = bool(clean[covered:].strip())
            if keep is not None:
                keep_end = [*keep, len(texts[begin + j])]
                offsets = [(keep_end[a], keep[b - 1] + 1) if b > a else (keep_end[a], keep_end[a]) for a, b in offsets]
            results.append((list(ids), offsets, truncated))
    return results


def tokenize(records: Sequence[Record], tokenizer, *, max_length: int) -> TokenizedSplit:
    """Token ids and sensitive masks for ``records``, in order; at most ``max_length`` tokens each."""
    eos = tokenizer.eos_token_id
    encoded = encode_with_offsets(tokenizer, [r.text for r in records], max_length=max_length)
    examples: list[TokenizedExample] = []
    for record, (ids, offsets, truncated) in zip(records, encoded, strict=True):
        mask = sensitive_mask(len(record.text), record.spans, offsets)
        if eos is not None and len(ids) < max_length and (not ids or ids[-1] != eos):
            ids.append(eos)
            mask.append(False)  # special tokens are never sensitive
        examples.append(
            TokenizedExample(
                example_id=record.id,
                input_ids=ids,
                sensitive=mask,
                group=record.group,
                canary_id=record.canary_id,
                truncated=truncated,
            )
        )
    return TokenizedSplit(examples)
