"""Several processes (torchrun --nproc_per_node 2, gloo on CPU): each rank trains on its own,
disjoint share of every optimizer step; the data is written by one process, not one per rank; the
teacher cache is built by all of them, each running its share of the batches, into one folder, and
its files are byte for byte those one process writes; a 2-process `kd distill` killed with SIGKILL
and resumed ends where an uninterrupted one does, and so does a 2-process FSDP job stopped and resumed.

The torchrun tests start the real `kd` (``torchrun -m kdcli.cli``) and are marked slow (about
15 s per launch on two CPU cores).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import jobs
from kdcli.errors import KdError
from kdcli.models import parameter_count
from kdcli.runtime import check_model_loading, make_accelerator
from kdcli.train import _fit_sharding, _projections, run_job, step_examples

TORCHRUN = Path(sys.executable).parent / "torchrun"
ENV = {k: v for k, v in os.environ.items() if k != "KD_DEBUG"} | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside the interpreter")


# --------------------------------------------------------------------------- which rows each process reads


class AsProcess:
    """The real single-process accelerator, saying it is process ``rank`` of ``world``: run_job then
    takes that process's share of every step, as it would under torchrun."""

    def __init__(self, world: int, rank: int) -> None:
        self._real = make_accelerator("no")
        self.num_processes, self.process_index = world, rank

    def __getattr__(self, name: str):
        return getattr(self._real, name)


class Recording:
    """A teacher that notes the row ids of every train micro-batch it is asked about, then answers."""

    def __init__(self, teacher) -> None:
        self.teacher, self.asked = teacher, []

    def __call__(self, examples: list[dict], split: str):
        if split == "train":
            self.asked.append([int(e["id"]) for e in examples])
        return self.teacher(examples, split)

    def __getattr__(self, name: str):
        return getattr(self.teacher, name)


@pytest.fixture(scope="module")
def teacher_dir(tiny) -> Path:
    return tiny("bert", "sequence-classification", num_labels=3, layers=4)


@pytest.mark.slow
@pytest.mark.parametrize("world, accum", [(2, 2), (3, 1)])
def test_every_row_of_an_epoch_is_read_once_by_exactly_one_process(teacher_dir, tmp_path, monkeypatch, world, accum):
    """run_job in each of ``world`` processes (one after another): the teacher sees which rows each
    process's micro-batches hold."""
    import accelerate.utils

    # the checkpoint's RNG states
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objects: objects * world)
    batch, rows = 2, 48  # jobs.classify_job: 48 train rows, ids 0..47
    per_step = batch * world * accum
    steps_per_epoch = rows // per_step
    steps = steps_per_epoch + 2  # into the second epoch
    asked = []
    for rank in range(world):
        job = jobs.classify_job(teacher_dir, tmp_path / f"rank-{rank}", batch_size=batch, grad_accum=accum,
                                max_steps=steps)
        recording = Recording(job.teachers["t"])
        job.teachers = {"t": recording}
        run_job(job, AsProcess(world, rank), show_progress=False)
        assert len(recording.asked) == steps * accum  # one question per micro-batch
        asked.append(recording.asked)
    epochs: dict[int, list[int]] = {}
    for step in range(steps):
        shares = [micro for mine in asked for micro in mine[step * accum : (step + 1) * accum]]
        assert all(len(share) == batch for share in shares)  # every process does the same work: no DDP stalls
        read = [i for share in shares for i in share]
        # Together the processes read the step's rows (a slice of the epoch's seeded order), each once.
        assert sorted(read) == sorted(step_examples(rows, 0, step, steps_per_epoch, per_step))
        epochs.setdefault(step // steps_per_epoch, []).extend(read)
    first = epochs[0]
    assert len(first) == len(set(first)) == steps_per_epoch * per_step  # no row twice in an epoch
    assert rows - len(first) < per_step  # only an incomplete last step is left out
    assert epochs[1] != first[: len(epochs[1])]  # a new order in the next epoch


def test_the_same_step_is_the_same_rows_in_every_process_and_after_a_resume():
    a = step_examples(100, 7, 13, 6, 16)
    b = step_examples(100, 7, 13, 6, 16)
    assert a == b and step_examples(100, 7, 1, 6, 16) != step_examples(100, 7, 7, 6, 16)  # a new order each epoch


# --------------------------------------------------------------------------- torchrun


def torchrun(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `kd ARGS` under torchrun; on a timeout the whole process group goes (torchrun and its ranks)."""
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(jobs.free_port()), "-m", "kdcli.cli", *args]
    proc = subprocess.Popen(command, cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def start_torchrun(root: Path, *args: str) -> subprocess.Popen:
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(jobs.free_port()), "-m", "kdcli.cli", *args]
    return subprocess.Popen(command, cwd=root, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def write_run(root: Path, teacher: Path, rows: int = 96, **train) -> None:
    jobs.write_classify_run(
        root, teacher, name="d", rows=rows, loss={"alpha": 0.5},
        train={"max_steps": 80, "batch_size": 2, "lr": 1e-3, "eval_every": 40, "checkpoint_every": 20,
               "log_every": 4, "metric": "loss", "eval_batch_size": 32} | train,
    )


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (torchrun starts each rank in a session of its own)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank at once: what a machine crash or an OOM-killer sweep does."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def bert(tiny) -> Path:
    return tiny("bert", "sequence-classification", num_labels=3, layers=2)


def _watch_writers(proc: subprocess.Popen, folders: dict[str, Path]) -> dict[str, set[str]]:
    """Poll ``folders`` while ``proc`` runs; the pids that created temporary outputs in each."""
    writers: dict[str, set[str]] = {name: set() for name in folders}
    while proc.poll() is None:
        for name, folder in folders.items():
            try:
                entries = os.listdir(folder)
            except OSError:
                continue
            writers[name] |= {e.split(".tmp-")[1].split(".")[0] for e in entries if ".tmp-" in e}
        time.sleep(0.0005)
    return writers


@pytest.mark.slow
@needs_torchrun
def test_two_processes_prepare_once_and_write_one_cache(bert, tmp_path):
    """One process prepares the data; both build the cache, in one temporary folder (the main process's)."""
    root = tmp_path / "work"
    write_run(root, bert, rows=3000)
    run = root / "runs" / "d"
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(jobs.free_port()),
               "-m", "kdcli.cli", "cache-teachers", "recipe.toml"]
    log = open(tmp_path / "cache.log", "w")
    proc = subprocess.Popen(command, cwd=root, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    writers = _watch_writers(proc, {"data": run / "data", "cache": run / "cache" / "main"})
    text = (tmp_path / "cache.log").read_text()
    assert proc.returncode == 0, text
    assert len(writers["data"]) == 1 and len(writers["cache"]) == 1, writers  # one temporary folder each
    assert text.count("built") == 1
    cache = run / "cache" / "main" / "t"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert sorted(os.listdir(cache)) == sorted(
        ["manifest.json", *manifest["splits"]["train"]["shards"], *manifest["splits"]["validation"]["shards"]]
    )
    assert sum(s["rows"] for s in manifest["splits"].values()) == sum(
        json.loads((run / "data" / "main" / "manifest.json").read_text())["counts"][k] for k in ("train", "validation")
    )
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]


def write_cache_recipes(root: Path, bert: Path, llama: Path) -> None:
    """``root/classify``: a tiny BERT teaching its layers [0, 2] (logits and the mapped layers' states);
    ``root/generate``: a tiny Llama, cached as top-k tokens (stage tok) and as greedy answers (stage seq).
    Batches of 4, so a split is several batches and the validation split one (nothing for process 1)."""
    for kind in ("classify", "generate"):
        (root / kind).mkdir(parents=True)
    jobs.write_sentences(root / "classify" / "s.jsonl", 40)
    jobs.write_recipe(root / "classify" / "recipe.toml", {
        "name": "c", "task": "classify",
        "data": {"format": "jsonl", "path": "s.jsonl", "label_names": jobs.LABELS},
        "student": {"from_teacher": "t", "layers": [0, 2]},
        "teachers": {"t": {"ref": str(bert), "hidden": {"map": "skip"}}},
        "loss": {"alpha": 0.5, "beta": 1.0},
        "train": {"eval_batch_size": 4},
    })
    jobs.write_trivia(root / "generate" / "trivia.jsonl", n=24)
    jobs.write_recipe(root / "generate" / "recipe.toml", {
        "name": "g", "task": "generate",
        "data": {"format": "triviaqa", "path": "trivia.jsonl", "max_length": 32, "answer_max_length": 6},
        "student": {"from_teacher": "big", "layers": [0]},
        "teachers": {"big": {"ref": str(llama)}},
        "loss": {"alpha": 0.5},
        "train": {"eval_batch_size": 4},
        "stages": [{"name": "tok", "loss": {"kd_level": "token", "top_k": 32}},
                   {"name": "seq", "loss": {"kd_level": "sequence"}}],
    })


CACHES = {"classify": ["c/cache/main/t"], "generate": ["g/cache/tok/big", "g/cache/seq/big"]}
TIMINGS = ("seconds", "rows_per_second")  # what the manifests of two builds may differ in


@pytest.mark.slow
@needs_torchrun
def test_two_processes_build_a_cache_byte_for_byte_as_one_process_does(teacher_dir, tiny, tmp_path, monkeypatch):
    import kdcli.cache
    from clirun import kd_in

    llama = tiny("llama", "causal", layers=2)
    one, two = tmp_path / "one", tmp_path / "two"
    write_cache_recipes(one, teacher_dir, llama)
    write_cache_recipes(two, teacher_dir, llama)
    monkeypatch.setattr(kdcli.cache, "SHARD_ROWS", 5)  # several shards a split, cut across batches
    answered = []
    answer = kdcli.cache.LiveTeacher.__call__
    monkeypatch.setattr(kdcli.cache.LiveTeacher, "__call__",
                        lambda self, examples, split: answered.append(split) or answer(self, examples, split))
    for kind in CACHES:
        kd_in(one / kind, "cache-teachers", "recipe.toml")
    script = Path(__file__).parent / "distributed_cache.py"
    done = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(jobs.free_port()), str(script),
                           "5", str(two / "classify"), str(two / "generate")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    # Both processes answered batches, and together as many as one process did.
    shares = [int(line.split()[3]) for line in done.stdout.splitlines() if line.startswith("process ")]
    assert len(shares) == 2 and min(shares) > 0 and sum(shares) == len(answered), (shares, len(answered))
    for kind, caches in CACHES.items():
        for cache in caches:
            mine, theirs = one / kind / "runs" / cache, two / kind / "runs" / cache
            files = sorted(os.listdir(mine))
            assert files == sorted(os.listdir(theirs)), cache  # no part file left behind
            manifest = json.loads((mine / "manifest.json").read_text())
            assert len(manifest["splits"]["train"]["shards"]) > 1 or cache.endswith("seq/big"), manifest
            for name in files:
                if name != "manifest.json":
                    assert (mine / name).read_bytes() == (theirs / name).read_bytes(), f"{cache}/{name}"
            other = json.loads((theirs / "manifest.json").read_text())
            assert {k: v for k, v in manifest.items() if k not in TIMINGS} == {
                k: v for k, v in other.items() if k not in TIMINGS}, cache


@pytest.mark.slow
@needs_torchrun
def test_two_processes_killed_and_resumed_end_where_an_uninterrupted_run_does(bert, tmp_path):
    from safetensors.torch import load_file

    reference = tmp_path / "whole"
    write_run(reference, bert)
    done = torchrun(reference, "distill", "recipe.toml")
    assert done.returncode == 0, done.stdout + done.stderr

    root = tmp_path / "parts"
    write_run(root, bert)
    run = root / "runs" / "d"
    target = random.Random(os.getpid()).randint(8, 60)
    proc = start_torchrun(root, "distill", "recipe.toml")
    try:
        while proc.poll() is None:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().count('"kind": "train"') >= target:
                kill_all(proc)
                break
            time.sleep(0.001)
    finally:
        kill_all(proc)
        proc.wait()
    time.sleep(0.5)  # let the kernel reap the ranks (their run lock goes with them)
    assert not (run / "stages" / "main" / "student" / "done.json").exists(), "the run finished before it was killed"
    resumed = torchrun(root, "distill", "recipe.toml", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming main from step-" in resumed.stdout
    for path in ("checkpoints/main/step-00000080/model.safetensors", "student/model.safetensors"):
        assert jobs.max_difference(load_file(run / path), load_file(reference / "runs" / "d" / path)) == 0.0, path


@pytest.mark.slow
@needs_torchrun
def test_a_checkpoint_that_one_rank_cannot_load_is_skipped_by_every_rank(bert, tmp_path):
    root = tmp_path / "work"
    write_run(root, bert, max_steps=12, checkpoint_every=16)
    first = torchrun(root, "distill", "recipe.toml")
    assert first.returncode == 0, first.stdout + first.stderr
    newest = root / "runs" / "d" / "checkpoints" / "main" / "step-00000012"
    (newest / "rng-1.pt").write_bytes((newest / "rng-1.pt").read_bytes()[:100])
    # As if killed after its last checkpoint, before the stage was recorded as done.
    (root / "runs" / "d" / "stages" / "main" / "student" / "done.json").unlink()
    try:
        resumed = torchrun(root, "distill", "recipe.toml", "--resume", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks resumed from different checkpoints and hung")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming main from step-00000008" in resumed.stdout


@pytest.mark.slow
@needs_torchrun
def test_on_policy_distillation_runs_on_two_processes(tiny, tmp_path):
    """Each rank samples its own micro-batches; the teachers score them live; DDP averages the gradients."""
    root = tmp_path / "work"
    root.mkdir()
    llama = tiny("llama", "causal", layers=2)
    jobs.write_trivia(root / "trivia.jsonl", n=24)
    jobs.write_recipe(root / "op.toml", {
        "name": "op", "task": "generate",
        "data": {"format": "triviaqa", "path": "trivia.jsonl", "max_length": 32, "answer_max_length": 6},
        "student": {"from_teacher": "big", "layers": [0]},
        "teachers": {"big": {"ref": str(llama)}, "small": {"ref": str(llama), "weight": 0.5}},
        "loss": {"alpha": 0.5, "kd_level": "on_policy"},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "eval_every": 10_000, "eval_batch_size": 16},
    })
    done = torchrun(root, "distill", "op.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    run = root / "runs" / "op"
    assert json.loads((run / "env.json").read_text())["processes"] == 2
    assert (run / "student" / "config.json").is_file()
    kd_losses = [json.loads(line)["kd"] for line in (run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "train"]
    assert kd_losses and all(math.isfinite(x) for x in kd_losses)


# --------------------------------------------------------------------------- sharded (FSDP)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine accelerate does shard")
@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharding_asked_for_on_a_machine_without_gpus_is_refused(monkeypatch, flag):
    """`accelerate launch --use_fsdp` on CPU: FSDP1 fails deep in accelerate, FSDP2 and DeepSpeed fall back to DDP."""
    monkeypatch.setenv(flag, "true")
    with pytest.raises(KdError, match="was asked for, but this machine has no GPU") as refused:
        make_accelerator()
    assert "train with DDP on CPU" in refused.value.hint


@pytest.mark.parametrize("plugins, refused", [
    ({"fsdp_plugin": SimpleNamespace(cpu_ram_efficient_loading=True)}, "--fsdp_cpu_ram_efficient_loading false"),
    ({"deepspeed_plugin": SimpleNamespace(zero3_init_flag=True)}, "--zero3_init_flag false"),
])
def test_sharding_that_loads_models_empty_or_partitioned_is_refused(plugins, refused):
    """kd's teachers are never sharded: every process must load them whole."""
    with pytest.raises(KdError, match="teachers") as error:
        check_model_loading(SimpleNamespace(state=SimpleNamespace(**{"deepspeed_plugin": None, **plugins})))
    assert refused in error.value.hint


def test_deepspeed_takes_the_recipes_batch_settings_or_refuses_the_job(teacher_dir, tmp_path):
    from accelerate.utils import DistributedType

    def fit(config: dict, **train) -> dict:
        job = jobs.classify_job(teacher_dir, tmp_path, batch_size=4, grad_accum=1)
        job.train = job.train.model_copy(update=train)
        plugin = SimpleNamespace(deepspeed_config=config)
        accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                      state=SimpleNamespace(deepspeed_plugin=plugin))
        _fit_sharding(job, accelerator, _projections(job))
        return config

    config = fit({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3}})
    assert config == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                      "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    with pytest.raises(KdError, match="grad_accum must be 1"):
        fit({"zero_optimization": {"stage": 2}}, grad_accum=2)
    with pytest.raises(KdError, match="sets gradient_clipping = 0.5, the recipe 1.0") as refused:
        fit({"gradient_clipping": 0.5, "zero_optimization": {"stage": 2}})
    assert '"auto"' in refused.value.hint


@pytest.mark.slow
@needs_torchrun
def test_an_fsdp_job_stopped_and_resumed_ends_where_an_uninterrupted_one_does(teacher_dir, tmp_path):
    """Two processes under FSDP2 on CPU (tests/distributed_fsdp.py says how): the checkpoints hold
    accelerate's shards; the resumed job ends bit for bit where the uninterrupted one does, and within
    1e-5 of one process taking the same examples each step; the saved student is the whole model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    script = Path(__file__).parent / "distributed_fsdp.py"
    said = []
    for mode in ("train", "resume"):
        done = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(jobs.free_port()),
                               str(script), str(teacher_dir), str(tmp_path), mode],
                              env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        said.append(done.stdout)
    assert "stopped at step 8" in said[0] and "resuming main from step-00000004" in said[1]
    shards = tmp_path / "parts" / "checkpoints" / "step-00000012" / "sharded"
    assert (shards / "pytorch_model_fsdp_0").is_dir() and (shards / "optimizer_0").is_dir()

    one = jobs.checkpointed_job(teacher_dir, tmp_path / "one", world=1)
    unsharded = parameter_count(one.student)
    run_job(one, make_accelerator(), show_progress=False)
    students = {name: tmp_path / name / "student" for name in ("whole", "parts", "one")}
    assert {json.loads((s / "training.json").read_text())["step"] for s in students.values()} == {12}
    weights = {name: load_file(s / "model.safetensors") for name, s in students.items()}
    assert jobs.max_difference(weights["parts"], weights["whole"]) == 0.0
    assert jobs.max_difference(weights["whole"], weights["one"]) < 1e-5
    saved = AutoModelForSequenceClassification.from_pretrained(students["parts"])
    assert sum(p.numel() for p in saved.parameters()) == unsharded
