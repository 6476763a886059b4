"""Rows of an earlier ``natgrad reproduce`` (its ``results.json``) taken over where nothing they depend on differs.

:func:`plan` matches each experiment of a grid with the earlier run's row of the same name. A row is reused
only when the earlier run resolved the same configuration for the experiment (and, recursively, for the
experiment it fine-tunes) and evaluated and analyzed with the same settings. A reused experiment is not
trained again unless this run needs its weights: to fine-tune another experiment from, or for an AutoAttack
eps the earlier run did not measure. Then it is retrained (the same config and seed on CPU give the same
weights) and checked against the earlier row before anything of that row is used: clean and PGD-k accuracy
must be identical, and so must the weights digest where the earlier run recorded one. Only its AutoAttack
accuracies are then taken over; everything else of it is measured again. A model that fails the check takes
over nothing. The bench is reused when it ran with the same recipe, methods, steps and schedule.

Every reused number is named in its row (``reused``: the file, its sha256, the fields) and in CLAIMS.md, and
an experiment's ``eval.json`` holds only what was computed on its weights in this run.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from natgrad import config, evaluation
from natgrad.engine.checkpoint import atomic_write_text
from natgrad.errors import UserError, short
from natgrad.pipeline import (
    Experiment,
    Grid,
    PipelineSettings,
    Stage,
    autoattack_key,
    eval_stage,
    read_json,
    run_config,
)

REUSE_CHECK = "reuse-check.json"  # in a retrained run folder: the check against the earlier row
CHECK_EVAL = "reuse-check-eval.json"  # the clean and PGD-k evaluation that check ran
EVAL_KEYS = ("n_eval", "pgd_steps", "n_sweep", "sweep_to", "n_autoattack", "autoattack_batch", "square_queries",
             "n_analysis", "power_iterations")
BENCH_KEYS = ("bench_steps", "bench_warmup")
COST_FIELDS = ("seconds_per_step", "relative_to_pgd", "flops_relative_to_pgd")
IGNORED = (*config.RESUME_FREE_KEYS, "init")  # the init path differs between folders; its experiment is compared


@dataclasses.dataclass(frozen=True)
class Source:
    """An earlier run's results.json: its rows by experiment, its settings and bench."""

    path: Path  # as given
    sha256: str  # of the file
    dataset: str
    rows: dict[str, dict]
    sizes: dict
    grid: Grid
    bench: dict
    configs: dict[str, dict]  # experiment -> flattened resolved config (IGNORED keys left out)
    recorded: bool  # the rows record their resolved configs (False: rebuilt from the recipe names and overrides)
    finished: str | None = None  # when that run wrote it (results.json of an earlier natgrad do not say)

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, **({"finished": self.finished} if self.finished else {})}


@dataclasses.dataclass(frozen=True)
class Reused:
    """What one experiment takes from the source: its whole row (``retrain`` False: no stage of it runs), or,
    retrained and checked against the row, the AutoAttack accuracies at the multiples ``autoattack_at``."""

    row: dict
    retrain: bool
    autoattack_at: tuple[str, ...] = ()
    needed_by: tuple[str, ...] = ()  # experiments fine-tuned from its weights in this run


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run reuses from one source; ``refused`` says, per experiment the source has, why not."""

    source: Source
    reused: dict[str, Reused]
    refused: dict[str, str]
    bench: dict | None  # the source's bench, when it is reused
    configs: dict[str, dict]  # this run's resolved configs (``init`` as the experiment's name), by experiment


# ---------------------------------------------------------------------------- the source


def _flat(cfg: dict) -> dict[str, Any]:
    """A config as comparable JSON values, flattened, without the keys that do not change what is computed."""
    flat = config.flatten(json.loads(json.dumps(cfg)))
    return {k: v for k, v in flat.items() if k not in IGNORED}


def _experiments(entries: list) -> tuple[Experiment, ...]:
    known = {f.name for f in dataclasses.fields(Experiment)}
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or not {"name", "recipe"} <= set(entry) or set(entry) - known:
            raise ValueError(f"an experiment entry this natgrad cannot read: {entry!r}")
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
        out.append(Experiment(**fields))
    return tuple(out)


def _sizes(sizes: dict) -> PipelineSettings:
    known = {f.name for f in dataclasses.fields(PipelineSettings)}
    if set(sizes) - known:
        raise ValueError(f"settings this natgrad does not know: {sorted(set(sizes) - known)}")
    fields: dict[str, Any] = {k: tuple(v) if k == "overrides" else v for k, v in sizes.items()}
    return PipelineSettings(**fields)


def load_source(path: Path | str) -> Source:
    """The results.json of an earlier ``natgrad reproduce``; a UserError when it is not one this natgrad reads."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        results = json.loads(raw)
        settings = results["settings"]
        grid_json = settings["grid"]
        grid = Grid(_experiments(grid_json["experiments"]), grid_json["bench_recipe"],
                    tuple(grid_json["bench_methods"]))
        sizes = _sizes(settings["sizes"])
        rows = {r["model"]: r for r in results["rows"]}
        if results.get("format") != "natgrad-reproduce":
            raise ValueError("no natgrad-reproduce format marker")
    except OSError as e:
        raise UserError(f"--reuse {path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"--reuse {path} is not a results.json of natgrad reproduce ({e}); give one") from None
    recorded = all(r.get("config") is not None for r in rows.values())
    try:
        if recorded:
            configs = {name: _flat(r["config"]) for name, r in rows.items()}
        else:  # an earlier natgrad's results.json: its configs rebuilt from what it records, with today's recipes
            configs = {e.name: _flat(dataclasses.asdict(e.config(sizes, Path("."), with_init=False)))
                       for e in grid.experiments if e.name in rows}
    except UserError as e:
        raise UserError(f"--reuse {path}: its configurations cannot be rebuilt ({e})") from None
    for r in rows.values():  # rows of an earlier natgrad: their AutoAttack at the eps, in today's form
        if "autoattack_at" not in r and r.get("autoattack_acc") is not None and r.get("eps"):
            r["autoattack_at"] = {autoattack_key(1.0): {"eps": r["eps"], "robust_acc": r["autoattack_acc"],
                                                        "n": r.get("autoattack_n")}}
    return Source(path, hashlib.sha256(raw).hexdigest(), settings.get("dataset", ""), rows, settings["sizes"], grid,
                  results.get("bench") or {}, configs, recorded, results.get("finished"))


# ---------------------------------------------------------------------------- the plan


def _chain(name: str | None, grid: Grid, configs: dict[str, dict]) -> list[tuple[str, dict | None]]:
    """The experiment and, in order, those it fine-tunes from, each with its config."""
    by_name = {e.name: e for e in grid.experiments}
    out: list[tuple[str, dict | None]] = []
    while name is not None and name in by_name and len(out) <= len(by_name):
        out.append((name, configs.get(name)))
        name = by_name[name].init
    if name is not None:
        out.append((name, None))
    return out


def _chain_difference(ours: list[tuple[str, dict | None]], theirs: list[tuple[str, dict | None]]) -> str | None:
    """Why two chains of configs are not the same model, or None when they are."""
    if [n for n, _ in ours] != [n for n, _ in theirs]:
        return (f"fine-tuned from {' <- '.join(n for n, _ in theirs[1:]) or 'nothing'} there, from "
                f"{' <- '.join(n for n, _ in ours[1:]) or 'nothing'} here")
    for (name, a), (_, b) in zip(ours, theirs):
        if a is None or b is None:
            return f"{name}: no configuration to compare"
        diff = [f"{k}: {short(b.get(k))} -> {short(a.get(k))}"
                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diff:
            return (f"{name}'s " if name != ours[0][0] else "") + "config differs (" + "; ".join(diff[:3]) + \
                   ("; ..." if len(diff) > 3 else "") + ")"
    return None


def _bench_identity(grid: Grid, sizes: PipelineSettings) -> dict:
    return json.loads(json.dumps({"recipe": grid.bench_recipe, "methods": list(grid.bench_methods),
                                  **{k: getattr(sizes, k) for k in BENCH_KEYS},
                                  "overrides": [*sizes.train_overrides(), *sizes.overrides]}))


def plan(source: Source, grid: Grid, sizes: PipelineSettings, out: Path, dataset: str) -> Plan:
    """What ``grid`` with ``sizes`` can take from ``source`` (see the module's docstring)."""
    configs = {e.name: {**dataclasses.asdict(e.config(sizes, out, with_init=False)), "init": e.init}
               for e in grid.experiments}
    ours = {name: _flat(cfg) for name, cfg in configs.items()}
    mine = sizes.as_json()
    settings_diff = [f"{k}: {source.sizes.get(k)!r} -> {mine[k]!r}" for k in EVAL_KEYS
                     if source.sizes.get(k) != mine[k]]
    candidates: dict[str, dict] = {}
    refused: dict[str, str] = {}
    for e in grid.experiments:
        row = source.rows.get(e.name)
        if row is None:
            continue
        why = (f"another dataset ({source.dataset} there)" if source.dataset != dataset
               else f"evaluation settings differ ({'; '.join(settings_diff)})" if settings_diff
               else _chain_difference(_chain(e.name, grid, ours), _chain(e.name, source.grid, source.configs)))
        if why:
            refused[e.name] = why
        else:
            candidates[e.name] = row
    reused: dict[str, Reused] = {}
    for e in reversed(grid.experiments):  # the experiments fine-tuned from e come after it
        if e.name not in candidates:
            continue
        row = candidates[e.name]
        have = row.get("autoattack_at") or {}
        keys = [autoattack_key(m) for m in e.autoattack_at]
        needed_by = tuple(f.name for f in grid.experiments
                          if f.init == e.name and (f.name not in reused or reused[f.name].retrain))
        retrain = bool(needed_by) or any(k not in have for k in keys)
        reused[e.name] = Reused(row, retrain, tuple(k for k in keys if k in have) if retrain else (), needed_by)
    same_bench = (bool(source.bench)
                  and _bench_identity(source.grid, _sizes(source.sizes)) == _bench_identity(grid, sizes))
    return Plan(source, dict(reversed(list(reused.items()))), refused, source.bench if same_bench else None, configs)


def describe(p: Plan) -> list[str]:
    """The plan in a few lines, printed before any work."""
    whole = [n for n, r in p.reused.items() if not r.retrain]
    again = [n for n, r in p.reused.items() if r.retrain]
    lines = [f"  reuse    {p.source.path} (sha256 {p.source.sha256[:12]}; configs "
             f"{'as it records them' if p.source.recorded else 'rebuilt from its recipe names and overrides'})"]
    if whole:
        lines.append(f"           whole rows, not trained again: {', '.join(whole)}")
    if again:
        lines.append(f"           trained again and checked (clean, PGD-k identical), their AutoAttack at the "
                     f"eps reused: {', '.join(again)}")
    lines.append(f"           bench: {'reused' if p.bench is not None else 'measured again'}")
    lines += [f"           not reused: {name}: {why}" for name, why in p.refused.items()]
    return lines


# ---------------------------------------------------------------------------- stages


def check_stage(out: Path, name: str, reused: Reused, source: Source, s: PipelineSettings, progress: bool) -> str:
    """Compare a retrained model with the source's row: clean and PGD-k on the same images (and the weights digest
    where the source recorded it) must be identical. Writes ``reuse-check.json``; returns the verdict in words."""
    run = out / name
    settings = evaluation.RunSettings(parts=(evaluation.Part(("clean", "pgd"), s.n_eval),), pgd_steps=(s.pgd_steps,),
                                      progress=progress, device=run_config(run).device, json_path=run / CHECK_EVAL,
                                      json_flag=CHECK_EVAL)
    result = evaluation.evaluate_run(run, settings)
    clean = next(r for r in result.rows if r["attack"] == "clean")
    pgd = next(r for r in result.rows if r["attack"].startswith("pgd-"))
    row = reused.row
    checks = [("images", clean["n"], row.get("clean_n")), ("clean accuracy", clean["robust_acc"], row.get("clean_acc")),
              ("PGD attack", pgd["attack"], row.get("pgd_attack")), (f"{pgd['attack']} accuracy", pgd["robust_acc"],
                                                                     row.get("pgd_acc"))]
    if row.get("weights_sha256"):
        checks.append(("weights digest", result.report["weights_sha256"], row["weights_sha256"]))
    verdict = {"source": source.describe(), "verified": all(a == b for _, a, b in checks),
               "checks": [{"what": w, "here": a, "source": b, "same": a == b} for w, a, b in checks]}
    if result.is_main:
        atomic_write_text(run / REUSE_CHECK, json.dumps(verdict, indent=2))
    return check_text(verdict)


def check_text(verdict: dict) -> str:
    """``identical to the source: clean accuracy 0.867, ...`` or what differs."""
    if verdict["verified"]:
        return "identical to the source: " + ", ".join(f"{c['what']} {c['here']}" for c in verdict["checks"]
                                                       if c["what"] != "weights digest")
    return "differs from the source: " + ", ".join(f"{c['what']} {c['here']} here, {c['source']} there"
                                                   for c in verdict["checks"] if not c["same"])


def _verified(out: Path, name: str) -> bool:
    return bool(read_json(out / name / REUSE_CHECK).get("verified"))


def _autoattack_to_run(out: Path, e: Experiment, reused: Reused) -> tuple[float, ...]:
    """The multiples of the eps AutoAttack must run at on a retrained model: those not taken from the source."""
    taken = set(reused.autoattack_at) if _verified(out, e.name) else set()
    return tuple(m for m in e.autoattack_at if autoattack_key(m) not in taken)


def _eval_reused(out: Path, e: Experiment, reused: Reused, s: PipelineSettings, progress: bool) -> str | None:
    return eval_stage(out / e.name, s, progress, _autoattack_to_run(out, e, reused))


def adapt_stages(todo: list[Stage], p: Plan, out: Path, grid: Grid, s: PipelineSettings, progress: bool
                 ) -> list[Stage]:
    """The pipeline's stages with the plan applied: none for a whole reused row, a check after the training of a
    retrained one and AutoAttack only where the source has no number for it, no bench when it is reused."""
    by_name = {e.name: e for e in grid.experiments}
    result = []
    for stage in todo:
        kind, _, name = stage.name.partition(" ")
        if stage.name == "bench" and p.bench is not None:
            continue
        r = p.reused.get(name)
        if r is None:
            result.append(stage)
        elif r.retrain and kind == "eval":
            e = by_name[name]
            result.append(Stage(stage.name, f"{stage.banner} (AutoAttack only where {p.source.path} has no number "
                                            "or the check failed)", stage.done,
                                functools.partial(_eval_reused, out, e, r, s, progress)))
        elif r.retrain:
            result.append(stage)
            if kind == "train":
                result.append(Stage(f"check {name}", f"checking {name} against {p.source.path}: clean and "
                                    f"PGD-{s.pgd_steps} on {s.n_eval} images must be identical",
                                    (out / name / REUSE_CHECK).is_file,
                                    functools.partial(check_stage, out, name, r, p.source, s, progress)))
    return result


# ---------------------------------------------------------------------------- rows


def merge_rows(rows: list[dict], p: Plan, out: Path) -> list[dict]:
    """This run's rows with the plan's reused numbers in place, each named in the row's ``reused``."""
    origin = p.source.describe()
    merged = []
    for row in rows:
        name = row["model"]
        r = p.reused.get(name)
        if r is None:
            row = dict(row)
            if name in p.refused:
                row["reuse_refused"] = p.refused[name]
            costs = [k for k in COST_FIELDS if row.get(k) is not None]
            if p.bench is not None and costs:
                row["reused"] = {**origin, "fields": costs}
            merged.append(row)
        elif not r.retrain:
            whole = {**copy.deepcopy(r.row), "model": name, "label": row["label"], "config": p.configs[name]}
            whole["reused"] = {**origin, "fields": "all", **({"earlier": r.row["reused"]} if "reused" in r.row else {})}
            whole.pop("reuse_refused", None)
            merged.append(whole)
        else:
            merged.append(_merge_retrained(dict(row), r, p, out, origin))
    return merged


def _merge_retrained(row: dict, r: Reused, p: Plan, out: Path, origin: dict) -> dict:
    check = read_json(out / row["model"] / REUSE_CHECK)
    if not check.get("verified"):
        row["reuse_refused"] = ("retrained model " + check_text(check)) if check else "retrained model not checked"
        return row
    fields = []
    at = dict(row.get("autoattack_at") or {})
    for key in r.autoattack_at:
        if key not in at:
            at[key] = r.row["autoattack_at"][key]
            fields.append(f"autoattack_at.{key}")
    row["autoattack_at"] = dict(sorted(at.items(), key=lambda kv: float(kv[0])))
    if autoattack_key(1.0) in r.autoattack_at and row.get("autoattack_acc") is None:
        for k in ("autoattack_acc", "autoattack_n", "autoattack_warnings"):
            row[k] = r.row.get(k)
            fields.append(k)
    if p.bench is not None:
        fields += [k for k in COST_FIELDS if row.get(k) is not None]
    row["reused"] = {**origin, "fields": fields, "check": check["checks"]}
    return row


def summary(p: Plan) -> dict:
    """results.json's ``reuse``: the source, what came from it and what was refused."""
    return {**p.source.describe(),
            "configs": "recorded" if p.source.recorded else "rebuilt from its recipe names and overrides",
            "whole_rows": [n for n, r in p.reused.items() if not r.retrain],
            "retrained": {n: {"autoattack_at": list(r.autoattack_at), "needed_by": list(r.needed_by)}
                          for n, r in p.reused.items() if r.retrain},
            "bench": p.bench is not None, "refused": p.refused}


__all__ = ["Plan", "Reused", "Source", "adapt_stages", "describe", "load_source", "merge_rows", "plan", "summary"]
