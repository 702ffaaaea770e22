"""The README's quickstart, measured: `kd run recipes/quickstart.toml` in a fresh, empty directory,
its whole wall time, and the table `kd compare` prints for it.

    python benchmarks/quickstart.py --threads 1      # the real quickstart (needs the minilm extra)
    python benchmarks/quickstart.py --quick          # the same recipe on a tiny BERT from tests/kit.py (CI)
    python benchmarks/quickstart.py --update-readme  # rewrite README.md's quickstart table from the results file

Each repeat runs `python -m kdcli.cli run` (this checkout's kd) in a new temporary directory, so
nothing is reused: the data is prepared from the CSV shipped in the package, the teacher is
fine-tuned, cached, the students trained, every model evaluated and benchmarked. Before the timed
runs, one untimed `kd check` warms the disk cache and Python's imports. The wall time reported is
the median over --repeats runs. The scores and the table are those of the first run (`kd compare
RUN --format json` and `--format md`); the machine's load average (before and after) and the
threads torch used (from the run's env.json) are recorded with them, because on a shared machine
they move the timings. Writes benchmarks/results/quickstart[-quick].json and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(ROOT))

from _common import RESULTS, finish  # noqa: E402

RECIPE = REPO / "recipes" / "quickstart.toml"
README = REPO / "README.md"
TABLE_START, TABLE_END = "<!-- quickstart-table:start -->", "<!-- quickstart-table:end -->"


def kd(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kdcli.cli", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"kd {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def quick_overrides(workdir: Path) -> list[str]:
    """The quickstart recipe on a tiny 6-layer BERT (so layers [0, 2, 4] and the hidden map still fit), short."""
    sys.path.insert(0, str(REPO / "tests"))
    import kit

    teacher = kit.make_model_dir(workdir / "models", "bert", "sequence-classification", num_labels=3, layers=6)
    sets = [f"teachers.minilm.ref={teacher}", "teachers.minilm.finetune.epochs=1", "train.epochs=1",
            "bench.iters=2", "bench.warmup=1", "bench.max_examples=32"]
    return [arg for value in sets for arg in ("--set", value)]


def minutes(seconds: float) -> str:
    """74.2 -> '1m14s'; under a minute '42s'."""
    whole = round(seconds)
    return f"{whole // 60}m{whole % 60:02d}s" if whole >= 60 else f"{whole}s"


def md_table(compare_md: str) -> str:
    """The table lines of `kd compare --format md` and the notes under it (without its heading)."""
    lines = compare_md.splitlines()
    table = [line for line in lines if line.startswith("|")]
    notes = [line for line in lines if line.startswith("- ")]
    return "\n".join(table + ([""] + notes if notes else []))


def readme_block(summary: dict) -> str:
    threads = summary["env"].get("torch_threads")
    asked = summary.get("threads_asked")
    command = "python benchmarks/quickstart.py" + (f" --threads {asked}" if asked else "")
    load = summary["load_average_1m"]
    text = (
        f"Measured by `{command}` on this project's {summary['cpu_count']}-core CPU machine: "
        f"{minutes(summary['wall_seconds'])} for the whole `kd run` in an empty directory, torch on "
        f"{threads} thread{'' if threads == 1 else 's'}, load average {load['before']} when it started and "
        f"{load['after']} when it ended (the machine is shared with other jobs). Result file: "
        f"`benchmarks/results/quickstart.json`."
    )
    return f"{TABLE_START}\n{textwrap.fill(text, 95)}\n\n{md_table(summary['compare_md'])}\n\n{TABLE_END}"


def update_readme(results: Path) -> None:
    summary = json.loads(results.read_text(encoding="utf-8"))
    if summary["quick"]:
        sys.exit(f"{results} is a --quick result (a tiny model); the README shows the real quickstart")
    text = README.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        sys.exit(f"README.md has no {TABLE_START} ... {TABLE_END} block")
    README.write_text(pattern.sub(lambda _: readme_block(summary), text), encoding="utf-8")
    print(f"README.md: quickstart table rewritten from {results}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=1,
                        help="full runs, each in a new directory; the median wall time is reported")
    parser.add_argument("--threads", type=int,
                        help="torch threads for kd (OMP_NUM_THREADS); default: the environment's")
    parser.add_argument("--update-readme", action="store_true",
                        help="only rewrite README.md from --results, run nothing")
    parser.add_argument("--results", type=Path, default=RESULTS / "quickstart.json")
    args = parser.parse_args()
    if args.update_readme:
        return update_readme(args.results)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    walls: list[float] = []
    loads: list[tuple[float, float]] = []
    first: dict = {}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="kd-quickstart-") as tmp:
            workdir = Path(tmp)
            overrides = quick_overrides(workdir) if args.quick else []
            if repeat == 0:
                kd(["check", str(RECIPE), *overrides], workdir, env)  # untimed warm-up: imports, disk cache
            before = os.getloadavg()[0]
            started = time.perf_counter()
            kd(["run", str(RECIPE), *overrides], workdir, env)
            walls.append(time.perf_counter() - started)
            loads.append((before, os.getloadavg()[0]))
            if repeat == 0:
                run = workdir / "runs" / "quickstart"
                name = str(run.relative_to(workdir))
                manifest = json.loads((run / "data" / "main" / "manifest.json").read_text(encoding="utf-8"))
                first = {
                    "compare": json.loads(kd(["compare", name, "--format", "json"], workdir, env).stdout),
                    "compare_md": kd(["compare", name, "--format", "md"], workdir, env).stdout,
                    "env": json.loads((run / "env.json").read_text(encoding="utf-8")),
                    "data": {key: manifest.get(key) for key in ("rows_read", "duplicates_dropped", "counts")},
                }

    summary = {
        "benchmark": "quickstart", "quick": args.quick,
        "command": "kd run recipes/quickstart.toml" + (" (--set: tiny BERT teacher, 1 epoch)" if args.quick else ""),
        "model": ("tiny-bert (tests/kit.py), 6 layers -> [0, 2, 4]" if args.quick
                  else "all-MiniLM-L6-v2 -> layers [0, 2, 4]"),
        "repeats": args.repeats, "threads_asked": args.threads,
        "wall_seconds": round(statistics.median(walls), 1),
        "all_wall_seconds": [round(w, 1) for w in walls],
        "cpu_count": os.cpu_count(),
        "load_average_1m": {"before": round(loads[0][0], 2), "after": round(loads[0][1], 2)},
        "all_load_average_1m": [[round(b, 2), round(a, 2)] for b, a in loads],
        **first,
    }
    print(f"\nkd run recipes/quickstart.toml: {minutes(summary['wall_seconds'])} ({summary['wall_seconds']} s, "
          f"median of {args.repeats}); load average {summary['load_average_1m']['before']} before, "
          f"{summary['load_average_1m']['after']} after; torch threads {first['env'].get('torch_threads')}\n")
    print(md_table(first["compare_md"]))
    finish(summary)


if __name__ == "__main__":
    main()
