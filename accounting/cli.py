"""``privtune budget`` and ``privtune budget calibrate``: the command bodies (argparse wiring lives in launch).

Owns: printing. ``budget_command`` composes ledgers (``budget.compose_ledgers``) and ``calibrate_command`` finds σ
(``calibrate.calibrate``); each prints a table (rich) or, with ``as_json``, one JSON object on stdout. Warnings go
to stderr. Errors a user can cause are raised as ``UserError`` for the CLI to print as one line and exit 2.

Sensitive: the printed ε is exactly the accountant's upper bound (never rounded down: the table rounds up in the
last printed digit); a calibrated σ is printed with its ε, which never exceeds the target. Each ledger is shown
with its head hash and what was verified (its hash chain; its model card where the run has one), so a reader can
compare the hash with the one recorded at release.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from privtune.accounting.accountants import ACCOUNTANTS, make_accountant
from privtune.accounting.budget import compose_ledgers
from privtune.accounting.calibrate import calibrate
from privtune.accounting.events import PoissonGaussianEvent

__all__ = ["budget_command", "calibrate_command"]


def _up(value: float, digits: int = 4) -> str:
    """ε rounded *up* to ``digits`` decimals, so a printed ε is never below the certified one."""
    scale = 10**digits
    return f"{math.ceil(value * scale - 1e-9) / scale:.{digits}f}"


def _up_within(value: float, target: float, digits: int = 6) -> str:
    """Like ``_up``, but never printed above ``target`` when ``value`` ≤ ``target`` (then ``target`` is the bound)."""
    text = _up(value, digits)
    return text if float(text) <= target else f"{target:.{digits}f}"


def _warn(messages: list[str]) -> None:
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)


def _mechanism(event: dict[str, Any]) -> str:
    kind = event["type"]
    if kind == "poisson_gaussian":
        return f"DP-SGD q={event['sample_rate']:.6g} σ={event['noise_multiplier']:.6g} T={event['steps']}"
    if kind == "gaussian":
        return (
            f"Gaussian std={event['std']:.6g} sensitivity={event['sensitivity']:.6g} "
            f"(σ={event['noise_multiplier']:.6g}) ×{event['count']}"
        )
    return json.dumps(event)


def _error_text(report: dict[str, Any]) -> str:
    if report["accountant"] == "pld" and "value_discretization_interval" in report:
        return (
            f"upper bound (grid {report['value_discretization_interval']:.3g}; "
            f"grid {report['finer_value_discretization_interval']:.3g} gives {_up(report['finer_epsilon'])})"
        )
    if report["accountant"] == "rdp" and "optimal_order" in report:
        edge = ", at the edge of the order list" if report["order_at_edge"] else ""
        return f"upper bound (optimal order {report['optimal_order']:g}{edge})"
    return str(report.get("bound", ""))


def budget_command(paths: list[str], *, delta: float, as_json: bool, allow_reproducible: bool = False) -> int:
    """Compose the ledgers at ``paths`` (run dirs or ledger files) and print ε at ``delta``. Returns 0."""
    result = compose_ledgers(paths, delta=delta, allow_reproducible=allow_reproducible)
    _warn(result["warnings"])
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    console = Console(file=sys.stdout)
    console.print(
        f"[bold]Privacy budget[/bold]: {len(result['ledgers'])} ledger(s), unit {result['privacy_unit']}"
        + (f" (group_by {result['group_by']})" if result["group_by"] else "")
        + f", {result['neighbouring'].replace('_', '/')} adjacency, N = {result['dataset_size']}"
    )
    index = {}
    for i, ledger in enumerate(result["ledgers"], start=1):
        index[ledger["path"]] = str(i)
        dataset = f", dataset {ledger['dataset']}" if ledger["dataset"] else ""
        # soft_wrap: a path or hash broken across lines cannot be copied or compared with a model card's.
        console.print(
            f"  [{i}] {ledger['path']} (N = {ledger['dataset_size']}{dataset})",
            highlight=False,
            soft_wrap=True,
        )
        head = ledger["head"]
        console.print(
            f"      head {head['hash'][:12]} at entry {head['seq']}; verified: {ledger['verified']}",
            highlight=False,
            soft_wrap=True,
        )
    events = Table(title="Releases composed")
    for column in ("ledger", "seq", "stage", "sampler", "mechanism", "status"):
        events.add_column(column)
    for e in result["events"]:
        events.add_row(
            index[e["ledger"]], str(e["seq"]), e["stage"], e["sampler"], _mechanism(e["event"]), e["status"]
        )
    console.print(events)
    totals = Table(title=f"ε at δ = {result['delta']:g}")
    for column in ("accountant", "ε", "how exact"):
        totals.add_column(column)
    for name, report in result["per_accountant"].items():
        label = f"{name} (reported)" if name == result["accountant"] else f"{name} (cross-check)"
        totals.add_row(label, _up(report["epsilon"]), _error_text(report))
    console.print(totals)
    console.print(
        f"[bold]({_up(result['epsilon'])}, {result['delta']:g})-DP[/bold] for each {result['privacy_unit']} "
        f"({result['accountant']} accountant)"
    )
    return 0


def calibrate_command(
    *, epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, as_json: bool
) -> int:
    """Find σ so that ``steps`` Poisson-subsampled steps at rate ``sample_rate`` stay within (ε, δ); print it."""
    found = calibrate(
        target_epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
    )
    per_accountant: dict[str, Any] = {}
    for name in [found.accountant, *[a for a in ACCOUNTANTS if a != found.accountant]]:
        acc = make_accountant(name)
        acc.record(
            PoissonGaussianEvent(sample_rate=found.sample_rate, noise_multiplier=found.sigma, steps=steps)
        )
        per_accountant[name] = acc.report(found.delta)
    result = {**found.to_dict(), "per_accountant": per_accountant}
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    console = Console(file=sys.stdout)
    table = Table(
        title=f"Noise for ε ≤ {found.target_epsilon:g} at δ = {found.delta:g}, q = {found.sample_rate:.6g}, "
        f"T = {found.steps}"
    )
    for column in ("accountant", "ε at σ", "how exact"):
        table.add_column(column)
    for name, report in per_accountant.items():
        label = f"{name} (calibrated)" if name == found.accountant else f"{name} (cross-check)"
        shown = (
            _up_within(report["epsilon"], found.target_epsilon)
            if name == found.accountant
            else _up(report["epsilon"], 6)
        )
        table.add_row(label, shown, _error_text(report))
    console.print(table)
    console.print(
        f"[bold]σ = {found.sigma!r}[/bold] (noise multiplier): ε ≤ "
        f"{_up_within(found.epsilon, found.target_epsilon)} ≤ {found.target_epsilon:g}; "
        f"σ = {found.lower_sigma:.6g} would give ε = {found.lower_epsilon:.6g} ({found.evaluations} accountant "
        f"evaluations, {found.seconds:.2f} s)"
    )
    return 0
