"""What TRL's training loop iterates under DP: Poisson logical batches, dealt to the accumulation micro-steps.

Owns: ``Share`` (one item of the loop: the micro-batches of one optimizer step that one ``training_step`` call
is handed) and ``PoissonShares`` (the "dataloader" that replaces TRL's sampler and collator under DP).

One optimizer step k = one Poisson sample of units (``PoissonBatchSampler.batch(k)``: each unit in with
probability q, packed into micro-batches of ``micro_batch_size`` rows). Transformers' loop calls
``training_step`` ``gradient_accumulation_steps`` (G) times per optimizer step, so step k's micro-batches are
cut into G consecutive shares (some may be empty) and yielded in order; the trainer runs the one DP step on the
last share of the step (``DPSFTTrainer.training_step``). ``len`` is T·G, so the loop's own count of optimizer
steps is T, the plan's T.

Sensitive: which rows each step sampled (the shares carry row indices, never text); the sampler's seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from privtune.trainers.dp.sampling import MicroBatch, PoissonBatchSampler


@dataclass(frozen=True)
class Share:
    """The micro-batches of optimizer step ``step`` handed to its ``index``-th of ``of`` training_step calls."""

    step: int
    index: int
    of: int
    micro_batches: tuple[MicroBatch, ...]

    @property
    def last(self) -> bool:
        return self.index == self.of - 1


class PoissonShares:
    """T·G items ``{"dp_share": Share}``: step k's Poisson micro-batches, cut into G consecutive shares.

    An item is a dict so that the loop's bookkeeping (``"labels" in batch``, token counts) finds nothing to
    count and leaves it alone: the loss is normalised by the DP step, never by TRL.
    """

    def __init__(self, sampler: PoissonBatchSampler, *, accumulation: int):
        if accumulation < 1:
            raise ValueError(f"gradient accumulation must be >= 1, got {accumulation}")
        self.sampler, self.accumulation = sampler, accumulation

    def __len__(self) -> int:
        return self.sampler.steps * self.accumulation

    def shares(self, step: int) -> list[Share]:
        micro = [m.without_padding() for m in self.sampler.batch(step).micro_batches]
        g = self.accumulation
        base, extra = divmod(len(micro), g)  # the first `extra` shares take one micro-batch more
        out, start = [], 0
        for i in range(g):
            size = base + (1 if i < extra else 0)
            out.append(Share(step=step, index=i, of=g, micro_batches=tuple(micro[start:start + size])))
            start += size
        return out

    def __iter__(self) -> Iterator[dict]:
        for step in range(self.sampler.steps):
            for share in self.shares(step):
                yield {"dp_share": share}
