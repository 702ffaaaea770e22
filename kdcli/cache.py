"""Teacher caches: run each teacher once, store its outputs, serve them to training.

A cache lives in ``runs/NAME/cache/STAGE/TEACHER/``: safetensors shards of the
teacher's class/option logits (fp32) and, when the hidden-state MSE is on, the
pooled states of the mapped teacher layers, plus ``manifest.json`` naming
everything the outputs depend on. A cache whose manifest differs from what the
recipe would produce is refused, naming the field. The directory is written under
a temporary name and renamed when complete, so a crash never leaves a half cache
that looks whole.

``LiveTeacher`` and ``CachedTeacher`` answer the same call, so the training loop
cannot tell them apart: the loss is the same either way (a test holds them equal).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli import __version__
from kdcli.errors import CacheError
from kdcli.rundir import atomic_dir, read_json, write_json

if TYPE_CHECKING:
    import torch

    from kdcli.models import TaskModel

CACHE_FORMAT = 1
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
)


@dataclass
class TeacherBatch:
    """A teacher's answer for a batch: ``logits`` [B, C]; ``hidden`` teacher layer -> pooled [B, ..., D]."""

    logits: "torch.Tensor"
    hidden: dict[int, "torch.Tensor"] = field(default_factory=dict)


def pooled_layers(output: Any, layers: list[int], pooling: str, batch_size: int) -> dict[int, "torch.Tensor"]:
    """Pool the listed transformer blocks' token states: layer j is ``hidden_states[j + 1]``.

    Multiple-choice encoders see B*C sequences; their pooled states are reshaped to [B, C, D]
    so that a cached row always belongs to one example.
    """
    from kdcli.losses import pool_hidden

    pooled = {}
    mask = output.attention_mask
    for layer in layers:
        states = pool_hidden(output.hidden_states[layer + 1], mask, pooling)
        pooled[layer] = states.reshape(batch_size, -1, states.shape[-1]).squeeze(1)
    return pooled


class LiveTeacher:
    """Runs the teacher model on each batch (eval mode, no gradients)."""

    def __init__(self, model: "TaskModel", layers: list[int], pooling: str, max_length: int, template: str | None):
        self.model = model
        self.layers = sorted(set(layers))
        self.pooling = pooling
        self.max_length = max_length
        self.template = template
        self.model.model.eval()

    def __call__(self, examples: list[dict], split: str) -> TeacherBatch:
        import torch

        with torch.no_grad():
            batch = self.model.encode(examples, self.max_length, self.template)
            output = self.model.forward(batch, output_hidden_states=bool(self.layers))
            hidden = pooled_layers(output, self.layers, self.pooling, len(examples)) if self.layers else {}
        return TeacherBatch(output.logits.float(), {k: v.float() for k, v in hidden.items()})


class CachedTeacher:
    """Reads a verified cache; rows are addressed by each example's ``idx`` in its split."""

    def __init__(self, path: Path, device: "torch.device | str" = "cpu"):
        from safetensors.torch import load_file

        self.path = path
        self.manifest = read_json(path / "manifest.json")
        self.device = device
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        for split, info in self.manifest["splits"].items():
            parts = [load_file(path / shard) for shard in info["shards"]]
            import torch

            self.tensors[split] = {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else {}

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["hidden_layers"])

    def __call__(self, examples: list[dict], split: str) -> TeacherBatch:
        import torch

        if split not in self.tensors:
            raise CacheError(
                f"the cache at {self.path} has no '{split}' split",
                "run `kd cache-teachers RECIPE` again",
            )
        rows = torch.tensor([ex["idx"] for ex in examples])
        stored = self.tensors[split]
        hidden = {layer: stored[f"hidden.{layer}"][rows].to(self.device) for layer in self.layers}
        return TeacherBatch(stored["logits"][rows].to(self.device), hidden)


def expected_manifest(
    *,
    teacher_ref: str,
    revision: str | None,
    weights: str,
    tokenizer: str,
    data_fingerprint: str,
    task: str,
    num_classes: int,
    quantisation: str,
    dtype: str,
    hidden_layers: list[int],
    pooling: str,
    max_length: int,
    template: str | None,
) -> dict[str, Any]:
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
        "hidden_layers": sorted(set(hidden_layers)),
        "pooling": pooling,
        "max_length": max_length,
        "template": template,
    }


def check_cache(path: Path, expected: dict[str, Any], teacher_name: str) -> None:
    """Raise CacheError unless ``path`` holds a complete cache made for exactly ``expected``."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CacheError(
            f"no complete cache for teacher '{teacher_name}' at {path}",
            "run `kd cache-teachers RECIPE` (or let `kd distill` use the live teacher)",
        )
    try:
        manifest = read_json(manifest_path)
    except ValueError:
        raise CacheError(f"the cache manifest {manifest_path} is not valid JSON", "run `kd cache-teachers RECIPE` to rebuild it") from None
    for key in IDENTITY_FIELDS:
        if manifest.get(key) != expected.get(key):
            raise CacheError(
                f"the cache for teacher '{teacher_name}' was made with {key} = {manifest.get(key)!r}, "
                f"but the recipe now gives {expected.get(key)!r}",
                "run `kd cache-teachers RECIPE` to rebuild it",
            )
    for split in SPLITS:
        for shard in manifest.get("splits", {}).get(split, {}).get("shards", []):
            if not (path / shard).is_file():
                raise CacheError(f"the cache for teacher '{teacher_name}' is missing {shard}", "run `kd cache-teachers RECIPE` to rebuild it")


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
    manifest = dict(identity, hidden_layers=teacher.layers, kd_version=__version__, splits={})
    with atomic_dir(path) as tmp:
        for split, rows in splits.items():
            # Sorting by length keeps padding (wasted work) small; outputs go back to row order.
            order = sorted(range(len(rows)), key=lambda i: len(rows[i]["text"]))
            task_id = progress.add_task(f"{path.name} {split}", total=len(rows)) if progress else None
            logits: list[torch.Tensor | None] = [None] * len(rows)
            hidden: dict[int, list[torch.Tensor | None]] = {layer: [None] * len(rows) for layer in teacher.layers}
            for start in range(0, len(rows), batch_size):
                index = order[start : start + batch_size]
                answer = teacher([rows[i] for i in index], split)
                for k, i in enumerate(index):
                    logits[i] = answer.logits[k].cpu()
                    for layer in teacher.layers:
                        hidden[layer][i] = answer.hidden[layer][k].cpu()
                if progress:
                    progress.advance(task_id, len(index))
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
        manifest["bytes"] = sum(f.stat().st_size for f in tmp.iterdir())
        manifest["seconds"] = round(time.perf_counter() - started, 3)
        manifest["rows_per_second"] = round(sum(len(r) for r in splits.values()) / max(manifest["seconds"], 1e-9), 1)
        write_json(tmp / "manifest.json", manifest)
    return manifest
