"""kd against the usual way: a `transformers.Trainer` subclass that runs the teacher in
`compute_loss` (the pattern most distillation tutorials use), same models, loss, batch,
steps and threads.

    python benchmarks/trainer_baseline.py            # all-MiniLM-L6-v2 -> 3 layers, Financial PhraseBank
    python benchmarks/trainer_baseline.py --quick    # tiny BERT from tests/kit.py (CI)

Both sides compute CE + T^2 KL on the class logits (alpha 0.5, T 2) with the teacher live;
kd is also timed with the teacher read from its cache. Samples/s is wall time over the
training call (kd: its step time and its whole run_job, which adds one final validation and
checkpoint). Median of --repeats runs after a warm-up. Writes
benchmarks/results/trainer_baseline[-quick].json and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))

import distill_speed  # noqa: E402  (shared setup: models, rows, jobs)
from _common import finish  # noqa: E402

from kdcli import losses  # noqa: E402
from kdcli.cache import LiveTeacher, build_cache  # noqa: E402
from kdcli.job import TeacherSettings  # noqa: E402
from kdcli.models import student_from_teacher  # noqa: E402
from kdcli.recipe import LossConfig  # noqa: E402
from kdcli.runtime import describe, make_accelerator  # noqa: E402
from kdcli.train import run_job  # noqa: E402


def trainer_samples_per_second(teacher, layers, rows, args, out: Path) -> float:
    """The tutorial pattern: Trainer.compute_loss runs student and teacher on every batch."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    torch.manual_seed(0)
    student = student_from_teacher(teacher, layers).model
    tokenizer = teacher.tokenizer
    teacher_model = teacher.model.eval()

    class DistillationTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = teacher_model(**inputs).logits
            probs = losses.teacher_probs([teacher_logits], args.temperature)
            loss = 0.5 * losses.cross_entropy(outputs.logits, labels) + 0.5 * losses.kd_term(
                outputs.logits, probs, args.temperature, "forward_kl"
            )
            return (loss, outputs) if return_outputs else loss

    encoded = Dataset.from_list([{"text": r["text"], "label": r["label"]} for r in rows]).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_length), batched=True,
        remove_columns=["text"],
    ).rename_column("label", "labels")
    training_args = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=5e-5, warmup_steps=0.1, weight_decay=0.01, max_grad_norm=1.0, save_strategy="no",
        eval_strategy="no", logging_steps=10**6, report_to=[], use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = DistillationTrainer(model=student, args=training_args, train_dataset=encoded,
                                  data_collator=DataCollatorWithPadding(tokenizer))
    started = time.perf_counter()
    trainer.train()
    return args.steps * args.batch_size / (time.perf_counter() - started)


def kd_samples_per_second(mode: str, teacher, layers, rows, args, out: Path, cache: Path) -> tuple[float, float]:
    job = distill_speed.make_job(mode, teacher, layers, rows, args, out, cache)
    # The Trainer side has no hidden-state loss: compare like with like.
    job.loss = LossConfig(alpha=0.5, temperature=args.temperature)
    job.hidden_pairs = {}
    if mode == "live":
        job.teachers = {"t": LiveTeacher(teacher, TeacherSettings(max_length=args.max_length))}
    started = time.perf_counter()
    result = run_job(job, make_accelerator(), show_progress=False)
    return result.samples_per_second, result.samples / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    args.steps = args.steps or (8 if args.quick else 40)
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    names = ("trainer_live", "kd_live_steps", "kd_live_wall", "kd_cached_steps", "kd_cached_wall")
    runs: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        teacher, layers, rows = distill_speed.setup(args.quick, workdir)
        teacher.model.eval()
        build_cache(workdir / "cache", LiveTeacher(teacher, TeacherSettings(max_length=args.max_length)),
                    {"train": rows, "validation": rows[:16]}, {}, batch_size=64)
        for repeat in range(args.repeats + 1):
            trainer = trainer_samples_per_second(teacher, layers, rows, args, workdir / f"trainer-{repeat}")
            live = kd_samples_per_second("live", teacher, layers, rows, args, workdir / f"live-{repeat}",
                                         workdir / "cache")
            cached = kd_samples_per_second("cached", teacher, layers, rows, args, workdir / f"cached-{repeat}",
                                           workdir / "cache")
            if repeat:  # the first round is the warm-up
                for name, value in zip(names, (trainer, *live, *cached)):
                    runs[name].append(value)

    median = {name: statistics.median(values) for name, values in runs.items()}
    summary = {
        "benchmark": "trainer_baseline", "quick": args.quick,
        "model": "tiny-bert (tests/kit.py)" if args.quick else f"all-MiniLM-L6-v2 -> layers {layers}",
        "steps": args.steps, "batch_size": args.batch_size, "repeats": args.repeats,
        "samples_per_second": {k: round(v, 2) for k, v in median.items()},
        "all_runs": {k: [round(v, 2) for v in vs] for k, vs in runs.items()},
        "kd_live_vs_trainer": round(median["kd_live_wall"] / median["trainer_live"], 3),
        "kd_cached_vs_trainer": round(median["kd_cached_wall"] / median["trainer_live"], 3),
        "env": describe(),
    }
    print(f"\n{'setup':<18} {'samples/s':>10} {'vs Trainer':>11}")
    for name, value in median.items():
        print(f"{name:<18} {value:>10.1f} {value / median['trainer_live']:>10.2f}x")
    finish(summary)


if __name__ == "__main__":
    main()
