"""How well gradnorm-fd's parameter gradient matches double backprop, and what a step costs.

    python scripts/fd_accuracy.py RUN_DIR [RUN_DIR ...] [--n 128] [--steps 10]

For each run's model (and a freshly initialized one) on ``--n`` test images: cosine similarity and
relative error of the finite-difference gradient against the exact one for several steps h, then
the seconds per training step of both, interleaved in this one process so the ratio is fair.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from natgrad import config, data, objectives
from natgrad.build import build_model, objective_params
from natgrad.engine.checkpoint import load_weights


def _grad(model: torch.nn.Module, objective, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    objective(x, y, epoch_fraction=1e9)["loss"].backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    for run in [None, *args.runs]:
        cfg = config.from_dict(yaml.safe_load(Path(args.runs[0] if run is None else run, "config.yaml").read_text()))
        cfg.method = "gradnorm"
        torch.manual_seed(0)
        model = build_model(cfg)
        if run is not None:
            load_weights(model, f"{run}/model.safetensors")
        ds = data.build(cfg, "test")
        x = torch.stack([ds[i][0] for i in range(args.n)])
        y = torch.tensor([ds[i][1] for i in range(args.n)])
        params = objective_params(cfg)
        exact = objectives.create("gradnorm", model, **params)
        g = _grad(model, exact, x, y)
        name = run or "fresh init"
        for frac in (2, 4, 8, 16, 32, 64, 256):
            fd = objectives.create("gradnorm-fd", model, **params, fd_step=cfg.eps / frac)
            a = _grad(model, fd, x, y)
            print(f"{name}: h=eps/{frac}: cosine {F.cosine_similarity(a, g, 0).item():.5f}, "
                  f"relative error {((a - g).norm() / g.norm()).item():.4f}")
    fd = objectives.create("gradnorm-fd", model, **params)
    seconds = {"gradnorm": 0.0, "gradnorm-fd": 0.0}
    for _ in range(args.steps):
        for name, objective in (("gradnorm", exact), ("gradnorm-fd", fd)):
            t = time.perf_counter()
            _grad(model, objective, x, y)
            seconds[name] += time.perf_counter() - t
    ratio = seconds["gradnorm-fd"] / seconds["gradnorm"]
    print(f"seconds per step at batch {args.n}: gradnorm {seconds['gradnorm'] / args.steps:.4f}, "
          f"gradnorm-fd {seconds['gradnorm-fd'] / args.steps:.4f} (ratio {ratio:.3f})")


if __name__ == "__main__":
    main()
