"""Financial PhraseBank as generation on real weights: does a student cut from an instruct LLM keep
its teacher's answers, and which distillation does it best? (issue 14's table a)

For each seed, with `recipes/local/fpb-generate.toml` (SmolLM2-135M-Instruct in its chat format,
fine-tuned on the train split, teaching a student cut from 10 of its 30 layers):

  1. `kd run`: the fine-tuned teacher, the student before training (baseline), the student
     trained on the labels alone (dataset, SFT) and the student distilled token by token from the
     teacher's top-k cache (student); each evaluated on test and benchmarked.
  2. The same student distilled on-policy (`loss.kd_level = "on_policy"`, reverse KL, the student's
     own samples scored by the live teacher) and sequence-level (the teacher's greedy answers as
     targets), each a run of its own whose teacher is the teacher fine-tuned in 1 (not fine-tuned
     again), evaluated and benchmarked the same way.

Accuracy is the exact match of the answer with the label's name; macro-F1 is over the three
classes, an answer that names none of them counting as wrong for every class. Answers/s come from
`kd bench` (greedy generation of up to 4 tokens, batch 1 and 32). Nothing here looks at the test
split to choose anything: the recipe's settings were fixed before any run.

    python benchmarks/fpb_generate.py --seeds 0 1 2    # about 45 minutes a seed on 2 CPU cores
    python benchmarks/fpb_generate.py --quick          # a tiny Llama with a chat template, 40 sentences (CI)

Results accumulate in benchmarks/results/fpb_generate.json (a seed already there is not run again)
and the table of means ± std over the seeds in it is printed.
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

from _common import RESULTS, finish, kd, mean_std, tiny_chat_llama, write_recipe, write_variant  # noqa: E402

from kdcli import recipe as recipe_mod  # noqa: E402
from kdcli.metrics import squad_normalize  # noqa: E402
from kdcli.runtime import describe  # noqa: E402

RECIPE = ROOT / "recipes" / "local" / "fpb-generate.toml"
OUT = RESULTS / "fpb_generate.json"
CLASSES = ["negative", "neutral", "positive"]
COLUMNS = ("accuracy", "macro_f1", "answers_per_s_batch_1", "answers_per_s_batch_32", "parameters")
ROWS = ["teacher:smollm2", "baseline", "dataset", "student", "on_policy", "sequence"]
VARIANTS = {"on_policy": {"kd_level": "on_policy", "divergence": "reverse_kl"}, "sequence": {"kd_level": "sequence"}}


def base_recipe(work: Path, seed: int, quick: bool) -> Path:
    """The recipe of the seed (in quick mode: a tiny Llama with a chat template on 60 made-up sentences)."""
    raw = recipe_mod.load_raw(RECIPE, [f"seed={seed}"])
    raw["name"] = f"fpb-generate-s{seed}"
    raw["data"]["path"] = str((ROOT / raw["data"]["path"]).resolve())
    if quick:
        model = tiny_chat_llama(work / "models")
        (work / "fpb.txt").write_bytes("".join(f"Sales in unit {i} were {['down', 'flat', 'up'][i % 3]} .@"
                                               f"{CLASSES[i % 3]}\r\n" for i in range(60)).encode("latin-1"))
        raw["data"].update(path=str(work / "fpb.txt"), limit=40)
        raw["teachers"]["smollm2"] = {"ref": str(model), "head": "causal", "finetune": {"epochs": 1, "batch_size": 8}}
        raw["student"]["layers"] = [0]
        raw["bench"].update(iters=1, max_examples=8)
    return write_recipe(raw, work / "runs" / f"{raw['name']}.toml")


def macro_f1(predictions: list[str], gold: list[str]) -> float:
    said = [squad_normalize(p) for p in predictions]
    scores = []
    for name in CLASSES:
        tp = sum(p == name and g == name for p, g in zip(said, gold))
        fp = sum(p == name and g != name for p, g in zip(said, gold))
        fn = sum(p != name and g == name for p, g in zip(said, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def row(run: Path, role: str) -> dict:
    name = role.replace(":", "-")
    evaluated = json.loads((run / "eval" / f"{name}.json").read_text())
    benched = json.loads((run / "bench" / f"{name}.json").read_text())
    import datasets

    test = datasets.load_from_disk(str(run / "data" / "main"))["test"]
    gold = {r["id"]: r["answers"][0] for r in test}
    predictions = evaluated["predictions"]
    return {
        "accuracy": evaluated["metrics"]["exact_match"],
        "macro_f1": macro_f1([p["prediction"] for p in predictions], [gold[p["id"]] for p in predictions]),
        "answers_per_s_batch_1": benched["batches"]["1"]["throughput"],
        "answers_per_s_batch_32": benched["batches"]["32"]["throughput"],
        "parameters": evaluated["parameters"],
        "n": evaluated["n"],
    }


def run_seed(work: Path, seed: int, quick: bool) -> dict:
    started = time.perf_counter()
    recipe = base_recipe(work, seed, quick)
    kd(work, "run", str(recipe))
    base = work / "runs" / recipe.stem
    rows = {role: row(base, role) for role in ROWS[:4]}
    for variant in VARIANTS:
        other = write_variant(recipe, variant, VARIANTS[variant], {"smollm2": base / "teachers" / "smollm2"})
        kd(work, "distill", str(other))
        kd(work, "eval", str(other))
        kd(work, "bench", str(other))
        rows[variant] = row(work / "runs" / other.stem, "student")
    max_length = recipe_mod.load_raw(recipe)["data"]["max_length"]
    return {"rows": rows, "max_length": max_length, "seconds": round(time.perf_counter() - started), "env": describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    # The runs live in runs/ of the checkout (quick: a temporary folder), so that kd compare finds them.
    work = Path(tempfile.mkdtemp()) if args.quick else ROOT
    seeds_file = work / "fpb_generate-seeds.json" if args.quick else OUT
    document = json.loads(seeds_file.read_text()) if seeds_file.is_file() else {"seeds": {}}
    # A seed measured under another data.max_length (the first one, at 96, cut some prompts) is measured again.
    max_length = recipe_mod.load_raw(RECIPE)["data"]["max_length"]
    document["seeds"] = {k: v for k, v in document["seeds"].items() if v.get("max_length") == max_length}
    for seed in [0] if args.quick else args.seeds:
        if str(seed) not in document["seeds"]:
            document["seeds"][str(seed)] = run_seed(work, seed, args.quick)
            seeds_file.write_text(json.dumps(document, indent=2) + "\n")  # a seed at a time: kept if interrupted
    summary = mean_std(document["seeds"], ROWS, COLUMNS)
    teacher = summary["teacher:smollm2"]
    print(f"{'row':16}{'accuracy':>16}{'macro-F1':>16}{'ans/s b1':>10}{'ans/s b32':>11}{'params':>8}")
    for role, columns in summary.items():
        print(f"{role:16}" + "".join(f"{columns[c][0]:>9.3f} ± {columns[c][1]:.3f}" for c in ("accuracy", "macro_f1"))
              + f"{columns['answers_per_s_batch_1'][0]:>10.1f}{columns['answers_per_s_batch_32'][0]:>11.1f}"
              + f"{columns['parameters'][0] / 1e6:>7.0f}M")
    distilled = max(("student", "on_policy", "sequence"), key=lambda r: summary[r]["accuracy"][0])
    best = summary[distilled]
    finish({
        "benchmark": "fpb_generate", "quick": args.quick, "seeds": sorted(document["seeds"], key=int),
        "table": summary,
        "best_distilled": distilled,
        "kept_pct": round(100 * best["accuracy"][0] / teacher["accuracy"][0], 1) if teacher["accuracy"][0] else None,
        "beats_sft": best["accuracy"][0] > summary["dataset"]["accuracy"][0],
        "speedup_batch_1": round(best["answers_per_s_batch_1"][0] / teacher["answers_per_s_batch_1"][0], 2),
        "per_seed": document["seeds"],
        "env": describe(),
    }, args.out or (None if args.quick else RESULTS / "fpb_generate-summary.json"))


if __name__ == "__main__":
    main()
