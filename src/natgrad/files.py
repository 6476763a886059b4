"""Files natgrad writes: atomically (temp, then rename), with the umask's mode, and never over another kind of file."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from natgrad.errors import UserError

# Temporary files of natgrad's atomic writes: ".NAME.natgrad-XXXXXXXX.tmp".
TEMP_PREFIX = ".natgrad-"
_TEMP = re.compile(r"^\..+\.natgrad-[A-Za-z0-9_]+\.tmp$")


def is_leftover(path: Path) -> bool:
    """A temporary file of a natgrad write that a killed process left behind (never a user's file)."""
    return path.is_file() and not path.is_symlink() and bool(_TEMP.match(path.name))


def _file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the umask (mkstemp's files are owner-only)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_PREFIX}", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())  # after write: some writers (safetensors) create the file anew
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# What a file natgrad may overwrite must already look like: it never replaces another kind of file.
_KINDS: dict[str, tuple[str, Callable[[bytes], bool]]] = {
    "json": ("a JSON file", lambda head: head.lstrip()[:1] in (b"{", b"[")),
    "html": ("an HTML file", lambda head: head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))),
}


def check_destination(path: Path, kind: str, flag: str) -> None:
    """Refuse, before any work, a destination that cannot be written or would replace something else.

    ``kind`` is ``json`` or ``html`` for a file (an existing file must be of that kind), ``folder`` for a
    folder; ``flag`` names the option in the message.
    """
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{flag} {path} is a symbolic link; give the real path")
    if kind == "folder":
        if path.exists() and not path.is_dir():
            raise UserError(f"{flag} {path} is a file, not a folder; give a folder")
    else:
        what, looks_right = _KINDS[kind]
        if path.is_dir():
            raise UserError(f"{flag} {path} is a folder; give a file name, e.g. {path / ('results.' + kind)}")
        if path.exists():
            with open(path, "rb") as f:
                head = f.read(64)
            if head and not looks_right(head):
                raise UserError(f"{flag} {path} exists and is not {what}; natgrad does not overwrite other files: "
                                "choose another name")
    parent = next(p for p in [path if kind == "folder" else path.parent, *path.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {parent}; choose a writable place")
