"""`kd cache-teachers recipe.toml` in each folder given, under torchrun; argv: SHARD_ROWS FOLDER...

tests/test_distributed.py compares the caches with those one process builds. Shards of SHARD_ROWS
rows (kd's are 65,536) put several shards in a tiny split. Each process prints how many batches its
teachers answered, so the test sees that the work was shared.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import kdcli.cache as cache  # noqa: E402
from kdcli.cli import app  # noqa: E402

cache.SHARD_ROWS = int(sys.argv[1])
answered = 0
answer = cache.LiveTeacher.__call__


def counted(self, examples, split):
    global answered
    answered += 1
    return answer(self, examples, split)


cache.LiveTeacher.__call__ = counted
for folder in sys.argv[2:]:
    os.chdir(folder)
    code = app(["cache-teachers", "recipe.toml"], standalone_mode=False, prog_name="kd")
    if code:
        sys.exit(code)
print(f"process {os.environ['RANK']} answered {answered} batches", flush=True)
