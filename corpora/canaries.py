"""Secret Sharer canaries (Carlini et al. 2019): random secrets planted in the training split to measure exposure.

Owns: drawing ``count`` distinct secrets from a seeded RNG, refusing any secret that already occurs in the
corpus (a chance occurrence would let the model learn the "secret" from ordinary data and inflate exposure), and
turning each canary into ``repetitions`` identical records for the training split.

Privacy unit: each inserted copy is one example. Under user-level privacy all copies of a canary belong to one
synthetic user ``privtune:canary-<id>``, as if one person had written the secret ``repetitions`` times.
Sensitive: the secret digits (span label ``canary``); the rest of the pattern is not.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from privtune.corpora.config import CanaryConfig
from privtune.corpora.records import CANARY_LABEL, SECRET_PLACEHOLDER, Canary, Record
from privtune.errors import UserError

_DIGIT_RUN = re.compile(r"\d+")


def secrets_in_text(texts: Iterable[str], digits: int) -> set[str]:
    """Every ``digits``-long digit string that occurs anywhere in ``texts``, also inside longer numbers."""
    found: set[str] = set()
    for text in texts:
        for run in _DIGIT_RUN.findall(text):
            found.update(run[i : i + digits] for i in range(len(run) - digits + 1))
    return found


def make_canaries(cfg: CanaryConfig, *, seed: int, corpus_texts: Iterable[str]) -> list[Canary]:
    """``cfg.count`` canaries with distinct secrets, none of which occurs in ``corpus_texts``."""
    if cfg.count == 0:
        return []
    digits = cfg.secret_digits
    space = 10**digits
    forbidden = secrets_in_text(corpus_texts, digits)
    if space - len(forbidden) < cfg.count:
        raise UserError(
            f"only {space - len(forbidden)} of the {space} possible {digits}-digit canary secrets do not already "
            f"occur in the data, fewer than canaries.count={cfg.count}",
            "raise data.canaries.secret_digits or lower data.canaries.count",
        )
    rng = random.Random(f"privtune.canaries:{seed}")
    # Rejection sampling while at least half the space is free (under two draws per secret on average); else the
    # space is small (at most twice the digits in the corpus), so list the free secrets and sample from them.
    if 2 * len(forbidden) > space:
        allowed = [s for s in (f"{i:0{digits}d}" for i in range(space)) if s not in forbidden]
        secrets = rng.sample(allowed, cfg.count)
    else:
        secrets = []
        while len(secrets) < cfg.count:
            secret = f"{rng.randrange(space):0{digits}d}"
            if secret not in forbidden and secret not in secrets:
                secrets.append(secret)
    return [
        Canary(
            canary_id=i,
            text=cfg.pattern.replace(SECRET_PLACEHOLDER, secret),
            secret=secret,
            pattern=cfg.pattern,
            secret_digits=digits,
            repetitions=cfg.repetitions,
        )
        for i, secret in enumerate(secrets)
    ]


def canary_records(canaries: list[Canary], *, grouped: bool) -> list[Record]:
    """``repetitions`` copies of each canary, the secret labelled ``canary``; for the training split only."""
    records = []
    for canary in canaries:
        span = canary.secret_span()
        assert canary.text[span.start : span.end] == canary.secret and span.label == CANARY_LABEL
        for rep in range(canary.repetitions):
            records.append(
                Record(
                    id=f"canary-{canary.canary_id}-{rep}",
                    text=canary.text,
                    spans=(span,),
                    group=f"privtune:canary-{canary.canary_id}" if grouped else None,
                    canary_id=canary.canary_id,
                )
            )
    return records
