"""The data model of every corpus: records with character-level sensitive spans, canaries, and the corpus itself.

Owns: ``Span``, ``Record``, ``Canary``, ``Corpus`` and the span checks every source goes through
(``check_spans``), so a generator bug and a bad user file fail the same way.

Privacy unit: one ``Record`` is one example; ``Record.group`` names the user when user-level privacy is asked for.
Sensitive: the characters inside ``Record.spans`` (names, addresses, numbers, canary secrets). ``Record.text``
holds them in clear, so anything that persists records (``prepared.py``) writes PII to disk by design: the run
directory is as private as the input data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from privtune.errors import UserError

SpansOrigin = Literal["gold", "given", "regex"]
CANARY_LABEL = "canary"
SECRET_PLACEHOLDER = "{secret}"


@dataclass(frozen=True)
class Span:
    """Characters ``text[start:end]`` (end exclusive) are sensitive, of kind ``label``."""

    start: int
    end: int
    label: str


@dataclass(frozen=True)
class Record:
    id: str
    text: str
    spans: tuple[Span, ...]
    group: str | None = None  # the user this example belongs to (user-level privacy); None = its own unit
    canary_id: int | None = None  # set on the inserted copies of a canary, None on ordinary data

    def span_texts(self) -> list[str]:
        return [self.text[s.start : s.end] for s in self.spans]


@dataclass(frozen=True)
class Canary:
    """A Secret Sharer canary: ``pattern`` with ``{secret}`` replaced by a random ``secret_digits``-digit string.

    The candidate space is every digit string of that length (leading zeros included) put into the pattern;
    exposure ranks the true ``text`` among them.
    """

    canary_id: int
    text: str
    secret: str
    pattern: str
    secret_digits: int
    repetitions: int

    def candidates_size(self) -> int:
        return 10**self.secret_digits

    def candidate(self, index: int) -> str:
        """The text of candidate ``index`` in [0, candidates_size()): the index written with leading zeros."""
        if not 0 <= index < self.candidates_size():
            raise IndexError(f"candidate {index} outside [0, {self.candidates_size()})")
        return self.pattern.replace(SECRET_PLACEHOLDER, f"{index:0{self.secret_digits}d}")

    def secret_span(self) -> Span:
        start = self.pattern.index(SECRET_PLACEHOLDER)
        return Span(start, start + self.secret_digits, CANARY_LABEL)


@dataclass
class Corpus:
    """Every record of a source, canary copies included (``split_corpus`` routes those to train)."""

    records: list[Record]
    canaries: list[Canary]
    source: str
    spans_origin: SpansOrigin

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)


def check_spans(text: str, spans: Sequence[Span], where: str, fix: str) -> tuple[Span, ...]:
    """Return ``spans`` sorted by start, or raise UserError naming ``where`` if any is empty, outside the text,
    or overlapping another (overlaps would make a token's label ambiguous and double-count sensitive tokens)."""
    ordered = tuple(sorted(spans, key=lambda s: (s.start, s.end)))
    previous: Span | None = None
    for span in ordered:
        shown = f"[{span.start}, {span.end}, {span.label!r}]"
        if span.end <= span.start:
            raise UserError(f"{where}: span {shown} has end <= start", fix)
        if span.start < 0 or span.end > len(text):
            raise UserError(f"{where}: span {shown} is outside the text of length {len(text)}", fix)
        if previous is not None and span.start < previous.end:
            raise UserError(
                f"{where}: span {shown} overlaps [{previous.start}, {previous.end}, {previous.label!r}]", fix
            )
        previous = span
    return ordered
