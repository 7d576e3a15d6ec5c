#!/usr/bin/env bash
# Data-parallel scaling of one bone_fracture epoch (issue 17), 1 GPU against N GPUs, same session.
#
#   bash benchmarks/ddp_epoch.sh <bone-break copy> <models>/ministral3-14b OUT [N=2]
#
# Two settings, each on 1 GPU and on N GPUs (torchrun, one process per GPU):
#   epoch:    the benchmark's epoch setting (14B shape, language LoRA, micro-batch 32 per GPU under 24 GiB)
#   defaults: the recipe's defaults (batch 2 x accumulation 4 per GPU, vision + language LoRA)
# Each run leaves OUT/<setting>-<gpus>gpu/train_stats.json: samples/s over all steps (all GPUs together),
# world_size, peak memory per GPU (peak_reserved_gib_per_rank); the summary line divides them.
set -euo pipefail
DATA=$1; MODEL=$2; OUT=$3; N=${4:-2}
COMMON=(--data_dir "$DATA" --model "$MODEL" --backend unsloth --image_size 512 --eval_before false
        --eval_after false --export adapter --save_strategy no --num_train_epochs 1)
EPOCH=(--finetune_vision_layers false --use_gradient_checkpointing true --per_device_train_batch_size 32
       --gradient_accumulation_steps 1 --max_memory_gib 24)
mkdir -p "$OUT"
for gpus in 1 "$N"; do
  for setting in epoch defaults; do
    extra=(); [ "$setting" = epoch ] && extra=("${EPOCH[@]}")
    run="$OUT/$setting-${gpus}gpu"
    start=$(date +%s)
    torchrun --standalone --nproc_per_node "$gpus" -m unsloth_med.recipes.bone_fracture "${COMMON[@]}" \
      "${extra[@]}" --output_dir "$run" > "$run.log" 2>&1
    echo "$setting $gpus GPU(s): $(( $(date +%s) - start )) s command to adapter" >> "$OUT/wall.txt"
  done
done
python - "$OUT" "$N" <<'PY'
import json, sys
from pathlib import Path
out, n = Path(sys.argv[1]), sys.argv[2]
for setting in ("epoch", "defaults"):
    one, many = (json.loads((out / f"{setting}-{g}gpu" / "train_stats.json").read_text()) for g in ("1", n))
    rate1, rate_n = one["samples_per_second_all_steps"], many["samples_per_second_all_steps"]
    print(f"{setting}: 1 GPU {rate1} samples/s; {n} GPUs {rate_n} samples/s total, {rate_n / int(n):.2f} per GPU; "
          f"scaling {rate_n / rate1:.2f}x; train {one['train_seconds']} s -> {many['train_seconds']} s; peak reserved "
          f"GiB per GPU {one.get('peak_reserved_gib')} -> {many.get('peak_reserved_gib_per_rank')}")
PY
