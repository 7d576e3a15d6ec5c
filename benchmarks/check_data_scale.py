"""check-data at scale: wall time and peak RSS at 1k, 10k and 100k training images (+10% test images).

    PYTHONPATH=. python benchmarks/check_data_scale.py --sizes 1000 10000 100000

Generates 100,000 training and 10,000 test PNGs (64x64, with planted leaks; data/scale.py) once into the
cache (never into the repository), links the first N of them into one folder per size, and runs
`unsloth-med check-data --recipe classify` on each in a fresh process, timing it and reading its peak RSS
(wait4). A size is skipped when the two sizes before it predict, at linear growth, more than --max_seconds.
Writes benchmarks/results/<date>_check-data-scale.json and prints the table for benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from unsloth_med.data.scale import write_scale_set  # noqa: E402
from unsloth_med.data.sources import cache_dir  # noqa: E402


def link_subset(full: Path, dest: Path, n_train: int, n_test: int) -> Path:
    """dest holding hard links to the first n_train / n_test images of `full` (no copies)."""
    if (dest / ".complete").exists():
        return dest
    for split, count, prefix in (("Train", n_train, "tr"), ("Test", n_test, "te")):
        for i in range(count):
            name = f"class{i % 10}/{split}/{prefix}{i:06d}.png"
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(full / name, target)
    (dest / ".complete").write_text("{}")
    return dest


def run_check_data(data_dir: Path, out_json: Path, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "unsloth_med.cli", "check-data", "--recipe", "classify", "--data_dir", str(data_dir),
           "--json", str(out_json)]
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    result = {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
              "exit_status": os.waitstatus_to_exitcode(status),
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    if result["exit_status"] == 0:
        summary = json.loads(out_json.read_text())
        result.update(leaked=summary["leaked_count"], sizes=summary["sizes"])
    else:
        result["error"] = proc.stderr.read()[-1000:]
    return result


def estimate(rows: list[dict], size: int) -> float:
    """Wall seconds predicted for `size` from the measured sizes: linear in the images beyond the fixed start-up."""
    done = [r for r in rows if "seconds" in r]
    if len(done) < 2:
        return 0.0
    (a, b) = done[-2:]
    per_image = (b["seconds"] - a["seconds"]) / (b["train"] - a["train"])
    return b["seconds"] + per_image * (size - b["train"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--root", type=Path, default=None, help="where the generated images go (default: the cache)")
    parser.add_argument("--max_seconds", type=float, default=600)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    root = args.root or cache_dir() / "scale-bench"
    largest = max(args.sizes)
    t0 = time.perf_counter()
    manifest = write_scale_set(root / "full", largest, largest // 10)
    generated_seconds = round(time.perf_counter() - t0, 1)
    rows = []
    for size in sorted(args.sizes):
        if estimate(rows, size) > args.max_seconds:
            print(f"{size}: skipped (linear estimate {estimate(rows, size):.0f} s > {args.max_seconds:.0f} s)")
            rows.append({"train": size, "test": size // 10, "skipped": "linear estimate over the time limit"})
            continue
        folder = root / "full" if size == largest else link_subset(root / "full", root / f"n{size}", size, size // 10)
        expected = sum(1 for t in manifest["leaks"] if int(Path(t).stem[2:]) < size // 10
                       and int(Path(manifest["leaks"][t]).stem[2:]) < size)
        result = run_check_data(folder, root / f"summary-{size}.json", args.max_seconds)
        rows.append({"train": size, "test": size // 10, "planted_leaks": expected, **result})
        print(json.dumps(rows[-1]), flush=True)
    record = {"command": "PYTHONPATH=. python benchmarks/check_data_scale.py --sizes " + " ".join(map(str, args.sizes)),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
              "machine": platform.platform(), "generated_seconds": generated_seconds, "image": "64x64 grayscale PNG",
              "limits": {"seconds": args.max_seconds, "peak_rss_gib": 3}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y%m%d', time.gmtime())}_check-data-scale.json"
    path.write_text(json.dumps(record, indent=1))
    print("\n| train + test images | check-data wall s | CPU s | peak RSS GiB | leaks found / planted | load avg |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['train']:,} + {r['test']:,} | skipped | | | | |")
        else:
            print(f"| {r['train']:,} + {r['test']:,} | {r['seconds']} | {r['cpu_seconds']} | {r['peak_rss_gib']} | "
                  f"{r.get('leaked')} / {r['planted_leaks']} | {r['load_average_before'][0]} |")
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
