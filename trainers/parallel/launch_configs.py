"""The launcher configs a preset implies, written into the run dir for users to read and reuse.

Owns: ``accelerate_config`` (an ``accelerate launch --config_file`` YAML for the preset, world size and precision)
and ``write_launch_configs`` (``RUN_DIR/parallel/accelerate.yaml`` and, for the ZeRO presets,
``RUN_DIR/parallel/deepspeed.json``, the very DeepSpeed config the run initialises DeepSpeed with).

privtune shards the model itself (``fully_shard`` / ``deepspeed.initialize``), so under
``accelerate launch --config_file RUN_DIR/parallel/accelerate.yaml -m privtune run CONFIG`` accelerate only starts
the processes (GPU machines; on the CPU ``accelerate launch`` starts one process and is refused). The files'
FSDP / DeepSpeed sections describe the same sharding for a user's own accelerate scripts.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from privtune.atomic import atomic_write_text

_DISTRIBUTED_TYPE = {"single": "NO", "ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero1": "DEEPSPEED",
                     "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "zero3-offload": "DEEPSPEED"}


def accelerate_config(preset: str, *, num_processes: int, num_machines: int = 1, precision: str = "fp32",
                      layer_class: str | None = None, deepspeed_file: str = "deepspeed.json") -> dict:
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": _DISTRIBUTED_TYPE[preset] if num_processes > 1 or preset.startswith("zero") else "NO",
        "mixed_precision": "bf16" if precision == "bf16" else "no",
        "num_machines": num_machines,
        "num_processes": num_processes,
        "machine_rank": 0,
        "main_training_function": "main",
        "use_cpu": False,
        "rdzv_backend": "static",
        "same_network": True,
        "downcast_bf16": "no",
    }
    if preset == "fsdp2":
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": layer_class or "",
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_offload_params": False,
        }
    if preset.startswith("zero"):
        config["deepspeed_config"] = {"deepspeed_config_file": deepspeed_file, "zero3_init_flag": False}
    return config


def write_launch_configs(run_dir: Path, *, preset: str, num_processes: int, precision: str,
                         layer_class: str | None, deepspeed: dict | None) -> list[Path]:
    """Rank 0: write the files; returns their paths."""
    folder = Path(run_dir) / "parallel"
    written = []
    if deepspeed is not None:
        atomic_write_text(folder / "deepspeed.json", json.dumps(deepspeed, indent=2, sort_keys=True) + "\n")
        written.append(folder / "deepspeed.json")
    config = accelerate_config(preset, num_processes=num_processes, precision=precision, layer_class=layer_class,
                               deepspeed_file=str((folder / "deepspeed.json").resolve()))
    header = (f"# performance.parallel={preset}, {num_processes} processes, precision {precision}: written by privtune.\n"
              f"# accelerate launch --config_file {folder / 'accelerate.yaml'} -m privtune run CONFIG  (GPU machines)\n")
    atomic_write_text(folder / "accelerate.yaml", header + yaml.safe_dump(config, sort_keys=True))
    written.append(folder / "accelerate.yaml")
    return written
