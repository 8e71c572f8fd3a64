"""The privacy ledger: ``RUN/ledger.json``, the record of every DP release a run made.

Owns: the ledger file format (a header plus an append-only list of entries, each sealed by a SHA-256 hash
chain), its validation on load, atomic writes, and the resume rule for DP training. Composition across ledgers
(and the check against a released model's card) lives in ``budget.py``.

Privacy unit: stated once in the header (``privacy_unit``, ``group_by``) with the neighbouring relation and the
dataset size N; every event in the file is about that unit. Ledgers about different units never compose.

Sensitive: the ledger is what ``privtune budget`` turns into the ε a user publishes, so
- every mutation is written to disk (temp file in the same directory, fsync, ``os.replace``, fsync of the
  directory) before the method returns: a release is never left unrecorded, a crash never leaves half a file;
- entries are only appended. The one mutable thing is the step count of an *open* DP training entry, keyed by
  (stage, run_id): it only grows through ``record_training``/``set_steps``, and only ``rewind`` (resume from a
  checkpoint) may set it back, to exactly the count saved with that checkpoint. Closed entries never change;
- anything malformed on load is a ``UserError``; nothing is repaired silently;
- every entry carries ``hash``: h_0 = sha256(canonical header), h_i = sha256(h_{i-1} + canonical entry i without
  its hash), recomputed on every commit and verified on every load (``load``, ``from_state_dict``, hence ``open``
  and checkpoint ``rewind``). A hand edit of σ, q or T is refused instead of silently lowering ε. The chain is
  tamper-*evident*, not tamper-proof: whoever can rewrite the file can recompute it, which is why a released
  model's card records ``head`` and ``privtune budget`` compares the two.
Only one process (rank 0) may write a ledger.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from privtune.accounting.events import (
    Event,
    PoissonGaussianEvent,
    ShuffledGaussianEvent,
    event_from_dict,
)
from privtune.atomic import atomic_write_text
from privtune.errors import UserError

__all__ = [
    "FORMAT_VERSION",
    "LEDGER_FILENAME",
    "NEIGHBOURING_RELATIONS",
    "PRIVACY_UNITS",
    "Ledger",
    "LedgerEntry",
    "LedgerHeader",
    "new_run_id",
    "resolve_ledger_path",
]

FORMAT_VERSION = 2  # 2: every entry carries ``hash`` (the chain); 1 had none and is refused
LEDGER_FILENAME = "ledger.json"
PRIVACY_UNITS = ("example", "group", "dpo_pair", "rl_prompt_group")
# Recorded as stated; the accountants here support add_remove only (see accountants.NEIGHBOURING).
NEIGHBOURING_RELATIONS = ("add_remove", "replace_one")
# An entry's content keys: what its hash covers. On disk (and in state_dict) each entry also has "hash".
_ENTRY_KEYS = {"seq", "stage", "run_id", "status", "sampler", "event", "note", "recorded_at", "updated_at"}
_TRAINING_EVENTS = (PoissonGaussianEvent, ShuffledGaussianEvent)
_CORRUPT_FIX = "restore ledger.json from a good copy (never edit it by hand)"


def _canonical(data: Any) -> str:
    """The one JSON text of ``data`` that the hash chain covers: key order and whitespace never matter."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _chain(header: dict[str, Any], contents: list[dict[str, Any]]) -> list[str]:
    """[h_0, h_1, ..., h_n]: h_0 seals the header, h_i = sha256(h_{i-1} + canonical(content of entry i))."""
    hashes = [_sha256(_canonical(header))]
    for content in contents:
        hashes.append(_sha256(hashes[-1] + _canonical(content)))
    return hashes


def _steps(event: Event) -> int:
    if not isinstance(event, _TRAINING_EVENTS):
        raise TypeError(f"{type(event).__name__} has no training steps")
    return event.steps


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """A fresh id for one training run; store it in the run's checkpoints so that a resume finds its entry."""
    return uuid.uuid4().hex[:16]


def resolve_ledger_path(path: str | os.PathLike[str]) -> Path:
    """An existing file is the ledger itself; a directory, or a path that does not exist and does not end in
    ``.json``, is a run directory and means ``RUN/ledger.json``."""
    p = Path(path)
    if p.is_file() or (not p.exists() and p.suffix == ".json"):
        return p
    return p / LEDGER_FILENAME


def _one_line(name: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or "\n" in value or (not allow_empty and not value.strip()):
        raise UserError(f"{name} must be a one-line string, got {value!r}", f"pass a short {name}")
    return value


@dataclass(frozen=True)
class LedgerEntry:
    """One release. ``status`` is ``"open"`` only for a DP training run still in progress."""

    seq: int
    stage: str
    run_id: str | None
    status: str
    event: Event
    note: str
    recorded_at: str
    updated_at: str

    @property
    def sampler(self) -> str:
        """The sampling that actually ran (``poisson``, ``shuffle``, ``full_dataset``, ``n/a``)."""
        return self.event.sampler

    @property
    def key(self) -> tuple[str, str] | None:
        """(stage, run_id) for a training entry, else None."""
        return (self.stage, self.run_id) if self.run_id is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "stage": self.stage,
            "run_id": self.run_id,
            "status": self.status,
            "sampler": self.sampler,
            "event": self.event.to_dict(),
            "note": self.note,
            "recorded_at": self.recorded_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, data: Any) -> LedgerEntry:
        if not isinstance(data, dict) or set(data) != _ENTRY_KEYS:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise UserError(f"ledger entry has keys {keys}, expected {sorted(_ENTRY_KEYS)}", _CORRUPT_FIX)
        seq = data["seq"]
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise UserError(f"ledger entry seq {seq!r} is not a positive integer", _CORRUPT_FIX)
        event = event_from_dict(data["event"])
        if data["sampler"] != event.sampler:
            raise UserError(
                f"ledger entry {seq} says sampler {data['sampler']!r} but its event ran {event.sampler!r}",
                _CORRUPT_FIX,
            )
        if data["status"] not in ("open", "closed"):
            raise UserError(f"ledger entry {seq} has status {data['status']!r}", _CORRUPT_FIX)
        run_id = data["run_id"]
        if run_id is not None:
            _one_line("run_id", run_id)
        if data["status"] == "open" and (run_id is None or not isinstance(event, _TRAINING_EVENTS)):
            raise UserError(f"ledger entry {seq} is open but is not a DP training entry", _CORRUPT_FIX)
        return cls(
            seq=seq,
            stage=_one_line("stage", data["stage"]),
            run_id=run_id,
            status=data["status"],
            event=event,
            note=_one_line("note", data["note"], allow_empty=True),
            recorded_at=_one_line("recorded_at", data["recorded_at"]),
            updated_at=_one_line("updated_at", data["updated_at"]),
        )


def _check_version(version: Any, *, where: str) -> None:
    if version == 1:
        # A v1 file has no hashes: a hand edit of σ in it cannot be told from what training wrote.
        raise UserError(
            f"{where} has format_version 1, which predates the hash chain and cannot be verified",
            "re-run the training with this privtune, or read it with the privtune version that wrote it",
        )
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise UserError(
            f"{where} format_version {version!r} is not supported (this privtune reads {FORMAT_VERSION})",
            "use the privtune version that wrote it",
        )


@dataclass(frozen=True)
class LedgerHeader:
    """What every entry of a ledger is about: the privacy unit, the neighbouring relation and the dataset size N.

    Validated on construction; ``from_dict`` reads the header as stored (exact keys, supported version) and
    ``to_dict`` gives it back with the same keys, in the order privtune writes them.
    """

    format_version: int
    ledger_id: str
    created_at: str
    neighbouring: str
    privacy_unit: str
    group_by: str | None
    dataset_size: int
    dataset: str | None

    def __post_init__(self) -> None:
        _check_version(self.format_version, where="ledger")
        if self.neighbouring not in NEIGHBOURING_RELATIONS:
            raise UserError(
                f"ledger neighbouring relation {self.neighbouring!r} is unknown",
                f"use one of {list(NEIGHBOURING_RELATIONS)}",
            )
        if self.privacy_unit not in PRIVACY_UNITS:
            raise UserError(
                f"ledger privacy_unit {self.privacy_unit!r} is unknown", f"use one of {list(PRIVACY_UNITS)}"
            )
        if (self.privacy_unit == "group") != (self.group_by is not None):
            raise UserError(
                "ledger group_by must be set exactly when privacy_unit is 'group'",
                "name the user column for group units",
            )
        if self.group_by is not None:
            _one_line("group_by", self.group_by)
        n = self.dataset_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(
                f"ledger dataset_size {n!r} is not a positive integer", "pass N, the number of privacy units"
            )
        if self.dataset is not None:
            _one_line("dataset", self.dataset)
        _one_line("ledger_id", self.ledger_id)
        _one_line("created_at", self.created_at)

    @classmethod
    def from_dict(cls, data: Any) -> LedgerHeader:
        if not isinstance(data, dict):
            raise UserError("ledger header is not a JSON object", _CORRUPT_FIX)
        _check_version(data.get("format_version"), where="ledger")
        if set(data) != _HEADER_KEYS:
            raise UserError(f"ledger header has keys {sorted(data)}, expected {sorted(_HEADER_KEYS)}", _CORRUPT_FIX)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_HEADER_KEYS = frozenset(f.name for f in fields(LedgerHeader))


def _atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix (NaN refused)."""
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _entry_name(raw: Any, position: int) -> str:
    seq = raw.get("seq") if isinstance(raw, dict) else None
    return f"entry {seq}" if isinstance(seq, int) and not isinstance(seq, bool) else f"entry #{position}"


def _verify_stored_chain(header: dict[str, Any], raw_entries: list[Any], *, where: str) -> list[str]:
    """Recompute the chain over the stored header and entries (minus ``hash``); return the stored hashes."""
    try:
        expected = _sha256(_canonical(header))
    except (TypeError, ValueError):  # NaN or a non-JSON value: cannot be what privtune wrote
        raise UserError(f"{where}: header is not plain JSON", _CORRUPT_FIX) from None
    stored: list[str] = []
    for position, raw in enumerate(raw_entries, start=1):
        name = _entry_name(raw, position)
        if not isinstance(raw, dict) or not isinstance(raw.get("hash"), str):
            raise UserError(f"{where}: {name} has no hash (edited by hand?)", _CORRUPT_FIX)
        content = {k: v for k, v in raw.items() if k != "hash"}
        try:
            expected = _sha256(expected + _canonical(content))
        except (TypeError, ValueError):
            expected = None  # NaN in an edited value: reported as the mismatch it is
        if raw["hash"] != expected:  # entry 1's hash also seals the header: an edited header shows up there
            raise UserError(
                f"{where}: {name}'s hash does not match its content (edited by hand?)", _CORRUPT_FIX
            )
        stored.append(raw["hash"])
    return stored


class Ledger:
    """A run's privacy ledger. Build with ``Ledger.create``, ``Ledger.load`` or ``Ledger.open``."""

    def __init__(self, path: Path, header: LedgerHeader, entries: list[LedgerEntry]) -> None:
        self._path = path
        self._header = header
        self._entries: list[LedgerEntry] = []
        for entry in entries:
            self._check_appendable(entry)
            self._entries.append(entry)
        self._hashes = self._chain_of(self._entries)

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        privacy_unit: str,
        dataset_size: int,
        group_by: str | None = None,
        neighbouring: str = "add_remove",
        dataset: str | None = None,
    ) -> Ledger:
        """Start a new, empty ledger at ``path`` (a run dir or a file) and write it. Refuses to overwrite."""
        file = resolve_ledger_path(path)
        if file.exists():
            raise UserError(f"a ledger already exists at {file}", "load it with Ledger.load (or Ledger.open)")
        header = LedgerHeader(
            format_version=FORMAT_VERSION,
            ledger_id=uuid.uuid4().hex,
            created_at=_now(),
            neighbouring=neighbouring,
            privacy_unit=privacy_unit,
            group_by=group_by,
            dataset_size=dataset_size,
            dataset=dataset,
        )
        ledger = cls(file, header, [])
        if not file.parent.is_dir():
            raise UserError(f"directory {file.parent} does not exist", "create the run directory first")
        ledger.save()
        return ledger

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Ledger:
        """Read and fully validate a ledger (a run dir or a ledger file)."""
        file = resolve_ledger_path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"no ledger at {file}", "pass a run directory or a ledger.json file") from None
        except OSError as err:
            raise UserError(
                f"cannot read ledger {file} ({err.strerror})", "check the path and permissions"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"ledger {file} is not valid JSON (line {err.lineno})", _CORRUPT_FIX) from None
        return cls.from_state_dict(data, path=file)

    @classmethod
    def from_state_dict(cls, data: Any, *, path: str | os.PathLike[str]) -> Ledger:
        """A ledger from ``state_dict()`` output (what checkpoints store), bound to ``path`` for saving.

        Every entry's hash is verified (a mismatch names the first bad entry) before its content is trusted.
        """
        return cls._from_state(data, path=Path(path), where=f"ledger {path}")

    @classmethod
    def _from_state(cls, data: Any, *, path: Path, where: str) -> Ledger:
        if (
            not isinstance(data, dict)
            or set(data) != {"header", "entries"}
            or not isinstance(data["entries"], list)
        ):
            raise UserError(f"{where} is not an object with 'header' and an 'entries' list", _CORRUPT_FIX)
        raw_header, raw_entries = data["header"], data["entries"]
        if not isinstance(raw_header, dict):
            raise UserError(f"{where}: header is not a JSON object", _CORRUPT_FIX)
        _check_version(raw_header.get("format_version"), where=where)
        # The chain is checked on the text as stored, before any field is parsed: a hand edit is then reported
        # as what it is ("hash does not match") rather than as whatever value check it happens to trip.
        stored = _verify_stored_chain(raw_header, raw_entries, where=where)
        header = LedgerHeader.from_dict(raw_header)
        entries = [LedgerEntry.from_dict({k: v for k, v in e.items() if k != "hash"}) for e in raw_entries]
        ledger = cls(path, header, entries)
        for entry, want, got in zip(ledger._entries, stored, ledger._hashes[1:], strict=True):
            if want != got:  # only a file crafted with consistent hashes (e.g. steps 439.0) gets here
                raise UserError(
                    f"{where}: entry {entry.seq} is not in the form privtune writes (edited by hand?)",
                    _CORRUPT_FIX,
                )
        return ledger

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        privacy_unit: str,
        dataset_size: int,
        group_by: str | None = None,
        neighbouring: str = "add_remove",
        dataset: str | None = None,
    ) -> Ledger:
        """Load the ledger at ``path`` if there is one (its header must match these settings), else create it."""
        file = resolve_ledger_path(path)
        if not file.exists():
            return cls.create(
                file,
                privacy_unit=privacy_unit,
                dataset_size=dataset_size,
                group_by=group_by,
                neighbouring=neighbouring,
                dataset=dataset,
            )
        ledger = cls.load(file)
        wanted = {
            "privacy_unit": privacy_unit,
            "group_by": group_by,
            "dataset_size": dataset_size,
            "neighbouring": neighbouring,
            "dataset": dataset,
        }
        for key, value in wanted.items():
            if getattr(ledger._header, key) != value:
                raise UserError(
                    f"{file} records {key}={getattr(ledger._header, key)!r} but this run has {key}={value!r}",
                    "use a new run directory for a different privacy setting",
                )
        return ledger

    # ---- reading --------------------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def header(self) -> dict[str, Any]:
        return self._header.to_dict()

    @property
    def ledger_id(self) -> str:
        return self._header.ledger_id

    @property
    def privacy_unit(self) -> str:
        return self._header.privacy_unit

    @property
    def group_by(self) -> str | None:
        return self._header.group_by

    @property
    def neighbouring(self) -> str:
        return self._header.neighbouring

    @property
    def dataset_size(self) -> int:
        return self._header.dataset_size

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries)

    @property
    def head(self) -> dict[str, Any]:
        """Where the chain stands: ``{"ledger_id", "seq" (last entry's, 0 if empty), "hash" (h after it)}``.

        A released model's card records this so that a later change to the ledger shows (``privtune budget``).
        """
        last = self._entries[-1].seq if self._entries else 0
        return {"ledger_id": self.ledger_id, "seq": last, "hash": self._hashes[-1]}

    def hash_at(self, seq: int) -> str:
        """The chain hash right after entry ``seq`` (``seq=0``: h_0, the header's)."""
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise TypeError(f"seq must be an int, got {seq!r}")
        if seq == 0:
            return self._hashes[0]
        for i, entry in enumerate(self._entries, start=1):
            if entry.seq == seq:
                return self._hashes[i]
        raise UserError(f"ledger {self._path} has no entry {seq}", "name an entry it records")

    def events(self) -> list[Event]:
        """Every recorded event, in ledger order (what an accountant composes)."""
        return [e.event for e in self._entries]

    def find(self, *, stage: str, run_id: str) -> LedgerEntry | None:
        """The training entry of (stage, run_id), if any."""
        for entry in self._entries:
            if entry.key == (stage, run_id):
                return entry
        return None

    def state_dict(self) -> dict[str, Any]:
        """The whole ledger as JSON-ready data, hashes included; a checkpoint stores this so that a resume can
        ``rewind`` (and the hashes let the resume verify the checkpoint's copy too)."""
        entries = [{**e.to_dict(), "hash": h} for e, h in zip(self._entries, self._hashes[1:], strict=True)]
        return {"header": self._header.to_dict(), "entries": entries}

    # ---- writing --------------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the ledger atomically (every mutating method already does this)."""
        _atomic_write_json(self._path, self.state_dict())

    def _next_seq(self) -> int:
        return max((e.seq for e in self._entries), default=0) + 1

    def _check_appendable(self, entry: LedgerEntry) -> None:
        if self._entries and entry.seq <= self._entries[-1].seq:
            raise UserError(f"ledger entry seq {entry.seq} is out of order", _CORRUPT_FIX)
        if entry.key is not None and any(e.key == entry.key for e in self._entries):
            raise UserError(
                f"ledger has two entries for stage {entry.stage!r} run {entry.run_id!r}", _CORRUPT_FIX
            )
        if isinstance(entry.event, ShuffledGaussianEvent) and entry.event.dataset_size != self.dataset_size:
            raise UserError(
                f"shuffled event has dataset_size {entry.event.dataset_size}, ledger has {self.dataset_size}",
                "record the size of the dataset that was shuffled",
            )

    def _chain_of(self, entries: list[LedgerEntry]) -> list[str]:
        return _chain(self._header.to_dict(), [e.to_dict() for e in entries])

    def _commit(self, entries: list[LedgerEntry]) -> None:
        # Recomputed in full: the open training entry's steps change its hash and that of every entry after it.
        previous = self._entries, self._hashes
        self._entries, self._hashes = entries, self._chain_of(entries)
        try:
            self.save()
        except BaseException:
            self._entries, self._hashes = previous
            raise

    def record(self, event: Event, *, stage: str, note: str = "") -> LedgerEntry:
        """Append a one-shot release (a Gaussian histogram, a non-private debug release, ...), closed at once.

        DP training goes through ``record_training`` so that its steps can grow and be resumed.
        """
        if not isinstance(event, Event):
            raise TypeError(f"record() takes an Event, got {type(event).__name__}")
        if isinstance(event, _TRAINING_EVENTS):
            raise UserError(
                f"{type(event).__name__} is DP training",
                "record it with record_training(event, stage=, run_id=)",
            )
        now = _now()
        entry = LedgerEntry(
            seq=self._next_seq(),
            stage=_one_line("stage", stage),
            run_id=None,
            status="closed",
            event=event,
            note=_one_line("note", note, allow_empty=True),
            recorded_at=now,
            updated_at=now,
        )
        self._check_appendable(entry)
        self._commit([*self._entries, entry])
        return entry

    def record_training(self, event: Event, *, stage: str, run_id: str, note: str = "") -> LedgerEntry:
        """Create or advance the open training entry of (stage, run_id) to ``event``.

        Call it with ``steps`` = optimizer steps completed so far (at least at every checkpoint and at the end).
        The first call appends the entry; later calls must carry the same mechanism (type, q or batch size, σ)
        and at least as many steps. Fewer steps are refused: a resume sets them back with ``rewind`` only.
        """
        if not isinstance(event, _TRAINING_EVENTS):
            raise UserError(
                f"record_training takes a PoissonGaussianEvent or ShuffledGaussianEvent, got {type(event).__name__}",
                "record one-shot releases with record()",
            )
        stage = _one_line("stage", stage)
        run_id = _one_line("run_id", run_id)
        current = self.find(stage=stage, run_id=run_id)
        now = _now()
        if current is None:
            entry = LedgerEntry(
                seq=self._next_seq(),
                stage=stage,
                run_id=run_id,
                status="open",
                event=event,
                note=_one_line("note", note, allow_empty=True),
                recorded_at=now,
                updated_at=now,
            )
            self._check_appendable(entry)
            self._commit([*self._entries, entry])
            return entry
        self._check_same_mechanism(current, event)
        if current.status != "open":
            raise UserError(
                f"training entry {current.seq} ({stage!r}, run {run_id!r}) is closed",
                "a finished run cannot take more steps; start a new run id",
            )
        if _steps(event) < _steps(current.event):
            raise UserError(
                f"ledger steps can only grow: entry {current.seq} has {_steps(current.event)}, got {_steps(event)}",
                "to resume from a checkpoint, rewind the ledger to the state saved with it",
            )
        return self._replace(current, replace(current, event=event, updated_at=now))

    def set_steps(self, *, stage: str, run_id: str, steps: int) -> LedgerEntry:
        """Advance the open training entry of (stage, run_id) to ``steps`` optimizer steps (never backwards)."""
        current = self.find(stage=stage, run_id=run_id)
        if current is None:
            raise UserError(
                f"no training entry for stage {stage!r} run {run_id!r}",
                "create it with record_training first",
            )
        return self.record_training(
            replace(current.event, steps=steps), stage=stage, run_id=run_id, note=current.note
        )

    def close_training(self, *, stage: str, run_id: str) -> LedgerEntry:
        """Mark the training run finished: its model may now be released, so its steps are final."""
        current = self.find(stage=stage, run_id=run_id)
        if current is None:
            raise UserError(f"no training entry for stage {stage!r} run {run_id!r}", "record_training first")
        if current.status == "closed":
            return current
        return self._replace(current, replace(current, status="closed", updated_at=_now()))

    def rewind(self, state: dict[str, Any], *, stage: str, run_id: str) -> LedgerEntry | None:
        """Resume rule: set the training entry of (stage, run_id) to what the checkpoint's ``state`` recorded.

        ``state`` is ``state_dict()`` as saved with the checkpoint the run resumes from. Its training entry (or its
        absence: a checkpoint taken before the first step) replaces the current one, so steps taken after that
        checkpoint, whose results were lost with the crash, are not counted, and steps before it are not counted
        twice. Everything else must agree: another ledger, a different mechanism, a closed (finished) run, or a
        release the checkpoint knows of but this file lost are refused.
        """
        # Verified like the file: a checkpoint is as easy to edit by hand as ledger.json.
        saved = Ledger._from_state(
            copy.deepcopy(state), path=self._path, where="the checkpoint's ledger state"
        )
        if saved.ledger_id != self.ledger_id or saved.header != self.header:
            raise UserError(
                "the checkpoint's ledger state belongs to another ledger",
                "resume from a checkpoint of this run directory",
            )
        key = (stage, run_id)
        current_by_seq = {e.seq: e for e in self._entries}
        for entry in saved.entries:
            if entry.key == key:
                continue
            if current_by_seq.get(entry.seq) != entry:
                raise UserError(
                    f"ledger.json lacks or changed entry {entry.seq} ({entry.stage!r}) that the checkpoint records",
                    _CORRUPT_FIX,
                )
        current = self.find(stage=stage, run_id=run_id)
        restored = saved.find(stage=stage, run_id=run_id)
        if current is not None and current.status == "closed":
            raise UserError(
                f"training run {run_id!r} of stage {stage!r} is finished (closed) and may have been released",
                "start a new run id instead of resuming it",
            )
        if restored is not None and restored.status != "open":
            raise UserError("the checkpoint's training entry is closed", "start a new run id")
        if current is not None and restored is not None:
            self._check_same_mechanism(current, restored.event)
        entries = [e for e in self._entries if e.key != key]
        if restored is not None:
            if any(e.seq == restored.seq for e in entries):
                raise UserError(f"ledger entry seq {restored.seq} is taken by another entry", _CORRUPT_FIX)
            entries.append(replace(restored, updated_at=_now()))
            entries.sort(key=lambda e: e.seq)
        self._commit(entries)
        return self.find(stage=stage, run_id=run_id)

    # ---- helpers --------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_same_mechanism(current: LedgerEntry, event: Event) -> None:
        old, new = current.event, event
        if type(old) is not type(new) or replace(old, steps=1) != replace(new, steps=1):
            raise UserError(
                f"training entry {current.seq} ran {old.to_dict()} but the update is {new.to_dict()}",
                "keep q, σ, batch size and sampler fixed within a run; start a new run id to change them",
            )

    def _replace(self, old: LedgerEntry, new: LedgerEntry) -> LedgerEntry:
        entries = [new if e is old else e for e in self._entries]
        self._commit(entries)
        return new
