"""Where a run folder keeps AutoAttack's progress, so that an interrupted evaluation continues."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

from natgrad.evaluation.settings import EvalSettings
from natgrad.rundir import RunDir


def autoattack_state_dir(run: Path, weights_sha256: str, s: EvalSettings, n: int) -> Path:
    """A folder per digest of the weights (``digest.model_digest`` of the loaded model) and of every setting
    that decides AutoAttack's work, so that an interrupted evaluation continues and no other weights or
    settings can ever pick its numbers up."""
    what = json.dumps([weights_sha256, s.attacks, s.eps, n, s.seed, s.batch_size, s.square_queries,
                       s.aa_attacks])
    return RunDir(run).autoattack_state / hashlib.sha256(what.encode()).hexdigest()[:16]


def remove_autoattack_state(state_dir: Path) -> None:
    """Delete a finished evaluation's progress (and the parent folder when no other evaluation left any)."""
    shutil.rmtree(state_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        state_dir.parent.rmdir()
