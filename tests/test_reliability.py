"""Reliability at scale and under real faults: shared images, run-folder locks, leakage search at scale,
large listings, full disks. GPU faults (real out-of-memory, kill -9 with unsloth) are in test_gpu_faults.py."""
from __future__ import annotations

import gc
import json
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


def _in_process(capsys, argv: list[str]) -> subprocess.CompletedProcess:
    """`unsloth-med ARGV` in this process: the CLI's own entry and error handling (exit code, the one `error:`
    line), without the ~30 s of imports that a fresh interpreter pays on 2 busy cores."""
    from unsloth_med.cli import main

    capsys.readouterr()
    frozen = gc.get_freeze_count()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    # Called with an argv the CLI does not own the process: it freezes none of its caller's objects (collector.py)
    assert gc.get_freeze_count() <= frozen, "the CLI froze its caller's objects"
    return subprocess.CompletedProcess(argv, exited.value.code, out, err)


def _train(capsys, run_dir: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return _in_process(capsys, ["train", "--recipe", "bone_fracture", "--data_dir", str(data_dir), "--output_dir",
                                str(run_dir), "--model", "tiny:mistral3", *extra])


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_refuses_at_once_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    run_dir, empty = tmp_path / "run", tmp_path / "no-data"
    empty.mkdir()
    owner = _holder(run_dir)  # another process holds the folder; the runs below are this process's
    try:
        refused = _train(capsys, run_dir, empty)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"in use by another run: pid {owner.pid} on host {socket.gethostname()}" in refused.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [".unsloth_med.lock"]  # nothing written: refused first
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()

    # The owner died without cleaning up (kill -9): its lock file is still there, naming it; the next run takes
    # it over with a message, goes on (here to the data error), and leaves no lock behind.
    assert str(owner.pid) in (run_dir / ".unsloth_med.lock").read_text()
    rerun = _train(capsys, run_dir, empty)
    assert f"taking over a stale lock left by pid {owner.pid} on host {socket.gethostname()}" in rerun.stdout
    assert rerun.returncode != 0 and "No class folders found" in rerun.stderr
    assert not (run_dir / ".unsloth_med.lock").exists()

    # #16.4: that failed run stopped before training, so a plain rerun is not blocked by what it left.
    again = _train(capsys, run_dir, empty)
    assert "already holds a run" not in again.stderr and "No class folders found" in again.stderr
    assert "taking over" not in again.stdout


def test_evaluate_predict_and_push_wait_for_a_run_training_in_the_folder(tmp_path, capsys):
    """A --resume training in a run folder replaces its adapter and sets its exports aside when it ends: evaluate,
    predict and push of that folder, or of its adapter/ or merged/, meanwhile read what is about to change (or a
    half-written file). They now refuse in one line, naming the run; a checkpoint-N folder stays readable, probing
    keeps no later run out, and a process's own run (its export, its evaluation after training) is not refused."""
    from unsloth_med.run_lock import RunLock, training_owner

    run_dir = tmp_path / "run"
    for folder in ("adapter", "merged", "checkpoint-3"):
        (run_dir / folder).mkdir(parents=True)
    (run_dir / "config.yaml").write_text("run: {recipe: bone_fracture}\nmodel: {model: tiny:mistral3}\n")
    owner = _holder(run_dir)
    try:
        for argv in (["evaluate", "--model", str(run_dir)],
                     ["predict", "--model", str(run_dir / "adapter"), str(tmp_path)],
                     ["push", str(run_dir / "merged"), "me/model"]):
            refused = _in_process(capsys, argv)
            assert refused.returncode == 2, (argv, refused.stderr[-2000:])
            assert f"belongs to a run folder in use by another process now (pid {owner.pid} on host" in refused.stderr
            assert "a run training there replaces its adapter" in refused.stderr
            assert "once that has finished, or use one of its checkpoint-N folders now" in refused.stderr
        assert training_owner(run_dir / "checkpoint-3") is None
        # A run folder inside the locked one (a run trained straight into runs/, another in runs/other) has its own.
        (run_dir / "other").mkdir()
        (run_dir / "other" / "config.yaml").write_text("run: {recipe: bone_fracture}\n")
        assert training_owner(run_dir / "other") is None
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()

    # An export holds the folder too, but only reads the run and its adapter: those stay readable; its outputs wait.
    exporter = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.replace("RunLock(sys.argv[1])", "RunLock(sys.argv[1], "
                                 "role='export')"), str(run_dir)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert "taking over a stale lock" in exporter.stdout.readline()  # the killed holder's, above
        assert exporter.stdout.readline().strip() == "locked"
        assert training_owner(run_dir) is None and training_owner(run_dir / "adapter") is None
        refused = _in_process(capsys, ["push", str(run_dir / "merged"), "me/model"])
        assert refused.returncode == 2 and "an export writing there replaces its exports" in refused.stderr, \
            refused.stderr[-2000:]
    finally:
        exporter.send_signal(signal.SIGKILL)
        exporter.wait()
    assert training_owner(run_dir) is None  # its owner is gone: nothing to wait for
    lock = RunLock(run_dir).acquire()  # the probes kept no later run out; this process's own run is not refused
    try:
        assert training_owner(run_dir) is None and training_owner(run_dir / "merged") is None
    finally:
        lock.release()


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


# ----------------------------------------------------------------------------- #18.1: leakage search at scale
def _brute_force(train: np.ndarray, test: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """The O(train x test) search of main before this change (every thumbnail in memory, 16x16 block means as a
    lower bound, then exact MAD): the reference the indexed, streamed search must equal."""
    train, test = train.astype(np.float32) / 255, test.astype(np.float32) / 255

    def coarse(t):
        return t.reshape(-1, 16, 4, 16, 4).mean(axis=(2, 4)).reshape(len(t), -1)

    train_c, pairs = coarse(train), []
    for start in range(0, len(test), 64):
        lower = np.abs(coarse(test[start:start + 64])[:, None, :] - train_c[None]).mean(axis=2)
        for row in range(len(lower)):
            candidates = np.flatnonzero(lower[row] < threshold + 1e-7)
            if len(candidates):
                mads = np.abs(train[candidates] - test[start + row]).mean(axis=1)
                best = int(np.argmin(mads))
                if mads[best] < threshold:
                    pairs.append((start + row, int(candidates[best]), float(mads[best])))
    return pairs


@pytest.fixture(scope="module")
def scale_5k(isolated_cache):
    from unsloth_med.data.scale import write_scale_set

    root = isolated_cache / "scale-4500-500"
    manifest = write_scale_set(root, 4500, 500, leak_every=50)
    return root, manifest


def _files(root: Path, split: str) -> list[str]:
    return sorted(str(p) for p in root.glob(f"*/{split}/*.png"))


def test_indexed_search_finds_exactly_the_brute_force_pairs_on_5000_images(scale_5k):
    from unsloth_med.data.checks import DEFAULT_THRESHOLD, find_leaked_test_images, thumbnails

    root, manifest = scale_5k
    train, test = _files(root, "Train"), _files(root, "Test")
    assert (len(train), len(test)) == (4500, 500)
    leaks = find_leaked_test_images(train, test)
    expected = _brute_force(thumbnails(train)[0], thumbnails(test)[0], DEFAULT_THRESHOLD)
    assert [(e["test"], e["train"]) for e in leaks] == [(test[i], train[j]) for i, j, _ in expected]
    assert [e["mad"] for e in leaks] == pytest.approx([mad for _, _, mad in expected], abs=1e-6)
    assert {e["test"]: e["train"] for e in leaks} == manifest["leaks"] and len(leaks) == 10  # the planted copies
    # The noisy copies (2.7 grey levels off) pass the index and are rejected by the exact pixel rule.
    assert all(e["mad"] < DEFAULT_THRESHOLD for e in leaks)


def test_indexed_search_equals_brute_force_on_the_real_x_rays_and_finds_their_15_leaks(bone_break_dir):
    from unsloth_med.data.checks import DEFAULT_THRESHOLD, find_leaked_test_images, thumbnails

    root = bone_break_dir / "Bone Break Classification" / "Bone Break Classification"
    train, test = sorted(map(str, root.glob("*/Train/*.jpg"))), sorted(map(str, root.glob("*/Test/*.jpg")))
    leaks = find_leaked_test_images(train, test)
    expected = _brute_force(thumbnails(train)[0], thumbnails(test)[0], DEFAULT_THRESHOLD)
    assert [(e["test"], e["train"]) for e in leaks] == [(test[i], train[j]) for i, j, _ in expected]
    assert len(leaks) == 15


def test_leak_search_cost_grows_near_linearly_and_memory_holds_the_test_set_only():
    import tracemalloc

    from unsloth_med.data.checks import DEFAULT_THRESHOLD, LeakSearch
    from unsloth_med.data.scale import scale_images

    rng = np.random.default_rng(0)
    train = scale_images(rng, 20_000).reshape(20_000, -1)
    test = scale_images(rng, 2_000).reshape(2_000, -1)
    test[::100] = train[:2000:100]  # 20 exact copies

    def search(n_train: int, n_test: int) -> tuple[float, list]:
        start = time.process_time()  # CPU time: fair on a machine shared with other jobs
        index = LeakSearch(test[:n_test], np.ones(n_test, bool), DEFAULT_THRESHOLD)
        for offset in range(0, n_train, 2048):
            chunk = train[offset:min(offset + 2048, n_train)]
            index.add(offset, chunk, np.ones(len(chunk), bool))
        return time.process_time() - start, index.pairs()

    def fastest(n_train: int, n_test: int) -> tuple[float, list]:
        runs = [search(n_train, n_test) for _ in range(3)]
        return min(t for t, _ in runs), runs[0][1]

    small, small_pairs = fastest(2_000, 200)
    large, large_pairs = fastest(20_000, 2_000)
    print(f"\nleak search CPU time: 2,000 x 200: {small:.2f} s; 20,000 x 2,000: {large:.2f} s ({large / small:.1f}x)")
    assert len(small_pairs) == 2 and len(large_pairs) == 20
    assert large < 20 * small  # brute force would be 100x: 10x the images on each side

    # Memory: the index and the exact comparison hold the test set and one training chunk, not the training set.
    tracemalloc.start()
    search(20_000, 200)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 40 * 2**20, peak / 2**20  # the 20,000 training thumbnails alone are 78 MiB


# ----------------------------------------------------------------------------- #16.14: one readable progress line
@pytest.mark.slow
def test_training_prints_one_readable_line_per_log_and_no_raw_dicts(tiny_path, bone_break_dir, tmp_path, capsys):
    import json
    import re

    import datasets

    from unsloth_med.backends.hf import HFBackend
    from unsloth_med.config import LoraArgs, ModelArgs, parse_config
    from unsloth_med.recipes.bone_fracture import RECIPE
    from unsloth_med.train import build_trainer

    root = bone_break_dir / "Bone Break Classification" / "Bone Break Classification"
    images = sorted(root.glob("*/Train/*.jpg"))[::200]
    rows = [{"image": str(p), "target": p.parts[-3], "id": str(i)} for i, p in enumerate(images)]
    backend = HFBackend()
    model, processor = backend.load(str(tiny_path("mistral3")), ModelArgs())
    model = backend.add_adapters(model, LoraArgs(), ModelArgs(), seed=0)
    collator = backend.collator(model, processor, RECIPE, image_size=64, max_seq_length=4096)
    config = parse_config(["--output_dir", str(tmp_path), "--max_steps", "6", "--logging_steps", "2",
                           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                           "--save_strategy", "no"], RECIPE)
    trainer = build_trainer(model, processor, datasets.Dataset.from_list(rows), collator, config.training, tmp_path)
    capsys.readouterr()
    trainer.train()
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.strip()]
    pattern = r"step (\d)/6 \(\d+%\) \| loss \d+\.\d{4} \| lr \d\.\d\de-\d\d \| \d+\.\d samples/s \| ETA \d+m\d\ds"
    assert [re.fullmatch(pattern, line).group(1) for line in lines] == ["2", "4", "6"], out
    assert "{'loss'" not in out + err and "it/s]" not in out + err  # no raw dicts, no tqdm bar
    logged = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [2, 4, 6] and "train_runtime" in logged[-1]


# ----------------------------------------------------------------------------- #18.5: full disk
@pytest.fixture
def small_disk(tmp_path):
    """A real 48 MiB filesystem (tmpfs; mounting needs root, as in the project's containers)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int = 32 * 1024) -> Path:
    """Take all but `leave` bytes of the filesystem with a ballast file."""
    ballast = disk / "ballast"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with ballast.open("ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return ballast


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_disk_that_fills_during_a_checkpoint_and_during_export(small_disk, bone_break_dir, capsys):
    """Three trainings and an export on a small real filesystem; run in this process (the full-disk handling is
    the package's, not the interpreter's), which makes the test three times faster than four fresh processes."""
    run_dir = small_disk / "run"
    args = ["--max_train_samples", "8", "--max_eval_samples", "2", "--eval_before", "false", "--eval_after", "false",
            "--image_size", "64", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--save_steps", "2", "--save_total_limit", "5", "--logging_steps", "1", "--seed", "3"]
    first = _train(capsys, run_dir, bone_break_dir, *args, "--max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint, adapter = _hashes(run_dir / "checkpoint-2"), _hashes(run_dir / "adapter")

    # The disk fills (another process took the space); continuing to step 4 must write checkpoint-4 and cannot.
    ballast = _fill(small_disk)
    full = _train(capsys, run_dir, bone_break_dir, *args, "--max_steps", "4", "--resume")
    assert full.returncode == 2, full.stderr[-3000:]
    message = full.stderr.strip().splitlines()[-1]
    assert f"Disk full while writing a checkpoint into {run_dir}" in message and "it needs about" in message
    assert "checkpoint-2 is complete and intact" in message and "--resume" in message
    assert "Traceback" not in full.stderr
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]  # the cut-off one removed
    assert _hashes(run_dir / "checkpoint-2") == checkpoint and _hashes(run_dir / "adapter") == adapter

    # Space freed: --resume finishes from checkpoint-2.
    ballast.unlink()
    resumed = _train(capsys, run_dir, bone_break_dir, *args, "--max_steps", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    adapter = _hashes(run_dir / "adapter")

    # Export onto a full disk: a clear error, the adapter untouched, no folder that looks like an export.
    ballast = _fill(small_disk)
    export = _in_process(capsys, ["export", str(run_dir), "--format", "merged-16bit"])
    assert export.returncode == 2, export.stderr[-3000:]
    message = export.stderr.strip().splitlines()[-1]
    assert f"Disk full while writing the export merged into {run_dir}" in message and "it needs about" in message
    assert "Traceback" not in export.stderr
    assert not (run_dir / "merged").exists() and not list(run_dir.glob(".merged*"))
    assert _hashes(run_dir / "adapter") == adapter
    ballast.unlink()


# ----------------------------------------------------------------------------- session 19: output_dir inside the data
@pytest.mark.slow  # two tiny runs in this process
def test_a_run_folder_inside_class_folders_is_never_read_as_a_class(tmp_path, capsys):
    """--output_dir inside a folder of class folders: the run's samples.png, loss.png and confusion plots made a
    class 'run'. The next run into another folder trained on three classes, plots among them, without a word;
    a --resume failed with 'labels not among the configured classes: run'."""
    data = tmp_path / "xrays"
    for k, label in enumerate(("normal", "fracture")):
        for i in range(8):
            _xray(data / label / f"{label}-{i}.png", 100 * k + i)
    common = ["--recipe", "classify", "--data_dir", str(data), "--model", "tiny:mistral3", "--backend", "hf",
              "--image_size", "32", "--eval_before", "false", "--eval_after", "false"]
    first = _in_process(capsys, ["train", *common, "--output_dir", str(data / "run"), "--max_steps", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert (data / "run" / "samples.png").is_file()

    other = _in_process(capsys, ["train", *common, "--output_dir", str(tmp_path / "other"), "--max_steps", "1"])
    assert other.returncode == 2 and not (tmp_path / "other" / "adapter").exists(), other.stderr[-3000:]
    assert f"--data_dir {data} holds the run folder {data / 'run'}" in other.stderr
    assert f"The data holds {data / 'run'}" in other.stderr and "Traceback" not in other.stderr

    resumed = _in_process(capsys, ["train", *common, "--output_dir", str(data / "run"), "--max_steps", "2",
                                   "--resume"])
    assert resumed.returncode == 2 and f"holds the run folder {data / 'run'}" in resumed.stderr, resumed.stderr[-3000:]


def test_a_json_record_written_onto_a_full_disk_leaves_the_earlier_one_whole(small_disk):
    """eval_*.json and train_stats.json were written in place: a full disk (or a kill) mid-write left a truncated
    file, which --resume and `unsloth-med evaluate RUN` then failed to parse."""
    from unsloth_med.disk import is_disk_full, write_json

    path = small_disk / "eval_before.json"
    write_json(path, {"predictions": [{"id": "a"}]})
    ballast = _fill(small_disk, leave=8 * 1024)
    big = {"predictions": [{"id": str(i), "prediction": "x" * 100} for i in range(2000)]}  # about 250 KB
    with pytest.raises(OSError) as failed:
        write_json(path, big)
    assert is_disk_full(failed.value, small_disk)
    assert json.loads(path.read_text()) == {"predictions": [{"id": "a"}]}
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast", "eval_before.json"]  # no partial file left
    ballast.unlink()
    write_json(path, big)
    assert json.loads(path.read_text()) == big


def test_a_run_folder_that_cannot_be_written_stops_the_run_in_one_line(tmp_path, capsys):
    """A read-only disk or a folder name longer than the filesystem allows: a traceback from the lock's mkdir."""
    readonly = tmp_path / "ro"
    readonly.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(readonly)], capture_output=True)
    folders = [tmp_path / ("r" * 300)] + ([readonly / "run"] if done.returncode == 0 else [])
    try:
        for run_dir in folders:
            failed = _train(capsys, run_dir, tmp_path)
            assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
            assert f"error: Cannot write the run folder {run_dir}: " in failed.stderr, failed.stderr[-2000:]
            assert ("Read-only file system" if run_dir.parent == readonly else "File name too long") in failed.stderr
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(readonly)], check=False)
