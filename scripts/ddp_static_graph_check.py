"""Whether DDP's ``static_graph`` keeps GradNorm's gradients: 2 processes of 4 images against 1 of all 8.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 scripts/ddp_static_graph_check.py [--static-graph]

Prints, for three steps, the largest relative difference of any parameter's averaged gradient from the
one-process gradient, and the per-parameter ratios of their norms (1.0 where DDP is right).
"""

from __future__ import annotations

import argparse

import torch

from natgrad import models, objectives
from natgrad.engine.distributed import setup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--static-graph", action="store_true")
    args = parser.parse_args()
    ctx = setup("cpu")
    if ctx.world != 2:
        raise SystemExit("ddp_static_graph_check: run under torchrun with 2 processes")
    torch.manual_seed(0)
    model, reference = models.create("cnn-small", 10, 1), models.create("cnn-small", 10, 1)
    reference.load_state_dict(model.state_dict())
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    ddp = objectives.create("gradnorm", model, eps=0.1)
    ddp.distribute(torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True,
                                                             static_graph=args.static_graph))
    one = objectives.create("gradnorm", reference, eps=0.1)
    mine = slice(4 * ctx.rank, 4 * ctx.rank + 4)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        ddp(x[mine], y[mine])["loss"].backward()
        one(x, y)["loss"].backward()
        pairs = list(zip(model.parameters(), reference.parameters()))
        worst = max(((p.grad - q.grad).abs().max() / q.grad.abs().max()).item() for p, q in pairs)
        ratios = [round((p.grad.norm() / q.grad.norm()).item(), 3) for p, q in pairs]
        if ctx.is_main:
            print(f"step {step}: largest relative difference {worst:.3g}, norm ratios {ratios}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
