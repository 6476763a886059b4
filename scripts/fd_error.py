"""gradnorm-fd's error against exact GradNorm (float32 double backprop), in float32 and under bf16 autocast.

Usage: python scripts/fd_error.py [--out docs/bench/fd-error.json]

For each model and the eps of its recipe: the parameter gradient of the whole GradNorm loss by each
finite-difference scheme and step, and by double backprop under bf16 autocast (the floor bf16 sets), against
float32 double backprop. The error is ``|g - g_exact| / |g_exact - g_ce|``: relative to the penalty's share of
the gradient, the part the finite difference estimates. Freshly initialized models, eval mode, random images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from natgrad import models, objectives

CASES = [  # model, channels, size, eps (the recipe's): fmnist and cifar10
    ("cnn-small", 1, 28, 0.1),
    ("resnet10t", 3, 32, 8 / 255),
]
VARIANTS = [(scheme, div) for scheme in ("forward", "central") for div in (1, 2, 4, 8, 32)]  # (scheme, eps / step)


def _grad(model: torch.nn.Module, objective, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = objective(x, y)["loss"]
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def measure(name: str, channels: int, size: int, eps: float, batch: int = 32) -> list[dict]:
    torch.manual_seed(0)
    model = models.create(name, 10, channels, act="gelu", train_mode="eval")
    x, y = torch.rand(batch, channels, size, size), torch.randint(0, 10, (batch,))
    exact = _grad(model, objectives.create("gradnorm", model, eps=eps), x, y, False)
    penalty = (exact - _grad(model, objectives.create("natural", model), x, y, False)).norm()
    rows = []
    for bf16 in (False, True):
        candidates = [("exact", None, objectives.create("gradnorm", model, eps=eps))]
        precision = "autocast" if bf16 else "float32"
        candidates += [(scheme, div, objectives.create("gradnorm-fd", model, eps=eps, fd_scheme=scheme,
                                                       fd_precision=precision, fd_step=eps / div))
                       for scheme, div in VARIANTS]
        for scheme, div, objective in candidates:
            if scheme == "exact" and not bf16:
                continue
            g = _grad(model, objective, x, y, bf16)
            rows.append({"model": name, "eps": eps, "precision": "bf16 autocast" if bf16 else "float32",
                         "scheme": scheme, "step": None if div is None else f"eps/{div}",
                         "error": ((g - exact).norm() / penalty).item(),
                         "cosine": torch.nn.functional.cosine_similarity(g, exact, dim=0).item()})
    return rows


def convergence(batch: int = 32, eps: float = 8 / 255) -> list[dict]:
    """resnet10t in float64, as built (max-pool) and with its max-pool replaced by average pooling: whether the
    finite differences converge to double backprop as the step shrinks, rounding aside."""
    rows = []
    for pool in ("max", "avg"):
        torch.manual_seed(0)
        model = models.create("resnet10t", 10, 3, act="gelu", train_mode="eval").double()
        if pool == "avg":
            model.net.maxpool = torch.nn.AvgPool2d(3, 2, 1)
        x, y = torch.rand(batch, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (batch,))
        exact = _grad(model, objectives.create("gradnorm", model, eps=eps), x, y, False)
        penalty = (exact - _grad(model, objectives.create("natural", model), x, y, False)).norm()
        for scheme in ("forward", "central"):
            for div in (8, 32, 128):
                objective = objectives.create("gradnorm-fd", model, eps=eps, fd_scheme=scheme, fd_step=eps / div)
                g = _grad(model, objective, x, y, False)
                rows.append({"model": f"resnet10t, {pool}-pool", "precision": "float64", "scheme": scheme,
                             "step": f"eps/{div}", "error": ((g - exact).norm() / penalty).item(),
                             "cosine": torch.nn.functional.cosine_similarity(g, exact, dim=0).item()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args()
    rows = [row for case in CASES for row in measure(*case)] + convergence()
    print("| model | precision | scheme | step | error | cosine |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['scheme']} | {r['step'] or '-'} | {r['error']:.4f} | "
              f"{r['cosine']:.5f} |")
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
