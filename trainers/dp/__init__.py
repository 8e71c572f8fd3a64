"""The DP engine: Poisson sampling, per-unit clipping in one backward pass, Gaussian noise.

Owns the privacy-critical path of DP fine-tuning, one small module per job:

- ``sampling``  — ``PoissonBatchSampler``: Poisson-sampled logical batches, fixed-shape micro-batches, padding
  rows (unit id -1), equal micro-batch counts on every rank, per-step seeds (resume reproduces).
- ``loss``      — ``per_example_loss``: one causal-LM loss per row (what gets clipped).
- ``units``     — ``UnitLayout``: rows -> privacy units (example, or user / group: rows summed before the norm).
- ``rules``     — which rule (linear / embedding / generic torch.func) gives each trainable parameter its
  per-unit gradient; the hooks that save activations and output gradients; refusals.
- ``terms``     — per-unit gradient terms (dense, linear, embedding): squared norms, cross terms of tied
  parameters, clipped sums (ghost or instantiated).
- ``engine``    — ``DPEngine``: the micro-batch protocol, clip factors (flat or per-layer), fp32 accumulation.
- ``selfcheck`` — ``self_check``: a few sampled units recomputed with plain autograd against the engine.
- ``noise``     — ``add_noise`` (sigma * C, once per logical step; reproducible or OS-CSPRNG source) and
  ``normalize`` (by the expected batch size q * N).

Sensitive: everything between a micro-batch's forward and ``add_noise`` is a function of private examples
and stays inside these modules; the sampled unit set is secret too.
"""

from .engine import CLIPPINGS, LINEAR_STRATEGIES, ClippedSum, DPEngine
from .errors import DPInvariantError, DPRefusal
from .loss import per_example_loss
from .noise import CounterNoise, NoiseSource, OsNoise, Piece, add_noise, noise_source, normalize, whole
from .sampling import LogicalBatch, MicroBatch, PoissonBatchSampler, secret_seed
from .units import UnitLayout

__all__ = [
    "CLIPPINGS",
    "LINEAR_STRATEGIES",
    "ClippedSum",
    "CounterNoise",
    "DPEngine",
    "DPInvariantError",
    "DPRefusal",
    "LogicalBatch",
    "MicroBatch",
    "NoiseSource",
    "OsNoise",
    "PoissonBatchSampler",
    "UnitLayout",
    "Piece",
    "add_noise",
    "whole",
    "noise_source",
    "normalize",
    "per_example_loss",
    "secret_seed",
]
