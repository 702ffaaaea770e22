"""Loading models for a task, and one interface over every head.

``load_task_model`` turns a recipe's model spec into a ``TaskModel``: a transformers
model with its tokenizer and what its head needs (the option tokens of a decoder that
answers a choice). The task kinds (``kdcli.tasks``) turn examples into tensors and tensors
into what the loss reads, through the head-level operations here: ``tokenize``,
``encode_pairs``, ``class_logits``, ``encode_prompts``, ``generate_ids`` and ``generate``.

Heads (``kind``):

- ``sequence-classification``: text -> logits over classes (classify).
- ``multiple-choice``: each (text, option) pair is scored by an encoder -> logits over options.
- ``seq2seq`` / ``causal``: a prompt lists the numbered options; the logits of the LM's
  next token at the answer position, restricted to the tokens "1".."N", are the logits
  over options.
- ``seq2seq`` / ``causal`` for task ``generate``: next-token logits over the shared vocabulary
  only (``vocab_size``: an embedding matrix padded beyond the tokenizer, as T5's is, is trimmed);
  ``generate`` answers with batched greedy decoding (left padding for causal models), its batches
  sorted by prompt length and its answers returned in the examples' order (``kdcli.batching``).

Layer numbering: layer ``i`` is the output of transformer block ``i`` (0-based), which is
``hidden_states[i + 1]``; ``hidden_states[0]`` is the embeddings output.

Label-count policy: a checkpoint whose classification head was trained for a different
number of labels, or that has no trained head at all, is only accepted when the model is
going to be trained (a student, or a teacher with ``finetune``): its head is then
re-initialised. A teacher used as-is must already fit the task, otherwise its "knowledge"
would be a random head.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from torch import Tensor, nn

from kdcli.batching import gather, in_data_order, length_sorted_batches, measured_lengths
from kdcli.errors import ModelError
from kdcli.lora import is_lora, merge_adapter, save_merged
from kdcli.recipe import HEADS_FOR_TASK, ModelSpec, StudentConfig, model_source

# kd reports what matters itself (a missing head is an error, progress is one rich bar): the
# libraries' own load reports and per-file progress bars would bury it.
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

HEAD_CLASSES = {
    "sequence-classification": transformers.AutoModelForSequenceClassification,
    "multiple-choice": transformers.AutoModelForMultipleChoice,
    "seq2seq": transformers.AutoModelForSeq2SeqLM,
    "causal": transformers.AutoModelForCausalLM,
}
# Module names of classification heads across families.
HEAD_MODULES = ["classifier", "score", "pre_classifier", "qa_outputs", "classification_head", "pooler"]
# Kept in full precision by load_in_8bit/4bit: the heads, tiny, whose precision decides the logits we distil,
# and a decoder's output embeddings, which SmolLM2 and most small LLMs tie to the input embeddings (never
# quantised, so a quantised lm_head would hold no int8 weights and fail at its first call). Naming any module
# replaces transformers' own list, which holds lm_head.
QUANTISATION_SKIPS = [*HEAD_MODULES, "lm_head"]
DEFAULT_TEMPLATE = "{text}\nOptions:\n{options}\nAnswer:"
GENERATE_TEMPLATE = "Question: {text}\nAnswer:"
ANSWER_CUE = "Answer:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


# --------------------------------------------------------------------------- references


def resolve_ref(ref: str, gguf_file: str | None = None, *, tokenizer: bool = False, adapter: bool = False) -> str:
    """Where ``from_pretrained`` should look: an absolute directory, or a Hub id unchanged.

    ``package:MODULE[/subdir]`` is a directory inside an installed package (found without
    importing it); an existing path, or one written like a path, must be a model directory
    (config.json, or ``gguf_file``; tokenizer_config.json for a ``tokenizer`` ref,
    adapter_config.json for an ``adapter``); anything else is taken as a Hub id.
    """
    needed = gguf_file or ("tokenizer_config.json" if tokenizer else "adapter_config.json" if adapter
                           else "config.json")
    source = model_source(ref)
    if source == "package":
        module, _, sub = ref.removeprefix("package:").partition("/")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model {ref}: no installed package named '{module}'",
                hint=f"pip install {module.replace('_', '-')}",
            )
        path = Path(next(iter(spec.submodule_search_locations))) / sub
        _check_model_dir(path, ref, needed)
        return str(path.resolve())
    if source == "path":
        path = Path(ref).expanduser()
        _check_model_dir(path, ref, needed)
        return str(path.resolve())
    return ref


def offline_problem(ref: str, gguf_file: str | None = None, revision: str | None = None) -> str | None:
    """Why ``ref`` cannot be loaded without network, or None: a missing package or folder, or a Hub id
    that is not in the local Hugging Face cache (found without loading anything)."""
    try:
        resolved = resolve_ref(ref, gguf_file)
    except ModelError as exc:
        return exc.message
    if resolved != ref or Path(resolved).is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(ref, gguf_file or "config.json", revision=revision), str):
            return None
    except ValueError as exc:  # HFValidationError: not a Hub id either
        return f"model {ref}: no such folder, and not a Hub id ({exc})"
    return f"model {ref}: not in the local Hugging Face cache; distilling downloads it (needs network)"


def _check_model_dir(path: Path, ref: str, needed: str) -> None:
    if not path.is_dir():
        raise ModelError(f"model {ref}: {path} is not a directory", hint="check the path, or give a Hub id")
    if not (path / needed).is_file():
        present = sorted(p.name for p in path.iterdir())[:10]
        raise ModelError(
            f"model {ref}: {path} has no {needed} (it has: {', '.join(present) or 'nothing'})",
            hint="check gguf_file" if needed.endswith(".gguf") else "point at the folder save_pretrained wrote",
        )


# --------------------------------------------------------------------------- the interface


@dataclass
class TaskOutput:
    logits: Tensor  # [B, C] over classes or options; generate: [B, T, V] next-token logits
    hidden_states: tuple[Tensor, ...] | None  # per layer [B', L, D], embeddings at index 0;
                                              # B' = B*C for multiple-choice
    attention_mask: Tensor  # [B', L], for pooling hidden states
    labels: Tensor | None = None  # generate: [B, T] target token of each logits position, -100 = not an answer token
    token_mask: Tensor | None = None  # generate: [B, T], True at answer tokens (labels != -100)


@dataclass
class TaskModel:
    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    kind: str  # "sequence-classification" | "multiple-choice" | "seq2seq" | "causal"
    task: str  # "classify" | "choice" | "generate"
    num_classes: int
    option_token_ids: list[int] | None = None  # seq2seq/causal choice: the tokens "1".."N"
    max_length: int = 128
    prompt_suffix: str = ""  # appended to decoder prompts so that the option token comes next
    runner: nn.Module | None = None  # what runs forward when it is not `model` itself: a DDP wrapper in training
    answer_max_length: int = 32  # generate: answer tokens (EOS included) kept as targets
    # A model read from `kd export`'s files (kdcli.exported) runs on the CPU (ONNX Runtime, int8 linear layers), and
    # counts the parameters of the model it was exported from: its own weights are not nn.Parameters.
    cpu_only: bool = False
    source_parameters: int | None = None

    @property
    def vocab_size(self) -> int:
        """The token ids the logits cover: the tokenizer's, even when the embedding matrix is padded larger."""
        head = self.model.get_output_embeddings()
        rows = head.weight.shape[0] if head is not None else self.model.config.vocab_size
        return min(len(self.tokenizer), rows)

    @property
    def num_layers(self) -> int:
        """Transformer blocks (the encoder's for seq2seq), not counting the embeddings."""
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ----------------------------------------------------------------- inputs

    def prompt(self, example: dict, template: str | None = None) -> str:
        """generate: the text the model is asked. In chat format (the example has ``messages``) its turns
        rendered by this model's own chat template, ending where the assistant's answer starts; else
        the prompt template filled in."""
        if example.get("messages"):
            return self.chat_text(example["messages"])
        return render_prompt(example, template or GENERATE_TEMPLATE)

    def chat_text(self, turns: list[dict[str, str]], answer: str | None = None) -> str:
        """``turns`` through the tokenizer's chat template: up to the assistant's turn, or with ``answer`` as it."""
        check_chat_template(self.tokenizer, f"model {self.model.name_or_path}")
        if answer is None:
            return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": answer}], tokenize=False)

    def encode_prompts(self, examples: list[dict], max_length: int | None = None,
                       template: str | None = None) -> dict[str, Tensor]:
        """generate: the prompts alone, left-padded for causal models (new tokens follow the last real one),
        and for them a prompt longer than ``max_length`` loses its start, not the end the answer follows
        (a chat template's assistant header)."""
        prompts = [self.prompt(ex, template) for ex in examples]
        sides = self.tokenizer.padding_side, self.tokenizer.truncation_side
        causal = self.kind == "causal"
        self.tokenizer.padding_side = self.tokenizer.truncation_side = "left" if causal else "right"
        try:
            return self.tokenize(prompts, max_length=max_length or self.max_length,
                                 add_special_tokens=_special_tokens(examples))
        finally:
            self.tokenizer.padding_side, self.tokenizer.truncation_side = sides

    def cut_prompt(self, prompt: str, max_length: int, add_special_tokens: bool) -> list[int]:
        """A causal model's tokens of a prompt longer than ``max_length``, cut as ``encode_prompts`` cuts it."""
        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left"
        try:
            return self.tokenizer(prompt, truncation=True, max_length=max_length,
                                  add_special_tokens=add_special_tokens)["input_ids"]
        finally:
            self.tokenizer.truncation_side = side

    def prompt_lengths(self, examples: list[dict], max_length: int | None = None,
                       template: str | None = None, whole: bool = False) -> list[int]:
        """generate: the tokens of each prompt as ``encode_prompts`` gives it to the model (unpadded), or
        ``whole``, before any cut to ``max_length``."""
        prompts = [self.prompt(ex, template) for ex in examples]
        return self.token_counts(prompts, max_length=None if whole else max_length or self.max_length,
                                 add_special_tokens=_special_tokens(examples))

    def generate_ids(self, batch: dict[str, Tensor], max_new_tokens: int) -> Tensor:
        """Greedy decoding of an ``encode_prompts`` batch -> the new tokens [B, <= max_new_tokens]."""
        return self._new_tokens(batch, max_new_tokens, do_sample=False)

    def sample_ids(self, batch: dict[str, Tensor], max_new_tokens: int, temperature: float) -> Tensor:
        """Sampled answers (on-policy KD) to an ``encode_prompts`` batch -> the new tokens [B, <= max_new_tokens]
        after the decoder's start, drawn from the full distribution at ``temperature`` with torch's RNG, in eval
        mode (no dropout), without gradients."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                new = self._new_tokens(batch, max_new_tokens, do_sample=True, temperature=temperature, top_k=0,
                                       top_p=1.0)
        finally:
            self.model.train(was_training)
        return new if self.kind == "causal" else new[:, 1:]

    def _new_tokens(self, batch: dict[str, Tensor], max_new_tokens: int, **decoding: Any) -> Tensor:
        inputs = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        head = self.model.get_output_embeddings()
        rows = head.weight.shape[0] if head is not None else self.model.config.vocab_size
        # Ids past the tokenizer's vocabulary (a padded embedding matrix) are never generated:
        # they decode to nothing, and an untrained student may well favour one.
        padding_ids = list(range(self.vocab_size, rows)) or None
        out = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, num_beams=1, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, suppress_tokens=padding_ids, **decoding,
        )
        return out[:, inputs["input_ids"].shape[1]:] if self.kind == "causal" else out

    def generate(self, examples: list[dict], max_new_tokens: int, max_length: int | None = None,
                 template: str | None = None, batch_size: int = 32,
                 on_batch: Callable[[int], None] | None = None) -> list[str]:
        """Greedy answers (text) for a list of examples, in their order, from batches of ``batch_size``
        examples of similar prompt lengths (``kdcli.batching``); ``on_batch(rows)`` after each batch."""
        was_training = self.model.training
        self.model.eval()
        batches = length_sorted_batches(
            measured_lengths(examples, lambda part: self.prompt_lengths(part, max_length, template)), batch_size)
        answers: list[list[str]] = []
        try:
            with torch.no_grad():
                for index in batches:
                    batch = self.encode_prompts(gather(examples, index), max_length, template)
                    new = self.generate_ids(batch, max_new_tokens)
                    answers.append([clean_answer(t)
                                    for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)])
                    if on_batch is not None:
                        on_batch(len(index))
        finally:
            self.model.train(was_training)
        return in_data_order(batches, answers)

    def tokenize(self, first: list[str], second: list[str] | None = None, *, max_length: int,
                 add_special_tokens: bool = True) -> dict[str, Tensor]:
        return dict(self.tokenizer(first, second, padding=True, truncation=True, max_length=max_length,
                                   return_tensors="pt", add_special_tokens=add_special_tokens))

    def token_counts(self, texts: list[str], *, max_length: int | None, add_special_tokens: bool = True) -> list[int]:
        """The tokens of each text as ``tokenize`` gives it to the model, before padding (None: uncut)."""
        if not texts:
            return []
        encoded = self.tokenizer(texts, truncation=max_length is not None, max_length=max_length,
                                 add_special_tokens=add_special_tokens)
        return [len(ids) for ids in encoded["input_ids"]]

    def encode_pairs(self, examples: list[dict], max_length: int) -> dict[str, Tensor]:
        """[B, C, L] inputs for a multiple-choice encoder.

        A WinoGrande-style sentence with a ``_`` blank is scored with each option put into
        the blank (the whole sentence then reads naturally); otherwise (text, option) pairs.
        """
        # Padded together afterwards because a batch may mix the two kinds of example.
        flat = self.tokenizer.pad(self._pairs(examples, max_length), return_tensors="pt")
        b, c = len(examples), self.num_classes
        return {key: value.view(b, c, -1) for key, value in flat.items()}

    def pair_lengths(self, examples: list[dict], max_length: int) -> list[int]:
        """The tokens of each example's longest option as ``encode_pairs`` gives it to the model (unpadded)."""
        encodings = self._pairs(examples, max_length)
        c = self.num_classes
        return [max(len(e["input_ids"]) for e in encodings[i * c : (i + 1) * c]) for i in range(len(examples))]

    def _pairs(self, examples: list[dict], max_length: int) -> list:
        encodings = []
        for ex in examples:
            for option in ex["options"]:
                blank = "_" in ex["text"]
                first = ex["text"].replace("_", option, 1) if blank else ex["text"]
                encodings.append(
                    self.tokenizer(first, None if blank else option, truncation=True, max_length=max_length)
                )
        return encodings

    # ----------------------------------------------------------------- forward

    def class_logits(self, batch: dict[str, Tensor], output_hidden_states: bool = False) -> TaskOutput:
        """Logits over classes or options [B, C] for an encoded batch (on any device; moved to the model's):
        a classification head's own; a seq2seq or causal LM's logits of the option tokens where the answer goes."""
        inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        mask = inputs["attention_mask"]
        if _is_decoder_only(self.model.config):
            # Positions count real tokens only, so left and right padding give the same result.
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            inputs["use_cache"] = False  # one forward pass, no generation: a KV cache is wasted memory
        out = (self.runner or self.model)(**inputs, output_hidden_states=output_hidden_states)

        if self.kind in ("sequence-classification", "multiple-choice"):
            logits = out.logits
            hidden = out.hidden_states
            mask = mask.view(-1, mask.shape[-1])
        elif self.kind == "seq2seq":
            logits = out.logits[:, 0, self.option_token_ids]
            hidden = out.encoder_hidden_states
        else:
            # The answer follows the last real token, wherever the padding is.
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = (mask * positions).argmax(-1)
            logits = out.logits[torch.arange(len(last), device=last.device), last][:, self.option_token_ids]
            hidden = out.hidden_states
        return TaskOutput(logits=logits, hidden_states=hidden if output_hidden_states else None, attention_mask=mask)

    # ----------------------------------------------------------------- save

    def save(self, path: str | Path, label_names: list[str] | None = None,
             state_dict: dict[str, Tensor] | None = None) -> Path:
        """save_pretrained of model and tokenizer, plus kd.json; classifiers get their label names.
        ``state_dict``: the weights to write instead of the model's own, which FSDP and DeepSpeed ZeRO-3
        split across processes (``Accelerator.get_state_dict`` gathers them)."""
        path = Path(path)
        if label_names and self.kind == "sequence-classification":
            self.model.config.id2label = dict(enumerate(label_names))
            self.model.config.label2id = {name: i for i, name in enumerate(label_names)}
        if is_lora(self.model):
            save_merged(self.model, path)
        else:
            self.model.save_pretrained(path, state_dict=state_dict)
        return self.save_companions(path, label_names)

    def save_companions(self, path: str | Path, label_names: list[str] | None = None) -> Path:
        """What a saved model keeps beside its weights: the tokenizer, and kd.json (head, task, classes). An
        exported model's folder has them beside its ONNX graph or int8 weights."""
        path = Path(path)
        _saved_tokenizer(self.tokenizer).save_pretrained(path)
        info = {"kind": self.kind, "task": self.task, "num_classes": self.num_classes, "label_names": label_names or []}
        (path / "kd.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return path


def parameter_count(model: TaskModel) -> int:
    if model.source_parameters is not None:
        return model.source_parameters
    return sum(p.numel() for p in model.model.parameters())


def place(model: TaskModel) -> torch.device:
    """Move the model to the GPU when there is one (quantised models are already placed; exported ones run on
    the CPU)."""
    if not is_weight_quantized(model.model) and not model.cpu_only:
        model.model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model.model.eval()
    return model.device


def answer_target(example: dict) -> str:
    """generate: the answer a model is trained to give: ``target`` when set (a teacher's answer,
    sequence-level KD), else the first reference answer."""
    if "target" in example:
        return example["target"]
    return example["answers"][0] if example.get("answers") else ""


def clean_answer(text: str) -> str:
    """A generated answer as scored: its first non-empty line, stripped (a causal LM may go on to a
    new question). A first line that only announces the answer ("The answer is:") is followed by
    the next one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].endswith(":") and len(lines) > 1:
        return lines[1]
    return lines[0]


def pad_rows(rows: list[list[int]], value: int) -> Tensor:
    """Right-pad lists of ids to one [B, T] tensor (T >= 1)."""
    width = max([len(r) for r in rows] + [1])
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _special_tokens(examples: list[dict]) -> bool:
    """Whether the tokenizer adds its special tokens to a prompt: not in chat format, where the chat
    template writes them (BOS) itself."""
    return not any(ex.get("messages") for ex in examples)


def check_chat_template(tokenizer: transformers.PreTrainedTokenizerBase, who: str) -> None:
    """Chat format needs each model's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{who}: its tokenizer has no chat template, and the data is in chat format (data.chat = true or "
            "format = 'messages')",
            "use an instruct model (or give its tokenizer with `tokenizer = ...`), or set data.chat = false",
        )


def render_prompt(example: dict, template: str | None = None) -> str:
    """The prompt for an LM: ``{text}`` and ``{options}`` (numbered lines "1. ...")."""
    options = "\n".join(f"{i}. {option}" for i, option in enumerate(example["options"], start=1))
    return (template or DEFAULT_TEMPLATE).format(text=example["text"], options=options)


def _is_decoder_only(config: transformers.PretrainedConfig) -> bool:
    return not config.is_encoder_decoder and type(config) not in transformers.MODEL_FOR_MULTIPLE_CHOICE_MAPPING


# --------------------------------------------------------------------------- loading


def pick_head(spec_head: str, task: str, config: transformers.PretrainedConfig) -> str:
    """The head to load: the recipe's, or for ``auto`` the one the task and architecture call for."""
    if spec_head != "auto":
        if spec_head not in HEADS_FOR_TASK[task]:
            raise ModelError(f"head '{spec_head}' cannot do task '{task}'")
        return spec_head
    if task == "classify":
        return "sequence-classification"
    architectures = config.architectures or []
    if config.is_encoder_decoder:
        return "seq2seq"
    if any(a.endswith("ForCausalLM") for a in architectures) or _is_decoder_only(config):
        return "causal"
    return "multiple-choice" if task == "choice" else "causal"


def load_task_model(
    spec: ModelSpec,
    task: str,
    num_classes: int,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    path_override: str | None = None,
    max_length: int = 128,
) -> TaskModel:
    """Load ``spec`` for ``task`` with ``num_classes`` classes (or options).

    ``path_override`` loads from another directory with the spec's options (a fine-tuned
    teacher kept under the run). ``dtype`` beats ``spec.dtype``.
    """
    ref = path_override or spec.ref
    where = resolve_ref(ref, spec.gguf_file)
    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if spec.gguf_file:
        common["gguf_file"] = spec.gguf_file

    config = _load(transformers.AutoConfig.from_pretrained, where, ref, **common)
    kind = pick_head(spec.head, task, config)
    trainable = isinstance(spec, StudentConfig) or getattr(spec, "finetune", None) is not None
    kwargs: dict = dict(common, dtype=dtype or _dtype(spec.dtype, device))
    if kind == "sequence-classification":
        kwargs["num_labels"] = num_classes
        if not check_label_count(spec, config, task, num_classes):
            kwargs["ignore_mismatched_sizes"] = True
    if spec.load_in_8bit or spec.load_in_4bit:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_8bit=spec.load_in_8bit, load_in_4bit=spec.load_in_4bit, llm_int8_skip_modules=QUANTISATION_SKIPS,
            bnb_4bit_quant_type="nf4",  # what the recipe promises; bitsandbytes' own default is fp4
        )
        kwargs["device_map"] = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    model, info = _load(HEAD_CLASSES[kind].from_pretrained, where, ref, output_loading_info=True, **kwargs)
    missing_head = [k for k in info["missing_keys"] if k.split(".")[0] in HEAD_MODULES]
    if missing_head and not trainable and kind in ("sequence-classification", "multiple-choice"):
        raise ModelError(
            f"model {ref}: has no trained {kind} head (missing {', '.join(sorted(missing_head)[:4])})",
            hint="a teacher must be trained for the task: add finetune = {...} to its table",
        )

    if spec.gguf_file:
        _forget_gguf(model)
    if getattr(spec, "adapter", None):
        model = merge_adapter(model, resolve_ref(spec.adapter, adapter=True), ref)
    tokenizer = load_tokenizer(spec, path_override)
    if model.config.pad_token_id is None:
        # Causal sequence classifiers find each row's last real token through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None and "device_map" not in kwargs:
        model.to(device)
    model.eval()

    options, suffix = None, ""
    if task == "choice" and kind in ("seq2seq", "causal"):
        options, suffix = option_token_ids(tokenizer, kind, num_classes)
    return TaskModel(model, tokenizer, kind, task, num_classes, options, max_length, suffix)


def _forget_gguf(model: nn.Module) -> None:
    """transformers dequantises GGUF weights to ordinary tensors at load time, yet keeps marking the
    model as "quantized with gguf", which save_pretrained refuses. The weights are plain: say so, so
    that a fine-tuned GGUF teacher (or a student cut from one) saves like any other model."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def check_label_count(spec: ModelSpec, config: transformers.PretrainedConfig, task: str, num_classes: int) -> bool:
    """True when the model's classification head (if any) already has ``num_classes`` labels.

    A mismatch is fine for a model kd will train (the head is re-initialised) and an error
    for a teacher used as it is.
    """
    if pick_head(spec.head, task, config) != "sequence-classification":
        return True
    has_head = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    if not has_head or config.num_labels == num_classes:
        return True
    trainable = isinstance(spec, StudentConfig) or getattr(spec, "finetune", None) is not None
    if not trainable:
        raise ModelError(
            f"model {spec.ref}: its classification head has {config.num_labels} labels, the task has {num_classes}",
            hint="fine-tune it first (finetune = {...} in its teacher table), or use a model trained for this task",
        )
    return False


def load_tokenizer(spec: ModelSpec, path_override: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """The spec's tokenizer (its own `tokenizer` ref, else the model's), always with a pad token."""
    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if spec.tokenizer:  # a tokenizer of its own: the model's gguf_file does not apply to it
        tokenizer = _load(transformers.AutoTokenizer.from_pretrained, resolve_ref(spec.tokenizer, tokenizer=True),
                          spec.tokenizer, **common)
    else:
        ref = path_override or spec.ref
        where = resolve_ref(ref, spec.gguf_file)
        if spec.gguf_file:
            local = Path(where) / spec.gguf_file
            version = (local.stat().st_mtime_ns, local.stat().st_size) if local.is_file() else None  # else a Hub id
            tokenizer = copy.deepcopy(_gguf_tokenizer(where, spec.gguf_file, ref, spec.revision, spec.trust_remote_code,
                                                      version))
        else:
            tokenizer = _load(transformers.AutoTokenizer.from_pretrained, where, ref, **common)
    if tokenizer.pad_token is None:
        # Decoders often ship without one; padding with EOS is safe because of the attention mask.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _saved_tokenizer(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer as it should be saved: a fast tokenizer keeps the truncation and padding of its last
    call in its backend, and tokenizer.json would carry them (e.g. cut at 96 tokens from the right) to
    whatever reads the file directly (TRL's collators, serving engines)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or (backend.truncation is None and backend.padding is None):
        return tokenizer
    clean = copy.deepcopy(tokenizer)
    clean.backend_tokenizer.no_truncation()
    clean.backend_tokenizer.no_padding()
    return clean


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(where: str, gguf_file: str, ref: str, revision: str | None, trust_remote_code: bool,
                    version: tuple[int, int] | None) -> transformers.PreTrainedTokenizerBase:
    """A GGUF file's tokenizer, built once per file (and version of it) in a process: converting its
    vocabulary takes seconds to tens of seconds, and a run reads it for every check and model load.
    Callers get copies, so none sees another's changes."""
    return _load(transformers.AutoTokenizer.from_pretrained, where, ref, gguf_file=gguf_file, revision=revision,
                 trust_remote_code=trust_remote_code)


def load_config(spec: ModelSpec) -> transformers.PretrainedConfig:
    """The model's config alone (cheap): layer counts and widths without loading weights."""
    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if spec.gguf_file:
        common["gguf_file"] = spec.gguf_file
    return _load(transformers.AutoConfig.from_pretrained, resolve_ref(spec.ref, spec.gguf_file), spec.ref, **common)


def _dtype(name: str, device: str | torch.device | None) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    on_gpu = str(device or "").startswith("cuda") and torch.cuda.is_available()
    return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32


def _load(loader, where: str, ref: str, **kwargs):
    """Call a from_pretrained and turn the failures a user can fix into ModelErrors."""
    import pickle

    from safetensors import SafetensorError

    try:
        return loader(where, **kwargs)
    except pickle.UnpicklingError:
        raise ModelError(
            f"model {ref}: its weights are a pickle that holds more than tensors",
            hint="kd loads .bin weights with weights_only and never runs code in them: use safetensors weights "
            "from a source you trust",
        ) from None
    except SafetensorError as exc:
        raise ModelError(
            f"model {ref}: a weights file is damaged ({exc})",
            hint="the model folder is damaged or incomplete: save or download it again",
        ) from None
    except (OSError, ValueError) as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise ModelError(
                f"model {ref}: needs the code in its repository to run",
                hint="set trust_remote_code = true for this model if you trust its author",
            ) from None
        if isinstance(exc, OSError) and not Path(where).is_dir():
            raise ModelError(
                f"model {ref}: could not be downloaded from the Hugging Face Hub ({text.splitlines()[0]})",
                hint="check the name and network, or use a local directory or a package:MODULE/subdir ref",
            ) from None
        if isinstance(exc, OSError) and Path(where).is_dir():  # a file missing or unreadable
            raise ModelError(
                f"model {ref}: {text.splitlines()[0] if text else type(exc).__name__}",
                hint="the model folder is damaged or incomplete: save or download it again",
            ) from None
        if Path(where).is_dir():  # the files are there: transformers refused what it was asked to do with them
            raise ModelError(
                f"model {ref}: transformers could not load it: {text.splitlines()[0] if text else type(exc).__name__}",
                hint="check this model's settings in the recipe (head, dtype, gguf_file, load_in_8bit/4bit) against "
                "what transformers says",
            ) from None
        raise


def option_token_ids(tokenizer, kind: str, n: int) -> tuple[list[int], str]:
    """The token of each option number "1".."n" as the model would produce it after the prompt,
    and the text to append to a decoder's prompt so that this token comes next.

    A decoder sees the answer right after ``Answer:``: the number's token is what ``Answer: k``
    adds to ``Answer:``, usually " k" (suffix ""). Tokenizers that split digits from the space
    before them (SmolLM2, Llama 3) add a lone space token first; the prompt then ends with that
    space (suffix " ") and the answer is the bare digit. A seq2seq decoder starts fresh.
    """
    if kind == "seq2seq":
        continuations = [tokenizer(str(k), add_special_tokens=False)["input_ids"] for k in range(1, n + 1)]
        suffix = ""
    else:
        cue = tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]
        continuations = []
        for k in range(1, n + 1):
            full = tokenizer(f"{ANSWER_CUE} {k}", add_special_tokens=False)["input_ids"]
            continuations.append(full[len(cue):] if full[: len(cue)] == cue else full)
        firsts = {tuple(c[:1]) for c in continuations}
        space_split = all(len(c) == 2 for c in continuations) and len(firsts) == 1
        if space_split:
            continuations = [c[1:] for c in continuations]
        suffix = " " if space_split else ""
    for k, tokens in enumerate(continuations, start=1):
        if len(tokens) != 1:
            raise ModelError(
                f"option number {k} is not a single token for this tokenizer "
                f"({tokenizer.convert_ids_to_tokens(tokens)})",
                hint="use a multiple-choice encoder for this dataset, or a model whose tokenizer keeps digits whole",
            )
    return [tokens[0] for tokens in continuations], suffix


# --------------------------------------------------------------------------- students


def student_from_teacher(teacher: TaskModel, layers: list[int]) -> TaskModel:
    """A shallower copy of the teacher: embeddings, the listed blocks in order, final norm and head.

    Works for any architecture whose blocks live in top-level ``nn.ModuleList``s (BERT, RoBERTa,
    DistilBERT, Llama-style decoders; T5's encoder and decoder stacks take the same indices).
    """
    if is_weight_quantized(teacher.model):
        raise ModelError(
            "a quantised (8-bit/4-bit) teacher cannot be copied into a student",
            hint="load that teacher without load_in_8bit/load_in_4bit to build the student from it",
        )
    n = teacher.num_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise ModelError(f"student layers {bad or layers}: the teacher has layers 0..{n - 1}")

    config = copy.deepcopy(teacher.model.config)
    config.num_hidden_layers = len(layers)  # attribute_map covers DistilBERT's n_layers, T5's num_layers
    if getattr(config, "num_decoder_layers", None) is not None:
        config.num_decoder_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = type(teacher.model)(config).to(dtype=teacher.model.dtype, device=teacher.device).eval()

    stacks = _block_lists(teacher.model, n)
    source = teacher.model.state_dict()
    state = {}
    for key in student.state_dict():
        mapped = key
        for stack in stacks:
            match = re.match(rf"{re.escape(stack)}\.(\d+)\.(.*)", key)
            if match:
                mapped = f"{stack}.{layers[int(match[1])]}.{match[2]}"
        # T5 keeps its relative position bias in block 0 only; it stays with block 0.
        state[key] = source[mapped] if mapped in source else source[key]
    student.load_state_dict(state, strict=True)
    return dataclasses.replace(teacher, model=student, runner=None)


def is_weight_quantized(model: nn.Module) -> bool:
    """True for 8/4-bit (bitsandbytes) weights; a GGUF model is dequantised when loaded, so it is not."""
    if not getattr(model, "is_quantized", False):
        return False
    method = getattr(getattr(model.config, "quantization_config", None), "quant_method", None)
    return str(getattr(method, "value", method)) != "gguf"


def weight_quantization(model: nn.Module) -> str | None:
    """How a model's weights are quantised: "8-bit", "4-bit nf4" or "4-bit fp4" (bitsandbytes); None for weights
    in their own dtype, GGUF ones included (dequantised when loaded)."""
    if not is_weight_quantized(model):
        return None
    config = model.config.quantization_config
    if getattr(config, "load_in_4bit", False):
        return f"4-bit {getattr(config, 'bnb_4bit_quant_type', '')}".strip()
    return "8-bit"


def _block_lists(model: nn.Module, n: int) -> list[str]:
    """Names of the ModuleLists holding the ``n`` transformer blocks (not lists nested inside a block)."""
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n and name and not re.search(r"\.\d+(\.|$)", name)
    ]
    if not names:
        raise ModelError(f"cannot find the transformer blocks of {type(model).__name__} to copy")
    return names


# --------------------------------------------------------------------------- checks


def check_compatible(student: TaskModel, teachers: dict[str, TaskModel],
                     hidden_maps: dict[str, list[tuple[int, int]]]) -> None:
    """Refuse, before training, a student and teachers that cannot be distilled into each other.

    ``hidden_maps[name]`` lists (student_layer, teacher_layer) pairs, block indices as in ``num_layers``.
    """
    problems = []
    for name, teacher in teachers.items():
        if teacher.task != student.task:
            problems.append(f"teacher {name} is loaded for task '{teacher.task}', the student for '{student.task}'")
        if teacher.num_classes != student.num_classes:
            problems.append(
                f"teacher {name} scores {teacher.num_classes} {'options' if student.task == 'choice' else 'classes'}, "
                f"the student {student.num_classes}"
            )
        for s, t in hidden_maps.get(name, []):
            if not 0 <= s < student.num_layers:
                problems.append(f"teacher {name}: hidden map student layer {s} does not exist "
                                f"(0..{student.num_layers - 1})")
            if not 0 <= t < teacher.num_layers:
                problems.append(f"teacher {name}: hidden map teacher layer {t} does not exist "
                                f"(0..{teacher.num_layers - 1})")
    if problems:
        raise ModelError("; ".join(problems), hint="fix the teachers' hidden maps or the models in the recipe")


def check_shared_vocabulary(student_tokenizer, teacher_tokenizer, teacher_name: str) -> None:
    """Refuse token-level KD between tokenizers that give different ids to the same tokens.

    The vocabularies (token -> id, added tokens included) must be equal; an embedding matrix
    padded beyond the tokenizer is fine (``TaskModel.vocab_size`` trims the logits to the
    shared ids). Anything else would compare the distributions of different tokens.
    """
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return
    only_teacher = len(teacher_vocab.keys() - student_vocab.keys())
    only_student = len(student_vocab.keys() - teacher_vocab.keys())
    moved = sum(1 for token, i in teacher_vocab.items() if token in student_vocab and student_vocab[token] != i)
    raise ModelError(
        f"teacher {teacher_name} and the student do not share a vocabulary ({len(teacher_vocab):,} vs "
        f"{len(student_vocab):,} tokens; {only_teacher:,} only the teacher's, {only_student:,} only the student's, "
        f"{moved:,} with other ids): token-level KD compares next-token distributions id by id",
        'set loss.kd_level = "sequence" (the teacher\'s greedy answers become the targets), or use a teacher '
        "with the student's tokenizer",
    )


def weights_fingerprint(model_or_path: nn.Module | str | Path) -> str:
    """A short hash of a model's weights: of the weight files in a directory, or of a state dict."""
    digest = hashlib.sha256()
    if isinstance(model_or_path, nn.Module):
        for name, tensor in sorted(model_or_path.state_dict().items()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]
    path = Path(model_or_path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ModelError(f"no weight files under {path}")
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: transformers.PreTrainedTokenizerBase) -> str:
    """A short hash of what decides token ids: the vocabulary, rules and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    chat = getattr(tokenizer, "chat_template", None) or ""  # it decides the prompt's tokens in chat format
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{special}\n{body}\n{chat}".encode()).hexdigest()[:16]


__all__ = [
    "TaskModel", "TaskOutput", "resolve_ref", "load_task_model", "pick_head", "render_prompt", "option_token_ids",
    "student_from_teacher", "check_compatible", "weights_fingerprint", "tokenizer_fingerprint", "load_tokenizer",
    "load_config", "check_label_count", "check_shared_vocabulary", "check_chat_template", "answer_target",
    "clean_answer", "GENERATE_TEMPLATE", "pad_rows", "parameter_count", "place",
]
