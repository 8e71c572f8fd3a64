"""Loading the user's own data: a ``.jsonl`` or ``.csv`` file, or a directory saved with ``datasets``.

Owns: reading rows, checking them (a bad row is a ``UserError`` naming the row and the fix, never a traceback),
and turning them into ``Record``s. Spans come from the spans field (a list of ``[start, end, label]`` character
offsets, end exclusive; in a CSV cell the same list written as JSON) when the data has one, else from the regex
detector (``detect.py``) -- unless ``data.spans_field`` was set explicitly (then no record having it is an error:
a misspelled field must not silently switch to regex spans) or another field holds span lists (then the error
says to name it). Spans may also be ``{"start", "end", "label"}`` objects, the form to use in a
``datasets`` directory (Arrow cannot store a list that mixes integers and strings).

Privacy unit: one row is one example; with ``group_by`` the value of that column names the user, and every row
must have it (a row without a user could not be protected at user level). Sensitive: the span characters; the
file itself is private data, and nothing here copies it anywhere but into the run directory.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privtune.corpora.detect import detect_spans
from privtune.corpora.records import Record, Span, SpansOrigin, check_spans
from privtune.errors import UserError

DEFAULT_LABEL = "sensitive"
_SPANS_FIX = "write spans as [start, end, label] character offsets into the text, end exclusive, not overlapping"


def _read_jsonl(path: Path) -> tuple[list[dict], Callable[[int], str]]:
    rows, lines = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {number} is not valid JSON", "fix or remove that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {number} is not a JSON object", 'write one {"text": ...} object per line')
            rows.append(row)
            lines.append(number)
    return rows, lambda i: f"{path} line {lines[i]}"


def _read_csv(path: Path) -> tuple[list[dict], Callable[[int], str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        try:
            rows = [dict(row) for row in csv.DictReader(handle)]
        except csv.Error as err:
            raise UserError(f"{path} is not a readable CSV file ({err})", "check its quoting") from None
    return rows, lambda i: f"{path} row {i + 1}"


def _read_dataset_dir(path: Path) -> tuple[list[dict], Callable[[int], str]]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError):
        raise UserError(
            f"directory {path} is not a dataset saved with datasets' save_to_disk",
            "point data.source at such a directory, or at a .jsonl / .csv file",
        ) from None
    # privtune makes its own train/test split, so the splits of a DatasetDict are read one after another.
    parts = [loaded[name] for name in loaded] if isinstance(loaded, DatasetDict) else [loaded]
    rows = [row for part in parts if isinstance(part, Dataset) for row in part.to_list()]
    return rows, lambda i: f"{path} record {i + 1}"


def read_rows(path: Path) -> tuple[list[dict], Callable[[int], str]]:
    """The rows of a user data source, and a function naming row i for error messages."""
    if not path.exists():
        raise UserError(
            f"data source {path} does not exist",
            "check data.source: a .jsonl or .csv file, a `datasets` directory, customersim or synbio",
        )
    try:
        if path.is_dir():
            return _read_dataset_dir(path)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path)
        if suffix == ".csv":
            return _read_csv(path)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text", "convert it to UTF-8") from None
    except PermissionError:
        raise UserError(f"{path} cannot be read (permission denied)", "make it readable for this user") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a file", "point data.source at the file") from None
    raise UserError(f"data source {path} has an unsupported type", "use a .jsonl or .csv file or a `datasets` directory")


def _parse_spans(raw: Any, where: str, field: str) -> list[Span]:
    if isinstance(raw, str):  # CSV cells hold the list as JSON text
        try:
            raw = json.loads(raw) if raw.strip() else []
        except json.JSONDecodeError:
            raise UserError(f"{where}: field '{field}' is not a JSON list of spans", _SPANS_FIX) from None
    if not isinstance(raw, list):
        raise UserError(f"{where}: field '{field}' is not a list of spans", _SPANS_FIX)
    spans = []
    for item in raw:
        if isinstance(item, dict):
            item = [item.get("start"), item.get("end"), item.get("label", DEFAULT_LABEL)]
        if not isinstance(item, list | tuple) or len(item) not in (2, 3):
            raise UserError(f"{where}: span {item!r} is not [start, end, label]", _SPANS_FIX)
        start, end = item[0], item[1]
        label = item[2] if len(item) == 3 else DEFAULT_LABEL
        if type(start) is not int or type(end) is not int or not isinstance(label, str):
            raise UserError(f"{where}: span {list(item)!r} needs integer offsets and a text label", _SPANS_FIX)
        spans.append(Span(start, end, label))
    return spans


def _looks_like_spans(value: Any) -> bool | None:
    """True: a non-empty list of spans; None: an empty list (fits, proves nothing); False: anything else."""
    if isinstance(value, str):  # a CSV cell
        if not value.lstrip().startswith("["):
            return False
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return False
    if not isinstance(value, list):
        return False
    if not value:
        return None
    for item in value:
        if isinstance(item, dict):
            item = [item.get("start"), item.get("end"), item.get("label", DEFAULT_LABEL)]
        if not isinstance(item, list | tuple) or len(item) not in (2, 3):
            return False
        if type(item[0]) is not int or type(item[1]) is not int or (len(item) == 3 and not isinstance(item[2], str)):
            return False
    return True


def _spans_like_field(rows: list[dict], skip: set[str]) -> str | None:
    """The first field every record of which holds a span list (some of them non-empty), if there is one."""
    candidates = {key: False for row in rows for key in row if key not in skip}
    for key in list(candidates):
        for row in rows:
            if row.get(key) is None:
                continue
            looks = _looks_like_spans(row[key])
            if looks is False:
                del candidates[key]
                break
            candidates[key] = candidates[key] or bool(looks)
    return next((key for key, seen in candidates.items() if seen), None)


def load_user_records(
    source: str, *, text_field: str, spans_field: str, group_by: str | None, spans_field_explicit: bool = False,
    detect: bool = True,
) -> tuple[list[Record], SpansOrigin]:
    """Records of a user data source and where their spans came from ("given" or "regex").

    Spans: from ``spans_field`` when records have it. When none has it: a field the user named explicitly
    (``spans_field_explicit``) is refused, since a misspelling must not silently switch to regex spans; the
    default name falls back to the regex detector, unless another field holds span lists (then the user is told
    to name it). ``detect=False`` skips the regex detector (records get no spans): preflight's check of the data.
    """
    path = Path(source).expanduser()
    rows, where = read_rows(path)
    if not rows:
        raise UserError(f"data source {path} holds no records", "add examples to it")
    has_spans = any(spans_field in row for row in rows)
    if not has_spans and spans_field_explicit:
        fields = ", ".join(sorted(map(str, rows[0]))) or "none"
        raise UserError(
            f"no record of {path} has the spans field '{spans_field}' ({where(0)} has fields: {fields})",
            "set data.spans_field to the field that holds the spans, or remove it to detect spans with regexes",
        )
    if not has_spans:
        other = _spans_like_field(rows, skip={text_field, *([group_by] if group_by else [])})
        if other is not None:
            raise UserError(
                f"{path} has no '{spans_field}' field, but its field '{other}' holds span lists",
                f"set data.spans_field={other} (or rename that field to {spans_field})",
            )
    records = []
    for i, row in enumerate(rows):
        if text_field not in row:
            fields = ", ".join(sorted(map(str, row))) or "none"
            raise UserError(
                f"{where(i)} has no text field '{text_field}' (fields: {fields})",
                "set data.text_field to the column that holds the text",
            )
        text = row[text_field]
        if not isinstance(text, str) or not text:
            raise UserError(f"{where(i)}: field '{text_field}' is empty or not text", "give every record some text")
        if has_spans:
            if row.get(spans_field) is None:
                raise UserError(
                    f"{where(i)} has no '{spans_field}' although other records do",
                    "give every record a spans list (an empty list [] if nothing in it is sensitive)",
                )
            spans = check_spans(text, _parse_spans(row[spans_field], where(i), spans_field), where(i), _SPANS_FIX)
        else:
            spans = detect_spans(text) if detect else ()
        group = None
        if group_by is not None:
            if row.get(group_by) in (None, ""):  # an empty CSV cell is a missing value
                raise UserError(
                    f"{where(i)} has no value for the group_by field '{group_by}'",
                    "give every record its user id, or fix data.group_by",
                )
            group = str(row[group_by])
        records.append(Record(id=f"row-{i}", text=text, spans=spans, group=group))
    return records, ("given" if has_spans else "regex")
