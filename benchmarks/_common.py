"""What every benchmark script shares: where its result goes and how its output ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def result_path(benchmark: str, quick: bool) -> Path:
    """Where ``finish`` writes a benchmark's summary unless told otherwise."""
    return RESULTS / f"{benchmark}{'-quick' if quick else ''}.json"


def finish(summary: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``summary`` to ``out`` (default ``results/BENCHMARK[-quick].json``, the quick runs
    gitignored) and print it as the output's last line, the one a caller parses."""
    out = out or result_path(summary["benchmark"], summary["quick"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return out


def mean_std(runs: dict[str, dict], rows: list[str], columns: tuple[str, ...]) -> dict[str, dict[str, list[float]]]:
    """Per row and column, [mean, std] over ``runs`` (one per seed, each with ``rows[row][column]``;
    std 0 for a single run)."""
    import statistics

    out: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        out[row] = {}
        for column in columns:
            values = [run["rows"][row][column] for run in runs.values()]
            out[row][column] = [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]
    return out


def kd(work: Path, *args: str) -> None:
    """``kd ARGS`` in ``work``, in this process (torch and transformers are imported once, not per
    command); a failure ends the benchmark, its error printed above."""
    import os
    import sys
    import time

    from kdcli.cli import app

    started, cwd = time.perf_counter(), os.getcwd()
    os.chdir(work)
    try:
        code = app(list(args), standalone_mode=False, prog_name="kd")
    finally:
        os.chdir(cwd)
    print(f"kd {' '.join(args)}: exit {code or 0} in {time.perf_counter() - started:.0f} s", flush=True)
    if code:
        sys.exit(f"kd {' '.join(args)} failed (exit {code}); its error is above")


def write_recipe(raw: dict[str, Any], path: Path) -> Path:
    """``raw`` validated and written as a recipe file."""
    from kdcli import recipe

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(recipe.to_toml(recipe.validate(raw, source=str(path))))
    return path


def write_variant(base: Path, variant: str, loss: dict[str, Any], teachers: dict[str, Path]) -> Path:
    """``base`` distilled another way (``loss`` overrides), from teachers the base run already
    fine-tuned (``teachers``: name -> folder), as ``BASE-VARIANT.toml`` beside it."""
    from kdcli import recipe

    raw = recipe.load_raw(base)
    raw["name"] = f"{raw['name']}-{variant.replace('_', '-')}"
    for name, folder in teachers.items():
        raw["teachers"][name] = {"ref": str(folder), "head": raw["teachers"][name].get("head", "auto")}
    raw["loss"].update(loss)
    return write_recipe(raw, base.with_name(f"{raw['name']}.toml"))


def tiny_chat_llama(folder: Path) -> Path:
    """A tiny Llama built in code (tests/kit.py) whose tokenizer has a chat template, for --quick runs."""
    import transformers

    import kit

    model = kit.make_model_dir(folder, "llama", "causal", layers=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(model)
    return model


def fpb_data(work: Path, quick: bool) -> dict[str, Any]:
    """recipes/local/fpb.toml's data table (Financial PhraseBank AllAgree); in quick mode on a made-up
    file in ``work`` of 160 sentences, one to three corpus lines long (tests/kit.py)."""
    from kdcli import recipe

    root = Path(__file__).resolve().parents[1]
    data = recipe.load_raw(root / "recipes" / "local" / "fpb.toml")["data"]
    data["path"] = str((root / data["path"]).resolve())
    if quick:
        import kit

        names = ["negative", "neutral", "positive"]
        lines = [" ".join(kit.CORPUS[(7 * i + j) % 20] for j in range(1 + i % 3)) + f" ({i})@{names[i % 3]}"
                 for i in range(160)]
        (work / "fpb.txt").write_bytes("".join(line + "\r\n" for line in lines).encode("latin-1"))
        data["path"] = str(work / "fpb.txt")
    return data


def bench_results(run: Path) -> dict[str, dict]:
    """The `kd bench` results of a run directory, by role."""
    results = (json.loads(path.read_text()) for path in sorted((run / "bench").glob("*.json")))
    return {result["role"]: result for result in results}


def bench_timing(result: dict, size: str):
    """A bench result's median per example at batch ``size`` as a ``kdcli.timing.Timing``: with its interval and
    rounds, so that two results of one session divide round by round."""
    from kdcli.timing import Timing

    batch = result["batches"][size]
    latency = batch["latency_ms_per_example"]
    return Timing(latency["p50"], *latency["ci95"], tuple(batch["ms_per_example_by_round"]), result["session"]["id"])
