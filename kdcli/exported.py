"""Exported models: a model kd trained, written for deployment as ONNX or as PyTorch with int8 linear layers,
and read back as a ``TaskModel`` whose forward runs the written files, so that the task kinds evaluate and time
it like any other model (`kd eval`, `kd bench` and `kd compare` on the role ``export:ROLE-FORMAT``).

Formats (``FORMATS``):

- ``onnx``: the transformers model's forward, called with the tensors ``TaskModel.class_logits`` gives it, as one
  ONNX graph with a dynamic batch size and sequence length, from torch.onnx's exporter (torch.export; the
  TorchScript exporter is deprecated, and it would keep the branches the example batch took). The graph outputs
  the head's ``logits``; kd picks a decoder's option tokens from them as it does for any model. Task classify and
  choice, with a sequence-classification, multiple-choice or causal head: torch 2.13's exporter fails on T5, and
  generation is a decoding loop, not one graph.
- ``onnx-int8``: that graph after ONNX Runtime's dynamic quantisation: the weights of its MatMul and Gather
  (embedding) nodes int8, one scale per output channel (a channel of small weights is not rounded on the scale of
  the tensor's largest), activations quantised as they run.
- ``torch-int8``: the transformers model with its nn.Linear layers dynamically quantised to int8, one scale per
  output channel (``torch.ao.quantization.quantize_dynamic``: deprecated in torch 2.13 but working, and torch has no
  other int8 path on the CPU), except the head, whose precision decides the answer (a classifier, a decoder's output
  embeddings). Every task and head, generation included. Its state dict is saved with ``torch.save`` and read with
  ``weights_only``.

An export folder (``runs/NAME/export/ROLE-FORMAT/``, written by ``kdcli.export``) holds the weights
(``model.onnx`` or ``model-int8.pt``), ``config.json``, the tokenizer, ``kd.json`` and ``export.json``: the format,
what the loader needs (inputs, option tokens, parameters), the source model's fingerprint and the check of the
export against it. ``done.json`` (``rundir.mark_done``) ends it. ONNX Runtime and torch run the exports on the CPU.

Torch is imported inside the functions: ``kdcli.roles`` reads ``FORMATS`` to parse a role, and `kd compare`
parses roles without loading torch.
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from kdcli.errors import ModelError
from kdcli.rundir import done_state, read_json

if TYPE_CHECKING:
    import torch
    import transformers

    from kdcli.models import TaskModel

MANIFEST = "export.json"
# protobuf's limit on one message: a larger graph needs its weights in a second file, which kd does not write.
ONNX_LIMIT_BYTES = 2 << 30


class ExportFormat(ABC):
    """One format: which models it can write, how it writes one, and what stands in for the transformers model
    when the files are read back."""

    name: str
    label: str  # how a table describes the format
    weights: str  # the file that holds the weights

    def problem(self, model: "TaskModel") -> str | None:
        """Why this format cannot hold ``model`` (None: it can)."""
        return None

    @abstractmethod
    def write(self, model: "TaskModel", example: dict[str, "torch.Tensor"], folder: Path) -> dict[str, Any]:
        """Write ``model``'s weights into ``folder``; ``example`` is a batch as ``class_logits`` reads it. Returns
        what the loader needs besides (the manifest's ``graph``)."""

    @abstractmethod
    def runnable(self, folder: Path, manifest: dict[str, Any], config: "transformers.PretrainedConfig",
                 kind: str) -> Any:
        """What runs in the place of the transformers model, read from ``folder``."""


# --------------------------------------------------------------------------- ONNX


class Onnx(ExportFormat):
    weights = "model.onnx"

    def __init__(self, quantized: bool) -> None:
        self.quantized = quantized
        self.name = "onnx-int8" if quantized else "onnx"
        self.label = "ONNX int8" if quantized else "ONNX"

    def problem(self, model: "TaskModel") -> str | None:
        missing = _missing_onnx_packages()
        if missing:
            return (f"{', '.join(missing)} not installed (pip install onnx onnxruntime onnxscript, kd's `export` "
                    "extra)")
        if model.task == "generate":
            return "task generate answers by decoding one token after another, which one ONNX graph does not do"
        if model.kind == "seq2seq":
            return "torch.onnx (torch 2.13) fails on seq2seq (T5-style) models"
        size = sum(p.numel() * p.element_size() for p in model.model.parameters())
        if size >= ONNX_LIMIT_BYTES:
            return f"its weights take {size / 2**30:.1f} GB, and one ONNX file holds at most 2 GB"
        return None

    def write(self, model: "TaskModel", example: dict[str, "torch.Tensor"], folder: Path) -> dict[str, Any]:
        names, tensors, constants = _forward_inputs(model, example)
        graph = folder / self.weights
        plain = folder / ".fp32.onnx" if self.quantized else graph
        _export_graph(model.model, names, tensors, constants, plain)
        if self.quantized:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with _quietly():  # it advises its pre-processing, whose shape inference fails on these graphs
                quantize_dynamic(plain, graph, per_channel=True, weight_type=QuantType.QInt8)
            plain.unlink()
        return {"inputs": names, "constants": constants}

    def runnable(self, folder: Path, manifest: dict[str, Any], config: "transformers.PretrainedConfig",
                 kind: str) -> "OnnxModel":
        if "onnxruntime" in _missing_onnx_packages():
            raise ModelError(f"{folder} is an ONNX graph, and ONNX Runtime runs it: onnxruntime is not installed",
                             "pip install onnxruntime (or kd's `export` extra)")
        return OnnxModel(folder / self.weights, config, manifest["graph"]["inputs"], manifest["graph"]["constants"])


def _missing_onnx_packages() -> list[str]:
    """What the ONNX formats need and this environment lacks (the `export` extra): torch.onnx writes the graph with
    onnx and onnxscript, onnxruntime quantises and runs it."""
    import importlib.util

    return [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]


def _forward_inputs(model: "TaskModel", example: dict[str, "torch.Tensor"]) -> tuple[list[str], list, dict]:
    """The arguments ``class_logits`` gives the transformers model for ``example``: the tensors' names, the tensors,
    and the other arguments (``use_cache=False``, ...), which the graph fixes."""
    import torch

    seen: dict[str, Any] = {}

    def record(**arguments: Any) -> Any:
        seen.update(arguments)
        return model.model(**arguments)

    with torch.no_grad():
        replace(model, runner=record).class_logits(example)
    names = [name for name, value in seen.items() if isinstance(value, torch.Tensor)]
    constants = {name: value for name, value in seen.items() if name not in names}
    return names, [seen[name] for name in names], constants


def _export_graph(model: "torch.nn.Module", names: list[str], tensors: list, constants: dict, path: Path) -> None:
    """``model``'s logits as an ONNX graph of inputs ``names``, dynamic in batch size (dimension 0) and sequence
    length (the last dimension of every tensor as long as the attention mask; a multiple-choice input's options stay
    fixed, and so does a decoder start of one token)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs)), **constants).logits

    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    width = tensors[names.index("attention_mask")].shape[-1]
    dynamic = tuple({0: batch, **({t.ndim - 1: length} if t.shape[-1] == width else {})} for t in tensors)
    try:
        with _quietly():
            torch.onnx.export(Logits().eval(), tuple(tensors), str(path), dynamo=True, verbose=False,
                              input_names=names, output_names=["logits"], dynamic_shapes={"inputs": dynamic},
                              external_data=False)
    except Exception as exc:  # torch.onnx raises its own error types, one per step of the export
        summary = next((line for line in str(exc).splitlines() if line.startswith("<class")), str(exc).split("\n")[0])
        raise ModelError(f"torch.onnx could not export {type(model).__name__}: {summary}",
                         "export it as --format torch-int8, which runs the model's own PyTorch code") from exc


@contextmanager
def _quietly() -> Iterator[None]:
    """Without the warnings and log lines the exporter and the quantisers print for their own developers
    (deprecations inside torch and transformers, torchvision's operators not registered, advice on
    pre-processing): a kd user can act on none of them."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@dataclass
class Logits:
    """A stand-in's output, read as a transformers model's: its logits, and no hidden states."""

    logits: "torch.Tensor"
    hidden_states: None = None
    encoder_hidden_states: None = None


class OnnxModel:
    """An ONNX Runtime session where kd expects a transformers model: called with the arguments the model's forward
    took when it was exported, it returns their logits. Not an nn.Module: it has no parameters to move or train, and
    runs on the CPU, with as many threads as torch uses when it is called (`kd bench`'s ``threads``)."""

    training = False

    def __init__(self, graph: Path, config: "transformers.PretrainedConfig", inputs: list[str],
                 constants: dict[str, Any]) -> None:
        self.graph, self.config, self.inputs, self.constants = graph, config, inputs, constants
        self.name_or_path = str(graph.parent)
        self._session: Any = None
        self._threads = 0

    @property
    def device(self) -> "torch.device":
        import torch

        return torch.device("cpu")

    @property
    def dtype(self) -> "torch.dtype":
        import torch

        return torch.float32

    def to(self, *args: Any, **kwargs: Any) -> "OnnxModel":
        return self

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        if mode:
            raise ModelError(f"{self.name_or_path} is an exported model, which cannot be trained",
                             "train the model it was exported from")
        return self

    def __call__(self, **arguments: Any) -> Logits:
        import torch

        fixed = {name: value for name, value in arguments.items() if not isinstance(value, torch.Tensor)}
        tensors = sorted(set(arguments) - set(fixed))
        if tensors != sorted(self.inputs) or any(self.constants.get(k) != v for k, v in fixed.items()):
            raise ModelError(f"the ONNX graph {self.graph} takes {', '.join(self.inputs)} with {self.constants}; "
                             f"asked with {', '.join(tensors)} and {fixed}",
                             "export the model again with this kd version; an export gives logits, not hidden states")
        feed = {name: arguments[name].detach().cpu().numpy() for name in self.inputs}
        (logits,) = self._session_for(torch.get_num_threads()).run(["logits"], feed)
        return Logits(torch.from_numpy(logits))

    def _session_for(self, threads: int) -> Any:
        if self._session is None or threads != self._threads:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors only: it warns about nodes it places on the CPU by choice
            self._session = onnxruntime.InferenceSession(str(self.graph), options,
                                                         providers=["CPUExecutionProvider"])
            self._threads = threads
        return self._session


# --------------------------------------------------------------------------- torch int8


class TorchInt8(ExportFormat):
    name = "torch-int8"
    label = "PyTorch int8"
    weights = "model-int8.pt"

    def write(self, model: "TaskModel", example: dict[str, "torch.Tensor"], folder: Path) -> dict[str, Any]:
        import torch

        quantized = _quantized(model.model, inplace=False)  # the model itself is what the export is checked against
        torch.save(quantized.state_dict(), folder / self.weights)
        return {"int8_layers": sum(1 for module in quantized.modules() if _is_int8(module))}

    def runnable(self, folder: Path, manifest: dict[str, Any], config: "transformers.PretrainedConfig",
                 kind: str) -> "torch.nn.Module":
        import torch

        from kdcli.models import HEAD_CLASSES

        model = _quantized(HEAD_CLASSES[kind].from_config(config), inplace=True)
        with _quietly():  # the quantized tensors' deprecation (see the module docstring)
            model.load_state_dict(torch.load(folder / self.weights, weights_only=True))
        return model.eval()


def _quantized(model: "torch.nn.Module", inplace: bool) -> "torch.nn.Module":
    """``model`` with every nn.Linear but the head's dynamically quantised to int8, one scale per output channel."""
    import torch

    from kdcli.models import HEAD_MODULES

    head = model.get_output_embeddings()
    with _quietly():  # torch.ao.quantization's deprecations (see the module docstring)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        layers = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and module is not head
                  and not set(name.split(".")) & set(HEAD_MODULES)}
        return quantize_dynamic(model, layers, dtype=torch.qint8, inplace=inplace)


def _is_int8(module: "torch.nn.Module") -> bool:
    with _quietly():
        from torch.ao.nn.quantized.dynamic import Linear

    return isinstance(module, Linear)


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (Onnx(quantized=False), Onnx(quantized=True), TorchInt8())}


def export_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise ModelError(f"'{name}' is not an export format", f"use one of: {', '.join(FORMATS)}")
    return FORMATS[name]


# --------------------------------------------------------------------------- writing and reading


def write(model: "TaskModel", fmt: ExportFormat, example: dict[str, "torch.Tensor"], folder: Path,
          label_names: list[str] | None) -> dict[str, Any]:
    """``model`` in ``fmt`` in ``folder``, with its config and tokenizer; returns what ``load`` reads of the manifest
    (the caller adds where it came from and writes it)."""
    from kdcli.models import parameter_count

    model.model.config.save_pretrained(folder)
    model.save_companions(folder, label_names)
    return {"format": fmt.name, "kind": model.kind, "task": model.task, "num_classes": model.num_classes,
            "parameters": parameter_count(model), "option_token_ids": model.option_token_ids,
            "prompt_suffix": model.prompt_suffix, "graph": fmt.write(model, example, folder)}


def load(folder: Path) -> "TaskModel":
    """The export in ``folder`` as a ``TaskModel`` that runs on the CPU."""
    import transformers

    from kdcli.models import TaskModel, load_tokenizer
    from kdcli.recipe import ModelSpec

    manifest = read_json(folder / MANIFEST)
    fmt = FORMATS[manifest["format"]]
    config = transformers.AutoConfig.from_pretrained(folder)
    runnable = fmt.runnable(folder, manifest, config, manifest["kind"])
    return TaskModel(runnable, load_tokenizer(ModelSpec(ref=str(folder))), manifest["kind"], manifest["task"],
                     manifest["num_classes"], manifest["option_token_ids"],
                     prompt_suffix=manifest["prompt_suffix"], cpu_only=True,
                     source_parameters=manifest["parameters"])


def whole(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest of a whole export in ``folder``; else None, and what is wrong with it where it is damaged
    (None where there is no export)."""
    try:
        manifest = read_json(folder / MANIFEST)
    except (OSError, ValueError):
        return None, None
    finished, damage = done_state(folder, manifest.get("fingerprint", "") if isinstance(manifest, dict) else "")
    if not finished:
        return None, damage or "done.json is missing or does not match export.json"
    return manifest, None
