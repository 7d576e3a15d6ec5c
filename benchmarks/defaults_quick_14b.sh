#!/usr/bin/env bash
# Issue 15: what the recipe's DEFAULTS give (no expert flags) on a random-weight Ministral-3-14B shape with the
# real bone-break X-rays at 512 px: the quick trial twice (first run: empty compile caches; second: warm),
# then training-only runs under the memory budgets the issue names (vision + language LoRA within 24 GiB;
# language-only LoRA within 48 and 24 GiB).
# Usage: bash benchmarks/defaults_quick_14b.sh BONE_BREAK_DIR WORK_DIR OUT_DIR [RUN ...]   (CUDA machine, unsloth)
# RUN: quick-first quick-second (quick-third: a second warm run) vision-language-24gib language-48gib language-24gib (default: all, in that order),
#      or vision-language-24gib-eval, language-48gib-batch32, quick-compiled-eval,
#      quick-first-traced-probes (a first run in its own empty cache, its memory probes traced as before session 10),
#      quick-eager-train (--train_compiled false), vision-language-24gib-eager-train, vision-language-24gib-late-import
#      (unsloth imported after transformers, trl and peft, as the CLI did before session 10),
#      quick-eager-warm-up (--warm_up_shapes true: what --quick does; session 11 ran it beside a variant without),
#      quick-compiled-first (the quick trial compiled, in its own empty cache: the preset's default until session 10),
#      vision-language-24gib-micro4 (--max_micro_batch 4: micro-batch 4 x 2 accumulation under 24 GiB),
#      quick-again-N / quick-no-gc-freeze-N (warm runs with and without collector.freeze_imports, side by side),
#      quick-second-cprofile (after quick-first: the warm second run under cProfile, stats in OUT/quick-second-cprofile.prof)
#      quick-no-fold-N (a warm run with the adapters unfolded in evaluation, --eval_fold_adapters false, beside quick-again-N)
set -euo pipefail
data=${1:?bone-break dir}; work=${2:?work dir}; out=${3:?output dir}; shift 3
runs=${*:-quick-first quick-second vision-language-24gib language-48gib language-24gib}
mkdir -p "$work" "$out"
export UNSLOTH_MED_CACHE="$work/cache"   # starts empty: the first run compiles, the second should not
unset UNSLOTH_COMPILE_LOCATION TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
model="$work/ministral3-14b"
[ -f "$model/config.json" ] || python3 -m unsloth_med.models.shapes build ministral3-14b "$model" | tail -1
run() {  # name, then the recipe's flags
    local name=$1; shift
    local start; start=$(date +%s.%N)
    # UNSLOTH_MED_LATE_IMPORT=1: transformers, trl and peft imported first, so the CLI imports unsloth after them
    local entry=(-m unsloth_med.recipes.bone_fracture)
    # UNSLOTH_MED_CPROFILE=1: the run under cProfile, its stats kept beside the JSON ($out/$name.prof)
    [ -n "${UNSLOTH_MED_CPROFILE:-}" ] && entry=(-m cProfile -o "$out/$name.prof" "${entry[@]}")
    # UNSLOTH_MED_NO_GC_FREEZE=1: the run without collector.freeze_imports (what every run did before session 13)
    [ -n "${UNSLOTH_MED_NO_GC_FREEZE:-}" ] && entry=(-c "from unsloth_med import collector; collector.freeze_imports = lambda: 0; from unsloth_med.cli import recipe_main; from unsloth_med.recipes.bone_fracture import RECIPE; recipe_main(RECIPE)")
    [ -n "${UNSLOTH_MED_LATE_IMPORT:-}" ] && entry=(-c "import sys, transformers, trl, peft; from unsloth_med.cli import recipe_main; from unsloth_med.recipes.bone_fracture import RECIPE; recipe_main(RECIPE)")
    python3 "${entry[@]}" --data_dir "$data" --model "$model" --image_size 512 \
        --output_dir "$work/$name" "$@" > "$out/$name.log" 2>&1 || { tail -30 "$out/$name.log"; return 1; }
    local wall; wall=$(python3 -c "import time; print(round(time.time() - $start, 1))")
    python3 - "$work/$name" "$out/$name.json" "$wall" "$*" <<'PY'
import json, sys
from pathlib import Path
run, dest, wall, flags = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
read = lambda name: json.loads((run / name).read_text()) if (run / name).is_file() else None
stats, before, after, status = read("train_stats.json"), read("eval_before.json"), read("eval_after.json"), read("run.json")
record = {"flags": flags, "command_to_run_folder_s": wall, "train_stats": stats, "run": status,
          "eval_before_timing": (before or {}).get("timing"), "eval_after_timing": (after or {}).get("timing"),
          "eval_before_input": (before or {}).get("input_pipeline"), "eval_after_input": (after or {}).get("input_pipeline"),
          "eval_after_folded_adapters": (after or {}).get("folded_adapters")}
dest.write_text(json.dumps(record, indent=1))
profile = read("profile_step.json")
if profile:
    Path(str(dest).removesuffix(".json") + "-profile.json").write_text(json.dumps(profile, indent=1))
    print(f"{run.name}: profiled step {profile['step']}: GPU kernels {profile['gpu_kernel_s']} s of "
          f"{profile['wall_s']} s profiled ({profile.get('gpu_busy_share_of_median_step')} of the median step "
          f"{profile.get('median_unprofiled_step_s')} s), {profile['kernel_launches']} launches, "
          f"{profile['kernel_seconds_by_kind']}")
s = stats or {}
print(f"{run.name}: {wall:.0f} s command->run folder | plan: {(s.get('memory_plan') or {})} | "
      f"{s.get('samples_per_second_all_steps')} samples/s all steps, median step {s.get('median_step_seconds')} s, "
      f"peak {s.get('peak_allocated_gib')}/{s.get('peak_reserved_gib')} GiB | warm-up {(s.get('shape_warmup') or {}).get('seconds')} s"
      f" | compile cache {s.get('compile_cache')} | eval before {(before or {}).get('timing')} after {(after or {}).get('timing')}"
      f" {(after or {}).get('input_pipeline')} | layers checkpointed in training {s.get('checkpointed_layers')}")
PY
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
short="--max_steps 20 --eval_before false --eval_after false"
for name in $runs; do
    case $name in
        quick-first|quick-second|quick-third|quick-again-*) run "$name" --quick ;;
        quick-no-gc-freeze-*) UNSLOTH_MED_NO_GC_FREEZE=1 run "$name" --quick ;;  # A/B beside quick-again-*
        quick-no-fold-*) run "$name" --quick --eval_fold_adapters false ;;  # A/B beside quick-again-*
        quick-second-cprofile) UNSLOTH_MED_CPROFILE=1 run "$name" --quick ;;  # after quick-first: a warm run profiled
        quick-compiled-eval) run "$name" --quick --eval_compiled true ;;   # evaluation traced (the old default)
        quick-first-traced-probes) UNSLOTH_MED_CACHE="$work/cache-traced-probes" UNSLOTH_MED_PROBES_COMPILED=1 \
            run "$name" --quick ;;
        quick-eager-train) run "$name" --quick --train_compiled false ;;
        quick-eager-warm-up) run "$name" --quick --warm_up_shapes true ;;
        quick-compiled-first) UNSLOTH_MED_CACHE="$work/cache-compiled" run "$name" --quick --train_compiled true ;;
        vision-language-24gib) run "$name" $short --max_memory_gib 24 ;;
        vision-language-24gib-eager-train) run "$name" $short --max_memory_gib 24 --train_compiled false ;;
        vision-language-24gib-micro4) run "$name" $short --max_memory_gib 24 --max_micro_batch 4 ;;
        vision-language-24gib-late-import) UNSLOTH_MED_LATE_IMPORT=1 run "$name" $short --max_memory_gib 24 ;;
        vision-language-24gib-eval) run "$name" --max_steps 10 --eval_before false --max_memory_gib 24 ;;
        language-48gib) run "$name" $short --finetune_vision_layers false --max_memory_gib 48 ;;
        # *-profile: the same runs with step 10 under torch.profiler (profile_step.json kept as $out/$name-profile.json)
        vision-language-24gib-profile) run "$name" $short --max_memory_gib 24 --profile_step 10 ;;
        language-48gib-profile) run "$name" $short --finetune_vision_layers false --max_memory_gib 48 --profile_step 10 ;;
        language-48gib-eager-profile) run "$name" $short --finetune_vision_layers false --max_memory_gib 48 \
            --profile_step 10 --train_compiled false ;;
        language-24gib-profile) run "$name" $short --finetune_vision_layers false --max_memory_gib 24 --profile_step 10 ;;
        language-24gib) run "$name" $short --finetune_vision_layers false --max_memory_gib 24 ;;
        language-48gib-batch32) run "$name" $short --finetune_vision_layers false --max_memory_gib 48 \
            --gradient_accumulation_steps 16 ;;   # effective batch 2 x 16 = 32: the plan's micro-batch up to 32
        *) echo "unknown run $name"; exit 2 ;;
    esac
done
