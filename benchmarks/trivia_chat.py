"""TriviaQA in chat format on real weights: what distillation moves in a student too small to know
the answers (issue 14's table b).

With `recipes/local/trivia.toml` (SmolLM2-135M-Instruct asked in its own chat format, fine-tuned
on the train questions' answers, teaching a student cut from 10 of its 30 layers):

  1. `kd run`: the fine-tuned teacher, the student before training (baseline), the student trained
     on the gold answers alone (dataset, SFT) and the student distilled token by token from the
     teacher's top-k cache (student), each evaluated on the test questions.
  2. The same student distilled sequence-level (the teacher's greedy answers as targets) and
     on-policy (its own samples scored by the live teacher, reverse KL), each a run of its own
     whose teacher is the one fine-tuned in 1.

Columns, from `kd eval` on the test split: token F1 and exact match against every alias (SQuAD
normalised), agreement with the teacher (the normalised answers are equal), token F1 against the
teacher's answer, and the loss on the gold answers (cross-entropy per answer token, teacher-
forced). A 135M model knows little trivia, so quality has no target; what KD can move is the
student's closeness to its teacher and its loss on the gold answers, against the SFT student.

    python benchmarks/trivia_chat.py            # one seed (the recipe's), about an hour on 2 CPU cores
    python benchmarks/trivia_chat.py --variants sequence   # skip the slowest row, on-policy
    python benchmarks/trivia_chat.py --quick    # a tiny Llama with a chat template (CI)

The result goes to benchmarks/results/trivia_chat.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's kdcli (not the installed one), the tiny-model kit

from _common import finish, kd, tiny_chat_llama, write_recipe, write_variant  # noqa: E402

from kdcli import recipe as recipe_mod  # noqa: E402
from kdcli.metrics import token_f1  # noqa: E402
from kdcli.runtime import describe  # noqa: E402

RECIPE = ROOT / "recipes" / "local" / "trivia.toml"
TEACHER = "teacher:smollm2"
BASE_ROWS = [TEACHER, "baseline", "dataset", "student"]
VARIANTS = {"sequence": {"kd_level": "sequence"}, "on_policy": {"kd_level": "on_policy", "divergence": "reverse_kl"}}


def base_recipe(work: Path, quick: bool) -> Path:
    raw = recipe_mod.load_raw(RECIPE)
    raw["data"]["path"] = str((ROOT / raw["data"]["path"]).resolve())
    if quick:
        import jobs

        model = tiny_chat_llama(work / "models")
        raw["data"].update(path=str(jobs.write_trivia(work / "trivia.jsonl", n=60)), limit=None)
        raw["teachers"]["smollm2"] = {"ref": str(model), "head": "causal", "finetune": {"epochs": 1, "batch_size": 8}}
        raw["student"]["layers"] = [0]
        raw["train"].update(epochs=1, eval_every=1000, checkpoint_every=1000)
        raw["bench"].update(iters=1, max_examples=8)
    return write_recipe(raw, work / "runs" / f"{raw['name']}.toml")


def evaluated(run: Path, role: str) -> dict:
    return json.loads((run / "eval" / f"{role.replace(':', '-')}.json").read_text())


def row(result: dict, teacher: dict) -> dict:
    theirs = {p["id"]: p["prediction"] for p in teacher["predictions"]}
    mine = result["predictions"]
    return {
        "f1": result["metrics"]["f1"],
        "exact_match": result["metrics"]["exact_match"],
        "gold_loss": result["metrics"]["loss"],
        "agreement": result["agreement"].get("smollm2", 1.0 if result is teacher else None),
        "f1_vs_teacher": sum(token_f1(p["prediction"], [theirs[p["id"]]])["f1"] for p in mine) / len(mine),
        "parameters": result["parameters"],
        "n": result["n"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp()) if args.quick else ROOT  # runs/ of the checkout, for kd compare
    variants = ["sequence"] if args.quick else args.variants
    started = time.perf_counter()
    recipe = base_recipe(work, args.quick)
    base = work / "runs" / recipe.stem
    kd(work, "run", str(recipe))
    results = {role: evaluated(base, role) for role in BASE_ROWS}
    seconds = {"run": round(time.perf_counter() - started)}
    for variant in variants:
        began = time.perf_counter()
        other = write_variant(recipe, variant, VARIANTS[variant], {"smollm2": base / "teachers" / "smollm2"})
        kd(work, "distill", str(other))
        kd(work, "eval", str(other))
        results[variant] = evaluated(work / "runs" / other.stem, "student")
        seconds[variant] = round(time.perf_counter() - began)
    table = {name: row(result, results[TEACHER]) for name, result in results.items()}

    print(f"{'row':12}{'F1':>7}{'EM':>7}{'agree':>7}{'F1 vs t':>9}{'gold loss':>11}{'params':>8}")
    for name, r in table.items():
        print(f"{name:12}{r['f1']:>7.3f}{r['exact_match']:>7.3f}{r['agreement']:>7.3f}{r['f1_vs_teacher']:>9.3f}"
              f"{r['gold_loss']:>11.3f}{r['parameters'] / 1e6:>7.0f}M")
    distilled = ["student", *variants]
    sft = table["dataset"]
    finish({
        "benchmark": "trivia_chat", "quick": args.quick, "seed": recipe_mod.load_raw(recipe)["seed"],
        "table": table,
        # issue 14's targets for table b: each distilled student against the SFT student
        "closer_to_teacher_than_sft": {d: table[d]["f1_vs_teacher"] > sft["f1_vs_teacher"] for d in distilled},
        "agrees_more_than_sft": {d: table[d]["agreement"] > sft["agreement"] for d in distilled},
        "lower_gold_loss_than_sft": {d: table[d]["gold_loss"] < sft["gold_loss"] for d in distilled},
        "examples": [{"question": q["input"], "gold": q["gold"], "teacher": q["teacher_answer"],
                      "student": q["model_answer"]} for q in results["student"]["disagreements"][:3]],
        "seconds": seconds,
        "env": describe(),
    }, args.out)


if __name__ == "__main__":
    main()
