"""Where a training step's time goes, per method (torch.profiler, 3 steps after 2 warm-up steps).

Usage:
    python scripts/profile_step.py              # Swin-B 224, batch 64, bf16 on a CUDA GPU (docs/RESULTS.md, issue 6)
    python scripts/profile_step.py --device cpu --model resnet18 --act gelu --size 32 --batch 64 \\
        model.train_mode=eval                   # this CPU (docs/RESULTS.md, issue 19)

The steps are natgrad bench's (any bench method, ``-nhwc`` included); the table is sorted by each
operator's own time on the device (CUDA kernels, or CPU time on a CPU).
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from natgrad import data
from natgrad.build import build_model, select_device
from natgrad.engine.bench import BenchSettings, bench_config, build_steps, parse_methods

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--recipe", default="imagenet-swinb-gradnorm")
parser.add_argument("--model", default=None)
parser.add_argument("--act", default=None)
parser.add_argument("--size", type=int, default=224)
parser.add_argument("--channels", type=int, default=3)
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--methods", default="natural,gradnorm,pgd")
parser.add_argument("--device", default="cuda")
parser.add_argument("--rows", type=int, default=18)
parser.add_argument("overrides", nargs="*", help="config key=value")
args = parser.parse_args()

cfg = bench_config(BenchSettings(recipe=args.recipe, model=args.model, act=args.act, overrides=args.overrides))
dev = select_device(args.device)
cuda = dev.type == "cuda"
if not cuda:
    torch.set_flush_denormal(True)  # as training does
torch.manual_seed(0)
model = build_model(cfg, args.channels, args.size)
steps = build_steps(cfg, parse_methods(args.methods), model, dev)
x = torch.rand(args.batch, args.channels, args.size, args.size, device=dev)
y = torch.randint(0, data.info(cfg.data).num_classes, (args.batch,), device=dev)
fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")][:2]
if fused:
    print("fused attention:", fused)


def sync() -> None:
    if cuda:
        torch.cuda.synchronize()


key = "self_device_time_total" if cuda else "self_cpu_time_total"
for name, step in steps.items():
    for _ in range(2):
        step(x, y)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(x, y)
        sync()
    total = sum(getattr(e, key) for e in prof.key_averages()) / 3 / 1e3
    print(f"\n===== {name}: {total:.1f} ms of {'kernels' if cuda else 'operators (self time)'} per step")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
