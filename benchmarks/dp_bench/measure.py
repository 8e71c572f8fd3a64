"""Inside one worker process: build one configuration of one case, time its steps, profile one, track memory.

The steps are the real ones. privtune configurations call ``DPStep.run`` (dp, dp-lora, dp-untied) or
``PlainStep.run`` (full, lora) over the case's micro-batches, then ``optimizer.step(); optimizer.zero_grad()``
inside this benchmark's own ``record_function("optimizer")``; the ``recipe`` case runs ``FineTuneRecipe``'s own
``_dp_step`` / ``_plain_step`` on the quickstart data, as ``FineTuneRecipe.train`` does. Nothing of privtune or
Opacus is copied, patched or wrapped: the phases come from the ``record_function`` labels the real code already
has (``dp.*``, ``full.*``), read by ``torch.profiler`` in one extra step after the timed ones, and for Opacus from
labels around this benchmark's own calls (``opacus.forward`` / ``opacus.backward`` / ``opacus.step``).

Noise: privtune's default, keyed by a secret 128-bit key (``randomness_key=secret_seed()``, ``secure_rng=False``);
Opacus's default generator (``secure_mode=False``). Gradient accumulation in Opacus: the way its
``BatchMemoryManager`` does it (``signal_skip_step(do_skip=True)`` before every micro-batch's ``step`` but the
last one's).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import CASES, CONFIGS, LABELS, RECIPE_CONFIGS

REPO = Path(__file__).resolve().parents[2]
PROTOCOL = "@@dp_overhead@@ "  # prefix of the worker's protocol lines on stdout (libraries may print too)


@dataclass
class Options:
    """What a worker needs to build its configuration (the CLI's flags, passed to the worker as JSON)."""

    model: str = "smollm2-135m"
    seq: int = 128
    micro_batch: int = 8
    micro_batches: int = 8  # logical64 only
    device: str = "auto"
    bf16: bool = False
    threads: int | None = 2
    clip_norm: float = 1.0
    sigma: float = 1.0
    lr: float = 1e-5
    seed: int = 0
    recipe_config: str = "configs/quickstart.yaml"
    recipe_overrides: list[str] = field(default_factory=list)
    recipe_steps: int = 8  # recipe: the plan must cover warmup + timed + profiled steps

    def geometry(self, case: str) -> tuple[int, int]:
        """(rows per micro-batch, micro-batches per logical step) of a synthetic case."""
        return (self.micro_batch, 1) if case == "micro8x128" else (self.micro_batch, self.micro_batches)


# ----------------------------------------------------------------------------------------------------------------
# Machine, load, memory


def machine_info(device_name: str) -> dict:
    import os
    import platform

    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": device_name}
    for pkg in ("transformers", "peft", "opacus"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - informational only
            info[pkg] = "not installed"
    if device_name.startswith("cuda") and torch.cuda.is_available():
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


class Memory:
    """Peak memory above the level at ``start()``: CPU = resident set size sampled every 5 ms in a thread (as
    privtune's ``PeakMemory``); CUDA = ``max_memory_allocated``."""

    def __init__(self, device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        from privtune.trainers.memory import PeakMemory

        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, PeakMemory._rss())

    def start(self) -> Memory:
        import torch

        from privtune.trainers.memory import PeakMemory

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.baseline = self.peak = PeakMemory._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> int:
        """The peak above the baseline, in bytes (idempotent)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return max(0, self.peak - self.baseline)


# ----------------------------------------------------------------------------------------------------------------
# Model and data (synthetic cases)


def untie_embeddings(model) -> None:
    """Give the LM head its own copy of the (tied) embedding weight (Opacus ghost clipping refuses tied ones)."""
    import torch

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is emb.weight:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def materialise(model) -> None:
    """Copy weights that may still be lazily mapped from the model file into ordinary memory, so that the first
    step's page-ins do not count as the step's memory (a tied parameter is one object: copied once, still tied)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()


def build_model(model_name: str, method: str, *, untied: bool, device, seed: int):
    """(model, trainable parameters), prepared as privtune's recipe does (``prepare_trainable``, LoRA defaults)."""
    import torch

    from privtune.launch.config import LoraConfig
    from privtune.trainers.lora import prepare_trainable
    from privtune.trainers.models import load_model

    torch.manual_seed(seed)
    model, _ = load_model(model_name, seed=seed)
    if untied:
        untie_embeddings(model)
    materialise(model)
    model, trainable = prepare_trainable(model, method, LoraConfig())
    model.to(device)
    model.train()
    if untied:
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    return model, trainable


def make_micro_batches(*, rows: int, seq: int, count: int, vocab: int, seed: int, device):
    """``count`` micro-batches of ``rows`` x ``seq`` random token ids: fixed length, every position carries loss."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (rows, seq), generator=g)
        out.append((ids.to(device), torch.ones_like(ids).to(device), ids.clone().to(device)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The step runners: ``step(k, capture)`` runs one logical step and returns {"tokens", "loss_sum", "units"};
# ``capture`` (a dict, tests only) receives {id(param): the gradient handed to the optimizer}.


def _capture(capture: dict | None, trainable) -> None:
    if capture is not None:
        capture.update({id(p): p.grad.detach().clone() for p in trainable})


class _Synthetic:
    """What the synthetic cases share: the model, its micro-batches, the recipe's loss function."""

    def __init__(self, model, trainable, micro, *, autocast):
        self.model, self.trainable, self.micro, self.autocast = model, trainable, micro, autocast
        self.rows = sum(ids.shape[0] for ids, _, _ in micro)
        self.tokens = sum(ids.numel() for ids, _, _ in micro)
        self._loss_sum = 0.0

    def loss_fn(self, batch):
        """As ``FineTuneRecipe._loss_fn``: forward, then one loss per row (the mean of its token losses)."""
        from privtune.trainers.dp import per_example_loss

        ids, mask, labels = batch
        with self.autocast:
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        losses = per_example_loss(logits.float(), labels)
        self._loss_sum += float(losses.detach().sum())  # as StepStats.add (a sync point, like the recipe's)
        return losses

    def _result(self) -> dict:
        loss_sum, self._loss_sum = self._loss_sum, 0.0
        return {"tokens": self.tokens, "units": self.rows, "loss_sum": loss_sum}

    def step(self, k: int, capture=None) -> dict:
        """The real step object over this case's micro-batches, then AdamW (the same for both runners)."""
        from torch.profiler import record_function

        self.update.run(self.inputs, self.loss_fn, step=k)
        _capture(capture, self.trainable)
        with record_function("optimizer"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return self._result()


class PlainRunner(_Synthetic):
    """full / lora: ``PlainStep(batch_size=rows of the logical step).run(micro-batches)``, then AdamW."""

    def __init__(self, model, trainable, micro, *, autocast, opts: Options):
        import torch

        from privtune.trainers.plain_step import PlainStep

        super().__init__(model, trainable, micro, autocast=autocast)
        self.update = PlainStep(batch_size=self.rows)
        self.inputs = micro  # PlainStep takes the micro-batches as they are
        self.opt = torch.optim.AdamW(trainable, lr=opts.lr)


class PrivtuneRunner(_Synthetic):
    """dp / dp-lora / dp-untied: ``DPStep.run`` over the micro-batches (unit ids 0..rows-1, expected batch size =
    rows of the logical step, flat clipping, secret-key noise), then AdamW."""

    def __init__(self, model, trainable, micro, *, autocast, opts: Options):
        import torch

        from privtune.trainers.dp import DPEngine, secret_seed
        from privtune.trainers.dp.step import DPStep, MicroBatchInputs

        super().__init__(model, trainable, micro, autocast=autocast)
        engine = DPEngine(model, trainable=trainable, clip_norm=opts.clip_norm, clipping="flat")
        self.update = DPStep(engine, noise_multiplier=opts.sigma, expected_batch_size=self.rows,
                             randomness_key=secret_seed(), secure_rng=False)
        self.opt = torch.optim.AdamW(trainable, lr=opts.lr)
        self.inputs, start = [], 0
        for batch in micro:
            ids = batch[0]
            unit_ids = torch.arange(start, start + ids.shape[0], device=ids.device)
            self.inputs.append(MicroBatchInputs(unit_ids, batch, sequence_length=ids.shape[1]))
            start += ids.shape[0]


class OpacusRunner(_Synthetic):
    """Opacus 1.6 ``PrivacyEngine.make_private`` (hooks: per-sample gradients instantiated; ghost: two backward
    passes), same loss, C, sigma and optimizer; expected batch size = rows of the logical step. Several
    micro-batches accumulate as ``BatchMemoryManager`` does it: ``signal_skip_step(do_skip=True)`` then ``step()``
    for each micro-batch but the last, whose ``step()`` adds the noise and steps AdamW."""

    def __init__(self, model, trainable, micro, *, autocast, opts: Options, mode: str):
        import torch
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        super().__init__(model, trainable, micro, autocast=autocast)
        self.mode = mode
        opt = torch.optim.AdamW(trainable, lr=opts.lr)
        # make_private needs a loader: one holding the logical step's rows, in one batch (expected size = rows).
        rows = [torch.cat([b[i] for b in micro]).cpu() for i in range(3)]
        loader = DataLoader(TensorDataset(*rows), batch_size=self.rows)
        engine = PrivacyEngine(accountant="rdp")
        common = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=opts.sigma,
                      max_grad_norm=opts.clip_norm, poisson_sampling=False, grad_sample_mode=mode,
                      loss_reduction="mean")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "hooks":
                self.gsm, self.dpopt, _ = engine.make_private(**common)
                self.criterion = None
            else:
                self.gsm, self.dpopt, self.criterion, _ = engine.make_private(
                    criterion=torch.nn.CrossEntropyLoss(), **common)
        assert self.dpopt.expected_batch_size == self.rows, self.dpopt.expected_batch_size

    def _loss(self, batch):
        from privtune.trainers.dp import per_example_loss

        ids, mask, labels = batch
        with self.autocast:
            logits = self.gsm(input_ids=ids, attention_mask=mask).logits
        if self.criterion is None:  # hooks: mean over rows of the per-example mean token loss
            losses = per_example_loss(logits.float(), labels)
            self._loss_sum += float(losses.detach().sum())
            return losses.mean()
        # ghost: per-token CE on the flattened logits; shape= the 3-D logits shape gives per-row means
        shift = logits[:, :-1, :].float()
        loss = self.criterion(shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1), shape=shift.shape)
        self._loss_sum += float(loss.item()) * ids.shape[0]
        return loss

    def step(self, k: int, capture=None) -> dict:
        from torch.profiler import record_function

        last = len(self.micro) - 1
        for i, batch in enumerate(self.micro):
            if i < last:
                self.dpopt.signal_skip_step(do_skip=True)
            with record_function("opacus.forward"):
                loss = self._loss(batch)
            with record_function("opacus.backward"):
                loss.backward()
            with record_function("opacus.step"):  # clip and accumulate; the last: + noise, scale, AdamW step
                self.dpopt.step()
                if i == last:
                    _capture(capture, self.trainable)
                self.dpopt.zero_grad(set_to_none=True)
        return self._result()


class RecipeRunner:
    """The recipe's own step on the quickstart data, as ``FineTuneRecipe.train`` runs one (without the training
    log, the ledger and checkpoints): ``_dp_step`` / ``_plain_step``, the every-parameter-has-a-gradient guardrail,
    ``optimizer.step``, ``scheduler.step``, ``zero_grad``, ``step += 1``. Poisson batches (DP) or shuffled batches
    (non-DP) of ragged lengths. The run dir lives in a temporary folder, removed by ``close``."""

    def __init__(self, method: str, opts: Options):
        from privtune.launch.pipeline import ensure_data
        from privtune.launch.sweep import load_sweep
        from privtune.trainers.recipe import FineTuneRecipe

        self.tmp = Path(tempfile.mkdtemp(prefix="dp_overhead_recipe_"))
        config = Path(opts.recipe_config)
        config = config if config.is_absolute() else REPO / config
        overrides = ["grid=null", f"name=bench-{method}", f"output_dir={self.tmp / 'runs'}",
                     f"train.method={method}", f"model.name={opts.model}", "train.self_check_every=null",
                     f"train.max_steps={opts.recipe_steps}"]  # [4:] is what the report lists
        if opts.threads:
            overrides.append(f"performance.num_threads={opts.threads}")
        if opts.bf16:
            overrides.append("performance.precision=bf16")
        _, (cfg,) = load_sweep(config, overrides + list(opts.recipe_overrides))
        self.cfg = cfg
        run_dir, _ = ensure_data(cfg)
        self.recipe = recipe = FineTuneRecipe(cfg, run_dir)
        recipe.setup()
        recipe.first_step = recipe.step  # as train() sets it (the DP self-check, if turned back on, reads it)
        materialise(recipe.model)
        self.model, self.trainable = recipe.model, recipe.trainable
        self.describe = {"config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
                         "overrides": overrides[4:] + list(opts.recipe_overrides),
                         "train_examples": len(recipe.train_data), "batch_size": cfg.train.batch_size,
                         "micro_batch_size": cfg.performance.micro_batch_size, "max_length": cfg.data.max_length}
        if recipe.is_dp:
            plan = recipe.plan
            self.describe.update(sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier,
                                 expected_batch_size=plan.expected_batch_size, clip_norm=plan.clip_norm,
                                 clipping=plan.clipping, secure_rng=plan.secure_rng, reproducible=plan.reproducible)

    def step(self, k: int, capture=None) -> dict:
        from torch.profiler import record_function

        recipe = self.recipe
        stats = recipe._dp_step() if recipe.is_dp else recipe._plain_step()  # leaves the update in .grad
        recipe._check_every_parameter_has_a_gradient()
        _capture(capture, self.trainable)
        with record_function("optimizer"):
            recipe.parallel.step()  # optimizer.step, scheduler.step, zero_grad (as FineTuneRecipe.train)
        recipe.step += 1
        return {"tokens": stats.tokens, "units": stats.units, "loss_sum": stats.loss_sum}

    def close(self) -> None:
        try:
            self.recipe.cleanup()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# One configuration of one case in this process: build once, then step / profile on demand


def _error_text(err: BaseException) -> str:
    return re.sub(r"\s+", " ", f"{type(err).__name__}: {err}".strip())[:600]


def profile_phases(prof) -> dict[str, dict]:
    """{label: {"cpu_s", "count"[, "device_s"]}}: each label's total over the profiled step (labels nest: a parent's
    time includes its children's). CPU time = the label's ``cpu_time_total`` (wall time of the range on the calling
    thread); on CUDA also the device time of its GPU annotation."""
    out: dict[str, dict] = {}
    for e in prof.key_averages():
        if e.key not in LABELS:
            continue
        row = out.setdefault(e.key, {"cpu_s": 0.0, "count": 0})
        if "CPU" in str(getattr(e, "device_type", "CPU")):  # the host-side range (on CUDA also a GPU annotation)
            row["cpu_s"] += e.cpu_time_total / 1e6
            row["count"] += e.count
        device_us = getattr(e, "device_time_total", None)
        if device_us is None:
            device_us = getattr(e, "cuda_time_total", 0)
        if device_us:
            row["device_s"] = row.get("device_s", 0.0) + device_us / 1e6
    return out


class Session:
    """One configuration of one case; never raises: a failure is recorded in ``self.error`` and ends it."""

    def __init__(self, case: str, name: str, opts: Options):
        import torch

        if case not in CASES:
            raise ValueError(f"unknown case {case!r}; choose from {', '.join(CASES)}")
        if name not in CONFIGS or (case == "recipe" and name not in RECIPE_CONFIGS):
            raise ValueError(f"configuration {name!r} is not available in case {case!r}")
        if opts.threads:
            torch.set_num_threads(opts.threads)
        method, impl, untied = CONFIGS[name]
        if case == "recipe":
            method = name  # the recipe's train.method (dp -> DPStep, full -> PlainStep, as in CONFIGS)
        self.dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto"
                                else opts.device)
        self.case, self.opts = case, opts
        self.info: dict = {"case": case, "name": name, "method": method, "impl": impl, "untied": untied,
                           "device": str(self.dev), "torch_threads": torch.get_num_threads()}
        self.error: str | None = None
        self.traceback = ""
        self.records: list[dict] = []
        self.profile: dict | None = None
        self.memory: Memory | None = None
        self.peak: int | None = None
        self.runner = None
        self._k = 0  # steps run (the DP step index: its noise stream)
        self.names: dict[int, str] = {}
        try:
            if case == "recipe":
                self.runner = RecipeRunner(name, opts)  # the configuration's name is the recipe's method
                self.info["recipe"] = self.runner.describe
            else:
                model, trainable = build_model(opts.model, method, untied=untied, device=self.dev, seed=opts.seed)
                rows, count = opts.geometry(case)
                vocab = model.get_input_embeddings().num_embeddings
                micro = make_micro_batches(rows=rows, seq=opts.seq, count=count, vocab=vocab, seed=opts.seed + 1,
                                           device=self.dev)
                autocast = torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=opts.bf16)
                kw = dict(autocast=autocast, opts=opts)
                if impl == "plain":
                    self.runner = PlainRunner(model, trainable, micro, **kw)
                elif impl == "privtune":
                    self.runner = PrivtuneRunner(model, trainable, micro, **kw)
                else:
                    self.runner = OpacusRunner(model, trainable, micro, mode=impl.split("-")[1], **kw)
            self.info["trainable_params"] = sum(p.numel() for p in self.runner.trainable)
            self.names = {id(p): n for n, p in self.runner.model.named_parameters()}
        except Exception as err:  # noqa: BLE001 - a configuration that fails is a result, recorded with its error
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        self.error, self.traceback = _error_text(err), traceback.format_exc()[-3000:]

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            import torch

            torch.cuda.synchronize(self.dev)

    def _timed(self, capture=None) -> dict:
        self._sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.runner.step(self._k, capture=capture)
        self._sync()
        self._k += 1
        return dict(out, step_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)

    def step(self, capture: dict | None = None) -> dict | None:
        """One unprofiled timed step: {"step_s", "cpu_s", "tokens", "units", "loss_sum", "load"}."""
        if self.error is not None:
            return None
        if self.memory is None:  # the baseline: model, optimizer and DP wrapper built, no step run yet
            self.memory = Memory(self.dev).start()
        try:
            record = dict(self._timed(capture), load=load_average())
        except Exception as err:  # noqa: BLE001
            self._fail(err)
            return None
        self.records.append(record)
        return record

    def profile_step(self) -> dict | None:
        """One more step under ``torch.profiler`` (after the timed ones; memory tracking has stopped)."""
        import torch
        from torch.profiler import ProfilerActivity

        if self.error is not None:
            return None
        if self.memory is not None and self.peak is None:
            self.peak = self.memory.stop()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev.type == "cuda" else [])
        try:
            with torch.profiler.profile(activities=activities) as prof:
                record = self._timed()
            record["phases"] = profile_phases(prof)
        except Exception as err:  # noqa: BLE001
            self._fail(err)
            return None
        self.profile = record
        return record

    def finish(self, warmup: int) -> dict:
        """The result: timings over the records after ``warmup``, peak memory, the profiled phases, or the error."""
        if self.memory is not None and self.peak is None:
            self.peak = self.memory.stop()
        close = getattr(self.runner, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - clean-up only
                pass
        result = dict(self.info, status="ok" if self.error is None else "error")
        if self.error is not None:
            result.update(error=self.error, traceback=self.traceback)
            return result
        timed = self.records[warmup:]
        times = [r["step_s"] for r in timed]
        tokens = [r["tokens"] for r in timed]
        losses = [r["loss_sum"] / max(r["units"], 1) for r in self.records]
        total_s, total_tokens = sum(times), sum(tokens)
        result.update(
            warmup=warmup,
            steps=len(timed),
            step_s=statistics.median(times) if times else float("nan"),
            step_s_all=[round(t, 4) for t in times],
            cpu_s=statistics.median(r["cpu_s"] for r in timed) if timed else float("nan"),
            cpu_s_total=sum(r["cpu_s"] for r in timed),
            tokens_per_step=tokens,
            units_per_step=[r["units"] for r in timed],
            tokens_per_s=total_tokens / total_s if total_s > 0 else float("nan"),
            time_per_token_s=total_s / total_tokens if total_tokens else float("nan"),
            peak_mem_bytes=self.peak or 0,
            baseline_mem_bytes=self.memory.baseline if self.memory else 0,
            profile=self.profile,
            losses=losses,
            finite=all(math.isfinite(x) for x in losses) and all(math.isfinite(t) for t in times),
            load_during=[round(r["load"], 2) for r in timed],
        )
        return result


def run_config(case: str, name: str, *, steps: int = 1, warmup: int = 0, profile: bool = True,
               capture_update: bool = False, **options) -> dict:
    """Build one configuration in this process and run ``warmup + steps`` steps (+ one profiled); never raises.

    ``options`` are ``Options`` fields. ``capture_update=True`` also returns ``update``: {parameter name: the
    gradient handed to the optimizer in the first step} (for cross-checks; not JSON-serialisable).
    """
    session = Session(case, name, Options(**options))
    update: dict = {}
    for k in range(warmup + steps):
        if session.step(capture=update if (capture_update and k == 0) else None) is None:
            break
    if profile:
        session.profile_step()
    result = session.finish(warmup)
    if capture_update and result["status"] == "ok":
        result["update"] = {session.names[i]: g for i, g in update.items()}
    return result


# ----------------------------------------------------------------------------------------------------------------
# Worker process: one configuration, driven over stdin / stdout by dp_overhead.py


def serve(spec: str) -> int:
    """Build the configuration of ``spec`` (JSON: case, name, warmup, options), say "ready", then answer "step",
    "profile" and "finish" read from stdin."""
    spec_d = json.loads(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = Session(spec_d["case"], spec_d["name"], Options(**spec_d["options"]))

        def say(obj):
            sys.stdout.write(PROTOCOL + json.dumps(obj) + "\n")
            sys.stdout.flush()

        say({"ready": session.error is None, "error": session.error})
        for line in sys.stdin:
            command = line.strip()
            if command == "step":
                record = session.step()
                say({"ok": record is not None, "record": record, "error": session.error})
            elif command == "profile":
                record = session.profile_step()
                say({"ok": record is not None, "error": session.error})
            elif command == "finish":
                say({"result": session.finish(spec_d["warmup"])})
                return 0
    return 0


def worker_spec(case: str, name: str, *, warmup: int, opts: Options) -> str:
    return json.dumps({"case": case, "name": name, "warmup": warmup, "options": asdict(opts)})


__all__ = ["PROTOCOL", "Memory", "Options", "Session", "load_average", "machine_info", "run_config", "serve",
           "worker_spec"]
