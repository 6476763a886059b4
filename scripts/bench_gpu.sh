#!/usr/bin/env bash
# The paper's Table 3 on one GPU: Swin-B at 224x224, batch 32 and 64, bf16 autocast, every
# training method of the imagenet-swinb-gradnorm recipe (eps 4/255, PGD-3 with step 2 eps / 3)
# and pgd-paper (PGD-3 as the authors' code runs it), eager and compiled (compile=true).
# Usage: scripts/bench_gpu.sh [OUT_DIR]  (default bench-gpu/); about 3 minutes eager on one H100,
# the compiled runs add their compilation (unmeasured: budget 5 minutes in all, eager first).
# Writes OUT_DIR/swin-b-batch{32,64}[-compiled].json and prints the tables; docs/RESULTS.md puts
# them beside the paper's Table 3 (GradNorm 0.628 of PGD-3's time per batch on 8 V100s).
set -uo pipefail
out=${1:-bench-gpu}
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')" || exit 2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
status=0
for batch in 32 64; do
    natgrad bench --recipe imagenet-swinb-gradnorm --device cuda --input-size 224 --batch "$batch" \
        --steps 10 --warmup 3 --quiet --json "$out/swin-b-batch$batch.json" || status=1
done
for batch in 32 64; do
    natgrad bench --recipe imagenet-swinb-gradnorm --device cuda --input-size 224 --batch "$batch" \
        --methods gradnorm,gradnorm-fd,gradnorm-fd-amp,gradnorm-fd-central,pgd,pgd-paper --compile \
        --steps 10 --warmup 3 --quiet --json "$out/swin-b-batch$batch-compiled.json" || status=1
done
exit $status
