"""The student as deployed (`kd export`, issue 17): accuracy and latency of the fp32 MiniLM teacher, the fp32
student and the student exported as ONNX, ONNX int8 and PyTorch int8, on the offline finance recipe.

    python benchmarks/export.py --threads 1                  # recipes/local/fpb.toml, seed 42 (runs/fpb-local)
    python benchmarks/export.py --threads 1 --seeds 42 7 123 # the seeds of docs/benchmarks.md's finance table
    python benchmarks/export.py --quick                      # a tiny BERT teacher and student (CI)

For each seed, in runs/ of the checkout: `kd distill` (the recipe's student; reused when up to date), `kd export`
in every format, then `kd eval` and `kd bench` of each row, so the numbers are those `kd compare` shows. Timing is
`kd bench`'s: --warmup untimed runs, then the median of --iters timed runs per batch size (1 and 32), torch and
ONNX Runtime on --threads threads, on consecutive test rows already tokenised. Accuracy is on the seed's test split
(188 sentences: one is 0.53 points).

Targets (issue 17): each int8 student within 0.5 accuracy points of the fp32 student, and at least 3x faster
than the fp32 MiniLM teacher at batch 1 (means over the seeds). Writes benchmarks/results/export[-quick].json; the
table is printed and the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's kdcli (not the installed one), the tiny-model kit

from _common import finish, fpb_data, kd, mean_std, write_recipe  # noqa: E402

from kdcli import recipe as recipe_mod  # noqa: E402
from kdcli.exported import FORMATS  # noqa: E402
from kdcli.runtime import describe  # noqa: E402

RECIPE = ROOT / "recipes" / "local" / "fpb.toml"
TEACHER, STUDENT = "teacher:minilm", "student"
EXPORTS = [f"export:student-{fmt}" for fmt in FORMATS]
INT8 = [role for role in EXPORTS if role.endswith("int8")]
ROWS = [TEACHER, STUDENT, *EXPORTS]
COLUMNS = ("accuracy", "macro_f1", "ms_batch_1", "ms_batch_32", "size_megabytes")
MAX_DROP_POINTS, MIN_SPEEDUP = 0.5, 3.0


def seed_recipe(work: Path, seed: int, quick: bool, threads: int | None, warmup: int, iters: int) -> Path:
    """recipes/local/fpb.toml under ``seed``, named as docs/benchmarks.md's runs (fpb-local, fpb-local-s7, ...), so
    their trained students are reused, with this benchmark's timing settings (bench settings are no part of what a
    student's training depends on); in quick mode a tiny BERT teacher alone on made-up sentences."""
    raw = recipe_mod.load_raw(RECIPE, [f"seed={seed}"])
    raw["name"] = "fpb-local" if seed == 42 else f"fpb-local-s{seed}"
    raw["bench"].update(batch_sizes=[1, 32], warmup=warmup, iters=iters, threads=threads)
    if quick:
        import kit

        raw["data"] = fpb_data(work, quick)
        teacher = kit.make_model_dir(work / "models", "bert", "sequence-classification", num_labels=3)
        raw["teachers"] = {"minilm": {**raw["teachers"]["minilm"], "ref": str(teacher)}}
        raw["teachers"]["minilm"]["finetune"].update(epochs=1)
        raw["single_teacher_students"] = []
        raw["student"]["layers"] = [0, 2]
        raw["train"].update(max_steps=6, eval_every=96)
        raw["bench"]["max_examples"] = 32
    return write_recipe(raw, work / "runs" / f"{raw['name']}.toml")


def measured(run: Path, role: str) -> dict:
    """A row from the run's eval and bench results of ``role``."""
    name = role.replace(":", "-")
    evaluated = json.loads((run / "eval" / f"{name}.json").read_text())
    benched = json.loads((run / "bench" / f"{name}.json").read_text())
    latency = {size: batch["latency_ms_per_example"]["p50"] for size, batch in benched["batches"].items()}
    return {"accuracy": evaluated["metrics"]["accuracy"], "macro_f1": evaluated["metrics"]["f1"], "n": evaluated["n"],
            "ms_batch_1": latency["1"], "ms_batch_32": latency["32"], "size_megabytes": benched["size_bytes"] / 1e6,
            "parameters": benched["parameters"], "threads": benched["threads"], "model": evaluated["model"]}


def run_seed(work: Path, seed: int, args: argparse.Namespace) -> dict:
    recipe = str(seed_recipe(work, seed, args.quick, args.threads, args.warmup, args.iters))
    kd(work, "distill", recipe)
    checks = {}
    run = work / "runs" / Path(recipe).stem
    for fmt in FORMATS:
        kd(work, "export", recipe, "--format", fmt)
        checks[fmt] = json.loads((run / "export" / f"student-{fmt}" / "export.json").read_text())["check"]
    for role in ROWS:
        kd(work, "eval", recipe, "--model", role)
        kd(work, "bench", recipe, "--model", role)
    return {"rows": {role: measured(run, role) for role in ROWS}, "export_checks": checks, "env": describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--threads", type=int, help="torch and ONNX Runtime threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.warmup, args.iters = [42], 1, 3
    work = Path(tempfile.mkdtemp()) if args.quick else ROOT  # the runs live in runs/ of the checkout
    per_seed = {str(seed): run_seed(work, seed, args) for seed in args.seeds}

    def mean(values: list[float]) -> float:
        return statistics.fmean(values)

    runs = per_seed.values()
    drop = {role: round(mean([100 * (r["rows"][STUDENT]["accuracy"] - r["rows"][role]["accuracy"]) for r in runs]), 2)
            for role in EXPORTS}
    speedup = {role: round(mean([r["rows"][TEACHER]["ms_batch_1"] / r["rows"][role]["ms_batch_1"] for r in runs]), 2)
               for role in [STUDENT, *EXPORTS]}
    summary = {
        "benchmark": "export", "quick": args.quick,
        "recipe": str(RECIPE.relative_to(ROOT)) + (" (tiny BERT teacher, made-up sentences)" if args.quick else ""),
        "seeds": list(per_seed), "threads_asked": args.threads, "warmup": args.warmup, "iters": args.iters,
        "rows": ROWS, "table": mean_std(per_seed, ROWS, COLUMNS),
        "accuracy_drop_points": drop, "speedup_vs_teacher_batch_1": speedup,
        "targets": {"max_accuracy_drop_points": MAX_DROP_POINTS, "min_speedup_batch_1": MIN_SPEEDUP,
                    "met": {role: drop[role] <= MAX_DROP_POINTS and speedup[role] >= MIN_SPEEDUP for role in INT8}},
        "per_seed": per_seed, "env": describe(),
    }
    print(f"\n{len(per_seed)} seed(s), {args.threads or 'torch default'} thread(s); ms per example, median of "
          f"{args.iters} runs")
    headings = [("accuracy", 10), ("macro-F1", 10), ("ms b1", 9), ("ms b32", 9), ("MB", 8), ("drop pts", 10),
                ("x teacher", 11)]
    print(f"{'row':28}" + "".join(f"{title:>{width}}" for title, width in headings))
    for role in ROWS:
        cells = {column: summary["table"][role][column][0] for column in COLUMNS}
        print(f"{role:28}{cells['accuracy']:>10.4f}{cells['macro_f1']:>10.4f}{cells['ms_batch_1']:>9.2f}"
              f"{cells['ms_batch_32']:>9.2f}{cells['size_megabytes']:>8.1f}"
              f"{drop[role] if role in drop else '':>10}{speedup.get(role, ''):>11}")
    finish(summary, args.out)


if __name__ == "__main__":
    main()
