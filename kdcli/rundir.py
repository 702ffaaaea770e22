"""The run directory: every path kd reads or writes for one recipe.

``compare`` reads only these files, so runs made on different days or machines
can be compared. Writes go to a temporary sibling and are renamed into place when
complete (``atomic_dir``/``write_json``), so a crash never leaves a half output
that looks whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kdcli.errors import KdError
from kdcli.recipe import Recipe


class RunDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> "RunDir":
        root = (Path(recipe.output_dir) / recipe.name).resolve()
        here = Path.cwd().resolve()
        if not recipe.allow_outside and not root.is_relative_to(here):
            raise KdError(
                f"run directory {root} is outside the current directory {here}",
                "use a plain `name` and a relative `output_dir`, or set allow_outside = true in the recipe",
            )
        return cls(root)

    def data(self, stage: str) -> Path:
        return self.root / "data" / stage

    def cache(self, stage: str, teacher: str) -> Path:
        return self.root / "cache" / stage / teacher

    def teacher(self, name: str) -> Path:
        """A teacher fine-tuned by kd (recipe `finetune` table)."""
        return self.root / "teachers" / name

    def checkpoints(self, job: str) -> Path:
        """Resumable checkpoints of one training job (`main`, `main.dataset`, `teacher.NAME`)."""
        return self.root / "checkpoints" / job

    def stage_output(self, stage: str, role: str) -> Path:
        """A stage's best model for a role (`student` or `dataset`); the next stage starts from it."""
        return self.root / "stages" / stage / role

    def final(self, role: str) -> Path:
        """The last stage's best model: `student/` (distilled) or `dataset/` (labels only)."""
        return self.root / role

    @property
    def student(self) -> Path:
        return self.final("student")

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def resolved_recipe(self) -> Path:
        return self.root / "recipe.resolved.toml"

    @property
    def env(self) -> Path:
        return self.root / "env.json"

    def eval(self, role: str) -> Path:
        return self.root / "eval" / f"{role_filename(role)}.json"

    def bench(self, role: str) -> Path:
        return self.root / "bench" / f"{role_filename(role)}.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


def role_filename(role: str) -> str:
    """`teacher:finbert` -> `teacher-finbert` (no colons in file names)."""
    return role.replace(":", "-").replace("/", "_")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; it replaces ``final`` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; outputs should be as readable as any other file
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@contextmanager
def run_lock(run: RunDir) -> Iterator[None]:
    """Hold ``runs/NAME/.lock`` so that two kd processes never write the same run at once.

    Under `accelerate launch` every process of one job shares the lock: the launcher sets
    LOCAL_RANK, and only rank 0 takes it.
    """
    from filelock import FileLock, Timeout

    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        yield
        return
    created = [p for p in (run.root, *run.root.parents) if not p.exists()]
    run.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run.root / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise KdError(
            f"another kd process is working on {run.root}",
            "wait for it to finish (or stop it); if none is running, delete the .lock file in that folder",
        ) from None
    try:
        yield
    finally:
        lock.release()
        # A command that failed before writing anything leaves nothing behind, not even the lock.
        if created and [p.name for p in run.root.iterdir()] == [".lock"]:
            (run.root / ".lock").unlink()
            for folder in created:
                folder.rmdir()
