"""Building generated text while recording exactly where each sensitive value lands (gold spans).

Owns: ``TextBuilder``, which fills templates such as ``"I'm {name}, my order is {order_id}."`` and records the
character span of every filled field, so generators never search the text afterwards (a search could mislabel a
value that also occurs elsewhere by chance); and ``LazyValues``, which draws a value only when a template uses it
(Faker is slow, and most dialogs use a few of the possible fields).

Privacy unit: none (helpers). Sensitive: every filled field whose name is not in ``plain`` becomes a span;
literal template text and ``plain`` fields (product names, carriers) are not sensitive.
"""

from __future__ import annotations

from collections.abc import Callable
from string import Formatter

from privtune.corpora.records import Span

_FORMATTER = Formatter()


def label_of(field: str) -> str:
    """The span label of a template field: the name before any ``__suffix`` (``name__agent`` -> ``name``)."""
    return field.split("__", 1)[0]


class LazyValues:
    """Field name -> value, each drawn once on first use by its factory (so draws happen in first-use order)."""

    def __init__(self, factories: dict[str, Callable[[], str]]):
        self._factories = factories
        self.drawn: dict[str, str] = {}

    def __getitem__(self, field: str) -> str:
        if field not in self.drawn:
            self.drawn[field] = self._factories[field]()
        return self.drawn[field]


class TextBuilder:
    def __init__(self) -> None:
        self._parts: list[str] = []
        self._length = 0
        self._spans: list[Span] = []

    def add(self, literal: str) -> None:
        self._parts.append(literal)
        self._length += len(literal)

    def add_value(self, value: str, label: str) -> None:
        """Append a sensitive value and record its span."""
        self._spans.append(Span(self._length, self._length + len(value), label))
        self.add(value)

    def fill(self, template: str, values: LazyValues | dict[str, str], *, plain: frozenset[str] = frozenset()) -> None:
        """Append ``template`` with its ``{field}`` placeholders filled from ``values``.

        The span label is ``label_of(field)``, so a template can use two values of one kind (``{name}`` and
        ``{name__agent}`` are both labelled ``name``). Fields in ``plain`` are not sensitive.
        """
        for literal, field, spec, conversion in _FORMATTER.parse(template):
            if literal:
                self.add(literal)
            if field is None:
                continue
            if spec or conversion:
                raise ValueError(f"template field {{{field}}} must not carry a format spec: {template!r}")
            if field in plain:
                self.add(values[field])
            else:
                self.add_value(values[field], label_of(field))

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def spans(self) -> tuple[Span, ...]:
        return tuple(self._spans)
