#!/usr/bin/env bash
# kd's GPU checks (tests/test_gpu.py), all of them in one go, in under 10 minutes: through
# `accelerate launch`, DDP in bf16, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 each train a tiny student,
# resume it in a new launch and check the saved student (docs/distributed.md).
#
# Needs a CUDA GPU (two for real DDP) and the test extras; without deepspeed the two ZeRO checks
# are skipped, and the summary says so:
#   pip install -e '.[test]' deepspeed
#   scripts/gpu_checks.sh            # extra arguments go to pytest, e.g. -k fsdp
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU: nothing to check")'
# -n 0: one check at a time (each launch takes every GPU); -rs: say why a check was skipped.
exec timeout 600 "$PYTHON" -m pytest -n 0 -m gpu -rs -v tests/test_gpu.py "$@"
