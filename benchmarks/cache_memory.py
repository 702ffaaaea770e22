"""Peak memory of reading a teacher cache in training, small caches against large ones (issue 15).

Writes caches in kd's cache format directly, with random values (no teacher runs): classify, rows of
3 logits and two pooled layers of width 384 (MiniLM's cache with a hidden-state map, 3,084 bytes a
row), and generate at token level, answers of 40 to 60 tokens (50 on average) as packed top-32
log-probs and uint16 ids (124 bytes a token), in shards of kd's 65,536 rows. Then, for each cache, a
fresh process opens it as `kd distill` does (`check_cache`, sha256 included, then `CachedTeacher`),
reads ``--batches`` training batches of ``--batch-size`` rows drawn at random from the whole cache,
and reports its peak resident set (Linux's ``VmHWM``; ``getrusage``'s ``ru_maxrss`` where there is no
/proc: on Linux that one also counts the parent's memory at the fork). The growth of that peak
from the small cache to the large one is what reading the cache costs in memory; the target is under
100 MB from 10k to 1M classify rows and from 10k to 200k generate answers.

What is measured is the cache's read path (what training calls for each micro-batch), not a whole
`kd distill` run, which also holds the stage's prepared rows in memory (a Python dict a row: that
grows with the data, whatever the cache does). ``--old`` also measures the reader kd had before
(every shard loaded with ``load_file`` and concatenated), for comparison: it needs two to four
times the cache's size in memory (6 GB or more for the 1M-row cache).

    python benchmarks/cache_memory.py           # 10k and 1M classify rows (3.1 GB), 10k and 200k answers (1.2 GB)
    python benchmarks/cache_memory.py --quick   # 2k and 20k rows, 1k and 10k answers (CI)

The caches go under ``--workdir`` (default: the system's temporary folder), one at a time, each
deleted once measured; the free space is checked first. Writes benchmarks/results/cache_memory[-quick].json
and prints it.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]  # this checkout's kdcli, not the installed one

from _common import finish  # noqa: E402

WIDTH, LAYERS, CLASSES = 384, (2, 4), 3
TOP_K, VOCAB, ANSWER_TOKENS = 32, 49_152, (40, 60)  # SmolLM2's vocabulary: uint16 ids
TARGET_MB = 100
SIZES = {False: {"classify": (10_000, 1_000_000), "generate": (10_000, 200_000)},
         True: {"classify": (2_000, 20_000), "generate": (1_000, 10_000)}}


def bytes_per_row(kind: str) -> float:
    """What a row takes on disk, for the free-space check."""
    if kind == "classify":
        return 4 * (CLASSES + WIDTH * len(LAYERS))
    return 2 + (2 * TOP_K + 2 * (TOP_K - TOP_K // 16)) * ANSWER_TOKENS[1]


def write_cache(path: Path, kind: str, rows: int, shard_rows: int, seed: int) -> dict:
    """A cache of ``rows`` train rows in kd's format (format 3, with sha256s), of random values."""
    import torch
    from safetensors.torch import save_file

    from kdcli.cache import CACHE_FORMAT, pack_topk
    from kdcli.rundir import sha256_file, write_json

    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    shards, tokens = [], 0
    for no, first in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - first)
        if kind == "classify":
            tensors = {"logits": torch.randn(n, CLASSES, generator=generator)}
            for layer in LAYERS:
                tensors[f"hidden.{layer}"] = torch.randn(n, WIDTH, generator=generator)
        else:
            lengths = torch.randint(ANSWER_TOKENS[0], ANSWER_TOKENS[1] + 1, (n,), generator=generator)
            logprobs, ids = [], []
            for chunk in torch.split(lengths, 4096):  # pack a few thousand answers at a time: bounded memory
                count = int(chunk.sum())
                packed = pack_topk(-(torch.rand(count, TOP_K, generator=generator) * 20).half(),
                                   torch.randint(0, VOCAB, (count, TOP_K), generator=generator).to(torch.uint16))
                logprobs.append(packed[0])
                ids.append(packed[1])
            tensors = {"logprobs": torch.cat(logprobs), "ids": torch.cat(ids), "lengths": lengths.to(torch.uint16)}
            tokens += int(lengths.sum())
        name = f"train-{no:05d}.safetensors"
        save_file({key: value.contiguous() for key, value in tensors.items()}, path / name)
        shards.append(name)
        del tensors
    manifest = {"cache_format": CACHE_FORMAT, "teacher": "synthetic", "task": kind,
                "hidden_layers": list(LAYERS) if kind == "classify" else [],
                "kd_level": "token" if kind == "generate" else None, "top_k": TOP_K if kind == "generate" else None,
                "splits": {"train": {"rows": rows, "shards": shards, "tokens": tokens or None}}}
    files = sorted(path.iterdir())
    manifest["bytes"] = sum(f.stat().st_size for f in files)
    manifest["sha256"] = {f.name: sha256_file(f) for f in files}
    write_json(path / "manifest.json", manifest)
    return manifest


def peak_megabytes() -> float:
    """This process's peak resident set so far, in MB: Linux's VmHWM, else ru_maxrss (bytes on macOS).

    On Linux ru_maxrss is not the process's own: exec records the parent's resident set at the fork
    in it (here, the parent that wrote a large cache), while VmHWM is the peak of this program alone."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e6, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e6, 1)


def measure(path: Path, batches: int, batch_size: int, seed: int, reader: str) -> dict:
    """In this (fresh) process: open the cache as training does and read random batches across it."""
    import torch

    from kdcli.cache import CachedTeacher, check_cache, unpack_topk
    from kdcli.rundir import read_json

    start = peak_megabytes()  # Python, torch and kdcli imported
    manifest = read_json(path / "manifest.json")
    rows = manifest["splits"]["train"]["rows"]
    started = time.perf_counter()
    if reader == "new":
        check_cache(path, manifest, "t", {"train": rows})
        teacher = CachedTeacher(path)
    else:  # the reader before issue 15: every shard loaded and concatenated
        from safetensors.torch import load_file

        parts = [load_file(path / shard) for shard in manifest["splits"]["train"]["shards"]]
        if manifest["task"] == "generate":
            logprobs, ids = zip(*(unpack_topk(p["logprobs"], p["ids"]) for p in parts))
            lengths = torch.cat([p["lengths"].to(torch.long) for p in parts])
            whole = {"logprobs": torch.cat(logprobs), "ids": torch.cat(ids), "starts": lengths.cumsum(0) - lengths,
                     "lengths": lengths}
        else:
            whole = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        del parts

        def teacher(examples: list[dict], split: str) -> object:
            index = torch.tensor([ex["idx"] for ex in examples])
            if "lengths" not in whole:
                return [whole[key][index] for key in whole]
            spans = [(int(whole["starts"][i]), int(whole["lengths"][i])) for i in index]
            tokens = torch.cat([torch.arange(s, s + n) for s, n in spans])
            return whole["logprobs"][tokens].float(), whole["ids"][tokens].long()
    open_seconds = time.perf_counter() - started
    opened = peak_megabytes()
    draw = random.Random(seed)
    times = []
    for _ in range(batches):
        examples = [{"idx": draw.randrange(rows)} for _ in range(batch_size)]
        started = time.perf_counter()
        teacher(examples, "train")
        times.append(time.perf_counter() - started)
    return {"start_rss_megabytes": start, "opened_rss_megabytes": opened, "peak_rss_megabytes": peak_megabytes(),
            "open_seconds": round(open_seconds, 3), "read_ms_per_batch": round(1000 * statistics.median(times), 3)}


def measured(path: Path, args: argparse.Namespace, reader: str) -> dict:
    """``measure`` in a new process, so each cache's peak is its own."""
    done = subprocess.run([sys.executable, __file__, "--measure", str(path), "--reader", reader,
                           "--batches", str(args.batches), "--batch-size", str(args.batch_size)],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"measuring {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--old", action="store_true", help="also measure the old reader (loads every shard)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process's side
    parser.add_argument("--reader", default="new", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batches, args.batch_size, 0, args.reader)))
        return

    from kdcli.cache import SHARD_ROWS
    from kdcli.runtime import describe

    sizes = SIZES[args.quick]
    shard_rows = 4_096 if args.quick else SHARD_ROWS  # quick: several shards all the same
    needed = max(bytes_per_row(kind) * rows[1] for kind, rows in sizes.items())
    free = shutil.disk_usage(args.workdir).free
    if free < 1.5 * needed:
        sys.exit(f"{args.workdir} has {free / 1e9:.1f} GB free; the largest cache needs {needed / 1e9:.1f} GB "
                 "(--workdir elsewhere)")
    caches: dict[str, dict] = {}
    old: dict[str, dict] = {}
    for kind, counts in sizes.items():
        caches[kind], old[kind] = {}, {}
        for label, rows in zip(("small", "large"), counts):
            with tempfile.TemporaryDirectory(dir=args.workdir, prefix="kd-cache-memory-") as tmp:
                started = time.perf_counter()
                manifest = write_cache(Path(tmp) / "cache", kind, rows, shard_rows, seed=rows)
                print(f"{kind} {rows:,} rows: {manifest['bytes'] / 1e6:,.1f} MB in "
                      f"{len(manifest['splits']['train']['shards'])} shards, written in "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
                caches[kind][label] = {"rows": rows, "megabytes": round(manifest["bytes"] / 1e6, 1),
                                       "shards": len(manifest["splits"]["train"]["shards"]),
                                       "tokens": manifest["splits"]["train"]["tokens"],
                                       **measured(Path(tmp) / "cache", args, "new")}
                if args.old:
                    old[kind][label] = measured(Path(tmp) / "cache", args, "old")
    growth = {kind: round(s["large"]["peak_rss_megabytes"] - s["small"]["peak_rss_megabytes"], 1)
              for kind, s in caches.items()}
    summary = {
        "benchmark": "cache_memory",
        "quick": args.quick,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "top_k": TOP_K,
        "hidden": {"layers": list(LAYERS), "width": WIDTH},
        "measured": "check_cache + CachedTeacher + random batches, one process per cache (not a kd distill run)",
        "caches": caches,
        "growth_megabytes": growth,
        "target_megabytes": TARGET_MB,
        "within_target": {kind: value < TARGET_MB for kind, value in growth.items()},
        "old_reader": ({kind: {**{label: {key: m[key] for key in ("peak_rss_megabytes", "read_ms_per_batch")}
                                  for label, m in by_size.items()},
                               "growth_megabytes": round(by_size["large"]["peak_rss_megabytes"]
                                                         - by_size["small"]["peak_rss_megabytes"], 1)}
                        for kind, by_size in old.items()} if args.old else None),
        "env": describe(),
    }
    print(f"\n{'cache':10}{'rows':>11}{'on disk MB':>12}{'peak RSS MB':>13}{'opened MB':>11}{'ms/batch':>10}")
    for kind, by_size in caches.items():
        for size in by_size.values():
            print(f"{kind:10}{size['rows']:>11,}{size['megabytes']:>12,.1f}{size['peak_rss_megabytes']:>13,.1f}"
                  f"{size['opened_rss_megabytes']:>11,.1f}{size['read_ms_per_batch']:>10.3f}")
        print(f"{'':10}peak RSS growth {growth[kind]:+.1f} MB (target: under {TARGET_MB} MB)"
              + (f"; the old reader: {summary['old_reader'][kind]['growth_megabytes']:+.1f} MB" if args.old else ""))
    finish(summary, args.out)


if __name__ == "__main__":
    main()
