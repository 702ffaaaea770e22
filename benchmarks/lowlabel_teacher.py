"""Which fine-tuning makes the best teacher from 150 labels? The teacher of recipes/local/fpb-lowlabel.toml
(MiniLM, a new 3-class head) fine-tuned with each setting of a small grid, scored on the validation split
(issue 16: a transfer set passes on what the teacher knows, and the first table's teacher knew less than
its student).

For each setting and seed: `kd cache-teachers` fine-tunes the teacher on the seed's 150 labelled train
sentences (the recipe without its transfer set, which fine-tuning does not read) and `kd eval --split
validation` scores it. The setting with the best mean validation macro-F1 (the recipe's `train.metric`)
over the seeds is printed; the test split is never scored here. Scores of seeds not run this time are
kept from the results file, so seeds can be added one run at a time.

    python benchmarks/lowlabel_teacher.py             # 4 settings x 3 seeds, about 30 minutes alone on 2 CPU cores
    python benchmarks/lowlabel_teacher.py --seeds 1 2 # add seeds 1 and 2 to those already in the results file
    python benchmarks/lowlabel_teacher.py --quick     # a tiny BERT on made-up sentences (CI)

Writes benchmarks/results/lowlabel_teacher[-quick].json and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's kdcli (not the installed one), the tiny-model kit

from _common import finish, kd, result_path, write_recipe  # noqa: E402
from fpb_lowlabel import base_recipe  # noqa: E402

from kdcli import recipe as recipe_mod  # noqa: E402
from kdcli.runtime import describe  # noqa: E402

GRID = [{"epochs": epochs, "lr": lr} for epochs in (8, 20) for lr in (1e-4, 3e-4)]


def teacher_recipe(work: Path, seed: int, setting: dict, quick: bool) -> Path:
    raw = recipe_mod.load_raw(base_recipe(work, seed, "low", quick))
    raw["name"] = f"lowlabel-teacher-e{setting['epochs']}-lr{setting['lr']:g}-s{seed}"
    raw["data"].pop("transfer")
    raw["teachers"]["minilm"]["finetune"].update(setting)
    return write_recipe(raw, work / "runs" / f"{raw['name']}.toml")


def earlier_scores(out: Path) -> dict[tuple, dict]:
    """Per setting (epochs, lr), the per-seed scores already in ``out`` (none if it does not exist)."""
    if not out.exists():
        return {}
    return {(r["epochs"], r["lr"]): r["per_seed"] for r in json.loads(out.read_text())["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    grid, seeds = ([{"epochs": 2, "lr": lr} for lr in (1e-4, 3e-4)], [0]) if args.quick else (GRID, args.seeds)
    out = args.out or result_path("lowlabel_teacher", args.quick)
    earlier = earlier_scores(out)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for setting in grid:
            scores = dict(earlier.get((setting["epochs"], setting["lr"]), {}))
            for seed in seeds:
                recipe = teacher_recipe(work, seed, setting, args.quick)
                kd(work, "cache-teachers", str(recipe))
                kd(work, "eval", str(recipe), "--model", "teacher:minilm", "--split", "validation")
                metrics = json.loads((work / "runs" / recipe.stem / "eval" / "teacher-minilm.json").read_text())
                scores[str(seed)] = {"accuracy": metrics["metrics"]["accuracy"], "macro_f1": metrics["metrics"]["f1"]}
            scores = dict(sorted(scores.items(), key=lambda kv: int(kv[0])))
            results.append({**setting, "per_seed": scores,
                            **{f"{m}_mean": statistics.mean(s[m] for s in scores.values())
                               for m in ("accuracy", "macro_f1")}})
    best = max(results, key=lambda r: r["macro_f1_mean"])
    seeds = sorted({int(seed) for r in results for seed in r["per_seed"]})
    print(f"\n{'epochs':>6} {'lr':>7} {'val accuracy':>13} {'val macro-F1':>13}   (mean over seeds {seeds})")
    for r in results:
        print(f"{r['epochs']:>6} {r['lr']:>7g} {r['accuracy_mean']:>13.4f} {r['macro_f1_mean']:>13.4f}"
              + ("   <- best" if r is best else ""))
    finish({"benchmark": "lowlabel_teacher", "quick": args.quick, "seeds": seeds, "split": "validation",
            "results": results, "best": {"epochs": best["epochs"], "lr": best["lr"]},
            "seconds": round(time.perf_counter() - started), "env": describe()}, out)


if __name__ == "__main__":
    main()
