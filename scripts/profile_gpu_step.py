"""Where a Swin-B step's GPU time goes: natural, GradNorm and PGD-3 at batch 64, bf16 (torch.profiler, 3 steps).

Usage: python scripts/profile_gpu_step.py   (needs a CUDA GPU; docs/RESULTS.md, issue 6)
"""
import torch
from torch.profiler import ProfilerActivity, profile

from natgrad.build import build_model
from natgrad.engine.bench import BenchSettings, bench_config, build_steps

cfg = bench_config(BenchSettings(recipe="imagenet-swinb-gradnorm"))
model = build_model(cfg, 3, 224)
dev = torch.device("cuda")
steps = build_steps(cfg, ["natural", "gradnorm", "pgd"], model, dev)
x = torch.rand(64, 3, 224, 224, device=dev)
y = torch.randint(0, 1000, (64,), device=dev)
print("fused attention:", [getattr(m, "fused_attn", None) for m in model.modules() if hasattr(m, "fused_attn")][:2])
for name, step in steps.items():
    for _ in range(3):
        step(x, y)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(x, y)
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages()) / 3 / 1e3
    print(f"\n===== {name}: {total:.1f} ms of kernels per step")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70))
