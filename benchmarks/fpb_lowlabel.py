"""Few labels, many unlabelled sentences: does a teacher that answers in-domain text beat the labels
alone? (issue 16)

With `recipes/local/fpb-lowlabel.toml`: Financial PhraseBank AllAgree split 80/10/10 as in
recipes/local/fpb.toml, of whose ~1,506 train sentences only 150 keep their label (stratified and
seeded), and as transfer data the other agreement files' sentences that are not in AllAgree, labels
dropped. A MiniLM teacher is fine-tuned on the 150 and teaches a 3-layer student cut from it.

For each seed:

  teacher      the fine-tuned MiniLM (`kd distill`, which fine-tunes it and caches it on train,
               validation and the transfer rows)
  dataset      the student trained on the 150 labels alone (`kd distill --no-teachers`)
  no_transfer  the student distilled on the 150 labelled sentences alone (the recipe without
               [data.transfer], from the same fine-tuned teacher)
  transfer     the student distilled on the 150 labelled sentences and the transfer rows

each scored by `kd eval` on the test split (accuracy and macro-F1). With ``--full`` the same four
rows again with every AllAgree train sentence labelled (the recipe without its limit): does transfer
data still help when labels are plenty? Nothing here looks at the test split to choose anything:
the recipe's settings were fixed before any run, and each student is the best of its validations.

Targets (issue 16): the transfer student beats the dataset student by at least 5 points of accuracy
and keeps at least 97% of the teacher's accuracy (means over the seeds).

    python benchmarks/fpb_lowlabel.py --seeds 0 1 2          # the 150-label table in docs/benchmarks.md
    python benchmarks/fpb_lowlabel.py --seeds 0 1 2 --full   # and the full-label one
    python benchmarks/fpb_lowlabel.py --quick                # a tiny BERT on made-up sentences (CI)

Results accumulate in benchmarks/results/fpb_lowlabel.json: a seed and setting already there is not
run again unless the recipe's teacher fine-tuning changed since (each run records it). The table of
means ± std is printed and the last line is one JSON object.
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

from _common import RESULTS, finish, kd, mean_std, write_recipe  # noqa: E402

from kdcli import recipe as recipe_mod  # noqa: E402
from kdcli.runtime import describe  # noqa: E402

RECIPE = ROOT / "recipes" / "local" / "fpb-lowlabel.toml"
OUT = RESULTS / "fpb_lowlabel.json"
ROWS = ["teacher", "dataset", "no_transfer", "transfer"]
QUICK_FINETUNE = {"epochs": 2}
TARGET_POINTS, TARGET_KEPT = 5.0, 97.0


def base_recipe(work: Path, seed: int, setting: str, quick: bool) -> Path:
    """The recipe of a seed, ``setting`` "low" (150 labels) or "full" (every train sentence labelled)."""
    raw = recipe_mod.load_raw(RECIPE, [f"seed={seed}"])
    raw["name"] = f"fpb-lowlabel-{setting}-s{seed}"
    data = raw["data"]
    data["path"] = str((ROOT / data["path"]).resolve())
    data["transfer"]["files"] = [str((ROOT / f).resolve()) for f in data["transfer"]["files"]]
    if quick:
        import kit

        names = ["negative", "neutral", "positive"]
        cue = ["fell", "was unchanged", "rose"]
        sentences = [f"{kit.CORPUS[i % 20]} and profit {cue[i % 3]} ({i})" for i in range(400)]
        (work / "labelled.txt").write_bytes("".join(f"{s}@{names[i % 3]}\r\n" for i, s in
                                                    enumerate(sentences[:160])).encode("latin-1"))
        (work / "more.txt").write_bytes("".join(f"{s}@neutral\r\n" for s in sentences).encode("latin-1"))
        data.update(path=str(work / "labelled.txt"), limit={"train": 30})
        data["transfer"]["files"] = [str(work / "more.txt")]
        teacher = kit.make_model_dir(work / "models", "bert", "sequence-classification", num_labels=3)
        raw["teachers"]["minilm"].update(ref=str(teacher))
        raw["teachers"]["minilm"]["finetune"].update(QUICK_FINETUNE)
        raw["student"]["layers"] = [0, 2]
        raw["train"].update(max_steps=6, eval_every=48)
    if setting == "full":
        data.pop("limit", None)
    return write_recipe(raw, work / "runs" / f"{raw['name']}.toml")


def without_transfer(recipe: Path, teacher: Path) -> Path:
    """The same recipe without [data.transfer], taught by the teacher its run fine-tuned."""
    raw = recipe_mod.load_raw(recipe)
    raw["name"] = f"{raw['name']}-no-transfer"
    raw["data"].pop("transfer")
    raw["teachers"]["minilm"] = {"ref": str(teacher), "hidden": raw["teachers"]["minilm"].get("hidden")}
    return write_recipe(raw, recipe.with_name(f"{raw['name']}.toml"))


def scores(run: Path, role: str) -> dict:
    evaluated = json.loads((run / "eval" / f"{role.replace(':', '-')}.json").read_text())
    return {"accuracy": evaluated["metrics"]["accuracy"], "macro_f1": evaluated["metrics"]["f1"],
            "n": evaluated["n"], "data_fingerprint": evaluated["data_fingerprint"]}


def teacher_finetune(quick: bool) -> dict:
    """How the recipe fine-tunes its teacher (the same with few labels or all of them)."""
    finetune = recipe_mod.load_raw(RECIPE)["teachers"]["minilm"]["finetune"]
    return {**finetune, **QUICK_FINETUNE} if quick else finetune


def run_setting(work: Path, seed: int, setting: str, quick: bool) -> dict:
    started = time.perf_counter()
    recipe = base_recipe(work, seed, setting, quick)
    kd(work, "distill", str(recipe))
    kd(work, "distill", str(recipe), "--no-teachers")
    for role in ("teacher:minilm", "dataset", "student"):
        kd(work, "eval", str(recipe), "--model", role)
    base = work / "runs" / recipe.stem
    other = without_transfer(recipe, base / "teachers" / "minilm")
    kd(work, "distill", str(other))
    kd(work, "eval", str(other), "--model", "student")
    manifest = json.loads((base / "data" / "main" / "manifest.json").read_text())
    rows = {"teacher": scores(base, "teacher:minilm"), "dataset": scores(base, "dataset"),
            "no_transfer": scores(work / "runs" / other.stem, "student"), "transfer": scores(base, "student")}
    return {"rows": rows, "teacher_finetune": teacher_finetune(quick), "counts": manifest["counts"],
            "transfer": manifest.get("transfer"), "seconds": round(time.perf_counter() - started), "env": describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--full", action="store_true", help="also every train sentence labelled")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    # The runs live in runs/ of the checkout (quick: a temporary folder).
    work = Path(tempfile.mkdtemp()) if args.quick else ROOT
    runs_file = work / "fpb_lowlabel-runs.json" if args.quick else OUT
    document = json.loads(runs_file.read_text()) if runs_file.is_file() else {"low": {}, "full": {}}
    settings = ["low", "full"] if args.full or args.quick else ["low"]
    current = teacher_finetune(args.quick)
    for setting in settings:
        for seed in [0] if args.quick else args.seeds:
            earlier = document[setting].get(str(seed))
            if earlier is None or earlier.get("teacher_finetune") != current:
                if earlier:
                    print(f"{setting} labels, seed {seed}: the recipe's teacher fine-tuning changed since it ran; "
                          "running it again", flush=True)
                document[setting][str(seed)] = run_setting(work, seed, setting, args.quick)
                runs_file.write_text(json.dumps(document, indent=2) + "\n")  # a run at a time: kept if interrupted
    summary: dict = {"benchmark": "fpb_lowlabel", "quick": args.quick, "settings": {}}
    for setting in settings:
        runs = {seed: run for seed, run in document[setting].items()  # the runs of the recipe as it is now
                if run.get("teacher_finetune") == current}
        means = mean_std(runs, ROWS, ("accuracy", "macro_f1"))
        teacher, dataset, transfer = (means[r]["accuracy"][0] for r in ("teacher", "dataset", "transfer"))
        summary["settings"][setting] = {
            "seeds": sorted(runs, key=int), "teacher_finetune": current,
            "table": means,
            "transfer_minus_dataset_points": round(100 * (transfer - dataset), 2),
            "transfer_minus_no_transfer_points": round(100 * (transfer - means["no_transfer"]["accuracy"][0]), 2),
            "kept_pct": round(100 * transfer / teacher, 1) if teacher else None,
            "per_seed": runs,
        }
        print(f"\n{setting} labels ({len(runs)} seeds)\n{'row':14}{'accuracy':>18}{'macro-F1':>18}")
        for role, columns in means.items():
            print(f"{role:14}" + "".join(f"{columns[c][0]:>11.3f} ± {columns[c][1]:.3f}"
                                         for c in ("accuracy", "macro_f1")))
    low = summary["settings"]["low"]
    summary["targets"] = {"beats_dataset_by_points": TARGET_POINTS, "kept_pct": TARGET_KEPT,
                          "met": low["transfer_minus_dataset_points"] >= TARGET_POINTS
                          and (low["kept_pct"] or 0) >= TARGET_KEPT}
    summary["env"] = describe()
    finish(summary, args.out or (None if args.quick else RESULTS / "fpb_lowlabel-summary.json"))


if __name__ == "__main__":
    main()
