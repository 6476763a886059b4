"""How much one image's input gradient depends on the rest of its batch, with BatchNorm in train and in eval mode.

Image 0's gradient in the whole batch against its gradient in a batch with only image 1 (train-mode BatchNorm
cannot take a batch of one).

    python scripts/per_image_gradients.py [--model resnet18] [--batch 8]
"""

from __future__ import annotations

import argparse

import torch

from natgrad import config
from natgrad.build import build_model
from natgrad.gradients import input_gradient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    for mode in ("train", "eval"):
        cfg = config.load("fmnist-gradnorm", ["data.name=synthetic", "data.channels=3", "data.image_size=32",
                                              f"model.name={args.model}", "model.act=gelu",
                                              f"model.train_mode={mode}"])
        torch.manual_seed(1)
        model = build_model(cfg).train()  # as in a training step: train_mode decides what train() means
        _, _, batch = input_gradient(model, x, y, create_graph=False)
        _, _, pair = input_gradient(model, x[:2], y[:2], create_graph=False)
        rel = ((batch[0] - pair[0]).norm() / pair[0].norm()).item()
        print(f"{args.model} GELU, train_mode={mode}: |g0 in batch of {args.batch} - g0 in batch of 2| / |g0 in batch "
              f"of 2| = {rel:.3g}")


if __name__ == "__main__":
    main()
