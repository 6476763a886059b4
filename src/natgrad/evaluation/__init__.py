"""Robustness evaluation behind ``natgrad eval``, the pipelines' eval stage and training's clean/PGD-k numbers.

:func:`evaluate_run` evaluates a run folder, weights file or timm checkpoint and writes ``eval.json``;
:func:`evaluate_model` runs the named attacks of :data:`REGISTRY` on a dataset;
:func:`evaluate` is training's clean and PGD-k accuracy.
"""

from natgrad.evaluation.autoattack_rows import autoattack_row
from natgrad.evaluation.characterize import analyze_model
from natgrad.evaluation.integrity import deterministic, integrity
from natgrad.evaluation.keep import write_or_keep
from natgrad.evaluation.loading import TIMM_RECIPE, eval_dataset, load_model, load_timm
from natgrad.evaluation.registry import ATTACKS, PER_EPS, REGISTRY, SWEEPS, AttackSpec, get_attack, parse_attacks
from natgrad.evaluation.robustbench import check_robustbench, robustbench_info
from natgrad.evaluation.run import EvalReport, Part, RunSettings, evaluate_run
from natgrad.evaluation.runner import evaluate_model
from natgrad.evaluation.sanity import SANITY_CHECKS, format_sanity, sanity_checks
from natgrad.evaluation.settings import REFERENCE_EPS, AttackResult, EvalSettings, parse_eps
from natgrad.evaluation.state import autoattack_state_dir, remove_autoattack_state
from natgrad.evaluation.sweeps import default_sweep_eps
from natgrad.evaluation.text import format_results
from natgrad.evaluation.training import evaluate

__all__ = ["ATTACKS", "PER_EPS", "REFERENCE_EPS", "REGISTRY", "SANITY_CHECKS", "SWEEPS", "TIMM_RECIPE", "AttackResult",
           "AttackSpec", "load_timm",
           "EvalReport", "EvalSettings", "Part", "RunSettings", "analyze_model", "autoattack_row",
           "autoattack_state_dir",
           "check_robustbench", "default_sweep_eps", "deterministic", "eval_dataset", "evaluate", "evaluate_model",
           "evaluate_run", "format_results", "format_sanity", "get_attack", "integrity", "load_model", "parse_attacks",
           "parse_eps", "remove_autoattack_state", "robustbench_info", "sanity_checks", "write_or_keep"]
