"""The DP overhead benchmark's parts: ``measure`` (inside one worker process: build one configuration of one case,
time its real training steps, profile one, track peak memory) and ``render`` (the raw JSON -> the markdown section
of benchmarks/RESULTS.md and the rich tables: ratios, target checks, phase tables). ``benchmarks/dp_overhead.py``
is the command line that runs one worker per configuration and puts the two together.

This module holds what both sides agree on: the cases, the configurations, the profiler labels and the targets.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------------------------
# Configurations: name -> (method, implementation, untied LM head)

CONFIGS: dict[str, tuple[str, str, bool]] = {
    "full": ("full", "plain", False),
    "dp": ("full", "privtune", False),
    "lora": ("lora", "plain", False),
    "dp-lora": ("lora", "privtune", False),
    "opacus-hooks": ("full", "opacus-hooks", False),
    "opacus-hooks-lora": ("lora", "opacus-hooks", False),
    "opacus-ghost": ("full", "opacus-ghost", False),  # refuses a tied embedding / LM head: recorded as a failure
    "opacus-ghost-untied": ("full", "opacus-ghost", True),
    "dp-untied": ("full", "privtune", True),
    "opacus-ghost-lora": ("lora", "opacus-ghost", False),
}
RECIPE_CONFIGS = ("full", "dp", "lora", "dp-lora")  # the recipe's own methods (no Opacus there)

# ----------------------------------------------------------------------------------------------------------------
# Cases: what one logical step is. Sizes come from the command line (--micro-batch, --seq, --micro-batches); the
# names are the default geometry's.

CASES = ("micro8x128", "logical64", "recipe")
CASE_CONFIGS: dict[str, tuple[str, ...]] = {
    "micro8x128": ("full", "dp", "lora", "dp-lora", "opacus-hooks", "opacus-hooks-lora", "opacus-ghost",
                   "dp-untied", "opacus-ghost-untied"),
    # Opacus at 64: its hooks mode only (at 8 x 128 its ghost mode, on an untied copy, is no faster; running both
    # would double the longest case). --configs adds the others.
    "logical64": ("full", "dp", "lora", "dp-lora", "opacus-hooks"),
    "recipe": RECIPE_CONFIGS,
}
DEFAULT_STEPS = {"micro8x128": 2, "logical64": 1, "recipe": 3}  # timed steps (after --warmup, before profiling)
# Busy machine: compared configurations share a group and take their steps in turns (see dp_overhead.py).
INTERLEAVED_GROUPS: dict[str, str] = {
    "micro8x128": "full,dp;lora,dp-lora;dp,opacus-hooks;opacus-ghost;dp-untied,opacus-ghost-untied;"
                  "dp-lora,opacus-hooks-lora,opacus-ghost-lora",
    "logical64": "full,dp;lora,dp-lora;dp,opacus-hooks;dp-untied,opacus-ghost-untied;"
                 "dp-lora,opacus-hooks-lora,opacus-ghost-lora",
    "recipe": "full,dp;lora,dp-lora",
}

# ----------------------------------------------------------------------------------------------------------------
# Profiler labels (torch.profiler.record_function). privtune's are in trainers/dp/step.py, trainers/dp/engine.py
# and trainers/plain_step.py; the benchmark adds only its own: "optimizer" around optimizer.step + zero_grad, and
# the opacus.* labels around its own calls into Opacus.
#
# (label, parent label or None): the tree the phase tables show. dp.backward = dp.autograd + dp.clip (+ a little
# book-keeping); dp.clip = dp.clip.norms + dp.clip.sum (+ clip factors).
LABEL_TREE: tuple[tuple[str, str | None], ...] = (
    ("dp.forward", None),
    ("dp.backward", None),
    ("dp.autograd", "dp.backward"),
    ("dp.clip", "dp.backward"),
    ("dp.clip.norms", "dp.clip"),
    ("dp.clip.sum", "dp.clip"),
    ("dp.noise", None),
    ("dp.set_grads", None),
    ("full.forward", None),
    ("full.backward", None),
    ("full.reduce", None),
    ("opacus.forward", None),
    ("opacus.backward", None),
    ("opacus.step", None),
    ("optimizer", None),
)
LABELS = tuple(label for label, _ in LABEL_TREE)
TOP_LEVEL = tuple(label for label, parent in LABEL_TREE if parent is None)

# ----------------------------------------------------------------------------------------------------------------
# Targets: (case, kind, numerator, denominator, bound, sense, label). kind "time": time per token ratio; "memory":
# peak memory ratio; "opacus": the faster Opacus mode's time per token over privtune's on the same model.

TARGETS: tuple[tuple[str, str, str, str, float, str, str], ...] = (
    ("logical64", "time", "dp", "full", 1.10, "<=", "dp / full, time per token"),
    ("logical64", "memory", "dp", "full", 1.20, "<=", "dp / full, peak memory"),
    ("logical64", "opacus", "opacus", "dp", 1.5, ">=", "Opacus's faster mode / privtune dp, time per token"),
    ("micro8x128", "time", "dp", "full", 1.25, "<=", "dp / full, time per token"),
    ("micro8x128", "time", "dp-lora", "lora", 1.03, "<=", "dp-lora / lora, time per token"),
    ("logical64", "time", "dp-lora", "lora", 1.03, "<=", "dp-lora / lora, time per token"),
    ("recipe", "time", "dp-lora", "lora", 1.03, "<=", "dp-lora / lora, time per token"),
)
# Opacus modes on the full model and the privtune configuration that runs the same model.
OPACUS_COUNTERPARTS: tuple[tuple[str, str], ...] = (
    ("opacus-hooks", "dp"),
    ("opacus-ghost", "dp"),
    ("opacus-ghost-untied", "dp-untied"),
)
# Ratios reported per case (no target): (numerator, denominator).
RATIOS: tuple[tuple[str, str], ...] = (
    ("dp", "full"),
    ("dp-lora", "lora"),
    ("dp", "opacus-hooks"),
    ("dp-untied", "opacus-ghost-untied"),
    ("dp-lora", "opacus-hooks-lora"),
    ("dp-lora", "opacus-ghost-lora"),
)

SECTION_KEY, SECTION_NAME = "dp_overhead", "DP overhead (issue 5)"
MARK_START, MARK_END = f"<!-- {SECTION_KEY}:start -->", f"<!-- {SECTION_KEY}:end -->"
FORMAT = 2  # of the raw JSON (1: the pre-split benchmark, which --render refuses)
