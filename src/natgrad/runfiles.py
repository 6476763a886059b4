"""The names of the files in a run folder (DESIGN.md's contract); :class:`natgrad.rundir.RunDir` gives their paths.

A module of names only, so that code that must stay light (the analyses, the report) can use them.
"""

from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
CHECKPOINT = Path(CHECKPOINTS) / "last.pt"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"
SUMMARY = "summary.json"
EVAL = "eval.json"
ANALYSIS = "analysis"
ANALYSIS_JSON = "analysis.json"  # inside ANALYSIS
AUTOATTACK_STATE = "autoattack-state"
LOCK = ".natgrad.lock"
