"""`unsloth-med push DIR OWNER/NAME [--public]`: upload an exported folder to the Hugging Face Hub."""
from __future__ import annotations

import argparse


def push_command(argv: list[str]) -> int:
    """`unsloth-med push DIR OWNER/NAME [--public]`."""
    from ..hub import push

    parser = argparse.ArgumentParser(prog="unsloth-med push",
                                     description="Upload an exported folder (merged weights or adapter) to the Hugging "
                                                 "Face Hub. Token: HF_TOKEN or `hf auth login`.")
    parser.add_argument("folder", metavar="DIR", help="an exported folder (unsloth-med export ...)")
    parser.add_argument("repo_id", metavar="OWNER/NAME", help="the Hub repo; created if missing")
    parser.add_argument("--public", action="store_true",
                        help="make a new repo public (default: private; without it an existing public repo is "
                             "refused). The Hub's copy leaves out the test images' file names and this machine's "
                             "paths (kept in the local export.json / unsloth_med.json)")
    args = parser.parse_args(argv)
    from ..run_lock import refuse_while_training

    refuse_while_training(args.folder, "Push it")
    url = push(args.folder, args.repo_id, private=not args.public)
    print(f"Pushed {args.folder} to {url}")
    return 0
