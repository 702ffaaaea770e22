"""Run the tiny classify job under torchrun (gloo on CPU); argv: TEACHER_DIR OUT_DIR BATCH ACCUM.

tests/test_train.py starts it with `torchrun --nproc_per_node 2` and compares the
result with one process that takes the same examples per optimizer step.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from jobs import classify_job  # noqa: E402
from kdcli.runtime import make_accelerator  # noqa: E402
from kdcli.train import run_job  # noqa: E402

teacher_dir, out, batch, accum = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
job = classify_job(teacher_dir, out, batch_size=batch, grad_accum=accum, dropout=False)
run_job(job, make_accelerator("no"), show_progress=False)
