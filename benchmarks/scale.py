"""How kd's cost grows with the data: time and peak memory of each phase from 10k to 1M rows (issue 15).

For each size, a synthetic source is written (prepare_scale.py's CSV: unique texts of about 64
bytes, three labels) and the real CLI runs each phase in a fresh process, as a user runs them:

    kd prepare RECIPE          the CSV into Arrow (split 89/1/10 %, stratified)
    kd cache-teachers RECIPE   the teacher over every split into its cache
    kd distill RECIPE          ``--steps`` optimizer steps from the cache, a validation, the best model saved
    kd eval RECIPE             the student over the test split, and the teacher for the agreement

Each phase's wall time and peak resident set (Linux's ``VmHWM``, written by the process as it
exits) are recorded. The models are the test kit's tiny ones (tests/kit.py: a 4-layer BERT teaching
a 2-layer one; for generate a 3-layer Llama teaching a 2-layer one), so the model's work is small and what
grows with the rows is kd's own: reading, tokenising, caching and holding the data. Two tasks:

- classify at 10k, 100k and 1M rows; with ``--prepare-10m``, `kd prepare` alone also at 10M (the 10M
  prepare is also benchmarks/prepare_scale.py's);
- generate (the same CSV: the text is the prompt, the label's name the answer; a top-8 token cache)
  at 10k and 200k.

The targets (issue 15): with a cached teacher, the peak of `kd distill` grows by less than 100 MB
from 10k to 1M classify rows and from 10k to 200k generate answers. A plot of seconds and peak MB
per phase against rows goes to benchmarks/results/scale.png (where matplotlib is installed).

    python benchmarks/scale.py            # about 30 minutes on 2 CPU cores; about 1 GB of disk under --workdir
    python benchmarks/scale.py --quick    # 1k and 4k rows, 500 and 2k answers, 5 steps, no plot (CI)

Writes benchmarks/results/scale[-quick].json and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]  # the benchmarks' helpers, the tiny-model kit

from _common import RESULTS, finish  # noqa: E402
from prepare_scale import CHILD, LABELS, load_average, write_csv  # noqa: E402

SIZES = {False: {"classify": [10_000, 100_000, 1_000_000], "generate": [10_000, 200_000]},
         True: {"classify": [1_000, 4_000], "generate": [500, 2_000]}}

PHASES = ("prepare", "cache", "distill", "eval")
TARGET_MB = 100


def recipe(task: str, models: dict[str, Path], steps: int) -> str:
    """The recipe of a run: a tiny cached teacher, a smaller student, ``steps`` steps, one validation."""
    if task == "classify":
        data = 'columns = { text = "text", label = "label" }'
        loss = "alpha = 0.5\ntemperature = 2.0"
    else:
        data = 'columns = { text = "text", label = "", answers = "label" }\nmax_length = 32\nanswer_max_length = 4'
        loss = "alpha = 0.5\ntemperature = 1.0\ndivergence = \"forward_kl\"\ntop_k = 8"
    head = "sequence-classification" if task == "classify" else "causal"
    return f"""name = "scale"
task = "{task}"
seed = 0

[data]
format = "csv"
path = "rows.csv"
{data}
split = {{ train = 0.89, validation = 0.01, test = 0.1 }}

[teachers.t]
ref = "{models['teacher']}"
head = "{head}"

[student]
ref = "{models['student']}"

[loss]
{loss}

[train]
max_steps = {steps}
batch_size = 32
eval_every = {32 * steps}
checkpoint_every = {32 * steps}
log_every = {32 * steps}
eval_batch_size = 64

[eval]
batch_size = 64
max_new_tokens = 4
"""


def run_phase(work: Path, phase: str) -> dict:
    """One kd command in a fresh process: its wall time and peak resident set."""
    args = {"prepare": ["prepare", "recipe.toml", "--json"], "cache": ["cache-teachers", "recipe.toml"],
            "distill": ["distill", "recipe.toml"], "eval": ["eval", "recipe.toml", "--model", "student"]}[phase]
    peak_file = work / f"peak-{phase}.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KD_BENCH_PEAK": str(peak_file), "HF_HUB_OFFLINE": "1"}
    before = load_average()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"kd {' '.join(args)} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_megabytes": round(int(peak_file.read_text()) * 1024 / 1e6, 1),
            "load_average": [before, load_average()]}


def measure(task: str, rows: int, models: dict[str, Path], workdir: Path, steps: int, phases=PHASES) -> dict:
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f"kd-scale-{task}-") as tmp:
        work = Path(tmp)
        write_csv(work / "rows.csv", rows, seed=rows)
        (work / "recipe.toml").write_text(recipe(task, models, steps))
        measured = {}
        for phase in phases:
            measured[phase] = run_phase(work, phase)
            print(f"  {task} {rows:>10,} rows  {phase:8}{measured[phase]['seconds']:>9.1f} s"
                  f"{measured[phase]['peak_megabytes']:>9.1f} MB  load {measured[phase]['load_average']}", flush=True)
        if "distill" in phases:
            train = json.loads((work / "runs" / "scale" / "data" / "main" / "manifest.json").read_text())
            measured["train_rows"] = train.get("counts", {}).get("train")
    return {"task": task, "rows": rows, **measured}


def plot(runs: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for task in ("classify", "generate"):
        mine = [r for r in runs if r["task"] == task]
        for phase in PHASES:
            points = [(r["rows"], r[phase]) for r in mine if phase in r]
            if not points:
                continue
            style = "-o" if task == "classify" else "--s"
            label = f"{task} {phase}"
            time_axis.plot([p[0] for p in points], [p[1]["seconds"] for p in points], style, label=label)
            memory_axis.plot([p[0] for p in points], [p[1]["peak_megabytes"] for p in points], style, label=label)
    for axis, what in ((time_axis, "wall seconds"), (memory_axis, "peak resident MB")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("rows in the source")
        axis.set_ylabel(what)
        axis.grid(True, which="both", alpha=0.3)
    memory_axis.legend(fontsize=7, ncol=2)
    figure.suptitle("kd: cost of each phase against rows (tiny models, 2 CPU cores)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of `kd distill` at batch 32 "
                        "(default 50; quick: 5)")
    parser.add_argument("--prepare-10m", action="store_true", help="also `kd prepare` at 10M rows (3 GB of disk)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.steps = args.steps or (5 if args.quick else 50)
    import kit

    with tempfile.TemporaryDirectory(prefix="kd-scale-models-") as folder:
        classify, causal = ("bert", "sequence-classification"), ("llama", "causal")
        models = {"classify": {"teacher": kit.make_model_dir(folder, *classify, num_labels=len(LABELS)),
                               "student": kit.make_model_dir(folder, *classify, num_labels=len(LABELS), layers=2)},
                  "generate": {"teacher": kit.make_model_dir(folder, *causal, layers=3),
                               "student": kit.make_model_dir(folder, *causal, layers=2)}}
        runs = []
        for task, sizes in SIZES[args.quick].items():
            for rows in sizes:
                runs.append(measure(task, rows, models[task], args.workdir, args.steps))
        for rows in [10_000_000] if args.prepare_10m else []:
            runs.append(measure("classify", rows, models["classify"], args.workdir, args.steps, phases=("prepare",)))

    growth = {}
    for task, sizes in SIZES[args.quick].items():
        small, large = (next(r for r in runs if r["task"] == task and r["rows"] == n) for n in (sizes[0], sizes[-1]))
        grown = large["distill"]["peak_megabytes"] - small["distill"]["peak_megabytes"]
        growth[task] = {"from_rows": sizes[0], "to_rows": sizes[-1], "distill_peak_growth_megabytes": round(grown, 1),
                        "within_target": grown < TARGET_MB}
    picture = None if args.quick else RESULTS / "scale.png"
    plotted = picture is not None and plot(runs, picture)
    from kdcli.runtime import describe  # only now: the children ran without this process holding torch

    print(f"\n{'task':10}{'rows':>11}" + "".join(f"{p + ' s':>12}{'MB':>8}" for p in PHASES))
    for r in runs:
        print(f"{r['task']:10}{r['rows']:>11,}" + "".join(
            f"{r[p]['seconds']:>12.1f}{r[p]['peak_megabytes']:>8.0f}" if p in r else f"{'':>20}" for p in PHASES))
    for task, g in growth.items():
        print(f"{task}: kd distill's peak grows {g['distill_peak_growth_megabytes']:+.1f} MB from {g['from_rows']:,} "
              f"to {g['to_rows']:,} rows (target < {TARGET_MB} MB: {'met' if g['within_target'] else 'MISSED'})")
    finish({
        "benchmark": "scale",
        "quick": args.quick,
        "measured": "each phase a fresh `kd` process on a synthetic CSV; wall seconds and peak RSS (VmHWM)",
        "steps": args.steps,
        "target_megabytes": TARGET_MB,
        "runs": runs,
        "distill_growth": growth,
        "plot": str(picture.relative_to(ROOT)) if plotted else None,
        "env": describe(),
    }, args.out)


if __name__ == "__main__":
    main()
