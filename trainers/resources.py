"""The resource plan: memory per GPU by component, tokens per step and step count, before anything is loaded.

Owns: model shapes known offline (``Architecture``: the tiny registry configs, the embedded model's or a local
folder's ``config.json``, or the built-in table of the published architectures the cluster recipes use, so no
weights are needed and nothing is downloaded), parameter counts from shapes, and ``plan_resources``: the bytes
each GPU holds for a method (full | lora | dp | dp-lora) under a parallel preset, world size, precision,
micro-batch and sequence length. Used by ``privtune plan`` and printed before training. Nothing here is sensitive.

Symbols: Ψ parameters, Ψt trainable ones, N world size, b micro-batch, T sequence length (data.max_length),
w = e = 2 bytes under bf16 (weights, gradients, activations), else 4. What each preset divides by N:

    preset           parameters  gradients  optimizer state
    single, ddp          1           1           1
    zero1                1           1           N
    zero2                1           N           N
    zero3, fsdp2         N           N           N    + one gathered unit (decoder layer, embedding or head)
    zero3-offload        N           N        on CPU  (+ the same gathered unit)

The DP engine's buffers are never sharded: each rank clips its own units over whole parameters before the
reduce-scatter, so the fp32 clipped sum (4 Ψt) is full size on every rank. The micro-batch's peak is its larger
phase: forward + backward (autograd's saved tensors, the logits) or, under DP, the clipping after the backward,
when autograd's tensors are freed and the captured A and G (plus their fp32 copies) are what is left. The figures
describe the engine as it is (``dp_clip_copies``: see the doc). A plan fits
when its total is at most ``USABLE`` of the GPU's memory (the rest: CUDA context, communication buffers,
allocator fragmentation, which are not itemised). docs/cluster-planning.md has every formula and the tables.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from privtune.errors import UserError

GIB = 1 << 30
USABLE = 0.9
NOISE_CHUNK = 1 << 20  # float32 values per keyed noise chunk, one buffer per CPU thread (trainers/dp/noise.py)
SHARDS = {  # preset -> (parameters, gradients, optimizer state) sharded over the N ranks
    "single": (False, False, False), "ddp": (False, False, False), "zero1": (False, False, True),
    "zero2": (False, True, True), "zero3": (True, True, True), "fsdp2": (True, True, True),
    "zero3-offload": (True, True, True),
}


@dataclass(frozen=True)
class Linear:
    name: str  # module name, as LoRA's target_modules name it
    d_in: int
    d_out: int
    bias: bool
    reads: str  # the tensor it reads: layers reading the same one (q, k, v; gate, up) share it


@dataclass(frozen=True)
class Architecture:
    family: str  # llama (also mistral, qwen2, gemma: gated MLP, RMSNorm) | gpt_neox (GELU MLP, LayerNorm)
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    mlp_bias: bool = False
    attention: str = "sdpa"  # "eager" (the tiny test models) also keeps the b × heads × T × T probabilities

    def linears(self) -> tuple[Linear, ...]:
        """One decoder layer's linear layers."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.family == "gpt_neox":
            return (Linear("query_key_value", h, 3 * q, True, "attn_in"), Linear("dense", q, h, True, "o_in"),
                    Linear("dense_h_to_4h", h, i, True, "mlp_in"), Linear("dense_4h_to_h", i, h, True, "down_in"))
        b, m = self.qkv_bias, self.mlp_bias
        return (Linear("q_proj", h, q, b, "attn_in"), Linear("k_proj", h, kv, b, "attn_in"),
                Linear("v_proj", h, kv, b, "attn_in"), Linear("o_proj", q, h, False, "o_in"),
                Linear("gate_proj", h, i, m, "mlp_in"), Linear("up_proj", h, i, m, "mlp_in"),
                Linear("down_proj", i, h, m, "down_in"))

    @property
    def norm_params(self) -> int:  # one norm: RMSNorm weight, or LayerNorm weight and bias
        return 2 * self.hidden if self.family == "gpt_neox" else self.hidden

    def layer_parameters(self) -> int:
        return sum(lin.d_in * lin.d_out + lin.bias * lin.d_out for lin in self.linears()) + 2 * self.norm_params

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_parameters() + self.norm_params

    def lora_targets(self, targets) -> tuple[Linear, ...]:
        """The decoder linears LoRA adapts: all of them for "all-linear" (peft leaves the head out), else by name."""
        if targets == "all-linear":
            return self.linears()
        names = {t.rsplit(".", 1)[-1] for t in targets}
        chosen = tuple(lin for lin in self.linears() if lin.name in names)
        if not chosen:
            raise UserError(f"train.lora.target_modules={list(targets)!r} matches no module of this model",
                            f"use all-linear or some of {', '.join(lin.name for lin in self.linears())}")
        return chosen


# Published architectures (the models' own config.json), so that the cluster recipes plan offline.
KNOWN = {
    "meta-llama/Llama-2-7b-hf": Architecture("llama", 4096, 32, 11008, 32, 32, 128, 32000, tied=False),
    "meta-llama/Llama-2-13b-hf": Architecture("llama", 5120, 40, 13824, 40, 40, 128, 32000, tied=False),
    "EleutherAI/pythia-6.9b": Architecture("gpt_neox", 4096, 32, 16384, 32, 32, 128, 50432, tied=False),
    "google/gemma-7b": Architecture("llama", 3072, 28, 24576, 16, 16, 256, 256000, tied=True),
    "Qwen/Qwen2.5-7B": Architecture("llama", 3584, 28, 18944, 28, 4, 128, 152064, tied=False, qkv_bias=True),
    "smollm2-135m": Architecture("llama", 576, 30, 1536, 9, 3, 64, 49152, tied=True),  # SmolLM2-135M-Instruct
}
_TIED_DEFAULT = {"gemma": True}  # config.json without tie_word_embeddings: the model class's own default


def architecture_from_config(config: dict, *, attention: str = "sdpa") -> Architecture:
    """Shapes from a Hugging Face config.json dict (llama, mistral, qwen2, gemma, gpt_neox)."""
    kind = config.get("model_type")
    if kind not in ("llama", "mistral", "qwen2", "gemma", "gpt_neox"):
        raise UserError(f"the planner knows no architecture '{kind}'",
                        "plan with a llama, mistral, qwen2, gemma or gpt_neox model")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    neox = kind == "gpt_neox"
    return Architecture(
        family="gpt_neox" if neox else "llama", hidden=hidden, layers=config["num_hidden_layers"],
        intermediate=config["intermediate_size"], heads=heads,
        kv_heads=heads if neox else (config.get("num_key_value_heads") or heads),
        head_dim=(None if neox else config.get("head_dim")) or hidden // heads, vocab=config["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", _TIED_DEFAULT.get(kind, False))),
        qkv_bias=kind == "qwen2" or bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)), attention=attention)


def architecture(name: str) -> Architecture:
    """``model.name`` -> its shapes, without weights and without the network."""
    import json
    from pathlib import Path

    from privtune.trainers import models

    if name in models.TINY_FAMILIES:  # built by build_tiny with eager attention
        config = models.tiny_config(name, vocab_size=len(models.byte_tokenizer())).to_dict()
        return architecture_from_config(config, attention="eager")
    if name in KNOWN:
        return KNOWN[name]
    local = Path(name).expanduser() / "config.json"
    try:
        config = json.loads(local.read_text()) if local.is_file() else models._config_dict(name)
    except (UserError, OSError, json.JSONDecodeError):
        raise UserError(f"model '{name}' has no shapes known offline: it is not a registry name, a folder with a "
                        "readable config.json, a hub id in the local cache or one of " + ", ".join(KNOWN),
                        "point model.name at a folder holding its config.json (the weights are not needed)") from None
    if config is None:
        raise UserError(f"model {name} has no config.json to plan from (a PEFT adapter folder?)",
                        "plan with its base model")
    return architecture_from_config(config)


@dataclass(frozen=True)
class ResourcePlan:
    model: str
    method: str
    parallel: str
    precision: str
    nodes: int
    gpus_per_node: int
    world_size: int
    gpu_memory_bytes: int
    micro_batch_size: int
    sequence_length: int
    parameters: int
    trainable_parameters: int
    memory: dict[str, int]  # bytes per GPU by component; "total" = persistent + the larger micro-batch phase
    phases: dict[str, int]  # the micro-batch's two phases: forward_backward, dp_clipping (0 without DP)
    cpu_memory_per_rank_bytes: int  # zero3-offload's optimizer state
    fits: bool
    tokens_per_step: int  # logical batch × sequence length (the expected batch under DP)
    micro_batches_per_step: int  # per GPU
    steps: int | None
    training_units: int | None

    @property
    def total(self) -> int:
        return self.memory["total"]

    def to_dict(self) -> dict:
        return {**asdict(self), "usable_bytes": int(USABLE * self.gpu_memory_bytes)}

    def summary_line(self) -> str:
        verdict = "fits" if self.fits else f"does NOT fit (more than {USABLE:.0%})"
        return (f"{self.total / GIB:.1f} GiB per GPU of {self.gpu_memory_bytes / GIB:.0f} GiB: {verdict}; "
                f"{self.method} {self.parallel} on {self.world_size} GPU(s), micro-batch {self.micro_batch_size} "
                f"× {self.sequence_length} tokens, {self.precision}")

    def describe(self) -> str:
        n, shards = self.world_size, SHARDS[self.parallel]
        where = {"parameters": shards[0], "gradients": shards[1], "optimizer_state": shards[2]}
        steps = (f"{self.steps:,} steps" + (f" over {self.training_units:,} units" if self.training_units else "")
                 if self.steps else "steps unknown (the data cannot be read here)")
        lines = [f"Resource plan: {self.model}, {self.method}, {self.parallel} on {self.nodes} × {self.gpus_per_node}"
                 f" GPU(s), {self.precision}",
                 f"  parameters        {self.parameters:,} ({self.trainable_parameters:,} trainable)",
                 f"  per step          {self.tokens_per_step:,} tokens; {self.micro_batches_per_step} micro-batch(es) "
                 f"of {self.micro_batch_size} × {self.sequence_length} per GPU; {steps}",
                 "  memory per GPU    GiB"]
        for key, value in self.memory.items():
            if key == "total" or (value == 0 and key.startswith("dp_")):
                continue
            note = f"÷ {n}" if where.get(key) else ("replicated" if key in where else "")
            if key in ("optimizer_state",) and self.parallel == "zero3-offload":
                note = f"on CPU: {self.cpu_memory_per_rank_bytes / GIB:.2f} GiB per rank"
            lines.append(f"    {key.replace('_', ' '):<28}{value / GIB:>8.2f}  {note}")
        if self.phases["dp_clipping"]:
            lines.append(f"    micro-batch peak: forward+backward {self.phases['forward_backward'] / GIB:.2f}, "
                         f"DP clipping {self.phases['dp_clipping'] / GIB:.2f}: the larger counts")
        lines.append(f"    {'total':<28}{self.total / GIB:>8.2f}  {self.summary_line().split(': ', 1)[1]}")
        return "\n".join(lines)


def plan_resources(cfg, *, nodes: int = 1, gpus_per_node: int = 1, gpu_memory_gib: float = 80.0,
                   num_units: int | None = None, arch: Architecture | None = None) -> ResourcePlan:
    """The plan of a run config (a ``TrainingRun``) on ``nodes`` × ``gpus_per_node`` GPUs."""
    from privtune.trainers.dp.terms import use_ghost
    from privtune.trainers.plan import training_steps

    for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node),
                        ("--gpu-memory", gpu_memory_gib)):
        if not value > 0 or flag != "--gpu-memory" and value != int(value):
            raise UserError(f"{flag} {value:g} is not a positive {'number' if flag == '--gpu-memory' else 'integer'}",
                            "pass e.g. --nodes 1 --gpus-per-node 8 --gpu-memory 80")
    method, parallel, perf = cfg.train.method, cfg.performance.parallel, cfg.performance
    if method == "none":
        raise UserError("train.method=none trains nothing, so there is nothing to plan", "set train.method")
    N = nodes * gpus_per_node
    if parallel == "single" and N > 1:
        raise UserError(f"performance.parallel=single runs one process, not {N}", "use ddp, fsdp2 or zero1..3")
    arch = arch or architecture(cfg.model.name)
    bf16 = perf.precision == "bf16" or cfg.model.dtype == "bfloat16"
    e = w = 2 if bf16 else 4
    f32_copy = 4 if bf16 else 0  # an fp32 copy of a bf16 tensor (none when it is fp32 already)
    b, T, h, V = perf.micro_batch_size, cfg.data.max_length, arch.hidden, arch.vocab
    t = b * T  # tokens per micro-batch
    micro_batches = -(-cfg.train.batch_size // (b * nodes * gpus_per_node))  # per GPU and step
    dp, lora = cfg.is_dp, method in ("lora", "dp-lora")
    linears, L = arch.linears(), arch.layers
    psi = arch.parameters()
    adapted = arch.lora_targets(cfg.train.lora.target_modules) if lora else ()
    r = cfg.train.lora.r
    psi_t = L * sum(r * (lin.d_in + lin.d_out) for lin in adapted) if lora else psi
    shard_p, shard_g, shard_o = (N if s else 1 for s in SHARDS[parallel])

    mem = {"parameters": psi * w // shard_p}
    # DP: under single/ddp with fp32 weights the clipped-sum buffer itself becomes .grad (DPEngine.set_grads); a
    # sharded preset reduce-scatters it into fp32 shards.
    grad_bytes = 4 if dp and shard_g > 1 else w
    mem["gradients"] = 0 if dp and parallel in ("single", "ddp") and w == 4 else psi_t * grad_bytes // shard_g
    optimizer = psi_t * (8 + (4 if bf16 else 0))  # AdamW m and v in fp32, plus the fp32 master copy under bf16
    offload = parallel == "zero3-offload"
    mem["optimizer_state"] = 0 if offload else optimizer // shard_o
    unit = max(arch.layer_parameters(), V * h)  # the largest unit one gather materialises
    mem["gathered_parameters"] = unit * w if shard_p > 1 else 0

    # Autograd's saved tensors per token and decoder layer, inputs of trainable linears apart (listed below):
    # norms (RMSNorm: its fp32 input and the normalised value; LayerNorm: its input), attention q, k, v at the
    # query width (k, v repeated to every head; sdpa also keeps its output; eager keeps the probabilities in fp32,
    # plus a bf16 copy), MLP elementwise (gated: gate, up and act(gate); GELU: its input).
    norm = h * (e if arch.family == "gpt_neox" else 4 + e)
    q = arch.heads * arch.head_dim
    attn = (3 + (arch.attention == "sdpa")) * q * e
    if arch.attention == "eager":
        attn += arch.heads * T * (4 + (e if bf16 else 0))
    mlp = (arch.intermediate if arch.family == "gpt_neox" else 3 * arch.intermediate) * e
    mask = b * T * T * e if arch.attention == "eager" else 0  # the 4-D causal mask, shared by the layers
    mem["activations"] = t * (L * (2 * norm + attn + mlp) + norm) + mask
    # Logits b × T × V: the fp32 upcast, its shifted copy and the log-probabilities, plus the bf16 logits.
    mem["logits"] = t * V * (12 + (e if bf16 else 0))

    # Inputs of trainable linears: autograd saves them for the weight gradients; the DP engine captures them (A).
    trainable_reads = {lin.reads: lin.d_in for lin in (adapted if lora else linears)}
    inputs = L * (sum(trainable_reads.values()) + r * len(adapted)) + (0 if lora else h)  # + LM head input
    linear_inputs = t * inputs * e
    dp_keys = ("dp_captured_inputs", "dp_output_grads", "dp_clip_copies", "dp_per_unit_buffers",
               "dp_clipped_sum", "dp_noise_buffers")
    mem.update(dict.fromkeys(dp_keys, 0))  # the same keys for every method: --json stays one shape
    if not dp:
        mem["activations"] += linear_inputs
        fwd_bwd, clip = mem["activations"] + mem["logits"], 0
    else:
        mem["dp_captured_inputs"] = linear_inputs
        # Output gradients G of every hooked layer, kept to the end of the backward: LoRA A (r) and B (d_out);
        # full DP: every linear, the LM head (V), the embedding (h), and each norm (its G and its captured input).
        g_linear = L * (sum(r + lin.d_out for lin in adapted) if lora else sum(lin.d_out for lin in linears))
        g_others = 0 if lora else V + h + (2 * L + 1) * 2 * h
        mem["dp_output_grads"] = t * (g_linear + g_others) * e
        mem["dp_clip_copies"] = t * (inputs + g_linear + (0 if lora else V + h)) * f32_copy  # .to(fp32) of A, G
        # Per-unit buffers, one parameter at a time (the largest counts): an instantiated per-unit gradient
        # b × d_out × d_in (LoRA factors: b × r × d), or the ghost norm's two b × T × T Gram matrices (full DP: also
        # the embedding's b × T × h aggregate); plus the cached activation Gram matrix b × T × T of every distinct
        # input read by a ghost-normed layer.
        shapes = ([(lin.d_in, r) for lin in adapted] + [(r, lin.d_out) for lin in adapted] if lora
                  else [(lin.d_in, lin.d_out) for lin in linears] + [(h, V)])
        ghost = {s: use_ghost(T, *s, strategy="auto", force_instantiate=lora) for s in shapes}
        largest = max([2 * T * T if ghost[s] else s[0] * s[1] for s in shapes] + ([] if lora else [T * h]))
        grams = 0 if lora else L * len({lin.reads for lin in linears if ghost[(lin.d_in, lin.d_out)]}) + ghost[(h, V)]
        mem["dp_per_unit_buffers"] = b * 4 * (largest + grams * T * T)
        mem["dp_clipped_sum"] = psi_t * 4  # full size on every rank, whatever the preset
        threads = perf.num_threads or (1 if gpus_per_node > 1 else os.cpu_count() or 1)  # torchrun: 1 per process
        mem["dp_noise_buffers"] = threads * NOISE_CHUNK * 4
        # (DPEngine.backward drops each capture's A and G when it returns, and DPStep.run the loss: nothing of a
        # micro-batch outlives its backward.)
        fwd_bwd = mem["activations"] + mem["logits"] + linear_inputs
        clip = (linear_inputs + mem["dp_output_grads"] + mem["dp_clip_copies"] + mem["dp_per_unit_buffers"])
    persistent = sum(v for k, v in mem.items() if k in
                     ("parameters", "gradients", "optimizer_state", "gathered_parameters", "dp_clipped_sum",
                      "dp_noise_buffers"))
    mem["total"] = persistent + max(fwd_bwd, clip)
    gpu_bytes = int(gpu_memory_gib * GIB)
    steps = training_steps(cfg, num_units) if num_units or cfg.train.max_steps else None
    return ResourcePlan(
        model=cfg.model.name, method=method, parallel=parallel, precision="bf16" if bf16 else "fp32", nodes=nodes,
        gpus_per_node=gpus_per_node, world_size=N, gpu_memory_bytes=gpu_bytes, micro_batch_size=b,
        sequence_length=T, parameters=psi, trainable_parameters=psi_t, memory=mem,
        phases={"forward_backward": fwd_bwd, "dp_clipping": clip},
        cpu_memory_per_rank_bytes=optimizer // N if offload else 0, fits=mem["total"] <= USABLE * gpu_bytes,
        tokens_per_step=cfg.train.batch_size * T, micro_batches_per_step=micro_batches,
        steps=steps, training_units=num_units)


def with_changes(cfg, **sections):
    """``cfg`` with fields of its sections replaced, e.g. with_changes(cfg, performance={"parallel": "fsdp2"})."""
    return cfg.model_copy(update={k: getattr(cfg, k).model_copy(update=v) for k, v in sections.items()})


def smallest_fix(cfg, *, nodes: int, gpus_per_node: int, gpu_memory_gib: float,
                 arch: Architecture | None = None) -> str | None:
    """The first change that fits, in this order: a smaller micro-batch, zero3/fsdp2, more GPUs, LoRA (then the
    same pairs with zero3/fsdp2 or LoRA). None when nothing tried fits."""
    arch = arch or architecture(cfg.model.name)

    def fits(c, n=nodes):
        return plan_resources(c, nodes=n, gpus_per_node=gpus_per_node, gpu_memory_gib=gpu_memory_gib,
                              arch=arch).fits

    def smaller_batch(c):
        return next((m for m in range(c.performance.micro_batch_size - 1, 0, -1)
                     if fits(with_changes(c, performance={"micro_batch_size": m}))), None)

    def more_nodes(c):
        if not any(SHARDS[c.performance.parallel]):  # replicated: more GPUs do not lower the memory per GPU
            return None
        return next((n for n in range(nodes + 1, 65) if fits(c, n)), None)

    sharded = with_changes(cfg, performance={"parallel": "fsdp2"})
    can_shard = not SHARDS[cfg.performance.parallel][0]
    lora = {"dp": "dp-lora", "full": "lora"}.get(cfg.train.method)
    adapted = with_changes(cfg, train={"method": lora}) if lora else None
    gpus = f"GPUs ({gpus_per_node} per node)"
    tries = [
        (lambda: smaller_batch(cfg), lambda m: f"performance.micro_batch_size={m}"),
        (lambda: can_shard and fits(sharded), lambda _: "performance.parallel=fsdp2 (or zero3)"),
        (lambda: more_nodes(cfg), lambda n: f"--nodes {n} ({n * gpus_per_node} {gpus})"),
        (lambda: adapted is not None and fits(adapted), lambda _: f"train.method={lora}"),
        (lambda: can_shard and smaller_batch(sharded),
         lambda m: f"performance.parallel=fsdp2 performance.micro_batch_size={m}"),
        (lambda: can_shard and more_nodes(sharded), lambda n: f"performance.parallel=fsdp2 --nodes {n}"),
        (lambda: adapted is not None and smaller_batch(adapted),
         lambda m: f"train.method={lora} performance.micro_batch_size={m}"),
        (lambda: adapted is not None and can_shard and fits(with_changes(adapted, performance={"parallel": "fsdp2"})),
         lambda _: f"train.method={lora} performance.parallel=fsdp2"),
    ]
    for attempt, words in tries:
        found = attempt()
        if found:
            return words(found)
    return None
