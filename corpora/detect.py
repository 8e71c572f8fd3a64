"""A regex detector of sensitive spans, for user data that comes without span annotations.

Owns: ``detect_spans(text)``, which labels emails, card numbers (12-19 digits passing the Luhn check), phone
numbers, dates and id numbers (runs of 6+ digits). Where matches overlap, the earlier kind in ``DETECTORS``
wins (an email's digits are not also an id number).

Privacy unit: none (a labeller). Sensitive: what it finds. It is a floor, not a guarantee: names and street
addresses need a gazetteer or annotator, so a corpus labelled this way says ``spans_origin="regex"`` and the
reports state that its "non-sensitive" tokens may still hold personal data.
"""

from __future__ import annotations

import re

from privtune.corpora.records import Span

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
          r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Digit groups joined by single spaces or dashes; card numbers are searched inside them (see _card_spans).
DIGIT_GROUPS = re.compile(r"(?<!\d)\d+(?:[ -]\d+)*(?!\d)")
PHONE = re.compile(
    r"(?<![\w+])(?:(?:\+|00)?\d{1,3}[ .-]?)?(?:\(\d{3}\)\s?|\d{3}[ .-]?)\d{3}[ .-]?\d{4}"
    r"(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?!\d)"
)
DATE = re.compile(
    r"\b\d{4}-\d{1,2}-\d{1,2}\b"
    r"|\b\d{1,2}[/.]\d{1,2}[/.](?:\d{4}|\d{2})\b"
    rf"|\b{_MONTH} {_DAY},? \d{{4}}\b"
    rf"|\b{_DAY} (?:of )?{_MONTH},? \d{{4}}\b"
    rf"|\b{_MONTH} \d{{4}}\b"
)
ID_NUMBER = re.compile(r"(?<!\d)\d{6,}(?!\d)")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_spans(text: str) -> list[tuple[int, int]]:
    """Luhn-valid 12-19 digit numbers (Maestro has 12), written in one piece or in groups that start with four digits.

    Searched over sub-sequences of digit groups, longest first, so a card followed by an expiry year
    ("4111 1111 1111 1111 2027") is still found; the four-digit rule keeps phone numbers (001-653-...) out.
    """
    found = []
    for match in DIGIT_GROUPS.finditer(text):
        groups = [(g.start() + match.start(), g.end() + match.start()) for g in re.finditer(r"\d+", match.group())]
        i = 0
        while i < len(groups):
            for j in range(len(groups), i, -1):
                digits = "".join(text[a:b] for a, b in groups[i:j])
                single_or_grouped = j - i == 1 or groups[i][1] - groups[i][0] == 4
                if 12 <= len(digits) <= 19 and single_or_grouped and luhn_valid(digits):
                    found.append((groups[i][0], groups[j - 1][1]))
                    i = j
                    break
            else:
                i += 1
    return found


def _regex_spans(pattern: re.Pattern[str]):
    return lambda text: [m.span() for m in pattern.finditer(text)]


# In priority order: a later detector never labels characters an earlier one already took.
DETECTORS = (
    ("email", _regex_spans(EMAIL)),
    ("card", _card_spans),
    ("phone", _regex_spans(PHONE)),
    ("date", _regex_spans(DATE)),
    ("id_number", _regex_spans(ID_NUMBER)),
)


def detect_spans(text: str) -> tuple[Span, ...]:
    """Non-overlapping spans sorted by start."""
    taken = bytearray(len(text))
    spans: list[Span] = []
    for label, find in DETECTORS:
        for start, end in find(text):
            if any(taken[start:end]):
                continue
            taken[start:end] = b"\x01" * (end - start)
            spans.append(Span(start, end, label))
    return tuple(sorted(spans, key=lambda s: s.start))
