"""LoRA (peft, the optional `lora` extra): adapters trained on a frozen student, and teachers that are
a base model plus an adapter.

A LoRA student trains only its adapter matrices (and, for a classifier, its new head). It is saved
twice: merged into the base weights in the output folder itself, so that every other kd command
and ``from_pretrained`` load it as a plain model, and as the adapter alone under ``adapter/``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import ModelError
from kdcli.recipe import LoraConfig

if TYPE_CHECKING:
    from torch import nn

ADAPTER_DIR = "adapter"
# The heads LoRA is wired for here; peft's task type also makes a classifier's head trainable.
TASK_TYPES = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "sequence-classification": "SEQ_CLS"}


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ModelError("LoRA adapters need the peft package, which is not installed",
                         "pip install 'kdcli[lora]' (or pip install peft)") from None
    return peft


def with_lora(model: "nn.Module", kind: str, config: LoraConfig) -> "nn.Module":
    """``model`` with trainable LoRA adapters on ``config.target_modules`` and everything else frozen."""
    if kind not in TASK_TYPES:
        raise ModelError(f"student.lora: a {kind} student cannot take LoRA adapters in kd",
                         f"use a student with a {', '.join(TASK_TYPES)} head, or drop student.lora")
    peft = _peft()
    settings = peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=config.target_modules, task_type=TASK_TYPES[kind])
    try:
        return peft.get_peft_model(model, settings)
    except ValueError as exc:  # e.g. target modules the model does not have
        raise ModelError(f"student.lora: {exc}", "list module names the student has, or use 'all-linear'") from None


def is_lora(model: "nn.Module") -> bool:
    return hasattr(model, "peft_config")


def save_merged(model: "nn.Module", path: Path) -> None:
    """The adapter under ``path/adapter/`` and, in ``path``, a copy with the adapter merged in."""
    model.save_pretrained(path / ADAPTER_DIR)
    copy.deepcopy(model).merge_and_unload().save_pretrained(path)


def merge_adapter(model: "nn.Module", adapter: str, ref: str) -> "nn.Module":
    """``model`` with the adapter in the folder ``adapter`` merged into its weights."""
    peft = _peft()
    try:
        return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"model {ref}: the adapter {adapter} cannot be applied ({type(exc).__name__}: {exc})",
                         "point `adapter` at a folder peft saved (adapter_config.json and the adapter weights) "
                         "for this base model") from None
