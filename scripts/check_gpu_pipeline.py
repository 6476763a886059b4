"""The CUDA path of the cifar10 grid: the recipes' own models, bf16, on a tiny synthetic stand-in.

Usage: python scripts/check_gpu_pipeline.py RESULTS_COPY.json [cuda|cpu]   (docs/RESULTS.md, issue 6)
"""
import json
import shutil
import sys
import time
from pathlib import Path

from natgrad.pipeline import PipelineSettings
from natgrad.reproduce import run_reproduce

device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
out = Path("/tmp/gpu-grid")
shutil.rmtree(out, ignore_errors=True)
overrides = ("data.name=synthetic", "data.synthetic_size=256", "data.image_size=32", "data.channels=3",
             "data.limit_eval=64", "data.num_workers=0", "batch_size=32", "eval.batch_size=64", f"device={device}")
sizes = PipelineSettings(epochs=1, limit_train=None, limit_eval=64, n_eval=64, n_sweep=32, sweep_to=2.0,
                         n_autoattack=32,
              autoattack_batch=32, square_queries=50, pgd_steps=3, n_analysis=16, power_iterations=2, bench_steps=3,
              bench_warmup=1)
t0 = time.time()
results = run_reproduce("cifar10", out, budget="short", overrides=overrides, progress=False, log=print, sizes=sizes)
print(f"grid done in {time.time() - t0:.1f} s on {device}")
for row in results["rows"]:
    print(row["model"], {k: row[k] for k in ("clean_acc", "autoattack_acc", "l1_mean", "curvature")})
integrity = [json.loads(p.read_text()).get("integrity") for p in out.rglob("eval*.json")]
print("integrity blocks:", integrity[:3])
shutil.copy(out / "results.json", Path(sys.argv[1]))
