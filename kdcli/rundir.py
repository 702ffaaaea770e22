"""The run directory: every path kd reads or writes for one recipe.

``compare`` reads only these files, so runs made on different days or machines
can be compared. Writes go to a temporary sibling and are renamed into place when
complete (``atomic_dir``/``write_json``), so a crash never leaves a half output
that looks whole. A write that fails for a reason the user fixes (a full disk, a
read-only folder, a file where kd keeps a folder, a symlink loop) is a KdError
naming the output (``file_error``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
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
        path = Path(recipe.output_dir) / recipe.name
        try:
            root = path.resolve()
        except RuntimeError:  # a symlink loop (Python 3.13 resolves what it can; the first write then says ELOOP)
            raise symlink_loop(path) from None
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

    def stage_output(self, stage: str, role: object) -> Path:
        """A stage's best model for a trained role (`student`, `dataset`, `student:NAME`); the next stage starts
        from it."""
        return self.root / "stages" / stage / role_filename(role)

    def final(self, role: object) -> Path:
        """The last stage's best model: `student/` (distilled), `dataset/` (labels only) or
        `student-NAME/` (distilled from teacher NAME alone)."""
        return self.root / role_filename(role)

    @property
    def student(self) -> Path:
        return self.final("student")

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def logs(self) -> Path:
        """The experiment trackers' local files (`[log] report_to`), a folder per training job."""
        return self.root / "logs"

    @property
    def resolved_recipe(self) -> Path:
        return self.root / "recipe.resolved.toml"

    @property
    def env(self) -> Path:
        return self.root / "env.json"

    def export(self, role: object, fmt: str) -> Path:
        """`kd export`'s files of a trained role in one format: `export/student-onnx-int8/`."""
        return self.root / "export" / f"{role_filename(role)}-{fmt}"

    def eval(self, role: object) -> Path:
        return self.root / "eval" / f"{role_filename(role)}.json"

    def eval_file(self, role: object, data: Path, data_fingerprint: str) -> Path:
        """Where `kd eval --data FILE` saves a role's result: apart from the split results `kd compare` reads."""
        return self.root / "eval" / "files" / f"{data.stem}-{data_fingerprint[:8]}" / f"{role_filename(role)}.json"

    def bench(self, role: object) -> Path:
        return self.root / "bench" / f"{role_filename(role)}.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


def role_filename(role: object) -> str:
    """A role (``kdcli.roles.Role`` or its text) as a file name: `teacher:finbert` -> `teacher-finbert`."""
    return str(role).replace(":", "-").replace("/", "_")


# ----------------------------------------------------------------------- atomic writes
#
# A temporary sibling is named `.NAME.tmp-PID.HOST-XXXX` (a directory, or `.NAME.tmp-PID.HOST`
# for a file) and the output it replaces is parked as `.NAME.old-PID.HOST` for the instant
# between the two renames. A process killed with SIGKILL cannot clean up after itself, so the
# next write into the same folder removes what a dead process of this machine left there (and
# puts a parked output back if the kill fell between the two renames). Only processes of this
# machine are judged: on a shared file system another machine's pids mean nothing here.

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)\.(?P<host>[0-9a-f]{8})(?:-.*)?$")
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# A write the file system refuses: fixed by the user (chmod, a remount, another output_dir), not by kd.
NOT_WRITABLE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def leftovers(folder: Path, name: str | None = None) -> list[Path]:
    """Partial outputs that a dead kd process of this machine left in ``folder`` (for ``name`` only, if given)."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _LEFTOVER.match(entry.name)
        if not match or match["host"] != _HOST or (name is not None and match["name"] != name):
            continue
        if not _alive(int(match["pid"])):
            found.append(entry)
    return sorted(found)


def clean_leftovers(folder: Path, say: Any = None) -> list[Path]:
    """Remove the partial outputs of interrupted writes in ``folder``; put back an output parked by
    a write that was killed between its two renames. Returns what was removed or restored."""
    say = say or (lambda message: print(message, file=sys.stderr))
    done = []
    for entry in leftovers(folder):
        match = _LEFTOVER.match(entry.name)
        assert match is not None
        final = entry.with_name(match["name"])
        if match["kind"] == "old" and not final.exists():
            entry.rename(final)  # the previous complete output; its replacement never arrived
            say(f"kd: restored {final}, which an interrupted write had moved aside")
        else:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            say(f"kd: removed {entry.name}, the partial output of an interrupted kd process, from {folder}")
        done.append(entry)
    return done


def is_disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """True when ``exc`` means the device (or the user's quota) is full.

    An OSError says so by its errno; safetensors and torch.save wrap the OS error in their
    own exception types, so their messages are read too.
    """
    for error in (exc, exc.__cause__, exc.__context__):
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if error is not None and any(
            text in str(error)
            for text in ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
        ):
            return True
    if where is not None and isinstance(exc, (OSError, RuntimeError)):
        # torch.save says only "file write failed" (a RuntimeError): look at the device itself.
        try:
            return shutil.disk_usage(_existing(where)).free < 1 << 20
        except OSError:
            return False
    return False


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def no_space(where: Path) -> KdError:
    """The KdError for a full device while writing ``where``."""
    try:
        free = f"{shutil.disk_usage(_existing(where)).free / 1e6:,.0f} MB free there now"
    except OSError:
        free = "free space unknown"
    return KdError(
        f"no space left on the device writing {where} ({free})",
        "free some space (or set output_dir to a larger disk) and run the same command again; earlier "
        "outputs are intact, and `kd distill --resume` continues from the last checkpoint",
    )


def file_error(exc: BaseException, where: Path | None = None) -> KdError | None:
    """The KdError for an OSError the user can fix, naming ``where`` (else the path the error names):
    a full disk, a folder kd may not write, a file or a broken symlink where kd keeps a folder, a
    symlink loop. None for any other error, which is a bug and keeps its traceback.
    """
    if is_disk_full(exc):
        return no_space(where or Path(getattr(exc, "filename", None) or "."))
    if not isinstance(exc, OSError) or not (where or isinstance(exc.filename, str)):
        return None
    path = where or Path(exc.filename)
    if exc.errno in NOT_WRITABLE:
        if where is None and _unreadable(path):  # outside the writers, a refused read looks the same
            return KdError(f"cannot read {path}: permission denied", "make it readable, then run the command again")
        return KdError(
            f"cannot write {path}: {NOT_WRITABLE[exc.errno]}",
            "make it writable (or set output_dir in the recipe to a folder you can write) and run the command again",
        )
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = _in_the_way(path)
        if blocker is not None and blocker.is_symlink():
            return KdError(
                f"{blocker} is a symlink to {os.readlink(blocker)}, which does not exist",
                "create the folder it points to (or mount its disk), or remove the link; then run the command again",
            )
        if blocker is not None:
            return KdError(f"{blocker} is a file, but kd keeps a folder there",
                           "move or delete the file (kd makes the folder itself), then run the command again")
    if exc.errno == errno.ELOOP:
        return symlink_loop(path)
    return None


def _unreadable(path: Path) -> bool:
    """True when ``path`` exists and may not be read: a permission error on it was a read, not a write."""
    try:
        return path.exists() and not os.access(path, os.R_OK)
    except OSError:
        return False


def _in_the_way(path: Path) -> Path | None:
    """The file, or symlink to nothing, at ``path`` or above it where kd needs a folder; None if none is."""
    for candidate in (path, *path.parents):
        if candidate.is_symlink() and not candidate.exists():
            return candidate  # a link to a folder that is gone: a scratch disk not mounted, say
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def symlink_loop(path: Path) -> KdError:
    """The KdError for ``path`` (a folder kd reads or writes) that cannot be reached for a symlink loop."""
    link = path
    for candidate in reversed([path, *path.parents]):  # the outermost link that leads back to itself
        try:
            os.stat(candidate)
        except OSError as exc:
            if exc.errno == errno.ELOOP and candidate.is_symlink():
                link = candidate
                break
    return KdError(f"{link} is a symlink loop: following it leads back to itself",
                   "remove the link or point it at a real folder (`ls -l` shows where it points), "
                   "then run the command again")


@contextmanager
def writing(where: Path) -> Iterator[None]:
    """Turn an OSError the user can fix (see ``file_error``), raised while writing ``where``, into a
    KdError naming ``where``: the output the user knows, not a temporary sibling of it."""
    try:
        yield
    except OSError as exc:
        error = file_error(exc, where)
        if error is None:
            raise
        raise error from None


def clear_folder(folder: Path) -> None:
    """Remove everything in ``folder`` and keep the folder. It may be a symlink to another disk
    (checkpoints on a scratch disk, say): the link is the user's, what is in the folder is kd's."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _tag() -> str:
    return f"{os.getpid()}.{_HOST}"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; it replaces ``final`` only if the block succeeds.

    A full device, a read-only folder or a file in the way becomes a KdError naming ``final``; the
    previous ``final`` is left as it was.
    """
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(final.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{_tag()}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; outputs should be as readable as any other file
    try:
        try:
            yield tmp
        except KdError:
            raise
        except Exception as exc:
            if is_disk_full(exc, final.parent):
                raise no_space(final) from exc
            raise
        with writing(final):
            if final.exists():
                old = final.with_name(f".{final.name}.old-{_tag()}")
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def scratch(folder: Path, name: str, output: Path) -> Iterator[Any]:
    """A function that makes (on its first call) and returns a temporary folder in ``folder``, for
    work too large for memory; the folder goes at the end, with the folders made for it.

    It is named as a partial output (``.NAME.tmp-PID.HOST-...``), so one that a killed process left
    is removed like any other (``clean_leftovers``). A write the file system refuses becomes a
    KdError naming ``output``, the output the work is for.
    """
    made: list[Path] = []

    def get() -> Path:
        if not made:
            with writing(output):
                parents = [p for p in (folder, *folder.parents) if not p.exists()]
                folder.mkdir(parents=True, exist_ok=True)
                made.extend([Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{_tag()}-", dir=folder)), *parents])
        return made[0]

    try:
        yield get
    finally:
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
            for parent in made[1:]:  # innermost first; one that holds something now stays, and so do those above it
                try:
                    parent.rmdir()
                except OSError:
                    break


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling and rename it over ``path``: ``path`` is never half written.

    A full device, a read-only folder or a file in the way becomes a KdError naming ``path``; the
    previous ``path`` is left as it was.
    """
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{_tag()}")
    try:
        with writing(path):
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def record_recipe(recipe: Recipe, path: Path, replace: bool = True) -> None:
    """Write the resolved recipe a command ran with; only on change, since `kd run` reads its time stamp.
    ``replace=False`` (readers: eval, bench) writes it only where there is none yet."""
    from kdcli.recipe import to_toml

    if path.is_file() and not replace:
        return
    text = to_toml(recipe)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)


def write_json(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------- finished outputs
#
# A stage's student and a fine-tuned teacher are folders that end with `done.json`: the
# fingerprint of the inputs they were made from and the sha256 of every file in the folder. A
# folder counts as done only while both still hold, so a file deleted or changed by hand makes
# the step run again instead of passing a broken model on as "up to date".

DONE = "done.json"


def mark_done(folder: Path, record: dict[str, Any]) -> None:
    """Write ``folder/done.json``: ``record`` (with its ``fingerprint``) and the hash of every file."""
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != DONE}
    write_json(folder / DONE, {**record, "files": files})


def done_state(folder: Path, fingerprint: str) -> tuple[bool, str | None]:
    """Whether ``folder`` is a whole output made from ``fingerprint``; and, when it was made from
    it but is no longer whole, what is wrong with it (None otherwise)."""
    try:
        record = read_json(folder / DONE)
    except (OSError, ValueError):
        return False, None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return False, None
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return False, "done.json does not list its files"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return False, f"{name} is missing"
        if sha256_file(path) != digest:
            return False, f"{name} has changed since it was written"
    return True, None


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
    with writing(run.root):  # a locked command's first write: a read-only run stops here, before any work
        run.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(run.root / ".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise KdError(
                f"another kd process is working on {run.root}",
                "wait for it to finish (or stop it); if none is running, delete the .lock file in that folder",
            ) from None
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        lock.release()
        # A first command that failed leaves no run directory behind: not the lock, not the copy of
        # the recipe it never ran with, not the data it prepared on the way (seconds to make again).
        # Checkpoints, caches and models cost more than that, and stay.
        disposable = {".lock", ".prepare.lock", run.resolved_recipe.name, "data"} if failed else {".lock"}
        if created and {p.name for p in run.root.iterdir()} <= disposable:
            shutil.rmtree(run.root)
            for folder in created[1:]:
                folder.rmdir()
