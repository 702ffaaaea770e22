"""Device, precision and seeding: where kd runs, and why it chose that.

Every command that runs a model goes through ``make_accelerator`` so one process
on a laptop CPU and eight under ``accelerate launch`` take the same code path.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from kdcli import __version__


def make_accelerator(mixed_precision: str = "no"):
    """An Accelerator on the GPU when there is one, else on the CPU (gloo when several processes)."""
    import torch
    from accelerate import Accelerator

    on_cpu = not torch.cuda.is_available()
    if on_cpu and mixed_precision == "fp16":
        # fp16 autocast with gradient scaling is a CUDA feature; on CPU it would fail deep inside torch.
        mixed_precision = "no"
    return Accelerator(mixed_precision=mixed_precision, cpu=on_cpu)


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
