"""`unsloth-med bench`: the training paths side by side, on identical data, one process per path.

    unsloth-med bench --model ministral3-14b --recipe bone_fracture --data_dir DIR \
        --paths hf-bf16,hf-qlora,unsloth-4bit,unsloth-16bit --batch_sizes 2,16

Paths (all LoRA on the same modules, same rank, same 8-bit AdamW, same pixels and tokens):
- hf-bf16:       transformers + peft, bf16 weights, gradient checkpointing (the tutorials' approach)
- hf-qlora:      transformers + bitsandbytes NF4 (double quant) + peft, gradient checkpointing
- unsloth-4bit:  FastVisionModel 4-bit + Unsloth gradient checkpointing (offloaded)
- unsloth-16bit: FastVisionModel 16-bit + Unsloth gradient checkpointing

--model is a shape name (a random-weight model of a real checkpoint's shape, built once on the GPU:
see models/shapes.py) or a local checkpoint folder. Images are decoded, resized to the recipe's
image_size and snapped to the vision patch grid once, before any path runs, so every path sees the
same pixels. Each path then runs in its own process: import, load, a measured bf16 matmul rate, and
per batch size: warm-up steps (compilation; reported, excluded), timed steps (median), peak memory,
FLOPs of one step counted with torch.utils.flop_counter.FlopCounterMode, MFU, final loss.

--max_memory_gib N caps each process at N GiB (torch.cuda.set_per_process_memory_fraction) and finds
the largest batch that fits with accelerate's find_executable_batch_size instead of --batch_sizes.

Results: one JSON per path under --out (default benchmarks/results), a summary JSON and a markdown
table with each row's throughput as a multiple of hf-bf16 at batch 2 (the tutorials' setting) and of
the fastest HF row that fits in the same memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_T_START = time.perf_counter()

#: The product's own row: the recipe's CLI with its defaults (memory plan, speedups, warm-up), as a user runs it.
RECIPE_DEFAULTS = "recipe-defaults"
PATHS = ("hf-bf16", "hf-qlora", "unsloth-4bit", "unsloth-16bit", RECIPE_DEFAULTS)
GiB = 2**30
# Only for smoke-testing the bench's plumbing without a GPU (hf-bf16 path, tiny models): "cpu".
DEVICE = os.environ.get("UNSLOTH_MED_BENCH_DEVICE", "cuda")


def _truthy(text: str) -> bool:
    return str(text).lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------- parent
def run_bench(args, argv: list[str]) -> int:
    """`unsloth-med bench` with its parsed options (cli/bench.py); `argv` is recorded in the results."""
    from .errors import BackendError, ConfigError

    if args.merge:
        return merge_command(args, argv)
    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise BackendError("unsloth-med bench measures GPU training: it needs an NVIDIA GPU with CUDA, "
                           "and none is visible.")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ConfigError(f"Unknown bench path(s) {unknown}. Paths: {', '.join(PATHS)}.")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    gpu = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    tag = args.tag or time.strftime("%Y%m%d") + "-" + _slug(gpu)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .data.sources import cache_dir

    work = cache_dir() / "bench" / tag
    work.mkdir(parents=True, exist_ok=True)

    model_dir, shape_info = resolve_model(args.model, args.models_dir)
    rows_file, data_info = prepare_rows(args, model_dir, work,
                                        max(batch_sizes + [args.start_batch if args.max_memory_gib else 0]))
    model_name = Path(args.model).name if not shape_info else args.model
    results = []
    for path in paths:
        t0 = time.time()
        result = (recipe_defaults_row(args, model_dir, work) if path == RECIPE_DEFAULTS
                  else _worker_row(args, path, model_dir, rows_file, work, data_info))
        result.update(wall_s=round(time.time() - t0, 1), model=model_name, shape=shape_info, data=data_info, tag=tag,
                      command="unsloth-med bench " + " ".join(argv), settings=_settings(args, path))
        results.append(result)
        (out / f"{tag}_{_slug(model_name)}_{_variant(result)}.json").write_text(json.dumps(result, indent=1))
        print(f"[bench] {path}: done in {time.time() - t0:.0f} s"
              + (f" ({result['error']})" if "error" in result else ""),
              flush=True)
    fill_missing_flops(results)
    rows = table_rows(results)
    summary = {"tag": tag, "model": model_name, "shape": shape_info, "gpu": gpu, "data": data_info,
               "command": "unsloth-med bench " + " ".join(argv), "rows": rows}
    (out / f"{tag}_{_slug(model_name)}_summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown_table(rows)
    (out / f"{tag}_{_slug(model_name)}.md").write_text(
        f"# {model_name} on {gpu}\n\n`{summary['command']}`\n\n{table}\n")
    print(table)
    return 0


def merge_command(args, argv: list[str]) -> int:
    """Summary + markdown table from per-path JSON files written by earlier bench runs."""
    loaded = [(Path(f), json.loads(Path(f).read_text())) for f in args.merge if not f.endswith("_summary.json")]
    loaded = [(f, r) for f, r in loaded if "path" in r]
    loaded.sort(key=lambda fr: (PATHS.index(fr[1]["path"]) if fr[1]["path"] in PATHS else 99))
    sources = {id(r): (f, json.dumps(r, sort_keys=True)) for f, r in loaded}  # to tell what the merge changed
    results = [r for _, r in loaded]
    if not results:
        from .errors import ConfigError

        raise ConfigError("--merge: no per-path bench result files among the arguments.")
    fill_missing_flops(results)
    first = results[0]
    model_name, tag = first.get("model", "model"), args.tag or first.get("tag", "merged")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [_variant(r) for r in results]
    for r, variant in zip(results, names):  # the per-path files, updated with borrowed FLOP counts
        source, original = sources[id(r)]
        if source.resolve().parent == out.resolve() and json.dumps(r, sort_keys=True) == original:
            continue  # already a result file here, unchanged: no second copy under the new tag
        if names.count(variant) > 1:  # the same settings at other batch sizes, from separate runs
            variant += "-b" + "-".join(str(b.get("batch_size")) for b in r.get("batches", []))
        (out / f"{tag}_{_slug(model_name)}_{variant}.json").write_text(json.dumps(r, indent=1))
    rows = table_rows(results)
    gpus = sorted({r.get("gpu", "?") for r in results})
    commands = sorted({r.get("command", "") for r in results if r.get("command")})
    summary = {"tag": tag, "model": model_name, "shape": first.get("shape"), "gpu": ", ".join(gpus),
               "data": first.get("data"), "commands": commands, "rows": rows}
    (out / f"{tag}_{_slug(model_name)}_summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown_table(rows)
    cmd_text = "\n".join(f"`{c}`" for c in commands)
    (out / f"{tag}_{_slug(model_name)}.md").write_text(f"# {model_name} on {summary['gpu']}\n\n{cmd_text}\n\n{table}\n")
    print(table)
    return 0


def _settings(args, path: str) -> dict:
    """What a row was run with, beyond the path: these name its result file and its table row."""
    if path == RECIPE_DEFAULTS:  # nothing chosen but the memory cap, if one was given
        return {"max_memory_gib": args.max_memory_gib}
    unsloth = path.startswith("unsloth")
    return {"speedups": bool(args.speedups), "max_memory_gib": args.max_memory_gib,
            "gradient_checkpointing": args.gradient_checkpointing if unsloth else "true",
            "unchecked_layers": args.unchecked_layers, "sdpa": args.sdpa}


def _variant(result: dict, sep: str = "-") -> str:
    """The result file's name part (sep "-") or the table's row label (sep " +"): the path and what was changed."""
    s = result.get("settings") or {"speedups": bool(result.get("speedups")),
                                   "max_memory_gib": result.get("max_memory_gib")}
    parts = [result["path"]]
    if s.get("speedups"):
        parts.append("speedups")
    if s.get("gradient_checkpointing", "unsloth") not in ("unsloth", "true") or \
            (s.get("gradient_checkpointing") == "true" and result["path"].startswith("unsloth")):
        parts.append(f"gc-{s['gradient_checkpointing']}")
    if s.get("unchecked_layers"):
        parts.append(f"unchecked{s['unchecked_layers']}")
    if s.get("sdpa", "default") != "default":
        parts.append(f"sdpa-{s['sdpa']}")
    if s.get("max_memory_gib") and sep == "-":  # the table has a column for the cap
        parts.append(f"cap{s['max_memory_gib']:g}")
    return sep.join(parts)


def _run_logged(cmd: list[str], log_file: Path, timeout: float) -> int | str:
    """Run cmd with its output in log_file; its exit code, or "timeout"."""
    with log_file.open("w") as log:
        try:
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        except subprocess.TimeoutExpired:
            return "timeout"


def _worker_row(args, path: str, model_dir: Path, rows_file: Path, work: Path, data_info: dict) -> dict:
    """One training path measured in its own process (`--worker`), read back from its result file."""
    result_file = work / f"{path}.json"
    log_file = work / f"{path}.log"
    cmd = [sys.executable, "-m", "unsloth_med.bench", "--worker", path, "--model_dir", str(model_dir),
           "--rows", str(rows_file), "--result", str(result_file), "--batch_sizes", args.batch_sizes,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--lora_r", str(args.lora_r),
           "--finetune_vision_layers", args.finetune_vision_layers, "--learning_rate", str(args.learning_rate),
           "--image_size", str(data_info["image_size"]), "--recipe", args.recipe, "--seed", str(args.seed),
           "--start_batch", str(args.start_batch), "--gradient_checkpointing", args.gradient_checkpointing,
           "--unchecked_layers", str(args.unchecked_layers), "--sdpa", args.sdpa]
    if args.max_memory_gib:
        cmd += ["--max_memory_gib", str(args.max_memory_gib)]
    if args.no_flops:
        cmd += ["--no_flops"]
    if args.profile:
        cmd += ["--profile"]
    if args.speedups:
        cmd += ["--speedups"]
    print(f"[bench] {path}: {' '.join(cmd[2:4])} ... (log: {log_file})", flush=True)
    result_file.unlink(missing_ok=True)
    rc = _run_logged(cmd, log_file, args.timeout)
    if result_file.is_file():
        return json.loads(result_file.read_text())
    return {"path": path, "error": f"worker exit {rc}; see {log_file}", "log_tail": log_file.read_text()[-3000:]}


def recipe_defaults_row(args, model_dir: Path, work: Path) -> dict:
    """The recipe's own CLI with its defaults for warmup + steps optimizer steps (no evaluation, no export), read
    back from its train_stats.json as a bench row: what a user who reads no benchmark gets."""
    import shutil

    run = work / "recipe-defaults-run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", f"unsloth_med.recipes.{args.recipe}", "--model", str(model_dir),
           "--max_steps", str(args.warmup + args.steps), "--eval_before", "false", "--eval_after", "false",
           "--save_strategy", "no", "--export", "adapter", "--logging_steps", "1", "--output_dir", str(run)]
    cmd += ["--data_dir", args.data_dir] if args.data_dir else []
    cmd += ["--image_size", str(args.image_size)] if args.image_size else []
    cmd += ["--max_memory_gib", str(args.max_memory_gib)] if args.max_memory_gib else []
    log_file = work / "recipe-defaults.log"
    rc = _run_logged(cmd, log_file, args.timeout)
    stats_file = run / "train_stats.json"
    if rc != 0 or not stats_file.is_file():
        return {"path": RECIPE_DEFAULTS, "error": f"recipe run exit {rc}; see {log_file}",
                "log_tail": log_file.read_text()[-3000:]}
    stats = json.loads(stats_file.read_text())
    status = json.loads((run / "run.json").read_text())
    losses = [json.loads(line).get("loss") for line in (run / "train_log.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    # batch_size: the samples of one optimizer step (micro-batch x accumulation), as the other rows' batch is theirs
    batch = {"batch_size": stats.get("samples_per_step"), "micro_batch": stats.get("micro_batch"),
             "samples_per_step": stats.get("samples_per_step"),
             "samples_per_s": stats.get("samples_per_second"),
             "samples_per_s_all_steps": stats.get("samples_per_second_all_steps"),
             "median_step_s": stats.get("median_step_seconds"), "max_over_median": stats.get("max_over_median"),
             "step_s": stats.get("step_seconds"), "peak_alloc_gib": stats.get("peak_allocated_gib"),
             "peak_reserved_gib": stats.get("peak_reserved_gib"), "data_share": stats.get("data_share"),
             "warmup_s": (stats.get("shape_warmup") or {}).get("seconds"), "final_loss": losses[-1] if losses else None}
    return {"path": RECIPE_DEFAULTS, "command_run": cmd[2:], "memory_plan": stats.get("memory_plan"),
            "max_memory_gib": args.max_memory_gib,  # the cap it ran under: the table's column and the HF comparison
            "checkpointed_layers": stats.get("checkpointed_layers"), "gpu": stats.get("device"),
            "load_s": (status.get("timings_s") or {}).get("load_model"), "timings_s": status.get("timings_s"),
            "batches": [batch]}


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def resolve_model(model: str, models_dir: str | None) -> tuple[Path, dict | None]:
    from .models import shapes

    if model in shapes.SHAPES:
        from .data.sources import cache_dir

        root = Path(models_dir) if models_dir else cache_dir() / "shapes"
        folder = shapes.ensure_built(model, root)
        return folder, json.loads((folder / shapes.MARKER).read_text())
    folder = Path(model)
    if not (folder / "config.json").is_file():
        from .errors import ConfigError

        raise ConfigError(f"--model {model}: not a shape ({', '.join(shapes.SHAPES)}) nor a local checkpoint folder.")
    return folder, None


def prepare_rows(args, model_dir: Path, work: Path, max_batch: int) -> tuple[Path, dict]:
    """Decode, resize and snap the images once; every path reads the same files."""
    from transformers import AutoConfig

    from .data.images import ImageFit, load_image
    from .data.sources import load_recipe_data
    from .models.families import family_of, image_factor
    from .recipes import get_recipe

    recipe = get_recipe(args.recipe)
    image_size = args.image_size or recipe.image_size
    config = AutoConfig.from_pretrained(model_dir)
    factor = image_factor(config, family_of(config))
    fit = ImageFit(image_size, factor, _truthy(args.image_buckets))
    splits = load_recipe_data(recipe, args.data_dir, seed=args.seed)
    train = splits["train"].shuffle(seed=args.seed)
    # The whole training split: same-shape batches (--speedups) draw each shape in its real proportion.
    n = min(max(8, max_batch * (args.warmup + args.steps + 1), len(train)), len(train))
    img_dir = work / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows, sizes = [], {}
    t0 = time.time()
    for i in range(n):
        row = train[i]
        image = load_image(row["image"], fit)
        path = img_dir / f"{i:05d}.png"
        image.save(path)
        sizes[f"{image.size[0]}x{image.size[1]}"] = sizes.get(f"{image.size[0]}x{image.size[1]}", 0) + 1
        rows.append({"image": str(path), "target": row["target"], "id": str(row["id"]),
                     "shape": f"{image.size[0]}x{image.size[1]}"})
    rows_file = work / "rows.json"
    rows_file.write_text(json.dumps(rows))
    info = {"recipe": recipe.name, "image_size": image_size, "snap_factor": factor, "image_buckets": fit.buckets,
            "images": n,
            "distinct_sizes": len(sizes), "prepare_s": round(time.time() - t0, 1)}
    return rows_file, info


def fill_missing_flops(results: list[dict]) -> None:
    """Make FLOP counts comparable across paths at the same batch (same tokens, same model).

    A path whose FlopCounterMode step failed, or whose count is well below another path's (compiled
    kernels that bypass the counter), takes the largest count measured for that batch.
    """
    known: dict[tuple[int, int], float] = {}
    for r in results:
        for b in r.get("batches", []):
            key = (b.get("batch_size"), b.get("tokens_per_step", 0))
            if b.get("flops_per_step"):
                known[key] = max(known.get(key, 0.0), b["flops_per_step"])
    # Where no step of that batch was counted (FlopCounterMode ran out of memory at the large batch, or
    # was skipped): FLOPs per token of a counted step, times this step's tokens. Linear in tokens is
    # right to within the attention term, a few percent at these lengths.
    per_token = max((b["flops_per_step"] / b["tokens_per_step"] for r in results for b in r.get("batches", [])
                     if b.get("flops_per_step") and b.get("tokens_per_step") and
                     b.get("flops_source", "").startswith("FlopCounterMode")), default=None)
    for r in results:
        for b in r.get("batches", []):
            key = (b.get("batch_size"), b.get("tokens_per_step", 0))
            if b.get("median_step_s") and key not in known and per_token and b.get("tokens_per_step"):
                b["flops_per_step"] = per_token * b["tokens_per_step"]
                b["flops_source"] = "FLOPs per token of a counted step x this step's tokens"
                _add_mfu(b, r.get("matmul_tflops"))
                continue
            if not b.get("median_step_s") or key not in known:
                continue
            own = b.get("flops_per_step")
            if not own or own < 0.8 * known[key]:
                if own:
                    b["flops_counted_here"] = own
                b["flops_per_step"] = known[key]
                b["flops_source"] = "counted on another path (same batch, same tokens)"
                _add_mfu(b, r.get("matmul_tflops"))


def _add_mfu(b: dict, matmul_tflops: float | None) -> None:
    if b.get("flops_per_step") and b.get("median_step_s"):
        b["flops_per_sample"] = b["flops_per_step"] / b["batch_size"]
        b["achieved_tflops"] = b["flops_per_step"] / b["median_step_s"] / 1e12
        if matmul_tflops:
            b["mfu"] = b["achieved_tflops"] / matmul_tflops


def table_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        if "error" in r and not r.get("batches"):
            rows.append({"path": r["path"], "error": r["error"]})
            continue
        for b in r.get("batches", []):
            rows.append({
                "path": _variant(r, sep=" +"), "batch_size": b["batch_size"],
                "error": b.get("error"),
                "samples_per_s": b.get("samples_per_s"), "tokens_per_s": b.get("tokens_per_s"),
                "samples_per_s_all_steps": (b.get("samples_per_s_all_steps")
                                            or _all_steps_rate(b["batch_size"], b.get("step_s"))),
                "median_step_s": b.get("median_step_s"), "max_over_median": b.get("max_over_median"),
                "peak_alloc_gib": b.get("peak_alloc_gib"), "peak_reserved_gib": b.get("peak_reserved_gib"),
                "load_s": r.get("load_s"), "warmup_s": b.get("warmup_s"),
                "flops_per_sample": b.get("flops_per_sample"), "mfu": b.get("mfu"),
                "mfu_6n": _mfu_6n(r, b), "final_loss": b.get("final_loss"),
                "data_share": b.get("data_share"), "memory_cap_gib": r.get("max_memory_gib"),
                "gpu_busy_share": (b.get("profile") or {}).get("gpu_busy_share"),
                "gradient_checkpointing": r.get("gradient_checkpointing"),
            })
    base = next((x for x in rows if x["path"] == "hf-bf16" and x.get("batch_size") == 2 and x.get("samples_per_s")),
                None)
    hf = [x for x in rows if x["path"].startswith("hf-") and x.get("samples_per_s")]
    for x in rows:
        if not x.get("samples_per_s"):
            continue
        x["x_hf_bf16_b2"] = x["samples_per_s"] / base["samples_per_s"] if base else None
        # The memory a row may use: its cap when it ran under one, else what it reserved at peak.
        budget = x.get("memory_cap_gib") or x["peak_reserved_gib"]
        fits = [h["samples_per_s"] for h in hf if budget is not None and h["peak_reserved_gib"] is not None
                and h["peak_reserved_gib"] <= budget + 1e-9]
        x["x_best_hf_same_memory"] = x["samples_per_s"] / max(fits) if fits else None
    return rows


def _mfu_6n(result: dict, batch: dict) -> float | None:
    """The issue's convention: 6 x model parameters x tokens/s over the bf16 matmul rate measured in the same
    process. Needs no FLOP count, so every row has it; it ignores attention and counts the frozen parts'
    backward as if computed, so it is a yardstick across paths, not a hardware counter."""
    params = (result.get("shape") or {}).get("params") if isinstance(result.get("shape"), dict) else None
    if not (params and batch.get("tokens_per_s") and result.get("matmul_tflops")):
        return None
    return 6 * params * batch["tokens_per_s"] / (result["matmul_tflops"] * 1e12)


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    head = ("| path | cap GiB | batch | samples/s | samples/s all steps | tokens/s | median step s | max/median "
            "| peak alloc GiB | peak reserved GiB "
            "| load s | warm-up s | TFLOPs/sample | MFU | MFU 6N | GPU busy | final loss | data share | × hf-bf16 b2 "
            "| × best HF ≤ mem |")
    lines = [head, "|" + "---|" * 20]
    for x in rows:
        cap = _fmt(x.get("memory_cap_gib"), "g")
        if x.get("error") and not x.get("samples_per_s"):
            lines.append(f"| {x['path']} | {cap} | {x.get('batch_size', '—')} | failed: {str(x['error'])[:80]} |"
                         + " |" * 16)
            continue
        lines.append("| " + " | ".join([
            x["path"], cap, str(x["batch_size"]), _fmt(x["samples_per_s"], ".2f"),
            _fmt(x.get("samples_per_s_all_steps"), ".2f"), _fmt(x["tokens_per_s"], ".0f"),
            _fmt(x["median_step_s"], ".3f"), _fmt(x["max_over_median"], ".2f"), _fmt(x["peak_alloc_gib"], ".1f"),
            _fmt(x["peak_reserved_gib"], ".1f"), _fmt(x["load_s"], ".0f"), _fmt(x["warmup_s"], ".1f"),
            _fmt(x["flops_per_sample"] / 1e12 if x.get("flops_per_sample") else None, ".2f"),
            _fmt(x["mfu"] * 100 if x.get("mfu") else None, ".1f") + ("%" if x.get("mfu") else ""),
            _fmt(x["mfu_6n"] * 100 if x.get("mfu_6n") else None, ".1f") + ("%" if x.get("mfu_6n") else ""),
            _fmt(x["gpu_busy_share"] * 100 if x.get("gpu_busy_share") else None, ".0f")
            + ("%" if x.get("gpu_busy_share") else ""),
            _fmt(x["final_loss"], ".3f"),
            _fmt(x["data_share"] * 100 if x.get("data_share") is not None else None, ".1f")
            + ("%" if x.get("data_share") is not None else ""),
            _fmt(x.get("x_hf_bf16_b2"), ".2f"), _fmt(x.get("x_best_hf_same_memory"), ".2f"),
        ]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- worker (one path, one process)
def _mem(name: str) -> float:
    import torch

    return getattr(torch.cuda, name)() / GiB if DEVICE == "cuda" else 0.0


def measure_matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    """bf16 dense matmul rate of this GPU, measured now (the MFU denominator)."""
    import torch

    from .profiling import sync_gpu

    if DEVICE != "cuda":
        n, iters = 512, 3
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    sync_gpu()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync_gpu()
    rate = 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12
    del a, b
    _empty_cache()
    return rate


def _empty_cache():
    import torch

    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _load_path(path: str, model_dir: str, lora, seed: int, gradient_checkpointing: str = "unsloth"):
    """(model, processor, backend, info) with LoRA attached, ready to train."""
    import torch

    from .config import ModelArgs

    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    if path.startswith("unsloth"):
        from .backends.unsloth import UnslothBackend

        backend = UnslothBackend()
        margs = ModelArgs(load_in_4bit=path == "unsloth-4bit", use_gradient_checkpointing=gradient_checkpointing,
                          max_seq_length=8192)
        model, processor = backend.load(model_dir, margs)
        info["load_s"] = time.perf_counter() - t0
        model = backend.add_adapters(model, lora, margs, seed)
        backend.for_training(model)
        info["gradient_checkpointing"] = ("unsloth (offloaded to CPU)" if gradient_checkpointing == "unsloth"
                                          else f"unsloth ({gradient_checkpointing}, on GPU)")
    else:
        from peft import LoraConfig, get_peft_model

        from .backends.hf import HFBackend, lora_target_regex
        from .models.families import family_of

        backend = HFBackend()
        model, processor = backend.load(model_dir, ModelArgs(load_in_4bit=path == "hf-qlora", max_seq_length=8192))
        info["load_s"] = time.perf_counter() - t0
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False
        config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=0.0, bias="none",
                            target_modules=lora_target_regex(model, family_of(model.config), lora),
                            task_type="CAUSAL_LM")
        torch.manual_seed(lora.lora_random_state)
        model = get_peft_model(model, config)
        model.train()
        info["gradient_checkpointing"] = "transformers (use_reentrant=False)"
    info["adapt_s"] = time.perf_counter() - t0 - info["load_s"]
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["lora_modules"] = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)
    info["linear4bit_modules"] = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    info["mem_after_load_gib"] = _mem("memory_allocated")
    return model, processor, backend, info


def _to_device(batch: dict, dtype) -> dict:
    import torch

    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(DEVICE, non_blocking=True)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def run_worker(args) -> dict:
    import torch

    path = args.worker
    if path.startswith("unsloth"):
        from .backends.unsloth import import_unsloth

        import_unsloth()
    from .config import LoraArgs
    from .recipes import get_recipe

    import_s = time.perf_counter() - _T_START
    result: dict[str, Any] = {"path": path, "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
                              "import_s": round(import_s, 1), "versions": _versions()}
    if args.max_memory_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_memory_gib * GiB / total))
        result["max_memory_gib"] = args.max_memory_gib
    if DEVICE == "cuda" and args.sdpa != "default":
        torch.backends.cuda.enable_cudnn_sdp(args.sdpa == "cudnn")
        torch.backends.cuda.enable_flash_sdp(args.sdpa == "flash")
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    result["matmul_tflops"] = round(measure_matmul_tflops(), 1)
    lora = LoraArgs(lora_r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.0,
                    finetune_vision_layers=_truthy(args.finetune_vision_layers), finetune_language_layers=True,
                    finetune_attention_modules=True, finetune_mlp_modules=True)
    _empty_cache()
    model, processor, backend, info = _load_path(path, args.model_dir, lora, args.seed,
                                                 args.gradient_checkpointing or "unsloth")
    result.update({k: (round(v, 2) if isinstance(v, float) else v) for k, v in info.items()})
    result["load_peak_gib"] = round(_mem("max_memory_allocated"), 2)
    recipe = get_recipe(args.recipe)
    collator = backend.collator(model, processor, recipe, image_size=args.image_size, max_seq_length=8192)
    rows = json.loads(Path(args.rows).read_text())
    from .models.speedups import checkpoint_fewer_layers, checkpointed_layers

    if args.unchecked_layers:
        result["unchecked_layers"] = checkpoint_fewer_layers(model, args.unchecked_layers)
    result["checkpointed_layers"] = checkpointed_layers(model)
    if args.speedups:
        from .models.speedups import apply_training_speedups

        result["speedups"] = apply_training_speedups(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if DEVICE == "cuda":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=args.learning_rate, weight_decay=0.001)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.001)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    from .profiling import sync_gpu

    def step(batch) -> float:
        out = model(**_to_device(batch, dtype))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    def run_batch_size(bs: int) -> dict:
        chunks, warm, timed_ids, extra = plan_batches(rows, bs, args.warmup, args.steps,
                                                      not args.no_flops or args.profile,
                                                      same_shape=args.speedups, seed=args.seed)
        batches, collate_s = [], []
        for chunk in chunks:
            t0 = time.perf_counter()
            batches.append(collator(chunk))
            collate_s.append(time.perf_counter() - t0)
        tokens = [int(batches[k]["attention_mask"].sum()) for k in timed_ids]
        shapes = [_batch_shape(chunk) for chunk in chunks]
        _empty_cache()
        times, losses = [], []
        for n, k in enumerate(warm + timed_ids):
            sync_gpu()
            t0 = time.perf_counter()
            loss = step(batches[k])
            sync_gpu()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss))
            print(f"  {path} bs={bs} step {n + 1}{' (warm-up)' if n < len(warm) else ''} {shapes[k]}: "
                  f"{times[-1]:.3f} s loss {losses[-1]:.4f}", flush=True)
        timed = times[len(warm):]
        median = statistics.median(timed)
        entry = {
            "batch_size": bs, "warmup_step_s": [round(t, 3) for t in times[:len(warm)]],
            "warmup_shapes": [shapes[k] for k in warm], "step_shapes": [shapes[k] for k in timed_ids],
            "warmup_s": round(sum(times[:len(warm)]), 2), "step_s": [round(t, 3) for t in timed],
            "median_step_s": round(median, 4), "max_over_median": round(max(timed) / median, 3),
            "samples_per_s": round(bs / median, 3),
            "samples_per_s_all_steps": _all_steps_rate(bs, timed),
            "tokens_per_step": int(statistics.median(tokens)),
            "tokens_per_s": round(statistics.median(tokens) / median, 1),
            "tokens_per_sample": round(sum(tokens) / len(tokens) / bs, 1),
            "peak_alloc_gib": round(_mem("max_memory_allocated"), 2),
            "peak_reserved_gib": round(_mem("max_memory_reserved"), 2),
            "losses": [round(x, 4) for x in losses], "final_loss": round(losses[-1], 4),
            "loss_finite": all(x == x and abs(x) != float("inf") for x in losses),
            "collate_s_median": round(statistics.median(collate_s), 4),
            "data_share": round(statistics.median(collate_s) / (statistics.median(collate_s) + median), 4),
        }
        if args.profile:
            from .profiling import profile_call

            entry["profile"] = profile_call(lambda: step(batches[extra]))
        if not args.no_flops:
            try:
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as counter:
                    step(batches[extra])
                    sync_gpu()
                entry["flops_per_step"] = float(counter.get_total_flops())
                entry["flops_source"] = "FlopCounterMode, one step (forward + backward, recompute included)"
                _add_mfu(entry, result["matmul_tflops"])
            except Exception as exc:  # compiled kernels can refuse dispatch modes: the parent fills it in
                entry["flops_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return entry

    result["batches"] = []
    if args.max_memory_gib:
        from accelerate.utils import find_executable_batch_size

        tried: list[int] = []

        def shrink():
            shrink.size = max(1, int(shrink.size * 0.75)) if shrink.size > 1 else 0
            return shrink.size

        shrink.size = args.start_batch

        @find_executable_batch_size(starting_batch_size=args.start_batch, reduce_batch_size_fn=shrink)
        def fit(batch_size):
            tried.append(batch_size)
            optimizer.zero_grad(set_to_none=True)
            return run_batch_size(batch_size)

        entry = fit()
        entry["batch_sizes_tried"] = tried
        result["batches"].append(entry)
    else:
        for bs in [int(b) for b in args.batch_sizes.split(",") if b.strip()]:
            try:
                result["batches"].append(run_batch_size(bs))
            except torch.cuda.OutOfMemoryError as exc:
                optimizer.zero_grad(set_to_none=True)
                _empty_cache()
                result["batches"].append({"batch_size": bs, "error": f"out of memory: {str(exc)[:200]}"})
    result["total_s"] = round(time.perf_counter() - _T_START, 1)
    return result


def plan_batches(rows: list[dict], bs: int, warmup: int, steps: int, extra: bool, *, same_shape: bool,
                 seed: int) -> tuple[list[list[dict]], list[int], list[int], int]:
    """The bench's batches: (chunks of rows, warm-up indices, timed indices, index of the profiling/FLOP batch).

    Without --speedups, consecutive rows of the shuffled data (mixed shapes, as plain training sees them).
    With it, the order training uses with image buckets (data.batching: one image shape per batch, shapes in
    their real proportion), and, as train.warm_up_shapes does, every kind of batch among the timed ones (its
    image shapes and their counts: a shape's full batch, a mixed remainder) runs once during warm-up, so the
    timed steps are steady-state steps.
    """
    n = warmup + steps + int(extra)
    if same_shape:
        from .data.batching import batch_kind, same_shape_order

        order = same_shape_order([r.get("shape", "") for r in rows], bs, seed)
        chunks = [[rows[order[(k * bs + i) % len(order)]] for i in range(bs)] for k in range(n)]
    else:
        chunks = [[rows[(k * bs + i) % len(rows)] for i in range(bs)] for k in range(n)]
    warm, timed = list(range(warmup)), list(range(warmup, warmup + steps))
    if same_shape:
        def kind(chunk):
            return batch_kind([r.get("shape", "") for r in chunk])

        seen = {kind(chunks[k]) for k in warm}
        for k in timed:
            if kind(chunks[k]) not in seen:
                seen.add(kind(chunks[k]))
                chunks.append(list(chunks[k]))
                warm.append(len(chunks) - 1)
    return chunks, warm, timed, (warmup + steps if extra else timed[-1])


def _all_steps_rate(bs: int, step_s: list[float]) -> float | None:
    """Samples over the summed time of every timed step: the rate an epoch runs at. With same-shape batches
    the steps differ by shape (a 504x168 batch costs half a 504x504 one), and the median step of a few
    then depends on which shapes were drawn; this does not."""
    return round(bs * len(step_s) / sum(step_s), 3) if step_s else None


def _batch_shape(chunk: list[dict]) -> str:
    shapes = {r.get("shape", "?") for r in chunk}
    return shapes.pop() if len(shapes) == 1 else "mixed"


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "unsloth", "unsloth_zoo", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=PATHS)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--rows", required=True)
    p.add_argument("--result", required=True)
    for name, kind in (("--batch_sizes", str), ("--steps", int), ("--warmup", int), ("--lora_r", int),
                       ("--finetune_vision_layers", str), ("--learning_rate", float), ("--image_size", int),
                       ("--recipe", str), ("--seed", int), ("--max_memory_gib", float), ("--start_batch", int),
                       ("--gradient_checkpointing", str), ("--unchecked_layers", int), ("--sdpa", str)):
        p.add_argument(name, type=kind, default=None)
    p.add_argument("--no_flops", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--speedups", action="store_true")
    args = p.parse_args(argv)
    result = run_worker(args)
    Path(args.result).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(_worker_main(sys.argv[1:]))
    from .cli.bench import main

    main()
