"""The ``natgrad`` command line: a thin layer over the library. ``main(argv)`` returns the exit code."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

from natgrad import config, evaluation
from natgrad.analysis.analyze import ANALYSES, AnalysisSettings, check_out, parse_analyses, write_analysis
from natgrad.data import num_images
from natgrad.demo import run_demo
from natgrad.engine import bench
from natgrad.engine import checkpoint as ckpt
from natgrad.engine.distributed import setup
from natgrad.engine.train import train
from natgrad.errors import Preempted, UserError
from natgrad.evaluation import write_or_keep as _write_or_keep
from natgrad.report import write_report
from natgrad.reproduce import run_reproduce
from natgrad.rundir import refuse_symlinks
from natgrad.runfiles import ANALYSIS, ANALYSIS_JSON
from natgrad.signals import StopSignals


def _cmd_train(args: argparse.Namespace) -> int:

    cfg = config.load(args.recipe, args.overrides)
    if args.resume and not args.out:
        raise UserError("--resume needs --out: the run folder to continue")
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = train(cfg, out, resume=args.resume, progress=not args.quiet)
    line = f"natgrad: run folder {out}"
    if summary.get("clean_acc") is not None:
        line += f" | clean accuracy {100 * summary['clean_acc']:.2f}%"
    if summary.get("pgd_acc") is not None:
        line += f" | PGD-{summary['pgd_steps']} accuracy {100 * summary['pgd_acc']:.2f}% at eps={cfg.eps:.4g}"
    if summary.get("eval_n"):
        line += f" (n={summary['eval_n']})"
    print(line)
    return 0


SOURCE_HELP = ("a run folder; a .safetensors file with --recipe; or a timm model name (resnet50.a1_in1k) with "
               "model.pretrained=true (timm's weights, the default recipe's) or model.pretrained=PATH. The last two "
               "take key=value config overrides after it")
RECIPE_HELP = (f"the recipe a .safetensors file was trained with; for a timm name the data and eps (default "
               f"{evaluation.TIMM_RECIPE}: ImageNet at 4/255)")


def _cmd_eval(args: argparse.Namespace) -> int:
    attacks = evaluation.parse_attacks(args.attacks)
    eps = evaluation.parse_eps(args.eps) if args.eps else None
    steps = _int_list(args.pgd_steps, "--pgd-steps")
    for flag, value in (("--n", args.n), ("--square-queries", args.square_queries), ("--batch-size", args.batch_size),
                        ("--restarts", args.restarts)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be at least 1")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed {args.seed} must be in [0, 2^32)")
    settings = evaluation.RunSettings(
        parts=(evaluation.Part(tuple(attacks), args.n),), eps=eps, pgd_steps=tuple(steps), restarts=args.restarts,
        batch_size=args.batch_size, seed=args.seed,
        aa_attacks=[a.strip() for a in args.aa_attacks.split(",")] if args.aa_attacks else None,
        square_queries=args.square_queries, progress=not args.quiet, recipe=args.recipe, model_name=args.model,
        overrides=tuple(args.overrides),
        ema=not args.no_ema, device=args.device, transfer_source=_path(args.transfer_source),
        aa_state=_path(args.aa_state), sanity=args.sanity, json_path=_path(args.json),
        robustbench_json=_path(args.robustbench_json), plots=_path(args.plots))
    result = evaluation.evaluate_run(args.source, settings)
    if not result.is_main:
        return 0
    print(evaluation.format_results(result.rows))
    for warning in result.warnings:
        print(f"natgrad: warning: {warning}")
    if result.sanity is not None:
        print(evaluation.format_sanity(result.sanity))
    if result.json_path is not None:
        print(f"natgrad: results in {result.json_path}")
    for kind, path in result.figures.items():
        print(f"natgrad: {kind} sweep figure {path}")
    return 0


def _path(text: str | None) -> Path | None:
    return Path(text) if text else None


def _cmd_analyze(args: argparse.Namespace) -> int:

    analyses = parse_analyses(args.analyses)
    if args.n is not None and args.n < 1:
        raise UserError(f"--n {args.n} must be at least 1")
    for flag, value in (("--power-iterations", args.power_iterations), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} {value} must be at least 1")
    eps = evaluation.parse_eps(args.eps) if args.eps else None
    if eps is not None and len(eps) != 1:
        raise UserError("analyze takes one --eps value")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed {args.seed} must be in [0, 2^32)")
    source = Path(args.source)
    default = source / ANALYSIS if source.is_dir() else Path(f"analysis-{source.stem if source.is_file() else source}")
    out = Path(args.out) if args.out else default
    ckpt.check_destination(out, "folder", "--out")
    check_out(out)
    if source.is_dir():
        refuse_symlinks(source)
    ctx = setup(args.device)
    loaded = evaluation.load_model(source, args.recipe, args.model, ctx.device, ema=not args.no_ema,
                                   overrides=args.overrides)
    ds = evaluation.eval_dataset(loaded.cfg, args.n if args.n is not None
                                 else min(1000, num_images(evaluation.eval_dataset(loaded.cfg, None))))
    settings = AnalysisSettings(eps=eps[0] if eps else loaded.cfg.eps, analyses=analyses, batch_size=args.batch_size,
                                power_iterations=args.power_iterations, seed=args.seed, progress=not args.quiet)
    summary, arrays = evaluation.analyze_model(loaded, ds, settings, ctx)  # sharded across torchrun's processes
    if not ctx.is_main:  # every process has the merged result; rank 0 writes it
        return 0
    text = json.dumps(summary, indent=2, default=str)
    path = out / ANALYSIS_JSON
    _write_or_keep(lambda: write_analysis(summary, arrays, out), text, path, "analysis numbers")
    print(_analysis_table(summary))
    print(f"natgrad: analysis in {path}")
    return 0


def _analysis_table(summary: dict) -> str:
    """The headline numbers of each analysis, one per line."""
    lines = []
    if g := summary.get("gradients"):
        lines.append(f"gradients   E[L1] {g['l1_mean']:.4g}  (PGD-{g['pgd_steps']} fails "
                     f"{g['l1_mean_attack_fails']:.4g}, "
                     f"succeeds {g['l1_mean_attack_succeeds']:.4g} (nan: no such image); clean "
                     f"{100 * g['clean_acc']:.2f}%, "
                     f"PGD {100 * g['pgd_acc']:.2f}%)")
    if e := summary.get("edges"):
        lines.append(f"edges       corr saliency {e['saliency_corr_mean']:+.4f} ± {e['saliency_corr_std']:.4f}, "
                     f"|grad L| {e['loss_grad_corr_mean']:+.4f} ± {e['loss_grad_corr_std']:.4f}")
    if g := summary.get("geometry"):
        lines.append(f"geometry    ||grad||2 {g['grad_l2_mean']:.4g} ± {g['grad_l2_std']:.4g}, ||H||2 "
                     f"{g['hessian_norm_mean']:.4g} ± {g['hessian_norm_std']:.4g}, C {g['curvature_mean']:.4g} ± "
                     f"{g['curvature_std']:.4g}")
    if li := summary.get("linearity"):
        lines.append(f"linearity   error {li['error_mean']:.4g} ± {li['error_std']:.4g}, log10 "
                     f"{li['log10_mean']:.3f} ± {li['log10_std']:.3f}")
    if al := summary.get("along_attack"):
        lines.append(f"along       loss {al['loss'][0]:.4g} -> {al['loss'][-1]:.4g} at t={al['t'][-1]:g}")
    return "\n".join(lines)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r} must be a comma-separated list of integers, e.g. 10,100") from None
    if any(v < 1 for v in values):
        raise UserError(f"{flag} values must be at least 1")
    return values


def _cmd_report(args: argparse.Namespace) -> int:

    out = write_report([Path(p) for p in args.run_dirs], Path(args.out))
    print(f"natgrad: report {out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:

    if args.json:
        ckpt.check_destination(Path(args.json), "json", "--json")
    settings = bench.BenchSettings(
        recipe=args.recipe, overrides=args.overrides, model=args.model, act=args.act, input_size=args.input_size,
        channels=args.channels, batch=args.batch, methods=bench.parse_methods(args.methods), device=args.device,
        steps=args.steps, warmup=args.warmup, compile=args.compile, progress=not args.quiet)
    result = bench.run_bench(settings)
    print(bench.format_bench(result))
    if args.json:
        ckpt.atomic_write_text(Path(args.json), json.dumps(result, indent=2))
        print(f"natgrad: results in {args.json}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:

    run_demo(Path(args.out))
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:

    run_reproduce(args.dataset, args.out, budget=args.budget, overrides=tuple(args.overrides), progress=not args.quiet,
                  reuse_from=args.reuse, only=tuple(n.strip() for n in args.only.split(",")) if args.only else ())
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    if args.keys:
        defaults = config.flatten(dataclasses.asdict(config.RunConfig()))
        for key in config.all_keys():
            print(f"{key} = {defaults[key]!r}")
        return 0
    recipes = config.list_recipes()
    width = max(map(len, recipes), default=0)
    for name, description in recipes.items():
        print(f"{name:<{width}}  {description}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (a UserError) instead of usage text and an error line."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="natgrad", description="Robust classifiers from natural input gradients.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train a model from a recipe", description=(
        "Train from RECIPE (a name from `natgrad recipes` or a YAML path); key=value arguments override its keys."))
    t.add_argument("recipe")
    t.add_argument("--out", help="run folder (default runs/RECIPE-TIMESTAMP)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    t.set_defaults(func=_cmd_train)
    e = sub.add_parser("eval", help="robust accuracy of a trained model", description=(
        "Evaluate RUN_DIR (or a .safetensors file with --recipe, or a timm model name with model.pretrained=true|PATH) "
        "with the attacks in --attacks at every eps in --eps."))
    e.add_argument("source", metavar="RUN_DIR", help=SOURCE_HELP)
    e.add_argument("--recipe", help=RECIPE_HELP)
    e.add_argument("--model", help="override the model name of the recipe")
    e.add_argument("--attacks", default="clean,pgd,autoattack",
                   help="comma-separated: clean, pgd, pgd-l2dir, autoattack, autoattack-plus, autoattack-custom, "
                        "transfer, "
                        "eps-sweep, steps-sweep (default clean,pgd,autoattack)")
    e.add_argument("--eps", help="comma-separated eps in pixel units, e.g. 1/255,2/255,4/255 (default: the recipe's)")
    e.add_argument("--n", "--num-images", dest="n", type=int,
                   help="a fixed seeded subset of this many test images (default: all); under torchrun write "
                        "--num-images, "
                        "since torchrun takes --n for its own --nnodes")
    e.add_argument("--pgd-steps", default="10,100", help="PGD step counts (default 10,100; step eps/4)")
    e.add_argument("--restarts", type=int, default=1, help="PGD random restarts")
    e.add_argument("--aa-attacks", help="autoattack-custom's attacks, e.g. apgd-ce,square")
    e.add_argument("--square-queries", type=int, help="Square's query budget (default AutoAttack's 5000)")
    e.add_argument("--aa-state", metavar="DIR", help="AutoAttack saves its progress in DIR after each attack and "
                                                     "batch; "
                   "rerunning the same command resumes from it")
    e.add_argument("--source", dest="transfer_source", help="transfer: the run folder the examples are made on")
    e.add_argument("--sanity", action="store_true", help="also run Appendix C's sanity checks")
    e.add_argument("--json", help="write the results here (default: RUN_DIR/eval.json for a run folder)")
    e.add_argument("--robustbench-json", help="write RobustBench's model_info JSON here")
    e.add_argument("--plots", help="folder for sweep figures (default: the run folder)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    e.add_argument("--no-ema", action="store_true", help="use model.safetensors even where EMA weights exist")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_cmd_eval)
    a = sub.add_parser("analyze", help="the paper's gradient analyses of a trained model, with figures", description=(
        "Gradient norms conditioned on PGD-10 (Table 1), channels, edge correlation (Table 5), curvature (Table 6), "
        "local linearity (Table 7), statistics along the attack (Figure 11) and pictures; writes analysis.json "
        "and one PNG per figure. Under torchrun the images are sharded across the processes (as eval shards "
        "them) and rank 0 writes the same analysis.json as one process."))
    a.add_argument("source", metavar="RUN_DIR", help=SOURCE_HELP)
    a.add_argument("--recipe", help=RECIPE_HELP)
    a.add_argument("--model", help="override the recipe's model name")
    a.add_argument("--n", "--num-images", dest="n", type=int,
                   help="test images, over all processes (a fixed seeded subset; default 1000 or the whole test "
                   "set if smaller)")
    a.add_argument("--out", help="output folder (default RUN_DIR/analysis)")
    a.add_argument("--analyses", default=",".join(ANALYSES), help=f"any of {','.join(ANALYSES)} (default all)")
    a.add_argument("--eps", help="attack and linearity radius (default the recipe's eps); accepts 4/255")
    a.add_argument("--power-iterations", type=int, default=20, help="Hessian power iterations (default 20)")
    a.add_argument("--batch-size", type=int, default=128)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    a.add_argument("--no-ema", action="store_true", help="use model.safetensors even where EMA weights exist")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(func=_cmd_analyze)
    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.add_argument("--keys", action="store_true", help="list every config key with its default instead")
    r.set_defaults(func=_cmd_recipes)
    p = sub.add_parser("report", help="compare run folders in one HTML file", description=(
        "Lay the run folders side by side: training curves, eval.json's robust accuracy and the paper's analysis "
        "tables from analysis/analysis.json, in one self-contained HTML file."))
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run folders written by `natgrad train`")
    p.add_argument("--out", metavar="FILE", default="report.html", help="the HTML file to write (default report.html)")
    p.set_defaults(func=_cmd_report)
    b = sub.add_parser("bench", help="seconds, passes and memory of one training step per method (Table "
                                     "3)", description=(
        "Time one full optimizer step of each method on the same model and random batch, interleaved round-robin; "
        "report the median seconds per step, the ratio to PGD, the counted forward and backward passes and the "
        "peak memory. The objectives' parameters come from --recipe; key=value arguments override its keys."))
    b.add_argument("--recipe", default="fmnist-gradnorm", help="recipe for eps and the methods' parameters "
                   "(default fmnist-gradnorm)")
    b.add_argument("--model", help="model name (default the recipe's); keeps its own activation unless --act")
    b.add_argument("--act", help="replace the model's activations (gelu, silu, relu, ...)")
    b.add_argument("--input-size", type=int, help="image side in pixels (default the recipe's dataset's)")
    b.add_argument("--channels", type=int, help="image channels (default the recipe's dataset's)")
    b.add_argument("--batch", type=int, default=128, help="images per step (default 128)")
    b.add_argument("--methods", default=",".join(bench.METHODS),
                   help=f"comma-separated, any of {','.join(bench.METHODS)} (default all)")
    b.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    b.add_argument("--compile", action="store_true", help="every method through torch.compile (compile=true)")
    b.add_argument("--steps", type=int, default=10, help="timed steps per method (default 10)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps per method first (default 2)")
    b.add_argument("--json", metavar="FILE", help="also write the results here")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_bench)
    d = sub.add_parser("demo", help="natural, GradNorm and PGD-3 on Fashion-MNIST in minutes, with a report",
                        description=("Train a natural, a GradNorm and a PGD-3 model on Fashion-MNIST (short "
                                     "schedules), "
                                     "evaluate them (clean, AutoAttack, PGD eps sweep), measure each method's cost per "
                                     "step, run the gradient analyses and write DIR/report.html; about 7 minutes on a "
                                     "2-core CPU. Run again on the same DIR to continue where it stopped."))
    d.add_argument("--out", metavar="DIR", default="runs/demo", help="the demo folder (default runs/demo)")
    d.set_defaults(func=_cmd_demo)
    r = sub.add_parser("reproduce", help="the paper's experiment grid on a dataset, with a verdict for each claim",
                       description=("Train, evaluate (clean, PGD, eps sweep, AutoAttack standard), bench and analyze "
                                    "the paper's grid of models on DATASET, then check each claim of the paper against "
                                    "the measured numbers: DIR/CLAIMS.md, DIR/results.json, DIR/report.html. Run "
                                    "again on the same DIR to continue where it stopped. key=value arguments "
                                    "override every recipe (e.g. data.root=/data/imagenet)."))
    r.add_argument("dataset", help="fmnist, cifar10 or imagenet")
    r.add_argument("--out", metavar="DIR", help="the folder (default runs/reproduce-DATASET-BUDGET)")
    r.add_argument("--budget", default="full", help="short or full (default full)")
    r.add_argument("--only", metavar="NAMES", help="comma-separated experiments of the grid to run (with the ones "
                   "they fine-tune from), e.g. resnet50-gelu-gradnorm; the other claims are then not measured")
    r.add_argument("--reuse", metavar="RESULTS_JSON",
                   help="an earlier run's results.json: take over the rows of experiments whose resolved config and "
                        "evaluation settings are identical (models this run needs are retrained and checked)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input prints one line to stderr and returns 2."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        unknown = [a for a in extra if a.startswith("-") or "=" not in a]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides look like key=value)")
        if extra and args.command not in ("train", "bench", "reproduce", "eval", "analyze"):
            parser.error(f"{args.command} takes no key=value overrides")
        args.overrides = extra
        with StopSignals(raising=True):  # SIGTERM stops every command; training checkpoints first
            return args.func(args)
    except UserError as e:
        print(f"natgrad: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder, a file size limit: the machine's, not natgrad's
        where = f" ({e.filename})" if e.filename else ""
        print(f"natgrad: error: {_one_line(e.strerror or str(e))}{where}; free space or choose a writable place, "
              "then run the same command again", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse's own errors and --help
        return int(e.code or 0)
    except Preempted as e:
        print(f"natgrad: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("natgrad: interrupted", file=sys.stderr)
        return 130


def _one_line(text: str, limit: int = 1000) -> str:
    """A message as one line of at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
