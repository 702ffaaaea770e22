"""Teacher caches: run each teacher once, store its outputs, serve them to training.

A cache lives in ``runs/NAME/cache/STAGE/TEACHER/``: safetensors shards of the
teacher's class/option logits (fp32) and, when the hidden-state MSE is on, the
pooled states of the mapped teacher layers, plus ``manifest.json`` naming
everything the outputs depend on. A cache whose manifest differs from what the
recipe would produce is refused, naming the field. The directory is written under
a temporary name and renamed when complete, so a crash never leaves a half cache
that looks whole.

The teacher runs over each split in length-sorted batches (``kdcli.batching``: little padding),
and every row is stored at its index in the split, whatever batch it ran in. Under several processes
(torchrun, ``accelerate launch``) every process runs a share of those same batches (batch b on
process b mod N) and the main process assembles the shards and the manifest from all the answers:
the same batches as one process, so the same floats and byte-identical files (``build_cache``).

``LiveTeacher`` and ``CachedTeacher`` answer the same call, so the training loop
cannot tell them apart: the loss is the same either way (a test holds them equal).

Generation (task ``generate``) stores, per answer token, the teacher's top-k
log-probabilities at the loss temperature (``log_softmax(logits / T)``, fp16) and their
token ids (uint16 when the vocabulary has at most 65,536 ids, else int32), flat
``[total_tokens, k]``, with each row's answer-token count in ``lengths`` [rows] (uint16;
int32 only in a shard with an answer of 65,536 tokens or more). The probability mass outside
the top k (the tail) is not stored: it is ``1 - sum(exp(top-k))``, computed when read
(``losses.topk_tail``). A log-prob is never positive, so the sign bit of each stored fp16
value is free: the last ``k // 16`` ids of a token (``k // 32`` with int32 ids) ride in those
sign bits (``pack_topk``/``unpack_topk``) and the ``ids`` tensor holds only the others. With
uint16 ids a token then costs ``2k + 2(k - k // 16)`` bytes, 124 at k = 32, plus 2 bytes a row
and one safetensors header (a few hundred bytes) a shard: under 128 bytes a token at k = 32 for
any cache of more than a few hundred tokens (the manifest's ``bytes_per_token`` is measured on
the shard files). ``temperature`` and ``top_k`` are part of the cache's identity. A live teacher
answers in the same form (fp16-rounded top k), so live and cached losses agree. On transfer rows
(no answer of their own) the teacher first answers greedily, and its top k covers that answer,
kept beside the shards (``transfer-answers.json``). With ``kd_level = "sequence"`` the cache holds
the teacher's greedy answers instead (``SPLIT-answers.json``).

Reading is out of core (issue 15): ``CachedTeacher`` keeps an index built from the shards'
headers (and the top-k shards' ``lengths``), at most 8 bytes a row, and reads each batch's rows
from the files with positional reads; no shard is loaded whole or concatenated, so a process's
memory does not grow with the cache. Only answers as text (sequence level, transfer rows) are held in memory.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from safetensors import SafetensorError

from kdcli import __version__
from kdcli.batching import gather, in_data_order, length_sorted_batches, measured_lengths
from kdcli.errors import CacheError
from kdcli.job import TeacherSettings
from kdcli.rundir import atomic_dir, read_json, sha256_file, write_json, writing
from kdcli.tasks import TeacherBatch, task_kind

if TYPE_CHECKING:
    import torch

    from kdcli.models import TaskModel

CACHE_FORMAT = 3  # 2: generate shards hold per-row lengths and ids folded into the log-probs' sign bits;
#                  3: the manifest holds each shard's sha256
SHARD_ROWS = 65_536
SPLITS = ("train", "validation", "transfer")
# Fields that must match for a cache to stand in for the live teacher.
IDENTITY_FIELDS = (
    "cache_format",
    "teacher",
    "revision",
    "weights",
    "tokenizer",
    "data",
    "task",
    "num_classes",
    "quantisation",
    "dtype",
    "hidden_layers",
    "pooling",
    "max_length",
    "template",
    # generate only (None otherwise)
    "kd_level",
    "top_k",
    "temperature",
    "answer_max_length",
    "vocab_size",
)


class LiveTeacher:
    """Runs the teacher model on each batch (eval mode, no gradients), asked as ``settings`` say."""

    def __init__(self, model: "TaskModel", settings: TeacherSettings):
        self.model = model
        self.settings = settings
        self.task = task_kind(model.task)
        self.model.model.eval()

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.settings.hidden_layers))

    def __call__(self, examples: list[dict], split: str) -> TeacherBatch:
        return self.task.teacher_answer(self.model, examples, self.settings)

    def lengths(self, examples: list[dict]) -> list[int]:
        """The tokens of each example as the teacher reads it: what ``build_cache`` sorts batches by."""
        return self.task.teacher_lengths(self.model, examples, self.settings)


class CachedTeacher:
    """Reads a verified cache out of core; rows are addressed by each example's ``idx`` in its split.

    Opening reads each shard's safetensors header and, for top-k shards, its per-row ``lengths``
    into a small index (which shard holds a row, where each tensor's bytes lie, at which token each
    answer starts: 8 bytes a row). A call then reads exactly its rows' bytes with positional reads
    (consecutive rows in one read), so resident memory does not grow with the cache: no shard is ever
    loaded whole or concatenated. Not memory-mapped: the pages of a mapped file count as the
    process's resident memory once touched, and the kernel maps the cached pages around each touched
    one as well, so a mapped shard read at random soon shows up whole in the process's RSS
    (safetensors' ``get_slice`` and numpy's memmap both did, measured). Sequence-level answers (one
    JSON list of strings per split) are held in memory, parsed once.
    """

    def __init__(self, path: Path, device: "torch.device | str" = "cpu"):
        self.path = path
        self.manifest = read_json(path / "manifest.json")
        if self.manifest.get("cache_format") != CACHE_FORMAT:  # check_cache refuses it first; never misread one
            raise CacheError(
                f"the cache at {path} has format {self.manifest.get('cache_format')!r}, this kd reads {CACHE_FORMAT}",
                "run `kd cache-teachers RECIPE` to rebuild it",
            )
        self.device = device
        self.splits: dict[str, _RowSplit | _TokenSplit] = {}
        self.answers: dict[str, list[str]] = {}
        try:
            self._open()
        except _READ_ERRORS as exc:  # damaged after check_cache
            raise self._unreadable(exc) from None

    def _open(self) -> None:
        generate = self.manifest.get("task") == "generate"
        for split, info in self.manifest["splits"].items():
            if self.manifest.get("kd_level") == "sequence":
                # The one parse of the answers: check_cache takes their count from the manifest.
                answers = [a for shard in info["shards"] for a in read_json(self.path / shard)]
                if "rows" in info and len(answers) != info["rows"]:
                    raise ValueError(f"{split} holds {len(answers)} answers, its manifest says {info['rows']}")
                self.answers[split] = answers
                continue
            shards = [_Shard(self.path / name) for name in info["shards"]]
            self.splits[split] = (_TokenSplit(shards) if generate
                                  else _RowSplit(shards, ["logits", *(f"hidden.{layer}" for layer in self.layers)]))
            if "answers" in info:  # transfer rows: the answers the top-k log-probs cover
                self.answers[split] = read_json(self.path / info["answers"])
                if len(self.answers[split]) != info["rows"]:
                    raise ValueError(f"{split} holds {len(self.answers[split])} answers, its manifest says "
                                     f"{info['rows']}")

    def _unreadable(self, exc: Exception) -> CacheError:
        return CacheError(f"the cache at {self.path} cannot be read ({type(exc).__name__}: {exc})",
                          "run `kd cache-teachers RECIPE --force` to rebuild it")

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["hidden_layers"])

    def __call__(self, examples: list[dict], split: str) -> TeacherBatch:
        import torch

        if split not in self.splits and split not in self.answers:
            raise CacheError(
                f"the cache at {self.path} has no '{split}' split",
                "run `kd cache-teachers RECIPE` again",
            )
        texts = [self.answers[split][ex["idx"]] for ex in examples] if split in self.answers else None
        if split not in self.splits:
            return TeacherBatch(texts=texts)
        stored = self.splits[split]
        rows = [ex["idx"] for ex in examples]
        try:
            if isinstance(stored, _TokenSplit):
                packed, packed_ids, lengths = stored.read(rows)
                logprobs, ids = unpack_topk(packed, packed_ids)
                return TeacherBatch(token_logprobs=logprobs.float().to(self.device),
                                    token_ids=ids.to(torch.long).to(self.device), lengths=lengths, texts=texts)
            read = stored.read(rows)
        except _READ_ERRORS as exc:  # a shard changed on disk since it was opened
            raise self._unreadable(exc) from None
        hidden = {layer: read[f"hidden.{layer}"].to(self.device) for layer in self.layers}
        return TeacherBatch(read["logits"].to(self.device), hidden)


_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)
# safetensors' dtype names, as torch dtype names
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
           "BOOL": "bool"}


class _Stored:
    """Where one tensor of a shard lies in its file: ``offset`` of its first byte, its dtype and shape."""

    def __init__(self, offset: int, dtype: "torch.dtype", shape: tuple[int, ...]):
        import math

        self.offset, self.dtype, self.shape = offset, dtype, shape
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize  # one entry of the first dimension

    @property
    def rows(self) -> int:
        return self.shape[0]


class _Shard:
    """One safetensors shard: its tensors' places in the file, from its header (nothing else is read)."""

    def __init__(self, path: Path):
        import json
        import struct

        import torch
        from safetensors import safe_open

        with safe_open(path, "pt"):  # safetensors checks the header (offsets, dtypes, size) or raises
            pass
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        self.path = path
        self.tensors: dict[str, _Stored] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if not shape:
                raise ValueError(f"{path.name}: {name} is a scalar, not one entry a row")
            stored = _Stored(8 + size + begin, getattr(torch, _DTYPES[entry["dtype"]]), shape)
            if stored.rows * stored.row_bytes != end - begin:
                raise ValueError(f"{path.name}: {name} takes {end - begin} bytes for shape {list(shape)}")
            self.tensors[name] = stored

    def get(self, name: str) -> _Stored:
        if name not in self.tensors:
            raise KeyError(f"{self.path.name} holds no {name!r}")
        return self.tensors[name]


def _read_at(handle: Any, offset: int, into: memoryview) -> None:
    """Fill ``into`` with the file's bytes from ``offset`` on (a positional read: nothing else of the file)."""
    handle.seek(offset)
    done = 0
    while done < len(into):
        got = handle.readinto(into[done:])
        if not got:
            raise EOFError(f"{Path(handle.name).name} ends before byte {offset + len(into)}")
        done += got


class _Reader:
    """The shard files one read opens, each once, all closed when the read ends (so a CachedTeacher holds
    no open files between calls)."""

    def __init__(self, shards: list[_Shard]):
        self.shards, self.files = shards, {}

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.files.values():
            handle.close()

    def __call__(self, shard_no: int, name: str, first: int, count: int, into: memoryview) -> None:
        """Rows ``first .. first + count`` of tensor ``name`` of shard ``shard_no`` into ``into``."""
        if shard_no not in self.files:
            self.files[shard_no] = open(self.shards[shard_no].path, "rb", buffering=0)
        stored = self.shards[shard_no].get(name)
        _read_at(self.files[shard_no], stored.offset + first * stored.row_bytes, into[: count * stored.row_bytes])


def _buffer(nbytes: int) -> tuple["torch.Tensor", memoryview]:
    import torch

    data = torch.empty(nbytes, dtype=torch.uint8)
    return data, memoryview(data.numpy())


def _same_rows(shards: list[_Shard], name: str) -> _Stored:
    """The form of ``name`` shared by every shard (row shape and dtype), or ValueError."""
    forms = {(shard.get(name).shape[1:], shard.get(name).dtype) for shard in shards}
    if len(forms) > 1:
        raise ValueError(f"the shards hold {name} in {len(forms)} shapes or dtypes")
    return shards[0].get(name)


class _Split:
    """A split's shards, and which holds each row (``firsts``: each shard's first row in the split)."""

    def __init__(self, shards: list[_Shard], counts: list[int]):
        import itertools

        self.shards = shards
        self.firsts = [0, *itertools.accumulate(counts)]
        self.rows = self.firsts[-1]

    def runs(self, rows: list[int]) -> list[tuple[int, int, int]]:
        """``rows`` as (shard, first row in it, rows): consecutive rows of one shard are one run."""
        import bisect
        import operator

        runs: list[list[int]] = []
        for row in map(operator.index, rows):
            if not 0 <= row < self.rows:
                raise KeyError(f"row {row}: the split holds rows 0 to {self.rows - 1}")
            shard = bisect.bisect_right(self.firsts, row) - 1
            local = row - self.firsts[shard]
            if runs and runs[-1][0] == shard and runs[-1][1] + runs[-1][2] == local:
                runs[-1][2] += 1
            else:
                runs.append([shard, local, 1])
        return [(shard, first, count) for shard, first, count in runs]


class _RowSplit(_Split):
    """classify and choice: tensors with one fixed-size entry per row (``logits``, ``hidden.L``)."""

    def __init__(self, shards: list[_Shard], names: list[str]):
        counts = []
        for shard in shards:
            held = {shard.get(name).rows for name in names}
            if len(held) != 1:
                raise ValueError(f"{shard.path.name} holds {sorted(held)} rows in its tensors")
            counts.append(held.pop())
        super().__init__(shards, counts)
        self.names = names
        self.forms = {name: _same_rows(shards, name) for name in names} if shards else {}

    def read(self, rows: list[int]) -> dict[str, "torch.Tensor"]:
        runs = self.runs(rows)
        out = {}
        with _Reader(self.shards) as read:
            for name, form in self.forms.items():
                data, view = _buffer(len(rows) * form.row_bytes)
                at = 0
                for shard, first, count in runs:
                    read(shard, name, first, count, view[at:])
                    at += count * form.row_bytes
                out[name] = data.view(form.dtype).view(len(rows), *form.shape[1:])
        return out


class _TokenSplit(_Split):
    """generate, token level: per shard the packed top-k ``logprobs`` [T, k], ``ids`` [T, k'] and
    ``lengths`` [rows]; the index keeps each row's first token in its shard (``starts``, int64)."""

    def __init__(self, shards: list[_Shard]):
        import torch

        self.starts = []
        with _Reader(shards) as read:
            for shard_no, shard in enumerate(shards):
                lengths = shard.get("lengths")
                if len(lengths.shape) != 1 or lengths.dtype not in (torch.uint16, torch.int32):
                    raise ValueError(f"{shard.path.name}: lengths of shape {list(lengths.shape)}, {lengths.dtype}")
                data, view = _buffer(lengths.rows * lengths.row_bytes)
                read(shard_no, "lengths", 0, lengths.rows, view)
                starts = torch.zeros(lengths.rows + 1, dtype=torch.int64)
                torch.cumsum(data.view(lengths.dtype).to(torch.int64), 0, out=starts[1:])
                tokens = {int(starts[-1]), shard.get("logprobs").rows, shard.get("ids").rows}
                if len(tokens) != 1:
                    raise ValueError(f"{shard.path.name}: its lengths, log-probs and ids count {sorted(tokens)} tokens")
                self.starts.append(starts)
        super().__init__(shards, [len(starts) - 1 for starts in self.starts])
        self.logprobs = _same_rows(shards, "logprobs") if shards else None
        self.ids = _same_rows(shards, "ids") if shards else None
        if self.logprobs is not None:
            lp, ids = self.logprobs, self.ids
            if (lp.dtype != torch.float16 or ids.dtype not in (torch.uint16, torch.int32) or len(lp.shape) != 2
                    or len(ids.shape) != 2 or ids.shape[1] != lp.shape[1] - lp.shape[1] // (8 * ids.dtype.itemsize)):
                raise ValueError(f"log-probs {lp.dtype} {list(lp.shape)} and ids {ids.dtype} {list(ids.shape)} "
                                 "are not a packed top-k")

    def read(self, rows: list[int]) -> tuple["torch.Tensor", "torch.Tensor", list[int]]:
        """The packed log-probs and ids of ``rows``' answer tokens, row after row, and each row's length."""
        import torch

        if self.logprobs is None:  # a split without shards holds no rows (runs refuses any row)
            self.runs(rows)
            return torch.zeros(0, 0, dtype=torch.float16), torch.zeros(0, 0, dtype=torch.uint16), []
        spans, lengths = [], []
        for shard, first, count in self.runs(rows):
            starts = self.starts[shard][first : first + count + 1]
            lengths += (starts[1:] - starts[:-1]).tolist()
            spans.append((shard, int(starts[0]), int(starts[-1] - starts[0])))
        tokens = sum(n for _, _, n in spans)
        out = []
        with _Reader(self.shards) as read:
            for name, form in (("logprobs", self.logprobs), ("ids", self.ids)):
                data, view = _buffer(tokens * form.row_bytes)
                at = 0
                for shard, first, count in spans:
                    read(shard, name, first, count, view[at:])
                    at += count * form.row_bytes
                out.append(data.view(form.dtype).view(tokens, *form.shape[1:]))
        return out[0], out[1], lengths


def expected_manifest(*, teacher_ref: str, revision: str | None, weights: str, tokenizer: str, data_fingerprint: str,
                      task: str, num_classes: int, quantisation: str, dtype: str, settings: TeacherSettings,
                      vocab_size: int | None = None) -> dict[str, Any]:
    """The identity a cache must carry to stand in for the teacher: the model, the data, and how the
    teacher is asked (``settings``; the generate-only ones are None for the other tasks)."""
    generate = task == "generate"
    token = generate and settings.kd_level == "token"
    return {
        "cache_format": CACHE_FORMAT,
        "teacher": teacher_ref,
        "revision": revision,
        "weights": weights,
        "tokenizer": tokenizer,
        "data": data_fingerprint,
        "task": task,
        "num_classes": num_classes,
        "quantisation": quantisation,
        "dtype": dtype,
        "hidden_layers": sorted(set(settings.hidden_layers)),
        "pooling": settings.pooling,
        "max_length": settings.max_length,
        "template": settings.template,
        "kd_level": settings.kd_level if generate else None,
        "top_k": settings.top_k if token else None,
        "temperature": settings.temperature if token else None,
        "answer_max_length": settings.answer_max_length if generate else None,
        "vocab_size": vocab_size if token else None,
    }


def check_cache(path: Path, expected: dict[str, Any], teacher_name: str, rows: dict[str, int] | None = None) -> None:
    """Raise CacheError unless ``path`` holds a whole cache made for exactly ``expected`` (and, when
    given, with ``rows[split]`` rows per split): every shard present, of its split, holding its
    rows, and with the sha256 the manifest recorded when it was written."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CacheError(
            f"no complete cache for teacher '{teacher_name}' at {path}",
            "run `kd cache-teachers RECIPE` (or let `kd distill` use the live teacher)",
        )

    def damaged(what: str) -> CacheError:
        return CacheError(f"the cache for teacher '{teacher_name}' at {path} is damaged: {what}",
                          "run `kd cache-teachers RECIPE` to rebuild it")

    try:
        manifest = read_json(manifest_path)
    except ValueError:
        raise damaged("manifest.json is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise damaged(f"manifest.json holds a {type(manifest).__name__}, not a manifest")
    for key in IDENTITY_FIELDS:
        if manifest.get(key) != expected.get(key):
            raise CacheError(
                f"the cache for teacher '{teacher_name}' was made with {key} = {manifest.get(key)!r}, "
                f"but the recipe now gives {expected.get(key)!r}",
                "run `kd cache-teachers RECIPE` to rebuild it",
            )
    splits, hashes = manifest.get("splits"), manifest.get("sha256")
    if not isinstance(splits, dict) or not isinstance(hashes, dict):
        raise damaged("manifest.json lists no splits or no checksums")
    for split in rows or {split: None for split in splits}:
        info = splits.get(split)
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise damaged(f"manifest.json lists no {split} shards")
        held = 0
        for shard in info["shards"]:
            if not isinstance(shard, str) or not shard.startswith(f"{split}-") or Path(shard).name != shard:
                raise damaged(f"{shard!r} is not a {split} shard")
            if not (path / shard).is_file():
                raise damaged(f"{shard} is missing")
            if sha256_file(path / shard) != hashes.get(shard):
                raise damaged(f"{shard} is not the file that was written (its sha256 differs)")
            held += 0 if shard.endswith(".json") else _shard_rows(path / shard)
        answers = [shard for shard in info["shards"] if shard.endswith(".json")]
        if answers:
            # Sequence level: the split's one JSON list of answers is as written (its sha256), so it holds
            # the rows the manifest recorded with it; CachedTeacher checks that count when it parses the
            # list, the only time the list is parsed.
            if len(answers) != 1 or not isinstance(info.get("rows"), int):
                raise damaged(f"manifest.json lists {len(answers)} answer files and no row count for {split}")
            held += info["rows"]
        if rows is not None and held != rows[split]:
            raise damaged(f"its {split} shards hold {held} rows, the {split} split has {rows[split]}")
        own = info.get("answers")  # top-k log-probs of transfer rows: the teacher's answers they cover
        if own is not None and (own != f"{split}-answers.json" or not (path / own).is_file()
                                or sha256_file(path / own) != hashes.get(own)):
            raise damaged(f"{split}'s answers ({own!r}) are missing or not the file that was written")
        if (split == "transfer" and own is None and manifest.get("task") == "generate"
                and manifest.get("kd_level") != "sequence"):
            raise damaged("its transfer log-probs come without the answers they cover (made by an older kd)")


def _shard_rows(shard: Path) -> int:
    """Rows in one safetensors shard, from its header alone."""
    from safetensors import safe_open

    with safe_open(shard, "pt") as handle:
        name = "lengths" if "lengths" in handle.keys() else "logits"
        return handle.get_slice(name).get_shape()[0]


def id_dtype(vocab_size: int) -> "torch.dtype":
    """Token ids are stored as uint16 when every id fits (vocabularies up to 65,536), else int32."""
    import torch

    return torch.uint16 if vocab_size <= 65_536 else torch.int32


def _id_bits(ids: "torch.Tensor") -> int:
    return 8 * ids.element_size()  # 16 (uint16) or 32 (int32)


def pack_topk(logprobs: "torch.Tensor", ids: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Fold the last ``k // bits`` ids of each row into the sign bits of its fp16 log-probs.

    ``logprobs`` [N, k] fp16, all <= 0; ``ids`` [N, k] in the stored id dtype (``bits`` wide).
    Returns the fp16 log-probs with their sign bits replaced by those ids' bits (low bit first,
    sign bit set = 1) and the ids not folded, [N, k - k // bits]. ``unpack_topk`` undoes it exactly.
    """
    import torch

    if bool((logprobs > 0).any()):
        raise ValueError("a log-probability is positive; its sign bit cannot carry an id")
    rows, k = logprobs.shape
    bits = _id_bits(ids)
    folded = k // bits
    if not folded:
        return logprobs, ids
    magnitude = logprobs.view(torch.int16).to(torch.int32) & 0x7FFF
    carried = ids[:, k - folded :].to(torch.int64) & ((1 << bits) - 1)  # int32 ids are >= 0: their top bit is 0
    id_bits = ((carried.unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(rows, folded * bits).to(torch.int32)
    magnitude[:, : folded * bits] |= id_bits << 15
    raw = torch.where(magnitude >= 0x8000, magnitude - 0x10000, magnitude).to(torch.int16)
    return raw.view(torch.float16), ids[:, : k - folded].contiguous()


def unpack_topk(logprobs: "torch.Tensor", ids: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """The inverse of ``pack_topk``: fp16 log-probs [N, k] (every sign negative again) and ids [N, k]."""
    import torch

    rows, k = logprobs.shape
    bits = _id_bits(ids)
    folded = k - ids.shape[1]
    if folded != k // bits:
        raise CacheError(f"a cache shard holds {ids.shape[1]} ids for {k} log-probs",
                         "run `kd cache-teachers RECIPE` to rebuild it")
    if not folded:
        return logprobs, ids
    raw = logprobs.view(torch.int16).to(torch.int32) & 0xFFFF
    values = ((raw & 0x7FFF) - 0x8000).to(torch.int16).view(torch.float16)  # the sign bit set: -|x|
    id_bits = (raw[:, : folded * bits] >> 15).to(torch.int64).reshape(rows, folded, bits)
    carried = (id_bits << torch.arange(bits)).sum(-1)
    return values, torch.cat([ids, carried.to(ids.dtype)], dim=1)


def shard_bytes_per_token(path: Path, manifest: dict[str, Any]) -> float:
    """What the cache's safetensors shards take on disk (headers and lengths included) per answer token."""
    shards = [name for info in manifest["splits"].values() for name in info["shards"] if name.endswith(".safetensors")]
    return round(sum((path / shard).stat().st_size for shard in shards) / max(manifest.get("tokens") or 0, 1), 2)


# --------------------------------------------------------------------------- building


def build_cache(
    path: Path,
    teacher: LiveTeacher,
    splits: dict[str, list[dict]],
    identity: dict[str, Any],
    batch_size: int,
    progress: Any = None,
    processes: Any = None,
) -> dict[str, Any]:
    """Run ``teacher`` over every split and write the cache atomically. Returns the manifest.

    ``processes`` is the Accelerator whose processes share the work (every one of them calls
    ``build_cache`` with the same arguments), or None for this process alone. Each split's batches are
    planned once, from its rows' lengths, exactly as one process runs them; process r of N runs batches
    r, r + N, r + 2N, ... of the plan and leaves their answers in the cache's temporary folder, and the
    main process puts every batch's answers back at its rows, cuts the shards and writes the manifest,
    as one process does: the files are byte for byte those of a one-process build. Every process
    returns the manifest, once the cache is whole.
    """
    started = time.perf_counter()
    manifest = dict(identity, cache_format=CACHE_FORMAT, hidden_layers=teacher.layers, kd_version=__version__,
                    splits={})
    form = _form(teacher, manifest)
    share = _Share(processes, path)
    plans: dict[str, list[list[int]]] = {}
    with share.folder() as tmp:
        for split, rows in splits.items():
            # Length-sorted batches keep padding (wasted work) small; rows are stored in data order.
            plans[split] = plan = length_sorted_batches(measured_lengths(rows, teacher.lengths), batch_size)
            mine = share.batches(plan)
            task_id = (progress.add_task(f"{path.name} {split}", total=sum(len(plan[b]) for b in mine))
                       if progress else None)
            answers = []
            for b in mine:
                chunk = gather(rows, plan[b])
                answers.append(form.answer(teacher(chunk, split), chunk))
                if progress:
                    progress.advance(task_id, len(chunk))
            share.keep(tmp, split, form, answers)
        share.wait()  # every process's answers are in tmp
        if share.main:
            for split, rows in splits.items():
                per_batch, hits, count = share.gather(tmp, split, form, plans[split])
                form.write(tmp, split, rows, in_data_order(plans[split], per_batch), hits, count, manifest)
            share.clean(tmp)
            form.finish(tmp, manifest)
            _record_files(tmp, manifest, started, splits)
    share.wait()  # the main process has renamed the folder: the cache is whole
    return manifest if share.main else read_json(path / "manifest.json")


def _record_files(tmp: Path, manifest: dict[str, Any], started: float, splits: dict[str, list[dict]]) -> None:
    """Sizes, checksums and speed into the manifest, and the manifest last: its presence marks the cache whole."""
    files = sorted(tmp.iterdir())
    manifest["bytes"] = sum(f.stat().st_size for f in files)
    manifest["sha256"] = {f.name: sha256_file(f) for f in files}
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    manifest["rows_per_second"] = round(sum(len(r) for r in splits.values()) / max(manifest["seconds"], 1e-9), 1)
    write_json(tmp / "manifest.json", manifest)


# One batch's answers: one per row, in the batch's order, and its hits and count toward the split's accuracy
# (generate; classify's accuracy is computed from the logits once the split is whole).
_Answers = tuple[list[Any], int, int]
_PARTS = ".parts"  # in the temporary folder: what each process other than the main one answered


class _Share:
    """How the processes building one cache share it. Each split's plan (its length-sorted batches) is
    the same in every process; process r runs batches r, r + N, r + 2N, ... (longest first, so every
    process gets batches about as long as the others'), writes their answers to
    ``TMP/.parts/SPLIT-r.*`` and the main process reads them back, batch by batch. With one process
    (``processes`` None, or one of them) nothing is written but the cache, and nobody waits."""

    def __init__(self, processes: Any, path: Path):
        self.processes, self.path = processes, path
        self.world = processes.num_processes if processes is not None else 1
        self.rank = processes.process_index if processes is not None else 0
        self.main = self.rank == 0
        self.kept: dict[str, list[_Answers]] = {}

    @contextmanager
    def folder(self) -> Iterator[Path]:
        """The temporary folder the cache is written in: the main process makes it (and renames it when
        the block succeeds), and tells the others where it is."""
        from kdcli.runtime import from_main_process

        if self.main:
            with atomic_dir(self.path) as tmp:
                from_main_process(self.processes, str(tmp))
                yield tmp
        else:
            yield Path(from_main_process(self.processes, None))

    def wait(self) -> None:
        if self.world > 1:
            self.processes.wait_for_everyone()

    def batches(self, plan: list[list[int]]) -> list[int]:
        """Which of the plan's batches this process runs."""
        return list(range(self.rank, len(plan), self.world))

    def keep(self, tmp: Path, split: str, form: "_Form", answers: list[_Answers]) -> None:
        """This process's answers to ``split``: held by the main process, written to tmp by the others."""
        if self.main:
            self.kept[split] = answers
            return
        if not answers:  # more processes than batches: the main process reads nothing of this one
            return
        with writing(self.path):
            (tmp / _PARTS).mkdir(exist_ok=True)
            form.save(tmp / _PARTS / f"{split}-{self.rank}", [row for rows, _, _ in answers for row in rows],
                      sum(hits for _, hits, _ in answers), sum(count for _, _, count in answers))

    def gather(self, tmp: Path, split: str, form: "_Form",
               plan: list[list[int]]) -> tuple[list[list[Any]], int, int]:
        """Every batch's answers in the plan's order (from this process's memory and the others' parts),
        and the split's hits and count."""
        own = self.kept.pop(split)
        hits, count = sum(h for _, h, _ in own), sum(c for _, _, c in own)
        parts = {}
        for rank in range(1, min(self.world, len(plan))):  # those that ran a batch
            rows, part_hits, part_count = form.load(tmp / _PARTS / f"{split}-{rank}")
            parts[rank] = iter(rows)
            hits, count = hits + part_hits, count + part_count
        per_batch = []
        for b, index in enumerate(plan):
            rank = b % self.world
            per_batch.append(own[b // self.world][0] if rank == 0 else [next(parts[rank]) for _ in index])
        if any(next(rows, None) is not None for rows in parts.values()):
            raise RuntimeError(f"a process wrote more {split} answers than its batches hold")
        return per_batch, hits, count

    def clean(self, tmp: Path) -> None:
        """The parts are read: only the cache's files stay (the manifest lists and hashes every file)."""
        if (tmp / _PARTS).exists():
            shutil.rmtree(tmp / _PARTS)


class _Form:
    """What a cache stores of a teacher's answers: each batch's answers per row (``answer``), a process's
    rows in a part file and back (``save``, ``load``: exactly the same values), a split's shards and its
    manifest entry (``write``), and what the manifest says of the whole cache (``finish``)."""

    def answer(self, batch: TeacherBatch, chunk: list[dict]) -> _Answers:
        raise NotImplementedError

    def save(self, stem: Path, rows: list[Any], hits: int, count: int) -> None:
        raise NotImplementedError

    def load(self, stem: Path) -> tuple[list[Any], int, int]:
        raise NotImplementedError

    def write(self, tmp: Path, split: str, rows: list[dict], per_row: list[Any], hits: int, count: int,
              manifest: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self, tmp: Path, manifest: dict[str, Any]) -> None:
        pass


def _form(teacher: LiveTeacher, manifest: dict[str, Any]) -> _Form:
    if teacher.model.task != "generate":
        return _Logits(teacher.layers)
    # What CachedTeacher reads the shards by (cache_identity sets both; a bare identity may not).
    manifest.update(task="generate", kd_level=teacher.settings.kd_level)
    return _Greedy() if teacher.settings.kd_level == "sequence" else _TopK(teacher, manifest)


def _save_part(stem: Path, tensors: dict[str, "torch.Tensor"], hits: int, count: int,
               texts: list[str] | None = None) -> None:
    import json

    from safetensors.torch import save_file

    meta = {"hits": str(hits), "count": str(count), **({"texts": json.dumps(texts)} if texts is not None else {})}
    save_file({name: t.contiguous() for name, t in tensors.items()}, stem.with_name(stem.name + ".safetensors"),
              metadata=meta)


def _load_part(stem: Path) -> tuple[dict[str, "torch.Tensor"], int, int, list[str] | None]:
    import json

    from safetensors import safe_open

    with safe_open(stem.with_name(stem.name + ".safetensors"), "pt") as handle:
        meta = handle.metadata()
        texts = json.loads(meta["texts"]) if "texts" in meta else None
        return ({name: handle.get_tensor(name) for name in handle.keys()}, int(meta["hits"]), int(meta["count"]),
                texts)


class _Logits(_Form):
    """classify and choice: each row's logits and pooled hidden states, ``SHARD_ROWS`` rows a shard."""

    def __init__(self, layers: list[int]):
        self.layers = layers

    def answer(self, batch: TeacherBatch, chunk: list[dict]) -> _Answers:
        return [(batch.logits[k].cpu(), {layer: batch.hidden[layer][k].cpu() for layer in self.layers})
                for k in range(len(chunk))], 0, 0

    def save(self, stem: Path, rows: list[Any], hits: int, count: int) -> None:
        import torch

        tensors = {"logits": torch.stack([logits for logits, _ in rows])}
        for layer in self.layers:
            tensors[f"hidden.{layer}"] = torch.stack([hidden[layer] for _, hidden in rows])
        _save_part(stem, tensors, hits, count)

    def load(self, stem: Path) -> tuple[list[Any], int, int]:
        tensors, hits, count, _ = _load_part(stem)
        return [(logits, {layer: tensors[f"hidden.{layer}"][k] for layer in self.layers})
                for k, logits in enumerate(tensors["logits"])], hits, count

    def write(self, tmp: Path, split: str, rows: list[dict], per_row: list[Any], hits: int, count: int,
              manifest: dict[str, Any]) -> None:
        import torch
        from safetensors.torch import save_file

        logits = [row_logits for row_logits, _ in per_row]
        hidden = {layer: [row_hidden[layer] for _, row_hidden in per_row] for layer in self.layers}
        shards = []
        for shard_no, first in enumerate(range(0, len(rows), SHARD_ROWS)):
            last = min(first + SHARD_ROWS, len(rows))
            tensors = {"logits": torch.stack(logits[first:last]).contiguous()}
            for layer in self.layers:
                tensors[f"hidden.{layer}"] = torch.stack(hidden[layer][first:last]).contiguous()
            name = f"{split}-{shard_no:05d}.safetensors"
            save_file(tensors, tmp / name)
            shards.append(name)
        gold = torch.tensor([r["label"] for r in rows])
        predicted = torch.stack(logits).argmax(-1) if rows else gold
        labelled = gold >= 0
        accuracy = float((predicted[labelled] == gold[labelled]).float().mean()) if labelled.any() else None
        manifest["splits"][split] = {"rows": len(rows), "shards": shards, "accuracy": accuracy}


class _TopK(_Form):
    """generate, token level: each answer token's top-k log-probs (fp16) and ids, packed, with each
    row's length, ``SHARD_ROWS`` rows a shard; accuracy: the teacher's top-1 token is the gold one.
    Transfer rows have no gold answer: the teacher's own greedy answers, which its log-probs cover,
    are kept beside the shards (``SPLIT-answers.json``, the manifest's ``answers``), and the split has
    no accuracy."""

    def __init__(self, teacher: LiveTeacher, manifest: dict[str, Any]):
        vocab = teacher.model.vocab_size
        self.k, self.ids = min(teacher.settings.top_k or vocab, vocab), id_dtype(vocab)
        self.tokens = 0
        manifest.update(top_k_stored=self.k, id_dtype=str(self.ids).removeprefix("torch."),
                        tail="implicit: 1 - sum(exp(top-k log-probs))")

    def answer(self, batch: TeacherBatch, chunk: list[dict]) -> _Answers:
        spans, at = [], 0  # the batch's answer tokens, row after row
        texts = batch.texts or [None] * len(batch.lengths)
        for n, text in zip(batch.lengths, texts):
            spans.append((batch.token_logprobs[at : at + n].half().cpu(),
                          batch.token_ids[at : at + n].to(self.ids).cpu(), text))
            at += n
        if batch.texts is not None:  # its own answers: no gold to score against
            return spans, 0, 0
        return spans, int((batch.token_ids[:, 0] == batch.targets).sum()), len(batch.targets)

    def save(self, stem: Path, rows: list[Any], hits: int, count: int) -> None:
        import torch

        texts = [text for _, _, text in rows]
        _save_part(stem, {"logprobs": torch.cat([logprobs for logprobs, _, _ in rows]),
                          "ids": torch.cat([ids for _, ids, _ in rows]),
                          "lengths": torch.tensor([len(logprobs) for logprobs, _, _ in rows], dtype=torch.int64)},
                   hits, count, texts if texts[0] is not None else None)

    def load(self, stem: Path) -> tuple[list[Any], int, int]:
        import torch

        tensors, hits, count, texts = _load_part(stem)
        lengths = tensors["lengths"].tolist()
        return (list(zip(torch.split(tensors["logprobs"], lengths), torch.split(tensors["ids"], lengths),
                         texts or [None] * len(lengths))),
                hits, count)

    def write(self, tmp: Path, split: str, rows: list[dict], per_row: list[Any], hits: int, count: int,
              manifest: dict[str, Any]) -> None:
        import torch
        from safetensors.torch import save_file

        tokens = sum(len(r[0]) for r in per_row)
        self.tokens += tokens
        shards = []
        for shard_no, first in enumerate(range(0, max(len(rows), 1), SHARD_ROWS)):
            part = per_row[first : first + SHARD_ROWS]
            counts = [len(r[0]) for r in part]
            logprobs, ids = pack_topk(
                torch.cat([r[0] for r in part]) if part else torch.zeros(0, self.k, dtype=torch.float16),
                torch.cat([r[1] for r in part]) if part else torch.zeros(0, self.k, dtype=self.ids),
            )
            wide = max(counts, default=0) >= 65_536  # answers that long: int32 lengths for this shard
            tensors = {"logprobs": logprobs, "ids": ids,
                       "lengths": torch.tensor(counts, dtype=torch.int32 if wide else torch.uint16)}
            name = f"{split}-{shard_no:05d}.safetensors"
            save_file({key: value.contiguous() for key, value in tensors.items()}, tmp / name)
            shards.append(name)
        manifest["splits"][split] = {"rows": len(rows), "shards": shards, "accuracy": hits / count if count else None,
                                     "tokens": tokens, "accuracy_kind": "top1_answer_token"}
        if per_row and per_row[0][2] is not None:
            write_json(tmp / f"{split}-answers.json", [text for _, _, text in per_row])
            manifest["splits"][split].update(answers=f"{split}-answers.json", accuracy_kind=None)

    def finish(self, tmp: Path, manifest: dict[str, Any]) -> None:
        manifest["tokens"] = self.tokens
        manifest["bytes_per_token"] = shard_bytes_per_token(tmp, manifest)  # measured on the files


class _Greedy(_Form):
    """generate, sequence level: the teacher's greedy answers, one JSON list a split; accuracy: their
    exact match against the gold aliases."""

    def answer(self, batch: TeacherBatch, chunk: list[dict]) -> _Answers:
        from kdcli.metrics import exact_match

        texts = list(batch.texts)
        hits = int(sum(exact_match(text, ex["answers"]) for text, ex in zip(texts, chunk) if ex["answers"]))
        return texts, hits, sum(1 for ex in chunk if ex["answers"])

    def save(self, stem: Path, rows: list[Any], hits: int, count: int) -> None:
        write_json(stem.with_name(stem.name + ".json"), {"answers": rows, "hits": hits, "count": count})

    def load(self, stem: Path) -> tuple[list[Any], int, int]:
        part = read_json(stem.with_name(stem.name + ".json"))
        return part["answers"], part["hits"], part["count"]

    def write(self, tmp: Path, split: str, rows: list[dict], per_row: list[Any], hits: int, count: int,
              manifest: dict[str, Any]) -> None:
        name = f"{split}-answers.json"
        write_json(tmp / name, per_row)
        manifest["splits"][split] = {"rows": len(rows), "shards": [name], "accuracy": hits / count if count else None,
                                     "tokens": None, "accuracy_kind": "exact_match"}
