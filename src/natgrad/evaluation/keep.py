"""Results that cannot be written are kept elsewhere, so that minutes of work are not lost."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from natgrad.errors import UserError


def write_or_keep(write: Callable[[], object], text: str, path: Path, what: str) -> None:
    """Run ``write`` (which writes ``path``); when it fails, keep ``text`` in a file of the temporary folder
    (or on stdout) and say where, so that minutes of work are not lost to a full disk or a read-only folder."""
    try:
        write()
        return
    except OSError as e:
        reason = e.strerror or str(e)
    try:
        fd, kept = tempfile.mkstemp(prefix=f"natgrad-{path.stem}-", suffix=path.suffix or ".txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        where = f"they are kept in {kept}"
    except OSError:
        print(text)
        where = "they are printed above"
    raise UserError(f"cannot write {path} ({reason}); the {what} are not lost: {where}")
