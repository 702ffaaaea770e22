"""kd's on-policy distillation side by side with TRL's GKDTrainer: the same teacher, student, rows,
batch, steps and loss; time per optimizer step and the students' test accuracy (issue 14).

The setting is issue 14's table a (`recipes/local/fpb-generate.toml`): SmolLM2-135M-Instruct,
fine-tuned on 300 Financial PhraseBank sentences by `benchmarks/fpb_generate.py`, teaches in the chat
format (system turn, the sentence as the user turn, the label's name as the answer). The student starts
as GKD is used in practice, after supervised fine-tuning: from fpb_generate.py's SFT student (the
`dataset` role in runs/fpb-generate-sSEED/dataset: the student cut from 10 of the teacher's 30 layers,
trained one epoch on the train split's labels alone). `--start cut` starts from the cut student before
any training instead; with alpha 0 (no gold answers) both sides then collapse to answers that are never
right (docs/benchmarks.md), so the comparison says nothing about quality. Both sides train the student
from the same weights:

  kd    `kd distill` with loss.kd_level = "on_policy", divergence reverse_kl, alpha 0 (no CE on the
        gold answer: TRL's GKD loss has none), on_policy_fraction 1, sampling temperature 1
  TRL   trl.experimental.gkd.GKDTrainer with lmbda 1 (every step on-policy), beta 1 (reverse KL
        in TRL's convention), temperature 1 (sampling), max_new_tokens = answer_max_length (4)

Matched: the teacher folder, the initial student (loaded, or cut, once by kd's own code and saved;
TRL loads that folder), the train rows (kd's prepared split, the same chat messages) in kd's order
(TRL reads them sequentially, so step N of both sees the same 8 rows), batch 8, no accumulation,
one epoch's steps (kd drops an incomplete last batch: 300 rows = 37 steps), AdamW (fused) at lr 1e-4,
weight decay 0, linear schedule with kd's warm-up steps, gradient clipping at 1.0, fp32, no gradient
checkpointing (TRL's default is on, with bf16: both switched off so both do the same arithmetic), seed 0.
data.max_length is the recipe's 128 tokens, which no prompt exceeds, so that no prompt is cut on
either side (kd cuts a prompt at max_length, TRL's collator does not cut these at all).

Time per step is the wall time between the ends of consecutive optimizer steps: everything the
training loop does for a step (data, sampling, teacher, loss, backward, optimizer, its per-step
log line), nothing before the loop (model loading) or after it (kd's final validation and
checkpoint). kd's comes from its metrics.jsonl (`elapsed`, logged every step here; mid-run
checkpoints are switched off), TRL's from a TrainerCallback's on_step_end. The first step of each
is left out of the median (warm-up). `step_only` is the optimizer steps' own time (kd's
train_seconds; TRL from on_step_begin to on_step_end, which leaves out its data loading).
Accuracy: `kd eval` of the starting student and of both trained students on the test split (the
same scorer, greedy answers of up to 4 tokens), macro-F1 over the three classes, and McNemar's exact
test on the sentences the two trained students answer differently.

    pip install -r benchmarks/requirements-trl.txt       # trl, for this benchmark only
    python benchmarks/fpb_generate.py --seeds 0          # first: the fine-tuned teacher and the SFT student
    python benchmarks/trl_gkd.py                         # both trainings, three evaluations (about 30 min, 2 cores)
    python benchmarks/trl_gkd.py --start cut             # from the cut student, untrained (the first measured run)
    python benchmarks/trl_gkd.py --quick                 # a tiny Llama with a chat template, under a minute (CI):
                                                         # its teacher and SFT student made first by `kd distill
                                                         # --no-teachers` on fpb_generate.py's quick recipe

The runs go to runs/trl-gkd-s0/ (kd's, replaced on every run) and runs/trl-gkd-s0-trl/ (TRL's);
writes benchmarks/results/trl_gkd-START.json (trl_gkd-quick.json with --quick) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL's trainers ping the Hub otherwise
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental: we know

import fpb_generate  # noqa: E402  (the recipe, its quick version, macro-F1)
from _common import RESULTS, finish, kd  # noqa: E402
from _common import write_recipe as write_recipe_file  # noqa: E402

from kdcli import recipe as recipe_mod  # noqa: E402
from kdcli.metrics import exact_match  # noqa: E402
from kdcli.runtime import describe  # noqa: E402


@contextmanager
def inside(work: Path):
    cwd = os.getcwd()
    os.chdir(work)
    try:
        yield
    finally:
        os.chdir(cwd)


def write_recipe(work: Path, base: Path, seed: int, teacher: Path, start: Path | None) -> Path:
    """fpb-generate's recipe (``base``) for this comparison: the fine-tuned teacher as it is, the student
    from the folder ``start`` (None: cut from the teacher as the recipe says), pure on-policy reverse KL."""
    raw = recipe_mod.load_raw(base, [f"seed={seed}"])
    raw["data"]["path"] = str((ROOT / raw["data"]["path"]).resolve())
    raw["teachers"]["smollm2"] = {"ref": str(teacher), "head": "causal"}
    if start is not None:
        raw["student"] = {"ref": str(start), "head": "causal"}
    raw["name"] = f"trl-gkd-s{seed}"
    raw["loss"].update(alpha=0.0, kd_level="on_policy", divergence="reverse_kl", temperature=1.0,
                       on_policy_fraction=1.0, sampling_temperature=1.0)
    batch = raw["train"]["batch_size"]
    # A log line at every step (its `elapsed` times the step); no checkpoint until the end (TRL saves none).
    raw["train"].update(log_every=batch, checkpoint_every=10**9)
    return write_recipe_file(raw, work / "runs" / f"{raw['name']}.toml")


def prepared(work: Path, recipe_path: Path):
    """The recipe, its last stage and that stage's rows as kd trains on them (chat turns included)."""
    from kdcli.data.stage import stage_data
    from kdcli.rundir import RunDir

    recipe = recipe_mod.load(recipe_path)
    stage = recipe.resolved_stages()[-1]
    with inside(work):
        run = RunDir.for_recipe(recipe)
        data = stage_data(recipe, run, stage, replace=False)
    return recipe, stage, data


def save_initial_student(work: Path, recipe, out: Path) -> None:
    """The student kd starts from (``roles.initial_student``: the recipe's ``ref`` loaded, or the teacher's
    blocks cut out), saved for TRL."""
    from kdcli.roles import initial_student
    from kdcli.rundir import RunDir

    with inside(work):
        student = initial_student(recipe, RunDir.for_recipe(recipe), 0, previous=None)
    student.save(out)


def kd_order(n_rows: int, seed: int, steps: int, batch: int) -> list[int]:
    """The rows of kd's steps 0..steps-1, in order (``train.step_examples``)."""
    from kdcli.train import step_examples

    per_epoch = n_rows // batch
    return [i for step in range(steps) for i in step_examples(n_rows, seed, step, per_epoch, batch)]


def kd_step_times(metrics: Path, job: str, per_step: int) -> tuple[list[float], list[float]]:
    """Per optimizer step: the wall time since the previous step ended, and the step's own time, from the
    job's metrics.jsonl records (logged every step: ``elapsed``, and ``samples_per_s`` over the steps' time)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = sorted((r for r in records if r.get("stage") == job and r.get("kind") == "train"), key=lambda r: r["step"])
    assert [r["step"] for r in train] == list(range(1, len(train) + 1)), "kd logged a line for every step"
    ends = [0.0] + [r["elapsed"] for r in train]
    busy = [0.0] + [r["step"] * per_step / r["samples_per_s"] for r in train]
    return ([b - a for a, b in zip(ends, ends[1:])], [b - a for a, b in zip(busy, busy[1:])])


def run_kd(work: Path, recipe_path: Path, per_step: int) -> dict:
    started = time.perf_counter()
    kd(work, "distill", str(recipe_path))
    wall = time.perf_counter() - started
    run = work / "runs" / recipe_path.stem
    per_step_wall, step_only = kd_step_times(run / "metrics.jsonl", "main", per_step)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("stage") == "main" and r.get("kind") == "train"]
    return {"wall": per_step_wall, "step_only": step_only, "command_seconds": wall, "losses": losses}


def run_trl(work: Path, recipe, stage, rows: list[dict], kd_tokens: list[dict], initial: Path, teacher: Path,
            out: Path, steps: int) -> dict:
    """TRL's GKDTrainer on the same rows in kd's order, from the same initial student, as matched above."""
    import torch
    import transformers
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    train, loss = stage.train, stage.loss
    batch = train.batch_size
    order = kd_order(len(rows), recipe.seed, steps, batch)
    dataset = Dataset.from_list([dict(trl_row(rows[i]), **kd_tokens[i]) for i in order])

    class StepClock(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.begin, self.starts, self.ends = 0.0, [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    started = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(initial)
    student = transformers.AutoModelForCausalLM.from_pretrained(initial, dtype=torch.float32)
    teacher_model = transformers.AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    args = GKDConfig(
        output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, learning_rate=train.lr, weight_decay=train.weight_decay,
        lr_scheduler_type=train.scheduler, warmup_steps=round(train.warmup_ratio * steps),  # kd's rounding
        max_grad_norm=train.max_grad_norm or 0.0, optim="adamw_torch_fused",
        lmbda=1.0, beta=1.0, temperature=loss.sampling_temperature, max_new_tokens=stage.data.answer_max_length,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
        seed=recipe.seed, data_seed=recipe.seed, train_sampling_strategy="sequential", dataloader_num_workers=0,
        save_strategy="no", eval_strategy="no", logging_steps=1, report_to=[], disable_tqdm=True,
    )
    clock = StepClock()
    trainer = GKDTrainer(model=student, teacher_model=teacher_model, args=args, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[clock])
    checked = time.perf_counter()
    check_same_batches(trainer, rows, recipe, stage, initial, steps)
    started += time.perf_counter() - checked  # the check is this benchmark's, not TRL's
    # With a model whose forward takes **kwargs, the Trainer counts the batch's gold answer tokens and
    # GKD divides the sampled tokens' summed divergence by that count (kd: by the sampled tokens).
    normalised_by = "gold answer tokens" if trainer.model_accepts_loss_kwargs else "sampled tokens"
    trainer.train()
    trainer.model.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")
    shutil.copy(initial / "kd.json", out / "student" / "kd.json")
    command_seconds = time.perf_counter() - started
    ends = [clock.begin, *clock.ends]
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=2) + "\n")
    return {"wall": [b - a for a, b in zip(ends, ends[1:])],
            "step_only": [e - s for s, e in zip(clock.starts, clock.ends)],
            "command_seconds": command_seconds, "losses": [h["loss"] for h in history if "loss" in h],
            "loss_normalised_by": normalised_by}


def trl_row(row: dict) -> dict:
    """A kd row as TRL's ChatML collator reads it: the conversation with the gold answer as the last turn."""
    return {"messages": [*row["messages"], {"role": "assistant", "content": row["answers"][0]}]}


def kd_token_rows(initial: Path, rows: list[dict], stage) -> list[dict]:
    """Each row as kd's student reads it (prompt and answer token ids), with the prompt/answer boundary
    as TRL's collator takes it pre-tokenised (``completion_mask``)."""
    from kdcli.models import load_task_model
    from kdcli.recipe import ModelSpec
    from kdcli.tasks import task_kind

    model = load_task_model(ModelSpec(ref=str(initial), head="causal"), "generate", 0)
    out = []
    for row in rows:
        batch = task_kind("generate").encode(model, [row], stage.data.max_length, stage.data.template,
                                             stage.data.answer_max_length)
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                    "completion_mask": [int(label != -100) for label in labels]})
    return out


def collator_prompt_mismatches(initial: Path, rows: list[dict], kd_tokens: list[dict]) -> list[str]:
    """The ids of rows whose prompt TRL's ChatML collator, left to tokenize and split the conversation
    itself, finds other than kd's (the prompt up to and with the assistant header); none with a tokenizer
    whose tokenizer.json cuts nothing."""
    import transformers
    from trl.experimental.utils import DataCollatorForChatML

    tokenizer = transformers.AutoTokenizer.from_pretrained(initial)
    collate = DataCollatorForChatML(tokenizer=tokenizer, max_length=1024)
    wrong = []
    for row, mine in zip(rows, kd_tokens):
        batch = collate([trl_row(row)])
        theirs = [t for t, m in zip(batch["prompts"][0].tolist(), batch["prompt_attention_mask"][0].tolist()) if m]
        if theirs != mine["input_ids"][: mine["completion_mask"].index(1)]:
            wrong.append(row["id"])
    return wrong


def check_same_batches(trainer, rows: list[dict], recipe, stage, initial: Path, steps: int) -> None:
    """Step by step, TRL's data loader gives the student the rows of kd's step, as the very prompt token
    ids kd's ``encode_prompts`` gives it."""
    import torch

    from kdcli.models import load_task_model
    from kdcli.recipe import ModelSpec
    from kdcli.train import step_examples

    model = load_task_model(ModelSpec(ref=str(initial), head="causal"), recipe.task, 0)
    batch = stage.train.batch_size
    rng = torch.get_rng_state()  # a data loader's iterator draws a seed: leave TRL's random stream as it was
    for step, loaded in zip(range(steps), trainer.get_train_dataloader()):
        examples = [rows[i] for i in step_examples(len(rows), recipe.seed, step, len(rows) // batch, batch)]
        mine = model.encode_prompts(examples, stage.data.max_length, stage.data.template)

        def unpadded(ids, mask) -> list[list[int]]:
            return [[t for t, m in zip(row, keep) if m] for row, keep in zip(ids.tolist(), mask.tolist())]

        if unpadded(loaded["prompts"], loaded["prompt_attention_mask"]) != unpadded(mine["input_ids"],
                                                                                  mine["attention_mask"]):
            sys.exit(f"step {step}: TRL's batch is not kd's (other rows, or other prompt tokens)")
    torch.set_rng_state(rng)


def evaluate(work: Path, recipe_path: Path, model: str, test: dict[str, dict]) -> dict:
    """`kd eval` of a role or model folder on the test split; its exact match, macro-F1, agreement, answers."""
    from kdcli.rundir import role_filename

    kd(work, "eval", str(recipe_path), "--model", model)
    result = json.loads((work / "runs" / recipe_path.stem / "eval" / f"{role_filename(model)}.json").read_text())
    answers = {p["id"]: p["prediction"] for p in result["predictions"]}
    right = {i: exact_match(answer, test[i]["answers"]) == 1.0 for i, answer in answers.items()}
    assert math.isclose(sum(right.values()) / len(right), result["metrics"]["exact_match"], abs_tol=1e-9)
    return {
        "accuracy": result["metrics"]["exact_match"],
        "macro_f1": fpb_generate.macro_f1(list(answers.values()), [test[i]["answers"][0] for i in answers]),
        "agreement_with_teacher": result["agreement"].get("smollm2"),
        "n": result["n"],
        "right": right,
    }


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar test: how likely b:c discordant pairs or a more lopsided split are, if both
    students were equally good."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def median_after_first(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", type=Path, default=None,
                        help="the fine-tuned teacher (default: runs/fpb-generate-sSEED/teachers/smollm2)")
    parser.add_argument("--start", choices=("sft", "cut"), default="sft",
                        help="the student both sides start from: fpb_generate.py's SFT student "
                             "(runs/fpb-generate-sSEED/dataset), or the student cut from the teacher, untrained")
    parser.add_argument("--order", choices=("kd-first", "trl-first"), default="kd-first",
                        help="which trains first (both in this process)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    try:
        import trl
    except ImportError:
        sys.exit("trl is not installed: pip install -r benchmarks/requirements-trl.txt (it is not a kd dependency)")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp()) if args.quick else ROOT
    base = fpb_generate.RECIPE
    fpb_run = work / "runs" / f"fpb-generate-s{args.seed}"
    if args.quick:  # fpb_generate.py's tiny version makes the teacher and the SFT student, as the full one does
        base = fpb_generate.base_recipe(work, args.seed, quick=True)
        kd(work, "distill", str(base), "--no-teachers")
    teacher = (args.teacher or fpb_run / "teachers" / "smollm2").resolve()
    if not (teacher / "config.json").is_file():
        sys.exit(f"no fine-tuned teacher at {teacher}: run `python benchmarks/fpb_generate.py --seeds {args.seed}` "
                 "first (it fine-tunes it), or pass --teacher DIR")
    sft = (fpb_run / "dataset").resolve() if args.start == "sft" else None
    if sft is not None and not (sft / "config.json").is_file():
        sys.exit(f"no SFT student at {sft}: run `python benchmarks/fpb_generate.py --seeds {args.seed}` first "
                 "(it trains it on the labels alone, the `dataset` role), or pass --start cut")
    name = f"trl-gkd-s{args.seed}"
    for old in (work / "runs" / name, work / "runs" / f"{name}-trl"):  # this benchmark's own runs: start afresh
        shutil.rmtree(old, ignore_errors=True)
    recipe_path = write_recipe(work, base, args.seed, teacher, sft)
    kd(work, "prepare", str(recipe_path))
    recipe, stage, data = prepared(work, recipe_path)
    rows, batch = data.rows["train"], stage.train.batch_size
    steps = stage.train.max_steps or max(1, math.ceil(stage.train.epochs * (len(rows) // batch)))
    same_split = same_rows_as(fpb_run / "data" / "main", data.rows)
    if same_split is False:  # their teacher and SFT student may have trained on this run's test rows
        sys.exit(f"the train and test rows of {fpb_run / 'data' / 'main'} are not this run's: fpb_generate.py made "
                 "its teacher and SFT student from another recipe; run it again for this seed (remove the seed from "
                 "benchmarks/results/fpb_generate.json first: a seed already there is not run again)")
    trl_dir = work / "runs" / f"{name}-trl"
    initial = trl_dir / "initial-student"
    save_initial_student(work, recipe, initial)
    cut = {split: sum(len(ids) > stage.data.max_length for ids in prompt_ids(initial, data.rows[split]))
           for split in ("train", "test")}

    kd_tokens = kd_token_rows(initial, rows, stage)
    # TRL is handed kd's token ids and prompt boundary, so both sides read the same tokens. Left to itself its
    # collator tokenizes with the backend of tokenizer.json, which in teachers saved by kd before this was fixed
    # carried the truncation of kd's last call (96 tokens, from the right): this counts the prompts it gets wrong.
    mismatched = collator_prompt_mismatches(initial, rows, kd_tokens)
    timings = {}
    for side in (("kd", "trl") if args.order == "kd-first" else ("trl", "kd")):
        if side == "kd":
            timings["kd"] = run_kd(work, recipe_path, batch)
        else:
            timings["trl"] = run_trl(work, recipe, stage, rows, kd_tokens, initial, teacher, trl_dir, steps)
    for side, timing in timings.items():
        assert len(timing["wall"]) == steps, (side, len(timing["wall"]), steps)

    test = {row["id"]: row for row in data.rows["test"]}
    scores = {"start": evaluate(work, recipe_path, str(initial.relative_to(work)), test),
              "kd": evaluate(work, recipe_path, "student", test),
              "trl": evaluate(work, recipe_path, str((trl_dir / "student").relative_to(work)), test)}
    scores["start"].pop("right")
    kd_right, trl_right = scores["kd"].pop("right"), scores["trl"].pop("right")
    kd_only = sum(kd_right[i] and not trl_right[i] for i in kd_right)
    trl_only = sum(trl_right[i] and not kd_right[i] for i in kd_right)

    median = {side: median_after_first(t["wall"]) for side, t in timings.items()}
    step_only = {side: median_after_first(t["step_only"]) for side, t in timings.items()}
    n = scores["kd"]["n"]
    p = (scores["kd"]["accuracy"] + scores["trl"]["accuracy"]) / 2
    summary = {
        "benchmark": "trl_gkd", "quick": args.quick, "seed": args.seed, "trl": trl.__version__,
        "teacher": str(teacher) if not args.quick else "tiny llama (tests/kit.py), fine-tuned",
        "start": args.start, "start_model": str(sft) if sft else "cut from the teacher, untrained",
        "student_layers": recipe_mod.load_raw(base)["student"]["layers"], "train_rows": len(rows), "steps": steps,
        "batch_size": batch, "order": args.order,
        "matched": {
            "lr": stage.train.lr, "weight_decay": stage.train.weight_decay, "scheduler": stage.train.scheduler,
            "warmup_steps": round(stage.train.warmup_ratio * steps), "max_grad_norm": stage.train.max_grad_norm,
            "divergence": "reverse KL (kd divergence=reverse_kl; TRL beta=1)", "kd_alpha": 0.0,
            "on_policy": "every step (kd on_policy_fraction=1; TRL lmbda=1)",
            "sampling_temperature": stage.loss.sampling_temperature, "loss_temperature": stage.loss.temperature,
            "max_new_tokens": stage.data.answer_max_length, "max_length": stage.data.max_length,
            "precision": "fp32", "gradient_checkpointing": False,
        },
        "prompts_longer_than_max_length": cut,
        "trl_collator_prompt_mismatches": {"rows": len(mismatched), "of": len(rows), "ids": mismatched[:10]},
        "same_rows_as_fpb_generate": same_split,
        "trl_loss_normalised_by": timings["trl"]["loss_normalised_by"],
        "seconds_per_step": {side: round(v, 4) for side, v in median.items()},
        "step_only_seconds_per_step": {side: round(v, 4) for side, v in step_only.items()},
        "loop_seconds": {side: round(sum(t["wall"]), 2) for side, t in timings.items()},
        "command_seconds": {side: round(t["command_seconds"], 2) for side, t in timings.items()},
        "all_seconds_per_step": {side: [round(v, 4) for v in t["wall"]] for side, t in timings.items()},
        "kd_speedup": round(median["trl"] / median["kd"], 3),
        "kd_speedup_step_only": round(step_only["trl"] / step_only["kd"], 3),
        "final_loss": {side: round(statistics.mean(t["losses"][-10:]), 4) for side, t in timings.items()},
        "quality": scores,
        "accuracy_difference": round(scores["kd"]["accuracy"] - scores["trl"]["accuracy"], 4),
        "accuracy_standard_error": round(math.sqrt(p * (1 - p) / n), 4),
        "discordant": {"kd_right_trl_wrong": kd_only, "trl_right_kd_wrong": trl_only},
        "mcnemar_p": round(mcnemar_p(kd_only, trl_only), 4),
        "env": describe(),
    }
    print(f"\n{'':28}{'start':>10}{'kd':>10}{'TRL GKD':>10}   (start: {args.start})")
    print(f"{'s/step (median, wall)':38}{median['kd']:>10.3f}{median['trl']:>10.3f}   "
          f"kd {summary['kd_speedup']:.2f}x")
    print(f"{'s/step (step only)':38}{step_only['kd']:>10.3f}{step_only['trl']:>10.3f}   "
          f"kd {summary['kd_speedup_step_only']:.2f}x")
    print(f"{'training loop, s':38}{summary['loop_seconds']['kd']:>10.1f}{summary['loop_seconds']['trl']:>10.1f}")
    for key in ("accuracy", "macro_f1", "agreement_with_teacher"):
        print(f"{key:28}" + "".join(f"{scores[side][key]:>10.3f}" for side in ("start", "kd", "trl")))
    print(f"test sentences: {n}; only kd right: {kd_only}, only TRL right: {trl_only} "
          f"(McNemar p = {summary['mcnemar_p']:.3f})")
    finish(summary, args.out or (None if args.quick else RESULTS / f"trl_gkd-{args.start}.json"))
    if args.quick:
        shutil.rmtree(work, ignore_errors=True)


def same_rows_as(other: Path, rows: dict[str, list[dict]]) -> bool | None:
    """Whether another run's prepared data (fpb_generate.py's, whose teacher teaches here and whose SFT student
    starts here) has the same rows in its train and test splits; None when it is not there."""
    if not (other / "dataset_dict.json").is_file():
        return None
    import datasets

    theirs = datasets.load_from_disk(str(other))
    return all(theirs[split]["id"] == [row["id"] for row in rows[split]] for split in ("train", "test"))


def prompt_ids(model_dir: Path, rows: list[dict]) -> list[list[int]]:
    """Each row's prompt in the model's chat format, as token ids, uncut."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True) for row in rows]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


if __name__ == "__main__":
    main()
