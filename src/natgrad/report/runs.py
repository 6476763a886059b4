"""Read what a run folder holds: config, per-epoch metrics, eval.json and analysis/analysis.json.

Only ``config.yaml`` is required; every other file is optional, and one that is missing or
unreadable is recorded in :attr:`Run.problems` instead of stopping the report.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from natgrad.config import read_yaml_mapping
from natgrad.digest import file_digest
from natgrad.errors import UserError
from natgrad.report.formatting import is_number
from natgrad.runfiles import ANALYSIS, ANALYSIS_JSON, CONFIG, EVAL, METRICS, SUMMARY

ANALYSIS_FILE = Path(ANALYSIS) / ANALYSIS_JSON
EVAL_FILE = Path(EVAL)


@dataclass
class Run:
    """One trained model as the report sees it."""

    path: Path
    label: str
    config: dict
    summary: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    eval: dict | None = None
    analysis: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def method(self) -> str | None:
        return _text(self.config.get("method")) or _text(self.summary.get("method"))

    @property
    def architecture(self) -> str | None:
        model = mapping(self.config.get("model"))
        name, act = _text(model.get("name")) or _text(self.summary.get("model")), _text(model.get("act"))
        return f"{name} ({act})" if name and act else name

    @property
    def dataset(self) -> str | None:
        return _text(mapping(self.config.get("data")).get("name")) or _text(self.summary.get("data"))

    @property
    def eps(self) -> float | None:
        """The eps the model was trained for."""
        for source in (self.config, self.summary):
            if is_number(source.get("eps")):
                return float(source["eps"])
        return None

    @property
    def analysis_eps(self) -> float | None:
        """The eps the analysis attacked with (``natgrad analyze --eps``), else the training eps."""
        eps = mapping(self.analysis).get("eps")
        return float(eps) if is_number(eps) else self.eps

    @property
    def epochs_done(self) -> int | None:
        if self.metrics:
            return max(m["epoch"] for m in self.metrics)
        done = self.summary.get("epochs_done")
        return int(done) if is_number(done) else None

    @property
    def epochs(self) -> int | None:
        for value in (self.config.get("epochs"), self.summary.get("epochs")):
            if is_number(value):
                return int(value)
        return None

    @property
    def analysis_dir(self) -> Path:
        return self.path / ANALYSIS_FILE.parent

    def section(self, name: str) -> dict | None:
        """A section of analysis.json (``gradients``, ``geometry``, ...) or None."""
        value = (self.analysis or {}).get(name)
        return value if isinstance(value, dict) else None

    def command(self, verb: str) -> str:
        """The command that fills a missing part, e.g. ``natgrad analyze runs/x``."""
        where = shlex.quote(str(self.path))
        if verb == "eval":
            return f"natgrad eval {where} --json {shlex.quote(str(self.path / EVAL_FILE))}"
        return f"natgrad {verb} {where}"


def load_runs(paths: list[Path | str]) -> list[Run]:
    """Read every run folder; bad input raises :class:`UserError` before anything is drawn."""
    if not paths:
        raise UserError("no run folders given; write e.g. `natgrad report runs/a runs/b --out report.html`")
    runs = [load_run(Path(p)) for p in paths]
    _unique_labels(runs)
    return runs


FIX = "give run folders written by `natgrad train`"


def _same_weights(results: dict, run: Path) -> bool:
    """Whether results that name their weights' digest were computed on the weights the run folder holds."""
    digest, weights = results.get("weights_sha256"), results.get("weights")
    if not digest or not weights:
        return True  # written before evaluations recorded their weights
    path = run / Path(str(weights)).name
    return file_digest(path) == digest


def load_run(path: Path) -> Run:
    """One run folder; it must exist and hold ``config.yaml``."""
    if not path.exists():
        raise UserError(f"{path} does not exist; {FIX}")
    if not path.is_dir() or not (path / CONFIG).is_file():
        raise UserError(f"{path} is not a natgrad run folder (no config.yaml); {FIX}")
    try:
        config = read_yaml_mapping(path / CONFIG, str(path / CONFIG))
    except UserError as e:
        raise UserError(f"{e}; {FIX}") from None
    run = Run(path=path, label=path.resolve().name or str(path), config=config)
    run.summary = _read_json(path / SUMMARY, run) or {}
    run.metrics = _read_metrics(path / METRICS, run)
    run.eval = _read_json(path / EVAL_FILE, run)
    if run.eval is not None and not isinstance(run.eval.get("results", []), list):
        run.problems.append(f"{EVAL_FILE} has no list of results")
        run.eval = None
    if run.eval is not None and not _same_weights(run.eval, path):
        run.problems.append(f"{EVAL_FILE} was computed on other weights than the folder holds now: its numbers are "
                            "left out; run `natgrad eval` again")
        run.eval = None
    run.analysis = _read_json(path / ANALYSIS_FILE, run)
    if run.analysis is not None and not _same_weights(run.analysis, path):
        run.problems.append(f"{ANALYSIS_FILE} was computed on other weights than the folder holds now: it is left "
                            "out; run `natgrad analyze` again")
        run.analysis = None
    return run


def _read_json(path: Path, run: Run) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        run.problems.append(f"{path.relative_to(run.path)} is unreadable ({e})")
        return None
    if not isinstance(value, dict):
        run.problems.append(f"{path.relative_to(run.path)} is not a JSON object")
        return None
    return value


def _read_metrics(path: Path, run: Run) -> list[dict]:
    """One entry per epoch, the last line winning where a resumed run wrote an epoch twice."""
    if not path.is_file():
        return []
    by_epoch: dict[int, dict] = {}
    bad = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row["epoch"] = int(row["epoch"])
            by_epoch[row["epoch"]] = row
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
    if bad:
        run.problems.append(f"metrics.jsonl: {bad} unreadable line(s) skipped")
    return [by_epoch[k] for k in sorted(by_epoch)]


def _unique_labels(runs: list[Run]) -> None:
    """Folder names, with the parent folder added where two runs share a name."""
    names = [r.label for r in runs]
    for run in runs:
        if names.count(run.label) > 1:
            run.label = f"{run.path.resolve().parent.name}/{run.label}"
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} ({seen[run.label]})"


def mapping(x: Any) -> dict:
    """``x`` if it is a JSON object, else an empty one."""
    return x if isinstance(x, dict) else {}


def items(x: Any) -> list:
    """``x`` if it is a JSON list, else an empty one."""
    return x if isinstance(x, list) else []


def _text(x: Any) -> str | None:
    return str(x) if isinstance(x, (str, int, float)) and not isinstance(x, bool) and str(x) else None


def number(x: Any) -> float | None:
    """``x`` as a float when it is a finite number, else None."""
    return float(x) if is_number(x) else None
