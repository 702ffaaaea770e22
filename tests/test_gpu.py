"""On GPUs, through `accelerate launch`: DDP in bf16, FSDP2, and DeepSpeed ZeRO-2 and ZeRO-3 each
distil a tiny student, resume in a new launch from a checkpoint (as if killed just after it), and
end where the uninterrupted run ends; the saved student is the whole model.

Marked gpu and skipped without CUDA (the DeepSpeed ones without deepspeed too). Two processes
when there are two GPUs, else one: then "DDP" is one bf16 process, and FSDP and DeepSpeed shard
over one process (their checkpoints still go through accelerate's save_state / load_state).
scripts/gpu_checks.sh runs them all.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jobs

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
PROCESSES = min(GPUS, 2)
ACCELERATE = Path(sys.executable).parent / "accelerate"
ENV = {k: v for k, v in os.environ.items() if k != "KD_DEBUG"} | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# GPU kernels and collectives need not add up in the same order twice, so a resumed run may differ from
# the uninterrupted one in the last bits; a resume that lost the optimizer state or the step is far off.
TOLERANCE = 1e-4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPUS, reason="needs a CUDA GPU")]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")

# accelerate launch flags, train.mixed_precision, whether the checkpoints hold accelerate's shards.
# DeepSpeed runs in fp32: in bf16 its model weights (and so the saved student) are bf16, too coarse to compare.
MODES = {
    "ddp-bf16": (["--multi_gpu"] if PROCESSES > 1 else [], "bf16", False),
    "fsdp": (["--use_fsdp", "--fsdp_version", "2", "--fsdp_cpu_ram_efficient_loading", "false"], "bf16", True),
    "zero2": (["--use_deepspeed", "--zero_stage", "2"], "no", True),
    "zero3": (["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "false"], "no", True),
}


def launch(root: Path, mode: str, *args: str) -> subprocess.CompletedProcess:
    flags, precision, _ = MODES[mode]
    command = [str(ACCELERATE), "launch", "--num_processes", str(PROCESSES), "--num_machines", "1",
               "--mixed_precision", precision, "--dynamo_backend", "no", "--main_process_port", str(jobs.free_port()),
               *flags, "-m", "kdcli.cli", *args]
    done = subprocess.run(command, cwd=root, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def write_run(root: Path, model: Path, mode: str) -> None:
    per_step = 4 * PROCESSES  # samples: batch 4 on each process
    jobs.write_classify_run(
        root, model, name="d", rows=200, loss={"alpha": 0.5},
        train={"max_steps": 24, "batch_size": 4, "lr": 1e-3, "eval_every": 4 * per_step,
               "checkpoint_every": 4 * per_step, "keep_last": 6, "log_every": per_step, "metric": "loss",
               "eval_batch_size": 32, "mixed_precision": MODES[mode][1]},
    )


@pytest.mark.parametrize("mode", [
    "ddp-bf16", "fsdp", pytest.param("zero2", marks=needs_deepspeed), pytest.param("zero3", marks=needs_deepspeed),
])
def test_a_resumed_run_ends_where_the_uninterrupted_one_does_and_saves_the_whole_student(tiny, tmp_path, mode):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    model = tiny("bert", "sequence-classification", num_labels=3, layers=2)
    whole = tmp_path / "whole"
    write_run(whole, model, mode)
    launch(whole, mode, "distill", "recipe.toml")
    run = whole / "runs" / "d"
    checkpoints = sorted((run / "checkpoints" / "main").glob("step-*"))
    assert [c.name for c in checkpoints] == [f"step-{s:08d}" for s in range(4, 25, 4)]
    sharded = MODES[mode][2]
    for checkpoint in checkpoints:
        assert (checkpoint / "sharded").is_dir() == sharded and (checkpoint / "optimizer.pt").is_file() != sharded

    # As if killed just after the newest checkpoint before the end that holds the best model so far.
    parts = tmp_path / "parts"
    shutil.copytree(whole, parts)
    resumed_run = parts / "runs" / "d"
    states = {c.name: json.loads((c / "state.json").read_text()) for c in checkpoints[:-1]}
    start = max(name for name, state in states.items() if state["best_step"] == state["step"])
    for checkpoint in checkpoints:
        if checkpoint.name > start:
            shutil.rmtree(resumed_run / "checkpoints" / "main" / checkpoint.name)
    (resumed_run / "stages" / "main" / "student" / "done.json").unlink()
    shutil.rmtree(resumed_run / "student")
    done = launch(parts, mode, "distill", "recipe.toml", "--resume")
    assert f"resuming main from {start}" in done.stdout

    ends = {name: json.loads((r / "student" / "training.json").read_text())["step"] for name, r in
            (("whole", run), ("parts", resumed_run))}
    assert ends["whole"] == ends["parts"], ends
    difference = jobs.max_difference(load_file(resumed_run / "student" / "model.safetensors"),
                                     load_file(run / "student" / "model.safetensors"))
    assert difference < TOLERANCE, f"{mode}: the resumed student differs by {difference}"
    saved = AutoModelForSequenceClassification.from_pretrained(resumed_run / "student")
    original = AutoModelForSequenceClassification.from_pretrained(model)
    assert saved.num_parameters() == original.num_parameters()
