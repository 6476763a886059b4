"""Time one attack step (forward and input gradient, frozen weights) of cnn-small on this CPU.

Eager NCHW against channels_last and torch.compile, batch 250 (AutoAttack's in the full reproduction),
to see how much of AutoAttack's time a memory layout or compilation could save.
Usage: python scripts/attack_step_layout.py
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from natgrad.gradients import frozen_parameters
from natgrad.models import cnn_small


def attack_step_ms(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 30) -> float:
    """Mean time of ``repeats`` steps after 3 warm-up steps, in milliseconds."""
    def step() -> None:
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(net(xr), y), xr)
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(250, 1, 28, 28), torch.randint(0, 10, (250,))
    eager = cnn_small(10, 1).eval()
    layout = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    compiled = torch.compile(eager)
    with frozen_parameters(eager), frozen_parameters(layout):
        attack_step_ms(compiled, x, y, repeats=1)  # compile outside the timing
        for _ in range(2):  # interleaved, twice, since this machine is shared
            base = attack_step_ms(eager, x, y)
            cl = attack_step_ms(layout, x.contiguous(memory_format=torch.channels_last), y)
            comp = attack_step_ms(compiled, x, y)
            print(f"eager {base:.1f} ms, channels_last {cl:.1f} ms ({cl / base:.2f}), "
                  f"torch.compile {comp:.1f} ms ({comp / base:.2f})", flush=True)


if __name__ == "__main__":
    main()
