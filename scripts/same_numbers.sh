#!/usr/bin/env bash
# Issue 16's behaviour check: train one small run, then write the JSON of `natgrad eval` (clean, pgd,
# autoattack-custom with apgd-ce, eps-sweep) and of `natgrad analyze` on it into OUT. Run it before and
# after a refactor and compare with scripts/compare_json.py.
# Usage: scripts/same_numbers.sh OUT [NATGRAD]
set -euo pipefail
out=$1
natgrad=${2:-natgrad}
mkdir -p "$out"
$natgrad train fmnist-gradnorm --out "$out/run" --quiet epochs=1 data.limit_train=512 data.limit_eval=64 seed=3
$natgrad eval "$out/run" --quiet --attacks clean,pgd,autoattack-custom,eps-sweep --aa-attacks apgd-ce \
  --pgd-steps 5 --n 64 --json "$out/eval.json" --plots "$out/plots"
$natgrad analyze "$out/run" --quiet --n 32 --out "$out/analysis"
cp "$out/run/metrics.jsonl" "$out/metrics.jsonl"
