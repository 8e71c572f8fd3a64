"""privtune.trainers: model loading, the fine-tuning recipe, and the DP engine.

- ``models``      registry: the embedded smollm2-135m (from its PyPI-shipped GGUF), tiny test families, local paths
- ``lora``        which parameters each method trains (peft LoRA for lora / dp-lora)
- ``plan``        the DP plan (q, sigma, C, T, delta, epsilon) resolved and printed before training
- ``batches``     collation and the shuffled fixed-size batches of the non-private methods
- ``recipe``      one training loop for full | lora | dp | dp-lora: setup / train / save_checkpoint / cleanup
- ``checkpoint``  resumable checkpoints (weights or adapter, optimizer, RNG of every rank, ledger state)
- ``output``      the released model dir with its model card and privtune.json
- ``memory``      the peak-memory meter behind efficiency.json
- ``model_ids``   hub ids for released outputs, digests of a model's files (stage records key on them)
- ``train_log``   per-step training curves (JSONL, TensorBoard)
- ``sft/``        SFT through TRL (full, lora, dp, dp-lora); DP via the same DP step
- ``dp/``         per-unit clipping with one backward, Poisson sampling, noise (privacy-critical)

Privacy unit: one example, or one user (``privacy.unit: group``). Sensitive: the training data and which units
each step sampled.
"""

import warnings

# peft (0.21) still reads transformers' deprecated `is_gradient_checkpointing` when wrapping a model; the warning
# is about peft's code, not the user's, and would otherwise interrupt every LoRA run's progress output.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
