"""DP overhead benchmark (issue 5): step time and peak memory of privtune's DP engine against non-DP training
and against Opacus 1.6, on the embedded model, in one run.

    python benchmarks/dp_overhead.py                                  # defaults: batch 8 x 128 tokens, CPU/CUDA auto
    python benchmarks/dp_overhead.py --steps 3 --warmup 1 --configs full,dp --json

Configurations (each runs in a fresh subprocess, so one's peak memory does not pollute the next):

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

Measured per configuration: median step time over ``--steps`` timed steps after ``--warmup`` steps, a phase
breakdown (forward / backward / DP post-processing / optimizer; privtune's post-processing split further into
per-sample terms, norms, clipped sums and noise), and peak memory over all steps above the memory held once the
model, optimizer and DP wrapper are built (CPU: resident set size sampled every 5 ms, as ``PeakMemory`` does;
CUDA: ``max_memory_allocated``). The AdamW state is allocated during the first step, so it is part of the peak.

The result table goes to stdout (rich) and to ``--out`` (default benchmarks/RESULTS.md), between the markers
``<!-- dp_overhead:start -->`` and ``<!-- dp_overhead:end -->``; other sections of that file are left untouched.
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
SECTION_TITLE = "## DP overhead (issue 5)"

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
DEFAULT_ORDER = list(CONFIGS)  # pairs that are compared run next to each other (less drift from machine load)

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
        from privtune.trainers.output import PeakMemory

        while not self._stop.wait(self.interval):
            rss, phase = PeakMemory._rss(), self.timer.active
            if rss > self._peaks[phase]:
                self._peaks[phase] = rss

    def __enter__(self):
        import torch

        from privtune.trainers.output import PeakMemory

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
# One configuration, in this process


def run_config(name: str, *, model_name: str = "smollm2-135m", batch: int = 8, seq: int = 128, steps: int = 5,
               warmup: int = 2, device: str = "auto", bf16: bool = False, seed: int = 0, clip_norm: float = 1.0,
               sigma: float = 1.0, lr: float = 1e-5, threads: int | None = None, instrument: bool = True,
               capture_update: bool = False) -> dict:
    """Run ``warmup + steps`` steps of one configuration and return its measurements (never raises).

    ``capture_update=True`` also returns ``update``: {parameter name: the gradient handed to the optimizer in
    the first step} (for cross-checks; not JSON-serialisable).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    method, impl, untied = CONFIGS[name]
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    result: dict = {"name": name, "method": method, "impl": impl, "untied": untied, "device": str(dev),
                    "status": "ok", "load_start": load_average()}
    t_start = time.perf_counter()
    cleanups: list = []
    try:
        model, trainable = build_model(model_name, method, untied=untied, device=dev, seed=seed)
        result["trainable_params"] = sum(p.numel() for p in trainable)
        vocab = model.get_input_embeddings().num_embeddings
        data = make_batch(batch=batch, seq=seq, vocab=vocab, seed=seed + 1, device=dev)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
        timer = Timer(dev)
        kwargs = dict(autocast=autocast, timer=timer, lr=lr, clip_norm=clip_norm, sigma=sigma, instrument=instrument,
                      cleanups=cleanups)
        if impl == "plain":
            step = _plain(model, trainable, data, **kwargs)
        elif impl == "privtune":
            step = _privtune(model, trainable, data, **kwargs)
        else:
            step = _opacus(model, trainable, data, mode=impl.split("-")[1], **kwargs)
        names = _base_named_parameters(model)
        times, cpu_times, phases, losses, update = [], [], [], [], {}
        with Memory(dev, timer) as memory:
            for k in range(warmup + steps):
                timer.sync()
                t0, c0 = time.perf_counter(), time.process_time()
                loss = step(k, capture=update if (capture_update and k == 0) else None)
                timer.sync()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                losses.append(loss)
                per_phase = timer.pop()
                if k >= warmup:
                    times.append(dt)
                    cpu_times.append(dc)
                    phases.append(per_phase)
        result.update(
            step_s=statistics.median(times) if times else float("nan"),
            step_s_all=[round(t, 4) for t in times],
            cpu_s=statistics.median(cpu_times) if cpu_times else float("nan"),
            tokens_per_s=(batch * seq / statistics.median(times)) if times else float("nan"),
            peak_mem_bytes=memory.peak_delta,
            phase_peak_mem_bytes=memory.phase_peak_delta,
            baseline_mem_bytes=memory.baseline,
            phases={p: statistics.median(ph.get(p, 0.0) for ph in phases) for p in (phases[0] if phases else {})},
            losses=losses,
            finite=all(math.isfinite(x) for x in losses) and all(math.isfinite(t) for t in times),
        )
        if capture_update:
            result["update"] = {names[i]: g for i, g in update.items()}
    except Exception as err:  # noqa: BLE001 - a configuration that fails is a result, recorded with its error
        result["status"] = "error"
        msg = f"{type(err).__name__}: {err}".strip()
        result["error"] = re.sub(r"\s+", " ", msg)[:600]
        result["traceback"] = traceback.format_exc()[-3000:]
    finally:
        for undo in reversed(cleanups):  # instrumentation is measurement only: leave privtune as it was
            undo()
    result["load_end"] = load_average()
    result["wall_s"] = time.perf_counter() - t_start
    return result


# ----------------------------------------------------------------------------------------------------------------
# Driver: one subprocess per configuration


def _run_subprocess(name: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result-file", str(out),
               "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device, "--threads", str(args.threads),
               "--clip-norm", str(args.clip_norm), "--sigma", str(args.sigma)]
        if args.bf16:
            cmd.append("--bf16")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        if args.omp_wait_policy != "default":
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.config_timeout)
        if out.exists():
            return json.loads(out.read_text())
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        if proc.returncode in (-9, 137):
            why += " (likely out of memory)"
        tail = re.sub(r"\s+", " ", (proc.stderr or "")[-400:])
        return {"name": name, "status": "error", "error": f"worker {why}: {tail}",
                "wall_s": time.perf_counter() - t0}


def wait_for_quiet(max_load: float, max_wait: float, log) -> tuple[float, float]:
    """Wait (up to max_wait s) until the 1-minute load average is below max_load; returns (load, waited)."""
    t0 = time.time()
    load = load_average()
    while load >= max_load and time.time() - t0 < max_wait:
        log(f"load average {load:.2f} >= {max_load}: waiting ({time.time() - t0:.0f}/{max_wait:.0f} s)")
        time.sleep(min(30.0, max(1.0, max_wait - (time.time() - t0))))
        load = load_average()
    return load, time.time() - t0


def compute_ratios(results: dict[str, dict]) -> list[dict]:
    rows = []
    for num, den, target, label in RATIOS:
        a, b = results.get(num), results.get(den)
        if not a or not b:
            continue
        row = {"label": label, "num": num, "den": den, "target": target}
        if a.get("status") == "ok" and b.get("status") == "ok":
            row["time"] = a["step_s"] / b["step_s"]
            row["memory"] = a["peak_mem_bytes"] / max(b["peak_mem_bytes"], 1)
            row["cpu"] = a["cpu_s"] / b["cpu_s"] if a.get("cpu_s") and b.get("cpu_s") else float("nan")
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


def breakdown_rows(results: dict[str, dict]) -> list[dict]:
    """Per configuration: forward | autograd backward | DP clipping outside autograd | DP post | optimizer."""
    rows = []
    for name, r in results.items():
        if r.get("status") != "ok":
            continue
        ph, impl = r["phases"], r.get("impl", "")
        row = {"name": name, "step": r["step_s"], "forward": ph.get("forward", 0.0), "optimizer": ph.get("optimizer", 0.0)}
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
        rows.append(row)
    return rows


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def results_markdown(results: dict[str, dict], ratios: list[dict], meta: dict) -> str:
    lines = [SECTION_TITLE, ""]
    lines += [
        f"Measured {meta['date']} with `{meta['command']}` ({meta['wall_min']:.1f} min).",
        "",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores visible, "
        f"{meta['machine'].get('ram_gib', '?')} GiB RAM; device `{meta['machine']['device']}`"
        + (f" ({meta['machine']['gpu']})" if "gpu" in meta["machine"] else "")
        + f"; {meta['threads']} torch threads, OMP_WAIT_POLICY={meta['omp_wait_policy']}; torch {meta['machine']['torch']}, transformers "
        f"{meta['machine']['transformers']}, peft {meta['machine']['peft']}, opacus {meta['machine']['opacus']}, "
        f"Python {meta['machine']['python']}.",
        f"Load average (1 min) before the run: {meta['load_before']:.2f} (waited {meta['waited_s']:.0f} s for it to "
        f"drop below {meta['max_load']}); per configuration it is listed below. The machine is shared with other "
        "engineers' tests, so expect a few percent of noise in the times.",
        "",
        f"Setting: model `{meta['model']}`, batch {meta['batch']} x {meta['seq']} tokens (random token ids, fixed "
        f"length, every position carries loss), {'bf16 autocast' if meta['bf16'] else 'fp32'}, AdamW, flat "
        f"clipping C={meta['clip_norm']}, sigma={meta['sigma']}, one logical step = the batch as one micro-batch. "
        f"Step time: median of {meta['steps']} timed steps after {meta['warmup']} warm-up steps, each configuration "
        "in a fresh subprocess. Memory: peak above the level once model, optimizer and DP wrapper are built, over "
        "all steps (includes the AdamW state allocated in step 1 and the gradients); CPU = sampled RSS (5 ms), "
        "CUDA = `max_memory_allocated`.",
        "",
        "| configuration | trainable params | step time (s) | CPU time (s) | tokens/s | peak memory (MiB) | "
        "load start/end | status |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, r in results.items():
        if r.get("status") == "ok":
            lines.append(
                f"| `{name}` | {r['trainable_params'] / 1e6:.2f}M | {r['step_s']:.2f} | {r.get('cpu_s', float('nan')):.2f} | "
                f"{r['tokens_per_s']:.0f} | "
                f"{_mb(r['peak_mem_bytes'])} | {r.get('load_start', float('nan')):.1f}/{r.get('load_end', float('nan')):.1f} | ok |")
        else:
            lines.append(f"| `{name}` | | | | | | | **failed**: {r.get('error', '?')} |")
    lines += ["", "Ratios (target applies to the step time; CPU time = process CPU seconds per step, all threads, "
              "a cross-check that is less sensitive to other processes' load):", "",
              "| ratio | step time | CPU time | peak memory | target (time) | met? |", "|---|---:|---:|---:|---:|---|"]
    for row in ratios:
        if "time" in row:
            lines.append(f"| {row['label']} | {row['time']:.3f}x | {row['cpu']:.3f}x | {row['memory']:.2f}x | "
                         f"<= {row['target']:.2f}x | {'yes' if row['meets'] else '**no**'} |")
        else:
            lines.append(f"| {row['label']} | — | — | — | <= {row['target']:.2f}x | n/a ({row['note']}) |")
    lines += ["", "Phase breakdown: median seconds per step, and the peak memory (MiB above the baseline) reached while "
              "the phase ran; bracketed items are parts of the phase before them, nested in the order shown (privtune's engine internals, "
              "timed by wrapping its functions in the benchmark process only):", ""]
    ok = [n for n, r in results.items() if r.get("status") == "ok"]
    for name in ok:
        r = results[name]
        peaks = r.get("phase_peak_mem_bytes", {})
        parts = []
        for p in [q for q in r["phases"] if "/" not in q]:
            mem = f" / {_mb(peaks[p])} MiB" if p in peaks else ""
            parts.append(f"**{p}** {r['phases'][p]:.2f}{mem}{_children(r['phases'], p)}")
        lines.append(f"- `{name}` ({r['step_s']:.2f} s): {', '.join(parts)}")
    bd = breakdown_rows(results)
    if bd:
        lines += ["", "Breakdown table (median s per step; the median of each phase, so columns need not add up exactly):",
                  "", "| configuration | forward | backward (autograd) | DP clipping outside autograd | noise, scale, "
                  "set grads | optimizer | other | step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in bd:
            lines.append(f"| `{row['name']}` | {row['forward']:.2f} | {row['autograd']:.2f} | {row['clip']:.2f} | "
                         f"{row['post']:.2f} | {row['optimizer']:.2f} | {row['other']:.2f} | {row['step']:.2f} |")
        lines += ["", "For privtune, *backward (autograd)* is `torch.autograd.backward` inside `engine.backward` "
                  "(activation gradients only: the weights have `requires_grad=False`) and *DP clipping* is the rest "
                  "of `engine.backward` (`_consume`: per-sample terms, norms, clip factors, the clipped-sum matmuls "
                  "that replace autograd's weight gradients). For Opacus hooks mode the per-sample gradients are "
                  "computed inside autograd's backward hooks (so they are in *backward*) and *DP clipping* is "
                  "`clip_and_accumulate`; ghost mode's two backward passes (norms, then the clipped gradient) are "
                  "both in *backward*."]
    errors = [(n, r) for n, r in results.items() if r.get("status") != "ok"]
    if errors:
        lines += ["", "Failures (exact errors):", ""]
        for name, r in errors:
            lines.append(f"- `{name}`: `{r.get('error', '?')}`")
    if meta.get("notes"):
        lines += ["", meta["notes"].strip()]
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str) -> None:
    """Replace this benchmark's section of ``path`` (between the markers), keeping every other section."""
    block = f"{MARK_START}\n{body}{MARK_END}\n"
    if path.exists():
        text = path.read_text()
        pattern = re.compile(re.escape(MARK_START) + r".*?" + re.escape(MARK_END) + r"\n?", re.S)
        text = pattern.sub(lambda _: block, text, count=1) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    else:
        text = "# Benchmark results\n\nOne section per benchmark; each script rewrites only its own section.\n\n" + block
    path.write_text(text)


NOTES_FILE = HERE / "dp_overhead_notes.md"  # optional hand-written analysis appended to the section


def print_table(results: dict[str, dict], ratios: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    t = Table(title="DP overhead (issue 5)")
    for col in ("configuration", "params", "step s", "cpu s", "tok/s", "peak MiB", "status"):
        t.add_column(col, justify="right" if col not in ("configuration", "status") else "left")
    for name, r in results.items():
        if r.get("status") == "ok":
            t.add_row(name, f"{r['trainable_params'] / 1e6:.2f}M", f"{r['step_s']:.2f}", f"{r.get('cpu_s', float('nan')):.2f}",
                      f"{r['tokens_per_s']:.0f}",
                      _mb(r["peak_mem_bytes"]), "ok")
        else:
            t.add_row(name, "", "", "", "", "", f"failed: {r.get('error', '?')[:120]}")
    console.print(t)
    rt = Table(title="ratios")
    for col in ("ratio", "time", "cpu", "memory", "target", "met"):
        rt.add_column(col)
    for row in ratios:
        if "time" in row:
            rt.add_row(row["label"], f"{row['time']:.3f}x", f"{row['cpu']:.3f}x", f"{row['memory']:.2f}x",
                       f"<= {row['target']:.2f}x",
                       "yes" if row["meets"] else "NO")
        else:
            rt.add_row(row["label"], "—", "—", "—", f"<= {row['target']:.2f}x", row["note"])
    console.print(rt)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward (as performance.precision=bf16)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", default=",".join(DEFAULT_ORDER), help="comma-separated subset, run in this order")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                    help="OMP_WAIT_POLICY of the workers. PASSIVE (default): on a machine shared with other jobs,\n"
                         "spinning OpenMP threads wait for descheduled peers and a 2-thread step gets several times\n"
                         "slower (tiny-llama: 50x); 'default' leaves the variable as it is")
    ap.add_argument("--clip-norm", type=float, default=1.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown file whose dp_overhead section is rewritten")
    ap.add_argument("--no-write", action="store_true", help="do not touch --out (nor the raw JSON next to it)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the section of --out from a saved raw JSON file\n"
                    "(benchmarks/dp_overhead.json is written by every run), e.g. after editing the notes file")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of tables")
    ap.add_argument("--max-load", type=float, default=2.5, help="wait for the 1-min load average to drop below this")
    ap.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for a quiet machine (then run anyway)")
    ap.add_argument("--config-timeout", type=float, default=1800.0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        meta = dict(saved["meta"], notes=NOTES_FILE.read_text() if NOTES_FILE.exists() else "")
        write_section(Path(args.out), results_markdown(saved["results"], saved["ratios"], meta))
        return 0
    if args.worker:  # child process: one configuration
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        res = run_config(args.worker, model_name=args.model, batch=args.batch, seq=args.seq, steps=args.steps,
                         warmup=args.warmup, device=args.device, bf16=args.bf16, threads=args.threads,
                         clip_norm=args.clip_norm, sigma=args.sigma)
        Path(args.result_file).write_text(json.dumps(res))
        return 0

    def log(msg):
        print(f"[dp_overhead] {msg}", file=sys.stderr, flush=True)

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.device = device
    load, waited = wait_for_quiet(args.max_load, args.max_wait, log)
    t0 = time.time()
    results: dict[str, dict] = {}
    for name in names:
        log(f"{name}: running (load {load_average():.2f})")
        r = _run_subprocess(name, args)
        results[name] = r
        if r.get("status") == "ok":
            log(f"{name}: {r['step_s']:.2f} s/step, peak {_mb(r['peak_mem_bytes'])} MiB (wall {r['wall_s']:.0f} s)")
        else:
            log(f"{name}: FAILED {r.get('error')}")
    ratios = compute_ratios(results)
    cmd = "python benchmarks/dp_overhead.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    meta = dict(date=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), command=cmd,
                wall_min=(time.time() - t0) / 60, machine=machine_info(device), threads=args.threads,
                load_before=load, waited_s=waited, omp_wait_policy=args.omp_wait_policy, max_load=args.max_load,
                model=args.model, batch=args.batch,
                seq=args.seq, bf16=args.bf16, clip_norm=args.clip_norm, sigma=args.sigma, steps=args.steps,
                warmup=args.warmup,
                notes=NOTES_FILE.read_text() if NOTES_FILE.exists() else "")
    for r in results.values():
        r.pop("traceback", None)
    raw = {"meta": {k: v for k, v in meta.items() if k != "notes"}, "results": results, "ratios": ratios}
    if args.json:
        print(json.dumps(raw, indent=2))
    else:
        print_table(results, ratios)
    if not args.no_write:
        out = Path(args.out)
        write_section(out, results_markdown(results, ratios, meta))
        (out.parent / "dp_overhead.json").write_text(json.dumps(raw, indent=1) + "\n")
        log(f"wrote the dp_overhead section of {out} and {out.parent / 'dp_overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
