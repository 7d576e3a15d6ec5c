"""`unsloth-med export RUN_DIR --format adapter|merged-16bit|gguf`: a finished run's adapter, merged weights or GGUF."""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path


def export_command(argv: list[str]) -> int:
    """`unsloth-med export RUN_DIR --format adapter|merged-16bit [--out DIR] [--push-to-hub OWNER/NAME] [--public]`."""
    from ..export import FORMATS, export_run

    parser = argparse.ArgumentParser(
        prog="unsloth-med export",
        description="Export a finished run: its LoRA adapter, or merged 16-bit weights that load with plain "
                    "transformers (verified by reloading them). Optionally push the result to the Hugging Face Hub.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `unsloth-med train`")
    parser.add_argument("--format", choices=FORMATS, default="merged-16bit",
                        help="merged-16bit (default): base + adapter merged; adapter: the LoRA adapter + processor; "
                             "gguf: text + mmproj GGUF for llama.cpp / Ollama (from merged/), verified in llama.cpp")
    parser.add_argument("--quant", choices=("f16", "q8_0", "q4_k_m"), default="f16",
                        help="with --format gguf: the text weights' type (the mmproj stays f16)")
    parser.add_argument("--out", metavar="DIR", help="destination (default RUN_DIR/merged or RUN_DIR/adapter-export)")
    parser.add_argument("--backend", choices=("auto", "unsloth", "hf"), default=None,
                        help="backend that reloads the run for a merged export (default: the run's)")
    parser.add_argument("--push-to-hub", metavar="OWNER/NAME", help="upload the export to this Hub repo (private)")
    parser.add_argument("--public", action="store_true", help="with --push-to-hub: make a new repo public")
    args = parser.parse_args(argv)
    if args.public and not args.push_to_hub:
        parser.error("--public only makes sense with --push-to-hub OWNER/NAME")
    if args.push_to_hub:  # a bad repo id stops here, not after a merge and its check
        from ..hub import check_repo_id

        check_repo_id(args.push_to_hub)
    with _run_folder_locked(args.run_dir):
        result = export_run(args.run_dir, format=args.format, out=args.out, backend=args.backend, quant=args.quant)
        if args.push_to_hub:
            from ..hub import push, write_model_card

            write_model_card(result["path"], run_dir=args.run_dir, repo_id=args.push_to_hub)
            url = push(result["path"], args.push_to_hub, private=not args.public)
            print(f"Pushed to {url}")
    return 0


@contextlib.contextmanager
def _run_folder_locked(run_dir: str):
    """The run's lock for the export: a run training in the folder (a --resume) replaces the adapter and sets aside
    the exports made from the one before, so an export made meanwhile would be of a model about to be replaced, or
    of an adapter half-written. A folder this user cannot write has no run of theirs writing it: read as it is."""
    from ..run_lock import RunLock

    folder = Path(run_dir)
    if not folder.is_dir() or not os.access(folder, os.W_OK):  # export_run says what is wrong with a missing one
        yield
        return
    lock = RunLock(folder, role="export", when_busy="Export it once that run has finished: it replaces the run's "
                   "adapter, and the exports made from the one before are set aside.").acquire()
    try:
        yield
    finally:
        lock.release()
