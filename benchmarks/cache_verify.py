"""What checking a teacher cache's checksums costs, next to what reading the cache costs anyway.

Every time a cache is used (`kd distill`) or found up to date (`kd cache-teachers`), `check_cache`
re-hashes each shard (sha256) and compares it with the hash its manifest recorded when the shard was
written, so a flipped byte is never trained on. This script writes a classify cache with kd's own
`build_cache` (the logits and two pooled hidden layers of width 384 per row, as MiniLM's cache with
a hidden-state map holds) from a stand-in teacher that answers with random numbers (the cost depends
on the bytes alone), then times, median of ``--repeats``:

  check_seconds    check_cache: the manifest, each shard's header and its sha256
  load_seconds     CachedTeacher: opening the cache, what training does next (the shards' headers
                   and row index; before issue 15, reading every shard into memory)

    python benchmarks/cache_verify.py            # 200,000 rows (about 620 MB)
    python benchmarks/cache_verify.py --quick    # 2,000 rows (CI)

Writes benchmarks/results/cache_verify[-quick].json and prints it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # this checkout's kdcli, not the installed one

from _common import finish  # noqa: E402

from kdcli.cache import CachedTeacher, build_cache, check_cache  # noqa: E402
from kdcli.rundir import read_json  # noqa: E402
from kdcli.runtime import describe  # noqa: E402
from kdcli.tasks import TeacherBatch  # noqa: E402

WIDTH, LAYERS, CLASSES = 384, (2, 4), 3


class RandomTeacher:
    """Answers like a LiveTeacher of a MiniLM-sized classifier with a hidden map, with random numbers."""

    layers = list(LAYERS)

    class model:  # noqa: N801 - the attribute build_cache reads
        task = "classify"

    def lengths(self, examples: list[dict]) -> list[int]:
        return [len(ex["text"]) for ex in examples]

    def __call__(self, examples: list[dict], split: str) -> TeacherBatch:
        n = len(examples)
        return TeacherBatch(torch.randn(n, CLASSES), {layer: torch.randn(n, WIDTH) for layer in LAYERS})


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: the page cache holds the shards, as it does right after they were written
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = 2_000 if args.quick else 200_000
    torch.manual_seed(0)
    splits = {"train": [{"text": "x" * (i % 50), "label": i % CLASSES} for i in range(rows)],
              "validation": [{"text": "y", "label": 0}]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        build_cache(path, RandomTeacher(), splits, {"task": "classify"}, batch_size=4096)
        manifest = read_json(path / "manifest.json")
        expected = {key: manifest.get(key) for key in manifest}
        counts = {split: len(r) for split, r in splits.items()}
        check = timed(lambda: check_cache(path, expected, "t", counts), args.repeats)
        load = timed(lambda: CachedTeacher(path), args.repeats)
    megabytes = manifest["bytes"] / 1e6
    summary = {
        "benchmark": "cache_verify",
        "quick": args.quick,
        "rows": rows,
        "shards": sum(len(s["shards"]) for s in manifest["splits"].values()),
        "megabytes": round(megabytes, 1),
        "repeats": args.repeats,
        "check_seconds": round(statistics.median(check), 6),
        "load_seconds": round(statistics.median(load), 6),
        "all_check_seconds": [round(s, 6) for s in check],
        "all_load_seconds": [round(s, 6) for s in load],
        "check_megabytes_per_second": round(megabytes / statistics.median(check), 1),
        "check_vs_load": round(statistics.median(check) / statistics.median(load), 3),
        "env": describe(),
    }
    print(f"{'':24}{'seconds':>10}")
    print(f"{'check_cache (sha256)':24}{summary['check_seconds']:>10.3f}")
    print(f"{'CachedTeacher (load)':24}{summary['load_seconds']:>10.3f}")
    print(f"{megabytes:,.0f} MB checked at {summary['check_megabytes_per_second']:,.0f} MB/s; "
          f"the check costs {summary['check_vs_load']:.2f}x the load")
    finish(summary)


if __name__ == "__main__":
    main()
