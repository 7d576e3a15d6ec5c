"""Two processes (torchrun, gloo on the CPU, a tiny model) at the places where ranks must agree: a run folder that
rank 0 refuses, a step rank 0 takes first that fails."""
from __future__ import annotations

import subprocess

from test_distributed import TINY_RUN, _env, _recipe, _torchrun

from unsloth_med.run_lock import RunLock


def test_a_run_folder_rank_0_refuses_stops_every_rank_with_its_reason(tmp_path, bone_break_dir, tiny_path):
    """Another run holds the folder: rank 0 refuses it, and rank 1 says the same in one line. Before, rank 1 waited
    at a barrier that rank 0 never reached and stopped with gloo's 'Connection closed by peer' traceback (with NCCL
    across hosts, after --ddp_timeout)."""
    tiny_path("mistral3")
    out = tmp_path / "run"
    lock = RunLock(out).acquire()
    try:
        done = subprocess.run(_torchrun(*_recipe("--data_dir", str(bone_break_dir), "--output_dir", str(out),
                                                 *TINY_RUN, "--max_steps", "1")),
                              env=_env(), capture_output=True, text=True, timeout=300)
        written = sorted(p.name for p in out.iterdir())
    finally:
        lock.release()
    assert done.returncode != 0
    assert done.stderr.count(f"error: Run folder {out} is in use by another run") == 1, done.stderr[-3000:]
    said = f"rank 0 stopped, so this rank stops too. Rank 0's reason: RunFolderBusy: Run folder {out} is in use"
    assert f"error: {said}" in done.stderr
    assert "Connection closed by peer" not in done.stderr and "[rank1]: Traceback" not in done.stderr
    assert written == [".unsloth_med.lock"]  # nothing written into the other run's folder


def test_a_model_rank_0_cannot_find_stops_every_rank_with_its_reason(tmp_path, bone_break_dir):
    """The model is named on rank 0 first (Ranks.main_first: it may build or download it). A --model that does not
    exist: rank 1 said 'rank 1 of 2 failed: RuntimeError: ... Connection closed by peer' with a traceback, as if the
    failure were its own, and rank 0's reason was only in rank 0's lines."""
    out = tmp_path / "run"
    args = [a if a != "tiny:mistral3" else "tiny:nope" for a in TINY_RUN]
    done = subprocess.run(_torchrun(*_recipe("--data_dir", str(bone_break_dir), "--output_dir", str(out), *args,
                                             "--max_steps", "1")),
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "error: There is no tiny model for family 'nope'" in done.stderr, done.stderr[-3000:]
    said = "rank 0 stopped, so this rank stops too. Rank 0's reason: UnsupportedModelError: There is no tiny model"
    assert f"error: {said}" in done.stderr and said in (out / "rank1.log").read_text()
    assert "Connection closed by peer" not in done.stderr and "[rank1]: Traceback" not in done.stderr
    assert "rank 1 of 2 failed" not in done.stderr  # rank 0's failure, not rank 1's
