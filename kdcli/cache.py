"""Teacher caches: run each teacher once, store its outputs, serve them to training.

A cache lives in ``runs/NAME/cache/STAGE/TEACHER/``: safetensors shards of the
teacher's class/option logits (fp32) and, when the hidden-state MSE is on, the
pooled states of the mapped teacher layers, plus ``manifest.json`` naming
everything the outputs depend on. A cache whose manifest differs from what the
recipe would produce is refused, naming the field. The directory is written under
a temporary name and renamed when complete, so a crash never leaves a half cache
that looks whole.

The teacher runs over each split in length-sorted batches (``kdcli.batching``: little padding),
and every row is stored at its index in the split, whatever batch it ran in.

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
answers in the same form (fp16-rounded top k), so live and cached losses agree. With
``kd_level = "sequence"`` the cache holds the teacher's greedy answers instead
(``SPLIT-answers.json``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from kdcli import __version__
from kdcli.batching import in_data_order, length_sorted_batches
from kdcli.errors import CacheError
from kdcli.job import TeacherSettings
from kdcli.rundir import atomic_dir, read_json, sha256_file, write_json
from kdcli.tasks import TeacherBatch, task_kind

if TYPE_CHECKING:
    import torch

    from kdcli.models import TaskModel

CACHE_FORMAT = 3  # 2: generate shards hold per-row lengths and ids folded into the log-probs' sign bits;
#                  3: the manifest holds each shard's sha256
SHARD_ROWS = 65_536
SPLITS = ("train", "validation")
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
    """Reads a verified cache; rows are addressed by each example's ``idx`` in its split."""

    def __init__(self, path: Path, device: "torch.device | str" = "cpu"):
        from safetensors.torch import load_file

        self.path = path
        self.manifest = read_json(path / "manifest.json")
        if self.manifest.get("cache_format") != CACHE_FORMAT:  # check_cache refuses it first; never misread one
            raise CacheError(
                f"the cache at {path} has format {self.manifest.get('cache_format')!r}, this kd reads {CACHE_FORMAT}",
                "run `kd cache-teachers RECIPE` to rebuild it",
            )
        self.device = device
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.answers: dict[str, list[str]] = {}
        try:
            self._load(path, load_file)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # damaged after check_cache
            raise CacheError(f"the cache at {path} cannot be read ({type(exc).__name__}: {exc})",
                             "run `kd cache-teachers RECIPE --force` to rebuild it") from None

    def _load(self, path: Path, load_file) -> None:
        import torch

        for split, info in self.manifest["splits"].items():
            if self.manifest.get("kd_level") == "sequence":
                self.answers[split] = [a for shard in info["shards"] for a in read_json(path / shard)]
                continue
            parts = [load_file(path / shard) for shard in info["shards"]]
            if self.manifest.get("task") == "generate":
                # Shards keep their own row lengths; on load they become global starts and lengths per row.
                logprobs, ids = zip(*(unpack_topk(p["logprobs"], p["ids"]) for p in parts)) if parts else ((), ())
                lengths = (torch.cat([p["lengths"].to(torch.long) for p in parts]) if parts
                           else torch.zeros(0, dtype=torch.long))
                self.tensors[split] = {
                    "logprobs": torch.cat(logprobs) if parts else torch.zeros(0),
                    "ids": torch.cat(ids) if parts else torch.zeros(0),
                    "starts": lengths.cumsum(0) - lengths,
                    "lengths": lengths,
                }
                continue
            self.tensors[split] = {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else {}

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["hidden_layers"])

    def __call__(self, examples: list[dict], split: str) -> TeacherBatch:
        import torch

        if split not in self.tensors and split not in self.answers:
            raise CacheError(
                f"the cache at {self.path} has no '{split}' split",
                "run `kd cache-teachers RECIPE` again",
            )
        if split in self.answers:
            return TeacherBatch(texts=[self.answers[split][ex["idx"]] for ex in examples])
        if self.manifest.get("task") == "generate":
            stored = self.tensors[split]
            spans = [(int(stored["starts"][ex["idx"]]), int(stored["lengths"][ex["idx"]])) for ex in examples]
            index = (torch.cat([torch.arange(start, start + n) for start, n in spans]) if spans
                     else torch.zeros(0, dtype=torch.long))
            return TeacherBatch(
                token_logprobs=stored["logprobs"][index].float().to(self.device),
                token_ids=stored["ids"][index].to(torch.long).to(self.device),
                lengths=[n for _, n in spans],
            )
        rows = torch.tensor([ex["idx"] for ex in examples])
        stored = self.tensors[split]
        hidden = {layer: stored[f"hidden.{layer}"][rows].to(self.device) for layer in self.layers}
        return TeacherBatch(stored["logits"][rows].to(self.device), hidden)


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
            held += _shard_rows(path / shard)
        if rows is not None and held != rows[split]:
            raise damaged(f"its {split} shards hold {held} rows, the {split} split has {rows[split]}")


def _shard_rows(shard: Path) -> int:
    """Rows in one shard, from the safetensors header alone (or the answers' JSON list)."""
    from safetensors import safe_open

    if shard.suffix == ".json":
        return len(read_json(shard))
    with safe_open(shard, "pt") as handle:
        name = "lengths" if "lengths" in handle.keys() else "logits"
        return handle.get_slice(name).get_shape()[0]


def build_cache(
    path: Path,
    teacher: LiveTeacher,
    splits: dict[str, list[dict]],
    identity: dict[str, Any],
    batch_size: int,
    progress: Any = None,
) -> dict[str, Any]:
    """Run ``teacher`` over every split and write the cache atomically. Returns the manifest."""
    import torch
    from safetensors.torch import save_file

    started = time.perf_counter()
    manifest = dict(identity, cache_format=CACHE_FORMAT, hidden_layers=teacher.layers, kd_version=__version__,
                    splits={})
    if teacher.model.task == "generate":
        return _build_generate_cache(path, teacher, splits, manifest, batch_size, progress, started)
    with atomic_dir(path) as tmp:
        for split, rows in splits.items():
            # Length-sorted batches keep padding (wasted work) small; rows are stored in data order.
            batches = length_sorted_batches(teacher.lengths(rows), batch_size)
            task_id = progress.add_task(f"{path.name} {split}", total=len(rows)) if progress else None
            answers = []
            for index in batches:
                answer = teacher([rows[i] for i in index], split)
                answers.append([(answer.logits[k].cpu(), {layer: answer.hidden[layer][k].cpu()
                                                         for layer in teacher.layers}) for k in range(len(index))])
                if progress:
                    progress.advance(task_id, len(index))
            per_row = in_data_order(batches, answers)
            logits = [row_logits for row_logits, _ in per_row]
            hidden = {layer: [row_hidden[layer] for _, row_hidden in per_row] for layer in teacher.layers}
            shards = []
            for shard_no, first in enumerate(range(0, len(rows), SHARD_ROWS)):
                last = min(first + SHARD_ROWS, len(rows))
                tensors = {"logits": torch.stack(logits[first:last]).contiguous()}
                for layer in teacher.layers:
                    tensors[f"hidden.{layer}"] = torch.stack(hidden[layer][first:last]).contiguous()
                name = f"{split}-{shard_no:05d}.safetensors"
                save_file(tensors, tmp / name)
                shards.append(name)
            gold = torch.tensor([r["label"] for r in rows])
            predicted = torch.stack(logits).argmax(-1) if rows else gold
            labelled = gold >= 0
            accuracy = float((predicted[labelled] == gold[labelled]).float().mean()) if labelled.any() else None
            manifest["splits"][split] = {"rows": len(rows), "shards": shards, "accuracy": accuracy}
        _record_files(tmp, manifest, started, splits)
    return manifest


def _record_files(tmp: Path, manifest: dict[str, Any], started: float, splits: dict[str, list[dict]]) -> None:
    """Sizes, checksums and speed into the manifest, and the manifest last: its presence marks the cache whole."""
    files = sorted(tmp.iterdir())
    manifest["bytes"] = sum(f.stat().st_size for f in files)
    manifest["sha256"] = {f.name: sha256_file(f) for f in files}
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    manifest["rows_per_second"] = round(sum(len(r) for r in splits.values()) / max(manifest["seconds"], 1e-9), 1)
    write_json(tmp / "manifest.json", manifest)


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


def _build_generate_cache(path: Path, teacher: LiveTeacher, splits: dict[str, list[dict]], manifest: dict[str, Any],
                          batch_size: int, progress: Any, started: float) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from kdcli.metrics import exact_match

    vocab = teacher.model.vocab_size
    sequence = teacher.settings.kd_level == "sequence"
    # What CachedTeacher reads the shards by (cache_identity sets both; a bare identity may not).
    manifest.update(task="generate", kd_level=teacher.settings.kd_level)
    k = min(teacher.settings.top_k or vocab, vocab)
    if not sequence:
        manifest.update(top_k_stored=k, id_dtype=str(id_dtype(vocab)).removeprefix("torch."),
                        tail="implicit: 1 - sum(exp(top-k log-probs))")
    tokens_total = 0
    with atomic_dir(path) as tmp:
        for split, rows in splits.items():
            # Length-sorted batches keep padding (wasted work) small; rows are stored in data order.
            batches = length_sorted_batches(teacher.lengths(rows), batch_size)
            task_id = progress.add_task(f"{path.name} {split}", total=len(rows)) if progress else None
            answers: list[list[Any]] = []
            hits = count = 0
            for index in batches:
                chunk = [rows[i] for i in index]
                answer = teacher(chunk, split)
                if sequence:
                    answers.append(list(answer.texts))
                    hits += sum(exact_match(text, ex["answers"])
                                for text, ex in zip(answer.texts, chunk) if ex["answers"])
                    count += sum(1 for ex in chunk if ex["answers"])
                else:
                    spans, at = [], 0  # the batch's answer tokens, row after row
                    for n in answer.lengths:
                        spans.append((answer.token_logprobs[at : at + n].half().cpu(),
                                      answer.token_ids[at : at + n].to(id_dtype(vocab)).cpu()))
                        at += n
                    answers.append(spans)
                    hits += int((answer.token_ids[:, 0] == answer.targets).sum())
                    count += len(answer.targets)
                if progress:
                    progress.advance(task_id, len(index))
            per_row = in_data_order(batches, answers)
            shards = []
            if sequence:
                name = f"{split}-answers.json"
                write_json(tmp / name, per_row)
                shards.append(name)
                tokens = None
            else:
                tokens = sum(len(r[0]) for r in per_row)
                tokens_total += tokens
                for shard_no, first in enumerate(range(0, max(len(rows), 1), SHARD_ROWS)):
                    part = per_row[first : first + SHARD_ROWS]
                    counts = [len(r[0]) for r in part]
                    logprobs, ids = pack_topk(
                        torch.cat([r[0] for r in part]) if part else torch.zeros(0, k, dtype=torch.float16),
                        torch.cat([r[1] for r in part]) if part else torch.zeros(0, k, dtype=id_dtype(vocab)),
                    )
                    wide = max(counts, default=0) >= 65_536  # answers that long: int32 lengths for this shard
                    tensors = {"logprobs": logprobs, "ids": ids,
                               "lengths": torch.tensor(counts, dtype=torch.int32 if wide else torch.uint16)}
                    name = f"{split}-{shard_no:05d}.safetensors"
                    save_file({key: value.contiguous() for key, value in tensors.items()}, tmp / name)
                    shards.append(name)
            # token level: the teacher's top-1 token equals the gold answer token (teacher forcing);
            # sequence level: exact match of its greedy answers against the aliases.
            accuracy = hits / count if count else None
            manifest["splits"][split] = {"rows": len(rows), "shards": shards, "accuracy": accuracy, "tokens": tokens,
                                         "accuracy_kind": "exact_match" if sequence else "top1_answer_token"}
        if not sequence:
            manifest["tokens"] = tokens_total
            manifest["bytes_per_token"] = shard_bytes_per_token(tmp, manifest)  # measured on the files
        _record_files(tmp, manifest, started, splits)
    return manifest
