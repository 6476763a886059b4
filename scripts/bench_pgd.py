"""Images per second of natgrad's PGD against torchattacks' PGD with the same settings.

    python scripts/bench_pgd.py [--batch 256] [--rounds 7] [--steps 10] [--eps 0.1] [--device cpu] [--threads N]

Both attack ``cnn-small`` (eval mode) on one batch of random (1, 28, 28) images under L-infinity,
``alpha = eps / 4``, from a random start; natgrad runs with ``keep_best=False`` (the same work as
torchattacks) and with ``keep_best=True``. The attacks alternate (in rotating order) in one process, and each one's
median over the rounds is reported. torchattacks is a benchmark-only tool: ``pip install torchattacks``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from natgrad import models
from natgrad.attacks import pgd


def _seconds(attack: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    attack()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import torchattacks
    except ImportError:
        print("bench_pgd: torchattacks is not installed; run `pip install torchattacks` (benchmark only)",
              file=sys.stderr)
        return 2

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.create("cnn-small", 10, in_chans=1).to(device).eval()
    x = torch.rand(args.batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    alpha = args.eps / 4
    reference = torchattacks.PGD(model, eps=args.eps, alpha=alpha, steps=args.steps, random_start=True)
    attacks: dict[str, Callable[[], torch.Tensor]] = {
        "natgrad": lambda: pgd(model, x, y, args.eps, args.steps, step_size=alpha),
        "torchattacks": lambda: reference(x, y),
        "natgrad keep_best": lambda: pgd(model, x, y, args.eps, args.steps, step_size=alpha, keep_best=True),
    }

    # Same seed, same start: the two raw attacks should agree (torchattacks' mean loss only rescales the gradient).
    torch.manual_seed(1)
    ours = attacks["natgrad"]()
    torch.manual_seed(1)
    theirs = attacks["torchattacks"]()
    largest = (ours - theirs).abs().max().item()

    seconds: dict[str, list[float]] = {name: [] for name in attacks}
    for attack in attacks.values():  # warm-up
        _seconds(attack, device)
    names = list(attacks)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            seconds[name].append(_seconds(attacks[name], device))

    print(f"torch {torch.__version__}, torchattacks {torchattacks.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, batch {args.batch}, steps {args.steps}, eps {args.eps}, "
          f"alpha {alpha}, rounds {args.rounds}")
    print(f"same seed, largest |natgrad - torchattacks| = {largest:.1e} (the projections round differently)")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    for name, s in seconds.items():
        print(f"{name:18s} median {median[name]:.4f} s  ({args.batch / median[name]:8.0f} images/s)  "
              f"min {min(s):.4f}  max {max(s):.4f}")
    for name in ("natgrad", "natgrad keep_best"):
        print(f"throughput {name} / torchattacks: {median['torchattacks'] / median[name]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
