#!/usr/bin/env bash
# The #14 GPU check: `radiology_vqa --quick` (30 steps, the recipe's defaults, unsloth backend) on a
# random-weight Ministral-3-14B-shaped model, with generated VQA data (3 questions per 512 px X-ray).
# Usage: bash benchmarks/vqa_quick_14b.sh WORK_DIR OUT_DIR   (on a CUDA machine with unsloth installed)
set -euo pipefail
work=${1:?work dir}; out=${2:?output dir}
mkdir -p "$work" "$out"
[ -f "$work/ministral3-14b/config.json" ] || python3 -m unsloth_med.models.shapes build ministral3-14b "$work/ministral3-14b"
python3 -c "
from unsloth_med.data.synthetic import write_fracture_vqa, write_synthetic_fractures
images = write_synthetic_fractures('$work/gen', train_per_class=24, test_per_class=2, size=512, pose_jitter=0.0)
print(write_fracture_vqa(images, '$work/gen-vqa/vqa.csv'))"
start=$(date +%s)
python3 -m unsloth_med.recipes.radiology_vqa --quick --data_dir "$work/gen-vqa/vqa.csv" \
    --model "$work/ministral3-14b" --image_size 512 --output_dir "$work/run" 2>&1 | tee "$out/vqa_quick_14b.log"
echo "command to run folder: $(( $(date +%s) - start )) s" | tee -a "$out/vqa_quick_14b.log"
cp "$work/run/train_stats.json" "$out/vqa_quick_14b_train_stats.json"
cp "$work/run/metrics.json" "$out/vqa_quick_14b_metrics.json" 2>/dev/null || true
cp "$work/run/run.json" "$out/vqa_quick_14b_run.json"
