#!/usr/bin/env bash
# Equal-budget tuning of the Fashion-MNIST GradNorm (GELU) and PGD-3 (GELU) recipes on held-out training
# images (data.holdout=5000: trained on the other 55,000, measured on those 5000, never on the test set).
# Four configurations per method, everything else the recipe's (4 epochs, schedule, model, seed):
#   GradNorm: the weight pair (ce_weight, gn_weight) = (2 - w, w) for w in 1.0 1.2 1.4 1.6
#   PGD-3:    step 2 eps/3 (the recipe), eps/2, eps; step 2 eps/3 with a random start
# Each training ends with clean and PGD-10 accuracy on 1000 held-out images (its last metrics line);
# with AUTOATTACK=1 each model is then also evaluated with AutoAttack standard on 1000 held-out images.
# Usage: scripts/tune_fmnist.sh [OUT_DIR] [key=value ...]   (JOBS=N runs N configurations at once)
set -uo pipefail
out=${1:-runs/tune-fmnist}; shift || true
jobs=${JOBS:-1}
declare -A cfgs=(
  [gn-1.0]="fmnist-gradnorm gradnorm.ce_weight=1.0 gradnorm.gn_weight=1.0"
  [gn-1.2]="fmnist-gradnorm gradnorm.ce_weight=0.8 gradnorm.gn_weight=1.2"
  [gn-1.4]="fmnist-gradnorm gradnorm.ce_weight=0.6 gradnorm.gn_weight=1.4"
  [gn-1.6]="fmnist-gradnorm gradnorm.ce_weight=0.4 gradnorm.gn_weight=1.6"
  [pgd-step0.067]="fmnist-pgd"
  [pgd-step0.05]="fmnist-pgd attack.step_size=0.05"
  [pgd-step0.1]="fmnist-pgd attack.step_size=0.1"
  [pgd-step0.067-rs]="fmnist-pgd attack.random_start=true"
)
mkdir -p "$out"
one() {
  local name=$1; shift
  natgrad train --out "$out/$name" --quiet ${cfgs[$name]} data.holdout=5000 "$@" > "$out/$name.log" 2>&1 || return 1
  if [ "${AUTOATTACK:-0}" = 1 ]; then
    natgrad eval "$out/$name" --attacks clean,autoattack --n 1000 --quiet --json "$out/$name.eval.json" >> "$out/$name.log" 2>&1
  fi
}
for name in "${!cfgs[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
  one "$name" "$@" &
done
wait
for name in $(printf '%s\n' "${!cfgs[@]}" | sort); do
  printf '%-18s %s\n' "$name" "$(tail -1 "$out/$name.log")"
done
