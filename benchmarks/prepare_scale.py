"""Time and peak memory of `kd prepare`, from small sources to large ones (issue 15).

Writes synthetic classification CSVs (a text column and a label column, about 64 bytes a row, as
the issue's: unique texts, three labels) of 10k, 100k, 1M and 10M rows (``--rows``), one at a time
under ``--workdir`` (the system's temporary folder unless given; its free space is checked first),
and runs the real CLI on each, ``kd prepare RECIPE --json``, in a fresh process. It records the
command's wall time, kd's own prepare time (from its JSON), rows per second, and the process's peak
resident set: Linux's ``VmHWM``, which the process writes as it exits, with ``getrusage`` of that
one child (``wait4``) beside it as a check (on Linux that one also counts the parent's resident set
at the fork, which this script keeps small: it imports neither kd nor torch until the end). The
targets (the issue's): a peak under 500 MB up to 1M rows and under 1 GB at 10M; 50k rows/s or more
from 1M rows on (below that the start-up, about 2 s of imports, is most of the time). The load
average is recorded before and after each run: on a shared machine it moves the times, not the
memory. Each CSV and its run directory are deleted once measured.

    python benchmarks/prepare_scale.py                           # 10k, 100k, 1M and 10M rows
    python benchmarks/prepare_scale.py --rows 10000,100000,1000000
    python benchmarks/prepare_scale.py --quick                   # 2k and 20k rows (CI)
    python benchmarks/prepare_scale.py --checkout ../kd-before --out before.json   # another checkout's kd

Writes benchmarks/results/prepare_scale[-quick].json (or --out) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(ROOT))

from _common import finish  # noqa: E402

SIZES = {False: [10_000, 100_000, 1_000_000, 10_000_000], True: [2_000, 20_000]}
WORDS = ("profit loss sales rose fell market shares quarter company growth revenue stock bank euro year "
         "outlook margin orders").split()
LABELS = ("negative", "neutral", "positive")
TARGET_ROWS_PER_SECOND = 50_000


def target_megabytes(rows: int) -> int:
    return 500 if rows <= 1_000_000 else 1000


# The child: kd's own CLI, which writes its peak resident set where KD_BENCH_PEAK says as it exits.
CHILD = """
import atexit, os, sys

def peak():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                with open(os.environ["KD_BENCH_PEAK"], "w") as out:
                    out.write(line.split()[1])

if os.path.exists("/proc/self/status"):
    atexit.register(peak)
sys.argv = ["kd", *sys.argv[1:]]
from kdcli.cli import main
main()
"""


def write_csv(path: Path, rows: int, seed: int) -> None:
    """``rows`` rows of text (eight words and the row's number: every text differs) and a label."""
    rng = random.Random(seed)
    phrases = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(4096)]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for start in range(0, rows, 100_000):
            count = min(100_000, rows - start)
            labels = rng.choices(LABELS, weights=(1, 3, 2), k=count)
            writer.writerows((f"{phrases[(i * 2654435761) % 4096]} {i}", labels[i - start])
                             for i in range(start, start + count))


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def prepare(work: Path, checkout: Path) -> dict:
    """`kd prepare recipe.toml --json` in ``work``, in a new process; its times and peak memory."""
    peak_file = work / "peak.txt"
    env = {**os.environ, "PYTHONPATH": str(checkout), "KD_BENCH_PEAK": str(peak_file), "HF_HUB_OFFLINE": "1"}
    before = load_average()
    started = time.perf_counter()
    with open(work / "stdout.txt", "w") as out, open(work / "stderr.txt", "w") as err:
        child = subprocess.Popen([sys.executable, "-c", CHILD, "prepare", "recipe.toml", "--json"], cwd=work,
                                 env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"kd prepare failed (exit {child.returncode}):\n{(work / 'stderr.txt').read_text()[-3000:]}")
    (result,) = json.loads((work / "stdout.txt").read_text())
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {
        "wall_seconds": round(wall, 3),
        "prepare_seconds": result["seconds"],
        "peak_rss_megabytes": round(int(peak_file.read_text()) * 1024 / 1e6, 1) if peak_file.exists() else None,
        "ru_maxrss_megabytes": round(usage.ru_maxrss * scale / 1e6, 1),
        "counts": result["counts"],
        "load_average_before": before,
        "load_average_after": load_average(),
    }


def commit(checkout: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", help="comma-separated row counts (default: 10k, 100k, 1M, 10M)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--checkout", type=Path, default=REPO, help="the kd checkout to run (default: this one)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")] if args.rows else SIZES[args.quick]
    checkout = args.checkout.resolve()
    # CSV, kd's scratch copy of the rows (Arrow) and the saved splits: about five times the CSV.
    needed = 5 * 67 * max(sizes)
    free = shutil.disk_usage(args.workdir).free
    if free < 1.5 * needed:
        sys.exit(f"{args.workdir} has {free / 1e9:.1f} GB free; {max(sizes):,} rows need about {needed / 1e9:.1f} GB "
                 "(--workdir elsewhere, or fewer --rows)")
    runs = []
    for rows in sizes:
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="kd-prepare-scale-") as tmp:
            work = Path(tmp)
            started = time.perf_counter()
            write_csv(work / "rows.csv", rows, seed=rows)
            megabytes = (work / "rows.csv").stat().st_size / 1e6
            (work / "recipe.toml").write_text(
                'name = "scale"\ntask = "classify"\n\n[data]\nformat = "csv"\npath = "rows.csv"\n'
                'columns = { text = "text", label = "label" }\n\n[student]\nref = "unused"\n\n[loss]\nalpha = 1.0\n')
            print(f"{rows:,} rows: {megabytes:,.1f} MB of CSV written in {time.perf_counter() - started:.0f} s",
                  flush=True)
            measured = prepare(work, checkout)
        peak = measured["peak_rss_megabytes"] or measured["ru_maxrss_megabytes"]
        run = {"rows": rows, "csv_megabytes": round(megabytes, 1), **measured,
               "rows_per_second": round(rows / measured["wall_seconds"]),
               "prepare_rows_per_second": round(rows / measured["prepare_seconds"]),
               "target_megabytes": target_megabytes(rows),
               "memory_within_target": peak < target_megabytes(rows),
               "speed_within_target": (rows / measured["wall_seconds"] >= TARGET_ROWS_PER_SECOND
                                       if rows >= 1_000_000 else None)}
        runs.append(run)
        print(f"  {measured['wall_seconds']:.1f} s ({run['rows_per_second']:,} rows/s), peak {peak:,.1f} MB, "
              f"load {measured['load_average_before']} -> {measured['load_average_after']}", flush=True)
    # Between sizes: the time a further row costs, start-up aside (linear growth keeps it flat).
    marginal = [{"from_rows": a["rows"], "to_rows": b["rows"],
                 "rows_per_second": round((b["rows"] - a["rows"]) / max(b["wall_seconds"] - a["wall_seconds"], 1e-9))}
                for a, b in zip(runs, runs[1:])]
    from kdcli.runtime import describe  # only now: the parent stays small while the children run

    summary = {
        "benchmark": "prepare_scale",
        "quick": args.quick,
        "checkout": str(checkout),
        "commit": commit(checkout),
        "measured": "`kd prepare RECIPE --json` on a synthetic CSV (text, label), a fresh process each",
        "target_rows_per_second": TARGET_ROWS_PER_SECOND,
        "runs": runs,
        "marginal": marginal,
        "env": describe(),
    }
    print(f"\n{'rows':>11}{'CSV MB':>9}{'wall s':>9}{'rows/s':>10}{'peak MB':>10}{'target':>8}  load")
    for run in runs:
        peak = run["peak_rss_megabytes"] or run["ru_maxrss_megabytes"]
        print(f"{run['rows']:>11,}{run['csv_megabytes']:>9,.1f}{run['wall_seconds']:>9.1f}{run['rows_per_second']:>10,}"
              f"{peak:>10,.1f}{'met' if run['memory_within_target'] else 'MISSED':>8}  "
              f"{run['load_average_before']} -> {run['load_average_after']}")
    for step in marginal:
        print(f"{step['from_rows']:,} -> {step['to_rows']:,} rows: {step['rows_per_second']:,} rows/s a further row")
    finish(summary, args.out)


if __name__ == "__main__":
    main()
