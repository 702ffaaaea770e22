"""Device, precision and seeding: where kd runs, and why it chose that.

Every command that runs a model goes through ``make_accelerator`` so one process
on a laptop CPU and eight under ``accelerate launch`` take the same code path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdcli import __version__
from kdcli.errors import KdError

# What `accelerate launch --use_fsdp / --use_deepspeed` (or a config that asks for them) sets.
SHARDING_FLAGS = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED"}


def check_trackers(trackers: Sequence[str]) -> None:
    """Refuse experiment trackers whose package is missing: accelerate would leave them out without a word.
    Each tracker's module, and the kd extra that installs it, has the tracker's name."""
    missing = [name for name in trackers if importlib.util.find_spec(name) is None]
    if missing:
        are = "package is" if len(missing) == 1 else "packages are"
        raise KdError(f"log.report_to: the {', '.join(missing)} {are} not installed",
                      f"pip install 'kdcli[{','.join(missing)}]' (or pip install {' '.join(missing)}), or take "
                      "the tracker out of log.report_to")


def make_accelerator(mixed_precision: str = "no", trackers: Sequence[str] = (), logging_dir: Path | None = None):
    """An Accelerator on the GPU when there is one, else on the CPU (gloo when several processes),
    reporting to ``trackers`` with their local files under ``logging_dir`` (``train`` starts a run per job)."""
    import torch
    from accelerate import Accelerator

    check_trackers(trackers)

    on_cpu = not torch.cuda.is_available()
    asked = [name for name, flag in SHARDING_FLAGS.items() if os.environ.get(flag, "").lower() == "true"]
    if on_cpu and asked:
        # accelerate (1.15) shards on GPUs only: on CPU, FSDP1 fails to start ("no available devices
        # found"), and FSDP2 and DeepSpeed leave the model to DDP without a word.
        raise KdError(f"{asked[0]} was asked for, but this machine has no GPU and accelerate shards on GPUs only "
                      "(on CPU it would fail to start or train with DDP instead)",
                      "run on GPUs, or launch without --use_fsdp / --use_deepspeed (torchrun, or an accelerate "
                      "config without FSDP or DeepSpeed) to train with DDP on CPU")
    if on_cpu and mixed_precision == "fp16":
        # fp16 autocast with gradient scaling is a CUDA feature; on CPU it would fail deep inside torch.
        mixed_precision = "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=on_cpu, log_with=list(trackers) or None,
                              project_dir=str(logging_dir) if trackers else None)
    check_model_loading(accelerator)
    return accelerator


def check_model_loading(accelerator) -> None:
    """Refuse sharding settings under which a process loads models empty or partitioned: kd's teachers
    are never handed to FSDP or DeepSpeed, and kd builds students from them, so each process needs
    whole models (the student is sharded when training starts)."""
    fsdp = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp is not None and fsdp.cpu_ram_efficient_loading:
        raise KdError("FSDP's cpu_ram_efficient_loading loads models on the first process of each machine only: "
                      "kd's teachers would be empty on the others",
                      "pass --fsdp_cpu_ram_efficient_loading false to accelerate launch "
                      "(fsdp_cpu_ram_efficient_loading: false in the accelerate config)")
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None and deepspeed.zero3_init_flag:
        raise KdError("DeepSpeed's zero3_init_flag partitions every model as it loads: kd's teachers, which "
                      "DeepSpeed never runs, could not run",
                      "pass --zero3_init_flag false to accelerate launch (zero3_init_flag: false in the accelerate "
                      "config): DeepSpeed then partitions the student when training starts")


def process_state():
    """accelerate's per-process state, set up exactly as ``make_accelerator`` sets it up.

    A bare ``PartialState()`` on a CPU machine decides it is a single process, even under
    torchrun, and every Accelerator made afterwards inherits that; so kd always asks with ``cpu``.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def from_main_process(processes: Any, value: Any) -> Any:
    """``value`` as the main process has it, on every process of ``processes`` (an Accelerator; each
    process must call this at the same point); ``value`` itself for one process or None."""
    if processes is None or processes.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def busy_cores() -> float | None:
    """The 1-minute load average (runnable processes, about the busy cores); None where unknown."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


@functools.cache  # the processor does not change while kd runs; describe() is called for every result
def _cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(accelerator=None, dtype: str | None = None, why: str = "",
             requested_precision: str | None = None) -> dict[str, Any]:
    """What ran where: recorded in env.json and in every eval/bench result."""
    import torch
    import transformers

    info: dict[str, Any] = {
        "kd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": busy_cores(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if accelerator is not None:
        info["device"] = str(accelerator.device)
        info["processes"] = accelerator.num_processes
        info["mixed_precision"] = accelerator.mixed_precision
        if requested_precision and requested_precision != accelerator.mixed_precision:
            info["mixed_precision_note"] = (
                f"the recipe asked for {requested_precision}; fp16 with loss scaling needs a GPU, "
                "so this CPU run used full precision"
            )
    if dtype:
        info["dtype"] = dtype
        info["dtype_reason"] = why
    return info
