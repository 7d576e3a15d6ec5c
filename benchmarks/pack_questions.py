"""Issue 14: is packing the questions of one image into one conversation (--pack_questions) faster, and by how much?

One epoch of the same question/answer pairs (3 per real bone-break X-ray), trained both ways through the real CLI,
side by side in one run; prints a table and writes JSON. Train time is Trainer.train's steps (train_stats.json).

    python benchmarks/pack_questions.py --data_dir ../shared/data/bone-break --images 32 --image_size 128 \
        --model tiny:mistral3 --out benchmarks/results/<tag>_pack-questions.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_listing(bone_break: Path, images: int, path: Path) -> int:
    rows = [r for r in csv.DictReader((bone_break / "labels.csv").open()) if r["split"] == "train"][:images]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "question", "answer", "split"])
        for r in rows:
            image = bone_break / r["path"]
            for question, answer in (("Is there a fracture?", "yes"), ("What kind of fracture is this?", r["label"]),
                                     (f"Is this a {r['label']}?", "yes")):
                writer.writerow([image, question, answer, "train"])
        writer.writerow([bone_break / rows[0]["path"], "Is there a fracture?", "yes", "test"])
    return 3 * len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--model", default="tiny:mistral3")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pack-questions-"))
    listing = work / "qa.csv"
    pairs = write_listing(Path(args.data_dir), args.images, listing)
    results = {}
    for packed in (False, True):
        run = work / ("packed" if packed else "rows")
        command = [sys.executable, "-m", "unsloth_med.recipes.vqa", "--data_dir", str(listing), "--model", args.model,
                   "--num_train_epochs", "1", "--per_device_train_batch_size", str(args.batch),
                   "--gradient_accumulation_steps", "1", "--image_size", str(args.image_size), "--eval_before",
                   "false", "--eval_after", "false", "--save_strategy", "no", "--logging_steps", "1",
                   "--pack_questions", str(packed).lower(), "--output_dir", str(run)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode:
            sys.exit(f"{'packed' if packed else 'rows'} run failed:\n{done.stderr[-3000:]}")
        stats = json.loads((run / "train_stats.json").read_text())
        steps = sum(1 for line in (run / "train_log.jsonl").read_text().splitlines() if '"loss"' in line)
        train_s = stats["train_seconds"]
        results["packed" if packed else "one row per question"] = {
            "steps": steps, "samples": steps * args.batch, "question_answer_pairs": pairs, "train_seconds": train_s,
            "pairs_per_second": round(pairs / train_s, 2), "command_seconds": round(time.perf_counter() - started, 1)}
    rows, packed = results["one row per question"], results["packed"]
    ratio = round(packed["pairs_per_second"] / rows["pairs_per_second"], 2)
    print("| training | steps | train s | QA pairs/s |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['steps']} | {r['train_seconds']} | {r['pairs_per_second']} |")
    print(f"packed / one row per question: {ratio}x in QA pairs per second")
    record = {"results": results, "packed_over_rows": ratio, "images": args.images, "image_size": args.image_size,
              "model": args.model, "batch": args.batch, "machine": f"{os.cpu_count()} CPU cores",
              "load_average": os.getloadavg()}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
