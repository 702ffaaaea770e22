"""Human output: rich tables for what each command did; `kd compare`'s tables, exports and plots."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdcli.errors import KdError
from kdcli.exported import FORMATS
from kdcli.roles import Role, describe, solo_role, teacher_role
from kdcli.tasks import KINDS, task_kind
from kdcli.timing import Timing, pooled, ratio

if TYPE_CHECKING:
    from kdcli.data import PrepareResult
    from kdcli.recipe import Stage
    from kdcli.rundir import RunDir


def print_prepare_summary(results: list["PrepareResult"]) -> None:
    """Per stage: a heading, rows and label histogram per split, then duplicates dropped, time and where the data is."""
    console = Console(highlight=False)
    for result in results:
        state = "up to date (no changes)" if result.skipped else f"prepared ({result.reason})"
        console.print(f"[bold]stage {escape(result.stage)}[/]: {escape(state)}")
        labelled = any(result.label_histograms.get(split) for split in result.counts)
        table = Table()
        table.add_column("split")
        table.add_column("rows", justify="right")
        if labelled:  # generate data has no labels to count
            table.add_column("labels")
        for split, count in result.counts.items():
            histogram = result.label_histograms.get(split, {})
            cells = [split, str(count)]
            if labelled:
                cells.append("  ".join(f"{name}: {n}" for name, n in histogram.items()))
            table.add_row(*map(escape, cells))
        console.print(table)
        notes = [f"read {result.rows_read} rows", f"{result.duplicates} duplicates dropped"]
        if result.conflicts:
            notes.append(f"{result.conflicts} texts with conflicting labels resolved")
        notes.append(f"{result.seconds:.1f} s")
        console.print(", ".join(notes))
        for line in transfer_lines(result.transfer) if result.transfer else []:
            console.print(escape(line))
        console.print(f"data: {escape(str(result.path))}")


_DROPPED = {"test": "equal to a test row", "validation": "equal to a validation row",
            "train": "equal to a train row of the stage", "duplicates": "duplicates", "limit": "over the limit"}


def transfer_lines(block: dict[str, Any]) -> list[str]:
    """A stage's transfer set as its manifest's `transfer` block tells it: rows kept and dropped by reason,
    the held-out splits its rows were equal to, and each source's rows."""
    dropped = "; ".join(f"{count:,} {_DROPPED[reason]}" for reason, count in block["dropped"].items() if count)
    lines = [f"transfer: {block['kept']:,} of {block['rows_read']:,} rows kept"
             + (f"; dropped {dropped}" if dropped else "")]
    if block["leaked_from"]:
        lines.append("  rows equal to held-out rows, by split: "
                     + ", ".join(f"{split} {count:,}" for split, count in block["leaked_from"].items()))
    lines += [f"  {part['source']}: {part['rows_read']:,} read, {part['kept']:,} kept" for part in block["sources"]]
    return lines


def last_transfer(stage: "Stage", run: "RunDir") -> tuple[str, dict[str, Any] | None]:
    """What the last `kd prepare` made of a stage's transfer set: ('prepared', its manifest block), or
    ('stale', None) when it was prepared with other data settings, or ('missing', None)."""
    from kdcli.rundir import read_json

    try:
        manifest = read_json(run.data(stage.name) / "manifest.json")
    except (OSError, ValueError):
        return "missing", None
    if not isinstance(manifest, dict) or "transfer" not in manifest:
        return "missing", None
    if manifest.get("data") != stage.data.model_dump(mode="json"):
        return "stale", None
    return "prepared", manifest["transfer"]


def print_transfer_plan(stages: list["Stage"], run: "RunDir", console: Console) -> None:
    """For each stage with a transfer set: its sources and share, then what the last `kd prepare` kept
    and dropped (`kd check` reads no data)."""
    for stage in stages:
        transfer = stage.data.transfer
        if transfer is None:
            continue
        sources = [f"{transfer.hub_name} (Hub)"] if transfer.hub_name else transfer.files or [transfer.path]
        limit = f", at most {transfer.limit:,} rows" if transfer.limit else ""
        console.print(escape(f"stage {stage.name} transfer set: {', '.join(map(str, sources))}; "
                             f"{transfer.share:g} of each step's examples{limit}"))
        state, block = last_transfer(stage, run)
        if block is not None:
            lines = transfer_lines(block)
            console.print(escape("  last prepared: " + lines[0].removeprefix("transfer: ")))
            for line in lines[1:]:
                console.print(escape("  " + line))
        else:
            console.print("  " + ("prepared with other data settings; " if state == "stale" else "not prepared yet; ")
                          + "`kd prepare` reads it, dropping rows equal to a validation or test row of any stage")


def print_cache_summary(reports: list[dict], console: Console | None = None) -> None:
    """One row per cached teacher: rows, bytes written, speed, teacher accuracy on validation."""
    console = console or Console()
    table = Table(title="teacher caches")
    tokens = any("bytes_per_token" in r for r in reports)  # generate: top-k token caches
    columns = ["stage", "teacher", "rows", "size", *(["bytes/token"] if tokens else []), "rows/s", "val accuracy",
               "status"]
    for column in columns:
        table.add_column(column, justify="right" if column in {"rows", "size", "bytes/token", "rows/s", "val accuracy"}
                         else "left")
    for r in reports:
        accuracy = r.get("validation_accuracy")
        per_token = [f"{r['bytes_per_token']} (k={r.get('top_k')})" if "bytes_per_token" in r else ""] if tokens else []
        table.add_row(
            r["stage"], r["teacher"], f"{sum(r['rows'].values()):,}", _human_bytes(r.get("bytes") or 0), *per_token,
            f"{r['rows_per_second']:,.1f}" if r.get("rows_per_second") else "",
            f"{accuracy:.4f}" if accuracy is not None else "",
            "up to date" if r["skipped"] else "built",
        )
    console.print(table)


def print_distill_summary(results: list, console: Console | None = None) -> None:
    """One row per training job: steps, samples, best validation metric, speed, where the model is."""
    console = console or Console()
    if not results:
        console.print("every stage is up to date; nothing to train")
        return
    table = Table(title="distillation")
    for column in ("stage", "steps", "samples", "best", "at step", "wall time", "samples/s wall", "samples/s steps",
                   "early stop", "model"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.name, str(r.steps), f"{r.samples:,}", "" if r.best_metric is None else f"{r.best_metric:.4f}",
            "" if r.best_step is None else str(r.best_step), _duration(r.wall_seconds),
            f"{r.wall_samples_per_second:.1f}", f"{r.samples_per_second:.1f}",
            "yes" if r.stopped_early else "no", str(r.output_dir),
        )
    console.print(table)
    console.print("[dim]samples/s wall: over the whole stage (setup, validation and saves included); "
                  "steps: over the optimizer steps alone[/]")


def print_step_times(walls: list[tuple[str, float]], console: Console | None = None) -> None:
    """`kd run`'s steps and the wall time of each, and their total."""
    console = console or Console()
    table = Table(title="wall time by step")
    table.add_column("step")
    table.add_column("wall time", justify="right")
    for title, seconds in walls:
        table.add_row(escape(title), _duration(seconds))
    table.add_row("[bold]total[/]", f"[bold]{_duration(sum(seconds for _, seconds in walls))}[/]")
    console.print(table)


def _duration(seconds: float) -> str:
    """12.3 s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _human_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"


# --------------------------------------------------------------------------- kd eval / kd bench


def print_eval(result: dict, console: Console | None = None) -> None:
    """Headline metrics, per-class report, confusion matrix, answer histogram, agreement and disagreements."""
    console = console or Console(highlight=False)
    metrics = result["metrics"]
    if "exact_match" in metrics:  # free-text answers
        _print_generate_eval(result, console)
        return
    names = metrics["label_names"]
    table = Table(title=f"{escape(result['role'])} on {result['split']} ({result['n']} examples)")
    for column in ("model", "parameters", "accuracy", "F1", "precision", "recall", "examples/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row(
        escape(result["model"]), _human_count(result["parameters"]), f"{metrics['accuracy']:.4f}",
        f"{metrics['f1']:.4f}", f"{metrics['precision']:.4f}", f"{metrics['recall']:.4f}",
        f"{result['examples_per_second']:,.1f}",
    )
    console.print(table)

    per_class = Table(title="per class")
    for column in ("class", "precision", "recall", "F1", "support", "predicted"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for name, scores in metrics["per_class"].items():
        per_class.add_row(escape(name), f"{scores['precision']:.4f}", f"{scores['recall']:.4f}", f"{scores['f1']:.4f}",
                          str(scores["support"]), str(scores["predicted"]))
    console.print(per_class)

    confusion = Table(title="confusion (rows: gold, columns: predicted)")
    confusion.add_column("")
    for name in names:
        confusion.add_column(escape(name), justify="right")
    for name, row in zip(names, metrics["confusion"]):
        confusion.add_row(escape(name), *map(str, row))
    console.print(confusion)

    if "answer_histogram" in result:
        console.print("answers given: " + "  ".join(
            f"{escape(k)}: {v} (gold {result['gold_histogram'][k]})" for k, v in result["answer_histogram"].items()
        ))
    for warning in (result.get("inputs_cut"), result.get("shortcut")):
        if warning:
            console.print(f"[bold yellow]warning:[/] {escape(warning)}")
    for teacher, rate in result.get("agreement", {}).items():
        console.print(f"agreement with teacher {escape(teacher)}: {rate:.1%}")
    for teacher, why in result.get("agreement_skipped", {}).items():
        console.print(f"[yellow]no agreement with teacher {escape(teacher)}: {escape(why)}[/]")
    _print_against(result, console)
    _print_disagreements(result, console)
    console.print(f"saved {escape(result['path'])}")


def _print_generate_eval(result: dict, console: Console) -> None:
    """generate: exact match and token F1/precision/recall, agreement and disagreements."""
    metrics = result["metrics"]
    table = Table(title=f"{escape(result['role'])} on {result['split']} ({result['n']} questions)")
    for column in ("model", "parameters", "exact match", "F1", "precision", "recall", "questions/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row(
        escape(result["model"]), _human_count(result["parameters"]), f"{metrics['exact_match']:.4f}",
        f"{metrics['f1']:.4f}", f"{metrics['precision']:.4f}", f"{metrics['recall']:.4f}",
        f"{result['examples_per_second']:,.1f}",
    )
    console.print(table)
    for teacher, rate in result.get("agreement", {}).items():
        console.print(f"agreement with teacher {escape(teacher)} (same normalised answer): {rate:.1%}")
    for teacher, why in result.get("agreement_skipped", {}).items():
        console.print(f"[yellow]no agreement with teacher {escape(teacher)}: {escape(why)}[/]")
    _print_against(result, console)
    _print_disagreements(result, console)
    console.print(f"saved {escape(result['path'])}")


def _print_against(result: dict, console: Console) -> None:
    """`kd eval --against full-precision`: what quantising the teacher changed, on the same rows."""
    drift = result.get("against")
    if not drift:
        return
    metric = "accuracy" if "accuracy" in result["metrics"] else "f1"
    mine, theirs = result["metrics"][metric], drift["metrics"][metric]
    units = f"{drift['units']} {drift['unit']}s"
    console.print(escape(
        f"against itself in full precision ({drift['quantization']}): {metric} {mine:.4f}, unquantised "
        f"{theirs:.4f} ({100 * (mine - theirs):+.2f} points); same answer on {drift['agreement']:.1%} of "
        f"{result['n']} rows; KL(full || {drift['quantization']}) {drift['kl']:.4g} nats per {drift['unit']} and "
        f"the same top-1 on {drift['top1_agreement']:.1%} of {units}"))


def _print_disagreements(result: dict, console: Console) -> None:
    """Each example where the model and a teacher differ, laid out like the study's figures."""
    from rich.panel import Panel

    for case in result.get("disagreements", []):
        lines = [f"[bold]input:[/] {escape(case['input'])}"]
        lines += [f"  {k}. {escape(option)}" for k, option in enumerate(case["options"], start=1)]
        lines += [
            f"[bold]gold:[/] {escape(case['gold'])}",
            f"[bold]teacher {escape(case['teacher'])}:[/] {escape(case['teacher_answer'])}",
            f"[bold]{escape(result['role'])}:[/] {escape(case['model_answer'])}",
        ]
        console.print(Panel("\n".join(lines), title=f"example {escape(str(case['id']))}", title_align="left"))


def print_bench(results: list[dict], skipped: dict[str, str] | None = None, console: Console | None = None) -> None:
    """One row per role and batch size: the median time per example with its 95% interval and interquartile
    range, throughput, memory (weights, and what its calls added), size; then how the timing went (rounds,
    load, threads, machine)."""
    console = console or Console(highlight=False)
    if results:
        first = results[0]
        table = Table(title=f"bench on {first['device']} "
                            f"({first['threads']} threads; model forward, tokenisation excluded)")
        for column in ("role", "parameters", "size", "batch", "ms/ex", "95% interval", "IQR", "ex/s",
                       "memory (weights + calls)"):
            table.add_column(column, justify="left" if column == "role" else "right")
        for r in results:
            for i, b in enumerate(r["batches"].values()):
                latency = b["latency_ms_per_example"]
                table.add_row(
                    escape(r["role"]) if i == 0 else "", _human_count(r["parameters"]) if i == 0 else "",
                    (_human_bytes(r["size_bytes"]) if r["size_bytes"] is not None else "") if i == 0 else "",
                    str(b["batch_size"]), f"{latency['p50']:.3f}",
                    "{:.3f}–{:.3f}".format(*latency["ci95"]), "{:.3f}–{:.3f}".format(*latency["iqr"]),
                    f"{b['throughput']:,.1f}", _memory(r) if i == 0 else "",
                )
        console.print(table)
        session, env = first["session"], first["env"]
        load = session["load_average_1m"]
        machine = env.get("gpu") or env.get("cpu") or env.get("platform", "")
        together = f"{len(session['roles'])} models timed round-robin" if len(session["roles"]) > 1 else "timed"
        console.print(escape(f"{together}: {session['rounds']} rounds in {session['seconds']:.0f} s; "
                             f"load average {load['before']} before, {load['after']} after, on {env['cpu_count']} "
                             f"cores ({machine})"))
        loads = [f"{r['role']} {_human_bytes(r['load_memory_bytes'])}" + (f" ({r['quantization']})"
                                                                          if r.get("quantization") else "")
                 for r in results if r.get("load_memory_bytes") is not None]
        if loads:
            console.print(escape("memory while loading, at its peak: " + ", ".join(loads)))
    for role, why in (skipped or {}).items():
        console.print(f"[yellow]skipped {escape(role)}: {escape(why)}[/]")
    for r in results:
        console.print(f"saved {escape(r['path'])}")


def _memory(result: dict) -> str:
    weights, calls = result.get("weight_bytes"), result.get("call_memory_bytes")
    if weights is None:
        return ""
    return _human_bytes(weights) + (f" + {_human_bytes(calls)}" if calls is not None else "")


def print_export(result: dict, recipe_path: Path, console: Console | None = None) -> None:
    """What `kd export` wrote, how it compares with the model it came from, and how to measure it."""
    console = console or Console(highlight=False)
    check = result["check"]
    table = Table(title=f"{escape(result['role'])} exported as {result['format']}")
    for column in ("size on disk", "the model's", "parameters", "same answer", "largest logit difference"):
        table.add_column(column, justify="right")
    agreement = check["argmax_agreement"]
    table.add_row(
        _human_bytes(result["size_bytes"]) if result["size_bytes"] is not None else "",
        _human_bytes(result["source_size_bytes"]) if result["source_size_bytes"] is not None else "",
        _human_count(result["parameters"]),
        f"{agreement:.1%} of {check['compared']} {check['unit']}" if agreement is not None else "",
        f"{check['max_abs_difference']:.2e}",
    )
    console.print(table)
    console.print(f"checked against {escape(result['role'])} on {check['rows']} {check['split']} rows")
    console.print(f"files: {escape(result['path'])}")
    role, recipe = escape(result["export_role"]), escape(str(recipe_path))
    console.print(f"measure it: kd eval {recipe} --model {role}; kd bench {recipe} --model {role}; kd compare")


def _human_count(count: int | None) -> str:
    if count is None:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


# --------------------------------------------------------------------------- kd compare
#
# `kd compare` reads only run-directory files (recipe.resolved.toml, eval/*.json,
# bench/*.json, metrics.jsonl), so runs made on other machines compare. One RunTable per
# run holds raw values (None = not measured yet); the renderers below format them.


@dataclass
class Column:
    key: str  # stable name in csv/json
    title: str  # header in the markdown table
    fmt: Callable[[Any], str]
    short: str = ""  # header in the terminal, where width is scarce (a legend under the table explains it)

    @property
    def header(self) -> str:
        return self.short or self.title


@dataclass
class RunTable:
    name: str
    task: str
    root: Path
    columns: list[Column]
    rows: list[dict[str, Any]]  # column key -> value; None where the measurement is missing
    best: int | None  # index of the best non-teacher row (bold)
    hints: list[str] = field(default_factory=list)


def _fixed(digits: int) -> Callable[[Any], str]:
    return lambda value: f"{value:.{digits}f}"


_COLUMNS = {
    "role": Column("role", "Role", str),
    "model": Column("model", "Model", str),
    "parameters": Column("parameters", "Params", lambda v: _human_count(int(v))),
    "size_bytes": Column("size_bytes", "Size on disk", lambda v: _human_bytes(int(v))),
    "accuracy": Column("accuracy", "Accuracy", _fixed(4)),
    "f1": Column("f1", "F1", _fixed(4)),
    "precision": Column("precision", "Precision", _fixed(4)),
    "recall": Column("recall", "Recall", _fixed(4)),
    "ms_per_example": Column("ms_per_example", "ms/example (batch 1)", _fixed(3), "ms b1"),
    "s_per_question": Column("s_per_question", "s/question (batch 1)", _fixed(4), "s/q b1"),
    "questions_per_s": Column("questions_per_s", "questions/s (batch 1)", _fixed(1), "q/s b1"),
    "kept_pct": Column("kept_pct", "kept vs best teacher", lambda v: f"{v:.1f}%", "kept"),
    "speedup": Column("speedup", "speed-up vs slowest teacher", lambda v: f"{v:.2f}x", "speed-up"),
    "size_ratio": Column("size_ratio", "size vs largest teacher", lambda v: f"{v:.2f}x", "size"),
}

def run_roots(paths: list[Path]) -> list[Path]:
    """Run directories named by run directories, recipes or resolved recipes; every run in ./runs by default."""
    from kdcli.recipe import load
    from kdcli.rundir import RunDir

    if not paths:
        roots = sorted(p.parent for p in Path("runs").glob("*/recipe.resolved.toml"))
        if not roots:
            raise KdError("no runs under ./runs", "run `kd distill RECIPE` first, or name run directories")
        return roots
    roots = []
    for path in paths:
        if path.is_dir():
            roots.append(path)
        elif path.name == "recipe.resolved.toml":
            roots.append(path.parent)
        elif path.is_file():
            roots.append(RunDir.for_recipe(load(path)).root)
        else:
            raise KdError(f"{path}: no such run directory or recipe", "give run directories (runs/NAME) or recipes")
    return roots


def print_warning(message: str) -> None:
    """A `warning:` line on stderr: kd goes on, without what it names."""
    print(f"warning: {message}", file=sys.stderr)


class DamagedRun(KdError):
    """A run directory whose recipe.resolved.toml cannot be read: `kd compare` leaves the run out."""


class _Shape(ValueError):
    """A result file that is valid JSON but not what `kd eval` or `kd bench` writes."""


def _kind_of(value: Any) -> str:
    for kind, name in ((bool, "true/false"), (dict, "an object"), (list, "a list"), (str, "a string"),
                       ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return "null"


def _table(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise _Shape(f"{name} is {_kind_of(value)}, not an object")
    return value


def _number(table: dict, key: str, where: str = "", required: bool = False) -> float | None:
    """``table[key]``: a number, or None where it was not measured (never a string or a list)."""
    value = table.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Shape(f"{where}{key} is {_kind_of(value)}, not a number")
    return value


def _eval_summary(document: dict) -> dict[str, Any]:
    """What compare shows of an eval result: its quality metrics."""
    metrics = _table(document.get("metrics"), "metrics")
    return {key: _number(metrics, key, "metrics.") for key in ("accuracy", "f1", "precision", "recall")}


def _timing(batch: dict, where: str, session: str | None) -> Timing:
    """A batch size's median time per example, with its interval and its rounds where the file has them."""
    latency = _table(batch.get("latency_ms_per_example"), where)
    median = _number(latency, "p50", where + ".", required=True)
    interval = latency.get("ci95")
    rounds = batch.get("ms_per_example_by_round")
    low, high = interval if _numbers(interval) and len(interval) == 2 else (None, None)
    return Timing(median, low, high, tuple(rounds) if _numbers(rounds) and rounds else None, session)


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)


def _bench_summary(document: dict) -> dict[str, Any]:
    """What compare shows of a bench result: the median latency at batch 1 and at its largest batch above 1, with
    their intervals, the session that timed them (to pair rounds) and what makes two models one architecture."""
    session = document.get("session", {}).get("id") if isinstance(document.get("session"), dict) else None
    timings = {}
    for size, batch in _table(document.get("batches"), "batches").items():
        if not size.isdigit():
            raise _Shape(f"batch size {size!r} is not a number")
        timings[int(size)] = _timing(_table(batch, f"batches.{size}"), f"batches.{size}.latency_ms_per_example",
                                     session)
    batched = max((size for size in timings if size > 1), default=None)
    architecture = (document.get("architecture"), document.get("parameters"), document.get("dtype"))
    return {"timing": timings.get(1), "batched_size": batched, "timing_batched": timings.get(batched) if batched
            else None, "size_bytes": _number(document, "size_bytes"),
            "architecture": architecture if architecture[0] is not None else None}


def _read_role_files(directory: Path, summarise: Callable[[dict], dict[str, Any]],
                     warn: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Each result file in ``directory`` (eval/ or bench/) by role: its model, parameters and what
    ``summarise`` takes from it. A damaged file (edited, cut short, written by something else) is
    left out with a warning naming it, so that it does not hide the rest of the run."""
    import json

    found = {}
    for path in sorted(directory.glob("*.json")):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
            warn(f"skipped {path}: not valid JSON ({exc})")
            continue
        try:
            document = _table(document, "the file")
            role, model = document.get("role"), document.get("model")
            if not isinstance(role, str) or not role:
                raise _Shape("it names no role")
            if model is not None and not isinstance(model, str):
                raise _Shape(f"model is {_kind_of(model)}, not a string")
            found[role] = {"model": model, "parameters": _number(document, "parameters"), **summarise(document)}
        except _Shape as exc:
            warn(f"skipped {path}: not a kd {directory.name} result ({exc})")
    return found


def _read_recipe(root: Path) -> dict[str, Any]:
    """``root``'s recipe.resolved.toml as a dict; DamagedRun when it is not a recipe kd wrote."""
    from kdcli.recipe import tomllib  # the standard library's, or tomli on Python 3.10

    path = root / "recipe.resolved.toml"
    if not path.is_file():
        raise KdError(f"{root} is not a kd run directory (no recipe.resolved.toml)", "give a run directory or a recipe")
    hint = "any kd command that writes the run (`kd eval RECIPE`, say) writes it again; or remove the run"
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DamagedRun(f"{path} is not valid TOML ({exc})", hint) from None
    task, teachers = recipe.get("task"), recipe.get("teachers", {})
    if not isinstance(task, str) or task not in KINDS:
        raise DamagedRun(f"{path} is not a kd recipe (task is {task!r})", hint)
    wrong = [key for key, kind in (("name", str), ("student", dict), ("teachers", dict))
             if key in recipe and not isinstance(recipe[key], kind)]
    wrong += [f"teachers.{name}" for name, spec in (teachers.items() if isinstance(teachers, dict) else [])
              if not isinstance(spec, dict)]
    if wrong:
        raise DamagedRun(f"{path} is not a kd recipe ({', '.join(wrong)}: wrong type)", hint)
    return recipe


def collect_runs(roots: list[Path], warn: Callable[[str], None] = print_warning) -> list[RunTable]:
    """The comparison tables of ``roots``; a run whose recipe is damaged is left out with a warning."""
    tables = []
    for root in roots:
        try:
            tables.append(collect_run(root, warn))
        except DamagedRun as exc:
            warn(f"skipped the run {root}: {exc.message}")
    if not tables:
        raise KdError("no run left to compare: every one was skipped (see the warnings above)",
                      "fix or remove the files the warnings name, or name other runs")
    return tables


def _is_teacher(role: str) -> bool:
    return Role.parse(role).kind == "teacher"


def _ordered_roles(recipe: dict, evals: dict, benches: dict, root: Path) -> list[str]:
    """Teachers (recipe order), baseline, dataset (when trained or measured), students of one teacher
    (when measured), student, exports (when measured), then any other model."""
    teachers = [str(teacher_role(name)) for name in recipe.get("teachers", {})]
    measured = list(dict.fromkeys([*evals, *benches]))
    dataset = ["dataset"] if "dataset" in measured or (root / "dataset" / "config.json").is_file() else []
    solos = [str(solo_role(name)) for name in recipe.get("teachers", {}) if str(solo_role(name)) in measured]
    exports = sorted((r for r in measured if Role.parse(r).kind == "export"), key=_export_order)
    known = [*teachers, *sorted(r for r in measured if _is_teacher(r) and r not in teachers),
             "baseline", *dataset, *solos, "student", *exports]
    return known + [r for r in measured if r not in known]


def _export_order(role: str) -> tuple[str, int]:
    """Exports by the role they were written from, then in ``exported.FORMATS``' order (fp32 first)."""
    parsed = Role.parse(role)
    formats = list(FORMATS)
    return parsed.name, formats.index(parsed.format) if parsed.format in formats else len(formats)


def collect_run(root: Path, warn: Callable[[str], None] = print_warning) -> RunTable:
    """The comparison table of one run directory, from its files alone; a damaged eval or bench file is
    left out with a warning (``warn``), a damaged recipe raises DamagedRun."""
    recipe = _read_recipe(root)
    recipe_path = root / "recipe.resolved.toml"
    task = recipe["task"]
    kind = task_kind(task)
    evals = _read_role_files(root / "eval", _eval_summary, warn)
    benches = _read_role_files(root / "bench", _bench_summary, warn)
    primary = kind.primary
    try:
        shown = recipe_path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown = recipe_path

    timings = {role: be["timing"] for role, be in benches.items() if be["timing"] is not None}
    batched = {role: be["timing_batched"] for role, be in benches.items() if be["timing_batched"] is not None}
    groups = _same_speed(benches, timings)
    for group in groups:  # one architecture whose timings overlap is shown as one speed
        for found in (timings, batched):
            if all(role in found for role in group):
                one = pooled([found[role] for role in group])
                found.update(dict.fromkeys(group, one))
    rows, hints = [], []
    for role in _ordered_roles(recipe, evals, benches, root):
        ev, be, timing = evals.get(role), benches.get(role), timings.get(role)
        ms = timing.median if timing else None
        row = {
            "role": role,
            "model": (ev or be or {}).get("model") or describe(recipe, Role.parse(role)),
            "parameters": (ev or be or {}).get("parameters"),
            "size_bytes": (be or {}).get("size_bytes"),
            **{key: (ev or {}).get(key) for key in ("accuracy", "f1", "precision", "recall")},
            "ms_per_example": ms,
            "ms_per_example_ci95": _interval(timing),
            "batched_size": (be or {}).get("batched_size"),
            "ms_per_example_batched": batched[role].median if role in batched else None,
            "ms_per_example_batched_ci95": _interval(batched.get(role)),
            "s_per_question": ms / 1000 if ms is not None else None,
            "questions_per_s": 1000 / ms if ms else None,
            "same_speed_as": next(([r for r in group if r != role] for group in groups if role in group), []),
        }
        rows.append(row)
        if ev is None:
            hints.append(f"{role}: no eval, run `kd eval {shown} --model {role}`")
        if be is None:
            hints.append(f"{role}: no bench, run `kd bench {shown} --model {role}`")

    teachers = [r for r in rows if _is_teacher(r["role"])]
    best_quality = max((r[primary] for r in teachers if r[primary] is not None), default=None)
    slowest = max((r["role"] for r in teachers if r["role"] in timings), key=lambda role: timings[role].median,
                  default=None)
    largest = max((r["parameters"] for r in teachers if r["parameters"] is not None), default=None)
    for row in rows:
        row["kept_pct"] = 100 * row[primary] / best_quality if best_quality and row[primary] is not None else None
        row["speedup"], row["speedup_ci95"], row["speedup_measurable"] = None, None, None
        if slowest and row["role"] in timings and row["role"] != slowest:
            row["speedup"], low, high = ratio(timings[slowest], timings[row["role"]])
            if low is not None:
                row["speedup_ci95"], row["speedup_measurable"] = [low, high], not low <= 1.0 <= high
        elif row["role"] == slowest:
            row["speedup"] = 1.0
        row["size_ratio"] = row["parameters"] / largest if largest and row["parameters"] is not None else None
    for group in groups:
        hints.append(f"{', '.join(group)}: one architecture whose timings overlap, shown as one speed (=)")
    if any(row["speedup_measurable"] is False for row in rows):
        hints.append("≈: the speed-up's 95% interval holds 1x: no measurable difference from the slowest teacher")

    # An export has its model's parameters in fewer bytes (int8): where the run has one, the table shows the bytes.
    size = ["size_bytes"] if any(Role.parse(r["role"]).kind == "export" for r in rows) else []
    columns = [_COLUMNS[k] for k in
               ["role", "model", "parameters", *size, *kind.compare_columns, "kept_pct", "speedup", "size_ratio"]]
    sizes = {r["batched_size"] for r in rows if r["batched_size"] is not None}
    if "ms_per_example" in kind.compare_columns and sizes:  # batch throughput, beside the interactive latency
        size = sizes.pop() if len(sizes) == 1 else None
        title = f"ms/example (batch {size})" if size else "ms/example (largest batch)"
        at = next(i for i, c in enumerate(columns) if c.key == "ms_per_example") + 1
        columns.insert(at, Column("ms_per_example_batched", title, _fixed(3), f"ms b{size}" if size else "ms bmax"))
    return RunTable(recipe.get("name", root.name), task, root, columns, rows, _best_row(rows, primary), hints)


def _interval(timing: Timing | None) -> list[float] | None:
    return [timing.low, timing.high] if timing is not None and timing.low is not None else None


def _same_speed(benches: dict[str, dict[str, Any]], timings: dict[str, Timing]) -> list[list[str]]:
    """Roles of one architecture (class, parameters, dtype) whose batch-1 intervals all overlap: their
    differences are noise, so compare shows them as one speed. Roles without an interval are left alone."""
    by_architecture: dict[Any, list[str]] = {}
    for role, be in benches.items():
        if be["architecture"] is not None and role in timings and timings[role].low is not None:
            by_architecture.setdefault(be["architecture"], []).append(role)
    return [group for group in by_architecture.values()
            if len(group) > 1 and all(timings[a].overlaps(timings[b]) for a in group for b in group)]


def _best_row(rows: list[dict[str, Any]], primary: str) -> int | None:
    candidates = [i for i, r in enumerate(rows) if not _is_teacher(r["role"]) and r[primary] is not None]
    # On a tie the later row wins: the trained student over the dataset model over the baseline.
    return max(candidates, key=lambda i: (rows[i][primary], i), default=None)


def mean_table(tables: list[RunTable]) -> RunTable:
    """Runs of one recipe (under several seeds, say) averaged role by role: each number is the mean
    over the runs, with its sample standard deviation under ``KEY_std``; ratios (kept, speed-up) are
    each run's, averaged. A role missing from some run is left out, with a hint."""
    import statistics

    if len({t.task for t in tables}) > 1:
        raise KdError("--mean averages runs of one task, and these are of several: "
                      + ", ".join(f"{t.name} ({t.task})" for t in tables), "average the runs of one recipe")
    first = tables[0]
    by_run = [{r["role"]: r for r in t.rows} for t in tables]
    rows, hints = [], []
    for role in (r["role"] for r in first.rows):
        found = [rows_of_run.get(role) for rows_of_run in by_run]
        if None in found:
            hints.append(f"{role}: not in every run, left out of the mean")
            continue
        row: dict[str, Any] = {"role": role, "model": found[0]["model"]}
        for column in first.columns[2:]:
            values = [f[column.key] for f in found]
            complete = None not in values
            row[column.key] = statistics.fmean(values) if complete else None
            row[f"{column.key}_std"] = statistics.stdev(values) if complete and len(values) > 1 else None
        rows.append(row)
    name = f"mean of {len(tables)} runs ({', '.join(t.name for t in tables)})"
    return RunTable(name, first.task, first.root, first.columns, rows, _best_row(rows, task_kind(first.task).primary),
                    hints)


def _cells(table: RunTable, row: dict[str, Any], intervals: tuple[str, ...] = ("all",)) -> list[str]:
    """Formatted cells; a missing measurement is blank, never 0; a mean shows its spread (± std), a timing its
    95% interval (for the columns in ``intervals``), a speed-up within the noise ≈, and pooled timings =."""
    cells = []
    for column in table.columns:
        value, spread = row[column.key], row.get(f"{column.key}_std")
        cell = column.fmt(value) if value is not None else ""
        if spread:
            cell = f"{cell} ± {column.fmt(spread)}"
        interval = row.get(f"{column.key}_ci95")
        if interval and value is not None and ("all" in intervals or column.key in intervals):
            cell = f"{cell} [{column.fmt(interval[0])}, {column.fmt(interval[1])}]"
        if column.key == "speedup" and row.get("speedup_measurable") is False:
            cell = f"{cell} ≈"
        if column.key in ("ms_per_example", "ms_per_example_batched") and row.get("same_speed_as") and value:
            cell = f"{cell} ="
        cells.append(cell)
    return cells


# What a narrow terminal keeps first: who, how good, how much of the teacher, how fast; then the rest.
_PRIORITY = ("role", "accuracy", "f1", "kept_pct", "speedup", "ms_per_example", "s_per_question", "questions_per_s",
             "parameters", "model", "ms_per_example_batched", "precision", "recall", "size_ratio")
_LEGEND = {"kept_pct": "kept = % of the best teacher's {primary}", "speedup": "speed-up = vs the slowest teacher",
           "size_ratio": "size = parameters vs the largest teacher", "ms_per_example": "b1 = batch 1"}
_MODEL_WIDTH = 30  # longer descriptions fold onto a second line


def print_compare(tables: list[RunTable], console: Console | None = None, wide: bool = False) -> None:
    """Each run's table, fitted to the terminal: short headers explained by a legend, role names never
    cut, and the columns of least use left out (and named) when even so the table is too wide;
    ``wide`` shows every column whatever the width."""
    console = console or Console(highlight=False)
    for table in tables:
        cells = [[_short_model(c) if col.key == "model" else c
                  for col, c in zip(table.columns, _cells(table, row, intervals=("speedup",)))]
                 for row in table.rows]
        widths = [max([len(col.header), *(len(r[i]) for r in cells)]) for i, col in enumerate(table.columns)]
        widths = [min(w, _MODEL_WIDTH) if col.key == "model" else w for w, col in zip(widths, table.columns)]
        shown = list(range(len(table.columns)))
        primary = task_kind(table.task).primary
        order = ["role", primary, *(k for k in _PRIORITY if k not in ("role", primary))]
        while not wide and len(shown) > 2 and sum(widths[i] for i in shown) + 3 * len(shown) + 1 > console.width:
            shown.remove(max(shown, key=lambda i: order.index(table.columns[i].key)
                             if table.columns[i].key in order else len(order)))
        rich_table = Table(title=f"{escape(table.name)} ({table.task})")
        for i in shown:
            column = table.columns[i]
            model = column.key == "model"
            rich_table.add_column(column.header, justify="left" if column.key in ("role", "model") else "right",
                                  no_wrap=not model, overflow="fold", max_width=_MODEL_WIDTH if model else None)
        for r, row in enumerate(cells):
            rich_table.add_row(*(escape(row[i]) for i in shown), style="bold" if r == table.best else None)
        if wide:
            console = Console(highlight=False, width=max(console.width, sum(widths) + 3 * len(widths) + 1),
                              file=console.file)
        console.print(rich_table)
        keys = [table.columns[i].key for i in shown]
        legend = [_LEGEND[k].format(primary=primary) for k in _LEGEND if k in keys]
        if legend:
            console.print(f"[dim]{escape('; '.join(legend))}[/]")
        left_out = [table.columns[i].header for i in range(len(table.columns)) if i not in shown]
        if left_out:
            console.print(f"[dim]left out at {console.width} columns: {escape(', '.join(left_out))} "
                          "(--wide shows every column)[/]")
        for hint in table.hints:
            console.print(f"[dim]{escape(hint)}[/]", emoji=False)  # "teacher:a: ..." is no emoji


def _short_model(description: str) -> str:
    """A model description for a narrow cell: a packaged model by its package, a layer list without spaces."""
    import re

    if description.startswith("package:"):
        ref, space, rest = description.partition(" ")
        description = ref.removeprefix("package:").split("/", 1)[0] + space + rest
    return re.sub(r"layers \[([\d, ]*)\]", lambda m: "layers " + m.group(1).replace(" ", ""), description)


def compare_markdown(tables: list[RunTable]) -> str:
    """One markdown table per run under a heading; the best student row in bold."""
    parts = []
    for table in tables:
        lines = [f"### {table.name} ({table.task})", "",
                 "| " + " | ".join(c.title for c in table.columns) + " |",
                 "|" + "|".join("---" if c.key in ("role", "model") else "---:" for c in table.columns) + "|"]
        for i, row in enumerate(table.rows):
            cells = [cell.replace("|", "\\|") for cell in _cells(table, row)]
            if i == table.best:
                cells = [f"**{cell}**" if cell else cell for cell in cells]
            lines.append("| " + " | ".join(cells) + " |")
        if table.hints:
            lines += [""] + [f"- {hint}" for hint in table.hints]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def compare_csv(tables: list[RunTable]) -> str:
    """One CSV of every run's rows, raw numbers (blank = missing); columns are the union over runs."""
    import csv
    import io

    keys = list(dict.fromkeys(c.key for table in tables for c in table.columns))
    keys += [f"{k}_std" for k in keys if any(f"{k}_std" in row for table in tables for row in table.rows)]
    intervals = [k for k in keys if any(row.get(f"{k}_ci95") for table in tables for row in table.rows)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["run", "task", *keys, *(f"{k}_ci95_{end}" for k in intervals for end in ("low", "high")), "best"])
    for table in tables:
        for i, row in enumerate(table.rows):
            bounds = [row.get(f"{k}_ci95") or ["", ""] for k in intervals]
            writer.writerow([table.name, table.task, *("" if row.get(k) is None else row[k] for k in keys),
                             *(bound for pair in bounds for bound in pair), i == table.best])
    return out.getvalue()


def _json_row(table: RunTable, row: dict[str, Any]) -> dict[str, Any]:
    """A row's values by column key, each one's spread (``KEY_std``) where it is a mean, its 95% interval
    (``KEY_ci95``) where it is a timing or a speed-up, and which timings it was pooled with."""
    values = {}
    for column in table.columns:
        values[column.key] = row[column.key]
        for extra in (f"{column.key}_std", f"{column.key}_ci95"):
            if extra in row:
                values[extra] = row[extra]
    for key in ("speedup_measurable", "same_speed_as"):
        if key in row:
            values[key] = row[key]
    return values


def compare_json(tables: list[RunTable]) -> list[dict[str, Any]]:
    return [
        {
            "run": table.name, "task": table.task, "path": str(table.root),
            "columns": [{"key": c.key, "title": c.title} for c in table.columns],
            "rows": [_json_row(table, row) for row in table.rows],
            "best": table.rows[table.best]["role"] if table.best is not None else None,
            "hints": table.hints,
        }
        for table in tables
    ]


def render_compare(tables: list[RunTable], fmt: str) -> str:
    """The comparison as `md`, `csv` or `json` text."""
    import json

    if fmt == "md":
        return compare_markdown(tables)
    if fmt == "csv":
        return compare_csv(tables)
    return json.dumps(compare_json(tables), indent=2) + "\n"


# --------------------------------------------------------------------------- plots


def read_metrics(path: Path) -> dict[str, list[dict]]:
    """metrics.jsonl grouped by job (stage), keeping only the records of the latest attempt.

    The file is appended to by every run. When a job's step goes back (a resume from an
    earlier checkpoint, or a fresh start), the records it redoes (at or after that step)
    are dropped, so a resumed run keeps its history and a restarted one replaces it.
    """
    import json

    jobs: dict[str, list[dict]] = {}
    if not path.is_file():
        return jobs
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue  # not a record kd wrote
        records = jobs.setdefault(record.get("stage", "?"), [])
        if records and record["step"] < records[-1]["step"]:
            records[:] = [r for r in records if r["step"] < record["step"]]
        records.append(record)
    return jobs


def plot_losses(table: RunTable) -> list[Path]:
    """Per job: training and validation loss against samples seen, the kept (best) checkpoint marked."""
    from matplotlib.figure import Figure  # the object API renders with Agg; no pyplot global state

    written = []
    for job, records in read_metrics(table.root / "metrics.jsonl").items():
        train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
        evals = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
        if not train and not evals:
            continue
        figure = Figure(figsize=(7, 4.5))
        axes = figure.subplots()
        if train:
            samples = [r["samples"] for r in train]
            axes.plot(samples, [r["loss"] for r in train], label="training loss (total)")
            if any(r.get("ce") is not None and r["ce"] != r["loss"] for r in train):
                # The total mixes in teacher terms; its CE part is what the validation loss measures.
                axes.plot(samples, [r.get("ce") for r in train], "--", label="training CE (gold labels)")
        if evals:
            axes.plot([r["samples"] for r in evals], [r["val_loss"] for r in evals], "o-",
                      label="validation loss (CE on gold)")
            kept = [r for r in evals if r.get("best")]
            if kept:  # the last improvement is the checkpoint that was kept
                axes.plot(kept[-1]["samples"], kept[-1]["val_loss"], "*", markersize=16, color="crimson",
                          label=f"best checkpoint (step {kept[-1]['step']})")
        axes.set_xlabel("samples seen")
        axes.set_ylabel("loss")
        axes.set_title(f"{table.name}: {job}")
        axes.grid(alpha=0.3)
        axes.legend()
        path = table.root / "plots" / f"loss-{job.replace('/', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100, bbox_inches="tight")
        written.append(path)
    return written


def plot_quality_speed(tables: list[RunTable]) -> list[Path]:
    """Accuracy (token F1 for generate) against ms/example, one point per model across runs of the same task.

    Each run's plots/ gets the picture of its task, so a run directory stays self-contained.
    """
    from matplotlib.figure import Figure

    written = []
    for table in tables:
        peers = [t for t in tables if t.task == table.task]
        primary = task_kind(table.task).primary
        points = [(t, r) for t in peers for r in t.rows if r[primary] is not None and r["ms_per_example"] is not None]
        if not points:
            continue
        figure = Figure(figsize=(7, 4.5))
        axes = figure.subplots()
        for t, row in points:
            by_teacher = _is_teacher(row["role"])
            axes.scatter(row["ms_per_example"], row[primary], marker="s" if by_teacher else "o",
                         color="tab:blue" if by_teacher else "tab:orange")
            label = row["role"] if len(peers) == 1 else f"{t.name}/{row['role']}"
            axes.annotate(label, (row["ms_per_example"], row[primary]), textcoords="offset points", xytext=(5, 5),
                          fontsize=8)
        axes.set_xscale("log")
        axes.set_xlabel("inference time, ms/example at batch 1 (log scale)")
        axes.set_ylabel("token F1" if primary == "f1" else "accuracy")
        axes.set_title(f"{table.task}: quality against inference time (squares: teachers)")
        axes.grid(alpha=0.3)
        path = table.root / "plots" / "accuracy-latency.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100, bbox_inches="tight")
        written.append(path)
    return written
