"""`kd bench`: latency, throughput, size and memory of a model on real inputs.

What is timed is the model's forward pass on batches that are already tokenised and on
the device: the study's "inference time" is the model's, and tokenisation is the same
for a teacher and a student that share a tokenizer. Each batch size gets ``warmup``
untimed runs, then ``iters`` timed ones (CUDA synchronised around each); the batches
cycle through real examples of the test split, so padding and lengths are realistic.

The timed batches are consecutive rows of the split, in data order: unlike kd's own inference
passes (the cache, `kd eval`, validation; ``kdcli.batching``), bench does not sort rows by length.
It measures what a batch costs as requests arrive together, whatever their lengths, which is what
a server sees and what every earlier bench result measured; a batch padded to its longest row is
part of that cost. Sorted, the same batch size would report a throughput no server could reach
without first holding requests back to group them. The throughput of a whole sorted pass is
`kd eval`'s ``examples_per_second``.

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

from kdcli.data.stage import stage_data
from kdcli.errors import KdError
from kdcli.models import WEIGHT_SUFFIXES, place
from kdcli.recipe import Recipe
from kdcli.roles import Role, check, every_role, load, result_header, saved_dir
from kdcli.rundir import RunDir, write_json
from kdcli.tasks import TaskKind, task_kind

if TYPE_CHECKING:
    from rich.console import Console

    from kdcli.models import TaskModel


def _input_batches(task: TaskKind, model: "TaskModel", rows: list[dict], batch_size: int, count: int, max_length: int,
                   template: str | None) -> list[dict]:
    """Up to ``count`` distinct encoded batches of ``batch_size`` rows, on the model's device.

    Rows are taken in data order, not sorted by length (see the module docstring), and reused in
    order when the split has fewer than ``batch_size * count`` of them.
    """
    distinct = max(1, min(count, len(rows) // batch_size))
    batches = []
    for b in range(distinct):
        chunk = [rows[(b * batch_size + i) % len(rows)] for i in range(batch_size)]
        batches.append(task.bench_inputs(model, chunk, max_length, template))
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
    task = task_kind(model.task)
    run_once, timed = task.bench_call(model, max_new_tokens or 16)
    try:
        memory_kind = _reset_peak_memory(device)
        with torch.inference_mode():
            for size in sizes:
                batches = _input_batches(task, model, rows, size, warmup + iters, max_length, template)
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
        "timed": timed,
        "peak_memory_bytes": peak,
        "memory_kind": memory_kind,
        "batches": results,
    }


# --------------------------------------------------------------------------- roles


def size_on_disk(path: Path | None) -> int | None:
    """Bytes of the weight files in a model directory (safetensors when present, else any weight format, an
    export's ONNX graph included)."""
    if path is None or not path.is_dir():
        return None
    files = (sorted(path.rglob("*.safetensors"))
             or sorted(p for p in path.rglob("*") if p.name.endswith((*WEIGHT_SUFFIXES, ".onnx"))))
    return sum(f.stat().st_size for f in files) if files else None


def roles_for_all(recipe: Recipe, run: RunDir) -> list[Role]:
    """`--model all`: every teacher, the baseline, and the dataset, single-teacher and student models once trained."""
    return [role for role in every_role(recipe) if not role.trained or (run.final(role) / "config.json").is_file()]


def bench_role(recipe: Recipe, role: Role, console: "Console | None" = None) -> dict[str, Any]:
    """Benchmark one role on the last stage's test split; save and return ``runs/NAME/bench/ROLE.json``."""
    from rich.console import Console

    from kdcli.runtime import busy_cores
    from kdcli.runtime import describe as environment

    console = console or Console(stderr=True)
    run = RunDir.for_recipe(recipe)
    stage = recipe.resolved_stages()[-1]
    check(recipe, role)  # a missing model is reported before any data is prepared
    data = stage_data(recipe, run, stage, replace=False)
    split = "test" if data.rows.get("test") else recipe.eval.split
    rows = data.rows.get(split, [])[: recipe.bench.max_examples]
    model = load(recipe, role, data.num_classes)
    device = place(model)
    load_average = busy_cores()
    # kd's own threads count in the load (an earlier role kept every core busy), so only more
    # runnable threads than cores means other processes share them: the timings then measure those too.
    if device.type == "cpu" and load_average is not None and load_average > (os.cpu_count() or 1) + 0.5:
        console.print(f"[yellow]warning: the machine is busy (load {load_average:g} on {os.cpu_count()} cores): "
                      f"the timings of {role} will be slower and noisier than on an idle machine[/]")
    cfg = recipe.bench
    measured = bench_model(model, rows, batch_sizes=cfg.batch_sizes, warmup=cfg.warmup, iters=cfg.iters,
                           threads=cfg.threads, max_length=stage.data.max_length, template=stage.data.template,
                           max_new_tokens=recipe.eval.max_new_tokens)
    directory = saved_dir(recipe, run, role)
    result = {
        **result_header(recipe, role, model, stage.name, split),
        "inputs": len(rows),
        "size_bytes": size_on_disk(directory),
        "size_path": str(directory) if directory else None,
        **measured,
        "warmup": cfg.warmup,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "env": environment(),
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
