"""`unsloth-med bench`: the training paths side by side (the work is in unsloth_med/bench.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import bench
from ..errors import ConfigError
from .base import basic_logging, friendly


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unsloth-med bench", description=bench.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ministral3-14b",
                   help="A shape name (ministral3-14b, ministral3-3b, llama32-11b-vision) "
                        "or a local checkpoint folder.")
    p.add_argument("--models_dir", default=None, help="Where shapes are built (default: <cache>/shapes).")
    p.add_argument("--recipe", default="bone_fracture")
    p.add_argument("--data_dir", default=None, help="Local copy of the recipe's dataset (needed offline).")
    p.add_argument("--image_size", type=int, default=None, help="Default: the recipe's.")
    p.add_argument("--paths", default=",".join(bench.PATHS),
                   help=f"Comma-separated subset of {', '.join(bench.PATHS)}.")
    p.add_argument("--batch_sizes", default="2,16")
    p.add_argument("--steps", type=int, default=5, help="Timed steps per batch size (after warm-up).")
    p.add_argument("--warmup", type=int, default=2, help="Warm-up steps per batch size (compilation; excluded).")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--finetune_vision_layers", default="false",
                   help="LoRA on the vision tower too (default: language only).")
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--max_memory_gib", type=float, default=None,
                   help="Cap GPU memory per process and find the largest batch that fits (accelerate).")
    p.add_argument("--start_batch", type=int, default=64, help="First batch tried under --max_memory_gib.")
    p.add_argument("--no_flops", action="store_true", help="Skip the FlopCounterMode step.")
    p.add_argument("--image_buckets", default="true",
                   help="Pad images into the fixed bucket boxes (as training runs do by default); false: own sizes.")
    p.add_argument("--gradient_checkpointing", default="unsloth",
                   help="unsloth paths: 'unsloth' (activations offloaded to CPU) or 'true' (kept on the GPU).")
    p.add_argument("--unchecked_layers", type=int, default=0,
                   help="Keep the activations of this many language layers instead of recomputing them (partial "
                        "gradient checkpointing; models/speedups.py).")
    p.add_argument("--sdpa", default="default", choices=("default", "flash", "cudnn"),
                   help="Attention kernel for SDPA: PyTorch's choice, or only FlashAttention / only cuDNN.")
    p.add_argument("--speedups", action="store_true",
                   help="The package's own training speedups on top of the path: batches of same-size images "
                        "(as length grouping makes them), the vision tower run as a batch, no backward through a "
                        "frozen vision tower (models/speedups.py). Off: the path as the ecosystem runs it.")
    p.add_argument("--profile", action="store_true",
                   help="Profile one more step per batch size: GPU-busy share of the step and the top kernels.")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default=None, help="Prefix of the result files (default: date + GPU).")
    p.add_argument("--timeout", type=int, default=1800, help="Seconds per path before it is stopped.")
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="Only rebuild the summary and table from per-path result files (runs split over sessions).")
    return p


def check_numbers(args) -> None:
    """Numbers the workers would only trip over after the model is built and loaded (an int() traceback, a
    median of no steps): one error line before any work."""
    sizes = [b.strip() for b in args.batch_sizes.split(",") if b.strip()]
    if not sizes or not all(b.isdigit() and int(b) > 0 for b in sizes):
        raise ConfigError(f"--batch_sizes {args.batch_sizes}: whole numbers above 0, separated by commas (2,16).")
    for name, least in (("steps", 1), ("warmup", 0), ("start_batch", 1), ("lora_r", 1), ("timeout", 1)):
        if getattr(args, name) < least:
            raise ConfigError(f"--{name} {getattr(args, name)}: at least {least}.")
    if args.max_memory_gib is not None and args.max_memory_gib <= 0:
        raise ConfigError(f"--max_memory_gib {args.max_memory_gib:g}: a size in GiB above 0; leave it unset for "
                          "--batch_sizes.")


def bench_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_numbers(args)
    missing = [name for name in args.merge or () if not Path(name).is_file()]
    if missing:
        raise ConfigError(f"--merge: no such result file: {', '.join(missing)}")
    return bench.run_bench(args, argv)


def main() -> None:
    """`python -m unsloth_med.bench` (the bench's own module entry) without --worker."""
    basic_logging()
    sys.exit(friendly(lambda: bench_command(sys.argv[1:])))
