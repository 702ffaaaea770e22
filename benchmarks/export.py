"""The student as deployed (`kd export`, issue 17): accuracy and latency of the fp32 MiniLM teacher, the fp32
student and the student exported as ONNX, ONNX int8 and PyTorch int8, on the offline finance recipe.

    python benchmarks/export.py --threads 1                  # recipes/local/fpb.toml, seed 42 (runs/fpb-local)
    python benchmarks/export.py --threads 1 --seeds 42 7 123 # the seeds of docs/benchmarks.md's finance table
    python benchmarks/export.py --quick                      # a tiny BERT teacher and student (CI)

For each seed, in runs/ of the checkout: `kd cache-teachers` and `kd distill` (the recipe's student; both reused
when up to date), `kd export` in every format, one `kd bench` of every model of the run and the exports together,
then `kd eval` of each, so the numbers are those `kd compare` shows. Timing is `kd bench`'s: --warmup untimed
calls, then rounds in which every model runs each batch size (1 and 32) in turn, at least --iters of them and more
until each median's 95% interval is within --precision of it (at most --max-seconds); torch and ONNX Runtime on
--threads threads, on consecutive test rows already tokenised. A speed-up is the median of the rounds' ratios, with
its 95% interval. The run's other students are trained too (labels only, and from each single teacher the recipe
lists), and every model's accuracy and latency is kept (`every_role`), with its interval: docs/benchmarks.md's
finance table.
Accuracy is on the seed's test split (188 sentences: one is 0.53 points).

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

from _common import bench_results, bench_timing, finish, fpb_data, kd, mean_std, write_recipe  # noqa: E402

from kdcli import recipe as recipe_mod  # noqa: E402
from kdcli.exported import FORMATS  # noqa: E402
from kdcli.runtime import describe  # noqa: E402
from kdcli.timing import ratio  # noqa: E402

RECIPE = ROOT / "recipes" / "local" / "fpb.toml"
TEACHER, STUDENT = "teacher:minilm", "student"
EXPORTS = [f"export:student-{fmt}" for fmt in FORMATS]
INT8 = [role for role in EXPORTS if role.endswith("int8")]
ROWS = [TEACHER, STUDENT, *EXPORTS]
COLUMNS = ("accuracy", "macro_f1", "ms_batch_1", "ms_batch_32", "size_megabytes")
MAX_DROP_POINTS, MIN_SPEEDUP = 0.5, 3.0


def seed_recipe(work: Path, seed: int, quick: bool, args: argparse.Namespace) -> Path:
    """recipes/local/fpb.toml under ``seed``, named as docs/benchmarks.md's runs (fpb-local, fpb-local-s7, ...), so
    their trained students are reused, with this benchmark's timing settings (bench settings are no part of what a
    student's training depends on); in quick mode a tiny BERT teacher alone on made-up sentences."""
    raw = recipe_mod.load_raw(RECIPE, [f"seed={seed}"])
    raw["name"] = "fpb-local" if seed == 42 else f"fpb-local-s{seed}"
    raw["bench"].update(batch_sizes=[1, 32], warmup=args.warmup, iters=args.iters, precision=args.precision,
                        max_seconds=args.max_seconds, threads=args.threads)
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


def measured(run: Path, role: str, benched: dict) -> dict:
    """A row from ``role``'s eval result and its bench result ``benched``."""
    evaluated = json.loads((run / "eval" / f"{role.replace(':', '-')}.json").read_text())
    latency = {size: batch["latency_ms_per_example"] for size, batch in benched["batches"].items()}
    return {"accuracy": evaluated["metrics"]["accuracy"], "macro_f1": evaluated["metrics"]["f1"], "n": evaluated["n"],
            "ms_batch_1": latency["1"]["p50"], "ms_batch_32": latency["32"]["p50"],
            "ms_batch_1_ci95": latency["1"]["ci95"], "ms_batch_32_ci95": latency["32"]["ci95"],
            "size_megabytes": benched["size_bytes"] / 1e6, "parameters": benched["parameters"],
            "threads": benched["threads"], "model": evaluated["model"]}


def run_seed(work: Path, seed: int, args: argparse.Namespace) -> dict:
    recipe = str(seed_recipe(work, seed, args.quick, args))
    kd(work, "cache-teachers", recipe)  # as `kd run` does: a live SmolLM2 teacher makes a step 20x dearer
    kd(work, "distill", recipe)
    kd(work, "distill", recipe, "--no-teachers")  # the rows of the finance table, timed with the rest
    for name in recipe_mod.load(Path(recipe)).single_teacher_students:
        kd(work, "distill", recipe, "--teacher", name)
    checks = {}
    run = work / "runs" / Path(recipe).stem
    for fmt in FORMATS:
        kd(work, "export", recipe, "--format", fmt)
        checks[fmt] = json.loads((run / "export" / f"student-{fmt}" / "export.json").read_text())["check"]
    kd(work, "bench", recipe, "--model", ",".join(["all", *EXPORTS]))  # one session: every model, round-robin
    benched = bench_results(run)
    for role in benched:
        kd(work, "eval", recipe, "--model", role)
    teacher = bench_timing(benched[TEACHER], "1")
    every = {}
    for role, b in benched.items():
        evaluated = json.loads((run / "eval" / f"{role.replace(':', '-')}.json").read_text())
        every[role] = {"accuracy": evaluated["metrics"]["accuracy"],
                       "speedup_vs_teacher_batch_1": list(ratio(teacher, bench_timing(b, "1")))}
        for size, batch in b["batches"].items():
            every[role][f"ms_batch_{size}"] = batch["latency_ms_per_example"]["p50"]
            every[role][f"ms_batch_{size}_ci95"] = batch["latency_ms_per_example"]["ci95"]
    speedups = {role: every[role]["speedup_vs_teacher_batch_1"] for role in [STUDENT, *EXPORTS]}
    session = benched[TEACHER]["session"]
    return {"rows": {role: measured(run, role, benched[role]) for role in ROWS}, "export_checks": checks,
            "speedup_vs_teacher_batch_1": speedups, "every_role": every,
            "bench_session": {k: session[k] for k in ("roles", "rounds", "seconds", "load_average_1m")},
            "env": describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--threads", type=int, help="torch and ONNX Runtime threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=20, help="timed rounds at least")
    parser.add_argument("--precision", type=float, default=0.02, help="target half-width of each 95%% interval")
    parser.add_argument("--max-seconds", type=float, default=300, help="no round starts after this")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.warmup, args.iters, args.max_seconds = [42], 1, 6, 5
    work = Path(tempfile.mkdtemp()) if args.quick else ROOT  # the runs live in runs/ of the checkout
    per_seed = {str(seed): run_seed(work, seed, args) for seed in args.seeds}

    def mean(values: list[float]) -> float:
        return statistics.fmean(values)

    runs = per_seed.values()
    drop = {role: round(mean([100 * (r["rows"][STUDENT]["accuracy"] - r["rows"][role]["accuracy"]) for r in runs]), 2)
            for role in EXPORTS}
    speedup = {role: round(mean([r["speedup_vs_teacher_batch_1"][role][0] for r in runs]), 2)
               for role in [STUDENT, *EXPORTS]}
    summary = {
        "benchmark": "export", "quick": args.quick,
        "recipe": str(RECIPE.relative_to(ROOT)) + (" (tiny BERT teacher, made-up sentences)" if args.quick else ""),
        "seeds": list(per_seed), "threads_asked": args.threads, "warmup": args.warmup, "iters": args.iters,
        "precision": args.precision, "max_seconds": args.max_seconds,
        "rows": ROWS, "table": mean_std(per_seed, ROWS, COLUMNS),
        "accuracy_drop_points": drop, "speedup_vs_teacher_batch_1": speedup,
        "targets": {"max_accuracy_drop_points": MAX_DROP_POINTS, "min_speedup_batch_1": MIN_SPEEDUP,
                    "met": {role: drop[role] <= MAX_DROP_POINTS and speedup[role] >= MIN_SPEEDUP for role in INT8}},
        "per_seed": per_seed, "env": describe(),
    }
    print(f"\n{len(per_seed)} seed(s), {args.threads or 'torch default'} thread(s); ms per example, the median "
          "over the rounds of one round-robin session per seed; x teacher: the median of the rounds' ratios")
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
