"""Two real training steps of a small random Llama on CPU; prints their measured peak memory as one JSON line.

    python tests/trainers/peak_memory_worker.py full|lora|dp|dp-lora [fp32|bf16] [sdpa|eager]

Run in a fresh process (tests/trainers/test_resources.py does). Each step is two micro-batches of 8 × 128 tokens
(gradients or the DP clipped sum accumulate across them, as in a real logical batch), then ``AdamW.step`` and
``zero_grad(set_to_none=True)``: the second step runs with the optimizer state in place, the steady state the
plan describes. The non-DP backward is ``PlainStep``'s (``(losses.sum() / batch).backward()``); DP runs
``DPStep`` with the real engine and keyed noise.

Two meters, both over a baseline taken after a warm-up step of a tiny model (kernels, thread pools, allocator
arenas are then set up) and both sampled every 0.5 ms while the model is built and the steps run:

- ``heap_bytes``: bytes malloc holds for live allocations (glibc ``mallinfo2``: ``uordblks + hblkhd``, all
  arenas). torch's CPU tensors are malloc'd, so this is the peak of live tensors plus small Python objects;
- ``rss_bytes``: ``privtune.trainers.memory.PeakMemory``'s resident set, which also keeps what glibc freed but
  did not return to the system (it over-reads a LoRA step by ~60% here), printed for comparison.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import threading

import torch

B, T, THREADS, MICRO_BATCHES, STEPS = 8, 128, 2, 2, 2
SHAPES = dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class HeapPeak:
    def __enter__(self) -> HeapPeak:
        self.baseline = self.peak = heap_in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.0005):
            self.peak = max(self.peak, heap_in_use())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, heap_in_use())


def build(config, method: str, dtype):
    from transformers import AutoModelForCausalLM

    from privtune.trainers.config import LoraConfig
    from privtune.trainers.lora import prepare_trainable

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model, trainable = prepare_trainable(model, "full" if method in ("full", "dp") else "lora", LoraConfig(r=8))
    model.train()
    return model, trainable


def train(model, trainable, method: str, batches: list[torch.Tensor], bf16: bool, steps: int) -> None:
    from privtune.trainers.dp import DPEngine, per_example_loss
    from privtune.trainers.dp.step import DPStep, MicroBatchInputs

    def loss_fn(inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=inputs).logits
        return per_example_loss(logits.float(), inputs)

    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    rows = sum(ids.shape[0] for ids in batches)
    engine = DPEngine(model, trainable=trainable, clip_norm=1.0) if method in ("dp", "dp-lora") else None
    for step in range(steps):
        if engine is not None:
            micro = [MicroBatchInputs(unit_ids=torch.arange(i * B, (i + 1) * B), inputs=ids, sequence_length=T)
                     for i, ids in enumerate(batches)]
            DPStep(engine, noise_multiplier=1.0, expected_batch_size=rows, randomness_key=1).run(micro, loss_fn,
                                                                                               step=step)
        else:
            for ids in batches:
                (loss_fn(ids).sum() / rows).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main() -> None:
    from transformers import LlamaConfig

    from privtune.trainers.memory import PeakMemory

    method = sys.argv[1]
    precision = sys.argv[2] if len(sys.argv) > 2 else "fp32"
    attention = sys.argv[3] if len(sys.argv) > 3 else "sdpa"
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.set_num_threads(THREADS)
    config = LlamaConfig(**SHAPES, attn_implementation=attention)
    warm = LlamaConfig(**{**SHAPES, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1},
                       attn_implementation=attention)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, SHAPES["vocab_size"], (B, T), generator=gen) for _ in range(MICRO_BATCHES)]
    model, trainable = build(warm, method, dtype)
    train(model, trainable, method, batches, bf16, steps=1)
    del model, trainable
    gc.collect()
    with PeakMemory(torch.device("cpu"), interval=0.0005) as rss, HeapPeak() as heap:
        rss_baseline = rss.peak
        model, trainable = build(config, method, dtype)
        train(model, trainable, method, batches, bf16, steps=STEPS)
    print(json.dumps({"method": method, "precision": precision, "attention": attention,
                      "heap_bytes": heap.peak - heap.baseline, "rss_bytes": rss.peak - rss_baseline,
                      "micro_batch_size": B, "sequence_length": T, "threads": THREADS, "config": config.to_dict()}))


if __name__ == "__main__":
    main()
