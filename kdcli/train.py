"""The training loop: one function, top to bottom (``run_job``), plus checkpoints.

The same loop fine-tunes a teacher (labels only), trains the `dataset` student and
distils the real student; a ``Job`` says which. Data order is a seeded
permutation per epoch, cut into optimizer steps of ``batch_size * processes *
grad_accum`` examples, so the examples of step N are known without replaying the
run: that is what makes ``--resume`` exact and one process with accumulation equal
to several processes without it. An incomplete last step of an epoch is dropped
(the next epoch reshuffles, so no example is left out for long).

Each step first asks the teachers about all its micro-batches, then trains on them.
Every loss term is a mean over its micro-batch's units, and weighted by the micro-batch's
share of the step's units of that term (summed over processes), so batch 8 x
accumulation 1 and batch 2 x accumulation 4 give the same gradient. A unit is an
example; for task ``generate`` an answer token: of the gold answer, and for
sequence-level KD (and on transfer rows) of the teachers' answers (each weighted by its
teacher's weight), which differ from the gold ones in number. The diversity penalty is the exception to the
equality: it is a property of a batch's mean prediction, so it depends on the micro-batch size.

With transfer data (``[data.transfer]``: unlabelled rows the teachers answer) every micro-batch
holds a fixed number of transfer rows beside its labelled ones (``transfer_share`` of it), drawn
from their own stream of seeded permutations; they run as a batch of their own, so that a cached
teacher reads each row from its split. CE and the diversity penalty count labelled examples only
(generate: a transfer batch has no CE), KD and the hidden-state MSE every example, so the
equality above still holds. An epoch is a pass
over the labelled rows.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from kdcli.batching import gather
from kdcli.errors import Interrupted, KdError
from kdcli.job import Job, Tracking
from kdcli.metrics import MAXIMISED
from kdcli.rundir import atomic_dir, clear_folder, read_json, write_json, write_text_atomic
from kdcli.tasks import part_weights, task_kind

if TYPE_CHECKING:
    import torch


@dataclass
class JobResult:
    name: str
    output_dir: Path
    steps: int
    samples: int
    best_metric: float | None
    best_step: int | None
    stopped_early: bool
    seconds: float  # wall time, validation and checkpoints included
    samples_per_second: float  # training throughput: samples over the time spent in optimizer steps
    samples_this_run: int  # samples trained by this call (a resumed job's earlier steps excluded)
    wall_seconds: float = 0.0  # the whole stage, as `kd distill` timed it: setup, steps, validation, saves

    @property
    def wall_samples_per_second(self) -> float:
        return self.samples_this_run / max(self.wall_seconds, 1e-9)


def append_metrics(path: Path, job_name: str, record: dict[str, Any]) -> None:
    """One line of metrics.jsonl: ``record`` of the job ``job_name``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"stage": job_name, **record}) + "\n")


@dataclass
class _State:
    step: int = 0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False


def _projections(job: Job):
    """One learned linear map per teacher whose hidden width differs from the student's."""
    import torch

    student_width = job.student.hidden_size
    layers = {
        name: torch.nn.Linear(student_width, job.teacher_widths[name])
        for name in job.hidden_pairs
        if job.teacher_widths[name] != student_width
    }
    return torch.nn.ModuleDict(layers)


def step_examples(n_rows: int, seed: int, step: int, steps_per_epoch: int, per_step: int) -> list[int]:
    """Row indices of optimizer step ``step`` (0-based): a slice of that epoch's seeded permutation."""
    import torch

    epoch, position = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_rows, generator=generator)
    return order[position * per_step : (position + 1) * per_step].tolist()


# Transfer rows are drawn from permutations seeded apart from train's: no train epoch reaches this offset.
_STREAM_SEED_OFFSET = 500_000


def stream_examples(n_rows: int, seed: int, step: int, per_step: int) -> list[int]:
    """Row indices of optimizer step ``step`` from a split read as an endless stream of seeded
    permutations, one after another (a step may finish one and start the next): the transfer rows,
    whose passes do not line up with train's epochs."""
    import torch

    taken: list[int] = []
    position = step * per_step
    while len(taken) < per_step:
        epoch, offset = divmod(position, n_rows)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + _STREAM_SEED_OFFSET + epoch)
        piece = torch.randperm(n_rows, generator=generator)[offset : offset + per_step - len(taken)].tolist()
        taken += piece
        position += len(piece)
    return taken


def micro_batches(rows: Sequence[dict], indices: list[int], batch_size: int, grad_accum: int, world: int,
                  rank: int) -> list[list[dict]]:
    """This process's micro-batches of one optimizer step: micro-batch m of rank r is slice m * world + r."""
    chunks = []
    for micro in range(grad_accum):
        chunk = micro * world + rank
        chunks.append(gather(rows, indices[chunk * batch_size : (chunk + 1) * batch_size]))
    return chunks


def _step_batches(job: Job, train_rows: Sequence[dict], transfer_rows: Sequence[dict] | None, step: int,
                  steps_per_epoch: int, transfer_micro: int, world: int, rank: int) -> list[tuple[str, list[dict]]]:
    """This process's batches of one optimizer step, each with the split its rows come from (a cached
    teacher reads them there): per micro-batch its labelled train rows, then its transfer rows."""
    cfg = job.train
    labelled_micro = cfg.batch_size - transfer_micro
    indices = step_examples(len(train_rows), job.seed, step, steps_per_epoch, labelled_micro * world * cfg.grad_accum)
    labelled = micro_batches(train_rows, indices, labelled_micro, cfg.grad_accum, world, rank)
    if not transfer_micro:
        return [("train", examples) for examples in labelled]
    picked = stream_examples(len(transfer_rows), job.seed, step, transfer_micro * world * cfg.grad_accum)
    transfer = micro_batches(transfer_rows, picked, transfer_micro, cfg.grad_accum, world, rank)
    return [batch for pair in zip(labelled, transfer) for batch in (("train", pair[0]), ("transfer", pair[1]))]


def on_policy_step(job: Job, step: int) -> bool:
    """Whether optimizer step ``step`` trains on the student's own samples (on-policy KD): drawn from
    (seed, step) alone, so a resumed run draws as the uninterrupted one did."""
    if job.loss.kd_level != "on_policy" or not job.teachers:
        return False
    return random.Random(job.seed * 1_000_003 + step).random() < job.loss.on_policy_fraction


def teacher_answers(job: Job, examples: list[dict], split: str) -> dict[str, Any]:
    """What each teacher says about a micro-batch (none when the loss reads no teacher)."""
    wants_hidden = job.loss.beta > 0 and bool(job.hidden_pairs)
    if not job.teachers or (job.loss.alpha >= 1 and not wants_hidden):
        return {}
    return {name: teacher(examples, split) for name, teacher in job.teachers.items()}


def compute_loss(job: Job, examples: list[dict], split: str, projections,
                 answers: dict[str, Any] | None = None) -> tuple["torch.Tensor", dict[str, "torch.Tensor"], Any]:
    """The distillation loss of one micro-batch: total, its parts (each a mean over the micro-batch's
    units, see ``_step_shares``), and the student's output. ``answers``: the teachers' (asked when None)."""
    if answers is None:
        answers = teacher_answers(job, examples, split)
    return task_kind(job.student.task).loss(job, examples, answers, projections)


def _step_shares(job: Job, chunks: list[list[dict]], answers: list[dict[str, Any]],
                 accelerator) -> list[dict[str, float]]:
    """Per micro-batch and loss term, the weight that turns the micro-batch's mean into its part of
    the step's mean: its units over the step's units of that term (all processes), times the number
    of processes, which DDP's gradient average divides out again."""
    import torch

    world = accelerator.num_processes
    task = task_kind(job.student.task)
    units = [task.units(job, chunk, answer) for chunk, answer in zip(chunks, answers)]
    terms = list(units[0])
    totals = {term: float(sum(u[term] for u in units)) for term in terms}
    if world > 1:
        summed = accelerator.reduce(torch.tensor([totals[t] for t in terms], device=accelerator.device),
                                    reduction="sum")
        totals = {term: float(value) for term, value in zip(terms, summed)}
    return [{term: u[term] * world / max(totals[term], 1e-12) for term in terms} for u in units]


# --------------------------------------------------------------------------- checkpoints


def _checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, newest first (a checkpoint is complete once its state.json exists)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step-*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def _sharded(accelerator) -> bool:
    """FSDP and DeepSpeed ZeRO split the weights or the optimizer state across processes: no process
    holds all of either, so checkpoints go through accelerate's ``save_state`` / ``load_state``."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _fit_sharding(job: Job, accelerator, projections) -> None:
    """Before ``prepare`` under FSDP or DeepSpeed: refuse what kd cannot do there, and give DeepSpeed
    the recipe's batch settings, which it would otherwise take from its own config."""
    from accelerate.utils import DistributedType

    from kdcli.lora import is_lora

    if is_lora(job.student.model):
        raise KdError(f"{job.name}: a LoRA student cannot be sharded: kd saves it by merging the adapter into "
                      "a copy of the whole model",
                      "train LoRA students with DDP (torchrun, or accelerate launch without FSDP or DeepSpeed): "
                      "their optimizer state is small")
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if len(projections):
        raise KdError(f"{job.name}: DeepSpeed trains one model, and this job has two: the student and the "
                      "projections that map its hidden states to a teacher's width",
                      "use FSDP, set loss.beta = 0, or distil hidden states from teachers of the student's width")
    if job.train.grad_accum != 1:
        raise KdError(f"{job.name}: under DeepSpeed train.grad_accum must be 1: DeepSpeed steps the optimizer "
                      "after every backward pass kd makes",
                      "raise train.batch_size instead, or use FSDP")
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": job.train.batch_size, "gradient_accumulation_steps": 1,
              "gradient_clipping": job.train.max_grad_norm or 0.0}
    for key, value in wanted.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise KdError(f"{job.name}: the DeepSpeed config sets {key} = {config[key]}, the recipe {value}",
                          f'set {key} to "auto" in the DeepSpeed config: kd fills it in from the recipe')
    # The student is saved whole: ZeRO-3 must gather its weights for that (accelerate's default is not to).
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True


def _save_checkpoint(job: Job, accelerator, model, projections, optimizer, scheduler, state: _State) -> None:
    """Every process calls this: the RNG states, and under sharding the weights and optimizer state,
    come from all of them. The main process writes the rest, and renames the folder once all are done."""
    import torch
    from accelerate.utils import gather_object
    from safetensors.torch import save_model

    from kdcli.runtime import from_main_process

    # Every process's dropout RNG goes into the checkpoint before state.json marks it complete.
    rng_states = gather_object([_rng_state()]) if accelerator.num_processes > 1 else [_rng_state()]
    path = job.checkpoint_dir / f"step-{state.step:08d}"
    main, sharded = accelerator.is_main_process, _sharded(accelerator)
    with atomic_dir(path) if main else nullcontext() as tmp:
        if sharded:
            # Each process writes its own shards into the main process's temporary folder.
            accelerator.save_state(str(from_main_process(accelerator, tmp) / "sharded"))
            accelerator.wait_for_everyone()
        if main:
            if not sharded:
                save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
                save_model(accelerator.unwrap_model(projections), str(tmp / "projections.safetensors"))
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            for rank, rng in enumerate(rng_states):
                torch.save(rng, tmp / f"rng-{rank}.pt")
            write_json(tmp / "identity.json", job.identity)
            write_json(tmp / "state.json", state.__dict__)
    if main:
        for old in _checkpoints(job.checkpoint_dir)[job.train.keep_last :]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# Settings that change what is logged or kept on disk, never the weights: a resume may change them.
RESUMABLE_CHANGES = frozenset({"log_every", "checkpoint_every", "keep_last"})


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON documents differ, with the two values (``train.lr: 0.0005 -> 0.5``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in dict.fromkeys([*old, *new]) if key not in RESUMABLE_CHANGES
                for change in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _holds_best(output: Path, step: int | None) -> bool:
    """True when ``output`` holds the whole model saved at ``step``: every file its training.json lists,
    at the size it was written."""
    try:
        saved = read_json(output / "training.json")
        files = saved["files"].items()
        return saved["step"] == step and all((output / n).is_file() and (output / n).stat().st_size == size
                                             for n, size in files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def identity_changes(checkpoint_dir: Path, identity: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str] | None:
    """What differs between the identity the newest checkpoint in ``checkpoint_dir`` recorded and
    ``identity``, top-level keys in ``ignore`` left out; None when there is no checkpoint."""
    found = _checkpoints(checkpoint_dir)
    if not found:
        return None
    try:
        recorded = read_json(found[0] / "identity.json")
    except (OSError, ValueError):
        return ["identity (none recorded: the checkpoints predate this kd)"]
    if not isinstance(recorded, dict):
        return ["identity (identity.json is damaged)"]
    return changed_keys({k: v for k, v in recorded.items() if k not in ignore},
                        {k: v for k, v in identity.items() if k not in ignore})


def cannot_resume(job_name: str, checkpoint_dir: Path, problem: str) -> KdError:
    return KdError(
        f"{job_name}: cannot resume from the checkpoints in {checkpoint_dir}: {problem}",
        "undo the change to resume, or run without --resume to train from the start "
        "(its checkpoints are then replaced)",
    )


def resume_problem(job: Job) -> str | None:
    """Why resuming ``job`` from its newest checkpoint would not give the run it claims to continue,
    or None (also when there is nothing to resume).

    The checkpoint must have been made with the same recipe (``identity.json``), and the best model
    so far, which the checkpoint does not hold, must still be in the output folder unless the
    checkpoint is that model.
    """
    changes = identity_changes(job.checkpoint_dir, job.identity)
    if changes is None:
        return None
    if changes:
        return "they were made with another recipe; changed: " + "; ".join(changes)
    try:
        state = _read_state(_checkpoints(job.checkpoint_dir)[0] / "state.json")
    except (OSError, ValueError):
        return None  # not loadable: _load_checkpoint falls back to an older one and says so
    if state.best_step is not None and state.best_step != state.step and not _holds_best(job.output_dir,
                                                                                         state.best_step):
        return (f"the best model so far (step {state.best_step}) is no longer in {job.output_dir}, "
                "and no checkpoint holds it")
    return None


def _truncate_metrics(path: Path, job_name: str, step: int) -> None:
    """Drop ``job_name``'s records after ``step`` from metrics.jsonl: a resumed job logs the steps it
    redoes again, and a fresh start replaces the job's history, so no step is ever counted twice."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)

    def kept(line: str) -> bool:
        try:
            record = json.loads(line)
            return record["stage"] != job_name or record["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False  # a line cut short by a crash

    keep = [line for line in lines if kept(line)]
    if len(keep) != len(lines):
        write_text_atomic(path, "".join(keep))


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _read_state(path: Path) -> _State:
    """state.json, with its types checked: a hand-edited or damaged file is not a checkpoint."""
    raw = read_json(path)
    expected = {"step": int, "best": (int, float, type(None)), "best_step": (int, type(None)), "bad_evals": int,
                "stopped_early": bool}
    if not isinstance(raw, dict) or raw.keys() != expected.keys() or any(
        not isinstance(raw[key], kinds) or (kinds is int and isinstance(raw[key], bool))
        for key, kinds in expected.items()
    ):
        raise ValueError(f"{path.name} does not hold a training state")
    return _State(**raw)


def _all_processes_agree(accelerator, loaded: bool) -> bool:
    """True when every process loaded its part; otherwise all of them move on together."""
    if accelerator.num_processes == 1:
        return loaded
    import torch

    flag = torch.tensor([1 if loaded else 0], device=accelerator.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _load_checkpoint(job: Job, accelerator, model, projections, optimizer, scheduler, console) -> _State | None:
    """Restore the newest checkpoint that every process can load; fall back to older ones, never to garbage."""
    import torch
    from safetensors.torch import load_model

    candidates = _checkpoints(job.checkpoint_dir)
    for path in candidates:
        try:
            state = _read_state(path / "state.json")
            if _sharded(accelerator):
                # Every process at once: each reads its own shards of the weights and optimizer state.
                accelerator.load_state(str(path / "sharded"))
            else:
                load_model(accelerator.unwrap_model(model), str(path / "model.safetensors"))
                load_model(accelerator.unwrap_model(projections), str(path / "projections.safetensors"))
                # weights_only: a checkpoint is data, never code, even if someone swapped the file.
                optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
            rng_file = path / f"rng-{accelerator.process_index}.pt"
            if not rng_file.is_file():
                raise ValueError(f"no {rng_file.name}: it was saved by fewer processes than are running now")
            rng = torch.load(rng_file, weights_only=True)
            loaded = True
        except Exception as exc:  # a truncated or corrupted file: say so and try the previous one
            console.print(f"[yellow]checkpoint {path.name} cannot be loaded ({type(exc).__name__}: {exc}); "
                          "trying an older one[/]")
            loaded = False
        if not _all_processes_agree(accelerator, loaded):
            continue
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        console.print(f"resuming {job.name} from {path.name} ({state.step} steps done)")
        return state
    if candidates:
        raise KdError(
            f"no checkpoint in {job.checkpoint_dir} could be loaded",
            "delete the folder to start the stage again, or restore a good checkpoint into it",
        )
    return None


# --------------------------------------------------------------------------- experiment trackers


def _start_tracking(accelerator, name: str, tracking: Tracking | None, done_steps: int) -> bool:
    """Open job ``name``'s run in the trackers the accelerator reports to (`[log] report_to`), its local
    files in LOGS/NAME/, the job having ``done_steps`` steps behind it; False when there are none."""
    if tracking is None or not accelerator.log_with:
        return False
    logs = Path(accelerator.project_dir) / name
    if accelerator.is_main_process:
        logs.mkdir(parents=True, exist_ok=True)  # wandb writes only into a folder that exists
    # accelerate writes a TensorBoard run to LOGGING_DIR/PROJECT: a folder per job keeps each job (a teacher's
    # fine-tuning, a stage of a role) a run of its own there, as the run names below do in the other trackers.
    accelerator.project_configuration.logging_dir = str(logs)
    try:
        # TensorBoard keeps one folder a job, so its run hides the steps after the checkpoint resumed from (a fresh
        # start: every step), which are logged again, as metrics.jsonl drops them; the other trackers start a run.
        accelerator.init_trackers(tracking.project, config=tracking.config,
                                  init_kwargs={"tensorboard": {"purge_step": done_steps + 1},
                                               "wandb": {"name": name, "dir": str(logs)}, "trackio": {"name": name},
                                               "mlflow": {"run_name": name}})
    except Exception as exc:  # the tracker's own failure: not logged in, a server out of reach, ...
        accelerator.trackers.clear()
        raise KdError(f"{name}: an experiment tracker could not start its run ({type(exc).__name__}: {exc})",
                      "fix the tracker's own settings (e.g. `wandb login`, or WANDB_MODE=offline; "
                      "MLFLOW_TRACKING_URI), or leave it out of log.report_to") from None
    return True


def _end_tracking(accelerator) -> None:
    """Close the job's runs. Not ``accelerator.end_training()``: it also ends the process group, which the
    command's next jobs and its last barrier still use."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()  # init_trackers adds to the list, and would start the finished ones again


def _tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl line, as the trackers get them: train/NAME, or eval/NAME without ``val_``."""
    return {f"{record['kind']}/{key.removeprefix('val_')}": value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


# --------------------------------------------------------------------------- the loop


def run_job(job: Job, accelerator, *, resume: bool = False, console=None, show_progress: bool = True,
            on_eval: Callable[[int, dict[str, float]], None] | None = None) -> JobResult:
    """Train ``job.student`` and write its best checkpoint to ``job.output_dir``.

    ``on_eval(samples_seen, scores)`` is called after every validation; it may raise to stop the
    run (`kd tune` prunes trials that fall behind this way).
    """
    import torch
    from rich.console import Console
    from transformers import get_scheduler

    from kdcli.losses import NonFiniteLoss, check_finite, weighted_sum
    from kdcli.runtime import seed_everything

    console = console or Console()
    cfg = job.train
    task = task_kind(job.student.task)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.batch_size * world * cfg.grad_accum
    train_rows = job.rows["train"]
    # Each micro-batch holds labelled train rows and, with transfer data, a fixed number of transfer rows.
    transfer_rows = job.rows.get("transfer") if job.transfer_share else None
    transfer_micro = round(job.transfer_share * cfg.batch_size) if transfer_rows else 0
    if transfer_rows is not None and not 0 < transfer_micro < cfg.batch_size:
        raise KdError(
            f"{job.name}: data.transfer.share = {job.transfer_share:g} of a micro-batch of {cfg.batch_size} rows "
            f"leaves {'no transfer' if transfer_micro == 0 else 'no labelled'} row in it",
            "pick a share that gives each micro-batch rows of both kinds, or raise train.batch_size",
        )
    labelled_per_step = (cfg.batch_size - transfer_micro) * world * cfg.grad_accum
    steps_per_epoch = len(train_rows) // labelled_per_step
    if steps_per_epoch == 0:
        raise KdError(
            f"{job.name}: the train split has {len(train_rows)} rows, fewer than one optimizer step takes "
            f"({cfg.batch_size - transfer_micro} x {cfg.grad_accum} accumulation x {world} processes = "
            f"{labelled_per_step})",
            "lower train.batch_size or train.grad_accum, or use more data",
        )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    seed_everything(job.seed)
    student = job.student
    projections = _projections(job)
    if _sharded(accelerator):
        _fit_sharding(job, accelerator, projections)
    parameters = [p for p in student.model.parameters() if p.requires_grad] + list(projections.parameters())
    # The fused kernel updates every tensor in one pass: ~12% of a small model's CPU step otherwise.
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    # save_state saves every model the accelerator prepared: forget the previous job's (an earlier stage's).
    accelerator.free_memory()
    if len(projections):
        model, projections, optimizer = accelerator.prepare(student.model, projections, optimizer)
    else:  # DDP refuses a module without parameters
        model, optimizer = accelerator.prepare(student.model, optimizer)
    # FSDP replaces the parameters with sharded ones: clip those the optimizer now holds.
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    student = replace(student, model=accelerator.unwrap_model(model), runner=model)
    job = replace(job, student=student)

    state = None
    if resume:
        problem = resume_problem(job)
        if problem:
            raise cannot_resume(job.name, job.checkpoint_dir, problem)
        state = _load_checkpoint(job, accelerator, model, projections, optimizer, scheduler, console)
    elif _checkpoints(job.checkpoint_dir) and accelerator.is_main_process:
        # A fresh run; --resume would have continued them. The folder stays: it may be a link to a scratch disk.
        clear_folder(job.checkpoint_dir)
    accelerator.wait_for_everyone()
    state = state or _State()
    if accelerator.is_main_process:
        _truncate_metrics(job.metrics_path, job.name, state.step)

    maximise = cfg.metric in MAXIMISED
    weights = part_weights(job.loss)
    started = time.perf_counter()
    train_seconds = 0.0  # optimizer steps only: validation and checkpoints are not training speed
    first_step = state.step
    window: dict[str, float] = {}
    window_steps = 0
    grad_norms: list[Any] = []  # the window's norms before clipping, for the trackers (tensors: no sync a step)

    def log(record: dict[str, Any], tracked: dict[str, float] | None = None) -> None:
        """Append a metrics.jsonl line; the trackers get its numbers, and ``tracked``, numbers for them alone."""
        if accelerator.is_main_process:
            append_metrics(job.metrics_path, job.name, record)
        if reporting:
            accelerator.log({**_tracker_values(record), **(tracked or {})}, step=record["step"])

    def save_best(value: float) -> None:
        # Every process: FSDP and ZeRO-3 gather the whole student from all of them.
        weights = accelerator.get_state_dict(model) if _sharded(accelerator) else None
        if accelerator.is_main_process:
            with atomic_dir(job.output_dir) as tmp:
                student.save(tmp, label_names=job.extra_metadata.get("label_names") or None, state_dict=weights)
                files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                write_json(tmp / "training.json", {"stage": job.name, "step": state.step, cfg.metric: value,
                                                   **job.extra_metadata, "files": files})
        accelerator.wait_for_everyone()

    if state.best_step is not None and not _holds_best(job.output_dir, state.best_step):
        if state.best_step != state.step:  # an older checkpoint than resume_problem looked at was loaded
            raise KdError(f"{job.name}: the best model so far (step {state.best_step}) is no longer in "
                          f"{job.output_dir}, and no checkpoint holds it",
                          "run without --resume to train from the start")
        save_best(state.best)  # the checkpoint just loaded is the best model: put it back

    def validate_and_keep_best() -> dict[str, float]:
        scores = task.validate(student, job.rows["validation"], cfg.eval_batch_size, job.max_length, job.template,
                               cfg.metric, job.answer_max_length)
        value = scores[cfg.metric if cfg.metric in scores else "loss"]
        improved = state.best is None or (value > state.best if maximise else value < state.best)
        if improved:
            state.best, state.best_step, state.bad_evals = value, state.step, 0
            save_best(value)
        else:
            state.bad_evals += 1
        log({"kind": "eval", "step": state.step, "samples": state.step * per_step,
             **{f"val_{k}": v for k, v in scores.items()}, "best": improved})
        return scores

    # Before the progress bar starts: a tracker that cannot start its run ends the job here.
    reporting = _start_tracking(accelerator, job.name, job.tracking, state.step)
    progress = None
    if show_progress and accelerator.is_main_process:
        from kdcli.progress import phase_progress

        progress = phase_progress(console, status=True)
        progress.start()
        bar = progress.add_task(job.name, total=total_steps, completed=state.step, status="")
    last_scores: dict[str, float] = {}
    try:
        model.train()
        while state.step < total_steps and not state.stopped_early:
            step_started = time.perf_counter()
            batches = _step_batches(job, train_rows, transfer_rows, state.step, steps_per_epoch, transfer_micro,
                                    world, rank)
            if on_policy_step(job, state.step):
                batches = [(split, task.with_student_samples(job, examples)) for split, examples in batches]
            answers = [teacher_answers(job, examples, split) for split, examples in batches]
            shares = _step_shares(job, [examples for _, examples in batches], answers, accelerator)
            step_parts: dict[str, float] = {}
            for i, (split, examples) in enumerate(batches):
                sync = i == len(batches) - 1
                with nullcontext() if sync else accelerator.no_sync(model):
                    total, parts, _ = compute_loss(job, examples, split, projections, answers[i])
                    check_finite({k: v.detach() for k, v in {**parts, "total": total}.items()}, state.step + 1)
                    accelerator.backward(weighted_sum(parts, weights, shares[i]))
                for key, value in parts.items():
                    step_parts[key] = step_parts.get(key, 0.0) + float(value.detach()) * shares[i][key]
            # This process's step means (the whole step's with one process): the shares weigh each batch by its units.
            held = {key: sum(share[key] for share in shares) for key in step_parts}
            step_parts = {key: value / held[key] for key, value in step_parts.items() if held[key] > 0}
            for key, value in {**step_parts, "loss": weighted_sum(step_parts, weights)}.items():
                window[key] = window.get(key, 0.0) + value
            if cfg.max_grad_norm:
                norm = accelerator.clip_grad_norm_(parameters, cfg.max_grad_norm)
                if reporting and norm is not None:  # None: DeepSpeed, before its engine has measured one
                    grad_norms.append(norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - step_started
            previous_samples = state.step * per_step
            state.step += 1
            window_steps += 1
            samples = state.step * per_step

            def crossed(every: int) -> bool:
                return samples // every > previous_samples // every

            final = state.step == total_steps
            if crossed(cfg.log_every) or final:
                elapsed = time.perf_counter() - started
                rate = (state.step - first_step) * per_step / max(train_seconds, 1e-9)
                record = {k: v / window_steps for k, v in window.items()}
                log({"kind": "train", "step": state.step, "samples": samples,
                     "epoch": state.step * labelled_per_step / len(train_rows),
                     "lr": scheduler.get_last_lr()[0], **record, "samples_per_s": rate, "elapsed": elapsed},
                    {"train/grad_norm": float(sum(grad_norms)) / len(grad_norms)} if grad_norms else None)
                window, window_steps, grad_norms = {}, 0, []
                if progress:
                    progress.update(bar, status=f"loss {record['loss']:.4f}  {rate:.1f} samples/s")
            if crossed(cfg.eval_every) or final:
                last_scores = validate_and_keep_best()
                if on_eval is not None:
                    on_eval(samples, last_scores)
                if progress:
                    progress.update(bar, description=f"{job.name} val {cfg.metric} "
                                                     f"{last_scores.get(cfg.metric, last_scores['loss']):.4f}")
                if cfg.patience and state.bad_evals >= cfg.patience:
                    state.stopped_early = True
                    console.print(f"{job.name}: no improvement in {cfg.patience} evaluations, "
                                  f"stopping early at step {state.step}")
            if crossed(cfg.checkpoint_every) or final or state.stopped_early:
                _save_checkpoint(job, accelerator, model, projections, optimizer, scheduler, state)
            if progress:
                progress.update(bar, completed=state.step)
    except NonFiniteLoss as exc:
        kept = _checkpoints(job.checkpoint_dir)
        raise KdError(
            f"{job.name}: {exc}",
            (f"the last good checkpoint is {kept[0]}; " if kept else "")
            + "lower train.lr, set train.max_grad_norm, or use mixed_precision = 'no'",
        ) from None
    except KeyboardInterrupt:
        kept = _checkpoints(job.checkpoint_dir)
        raise Interrupted(
            f"{job.name}: interrupted at step {state.step} of {total_steps}",
            (f"the last checkpoint is {kept[0]}: run the command again (`kd distill` with --resume) to continue "
             "from it" if kept else "no checkpoint had been saved yet: run the command again to start the job over"),
        ) from None
    except torch.cuda.OutOfMemoryError:
        raise KdError(
            f"{job.name}: the GPU ran out of memory",
            "load teachers with load_in_8bit = true, use a smaller train.batch_size with a larger "
            "train.grad_accum, or run `kd cache-teachers` so teachers are not in memory during training",
        ) from None
    finally:
        if progress:
            progress.stop()
        if reporting:
            _end_tracking(accelerator)
    elapsed = time.perf_counter() - started
    return JobResult(
        name=job.name,
        output_dir=job.output_dir,
        steps=state.step,
        samples=state.step * per_step,
        best_metric=state.best,
        best_step=state.best_step,
        stopped_early=state.stopped_early,
        seconds=elapsed,
        samples_per_second=(state.step - first_step) * per_step / max(train_seconds, 1e-9),
        samples_this_run=(state.step - first_step) * per_step,
    )
