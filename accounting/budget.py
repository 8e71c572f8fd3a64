"""The end-to-end budget: compose any set of ledgers into one (ε, δ).

Owns: ``compose_ledgers`` — the refusal rules for composition and the JSON-ready result ``privtune budget``
prints. Paper B's guarantee is one call: the generator run's ledger plus the histogram stage's ledger.

Privacy unit: the ledgers' common unit; composition of ledgers about different units, groupings or neighbouring
relations is refused (a group-level and an example-level ε do not add up to anything).

Sensitive: the ε printed to users comes from here. It is refused outright (``UserError``) when any ledger holds a
non-private release (``NoGuaranteeError``: no formal guarantee), when a release has no verified accountant
(shuffled batches), when the same ledger is given twice, or when the ledgers disagree on unit or relation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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
from privtune.launch.errors import UserError

__all__ = ["compose_ledgers"]


def _load(item: Ledger | str | os.PathLike[str]) -> tuple[Ledger, str]:
    if isinstance(item, Ledger):
        return item, str(item.path)
    return Ledger.load(item), str(resolve_ledger_path(item))


def compose_ledgers(
    paths_or_ledgers: Sequence[Ledger | str | os.PathLike[str]],
    *,
    delta: float,
    accountants: Sequence[str] = ("pld", "rdp"),
) -> dict[str, Any]:
    """Compose every event of every ledger; ε at ``delta`` per accountant (the first one is the headline).

    Returns a JSON-ready dict: ``epsilon`` and ``accountant`` (the first accountant's), ``delta``,
    ``per_accountant`` (ε and error information of each), ``privacy_unit``, ``group_by``, ``neighbouring``,
    ``dataset_size`` (the largest N), ``ledgers``, ``events`` (what was composed) and ``warnings`` (for stderr).
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
    for ledger, where in loaded:
        if ledger.ledger_id in seen:
            raise UserError(
                f"the same ledger is given twice ({seen[ledger.ledger_id]} and {where})",
                "pass each run once; copies of a ledger count once",
            )
        seen[ledger.ledger_id] = where

    first, first_where = loaded[0]
    for ledger, where in loaded[1:]:
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
    for ledger, where in loaded:
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
        for ledger, _ in loaded:
            accountant.extend(ledger.events())
        per_accountant[name] = accountant.report(delta)

    dataset_size = max(ledger.dataset_size for ledger, _ in loaded)
    warnings: list[str] = []
    if delta * dataset_size >= 1.0:
        warnings.append(
            f"δ={delta:g} is not below 1/N = {1.0 / dataset_size:.3g} (N={dataset_size}): a mechanism that publishes "
            "one random record outright satisfies (0, 1/N)-DP, so δ should be far smaller than 1/N (e.g. ≤ 0.1/N)"
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
            }
            for ledger, where in loaded
        ],
        "events": events,
        "warnings": warnings,
    }
