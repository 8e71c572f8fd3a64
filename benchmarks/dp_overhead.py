"""DP overhead benchmark (issue 5): step time and peak memory of privtune's DP engine against non-DP training
and against Opacus 1.6, on the embedded model, in one run.

    python benchmarks/dp_overhead.py                         # defaults: batch 8 x 128 tokens, CPU / CUDA auto
    python benchmarks/dp_overhead.py --configs full,dp --steps 2 --json
    python benchmarks/dp_overhead.py --render benchmarks/dp_overhead.json   # re-render RESULTS.md only

Configurations:

- ``full`` / ``lora``: non-DP fine-tuning exactly as ``FineTuneRecipe._plain_step`` does it (forward, mean of the
  per-example losses, backward, AdamW step). LoRA: peft r=8, alpha=16, all-linear (privtune's defaults).
- ``dp`` / ``dp-lora``: privtune's DP step as ``FineTuneRecipe._dp_step`` does it (``DPEngine`` flat clipping, the
  whole batch as ONE micro-batch, reproducible Gaussian noise, ``normalize`` by the batch size, AdamW step).
- ``opacus-hooks`` / ``opacus-hooks-lora``: Opacus ``PrivacyEngine.make_private(grad_sample_mode="hooks")``
  (per-sample gradients instantiated, ``DPOptimizer``), same batch, loss, C, sigma and optimizer.
- ``opacus-ghost`` / ``opacus-ghost-lora``: ``make_private(grad_sample_mode="ghost")`` (two backward passes; the
  criterion is called with the flattened logits and ``shape=`` the 3-D logits shape, which causal LMs need).
- ``opacus-ghost-untied`` / ``dp-untied``: the same model with its LM head untied from the embedding (a separate
  copy of the weight, +28M parameters), because Opacus ghost clipping refuses tied parameters.

How it measures: every configuration runs in its own worker process (so one's peak memory does not pollute
another's). ``--mode sequential`` (a quiet machine) runs them alone, one after the other; ``--mode interleaved`` (a
machine shared with other jobs) runs the compared configurations as a *group*: their workers are started one after
the other, then take their steps in turns (ABC, CBA, ABC, ...), so that load changes hit both sides of a ratio
alike, and ratios are taken inside a group. ``--mode auto`` (default) waits up to ``--max-wait`` s for the load
average to drop below ``--max-load`` and picks sequential if it did. Per configuration: median step time over ``--steps`` timed steps after ``--warmup`` steps,
process CPU time per step, a phase breakdown (forward / backward / DP post-processing / optimizer; privtune's and
Opacus's DP work split further by wrapping their functions in the worker process only), and peak memory over all
steps above the memory held once the model, optimizer and DP wrapper are built (CPU: resident set size sampled
every 5 ms; CUDA: ``max_memory_allocated``). The AdamW state is allocated during the first step, so it is part of
the peak.

The result table goes to stdout (rich) and to ``--out`` (default benchmarks/RESULTS.md), between the markers
``<!-- dp_overhead:start -->`` and ``<!-- dp_overhead:end -->`` (other sections are left untouched), with the raw
numbers in benchmarks/dp_overhead.json and the hand-written analysis of benchmarks/dp_overhead_notes.md appended.
Opacus is used here only, never in privtune.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK_START, MARK_END = "<!-- dp_overhead:start -->", "<!-- dp_overhead:end -->"

# name -> (method, implementation, untied)
CONFIGS: dict[str, tuple[str, str, bool]] = {
    "full": ("full", "plain", False),
    "dp": ("full", "privtune", False),
    "lora": ("lora", "plain", False),
    "dp-lora": ("lora", "privtune", False),
    "opacus-hooks": ("full", "opacus-hooks", False),
    "opacus-ghost": ("full", "opacus-ghost", False),
    "opacus-ghost-untied": ("full", "opacus-ghost", True),
    "dp-untied": ("full", "privtune", True),
    "opacus-hooks-lora": ("lora", "opacus-hooks", False),
    "opacus-ghost-lora": ("lora", "opacus-ghost", False),
}

# (numerator, denominator, target, label): the ratios the issue asks for
RATIOS = [
    ("dp", "full", 1.30, "dp / full"),
    ("dp-lora", "lora", 1.05, "dp-lora / lora"),
    ("dp", "opacus-hooks", 1.0, "privtune dp / opacus hooks"),
    ("dp", "opacus-ghost", 1.0, "privtune dp / opacus ghost"),
    ("dp-untied", "opacus-ghost-untied", 1.0, "privtune dp / opacus ghost (untied)"),
    ("dp-lora", "opacus-hooks-lora", 1.0, "privtune dp-lora / opacus hooks lora"),
    ("dp-lora", "opacus-ghost-lora", 1.0, "privtune dp-lora / opacus ghost lora"),
]


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers


class Timer:
    """Accumulates wall time per phase name for the current step (synchronising CUDA at phase boundaries), and
    remembers which top-level phase is running so that ``Memory`` can say where the peak happened."""

    def __init__(self, device):
        self.device = device
        self.current: dict[str, float] = defaultdict(float)
        self.active = "between phases"
        self.phase_peaks: dict[str, int] = defaultdict(int)  # CUDA: allocator peak per phase

    def sync(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        self.sync()
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        previous, self.active = self.active, name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.current[name] += time.perf_counter() - t0
            self.active = previous
            if self.device.type == "cuda":
                import torch

                self.phase_peaks[name] = max(self.phase_peaks[name], torch.cuda.max_memory_allocated(self.device))

    def add(self, name: str, seconds: float):
        self.current[name] += seconds

    def pop(self) -> dict[str, float]:
        out, self.current = dict(self.current), defaultdict(float)
        return out


def _wrap_timed(timer: Timer, phase: str, fn):
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timer.add(phase, time.perf_counter() - t0)

    return wrapped


class Memory:
    """Peak memory above the level when the block starts, overall and per phase of ``timer``.

    CPU: resident set size sampled every 5 ms in a thread (``PeakMemory._rss``, as privtune's ``PeakMemory`` does);
    CUDA: ``max_memory_allocated`` (per phase: reset at each phase boundary by ``Timer``).
    """

    def __init__(self, device, timer: Timer, interval: float = 0.005):
        self.device, self.timer, self.interval = device, timer, interval
        self.baseline = 0
        self.peak_delta = 0
        self.phase_peak_delta: dict[str, int] = {}
        self._peaks: dict[str, int] = defaultdict(int)
        self._stop = threading.Event()

    def _sample(self) -> None:
        from privtune.trainers.memory import PeakMemory

        while not self._stop.wait(self.interval):
            rss, phase = PeakMemory._rss(), self.timer.active
            if rss > self._peaks[phase]:
                self._peaks[phase] = rss

    def __enter__(self):
        import torch

        from privtune.trainers.memory import PeakMemory

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.baseline = PeakMemory._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peaks = dict(self.timer.phase_peaks)
        else:
            self._stop.set()
            self._thread.join()
            peaks = dict(self._peaks)
        self.phase_peak_delta = {p: max(0, v - self.baseline) for p, v in peaks.items()}
        self.peak_delta = max(self.phase_peak_delta.values(), default=0)


def machine_info(device_name: str) -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_name,
    }
    for pkg in ("transformers", "peft", "opacus"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - informational only
            info[pkg] = "not installed"
    if device_name.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        info["ram_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, AttributeError):
        pass
    return info


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Model and data


def make_batch(*, batch: int, seq: int, vocab: int, seed: int, device):
    """Random token ids of fixed length: every row is ``seq`` real tokens, all positions carry a loss."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    return ids.to(device), mask.to(device), ids.clone().to(device)


def untie_embeddings(model) -> None:
    """Give the LM head its own copy of the (tied) embedding weight."""
    import torch

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is emb.weight:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def build_model(model_name: str, method: str, *, untied: bool, device, seed: int):
    """(model, trainable parameters), prepared exactly as privtune's recipe does."""
    import torch

    from privtune.launch.config import LoraConfig
    from privtune.trainers.lora import prepare_trainable
    from privtune.trainers.models import load_model

    torch.manual_seed(seed)
    model, _ = load_model(model_name, seed=seed)
    if untied:
        untie_embeddings(model)
    # The weights may still be lazily mapped from the safetensors file: copy them into ordinary memory now, so the
    # first forward's page-ins do not count as the step's memory (a parameter tied to another is copied once).
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    model, trainable = prepare_trainable(model, method, LoraConfig())
    model.to(device)
    model.train()
    if untied:
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    return model, trainable


def _base_named_parameters(model) -> dict[int, str]:
    """id(param) -> name in the (unwrapped) model, tied parameters under their first name."""
    return {id(p): n for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------------------------
# The step implementations: each returns (step_fn(step_index), describe_dict)


def _plain(model, trainable, batch, *, autocast, timer, lr, **_):
    import torch

    from privtune.trainers.dp import per_example_loss

    ids, mask, labels = batch
    opt = torch.optim.AdamW(trainable, lr=lr)

    def step(k: int, capture=None):
        with timer.phase("forward"):
            with autocast:
                logits = model(input_ids=ids, attention_mask=mask).logits
            loss = per_example_loss(logits.float(), labels).sum() / ids.shape[0]
        with timer.phase("backward"):
            loss.backward()
        if capture is not None:
            capture.update({id(p): p.grad.detach().clone() for p in trainable})
        with timer.phase("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _privtune(model, trainable, batch, *, autocast, timer, lr, clip_norm, sigma, instrument, cleanups, **_):
    import torch

    import privtune.trainers.dp.engine as engine_mod
    from privtune.trainers.dp import DPEngine, add_noise, noise_source, normalize, per_example_loss

    ids, mask, labels = batch
    engine = DPEngine(model, trainable=trainable, clip_norm=clip_norm, clipping="flat")
    opt = torch.optim.AdamW(trainable, lr=lr)
    unit_ids = torch.arange(ids.shape[0], device=ids.device)
    if instrument:  # measurement only: time the engine's post-backward work without changing what it does
        parent = "backward/engine._consume"
        engine._consume = _wrap_timed(timer, parent, engine._consume)
        engine._terms = _wrap_timed(timer, f"{parent}/_terms", engine._terms)
        for fn in ("squared_norm", "clipped_sum"):
            original = getattr(engine_mod, fn)
            setattr(engine_mod, fn, _wrap_timed(timer, f"{parent}/{fn}", original))
            cleanups.append(lambda fn=fn, original=original: setattr(engine_mod, fn, original))
        orig_backward = torch.autograd.backward

        def timed_backward(*a, **kw):
            t0 = time.perf_counter()
            try:
                return orig_backward(*a, **kw)
            finally:
                timer.add("backward/autograd", time.perf_counter() - t0)

        engine_mod.torch = _TorchProxy(torch, backward=timed_backward)
        cleanups.append(lambda: setattr(engine_mod, "torch", torch))

    def step(k: int, capture=None):
        with engine.micro_batch(unit_ids):
            with timer.phase("forward"):
                with autocast:
                    logits = model(input_ids=ids, attention_mask=mask).logits
                loss = per_example_loss(logits.float(), labels)
            with timer.phase("backward"):  # autograd (activation grads only) + the engine's clipping
                engine.backward(loss)
        with timer.phase("dp post"):  # pop the clipped sum, noise, normalize, set_grads
            clipped = engine.pop_clipped_sum().grads
            clipped = add_noise(clipped, noise_multiplier=sigma, clip_norm=clip_norm,
                                generator=noise_source(seed=0, step=k, rank=0, secure=False))
            engine.set_grads(normalize(clipped, expected_batch_size=ids.shape[0]))
            del clipped
        if capture is not None:
            capture.update({id(p): p.grad.detach().clone() for p in trainable})
        with timer.phase("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.mean())

    return step


class _TorchProxy:
    """``torch`` as seen from engine.py, with ``torch.autograd.backward`` timed (measurement only)."""

    def __init__(self, torch_mod, *, backward):
        self._torch = torch_mod
        self.autograd = _AutogradProxy(torch_mod.autograd, backward)

    def __getattr__(self, name):
        return getattr(self._torch, name)


class _AutogradProxy:
    def __init__(self, autograd, backward):
        self._autograd, self.backward = autograd, backward

    def __getattr__(self, name):
        return getattr(self._autograd, name)


def _opacus(model, trainable, batch, *, autocast, timer, lr, clip_norm, sigma, mode, instrument, **_):
    import warnings

    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from privtune.trainers.dp import per_example_loss

    ids, mask, labels = batch
    b = ids.shape[0]
    opt = torch.optim.AdamW(trainable, lr=lr)
    # make_private needs a loader; ours holds the same rows, one batch of b (so expected_batch_size = b).
    loader = DataLoader(TensorDataset(ids.cpu(), mask.cpu(), labels.cpu()), batch_size=b)
    engine = PrivacyEngine(accountant="rdp")
    g = torch.Generator(device=ids.device).manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "hooks":
            gsm, dpopt, _ = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma, max_grad_norm=clip_norm,
                poisson_sampling=False, grad_sample_mode="hooks", loss_reduction="mean", noise_generator=g)
            criterion = None
        else:
            gsm, dpopt, criterion, _ = engine.make_private(
                module=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(), data_loader=loader,
                noise_multiplier=sigma, max_grad_norm=clip_norm, poisson_sampling=False, grad_sample_mode="ghost",
                loss_reduction="mean", noise_generator=g)
    assert dpopt.expected_batch_size == b, dpopt.expected_batch_size
    if instrument:  # instance attributes shadow the methods pre_step calls (measurement only)
        for fn in ("clip_and_accumulate", "add_noise", "scale_grad"):
            setattr(dpopt, fn, _wrap_timed(timer, f"dp post/{fn}", getattr(dpopt, fn)))

    def step(k: int, capture=None):
        with timer.phase("forward"):
            with autocast:
                logits = gsm(input_ids=ids, attention_mask=mask).logits
            if criterion is None:  # mean over rows of the per-example mean token loss (loss_reduction="mean")
                loss = per_example_loss(logits.float(), labels).mean()
            else:  # ghost: per-token CE on the flattened logits, shape= the 3-D logits shape -> per-row means
                shift = logits[:, :-1, :].float()
                loss = criterion(shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1), shape=shift.shape)
        with timer.phase("backward"):  # hooks: + per-sample grads; ghost: two passes (norms, then clipped grads)
            loss.backward()
        with timer.phase("dp post"):  # DPOptimizer.pre_step: clip_and_accumulate, add_noise, scale_grad
            ok = dpopt.pre_step()
        if capture is not None:
            capture.update({id(p): p.grad.detach().clone() for p in trainable})
        with timer.phase("optimizer"):
            if ok:
                dpopt.original_optimizer.step()
            dpopt.zero_grad(set_to_none=True)
        return float(loss.detach()) if criterion is None else float(loss.item())

    return step


# ----------------------------------------------------------------------------------------------------------------
# One configuration in this process: build once, then step on demand


def _error_text(err: BaseException) -> str:
    return re.sub(r"\s+", " ", f"{type(err).__name__}: {err}".strip())[:600]


class Session:
    """One configuration, built in this process; ``step()`` runs and times one training step.

    Never raises: a failure (while building or stepping) is recorded in ``self.error`` and ends the session.
    """

    def __init__(self, name: str, *, model_name: str = "smollm2-135m", batch: int = 8, seq: int = 128,
                 device: str = "auto", bf16: bool = False, seed: int = 0, clip_norm: float = 1.0, sigma: float = 1.0,
                 lr: float = 1e-5, threads: int | None = None, instrument: bool = True):
        import torch

        if name not in CONFIGS:
            raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
        if threads:
            torch.set_num_threads(threads)
        method, impl, untied = CONFIGS[name]
        self.dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.batch, self.seq = batch, seq
        self.info: dict = {"name": name, "method": method, "impl": impl, "untied": untied, "device": str(self.dev)}
        self.error: str | None = None
        self.traceback = ""
        self.records: list[dict] = []
        self.cleanups: list = []
        self.memory: Memory | None = None
        self.names: dict[int, str] = {}
        self.timer = Timer(self.dev)
        try:
            model, trainable = build_model(model_name, method, untied=untied, device=self.dev, seed=seed)
            self.info["trainable_params"] = sum(p.numel() for p in trainable)
            vocab = model.get_input_embeddings().num_embeddings
            data = make_batch(batch=batch, seq=seq, vocab=vocab, seed=seed + 1, device=self.dev)
            autocast = torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=bf16)
            kwargs = dict(autocast=autocast, timer=self.timer, lr=lr, clip_norm=clip_norm, sigma=sigma,
                          instrument=instrument, cleanups=self.cleanups)
            if impl == "plain":
                self._step = _plain(model, trainable, data, **kwargs)
            elif impl == "privtune":
                self._step = _privtune(model, trainable, data, **kwargs)
            else:
                self._step = _opacus(model, trainable, data, mode=impl.split("-")[1], **kwargs)
            self.names = _base_named_parameters(model)
        except Exception as err:  # noqa: BLE001 - a configuration that fails is a result, recorded with its error
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        self.error, self.traceback = _error_text(err), traceback.format_exc()[-3000:]
        self._undo()

    def _undo(self) -> None:
        for undo in reversed(self.cleanups):  # instrumentation is measurement only: leave privtune as it was
            undo()
        self.cleanups.clear()

    def step(self, capture: dict | None = None) -> dict | None:
        """One timed step: {"step_s", "cpu_s", "phases", "loss", "load"}; None once the session has failed."""
        if self.error is not None:
            return None
        if self.memory is None:  # the baseline: model, optimizer and DP wrapper built, no step run yet
            self.memory = Memory(self.dev, self.timer).__enter__()
        try:
            self.timer.sync()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = self._step(len(self.records), capture=capture)
            self.timer.sync()
            record = {"step_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                      "phases": self.timer.pop(), "loss": loss, "load": load_average()}
        except Exception as err:  # noqa: BLE001
            self._fail(err)
            return None
        self.records.append(record)
        return record

    def finish(self, warmup: int) -> dict:
        """The configuration's result: medians over the records after ``warmup``, peak memory, or the error."""
        if self.memory is not None:
            self.memory.__exit__(None, None, None)
        self._undo()
        result = dict(self.info, status="ok" if self.error is None else "error")
        if self.error is not None:
            result.update(error=self.error, traceback=self.traceback)
            return result
        timed = self.records[warmup:]
        times = [r["step_s"] for r in timed]
        losses = [r["loss"] for r in self.records]
        result.update(
            step_s=statistics.median(times) if times else float("nan"),
            step_s_all=[round(t, 4) for t in times],
            cpu_s=statistics.median(r["cpu_s"] for r in timed) if timed else float("nan"),
            tokens_per_s=(self.batch * self.seq / statistics.median(times)) if times else float("nan"),
            peak_mem_bytes=self.memory.peak_delta if self.memory else 0,
            phase_peak_mem_bytes=self.memory.phase_peak_delta if self.memory else {},
            baseline_mem_bytes=self.memory.baseline if self.memory else 0,
            phases={p: statistics.median(r["phases"].get(p, 0.0) for r in timed) for p in
                    (timed[0]["phases"] if timed else {})},
            losses=losses,
            finite=all(math.isfinite(x) for x in losses) and all(math.isfinite(t) for t in times),
            load_during=[round(r["load"], 2) for r in timed],
        )
        return result


def run_config(name: str, *, steps: int = 3, warmup: int = 1, capture_update: bool = False, **kwargs) -> dict:
    """Build one configuration in this process and run ``warmup + steps`` steps; return its result (never raises).

    ``kwargs`` go to ``Session`` (model_name, batch, seq, device, bf16, seed, clip_norm, sigma, lr, threads,
    instrument). ``capture_update=True`` also returns ``update``: {parameter name: the gradient handed to the
    optimizer in the first step} (for cross-checks; not JSON-serialisable).
    """
    session = Session(name, **kwargs)
    update: dict = {}
    for k in range(warmup + steps):
        if session.step(capture=update if (capture_update and k == 0) else None) is None:
            break
    result = session.finish(warmup)
    if capture_update and result["status"] == "ok":
        result["update"] = {session.names[i]: g for i, g in update.items()}
    return result


# ----------------------------------------------------------------------------------------------------------------
# Driver: one worker process per configuration; the configurations of a group take their steps in turns

PROTOCOL = "@@dp_overhead@@ "  # prefix of the worker's protocol lines on stdout (libraries may print too)


def serve(name: str, args) -> int:
    """Worker: build ``name``, say "ready", then answer "step" / "finish" commands read from stdin."""
    session = Session(name, model_name=args.model, batch=args.batch, seq=args.seq, device=args.device,
                      bf16=args.bf16, threads=args.threads, clip_norm=args.clip_norm, sigma=args.sigma)

    def say(obj):
        sys.stdout.write(PROTOCOL + json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": session.error is None, "error": session.error})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            record = session.step()
            say({"ok": record is not None, "record": record, "error": session.error})
        elif command == "finish":
            say({"result": session.finish(args.warmup)})
            return 0
    return 0


class Worker:
    """The driver's handle on one worker process."""

    def __init__(self, name: str, args):
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", name, "--model", args.model,
               "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
               "--device", args.device, "--threads", str(args.threads), "--clip-norm", str(args.clip_norm),
               "--sigma", str(args.sigma)] + (["--bf16"] if args.bf16 else [])
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        if args.omp_wait_policy not in ("default", "auto"):
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1)
        self.failure: str | None = None
        hello = self._read()
        if hello is not None and not hello.get("ready"):
            self.failure = hello.get("error") or "setup failed"

    def _read(self) -> dict | None:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        code = self.proc.wait()
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if code in (-9, 137):
            why += " (likely out of memory)"
        self.stderr.seek(0)
        tail = re.sub(r"\s+", " ", self.stderr.read()[-400:])
        self.failure = f"worker {why}: {tail}"
        return None

    def command(self, what: str) -> dict | None:
        if self.proc.poll() is not None:
            return self._read()
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._read()

    def step(self) -> bool:
        if self.failure is not None:
            return False
        reply = self.command("step")
        if reply is None or not reply.get("ok"):
            if reply is not None:
                self.failure = reply.get("error")
            return False
        return True

    def finish(self) -> dict:
        reply = self.command("finish") if self.proc.poll() is None else None
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()
        self.stderr.close()
        if reply is not None and "result" in reply:
            return reply["result"]
        return {"name": self.name, "status": "error", "error": self.failure or "worker ended without a result"}


def run_group(names: list[str], args, log) -> dict:
    """Start one worker per configuration (one after another), then let them step in turns: ABC, CBA, ABC, ...

    Interleaving makes the configurations of a group see the same machine load, so their ratios hold even when
    other jobs come and go (a machine shared with other engineers' tests).
    """
    load_start, t0 = load_average(), time.time()
    workers = []
    for name in names:
        w = Worker(name, args)
        if w.failure:
            log(f"{name}: FAILED during setup: {w.failure}")
        workers.append(w)
    for k in range(args.warmup + args.steps):
        for w in (workers if k % 2 == 0 else workers[::-1]):
            if w.failure is None and not w.step():
                log(f"{w.name}: FAILED at step {k}: {w.failure}")
        live = [w.name for w in workers if w.failure is None]
        if live:
            log(f"  step {k + 1}/{args.warmup + args.steps} of {', '.join(live)} (load {load_average():.2f})")
    results = {w.name: w.finish() for w in workers}
    return {"configs": names, "results": results, "load_start": load_start, "load_end": load_average(),
            "wall_s": time.time() - t0}


def wait_for_quiet(max_load: float, max_wait: float, log) -> tuple[float, float]:
    """Wait (up to max_wait s) until the 1-minute load average is below max_load; returns (load, waited)."""
    t0 = time.time()
    load = load_average()
    while load >= max_load and time.time() - t0 < max_wait:
        log(f"load average {load:.2f} >= {max_load}: waiting ({time.time() - t0:.0f}/{max_wait:.0f} s)")
        time.sleep(min(30.0, max(1.0, max_wait - (time.time() - t0))))
        load = load_average()
    return load, time.time() - t0


def compute_ratios(groups: list[dict]) -> list[dict]:
    """The issue's ratios: from a group that ran both configurations (interleaved) if there is one, else from the
    first result of each (sequential runs)."""
    rows = []
    for num, den, target, label in RATIOS:
        group = next((g for g in groups if num in g["results"] and den in g["results"]), None)
        if group is not None:
            a, b, where = group["results"][num], group["results"][den], str(groups.index(group) + 1)
        else:
            ia = next((i for i, g in enumerate(groups) if num in g["results"]), None)
            ib = next((i for i, g in enumerate(groups) if den in g["results"]), None)
            if ia is None or ib is None:
                continue
            a, b, where = groups[ia]["results"][num], groups[ib]["results"][den], f"{ia + 1}/{ib + 1}"
        row = {"label": label, "num": num, "den": den, "target": target, "group": where}
        if a.get("status") == "ok" and b.get("status") == "ok":
            row["time"] = a["step_s"] / b["step_s"]
            row["cpu"] = a["cpu_s"] / b["cpu_s"]
            row["memory"] = a["peak_mem_bytes"] / max(b["peak_mem_bytes"], 1)
            row["meets"] = row["time"] <= target
        else:
            failed = [x["name"] for x in (a, b) if x.get("status") != "ok"]
            row["note"] = f"{', '.join(failed)} failed"
        rows.append(row)
    return rows


def _children(phases: dict, parent: str) -> str:
    """" [a 1.00 [b 0.50], c 0.20]" for the parts "parent/a", "parent/a/b", "parent/c" of a phase."""
    kids = [n for n in phases if n.startswith(parent + "/") and "/" not in n[len(parent) + 1:]]
    if not kids:
        return ""
    return " [" + ", ".join(f"{k[len(parent) + 1:]} {phases[k]:.2f}{_children(phases, k)}" for k in kids) + "]"


def breakdown_row(r: dict) -> dict:
    """forward | autograd backward | DP clipping outside autograd | noise etc. | optimizer | other, for one result."""
    ph, impl = r["phases"], r.get("impl", "")
    row = {"name": r["name"], "step": r["step_s"], "forward": ph.get("forward", 0.0),
           "optimizer": ph.get("optimizer", 0.0)}
    if impl == "privtune":
        row["autograd"] = ph.get("backward/autograd", float("nan"))
        row["clip"] = ph["backward"] - row["autograd"]  # engine._consume + bookkeeping
        row["post"] = ph.get("dp post", 0.0)
    elif impl.startswith("opacus"):
        row["autograd"] = ph["backward"]  # includes Opacus's hooks (per-sample grads / ghost norms)
        row["clip"] = ph.get("dp post/clip_and_accumulate", 0.0)
        row["post"] = ph.get("dp post", 0.0) - row["clip"]
    else:
        row["autograd"], row["clip"], row["post"] = ph.get("backward", 0.0), 0.0, 0.0
    row["other"] = row["step"] - sum(row[k] for k in ("forward", "autograd", "clip", "post", "optimizer"))
    return row


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _f(x, fmt="{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def results_markdown(groups: list[dict], ratios: list[dict], meta: dict) -> str:
    """The section body (without its title, which ``replace_section`` adds)."""
    m = meta["machine"]
    lines = [
        f"Command: `{meta['command']}` ({meta['wall_min']:.1f} min, finished {meta['date']})  ",
        f"Machine: {m['cpu']}, {m['cores']} cores visible, {m.get('ram_gib', '?')} GiB RAM; device `{m['device']}`"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f"; {meta['threads']} torch threads, OMP_WAIT_POLICY={meta['omp_wait_policy']}; torch {m['torch']}, "
        f"transformers {m['transformers']}, peft {m['peft']}, opacus {m['opacus']}, Python {m['python']}  ",
        f"Load average (1 min): {meta['load_before']:.2f} at the start (after waiting {meta['waited_s']:.0f} s for "
        f"< {meta['max_load']}; the benchmark's own 2 threads count about 2), per group below. Mode: "
        f"**{meta.get('mode', 'interleaved')}** — "
        + ("each configuration alone in its own process, one after the other (the machine was quiet)."
           if meta.get("mode") == "sequential" else
           "the configurations of a group take their steps in turns (ABC, CBA, ...) so that they see the same load, "
           "and ratios are taken inside a group (the machine was shared with other jobs)."),
        "",
        f"Setting: model `{meta['model']}`, batch {meta['batch']} x {meta['seq']} tokens (random token ids, fixed "
        f"length, every position carries loss), {'bf16 autocast' if meta['bf16'] else 'fp32'}, AdamW (torch "
        f"default, as the recipe), flat clipping C={meta['clip_norm']}, sigma={meta['sigma']}, one logical step = "
        f"the batch as one micro-batch, reproducible noise (`secure_rng=false`, the default). Step time: median of "
        f"{meta['steps']} timed steps after {meta['warmup']} warm-up step(s); CPU time: process CPU seconds per "
        "step (all threads). Memory: peak above the level once model, optimizer and DP wrapper are built, over all "
        "steps (so it includes the AdamW state allocated in the first step, and the gradients); CPU = resident set "
        "size sampled every 5 ms in each configuration's own process, CUDA = `max_memory_allocated`.",
        "",
        "| group | configuration | trainable params | step time (s) | CPU time (s) | tokens/s | peak memory (MiB) | "
        "status |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for i, g in enumerate(groups, 1):
        for name, r in g["results"].items():
            if r.get("status") == "ok":
                lines.append(f"| {i} | `{name}` | {r['trainable_params'] / 1e6:.2f}M | {_f(r['step_s'])} | "
                             f"{_f(r['cpu_s'])} | {_f(r['tokens_per_s'], '{:.0f}')} | {_mb(r['peak_mem_bytes'])} | ok |")
            else:
                lines.append(f"| {i} | `{name}` | | | | | | **failed**: {r.get('error', '?')} |")
    lines += ["", "Load average per group: " + "; ".join(
        f"{i}: {g['load_start']:.1f} -> {g['load_end']:.1f}" for i, g in enumerate(groups, 1)) + ".", ""]
    lines += ["Ratios (group: where the two numbers come from; the target applies to the step time):", "",
              "| ratio | group | step time | CPU time | peak memory | target (time) | met? |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for row in ratios:
        if "time" in row:
            lines.append(f"| {row['label']} | {row['group']} | {row['time']:.3f}x | {row['cpu']:.3f}x | "
                         f"{row['memory']:.2f}x | <= {row['target']:.2f}x | {'yes' if row['meets'] else '**no**'} |")
        else:
            lines.append(f"| {row['label']} | {row['group']} | — | — | — | <= {row['target']:.2f}x | "
                         f"n/a ({row['note']}) |")
    firsts: dict[str, dict] = {}
    for g in groups:
        for name, r in g["results"].items():
            if r.get("status") == "ok":
                firsts.setdefault(name, r)
    if firsts:
        lines += ["", "Breakdown (median s per step, first group each configuration ran in; each column is the median "
                  "of that phase, so a row need not add up exactly):", "",
                  "| configuration | forward | backward (autograd) | DP clipping outside autograd | noise, scale, "
                  "set grads | optimizer | other | step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in firsts.values():
            row = breakdown_row(r)
            lines.append(f"| `{row['name']}` | {row['forward']:.2f} | {row['autograd']:.2f} | {row['clip']:.2f} | "
                         f"{row['post']:.2f} | {row['optimizer']:.2f} | {row['other']:.2f} | {row['step']:.2f} |")
        lines += ["", "For privtune, *backward (autograd)* is `torch.autograd.backward` inside `engine.backward` "
                  "(activation gradients only: the weights have `requires_grad=False`) and *DP clipping* is the rest "
                  "of `engine.backward` (`_consume`: per-sample terms, norms, clip factors, and the clipped-sum "
                  "matmuls that replace autograd's weight gradients). For Opacus hooks mode the per-sample "
                  "gradients are computed inside autograd's backward hooks (so they are in *backward*) and *DP "
                  "clipping* is `clip_and_accumulate`; ghost mode's two backward passes (norms, then the clipped "
                  "gradient) are both in *backward*.", "",
                  "Phases in detail (median s; peak memory above the baseline while the phase ran; brackets: parts "
                  "of the phase, timed by wrapping privtune's / Opacus's functions in the benchmark process only):",
                  ""]
        for name, r in firsts.items():
            peaks = r.get("phase_peak_mem_bytes", {})
            parts = []
            for p in [q for q in r["phases"] if "/" not in q]:
                mem = f" / {_mb(peaks[p])} MiB" if p in peaks else ""
                parts.append(f"{p} {r['phases'][p]:.2f}{mem}{_children(r['phases'], p)}")
            lines.append(f"- `{name}` ({r['step_s']:.2f} s): {'; '.join(parts)}")
    errors = {name: r for g in groups for name, r in g["results"].items() if r.get("status") != "ok"}
    if errors:
        lines += ["", "Failures (exact errors):", ""]
        for name, r in errors.items():
            lines.append(f"- `{name}`: `{r.get('error', '?')}`")
    if meta.get("notes"):
        lines += ["", meta["notes"].strip()]
    return "\n".join(lines) + "\n"


SECTION_KEY, SECTION_NAME = "dp_overhead", "DP overhead (issue 5)"
NOTES_FILE = HERE / "dp_overhead_notes.md"  # hand-written analysis appended to the section, when present


def write_section(path: Path, body: str, *, measured: str | None = None) -> None:
    """Replace this benchmark's section of ``path`` (between the markers), keeping every other section."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_privtune_bench_results", HERE / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.replace_section(path, SECTION_KEY, SECTION_NAME, body, measured=measured)


def print_table(groups: list[dict], ratios: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    t = Table(title=SECTION_NAME)
    for col in ("group", "configuration", "params", "step s", "cpu s", "tok/s", "peak MiB", "status"):
        t.add_column(col, justify="left" if col in ("configuration", "status") else "right")
    for i, g in enumerate(groups, 1):
        for name, r in g["results"].items():
            if r.get("status") == "ok":
                t.add_row(str(i), name, f"{r['trainable_params'] / 1e6:.2f}M", _f(r["step_s"]), _f(r["cpu_s"]),
                          _f(r["tokens_per_s"], "{:.0f}"), _mb(r["peak_mem_bytes"]), "ok")
            else:
                t.add_row(str(i), name, "", "", "", "", "", f"failed: {r.get('error', '?')[:100]}")
    console.print(t)
    rt = Table(title="ratios")
    for col in ("ratio", "group", "time", "cpu", "memory", "target", "met"):
        rt.add_column(col)
    for row in ratios:
        if "time" in row:
            rt.add_row(row["label"], str(row["group"]), f"{row['time']:.3f}x", f"{row['cpu']:.3f}x",
                       f"{row['memory']:.2f}x", f"<= {row['target']:.2f}x", "yes" if row["meets"] else "NO")
        else:
            rt.add_row(row["label"], str(row["group"]), "—", "—", "—", f"<= {row['target']:.2f}x", row["note"])
    console.print(rt)


# Quiet machine: every configuration alone, one after the other (the fastest and most faithful measurement here).
SEQUENTIAL_GROUPS = "full;dp;lora;dp-lora;opacus-hooks;opacus-ghost;opacus-ghost-untied;dp-untied;opacus-hooks-lora;" \
                    "opacus-ghost-lora"
# Busy machine: the compared configurations take their steps in turns, so load changes hit both sides alike. On
# this VM interleaving itself costs time (measured: full +12 %, dp +20 % per step against running alone; the idle
# worker's memory goes cold), so it biases dp / full upwards: use it only when the machine is shared.
INTERLEAVED_GROUPS = "full,dp;lora,dp-lora;dp,opacus-hooks;opacus-ghost;dp-untied,opacus-ghost-untied;" \
                     "dp-lora,opacus-hooks-lora,opacus-ghost-lora"


def parse_groups(spec: str, only: str | None) -> list[list[str]]:
    groups = [[n.strip() for n in part.split(",") if n.strip()] for part in spec.split(";")]
    unknown = sorted({n for g in groups for n in g if n not in CONFIGS})
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    if only:
        keep = [n.strip() for n in only.split(",") if n.strip()]
        unknown = sorted(set(keep) - set(CONFIGS))
        if unknown:
            raise SystemExit(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
        filtered, placed = [], set()
        for g in ([n for n in g if n in keep] for g in groups):
            if len(g) == 1 and g[0] in placed:
                continue  # what is left of a group is a configuration that already runs elsewhere
            filtered.append(g)
            placed.update(g)
        groups = filtered + [[n] for n in keep if n not in placed]
    return [g for g in groups if g]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps (AdamW state allocation, page-ins)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward (as performance.precision=bf16)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--mode", default="auto", choices=["auto", "sequential", "interleaved"],
                    help="sequential: each configuration alone, one after the other (for a quiet machine);\n"
                         "interleaved: compared configurations take their steps in turns (for a busy machine);\n"
                         "auto (default): sequential if the load average dropped below --max-load, else interleaved")
    ap.add_argument("--groups", help="explicit ';'-separated groups of ','-separated configurations (overrides --mode);\n"
                         "a group's configurations run at the same time and step in turns")
    ap.add_argument("--configs", help="keep only these configurations (comma-separated) of --groups")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--omp-wait-policy", default="auto", choices=["auto", "PASSIVE", "ACTIVE", "default"],
                    help="OMP_WAIT_POLICY of the workers. On a busy machine spinning OpenMP threads wait for\n"
                         "descheduled peers and a 2-thread step gets several times slower (tiny-llama: 50x), which\n"
                         "PASSIVE avoids; on a quiet one PASSIVE costs ~10 %%. auto (default): PASSIVE when\n"
                         "interleaved, else the environment's setting ('default' = leave the variable as it is)")
    ap.add_argument("--clip-norm", type=float, default=1.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown file whose dp_overhead section is rewritten")
    ap.add_argument("--no-write", action="store_true", help="do not touch --out (nor the raw JSON next to it)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the section of --out from a saved raw JSON file\n"
                    "(benchmarks/dp_overhead.json is written by every run), e.g. after editing the notes file")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of tables")
    ap.add_argument("--max-load", type=float, default=2.5, help="wait for the 1-min load average to drop below this")
    ap.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for a quiet machine (then run anyway)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        meta = dict(saved["meta"], notes=NOTES_FILE.read_text() if NOTES_FILE.exists() else "")
        write_section(Path(args.out), results_markdown(saved["groups"], saved["ratios"], meta), measured=meta["date"])
        return 0
    if args.serve:  # worker process: one configuration
        return serve(args.serve, args)

    def log(msg):
        print(f"[dp_overhead] {msg}", file=sys.stderr, flush=True)

    import torch

    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    load, waited = wait_for_quiet(args.max_load, args.max_wait, log)
    if args.groups:
        mode = "explicit groups"
    else:
        mode = args.mode if args.mode != "auto" else ("sequential" if load < args.max_load else "interleaved")
    groups_spec = parse_groups(args.groups or (SEQUENTIAL_GROUPS if mode == "sequential" else INTERLEAVED_GROUPS),
                               args.configs)
    if args.omp_wait_policy == "auto":
        args.omp_wait_policy = "PASSIVE" if mode == "interleaved" else "default"
    log(f"mode: {mode}, OMP_WAIT_POLICY={args.omp_wait_policy} (load {load:.2f})")
    t0 = time.time()
    groups = []
    for i, names in enumerate(groups_spec, 1):
        log(f"group {i}/{len(groups_spec)}: {', '.join(names)} (load {load_average():.2f})")
        g = run_group(names, args, log)
        for name, r in g["results"].items():
            if r.get("status") == "ok":
                log(f"  {name}: {r['step_s']:.2f} s/step, cpu {r['cpu_s']:.2f} s, peak {_mb(r['peak_mem_bytes'])} MiB")
            else:
                log(f"  {name}: FAILED {r.get('error')}")
        groups.append(g)
    ratios = compute_ratios(groups)
    given = sys.argv[1:] if argv is None else list(argv)
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command=" ".join(["python benchmarks/dp_overhead.py", *given]), wall_min=(time.time() - t0) / 60,
                machine=machine_info(args.device), threads=args.threads, load_before=load, waited_s=waited,
                omp_wait_policy=args.omp_wait_policy, mode=mode, max_load=args.max_load, model=args.model, batch=args.batch,
                seq=args.seq, bf16=args.bf16, clip_norm=args.clip_norm, sigma=args.sigma, steps=args.steps,
                warmup=args.warmup)
    for g in groups:
        for r in g["results"].values():
            r.pop("traceback", None)
    raw = {"meta": meta, "groups": groups, "ratios": ratios}
    if args.json:
        print(json.dumps(raw, indent=2))
    else:
        print_table(groups, ratios)
    if not args.no_write:
        out = Path(args.out)
        notes = NOTES_FILE.read_text() if NOTES_FILE.exists() else ""
        write_section(out, results_markdown(groups, ratios, dict(meta, notes=notes)))
        (out.parent / "dp_overhead.json").write_text(json.dumps(raw, indent=1) + "\n")
        log(f"wrote the dp_overhead section of {out} and {out.parent / 'dp_overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
