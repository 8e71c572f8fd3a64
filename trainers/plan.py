"""The DP plan: every quantity the guarantee rests on, resolved and checked before training starts.

Owns: turning the frozen ``PrivacyConfig`` and the training length into (q, σ, C, T, δ, ε), refusing what cannot
be guaranteed, and the text printed before the first step (nanoGPT-style derived quantities).

Sensitive: this is where σ is chosen. σ comes either from ``privacy.noise_multiplier`` or from calibration to
``privacy.target_epsilon`` (the printed ε is never above the target). σ = 0 under a DP method is refused unless
``privacy.non_private_debug`` is set, and then no ε is claimed anywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from privtune.errors import UserError
from privtune.trainers.config import TrainingRun


@dataclass(frozen=True)
class DPPlan:
    sample_rate: float  # q = expected batch / number of units
    noise_multiplier: float  # σ
    clip_norm: float  # C
    steps: int  # T = optimizer steps = accountant steps
    delta: float
    epsilon: float | None  # None: no formal guarantee (non-private debug run)
    num_units: int
    expected_batch_size: float
    unit: str
    clipping: str
    accountant: str
    sampler: str = "poisson"
    randomness: str = "secret"  # "reproducible": sample and noise follow from the public seed (never a release)
    secure_rng: bool = False  # every noise value from OS randomness

    @property
    def formal(self) -> bool:
        return self.epsilon is not None

    @property
    def reproducible(self) -> bool:
        return self.randomness == "reproducible"

    def randomness_line(self) -> str:
        if self.reproducible:
            return ("REPRODUCIBLE from the public seed (privacy.reproducible): anyone with the config can recompute "
                    "the sample and the noise; NOT A RELEASE")
        noise = "noise from OS randomness per value" if self.secure_rng else "noise keyed by it"
        return f"secret 128-bit key from the OS CSPRNG for the sample ({noise}); kept only in checkpoints/"

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, trainable_params: int) -> str:
        eps = f"{self.epsilon:.4f}" if self.formal else "none (non-private debug run: NO formal guarantee)"
        return "\n".join([
            "DP-SGD plan",
            f"  privacy unit      one {self.unit} (add/remove neighbours), {self.num_units} units",
            f"  sampling          Poisson, q = {self.sample_rate:.6g}  (expected batch {self.expected_batch_size:.1f})",
            f"  steps             T = {self.steps}",
            f"  clipping          {self.clipping}, C = {self.clip_norm:g}, over {trainable_params:,} trainable parameters",
            f"  noise             σ = {self.noise_multiplier:.6g}  (std σ·C = {self.noise_multiplier * self.clip_norm:.6g} on the clipped sum)",
            f"  randomness        {self.randomness_line()}",
            f"  guarantee         ε = {eps} at δ = {self.delta:.3g}  ({self.accountant.upper()} accountant)"
            + ("  — holds only while the seed is secret" if self.reproducible and self.formal else ""),
            "  rests on          every trainable parameter clipped per unit; noise added once per step;",
            "                    accountant steps = optimizer steps; the batch sample and the noise kept secret",
        ])


def default_delta(num_units: int) -> float:
    """δ well below 1/N: 1/(10 N) rounded down to one significant digit."""
    raw = 1.0 / (10.0 * num_units)
    exponent = math.floor(math.log10(raw))
    return math.floor(raw / 10**exponent) * 10**exponent


def training_steps(cfg: TrainingRun, num_units: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * num_units / cfg.train.batch_size))


def check_privacy_settings(cfg: TrainingRun) -> None:
    """The DP refusals that need only the config, so ``preflight`` runs them before any work; ``resolve_plan`` too.

    Under a DP method: a noise source is required (``target_epsilon`` or ``noise_multiplier``); σ = 0 needs
    ``non_private_debug`` (which then claims no ε); and a debug run must not name a target ε it will not claim.
    """
    if not cfg.is_dp:
        return
    privacy = cfg.privacy
    if privacy.target_epsilon is not None and privacy.non_private_debug:
        raise UserError("privacy.target_epsilon is set on a non-private debug run", "drop one of the two")
    if privacy.target_epsilon is None and privacy.noise_multiplier is None:
        raise UserError(f"train.method={cfg.train.method} needs privacy.target_epsilon or privacy.noise_multiplier",
                        "set one, e.g. privacy.target_epsilon=8")
    if privacy.noise_multiplier == 0.0 and not privacy.non_private_debug:
        raise UserError("privacy.noise_multiplier=0 gives no privacy under a DP method",
                        "set σ > 0, or privacy.non_private_debug=true for a debug run that claims no ε")


def check_batch_size(cfg: TrainingRun, num_units: int) -> None:
    """A logical batch cannot be larger than the training set (its units: examples, or users for unit=group)."""
    if cfg.train.batch_size > num_units:
        raise UserError(f"train.batch_size={cfg.train.batch_size} exceeds the {num_units} training units",
                        "lower train.batch_size or use more data")


def resolve_plan(cfg: TrainingRun, num_units: int) -> DPPlan:
    from privtune.accounting.calibrate import calibrate_noise, compute_epsilon

    privacy = cfg.privacy
    check_batch_size(cfg, num_units)
    check_privacy_settings(cfg)
    q = cfg.train.batch_size / num_units
    steps = training_steps(cfg, num_units)
    delta = privacy.delta if privacy.delta is not None else default_delta(num_units)
    common = dict(sample_rate=q, clip_norm=privacy.clip_norm, steps=steps, delta=delta, num_units=num_units,
                  expected_batch_size=q * num_units, unit=privacy.unit, clipping=privacy.clipping,
                  accountant=privacy.accountant, randomness="reproducible" if privacy.reproducible else "secret",
                  secure_rng=privacy.secure_rng)
    if privacy.target_epsilon is not None:
        sigma = calibrate_noise(target_epsilon=privacy.target_epsilon, delta=delta, sample_rate=q, steps=steps,
                                accountant=privacy.accountant)
        eps = compute_epsilon(noise_multiplier=sigma, delta=delta, sample_rate=q, steps=steps,
                              accountant=privacy.accountant)
        if eps > privacy.target_epsilon:  # calibration promises this never happens; refuse rather than over-claim
            raise UserError(f"calibrated σ={sigma} gives ε={eps} above the target {privacy.target_epsilon}",
                            "report this bug; set privacy.noise_multiplier explicitly meanwhile")
        return DPPlan(noise_multiplier=sigma, epsilon=eps, **common)
    sigma = privacy.noise_multiplier
    if sigma == 0.0 or privacy.non_private_debug:  # check_privacy_settings let σ = 0 through only for debug runs
        return DPPlan(noise_multiplier=sigma, epsilon=None, **common)
    eps = compute_epsilon(noise_multiplier=sigma, delta=delta, sample_rate=q, steps=steps,
                          accountant=privacy.accountant)
    return DPPlan(noise_multiplier=sigma, epsilon=eps, **common)
