"""privtune: fine-tune language models on private data, account for privacy, measure memorization.

The core lives here and imports no stage: ``errors`` (UserError, Preempted), ``progress`` (bars on a terminal,
periodic lines in logs, rank 0 only), ``atomic`` (atomic writes and staged directories), ``fingerprint``
(content digests and the stage records every stage folder holds), ``process`` (rank, world size, device, the
process group) and ``configbase`` (the strict base of every config section). Each other top-level folder of the
repository is one subpackage, reached through a relative symlink ``privtune/<stage> -> ../<stage>``:

- ``privtune.launch``     CLI, typed config, run directories and stages
- ``privtune.corpora``    datasets with gold sensitive spans, tokenization with per-token sensitive masks
- ``privtune.trainers``   model loading, the training loop and the DP engine
- ``privtune.accounting`` accountants, calibration, the privacy ledger
- ``privtune.eval``       memorization grid, exposure, membership inference, reports
- ``privtune.synth``      Paper B's DP synthetic-instruction pipeline
- ``privtune.cluster``    Slurm rendering and submission
"""

__version__ = "0.1.0"
