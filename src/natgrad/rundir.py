"""The run folder: its files' names and paths (:class:`RunDir`), a lock against two processes in one
folder, and the checks that keep natgrad from touching files it did not write."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from natgrad.build import LoadedModel, load_trained
from natgrad.config import RunConfig, from_dict, read_yaml_mapping, validate
from natgrad.errors import UserError
from natgrad.files import is_leftover
from natgrad.runfiles import (
    ANALYSIS,
    ANALYSIS_JSON,
    AUTOATTACK_STATE,
    CHECKPOINT,
    CHECKPOINTS,
    CONFIG,
    EMA_WEIGHTS,
    EVAL,
    LOCK,
    METRICS,
    SUMMARY,
    WEIGHTS,
)

# Everything natgrad writes into a run folder, checked for symlinks before a run writes there.
OWN = (CONFIG, METRICS, CHECKPOINTS, str(CHECKPOINT), WEIGHTS, EMA_WEIGHTS, SUMMARY, EVAL, ANALYSIS, AUTOATTACK_STATE)

@dataclass(frozen=True)
class RunDir:
    """A run folder of DESIGN.md's contract: where each of its files lies, and how to read them back."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def ema_weights(self) -> Path:
        return self.path / EMA_WEIGHTS

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def eval_json(self) -> Path:
        return self.path / EVAL

    @property
    def analysis(self) -> Path:
        return self.path / ANALYSIS

    @property
    def analysis_json(self) -> Path:
        return self.path / ANALYSIS / ANALYSIS_JSON

    @property
    def autoattack_state(self) -> Path:
        return self.path / AUTOATTACK_STATE

    def is_run(self) -> bool:
        """Whether the folder holds a natgrad run (its config.yaml)."""
        return self.config.is_file()

    def read_config(self) -> RunConfig:
        """The checked configuration of the run (its ``config.yaml``), as ``train`` would accept it."""
        if not self.is_run():
            raise UserError(f"{self.path} is not a natgrad run folder (no config.yaml); give a run folder")
        data = read_yaml_mapping(self.config, str(self.config))
        if "method" not in data:  # natgrad writes every key: a file without it was not written by `natgrad train`
            raise UserError(f"{self.config} names no method; it is not a config natgrad wrote: restore it or train "
                            "the run again")
        try:
            cfg = from_dict(data)
            validate(cfg)
        except UserError as e:
            raise UserError(f"{self.config}: {e}") from None
        return cfg

    def model_weights(self, ema: bool = True) -> Path:
        """The EMA weights when ``ema`` and the run has them, else the model's."""
        return self.ema_weights if ema and self.ema_weights.is_file() else self.weights

    def load_model(self, ema: bool = True, device: torch.device | str = "cpu",
                   model_name: str | None = None) -> LoadedModel:
        """The trained model (EMA weights by default) in eval mode; ``model_name`` overrides the config's."""
        cfg = self.read_config()
        weights = self.model_weights(ema)
        if not weights.is_file():
            raise UserError(f"{self.path} holds no {WEIGHTS}; train it to the end of an epoch first")
        if model_name is not None:
            cfg.model.name = model_name
        return load_trained(cfg, weights, self.name, device)


def weights_file(path: str | os.PathLike) -> Path:
    """A .safetensors file as given, or a run folder's ``model.safetensors``."""
    path = Path(path)
    return RunDir(path).weights if path.is_dir() else path


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
