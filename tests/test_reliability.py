"""Reliability at scale and under real faults: shared images, run-folder locks, leakage search at scale,
large listings, full disks. GPU faults (real out-of-memory, kill -9 with unsloth) are in test_gpu_faults.py."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _xray(path: Path, seed: int, size: int = 48) -> Path:
    """A small image with structure (a bright blob on a dark field), different per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size * rng.uniform(0.08, 0.3)) ** 2))
    pixels = (rng.uniform(0.05, 0.4) + rng.uniform(0.3, 0.6) * blob) * 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L").save(path)
    return path


# ----------------------------------------------------------------------------- #14.8: shared images
def test_one_image_in_50_rows_is_prepared_once_with_8_threads(tmp_path):
    from unsloth_med.data.images import ImageFit
    from unsloth_med.data.prepare import _prepare_one, prepare_images

    image = _xray(tmp_path / "one.png", 0)
    fit = ImageFit(32, factor=16)
    rows = [{"image": str(image), "target": f"answer {i}", "id": str(i)} for i in range(50)]
    prepared, stats = prepare_images(rows, fit, tmp_path / "cache", workers=8)
    assert len(prepared) == 50 and len(set(prepared["image"])) == 1
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert [p.suffix for p in cached] == [".png"]  # one image, no temporary file left behind

    # The writers themselves: 8 threads writing the same cached image at once (the old pid-only temporary
    # name made them rename each other's file away: FileNotFoundError).
    fresh = tmp_path / "cache2"
    barrier, errors = threading.Barrier(8, timeout=60), []

    def write():
        try:
            for round_ in range(20):  # a fresh cache each round: all 8 threads write the same new file
                barrier.wait()
                _prepare_one(str(image), fit, fresh / str(round_))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not list(fresh.rglob("*.tmp"))


# ----------------------------------------------------------------------------- #18.6: one run per folder
HOLD_LOCK = ("import sys, time; from unsloth_med.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
             "print('locked', flush=True); time.sleep(600)")


def _env():
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONUNBUFFERED": "1"}


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], env=_env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _train(run_dir: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "unsloth_med.recipes.bone_fracture", "--data_dir", str(data_dir), "--output_dir",
           str(run_dir), "--model", "tiny:mistral3", *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_refuses_at_once_and_a_stale_lock_is_taken_over(tmp_path):
    run_dir, empty = tmp_path / "run", tmp_path / "no-data"
    empty.mkdir()
    owner = _holder(run_dir)
    try:
        refused = _train(run_dir, empty)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"in use by another run: pid {owner.pid} on host {socket.gethostname()}" in refused.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [".unsloth_med.lock"]  # nothing written: refused first
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()

    # The owner died without cleaning up (kill -9): its lock file is still there, naming it; the next run takes
    # it over with a message, goes on (here to the data error), and leaves no lock behind.
    assert str(owner.pid) in (run_dir / ".unsloth_med.lock").read_text()
    rerun = _train(run_dir, empty)
    assert f"taking over a stale lock left by pid {owner.pid} on host {socket.gethostname()}" in rerun.stdout
    assert rerun.returncode != 0 and "No class folders found" in rerun.stderr
    assert not (run_dir / ".unsloth_med.lock").exists()

    # #16.4: that failed run stopped before training, so a plain rerun is not blocked by what it left.
    again = _train(run_dir, empty)
    assert "already holds a run" not in again.stderr and "No class folders found" in again.stderr
    assert "taking over" not in again.stdout


def test_two_processes_racing_for_one_folder_get_exactly_one_lock(tmp_path):
    racer = ("import sys, time; from unsloth_med.run_lock import RunLock, RunFolderBusy\n"
             "time.sleep(max(0, float(sys.argv[2]) - time.time()))\n"
             "try:\n    RunLock(sys.argv[1]).acquire(); print('won', flush=True); time.sleep(5)\n"
             "except RunFolderBusy:\n    print('busy', flush=True)\n")
    start = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", racer, str(tmp_path / "run"), start], env=_env(),
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    results = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert results == ["busy"] * 5 + ["won"]
