"""`kd bench`: latency, throughput, size and memory of models on real inputs, timed so that a
difference between two models is theirs and not the machine's.

What is timed is the model's forward pass on batches that are already tokenised and on the device:
the study's "inference time" is the model's, and tokenisation is the same for a teacher and a
student that share a tokenizer (generate: greedy generation, stopping at EOS as in use). The batches
cycle through real examples of the test split, so padding and lengths are realistic.

The timed batches are consecutive rows of the split, in data order: unlike kd's own inference
passes (the cache, `kd eval`, validation; ``kdcli.batching``), bench does not sort rows by length.
It measures what a batch costs as requests arrive together, whatever their lengths, which is what
a server sees; a batch padded to its longest row is part of that cost. The throughput of a whole
sorted pass is `kd eval`'s ``examples_per_second``. Batch 1 is always measured (it is what `kd
compare` reports as ms/example), before the recipe's ``bench.batch_sizes``.

How it is timed. The models of one `kd bench` (every role with `--model all`, as `kd run` does) are
loaded together and timed round-robin: in each round every model runs each batch size once, and
each round starts with the next model. A burst of load on a shared machine then falls on all of
them alike rather than on whichever was being timed, and each round is a paired sample: `kd
compare` divides two models' times round by round. One sample is a block of calls lasting at
least ``BLOCK_SECONDS`` (a single call when one is slower), its time per call: blocks average away
the timer's and Python's overhead, as ``torch.utils.benchmark``'s ``blocked_autorange`` does; that
timer measures one statement at a time and cannot interleave models, hence this loop. After
``bench.warmup`` untimed calls, at least ``bench.iters`` rounds run, then more until every median's
95% interval is within ``bench.precision`` of it or ``bench.max_seconds`` have passed.

Each batch size reports the median time per example and per batch with a distribution-free 95%
confidence interval of the median (order statistics: nothing assumed about the shape of the noise)
and the interquartile range of the rounds, and the throughput at the median. CUDA is synchronised
around every block.

Memory, per model, as two parts, since the models of a session share one process: its weights (the
bytes of its tensors; an export's files) and what its first calls at every batch size added on top
(the warm-up, before the next model loads). On CUDA the calls' part is
``torch.cuda.max_memory_allocated`` over them less what was allocated before; on CPU the process's
peak resident memory (VmHWM, reset through ``/proc/self/clear_refs``) less the resident memory
before. Where Linux does not allow the reset the calls' part is unknown (None). Loading is measured
the same way (``load_memory_bytes``: the peak over loading and placing the model, less what was held
before), which is where an 8-bit teacher can need more than its full-precision self: transformers
reads the full weights before quantising them. A model's own process gives the cleanest figure
(``benchmarks/teacher_8bit.py`` loads each one in a fresh process).
"""

from __future__ import annotations

import gc
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kdcli.data.stage import stage_data
from kdcli.errors import KdError, ModelError
from kdcli.models import WEIGHT_SUFFIXES, place
from kdcli.recipe import Recipe
from kdcli.roles import Role, check, every_role, load, result_header, saved_dir
from kdcli.rundir import RunDir, write_json
from kdcli.tasks import task_kind
from kdcli.timing import spread, tight

if TYPE_CHECKING:
    from rich.console import Console

    from kdcli.models import TaskModel

BLOCK_SECONDS = 0.05  # a sample's calls last at least this long


@dataclass
class Timed:
    """One model being timed: its call, its input batches and, by batch size, the calls in one of
    its blocks and its samples (seconds per call, one a round)."""

    name: str
    call: Callable[[Any], Any]
    batches: dict[int, list[Any]]
    calls: dict[int, int] = field(default_factory=dict)
    seconds: dict[int, list[float]] = field(default_factory=dict)
    _next: dict[int, int] = field(default_factory=dict)

    def block(self, size: int, calls: int, sync: Callable[[], None]) -> float:
        """Seconds per call over ``calls`` calls at ``size``, each on the next of its batches."""
        batches, first = self.batches[size], self._next.get(size, 0)
        sync()
        started = time.perf_counter()
        for i in range(first, first + calls):
            self.call(batches[i % len(batches)])
        sync()
        elapsed = time.perf_counter() - started
        self._next[size] = first + calls
        return elapsed / calls

    def warm_up(self, warmup: int, sync: Callable[[], None]) -> None:
        """``warmup`` untimed calls at each batch size, then one timed call that sets the size of its blocks."""
        for size in self.batches:
            if warmup:
                self.block(size, warmup, sync)
            once = self.block(size, 1, sync)
            self.calls[size] = max(1, min(1000, math.ceil(BLOCK_SECONDS / max(once, 1e-7))))
            self.seconds[size] = []


def time_round_robin(timed: list[Timed], *, rounds: int, precision: float, max_seconds: float,
                     sync: Callable[[], None] = lambda: None,
                     on_round: Callable[[int], None] = lambda done: None) -> int:
    """Rounds in which each model runs a block at each batch size, the first model of round r being
    ``timed[r % len(timed)]``: at least ``rounds`` of them, then more until every median's 95% interval
    is within ``precision`` of it or ``max_seconds`` have passed. Returns the rounds run."""
    started, done = time.perf_counter(), 0
    while True:
        lead = done % len(timed)
        for model in timed[lead:] + timed[:lead]:
            for size, calls in model.calls.items():
                model.seconds[size].append(model.block(size, calls, sync))
        done += 1
        on_round(done)
        if done >= rounds and (time.perf_counter() - started >= max_seconds
                               or all(tight(s, precision) for model in timed for s in model.seconds.values())):
            return done


def batch_results(model: Timed) -> dict[str, Any]:
    """Per batch size, the median and spread of the time per example and per batch, the throughput at the
    median, and the round-by-round times per example that `kd compare` pairs."""
    out = {}
    for examples, seconds in model.seconds.items():
        per_example = [s * 1000 / examples for s in seconds]
        batch = spread([s * 1000 for s in seconds])
        out[str(examples)] = {
            "batch_size": examples,
            "rounds": len(seconds),
            "calls_per_round": model.calls[examples],
            "latency_ms_per_example": spread(per_example),
            "batch_ms": batch,
            "throughput": examples * 1000 / batch["p50"],
            "ms_per_example_by_round": per_example,
        }
    return out


# --------------------------------------------------------------------------- memory


def _memory_mark(device) -> tuple[str | None, int]:
    """Start measuring what the next calls allocate: how it is measured (None: it cannot be), and the memory now."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_allocated", int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident size
        return "rss", _status_bytes("VmRSS:")
    except OSError:
        return None, 0


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _memory_since(device, kind: str | None, before: int) -> int | None:
    import torch

    if kind == "cuda_allocated":
        return int(torch.cuda.max_memory_allocated(device)) - before
    if kind == "rss":  # the kernel counts resident pages per CPU in batches: a few pages either way
        return max(0, _status_bytes("VmHWM:") - before)
    return None


def _weight_bytes(model: "TaskModel", directory: Path | None) -> int | None:
    """The bytes of a model's tensors (parameters and buffers); an export, which holds no torch tensors of
    its own, by its files."""
    tensors = [*model.model.parameters(), *model.model.buffers()] if hasattr(model.model, "parameters") else []
    if tensors:
        return sum(t.numel() * t.element_size() for t in tensors)
    return size_on_disk(directory)


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


def _input_batches(task, model: "TaskModel", rows: list[dict], size: int, count: int, max_length: int,
                   template: str | None) -> list[Any]:
    """Up to ``count`` distinct encoded batches of ``size`` rows in data order (see the module docstring), the
    rows reused in order when the split has fewer than ``size * count``."""
    distinct = max(1, min(count, len(rows) // size))
    return [task.bench_inputs(model, [rows[(b * size + i) % len(rows)] for i in range(size)], max_length, template)
            for b in range(distinct)]


def _loaded(recipe: Recipe, run: RunDir, role: Role, num_classes: int, split: str, rows: list[dict],
            sizes: list[int], sync: Callable[[], None]) -> tuple["TaskModel", Timed, dict[str, Any]]:
    """``role``'s model, loaded, placed and warmed up, ready for the rounds; and what its result says of it
    (the header, the model's kind, its size and what its weights and first calls hold in memory)."""
    import torch

    stage, cfg = recipe.resolved_stages()[-1], recipe.bench
    target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_kind, load_before = _memory_mark(target)
    model = load(recipe, role, num_classes)
    device = place(model)
    loading = _memory_since(target, load_kind, load_before)
    task = task_kind(model.task)
    call, timed_what = task.bench_call(model, recipe.eval.max_new_tokens or 16)
    with torch.inference_mode():
        batches = {size: _input_batches(task, model, rows, size, cfg.warmup + 8, stage.data.max_length,
                                        stage.data.template) for size in sizes}
        timed = Timed(str(role), call, batches)
        kind, before = _memory_mark(device)
        timed.warm_up(cfg.warmup, sync)
    directory = saved_dir(recipe, run, role)
    weights, calls = _weight_bytes(model, directory), _memory_since(device, kind, before)
    header = result_header(recipe, role, model, stage.name, split)
    # An export or a quantised teacher runs other arithmetic (int8, NF4, ONNX Runtime): not one architecture.
    variant = role.format or header["quantization"]
    facts = {
        **header, "device": str(device),
        "architecture": type(model.model).__name__ + (f" ({variant})" if variant else ""),
        "dtype": str(model.model.dtype).removeprefix("torch."), "timed": timed_what,
        "weight_bytes": weights, "call_memory_bytes": calls, "memory_kind": kind, "load_memory_bytes": loading,
        "peak_memory_bytes": weights + calls if weights is not None and calls is not None else None,
        "inputs": len(rows), "size_bytes": size_on_disk(directory), "size_path": str(directory) if directory else None,
    }
    return model, timed, facts


def bench_roles(recipe: Recipe, roles: list[Role], console: "Console | None" = None,
                skipped: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Benchmark ``roles`` together, round-robin, on the last stage's test split; save each one's
    ``runs/NAME/bench/ROLE.json`` and return them. With ``skipped`` (a dict), a role whose model
    cannot be loaded is recorded there with the reason and the others are timed; without, it stops."""
    import torch
    from rich.console import Console

    from kdcli.progress import phase_progress
    from kdcli.runtime import busy_cores
    from kdcli.runtime import describe as environment

    def skip(role: Role, exc: ModelError) -> None:
        if skipped is None:
            raise exc
        skipped[str(role)] = f"{exc.message} ({exc.hint})" if exc.hint else exc.message

    console = console or Console(stderr=True)
    run = RunDir.for_recipe(recipe)
    stage = recipe.resolved_stages()[-1]
    cfg = recipe.bench
    wanted = []
    for role in dict.fromkeys(roles):
        try:
            check(recipe, role)  # a missing model is reported before any data is prepared
            wanted.append(role)
        except ModelError as exc:
            skip(role, exc)
    if not wanted:
        return []
    data = stage_data(recipe, run, stage, replace=False)
    split = "test" if data.rows.get("test") else recipe.eval.split
    rows = data.rows.get(split, [])[: cfg.max_examples]
    if not rows:
        raise KdError("there are no examples to benchmark with", "check the recipe's test split")
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sizes = list(dict.fromkeys([1, *cfg.batch_sizes]))  # batch 1 first, each size once
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    loaded: list[tuple[Role, Any, Timed, dict[str, Any]]] = []  # the models stay loaded until the rounds end
    try:
        for role in wanted:
            try:
                loaded.append((role, *_loaded(recipe, run, role, data.num_classes, split, rows, sizes, sync)))
            except ModelError as exc:
                skip(role, exc)
        if not loaded:
            return []
        load_before = busy_cores()
        # kd's own threads count in the load, so only more runnable threads than cores means that other
        # processes share them: the timings then measure those too (alike for every role, being interleaved).
        if load_before is not None and load_before > (os.cpu_count() or 1) + 0.5 and not torch.cuda.is_available():
            console.print(f"[yellow]warning: the machine is busy (load {load_before:g} on {os.cpu_count()} cores): "
                          "the timings will be slower and noisier than on an idle machine[/]")
        progress = phase_progress(console)
        progress.start()
        task_id = progress.add_task(f"bench {len(loaded)} model{'s' if len(loaded) > 1 else ''}", total=cfg.iters)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                rounds = time_round_robin(
                    [timed for _, _, timed, _ in loaded], rounds=cfg.iters, precision=cfg.precision,
                    max_seconds=cfg.max_seconds, sync=sync,
                    on_round=lambda done: progress.update(task_id, completed=done, total=max(cfg.iters, done)))
        finally:
            progress.stop()
        session = {"id": uuid.uuid4().hex, "roles": [str(role) for role, *_ in loaded], "rounds": rounds,
                   "order": "round-robin", "seconds": round(time.perf_counter() - started, 2),
                   "block_seconds": BLOCK_SECONDS, "precision": cfg.precision, "max_seconds": cfg.max_seconds,
                   "load_average_1m": {"before": load_before, "after": busy_cores()}}
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    shared = {"threads": used_threads, "session": session, "warmup": cfg.warmup,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "env": environment()}
    results = []
    for role, _, timed, facts in loaded:
        result = {**facts, **shared, "batches": batch_results(timed)}
        write_json(run.bench(role), result)
        results.append({**result, "path": str(run.bench(role))})
    del loaded
    gc.collect()
    return results


def latest_run(root: Path = Path("runs")) -> Path:
    """The resolved recipe of the most recently changed run under ``root`` (for `kd bench` without a recipe)."""
    runs = [p.parent for p in root.glob("*/recipe.resolved.toml")]
    if not runs:
        raise KdError(f"no runs under ./{root}", "give the recipe: `kd bench RECIPE --model student`")

    def changed(run: Path) -> float:
        return max(p.stat().st_mtime for p in [run, *run.iterdir()])

    return max(runs, key=changed) / "recipe.resolved.toml"
