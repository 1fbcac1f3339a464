#!/usr/bin/env bash
# The ablation behind the choice of DCE's default (README, "Why DCE lost, and what changed"):
# VGG-11 (width 0.25) on the first 20,000 Fashion-MNIST training images (all 10,000 test
# images), 25% of the channels kept, 4 epochs in all for every variant, 3 seeds, one thread
# per worker. Each variant is a `dce sweep` of its own under OUT; run this script in two
# shells (or WORKERS=2) and they split the runs; rerunning continues where it stopped.
# Then `dce ablation-table OUT` collects every variant into one table.
set -euo pipefail
OUT=${OUT:-runs/ablation-fmnist}
PY=${PY:-.venv/bin/python}
# The poster's layer budget unless a variant says --budget global (the last one counts).
COMMON=(--dataset fashion-mnist --model vgg11 --width 0.25 --batch-size 128 --lr 0.1
        --train-limit 20000 --seeds 0,1,2 --threads 1 --no-progress --budget layer)
# label | options (4 epochs in all)
# Every variant spells out the options that shape it (the defaults of dce train changed
# while this ablation ran, and a sweep folder refuses other options).
VARIANTS=(
  "dense|--methods narrow --fractions 1.0 --explore-epochs 1 --finetune-epochs 3 --finetune-lr 0.02 --reward l2 --lr-schedule continuous"
  "narrow|--no-baseline --methods narrow --fractions 0.25 --explore-epochs 1 --finetune-epochs 3 --finetune-lr 0.01 --reward max --lr-schedule restart"
  "shrink-1+3|--no-baseline --methods shrink --fractions 0.25 --explore-epochs 1 --finetune-epochs 3 --finetune-lr 0.01 --reward l2 --lr-schedule continuous"
  "poster-cucb|--no-baseline --methods cucb --fractions 0.25 --explore-epochs 3 --finetune-epochs 1 --finetune-lr 0.02 --reward max --lr-schedule restart"
  "prune|--no-baseline --methods prune --fractions 0.25 --explore-epochs 2 --finetune-epochs 2 --finetune-lr 0.02 --reward max --lr-schedule restart"
  "shrink-global|--no-baseline --methods shrink --budget global --fractions 0.25 --explore-epochs 1 --finetune-epochs 3 --finetune-lr 0.01 --reward l2 --lr-schedule continuous"
  "shrink-2+2|--no-baseline --methods shrink --fractions 0.25 --explore-epochs 2 --finetune-epochs 2 --finetune-lr 0.01 --reward l2 --lr-schedule continuous"
  "cucb-anneal|--no-baseline --methods cucb --fractions 0.25 --explore-epochs 1 --finetune-epochs 3 --finetune-lr 0.01 --reward max --lr-schedule continuous --anneal"
  "shrink-max|--no-baseline --methods shrink --fractions 0.25 --explore-epochs 1 --finetune-epochs 3 --finetune-lr 0.02 --reward max --lr-schedule continuous"
  "poster-random|--no-baseline --methods random --fractions 0.25 --explore-epochs 3 --finetune-epochs 1 --finetune-lr 0.02 --reward l2 --lr-schedule restart"
  "shrink-rewind|--no-baseline --methods shrink --fractions 0.25 --explore-epochs 1 --finetune-epochs 3 --finetune-lr 0.02 --reward l2 --lr-schedule continuous --rewind"
  "poster-cucb-scaleinit|--no-baseline --methods cucb --fractions 0.25 --explore-epochs 3 --finetune-epochs 1 --finetune-lr 0.02 --reward max --lr-schedule restart --scale-init"
)
for entry in "${VARIANTS[@]}"; do
  label=${entry%%|*}; options=${entry#*|}
  # shellcheck disable=SC2086
  $PY -m dce_kernels.experiments.cli sweep --out "$OUT/$label" "${COMMON[@]}" $options || true
done

# Second part: the random-order control of the winner, and its widths trained from scratch
# (is the gain in the widths or in the trained weights?).
EXTRA=(
  "shrink-random-global|--no-baseline --methods shrink-random --budget global --fractions 0.25 --explore-epochs 1 --finetune-epochs 3 --finetune-lr 0.02 --reward l2 --lr-schedule continuous"
  "shrink-global-discount|--no-baseline --methods shrink --budget global --fractions 0.25 --explore-epochs 1 --finetune-epochs 3 --finetune-lr 0.02 --reward l2 --lr-schedule continuous --discount 0.99"
  # Equal inference cost: the uniform network's FLOPs per image, spent by score (weight 0)
  # or by score per FLOP saved (weight 1; seeds 0 and 1 ran before --flops-weight existed,
  # with the code that is now weight 1).
  "shrink-flops-by-score|--no-baseline --methods shrink --budget flops --flops-weight 0 --fractions 0.25 --explore-epochs 1 --finetune-epochs 3 --finetune-lr 0.01 --reward l2 --lr-schedule continuous"
  "shrink-random-flops|--no-baseline --methods shrink-random --budget flops --flops-weight 0 --fractions 0.25 --explore-epochs 1 --finetune-epochs 3 --finetune-lr 0.01 --reward l2 --lr-schedule continuous"
  "shrink-flops-per-flop|--no-baseline --methods shrink --budget flops --flops-weight 1 --fractions 0.25 --explore-epochs 1 --finetune-epochs 3 --finetune-lr 0.01 --reward l2 --lr-schedule continuous"
)
TRAIN_COMMON=(--dataset fashion-mnist --model vgg11 --width 0.25 --batch-size 128 --lr 0.1
              --train-limit 20000 --threads 1 --no-progress --lr-schedule continuous --reward l2)
if [ "${PART:-all}" != "1" ]; then
  for entry in "${EXTRA[@]}"; do
    label=${entry%%|*}; options=${entry#*|}
    # shellcheck disable=SC2086
    $PY -m dce_kernels.experiments.cli sweep --out "$OUT/$label" "${COMMON[@]}" $options || true
  done
  # The widths of the two budgets, trained from scratch.
  for seed in 0 1 2; do
    for budget in global flops; do
      case $budget in
        global) source_run="$OUT/shrink-global/fashion-mnist-vgg11/shrink-p0.25-s$seed"
                target="$OUT/narrow-at-shrink-widths/fashion-mnist-vgg11/narrow-p0.25-s$seed" ;;
        flops) source_run="$OUT/shrink-flops-by-score/fashion-mnist-vgg11/shrink-p0.25-s$seed"
               target="$OUT/narrow-at-shrink-flops-widths/fashion-mnist-vgg11/narrow-p0.25-s$seed" ;;
      esac
      if [ -f "$source_run/report.json" ] && [ ! -f "$target/report.json" ]; then
        resume=(); [ -f "$target/checkpoint.pt" ] && resume=(--resume)
        $PY -m dce_kernels.experiments.cli train "${TRAIN_COMMON[@]}" --seed "$seed" \
          --method narrow --budget $budget --fraction 0.25 --explore-epochs 1 --finetune-epochs 3 \
          --widths-from "$source_run" --run-dir "$target" "${resume[@]}" || true
      fi
    done
  done
fi
