"""privtune.accounting: privacy accounting for everything a run releases.

Owns: privacy events (``events``), the PLD and RDP accountants (``accountants``), noise calibration
(``calibrate``), the per-run privacy ledger ``RUN/ledger.json`` (``ledger``), composition of ledgers into one
(ε, δ) (``budget``) and the bodies of ``privtune budget`` / ``privtune budget calibrate`` (``cli``).

Privacy unit: one example by default, or one user/group/DPO pair/RL prompt group as the ledger header states;
neighbouring relation: add/remove one unit.

Sensitive: all of it. An ε printed by privtune comes from here and is an upper bound from a verified accountant
(dp_accounting's PLD, pessimistic rounding, by default). What cannot be verified is refused: fixed-size shuffled
batches, non-private releases, ledgers about different units. docs/privacy-ledger.md explains the rules.
"""

from privtune.accounting.accountants import (
    NEIGHBOURING,
    RDP_ORDERS,
    Accountant,
    NoGuaranteeError,
    PLDAccountant,
    RDPAccountant,
    auto_discretization,
    make_accountant,
)
from privtune.accounting.budget import compose_ledgers
from privtune.accounting.calibrate import Calibration, calibrate, calibrate_noise, compute_epsilon
from privtune.accounting.events import (
    Event,
    GaussianEvent,
    NonPrivateEvent,
    PoissonGaussianEvent,
    ShuffledGaussianEvent,
    event_from_dict,
)
from privtune.accounting.ledger import Ledger, LedgerEntry, LedgerHeader, new_run_id, resolve_ledger_path

__all__ = [
    "NEIGHBOURING",
    "RDP_ORDERS",
    "Accountant",
    "Calibration",
    "Event",
    "GaussianEvent",
    "Ledger",
    "LedgerEntry",
    "LedgerHeader",
    "NoGuaranteeError",
    "NonPrivateEvent",
    "PLDAccountant",
    "PoissonGaussianEvent",
    "RDPAccountant",
    "ShuffledGaussianEvent",
    "auto_discretization",
    "calibrate",
    "calibrate_noise",
    "compose_ledgers",
    "compute_epsilon",
    "event_from_dict",
    "make_accountant",
    "new_run_id",
    "resolve_ledger_path",
]
