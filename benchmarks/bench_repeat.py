"""Can `kd compare` tell a real speed difference from noise? `kd bench --model all` run several times on one
trained run (issue 18).

    python benchmarks/bench_repeat.py --repeats 3   # runs/fpb-local: recipes/local/fpb.toml, seed 42, as
                                                    # benchmarks/export.py trains it, with its exports
    python benchmarks/bench_repeat.py --quick       # a tiny BERT teacher and its students (CI)

Each repeat is one `kd bench RECIPE --model all,EXPORTS` (every model of the run and its exports timed
together, round-robin, as docs/design.md's "Timing" says), then `kd compare RUN --format json`. Per repeat and
model: the median ms per example at batch 1 and 32 with its 95% interval, and which models compare showed as
one speed. Per repeat, the verdicts the issue asks for: whether the models of --same (the student's
architecture) were shown as one speed, and the speed-up of --fast over --slow (the median of the rounds'
ratios) with its 95% interval, and whether that interval excludes 1. Nothing is trained here: the run must
exist (`python benchmarks/export.py --seeds 42` makes it). Writes benchmarks/results/bench_repeat[-quick].json;
the table is printed and the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's kdcli (not the installed one), the tiny-model kit

from _common import bench_results, bench_timing, finish, kd, write_recipe  # noqa: E402

from kdcli import recipe as recipe_mod  # noqa: E402
from kdcli.exported import FORMATS  # noqa: E402
from kdcli.report import collect_run  # noqa: E402
from kdcli.runtime import describe  # noqa: E402
from kdcli.timing import ratio  # noqa: E402

RECIPE = ROOT / "recipes" / "local" / "fpb.toml"
SAME = ["baseline", "dataset", "student:minilm", "student"]  # the student's architecture: MiniLM's layers [0, 2, 4]
DEFAULT_SETS = ("name=fpb-local", "bench.batch_sizes=[1, 32]", "bench.threads=1", "bench.warmup=10", "bench.iters=20",
                "bench.precision=0.02", "bench.max_seconds=300")


def quick_run(work: Path) -> Path:
    """A tiny BERT teacher, its students with and without it, and the torch int8 export of the student."""
    import jobs
    import kit

    teacher = kit.make_model_dir(work / "models", "bert", "sequence-classification", num_labels=3, layers=4)
    jobs.write_sentences(work / "s.jsonl", 80)
    recipe = write_recipe({
        "name": "bench-repeat", "task": "classify",
        "data": {"format": "jsonl", "path": str(work / "s.jsonl"), "label_names": jobs.LABELS},
        "teachers": {"tiny": {"ref": str(teacher)}}, "student": {"from_teacher": "tiny", "layers": [0, 2]},
        "train": {"max_steps": 4, "batch_size": 8, "eval_every": 1000},
        "bench": {"batch_sizes": [1, 8], "warmup": 1, "iters": 6, "max_seconds": 3, "max_examples": 16},
    }, work / "bench-repeat.toml")
    kd(work, "distill", str(recipe))
    kd(work, "distill", str(recipe), "--no-teachers")
    kd(work, "export", str(recipe), "--format", "torch-int8")
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--set", dest="overrides", action="append", default=list(DEFAULT_SETS),
                        help="recipe overrides (default: the seed-42 run that benchmarks/export.py trains, timed "
                        "as it times it)")
    parser.add_argument("--same", nargs="+", default=SAME, help="the models of one architecture")
    parser.add_argument("--slow", default="teacher:minilm")
    parser.add_argument("--fast", default="student")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = ROOT
    if args.quick:
        work = Path(tempfile.mkdtemp())
        args.recipe, args.overrides, args.repeats = quick_run(work), [], 2
        args.same, args.slow = ["baseline", "dataset", "student"], "teacher:tiny"
    recipe_path = work / "runs" / f"{args.recipe.stem}-bench-repeat.toml"
    write_recipe(recipe_mod.load_raw(args.recipe, args.overrides), recipe_path)
    loaded = recipe_mod.load(recipe_path)
    run = work / "runs" / loaded.name
    exports = [f"export:student-{fmt}" for fmt in FORMATS if (run / "export" / f"student-{fmt}").is_dir()]
    repeats = []
    for _ in range(args.repeats):
        load_before = os.getloadavg()[0]
        kd(work, "bench", str(recipe_path), "--model", ",".join(["all", *exports]))
        benched = bench_results(run)
        rows = {row["role"]: row for row in collect_run(run).rows if row["role"] in benched}
        speedup, low, high = ratio(bench_timing(benched[args.slow], "1"), bench_timing(benched[args.fast], "1"))
        sizes = sorted(benched[args.fast]["batches"], key=int)
        repeats.append({
            "models": {role: {**{f"ms_batch_{size}": b["batches"][size]["latency_ms_per_example"]["p50"]
                                 for size in sizes},
                              **{f"ms_batch_{size}_ci95": b["batches"][size]["latency_ms_per_example"]["ci95"]
                                 for size in sizes},
                              "shown_ms_batch_1": rows[role]["ms_per_example"],
                              "same_speed_as": rows[role]["same_speed_as"]}
                       for role, b in benched.items()},
            "same_shown_as_one_speed": all(sorted(rows[role]["same_speed_as"] + [role]) == sorted(args.same)
                                           for role in args.same),
            "speedup": {"slow": args.slow, "fast": args.fast, "value": speedup, "ci95": [low, high],
                        "excludes_1": not low <= 1.0 <= high},
            "session": {k: benched[args.fast]["session"][k] for k in ("rounds", "seconds", "load_average_1m")},
            "load_average_1m_before": round(load_before, 2),
        })
    summary = {
        "benchmark": "bench_repeat", "quick": args.quick, "recipe": str(args.recipe.name), "run": loaded.name,
        "overrides": args.overrides, "repeats": repeats, "same": args.same,
        "verdicts": {"same_one_speed": sum(r["same_shown_as_one_speed"] for r in repeats),
                     "speedup_excludes_1": sum(r["speedup"]["excludes_1"] for r in repeats), "of": len(repeats)},
        "env": describe(),
    }
    print(f"\nms per example, batch 1, median [95% interval], per repeat ({len(repeats)} sessions of kd bench)")
    for role in repeats[0]["models"]:
        cells = [f"{r['models'][role]['ms_batch_1']:.3f} [{r['models'][role]['ms_batch_1_ci95'][0]:.3f}, "
                 f"{r['models'][role]['ms_batch_1_ci95'][1]:.3f}]" for r in repeats]
        print(f"{role:28}" + "  ".join(f"{cell:>26}" for cell in cells))
    for r in repeats:
        s = r["speedup"]
        print(f"{s['slow']} / {s['fast']}: {s['value']:.2f}x [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]; "
              f"{', '.join(args.same)} shown as one speed: {r['same_shown_as_one_speed']}")
    finish(summary, args.out)


if __name__ == "__main__":
    main()
