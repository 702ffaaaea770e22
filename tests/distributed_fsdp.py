"""Run the tiny classify job under FSDP2 on CPU (torchrun, gloo); argv: TEACHER_DIR ROOT MODE.

MODE ``train``: ROOT/whole runs to the end, then ROOT/parts stops after its validation at step 8,
before that step's checkpoint (its newest is step 4); MODE ``resume``: ROOT/parts resumes.
tests/test_distributed.py compares the two.

accelerate (1.15) turns FSDP on for GPU processes only: on CPU it leaves the model to DDP
(state.py chooses FSDP for MULTI_GPU and the like, never MULTI_CPU), and kd refuses such a launch.
torch's FSDP2 runs on gloo, though, so this script sets accelerate's state to FSDP itself, as
accelerate does on GPUs; everything after that is accelerate's and kd's own code.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from jobs import checkpointed_job  # noqa: E402
from kdcli.runtime import make_accelerator  # noqa: E402
from kdcli.train import run_job  # noqa: E402


class Stop(Exception):
    pass


def fsdp_on_cpu():
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = make_accelerator("no")
    PartialState._shared_state["distributed_type"] = accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    assert accelerator.is_fsdp2
    return accelerator


def stop_at_step_8(samples: int, scores: dict) -> None:
    if samples == 32:
        raise Stop


teacher_dir, root, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
accelerator = fsdp_on_cpu()
if mode == "train":
    run_job(checkpointed_job(teacher_dir, root / "whole", world=2), accelerator, show_progress=False)
    try:
        run_job(checkpointed_job(teacher_dir, root / "parts", world=2), accelerator, show_progress=False,
                on_eval=stop_at_step_8)
    except Stop:
        print("stopped at step 8")
else:
    run_job(checkpointed_job(teacher_dir, root / "parts", world=2), accelerator, resume=True, show_progress=False)
