"""The ``natgrad`` command line: a thin layer over the library. ``main(argv)`` returns the exit code."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from natgrad import config
from natgrad.errors import UserError


def _cmd_train(args: argparse.Namespace) -> int:
    from natgrad.engine import train

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


def _cmd_recipes(args: argparse.Namespace) -> int:
    if args.keys:
        defaults = config.flatten(config.to_dict(config.RunConfig()))
        for key in config.all_keys():
            print(f"{key} = {defaults[key]!r}")
        return 0
    recipes = config.list_recipes()
    width = max(map(len, recipes), default=0)
    for name, description in recipes.items():
        print(f"{name:<{width}}  {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="natgrad", description="Robust classifiers from natural input gradients.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train a model from a recipe", description=(
        "Train from RECIPE (a name from `natgrad recipes` or a YAML path); key=value arguments override its keys."))
    t.add_argument("recipe")
    t.add_argument("--out", help="run folder (default runs/RECIPE-TIMESTAMP)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    t.set_defaults(func=_cmd_train)
    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.add_argument("--keys", action="store_true", help="list every config key with its default instead")
    r.set_defaults(func=_cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input prints one line to stderr and returns 2."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        unknown = [a for a in extra if a.startswith("-") or "=" not in a]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides look like key=value)")
        if extra and args.command != "train":
            parser.error(f"{args.command} takes no key=value overrides")
        args.overrides = extra
        return args.func(args)
    except UserError as e:
        print(f"natgrad: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse's own errors and --help
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("natgrad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
