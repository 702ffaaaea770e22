"""`kd bench`: latency, throughput, size and memory of a model on real inputs.

What is timed is the model's forward pass on batches that are already tokenised and on
the device: the study's "inference time" is the model's, and tokenisation is the same
for a teacher and a student that share a tokenizer. Each batch size gets ``warmup``
untimed runs, then ``iters`` timed ones (CUDA synchronised around each); the batches
cycle through real examples of the test split, so padding and lengths are realistic.

Batch 1 is always measured (it is what ``kd compare`` reports as ms/example), before the
recipe's ``bench.batch_sizes``.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` from the moment the model is on
the GPU (weights plus activations). On CPU, the process's peak resident memory (VmHWM)
during the timed runs, after resetting the high-water mark where Linux allows it
(``/proc/self/clear_refs``); it includes the Python runtime and libraries, so compare it
between models measured on the same machine. Where the reset is impossible the number is
the whole process's peak (``memory_kind`` says which).
"""

from __future__ import annotations

import gc
import os
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import KdError, ModelError

if TYPE_CHECKING:
    from rich.console import Console

    from kdcli.models import TaskModel
    from kdcli.recipe import Recipe
    from kdcli.rundir import RunDir


def _input_batches(model: "TaskModel", rows: list[dict], batch_size: int, count: int, max_length: int,
                   template: str | None) -> list[dict]:
    """Up to ``count`` distinct encoded batches of ``batch_size`` rows, on the model's device.

    Rows are reused in order when the split has fewer than ``batch_size * count`` of them.
    """
    distinct = max(1, min(count, len(rows) // batch_size))
    batches = []
    for b in range(distinct):
        chunk = [rows[(b * batch_size + i) % len(rows)] for i in range(batch_size)]
        if model.task == "generate":  # the prompts alone: the answer is what gets timed
            encoded = model.encode_prompts(chunk, max_length, template)
        else:
            encoded = model.encode(chunk, max_length, template)
        batches.append({k: v.to(model.device) for k, v in encoded.items() if k != "labels"})
    return batches


def _reset_peak_memory(device) -> str:
    """Start a fresh peak-memory measurement; returns what the peak will mean."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident size
        return "rss_peak_during_bench"
    except OSError:
        return "rss_peak_of_process"


def _peak_memory_bytes(device, kind: str) -> int:
    import torch

    if kind == "cuda_max_allocated":
        return int(torch.cuda.max_memory_allocated(device))
    if kind == "rss_peak_during_bench":
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _summary(values: list[float]) -> dict[str, float]:
    import numpy as np

    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": float(p50), "p95": float(p95), "mean": float(np.mean(values))}


def bench_model(model: "TaskModel", rows: list[dict], *, batch_sizes: list[int], warmup: int, iters: int,
                threads: int | None = None, max_length: int = 128, template: str | None = None,
                max_new_tokens: int | None = None) -> dict[str, Any]:
    """Time ``model.forward`` at each batch size (batch 1 first) and measure peak memory.

    generate: the timed call is greedy generation of up to ``max_new_tokens`` tokens (stopping at
    EOS, as in use), so examples/s are questions answered per second.

    Returns ``threads``, ``device``, ``dtype``, ``peak_memory_bytes``, ``memory_kind`` and
    ``batches``: per batch size, ``latency_ms_per_example`` and ``batch_ms`` (p50/p95/mean
    over the timed runs) and ``throughput`` (examples/s at the mean batch time).
    """
    import torch

    if not rows:
        raise KdError("there are no examples to benchmark with", "check the recipe's test split")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sizes = [1] + [b for b in dict.fromkeys(batch_sizes) if b != 1]
    results: dict[str, Any] = {}
    if model.task == "generate":  # questions/s includes generating the answer
        def run_once(batch):
            return model.generate_ids(batch, max_new_tokens or 16)
    else:
        run_once = model.forward
    try:
        memory_kind = _reset_peak_memory(device)
        with torch.inference_mode():
            for size in sizes:
                batches = _input_batches(model, rows, size, warmup + iters, max_length, template)
                for i in range(warmup):
                    run_once(batches[i % len(batches)])
                batch_seconds = []
                for i in range(iters):
                    batch = batches[(warmup + i) % len(batches)]
                    sync()
                    started = time.perf_counter()
                    run_once(batch)
                    sync()
                    batch_seconds.append(time.perf_counter() - started)
                mean = sum(batch_seconds) / len(batch_seconds)
                results[str(size)] = {
                    "batch_size": size,
                    "iters": iters,
                    "latency_ms_per_example": _summary([s * 1000 / size for s in batch_seconds]),
                    "batch_ms": _summary([s * 1000 for s in batch_seconds]),
                    "throughput": size / mean,
                }
        peak = _peak_memory_bytes(device, memory_kind)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "threads": used_threads,
        "device": str(device),
        "dtype": str(model.model.dtype).removeprefix("torch."),
        "timed": (f"greedy generation of up to {max_new_tokens or 16} new tokens on tokenised prompts already on the device "
                  "(tokenisation and decoding excluded)" if model.task == "generate"
                  else "model forward on tokenised batches already on the device (tokenisation excluded)"),
        "peak_memory_bytes": peak,
        "memory_kind": memory_kind,
        "batches": results,
    }


# --------------------------------------------------------------------------- roles


def saved_model_dir(recipe: "Recipe", run: "RunDir", role: str) -> Path | None:
    """The directory a role's weights are loaded from, when there is one on this machine."""
    from kdcli.engine import teacher_spec, trained_role
    from kdcli.models import resolve_ref

    if trained_role(role):
        return run.final(role)
    if role == "baseline":
        return None  # built in memory (cut from a teacher, or a Hub model's untrained head)
    ref = teacher_spec(recipe, run, role.split(":", 1)[1]).ref if role.startswith("teacher:") else role
    try:
        path = Path(resolve_ref(ref))
    except ModelError:
        return None
    return path if path.is_dir() else None


def size_on_disk(path: Path | None) -> int | None:
    """Bytes of the weight files in a model directory (safetensors when present, else any weight format)."""
    from kdcli.models import WEIGHT_SUFFIXES

    if path is None or not path.is_dir():
        return None
    files = sorted(path.rglob("*.safetensors")) or sorted(p for p in path.rglob("*") if p.name.endswith(WEIGHT_SUFFIXES))
    return sum(f.stat().st_size for f in files) if files else None


def roles_for_all(recipe: "Recipe", run: "RunDir") -> list[str]:
    """`--model all`: every teacher, the baseline, and the dataset, single-teacher and student models once trained."""
    roles = [f"teacher:{name}" for name in recipe.teachers] + ["baseline"]
    trained = ["dataset", *(f"student:{name}" for name in recipe.single_teacher_students), "student"]
    roles += [role for role in trained if (run.final(role) / "config.json").is_file()]
    return roles


def bench_role(recipe: "Recipe", role: str, console: "Console | None" = None) -> dict[str, Any]:
    """Benchmark one role on the last stage's test split; save and return ``runs/NAME/bench/ROLE.json``."""
    from rich.console import Console

    from kdcli.engine import check_role, load_role, stage_data
    from kdcli.evaluate import model_description, parameter_count, place
    from kdcli.rundir import RunDir, write_json
    from kdcli.runtime import busy_cores, describe

    console = console or Console(stderr=True)
    run = RunDir.for_recipe(recipe)
    stage = recipe.resolved_stages()[-1]
    check_role(recipe, role)  # a missing model is reported before any data is prepared
    data = stage_data(recipe, run, stage, console)
    split = "test" if data.rows.get("test") else recipe.eval.split
    rows = data.rows.get(split, [])[: recipe.bench.max_examples]
    model = load_role(recipe, role, data.num_classes)
    device = place(model)
    load = busy_cores()
    # kd's own threads count in the load (an earlier role kept every core busy), so only more
    # runnable threads than cores means other processes share them: the timings then measure those too.
    if device.type == "cpu" and load is not None and load > (os.cpu_count() or 1) + 0.5:
        console.print(f"[yellow]warning: the machine is busy (load {load:g} on {os.cpu_count()} cores): "
                      f"the timings of {role} will be slower and noisier than on an idle machine[/]")
    cfg = recipe.bench
    measured = bench_model(model, rows, batch_sizes=cfg.batch_sizes, warmup=cfg.warmup, iters=cfg.iters,
                           threads=cfg.threads, max_length=stage.data.max_length, template=stage.data.template,
                           max_new_tokens=recipe.eval.max_new_tokens)
    directory = saved_model_dir(recipe, run, role)
    result = {
        "role": role,
        "model": model_description(recipe.model_dump(mode="json"), role),
        "ref": str(model.model.name_or_path),
        "task": recipe.task,
        "stage": stage.name,
        "split": split,
        "inputs": len(rows),
        "parameters": parameter_count(model),
        "size_bytes": size_on_disk(directory),
        "size_path": str(directory) if directory else None,
        **measured,
        "warmup": cfg.warmup,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "env": describe(),
    }
    del model
    gc.collect()  # the next role's memory peak should not include this model
    write_json(run.bench(role), result)
    result["path"] = str(run.bench(role))
    return result


def latest_run(root: Path = Path("runs")) -> Path:
    """The resolved recipe of the most recently changed run under ``root`` (for `kd bench` without a recipe)."""
    runs = [p.parent for p in root.glob("*/recipe.resolved.toml")]
    if not runs:
        raise KdError(f"no runs under ./{root}", "give the recipe: `kd bench RECIPE --model student`")

    def changed(run: Path) -> float:
        return max(p.stat().st_mtime for p in [run, *run.iterdir()])

    return max(runs, key=changed) / "recipe.resolved.toml"
