"""The out-of-core cache reader (issue 15): `CachedTeacher` reads each batch's rows from the shards
and answers exactly what the old reader, which loaded every shard whole and concatenated them,
answered; it never loads a shard whole, and holds no more than its index between calls.

The caches here are written directly in kd's format (several shards, uneven ones, an empty one, both
id and length dtypes), and the expected answers are computed from the shards independently, with
``safetensors.torch.load_file`` and ``torch.cat`` as the old reader did."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdcli import cache as cache_module
from kdcli.cache import CACHE_FORMAT, CachedTeacher, check_cache, pack_topk, unpack_topk
from kdcli.errors import CacheError
from kdcli.rundir import read_json, sha256_file, write_json

LAYERS = (1, 3)


def _finish(path: Path, manifest: dict, splits: dict[str, dict]) -> dict:
    manifest = dict(manifest, cache_format=CACHE_FORMAT, splits=splits)
    manifest["sha256"] = {f.name: sha256_file(f) for f in sorted(path.iterdir())}
    write_json(path / "manifest.json", manifest)
    return manifest


def classify_cache(path: Path, shard_rows: list[int], seed: int = 0) -> dict:
    """logits [n, 3] fp32 and two pooled layers (fp32 [n, 8], fp16 [n, 2, 4]) in shards of ``shard_rows``."""
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    shards = []
    for no, n in enumerate(shard_rows):
        name = f"train-{no:05d}.safetensors"
        save_file({"logits": torch.randn(n, 3, generator=generator),
                   f"hidden.{LAYERS[0]}": torch.randn(n, 8, generator=generator),
                   f"hidden.{LAYERS[1]}": torch.randn(n, 2, 4, generator=generator).half()}, path / name)
        shards.append(name)
    return _finish(path, {"task": "classify", "hidden_layers": list(LAYERS)},
                   {"train": {"rows": sum(shard_rows), "shards": shards}})


def topk_cache(path: Path, shard_rows: list[int], *, k: int = 32, id_dtype: torch.dtype = torch.uint16,
               seed: int = 0) -> dict:
    """Packed top-k shards as kd writes them; answers of 0 to 6 tokens; the last shard's lengths int32."""
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    top = 65_535 if id_dtype == torch.uint16 else 200_000
    shards = []
    for no, n in enumerate(shard_rows):
        lengths = torch.randint(0, 7, (n,), generator=generator)
        tokens = int(lengths.sum())
        logprobs = -(torch.rand(tokens, k, generator=generator) * 20).half()
        ids = torch.randint(0, top + 1, (tokens, k), generator=generator).to(id_dtype)
        logprobs, ids = pack_topk(logprobs, ids)
        name = f"train-{no:05d}.safetensors"
        wide = no == len(shard_rows) - 1
        save_file({"logprobs": logprobs.contiguous(), "ids": ids,
                   "lengths": lengths.to(torch.int32 if wide else torch.uint16)}, path / name)
        shards.append(name)
    return _finish(path, {"task": "generate", "kd_level": "token", "hidden_layers": []},
                   {"train": {"rows": sum(shard_rows), "shards": shards}})


def concatenated(path: Path) -> dict[str, torch.Tensor]:
    """What the old reader held in memory for the train split: every shard loaded and concatenated."""
    parts = [load_file(path / shard) for shard in read_json(path / "manifest.json")["splits"]["train"]["shards"]]
    if "lengths" not in parts[0]:
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    logprobs, ids = zip(*(unpack_topk(p["logprobs"], p["ids"]) for p in parts))
    lengths = torch.cat([p["lengths"].to(torch.long) for p in parts])
    return {"logprobs": torch.cat(logprobs), "ids": torch.cat(ids), "lengths": lengths,
            "starts": lengths.cumsum(0) - lengths}


def batches(rows: int, seed: int = 0) -> list[list[int]]:
    """Random index batches, with repeats, runs of consecutive rows, the first and last row, an empty batch."""
    draw = random.Random(seed)
    out = [[draw.randrange(rows) for _ in range(draw.randint(1, 40))] for _ in range(40)]
    first = draw.randrange(rows - 20)
    return [*out, list(range(first, first + 20)), [0, rows - 1, 0], list(range(rows)), []]


def test_classify_rows_over_several_shards_are_exactly_what_the_concatenating_reader_gave(tmp_path):
    cache = tmp_path / "cache"
    classify_cache(cache, [7, 1, 13, 0, 9])
    whole, teacher = concatenated(cache), CachedTeacher(cache)
    for rows in batches(30)[:-1]:  # the old reader could not index with an empty list
        answer = teacher([{"idx": i} for i in rows], "train")
        index = torch.tensor(rows)
        assert answer.logits.dtype == torch.float32 and torch.equal(answer.logits, whole["logits"][index])
        assert sorted(answer.hidden) == list(LAYERS)
        for layer in LAYERS:
            expected = whole[f"hidden.{layer}"][index]
            assert answer.hidden[layer].dtype == expected.dtype and torch.equal(answer.hidden[layer], expected)


@pytest.mark.parametrize("id_dtype", [torch.uint16, torch.int32])
def test_topk_answers_over_several_shards_are_exactly_what_the_concatenating_reader_gave(id_dtype, tmp_path):
    cache = tmp_path / "cache"
    topk_cache(cache, [11, 0, 6, 17], id_dtype=id_dtype)
    whole, teacher = concatenated(cache), CachedTeacher(cache)
    assert int(whole["lengths"].min()) == 0  # answers without tokens are read too
    for rows in batches(34):
        answer = teacher([{"idx": i} for i in rows], "train")
        spans = [(int(whole["starts"][i]), int(whole["lengths"][i])) for i in rows]
        index = (torch.cat([torch.arange(start, start + n) for start, n in spans]) if spans
                 else torch.zeros(0, dtype=torch.long))
        assert answer.lengths == [n for _, n in spans]
        assert answer.token_logprobs.dtype == torch.float32 and answer.token_ids.dtype == torch.long
        assert torch.equal(answer.token_logprobs, whole["logprobs"][index].float())
        assert torch.equal(answer.token_ids, whole["ids"][index].to(torch.long))


def resident_tensor_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from ``obj`` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(resident_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(resident_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("kdcli"):
        return resident_tensor_bytes(vars(obj), seen)
    return 0


@pytest.mark.parametrize("kind", ["classify", "generate"])
def test_the_reader_never_loads_a_shard_whole_and_reads_only_the_rows_it_is_asked_for(kind, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    sizes = [40, 25, 40, 3]
    (classify_cache if kind == "classify" else topk_cache)(cache, sizes)
    whole = concatenated(cache)
    payload = sum(t.untyped_storage().nbytes() for t in whole.values())

    def refused(*args, **kwargs):
        raise AssertionError("a shard was loaded whole")

    import safetensors.torch

    for name in ("load_file", "load", "safe_load_file"):
        if hasattr(safetensors.torch, name):
            monkeypatch.setattr(safetensors.torch, name, refused)
    reads: list[int] = []
    real_read_at = cache_module._read_at

    def counted(handle, offset, into):
        reads.append(len(into))
        real_read_at(handle, offset, into)

    monkeypatch.setattr(cache_module, "_read_at", counted)
    teacher = CachedTeacher(cache)
    rows = sum(sizes)
    # Between calls it holds its index alone: at most 8 bytes a row (a top-k answer's first token),
    # never the shards' contents.
    held = resident_tensor_bytes(teacher)
    assert held <= 8 * (rows + len(sizes)) and held < payload / 20, (held, payload)
    # What opening read: the top-k shards' lengths (2 bytes a row here, 4 in the int32 shard), nothing else.
    assert sum(reads) == (0 if kind == "classify" else 2 * rows + 2 * sizes[-1])
    for batch in batches(rows, seed=1):
        reads.clear()
        answer = teacher([{"idx": i} for i in batch], "train")
        if kind == "classify":
            # one row: 3 fp32 logits, 8 fp32 and 8 fp16 hidden values
            assert sum(reads) == len(batch) * (3 * 4 + 8 * 4 + 8 * 2)
        else:
            tokens = sum(answer.lengths)
            assert sum(reads) == tokens * (32 * 2 + 30 * 2)  # fp16 log-probs [32], uint16 ids [32 - 2]
        # Consecutive rows of one shard are one read per tensor.
        assert len(reads) <= len(batch) * (3 if kind == "classify" else 2)
    assert resident_tensor_bytes(teacher) == held  # nothing read stays behind


def test_a_sequence_level_cache_is_parsed_once_its_count_checked_when_read(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    answers = [f"answer {i}" for i in range(5)]
    write_json(cache / "train-answers.json", answers)
    manifest = _finish(cache, {"task": "generate", "kd_level": "sequence", "hidden_layers": []},
                       {"train": {"rows": 5, "shards": ["train-answers.json"]}})
    parsed: list[str] = []
    real_read_json = cache_module.read_json

    def counted(path):
        parsed.append(Path(path).name)
        return real_read_json(path)

    monkeypatch.setattr(cache_module, "read_json", counted)
    check_cache(cache, dict(manifest), "t", {"train": 5})
    with pytest.raises(CacheError, match="train shards hold 5 rows, the train split has 6"):
        check_cache(cache, dict(manifest), "t", {"train": 6})
    teacher = CachedTeacher(cache)
    assert parsed.count("train-answers.json") == 1  # by CachedTeacher; check_cache took the manifest's count
    assert teacher([{"idx": 3}, {"idx": 0}], "train").texts == ["answer 3", "answer 0"]
    # A manifest that disagrees with its answers is caught where the answers are parsed.
    write_json(cache / "manifest.json", dict(manifest, splits={"train": {"rows": 6, "shards": ["train-answers.json"]}}))
    with pytest.raises(CacheError, match="cannot be read .*holds 5 answers, its manifest says 6"):
        CachedTeacher(cache)
    write_json(cache / "manifest.json", dict(manifest, splits={"train": {"shards": ["train-answers.json"]}}))
    with pytest.raises(CacheError, match="no row count for train"):
        check_cache(cache, dict(manifest), "t")


@pytest.mark.parametrize("kind", ["classify", "generate"])
def test_a_shard_cut_short_after_opening_is_a_cache_error_when_read(kind, tmp_path):
    cache = tmp_path / "cache"
    (classify_cache if kind == "classify" else topk_cache)(cache, [10, 10])
    teacher = CachedTeacher(cache)
    shard = cache / "train-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    assert teacher([{"idx": 2}], "train")  # the intact shard still reads
    with pytest.raises(CacheError, match="cannot be read .*EOFError: train-00001.safetensors ends before"):
        teacher([{"idx": i} for i in range(10, 20)], "train")
    with pytest.raises(CacheError, match=r"cannot be read .*row 20: the split holds rows 0 to 19"):
        teacher([{"idx": 20}], "train")
    with pytest.raises(CacheError, match="cannot be read"):  # opened again: the header no longer fits the file
        CachedTeacher(cache)


def test_shards_that_disagree_with_each_other_are_refused_when_opened(tmp_path):
    cache = tmp_path / "cache"
    classify_cache(cache, [4, 4])
    save_file({"logits": torch.randn(4, 5), f"hidden.{LAYERS[0]}": torch.randn(4, 8),
               f"hidden.{LAYERS[1]}": torch.randn(4, 2, 4).half()}, cache / "train-00001.safetensors")
    with pytest.raises(CacheError, match="cannot be read .*logits in 2 shapes or dtypes"):
        CachedTeacher(cache)
    save_file({"logits": torch.randn(4, 3), f"hidden.{LAYERS[0]}": torch.randn(3, 8),
               f"hidden.{LAYERS[1]}": torch.randn(4, 2, 4).half()}, cache / "train-00001.safetensors")
    with pytest.raises(CacheError, match=r"cannot be read .*holds \[3, 4\] rows in its tensors"):
        CachedTeacher(cache)
