"""The end-to-end budget: compose any set of ledgers into one (ε, δ).

Owns: ``compose_ledgers`` — the refusal rules for composition, the check of a run's ledger against its released
model's card (``RUN/model/privtune.json``), and the JSON-ready result ``privtune budget`` prints. Paper B's
guarantee is one call: the generator run's ledger plus the histogram stage's ledger.

Privacy unit: the ledgers' common unit; composition of ledgers about different units, groupings or neighbouring
relations is refused (a group-level and an example-level ε do not add up to anything).

Sensitive: the ε printed to users comes from here. It is refused outright (``UserError``) when any ledger holds a
non-private release (``NoGuaranteeError``: no formal guarantee), when a release has no verified accountant
(shuffled batches), when the same ledger is given twice, or when the ledgers disagree on unit or relation.
Every ledger's hash chain is verified on load (``ledger.py``); for a run directory whose model card records the
ledger's hash and training event at release, the ledger must still agree with the card — otherwise it was changed
after the model was released (say σ edited from 0.49 to 5, hashes recomputed), and the smaller ε it would give
is refused. The card is read as plain JSON: accounting depends on no other privtune stage.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privtune.accounting.accountants import (
    NEIGHBOURING,
    SHUFFLE_REFUSAL,
    NoGuaranteeError,
    check_delta,
    make_accountant,
)
from privtune.accounting.events import NonPrivateEvent, ShuffledGaussianEvent
from privtune.accounting.ledger import Ledger, resolve_ledger_path
from privtune.errors import UserError

__all__ = ["MODEL_CARD", "compose_ledgers"]

MODEL_CARD = Path("model") / "privtune.json"  # relative to a run dir; written by the training recipe
_HASH = re.compile(r"[0-9a-f]{64}")
_VERIFIED_CARD = "hash chain intact; matches the model card"
_VERIFIED_NO_CARD = "hash chain intact (no model card to check)"
_VERIFIED_CARD_WITHOUT_HASH = "hash chain intact (the model card records no ledger hash)"
_CARD_FIX = "restore ledger.json (and model/privtune.json) from a good copy; never edit either by hand"


def _short(digest: str) -> str:
    return digest[:12]


def _read_card(card: Path) -> dict[str, Any] | None:
    """The run's model card as plain JSON, or None if the run released no model (yet)."""
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"model card {card} is unreadable or not valid JSON", _CARD_FIX) from None
    if not isinstance(data, dict):
        raise UserError(f"model card {card} is not a JSON object", _CARD_FIX)
    return data


def _check_card(ledger: Ledger, run_dir: Path) -> str:
    """Compare the ledger with what the model card recorded at release; return the verification text.

    Card keys, each optional (absent or null: nothing to check; an older run has neither):
    ``"ledger"``: ``{"ledger_id", "seq", "hash"}`` with ``hash == Ledger.hash_at(seq)`` when the model was written
    (``Ledger.head`` right after the training entry was closed), and ``"event"``: the event dict of the closed
    training entry at ``seq`` (a non-DP run writes null).
    """
    card_path = run_dir / MODEL_CARD
    card = _read_card(card_path)
    if card is None:
        return _VERIFIED_NO_CARD
    record, event = card.get("ledger"), card.get("event")
    if record is None:
        if event is not None:  # an event without the entry it belongs to cannot be checked against anything
            raise UserError(f"model card {card_path} records an event but no 'ledger' position", _CARD_FIX)
        return _VERIFIED_CARD_WITHOUT_HASH
    if (
        not isinstance(record, dict)
        or set(record) != {"ledger_id", "seq", "hash"}
        or not isinstance(record["ledger_id"], str)
        or isinstance(record["seq"], bool)
        or not isinstance(record["seq"], int)
        or record["seq"] < 0
        or not isinstance(record["hash"], str)
        or not _HASH.fullmatch(record["hash"])
    ):
        raise UserError(
            f"model card {card_path} has a malformed 'ledger' record {record!r}",
            'it must be {"ledger_id": str, "seq": int >= 0, "hash": 64 hex digits}',
        )
    seq, want = record["seq"], record["hash"]
    name = f"{run_dir}'s model card"
    if record["ledger_id"] != ledger.ledger_id:
        raise UserError(
            f"{name} records ledger {record['ledger_id']} but ledger.json is ledger {ledger.ledger_id}: "
            "the ledger was replaced after the model was released",
            _CARD_FIX,
        )
    entry = next((e for e in ledger.entries if e.seq == seq), None)
    if entry is None and seq != 0:  # seq 0 is the empty ledger's head: h_0, the header's hash
        last = ledger.head["seq"]
        raise UserError(
            f"{name} records ledger hash {_short(want)} at entry {seq} but ledger.json has no entry {seq} "
            f"(its last is {last}): the ledger was changed after the model was released",
            _CARD_FIX,
        )
    got = ledger.hash_at(seq)
    if got != want:
        raise UserError(
            f"{name} records ledger hash {_short(want)} at entry {seq} but ledger.json has {_short(got)} there: "
            "the ledger was changed after the model was released",
            _CARD_FIX,
        )
    if event is not None:
        # Same hash but another event can only mean the card was written (or edited) apart from the ledger.
        if entry is None or entry.run_id is None or entry.status != "closed":
            raise UserError(f"{name} points at entry {seq}, which is not a closed training entry", _CARD_FIX)
        if event != entry.event.to_dict():
            raise UserError(
                f"{name} records event {json.dumps(event, sort_keys=True)} but ledger.json entry {seq} "
                f"ran {json.dumps(entry.event.to_dict(), sort_keys=True)}",
                _CARD_FIX,
            )
    return _VERIFIED_CARD


def _load(item: Ledger | str | os.PathLike[str]) -> tuple[Ledger, str, str]:
    """(ledger, where, verification text). The ledger's chain is verified by ``Ledger.load`` itself; only a run
    directory (not a ledger file, which may be a copy anywhere) has a model card next to it to check against."""
    if isinstance(item, Ledger):
        return item, str(item.path), _VERIFIED_NO_CARD
    ledger = Ledger.load(item)
    where = str(resolve_ledger_path(item))
    if Path(item).is_dir():
        return ledger, where, _check_card(ledger, Path(item))
    return ledger, where, _VERIFIED_NO_CARD


def compose_ledgers(
    paths_or_ledgers: Sequence[Ledger | str | os.PathLike[str]],
    *,
    delta: float,
    accountants: Sequence[str] = ("pld", "rdp"),
    allow_reproducible: bool = False,  # privacy: compose runs whose noise a public seed reproduces (not a release)
) -> dict[str, Any]:
    """Compose every event of every ledger; ε at ``delta`` per accountant (the first one is the headline).

    Returns a JSON-ready dict: ``epsilon`` and ``accountant`` (the first accountant's), ``delta``,
    ``per_accountant`` (ε and error information of each), ``privacy_unit``, ``group_by``, ``neighbouring``,
    ``dataset_size`` (the largest N), ``ledgers`` (each with its ``head`` and ``verified``: what was checked),
    ``events`` (what was composed) and ``warnings`` (for stderr).

    A run directory whose ``model/privtune.json`` records ``"ledger": {"ledger_id", "seq", "hash"}`` (and
    optionally ``"event"``) must agree with it: a ledger changed after its model was released is refused.
    """
    delta = check_delta(delta)
    if isinstance(paths_or_ledgers, (str, os.PathLike, Ledger)):
        paths_or_ledgers = [paths_or_ledgers]
    if not paths_or_ledgers:
        raise UserError("no ledger to compose", "pass at least one run directory or ledger.json")
    names = list(accountants)
    if not names or len(set(names)) != len(names):
        raise UserError(f"accountants {names} must be a non-empty list without repeats", "use ('pld', 'rdp')")
    for name in names:
        make_accountant(name)  # refuses unknown names before any work

    loaded = [_load(item) for item in paths_or_ledgers]
    seen: dict[str, str] = {}
    for ledger, where, _ in loaded:
        if ledger.ledger_id in seen:
            raise UserError(
                f"the same ledger is given twice ({seen[ledger.ledger_id]} and {where})",
                "pass each run once; copies of a ledger count once",
            )
        seen[ledger.ledger_id] = where

    first, first_where, _ = loaded[0]
    for ledger, where, _ in loaded[1:]:
        for attr in ("neighbouring", "privacy_unit", "group_by"):
            if getattr(ledger, attr) != getattr(first, attr):
                raise UserError(
                    f"ledgers disagree on {attr}: {first_where} has {getattr(first, attr)!r}, "
                    f"{where} has {getattr(ledger, attr)!r}",
                    "only ledgers about the same privacy unit and neighbouring relation compose",
                )
    if first.neighbouring != NEIGHBOURING:
        raise UserError(
            f"ledger neighbouring relation {first.neighbouring!r} has no verified accountant here",
            f"privtune accounts under {NEIGHBOURING!r} only",
        )

    events: list[dict[str, Any]] = []
    reproducible: list[str] = []
    for ledger, where, _ in loaded:
        for entry in ledger.entries:
            if isinstance(entry.event, NonPrivateEvent):
                raise NoGuaranteeError(
                    f"no formal guarantee: {where} entry {entry.seq} ({entry.stage!r}) is a non-private release "
                    f"({entry.event.reason})",
                    "no ε can be stated for these data",
                )
            if isinstance(entry.event, ShuffledGaussianEvent):
                problem, fix = SHUFFLE_REFUSAL
                raise UserError(f"{where} entry {entry.seq} ({entry.stage!r}): {problem}", fix)
            if getattr(entry.event, "randomness", "secret") == "reproducible":
                if not allow_reproducible:
                    raise UserError(
                        f"{where} entry {entry.seq} ({entry.stage!r}) drew its sample and noise from a public seed "
                        "(privacy.reproducible): anyone with its config can recompute them, so its ε is not a guarantee",
                        "retrain without privacy.reproducible for a release, or pass --allow-reproducible to see the "
                        "number anyway",
                    )
                reproducible.append(f"{where} entry {entry.seq}")
            events.append(
                {
                    "ledger": where,
                    "seq": entry.seq,
                    "stage": entry.stage,
                    "run_id": entry.run_id,
                    "status": entry.status,
                    "sampler": entry.sampler,
                    "event": entry.event.to_dict(),
                }
            )

    per_accountant: dict[str, Any] = {}
    for name in names:
        accountant = make_accountant(name)
        for ledger, _, _ in loaded:
            accountant.extend(ledger.events())
        per_accountant[name] = accountant.report(delta)

    dataset_size = max(ledger.dataset_size for ledger, _, _ in loaded)
    warnings: list[str] = []
    if delta * dataset_size >= 1.0:
        warnings.append(
            f"δ={delta:g} is not below 1/N = {1.0 / dataset_size:.3g} (N={dataset_size}): a mechanism that publishes "
            "one random record outright satisfies (0, 1/N)-DP, so δ should be far smaller than 1/N (e.g. ≤ 0.1/N)"
        )
    if reproducible:
        warnings.append(
            f"NOT A GUARANTEE: {', '.join(reproducible)} drew the sample and the noise from a public seed; the ε below "
            "holds only against someone who does not know the run's config"
        )
    open_runs = [e for e in events if e["status"] == "open"]
    if open_runs:
        warnings.append(
            f"{len(open_runs)} training run(s) are still open (in progress or interrupted): "
            "their step counts may still grow"
        )
    headline = names[0]
    return {
        "epsilon": per_accountant[headline]["epsilon"],
        "delta": delta,
        "accountant": headline,
        "per_accountant": per_accountant,
        "neighbouring": first.neighbouring,
        "privacy_unit": first.privacy_unit,
        "group_by": first.group_by,
        "dataset_size": dataset_size,
        "ledgers": [
            {
                "path": where,
                "ledger_id": ledger.ledger_id,
                "privacy_unit": ledger.privacy_unit,
                "dataset_size": ledger.dataset_size,
                "dataset": ledger.header["dataset"],
                "entries": len(ledger.entries),
                "head": ledger.head,
                "verified": verified,
            }
            for ledger, where, verified in loaded
        ],
        "events": events,
        "warnings": warnings,
    }
