"""More than one process: DDP with the gloo backend on the CPU, 2 processes, a tiny model (issue 17).

The launchers are the real ones (torchrun, accelerate launch), the model a tiny real-architecture one,
the data the real bone-break X-rays or the demo's generated ones.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from unsloth_med.data.batching import SameShapeSampler, batch_kind, one_batch_of_each_kind
from unsloth_med.distributed import Ranks, shard_indices

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_RUN = ["--model", "tiny:mistral3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--learning_rate", "1e-3", "--max_train_samples", "40", "--max_eval_samples", "4", "--image_size", "64",
            "--seed", "7", "--logging_steps", "1", "--eval_before", "false", "--eval_after", "false"]


def _env() -> dict:
    # One thread per process: two ranks share the cores with the rest of the suite.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, nproc: int = 2) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), *args]


def _recipe(*args) -> list[str]:
    return ["-m", "unsloth_med.recipes.bone_fracture", *args]


# ----------------------------------------------------------------------------- no processes needed
def test_same_shape_batches_are_dealt_so_that_every_rank_runs_one_shape_per_step():
    """accelerate's own data-loader sharding over our sampler: in every step both ranks see one image shape."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    shapes = ["64x64"] * 37 + ["48x64"] * 29 + ["64x32"] * 18 + ["32x64"] * 9
    per_rank, world = 4, 2
    loaders = [prepare_data_loader(DataLoader(list(range(len(shapes))), batch_size=per_rank,
                                              sampler=SameShapeSampler(shapes, per_rank, seed=3, world_size=world)),
                                   num_processes=world, process_index=rank, put_on_device=False)
               for rank in range(world)]
    steps = list(zip(*[[b.tolist() for b in loader] for loader in loaders]))
    seen = sorted(i for step in steps for batch in step for i in batch)
    assert set(seen) == set(range(len(shapes)))  # every sample, the last step topped up from the start
    mixed_steps = 0
    for step in steps:
        step_shapes = {shapes[i] for batch in step for i in batch}
        mixed_steps += len(step_shapes) > 1
    # Only the steps made of the shapes' remainders (fewer than per_rank x world samples of a shape) mix shapes.
    remainders = sum(1 for s in set(shapes) if shapes.count(s) % (per_rank * world))
    assert mixed_steps <= remainders
    assert len(steps) >= 10 and mixed_steps < len(steps) // 3
    # The warm-up covers every kind of micro-batch any rank will run, and is the same list on each rank.
    kinds = {batch_kind([shapes[i] for i in batch]) for step in steps[:-1] for batch in step}
    warmed = {batch_kind([shapes[i] for i in batch]) for batch in one_batch_of_each_kind(shapes, per_rank, 3, world)}
    assert kinds <= warmed


def test_evaluation_shards_are_whole_batches_that_cover_the_split_once():
    n, batch = 23, 4
    parts = [shard_indices(n, batch, Ranks(rank=r, world=3)) for r in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(n))
    assert parts[0][:4] == [0, 1, 2, 3] and parts[1][:4] == [4, 5, 6, 7] and parts[2] == [8, 9, 10, 11, 20, 21, 22]
    assert shard_indices(n, batch, Ranks()) == list(range(n))


# ----------------------------------------------------------------------------- 2 processes, gloo
@pytest.mark.slow
def test_torchrun_demo_writes_one_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(_torchrun(*_recipe("--demo", "--max_steps", "4", "--output_dir", str(out))),
                          env=_env(), capture_output=True, text=True, timeout=900)
    rank1 = (out / "rank1.log").read_text()[-3000:] if (out / "rank1.log").is_file() else "(no rank1.log)"
    assert done.returncode == 0, done.stderr[-4000:] + "\n--- rank1.log ---\n" + rank1
    assert json.loads((out / "run.json").read_text())["complete"] is True
    for name in ("config.yaml", "metrics.json", "report.md", "run.log", "train_log.jsonl", "train_stats.json",
                 "eval_before.json", "eval_after.json", "data_summary.json", "samples.png", "rank1.log"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "unsloth_med.json").is_file()
    assert json.loads((out / "merged" / "export.json").read_text())["verification"]["passed"] is True
    assert not any(out.glob("rank0*")) and len(list(out.glob("rank*.log"))) == 1
    # One trainer's log (rank 0's), and the epoch counts the samples of both ranks: 4 steps x 16 x 2 of 2,000.
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len([r for r in logged if "train_runtime" in r]) == 1
    assert logged[-1]["epoch"] == pytest.approx(4 / 63, rel=1e-3)  # 2,000 / (16 x 2) = 62.5 -> 63 steps an epoch
    # Both ranks evaluated a part of the test split; the gathered predictions are the whole split, once.
    predictions = json.loads((out / "eval_after.json").read_text())["predictions"]
    assert len(predictions) == 120 and len({p["id"] for p in predictions}) == 120
    assert "rank 1" not in done.stderr


def _resume_args(data_dir: Path) -> list[str]:
    """The run that the resume test crashes and resumes under torchrun, and that accelerate launches whole."""
    return ["--data_dir", str(data_dir), *TINY_RUN, "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "5"]


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory, bone_break_dir) -> tuple[subprocess.CompletedProcess, Path]:
    """One `accelerate launch` of the 6-step run, shared (every launch costs ~40 s of imports on 2 cores): its own
    test checks the launcher, and the resume test takes it as the uninterrupted reference, which also shows that
    both launchers train the same way (the same loss at every step)."""
    out = tmp_path_factory.mktemp("accelerate") / "run"
    # --multi_gpu: accelerate's torchrun launcher (its --cpu flag starts one process unless through mpirun); on a
    # machine without CUDA the ranks run on the CPU with gloo.
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    done = subprocess.run([*launch, *_recipe(*_resume_args(bone_break_dir), "--output_dir", str(out))],
                          env=_env(), capture_output=True, text=True, timeout=900)
    return done, out


@pytest.mark.slow
def test_accelerate_launch_trains_the_same_way(accelerate_run):
    done, out = accelerate_run
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((out / "run.json").read_text())["complete"] is True
    assert (out / "rank1.log").is_file() and (out / "adapter" / "unsloth_med.json").is_file()
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert logged[-1]["epoch"] == pytest.approx(6 / 5, rel=1e-3)  # 40 samples / (2 x 2 x 2) = 5 steps an epoch


@pytest.mark.slow
def test_sharded_evaluation_gives_the_predictions_of_one_process(tmp_path, tiny_path, bone_break_dir):
    import torch

    from unsloth_med.backends.hf import HFBackend
    from unsloth_med.config import ModelArgs
    from unsloth_med.data.sources import load_recipe_data
    from unsloth_med.evaluate import evaluate
    from unsloth_med.recipes.bone_fracture import RECIPE

    model_dir, n = str(tiny_path("mistral3")), 19  # 19 rows, batches of 4: ranks get 3 (one short) and 2
    out = tmp_path / "ddp.json"
    done = subprocess.run(_torchrun(str(REPO / "tests" / "ddp_eval_worker.py"), model_dir, str(bone_break_dir),
                                    str(n), str(out)), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    sharded = json.loads(out.read_text())
    assert sharded["world"] == 2
    # Rank 0 ran batches 1, 3 and the short 5th (4 + 4 + 3 images), rank 1 batches 2 and 4 (8): each image once.
    # Label scoring adds, on each rank, the packed strategy's check: its first 2 rows scored 3 more times (cached,
    # packed, packed without the class masking) and once per class as full sequences (the reference).
    check = 3 * 2 + 2 * len(RECIPE.labels)
    assert sharded["images_seen"] == [{"score": 11 + check, "generate": 11}, {"score": 8 + check, "generate": 8}]

    torch.set_num_threads(1)
    model, processor = HFBackend().load(model_dir, ModelArgs())
    test = load_recipe_data(RECIPE, str(bone_break_dir), seed=0)["test"].select(range(n))
    for mode in ("score", "generate"):
        single = evaluate(model, processor, RECIPE, test, mode=mode, batch_size=4, image_size=64, progress=False)
        measured = ("timing", "input_pipeline")  # seconds of this process, not results
        results = [{k: v for k, v in r.items() if k not in measured} for r in (json.loads(json.dumps(single)),
                                                                                 sharded[mode])]
        assert results[0] == results[1], mode  # every prediction, probability and metric


@pytest.mark.slow
def test_vqa_evaluation_is_split_across_ranks_and_a_rank_may_have_nothing_to_prepare(tiny_path, tmp_path):
    """VQA answers and closed label scores: each rank does its share (before, every rank did the whole split),
    and the gathered result is one process's. A one-row split prepared by two ranks: rank 1 has no rows (this
    crashed: 'Original column name _prepared not in the dataset')."""
    import torch

    from unsloth_med.backends.hf import HFBackend
    from unsloth_med.config import ModelArgs
    from unsloth_med.data.sources import load_recipe_data
    from unsloth_med.evaluate import evaluate
    from unsloth_med.pipeline import demo_data_dir
    from unsloth_med.recipes import get_recipe

    recipe = get_recipe("radiology_vqa")
    model_dir, listing, n = str(tiny_path("mistral3")), demo_data_dir(recipe), 10
    out = tmp_path / "vqa.json"
    done = subprocess.run(_torchrun(str(REPO / "tests" / "ddp_vqa_worker.py"), model_dir, str(listing), str(n),
                                    str(out)), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    sharded = json.loads(out.read_text())
    assert sharded["world"] == 2 and sharded["prepared_rows"] == 1

    torch.set_num_threads(1)
    model, processor = HFBackend().load(model_dir, ModelArgs())
    rows_seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0])
                                    if kwargs.get("pixel_values") is not None else None, with_kwargs=True)
    test = load_recipe_data(recipe, str(listing), seed=0)["test"].select(range(n))
    single = evaluate(model, processor, recipe, test, batch_size=4, max_new_tokens=2, image_size=32, progress=False)
    assert all(0 < seen < sum(rows_seen) for seen in sharded["rows_seen"]), (sharded["rows_seen"], sum(rows_seen))
    assert sum(sharded["rows_seen"]) == sum(rows_seen)  # every question once, on one rank
    single = json.loads(json.dumps({k: v for k, v in single.items() if k not in ("timing", "input_pipeline")}))
    assert single["predictions"] == sharded["predictions"] and single["metrics"] == sharded["metrics"]


@pytest.mark.slow
def test_images_skipped_in_training_on_every_rank_are_listed_and_counted(tmp_path, tiny_path):
    """A lazy listing under two ranks: each rank meets some of the 4 unreadable images. Rank 0's list and count
    hold all of them (a rank's own list was in its scratch folder, deleted at its end: 2 of 4 were lost)."""
    import numpy as np
    from PIL import Image

    tiny_path("mistral3")
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["path,label,split"]
    for i in range(18):
        path = root / "img" / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), "L").save(path)
        if i in (3, 7, 10, 14):
            path.write_bytes(path.read_bytes()[:300])  # the header reads, the pixels do not
        lines.append(f"img/{path.name},{'ab'[i % 2]},{'test' if i >= 16 else 'train'}")
    (root / "listing.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = ["-m", "unsloth_med.recipes.generic", "classify", "--data_dir", str(root / "listing.csv"), "--model",
            "tiny:mistral3", "--lazy_images_above", "0", "--max_steps", "4", "--image_size", "64",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--save_strategy", "no",
            "--eval_before", "false", "--eval_after", "false", "--max_bad_fraction", "0.5", "--output_dir", str(out)]
    done = subprocess.run(_torchrun(*args), env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    skipped = [json.loads(line) for line in (out / "skipped_in_training.jsonl").read_text().splitlines()]
    names = sorted(Path(s["image"]).name for s in skipped)
    assert names == ["10.png", "14.png", "3.png", "7.png"], names  # 4 steps x 2 ranks x 2 rows: one epoch, each once
    assert json.loads((out / "metrics.json").read_text())["data"]["skipped_in_training"] == 4


def _corrupt_copy(source: Path, target: Path) -> Path:
    """A node-local copy of the data in which every training image is cut off: unreadable on that node only."""
    shutil.copytree(source, target)
    for image in (p for p in target.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                  and "train" in str(p).lower()):
        image.write_bytes(image.read_bytes()[:64])
    return target


@pytest.mark.slow
def test_two_nodes_a_rank_that_fails_ends_every_rank_with_its_reason(tmp_path, bone_break_dir):
    """The multi-node form (2 nodes x 1 process, rendezvous on 127.0.0.1); node 1's copy of the data is broken.

    Rank 1 stops with the data error; rank 0, which has the good copy, must not wait for it forever.
    """
    broken = _corrupt_copy(bone_break_dir, tmp_path / "node1-data")
    endpoint = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "run"

    def node(rank: int, data: Path):
        cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "t17",
               *_recipe("--data_dir", str(data), "--output_dir", str(out), *TINY_RUN, "--max_steps", "2",
                        "--ddp_timeout", "120")]
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    started = time.time()
    nodes = [node(0, bone_break_dir), node(1, broken)]
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    assert all(p.returncode != 0 for p in nodes), outputs
    assert time.time() - started < 300  # far below ddp_timeout x 2: nobody waited for a rank that had gone
    assert "rank 1 of 2 failed: DataError" in outputs[1] and "cannot be used" in outputs[1]
    assert "rank 1 of 2 failed: DataError" in (out / "rank1.log").read_text()
    status = json.loads((out / "run.json").read_text())
    assert not status.get("complete") and status["stage"] == "data"
    # Node 0 ends by whichever comes first: rank 0 finds the connection to rank 1 closed at its next collective,
    # or node 0's launcher loses the rendezvous that node 1's launcher held, and stops rank 0.
    assert "rank 0 of 2 failed" in outputs[0] or "RendezvousConnectionError" in outputs[0], outputs[0][-3000:]


def _losses(run_dir: Path, step: int) -> dict[int, float]:
    state = json.loads((run_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.mark.slow
def test_resume_under_ddp_after_sigkill_of_the_whole_job(tmp_path, bone_break_dir, accelerate_run):
    args = _resume_args(bone_break_dir)
    done, straight = accelerate_run  # the same run, uninterrupted (launched by accelerate, which uses torchrun's way)
    assert done.returncode == 0, done.stderr[-4000:]

    crashed = tmp_path / "crashed"
    job = subprocess.Popen(_torchrun(*_recipe(*args, "--output_dir", str(crashed))), env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (crashed / "checkpoint-2" / "trainer_state.json").exists():
        assert job.poll() is None, "the job ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    # The launcher and both ranks (torchrun starts each rank in a session of its own), nobody warned.
    ranks = psutil.Process(job.pid).children(recursive=True)
    assert len(ranks) >= 2
    for process in [psutil.Process(job.pid), *ranks]:
        process.send_signal(signal.SIGKILL)
    job.wait()
    psutil.wait_procs(ranks, timeout=30)
    assert not json.loads((crashed / "run.json").read_text()).get("complete")

    from unsloth_med.train import last_checkpoint

    resumed_from = int(Path(last_checkpoint(crashed)).name.split("-")[-1])
    resumed = subprocess.run(_torchrun(*_recipe(*args, "--output_dir", str(crashed), "--resume")), env=_env(),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    steps = [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("step ")]
    assert steps and steps[0] == f"{resumed_from + 1}/6", steps  # continued from the checkpoint, not retrained
    assert json.loads((crashed / "run.json").read_text())["complete"] is True
    expected, got = _losses(straight, 6), _losses(crashed, 6)
    assert sorted(got) == list(range(1, 7))
    # Both ranks trained (40 samples / (2 x 2 x 2 ranks) = 5 steps an epoch), and rank 1 logged apart.
    state = json.loads((crashed / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(6 / 5) and (crashed / "rank1.log").is_file()
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-3, abs=1e-4), (step, got[step], expected[step])


# ----------------------------------------------------------------------------- 2 GPUs (NCCL)
def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_two_gpus_each_rank_trains_on_its_own_gpu(tmp_path, bone_break_dir, backend):
    """NCCL, 4-bit, image buckets with same-shape batches, the memory probe and the warm-up on both ranks."""
    out = tmp_path / "run"
    done = subprocess.run(_torchrun(*_recipe("--data_dir", str(bone_break_dir), "--output_dir", str(out),
                                             "--model", "tiny:mistral3", "--backend", backend, "--load_in_4bit", "true",
                                             "--image_size", "128", "--max_train_samples", "96", "--max_eval_samples",
                                             "20", "--max_steps", "4", "--per_device_train_batch_size", "8",
                                             "--gradient_accumulation_steps", "1", "--max_memory_gib", "8",
                                             "--warm_up_shapes", "true")),
                          env={**_env(), "OMP_NUM_THREADS": "4"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((out / "run.json").read_text())["complete"] is True
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["world_size"] == 2 and stats["samples_per_step"] == 16
    assert len(stats["peak_reserved_gib_per_rank"]) == 2 and min(stats["peak_reserved_gib_per_rank"]) > 0
    assert stats["memory_plan"]["micro_batch"] >= 1 and stats["shape_warmup"]["batch_kinds"] >= 1
    assert len(json.loads((out / "eval_after.json").read_text())["predictions"]) == 20
