"""SFT through TRL's ``SFTTrainer`` on prompt/completion data: full, lora, dp, dp-lora.

- ``trainer``  ``DPSFTTrainer``: dp / dp-lora inside TRL's loop — Poisson batches instead of TRL's sampler, privtune's
  one ``DPStep`` per optimizer step in ``training_step``, the ledger counting optimizer steps; refusals of what DP
  cannot honour (packing, padding-free, ...).
- ``shares``   ``PoissonShares``: the Poisson logical batches dealt to the loop's accumulation calls.
- ``run``      ``sft_args`` / ``build_sft_trainer`` / ``run_sft``: from a privtune run config to a released model dir
  (full / lora run TRL's own ``SFTTrainer``).

Importing this package does not import TRL; its modules do.
"""
