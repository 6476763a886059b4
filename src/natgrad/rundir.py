"""The run folder's own files: their names, a lock against two processes in one folder, and the checks
that keep natgrad from touching files it did not write."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path

from natgrad.errors import UserError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
CHECKPOINT = Path(CHECKPOINTS) / "last.pt"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"
SUMMARY = "summary.json"
EVAL = "eval.json"
ANALYSIS = "analysis"
AUTOATTACK_STATE = "autoattack-state"
LOCK = ".natgrad.lock"
# Everything natgrad writes into a run folder, checked for symlinks before a run writes there.
OWN = (CONFIG, METRICS, CHECKPOINTS, str(CHECKPOINT), WEIGHTS, EMA_WEIGHTS, SUMMARY, EVAL, ANALYSIS, AUTOATTACK_STATE)

# Temporary files of natgrad's atomic writes (checkpoint.atomic_write): ".NAME.natgrad-XXXXXXXX.tmp".
TEMP_PREFIX = ".natgrad-"
_TEMP = re.compile(r"^\..+\.natgrad-[A-Za-z0-9_]+\.tmp$")


def is_leftover(path: Path) -> bool:
    """A temporary file of a natgrad write that a killed process left behind (never a user's file)."""
    return path.is_file() and not path.is_symlink() and bool(_TEMP.match(path.name))


def is_empty(folder: Path) -> bool:
    """No file in ``folder`` but natgrad's lock and leftover temporary files."""
    return all(p.name == LOCK or is_leftover(p) for p in folder.iterdir())


def remove_leftovers(folder: Path) -> None:
    """Delete the leftover temporary files of natgrad's writes in the run folder and its checkpoints."""
    for d in (folder, folder / CHECKPOINTS):
        if d.is_dir() and not d.is_symlink():
            for p in d.iterdir():
                if is_leftover(p):
                    p.unlink(missing_ok=True)


def refuse_symlinks(folder: Path) -> None:
    """A run writes only into the folder it names: a symlink among its files would send writes elsewhere."""
    for name in OWN:
        if (folder / name).is_symlink():
            raise UserError(f"{folder / name} is a symbolic link; natgrad writes only real files in a run folder: "
                            "replace it with the file itself or choose another --out")


class RunLock:
    """An advisory lock (``flock``) on a run folder, held while one process writes there.

    The lock file holds the owner's pid. The kernel releases the lock when its process ends, however it
    ends, so a lock left by a dead process is free to take; the file is removed on release.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None

    def refuse_if_held(self) -> None:
        """Fail fast, taking nothing, when another process holds the lock."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"{self.path.parent} is in use by another natgrad process{self._owner()}; wait for "
                            "it to finish or choose another --out") from None
        finally:
            os.close(fd)

    def acquire(self) -> RunLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise UserError(f"{self.path.parent} is in use by another natgrad process{self._owner()}; wait for "
                                "it to finish or choose another --out") from None
            # The file may have been removed by its previous owner between our open and our lock: retry on a new one.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def _owner(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            return f" (pid {int(self.path.read_text().strip())})"
        return ""

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)  # closing releases the lock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked(folder: Path, enabled: bool = True) -> Iterator[RunLock | None]:
    """``RunLock(folder)`` for the block where ``enabled`` (the writing process), else nothing."""
    if not enabled:
        yield None
        return
    with RunLock(folder) as lock:
        yield lock
