"""Fast by default (issue 15): the memory plan's arithmetic and its line, and shape-grouped evaluation.

The probing itself needs a GPU (tests/test_gpu.py); here: the budget, the checkpointing choice, the micro-batch
candidates (effective batch exact), the unchecked-layer count, the line a run prints, a plan kept for identical
runs (its key, applying it, forgetting it), and that evaluation in shape order returns the same predictions in
the dataset's own order.
"""
from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from unsloth_med.backends.hf import HFBackend
from unsloth_med.backends.unsloth import gradient_checkpointing_value
from unsloth_med.config import ModelArgs
from unsloth_med.data.images import ImageFit
from unsloth_med.data.prepare import prepare_images
from unsloth_med.evaluate import evaluate, shape_order
from unsloth_med.memory_plan import (
    DEFAULT_BUDGET_SHARE,
    MemoryPlan,
    checkpointing_mode,
    layers_to_uncheck,
    memory_budget,
    micro_batch_candidates,
)
from unsloth_med.recipes.bone_fracture import RECIPE


def test_budget_is_the_flag_or_a_share_of_the_gpu():
    assert memory_budget(24, 139.8, "NVIDIA H200") == (24.0, "--max_memory_gib 24")
    budget, why = memory_budget(None, 139.8, "NVIDIA H200")
    assert budget == round(139.8 * DEFAULT_BUDGET_SHARE, 1) == 128.6
    assert "NVIDIA H200" in why and "--max_memory_gib" in why and "A6000" in why


@pytest.mark.parametrize("requested", [0, -8])
def test_a_budget_of_nothing_is_refused_not_taken_as_unset(requested):
    """--max_memory_gib 0 became 92% of the GPU, -8 an error about the model's memory after it had loaded."""
    from unsloth_med.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--max_memory_gib {requested}: a budget in GiB above 0"):
        memory_budget(requested, 139.8, "NVIDIA H200")


def test_checkpointing_auto_stays_on_the_gpu_when_the_budget_allows():
    assert checkpointing_mode("auto", 128.6) == "true"
    assert checkpointing_mode("auto", 12) == "unsloth"  # small budgets offload activations to CPU memory
    assert checkpointing_mode("auto", None) == "unsloth"
    for explicit in ("unsloth", "true", "false"):
        assert checkpointing_mode(explicit, 128.6) == explicit  # what the user set is kept
    assert gradient_checkpointing_value(checkpointing_mode("auto", 24)) is True
    assert gradient_checkpointing_value("auto") == "unsloth"  # unresolved (no budget): the backend's default


@pytest.mark.parametrize("effective", [1, 8, 12, 32])
def test_micro_batch_candidates_keep_the_effective_batch_exact(effective):
    sizes = micro_batch_candidates(effective)
    assert sizes[0] == effective and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)
    assert all(effective % m == 0 and m * (effective // m) == effective for m in sizes)
    assert micro_batch_candidates(8) == [8, 4, 2, 1]


def test_max_micro_batch_caps_the_candidates_and_the_effective_batch_stays(tmp_path):
    from unsloth_med.config import parse_config
    from unsloth_med.errors import ConfigError

    assert micro_batch_candidates(8, 4) == [4, 2, 1]
    assert micro_batch_candidates(12, 5) == [4, 3, 2, 1]  # divisors only: 5 does not divide 12
    assert micro_batch_candidates(8, 100) == micro_batch_candidates(8) == [8, 4, 2, 1]
    config = parse_config(["--output_dir", str(tmp_path), "--max_micro_batch", "4"], RECIPE)
    assert config.model.max_micro_batch == 4
    with pytest.raises(ConfigError, match="--max_micro_batch 0: the largest micro-batch to try must be at least 1"):
        parse_config(["--output_dir", str(tmp_path), "--max_micro_batch", "0"], RECIPE)


def test_unchecked_layers_fill_what_the_budget_leaves():
    # 24 GiB budget, 85% fill: 20.4 GiB; all-checked peak 13.0; 0.6 GiB per layer -> 12 layers.
    assert layers_to_uncheck(24, 13.0, 0.6, 40, fill_share=0.85) == 12
    assert layers_to_uncheck(128.6, 13.0, 0.6, 40) == 40  # room for all: capped at the layers there are
    assert layers_to_uncheck(12, 13.0, 0.6, 40) == 0  # nothing left over
    assert layers_to_uncheck(24, 13.0, 0.0, 40) == 40  # no measurable cost
    assert layers_to_uncheck(24, 13.0, 0.6, 0) == 0


def test_the_plan_line_says_what_was_chosen_and_why():
    plan = MemoryPlan(budget_gib=24.0, budget_reason="--max_memory_gib 24", effective_batch=8, micro_batch=4,
                      gradient_accumulation_steps=2, micro_batches_tried=[8, 4], checkpointing="gpu",
                      language_layers_unchecked="12/40", vision_layers_unchecked="0/24", probe_peak_reserved_gib=19.6)
    line = plan.line()
    assert line.startswith("Memory plan: budget 24 GiB (--max_memory_gib 24)")
    assert "micro-batch 4 x 2 accumulation" in line and "largest divisor of the effective batch 8" in line
    assert "gradient checkpointing on the GPU" in line and "12/40 language" in line and "19.6 GiB" in line
    roomy = MemoryPlan(budget_gib=128.6, budget_reason="92% of the H200", effective_batch=8, micro_batch=8,
                       gradient_accumulation_steps=1, checkpointing="gpu", language_layers_unchecked="40/40",
                       vision_layers_unchecked="24/24")
    assert "micro-batch 8 (the whole effective batch fits)" in roomy.line()
    assert roomy.record()["language_layers_unchecked"] == "40/40"
    capped = MemoryPlan(budget_gib=24.0, budget_reason="--max_memory_gib 24", effective_batch=8, micro_batch=4,
                        gradient_accumulation_steps=2, micro_batches_tried=[4], max_micro_batch=4)
    assert "micro-batch 4 x 2 accumulation (the largest divisor of the effective batch 8 that fits within " \
           "--max_micro_batch 4)" in capped.line()
    assert capped.record()["max_micro_batch"] == 4


def test_the_plan_record_leaves_the_kept_layers_uncopied(tiny_path, monkeypatch):
    """kept_layers holds the model's own decoder layers: recording the plan (train_stats.json, the kept plan) must
    not deep-copy them, as dataclasses.asdict did (2 s per call on the 14B shape, with a copy of their weights)."""
    import copy

    from unsloth_med.models.speedups import decoder_layers

    backend = HFBackend()
    model, _ = backend.load(str(tiny_path("mistral3")), ModelArgs())
    layers = decoder_layers(model, "language") + decoder_layers(model, "vision")
    plan = MemoryPlan(budget_gib=24.0, budget_reason="--max_memory_gib 24", effective_batch=8, micro_batch=8,
                      gradient_accumulation_steps=1, micro_batches_tried=[8], kept_layers=layers)

    def no_deep_copies(*args, **kwargs):
        raise AssertionError("record() deep-copied a value")

    monkeypatch.setattr(copy, "deepcopy", no_deep_copies)
    record = plan.record()
    assert layers and "kept_layers" not in record and record["micro_batches_tried"] == [8]
    assert json.loads(json.dumps(record))["micro_batch"] == 8


def test_evaluation_in_shape_order_gives_the_same_predictions_in_the_dataset_order(tiny_path, tmp_path):
    """Prepared images carry their shape; evaluation batches them by shape and puts the predictions back."""
    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w) in enumerate([(64, 64), (32, 64), (64, 64), (64, 32), (32, 64), (64, 64), (64, 32)]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        rows.append({"image": str(path), "target": RECIPE.labels[i % len(RECIPE.labels)], "id": f"img{i}"})
    prepared, _ = prepare_images(datasets.Dataset.from_list(rows), ImageFit(64, 16, True), tmp_path / "prep")
    order = shape_order(prepared)
    assert order is not None and sorted(order) == list(range(len(rows)))
    shapes = [prepared[i]["image_shape"] for i in order]
    assert shapes == sorted(shapes) and len(set(shapes)) > 1  # grouped by shape, more than one shape
    assert shape_order(prepared.select(order)) is None  # already grouped: evaluated as it is

    model, processor = HFBackend().load(str(tiny_path("mistral3")), ModelArgs())
    model.eval()
    fit = ImageFit(64, 16, True)
    grouped = evaluate(model, processor, RECIPE, prepared, batch_size=2, image_size=fit, progress=False)
    plain = evaluate(model, processor, RECIPE, prepared.to_list(), batch_size=2, image_size=fit, progress=False)
    assert [p["id"] for p in grouped["predictions"]] == [r["id"] for r in rows]
    for a, b in zip(grouped["predictions"], plain["predictions"]):
        assert a["id"] == b["id"] and a["prediction"] == b["prediction"]
        assert torch.allclose(torch.tensor(list(a["log_likelihoods"].values())),
                              torch.tensor(list(b["log_likelihoods"].values())), atol=1e-3)
    assert grouped["metrics"]["accuracy"] == plain["metrics"]["accuracy"]


def test_the_planned_layers_keep_their_activations_after_trainer_train_checks_every_layer(tiny_path, tmp_path):
    """Trainer.train (and Unsloth's for_training inside it) turns checkpointing on in every layer; the plan's
    callback, first in line, takes the planned layers out again before the step clock starts."""
    from unsloth_med.config import LoraArgs, parse_config
    from unsloth_med.memory_plan import keep_planned_activations
    from unsloth_med.models.speedups import checkpointed_layers, decoder_layers
    from unsloth_med.train import build_trainer

    rng = np.random.default_rng(1)
    rows = []
    for i in range(4):
        path = tmp_path / f"x{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        rows.append({"image": str(path), "target": RECIPE.labels[i], "id": f"x{i}"})
    backend = HFBackend()
    model, processor = backend.load(str(tiny_path("mistral3")), ModelArgs())
    model = backend.add_adapters(model, LoraArgs(), ModelArgs(), seed=0)
    collator = backend.collator(model, processor, RECIPE, image_size=64, max_seq_length=4096)
    config = parse_config(["--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--save_strategy", "no",
                           "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                           "--gradient_checkpointing", "true"], RECIPE)
    trainer = build_trainer(model, processor, datasets.Dataset.from_list(rows), collator, config.training,
                            tmp_path / "run")
    language = decoder_layers(model, "language")
    assert len(language) >= 2
    plan = MemoryPlan(budget_gib=1.0, budget_reason="test", effective_batch=4, micro_batch=4,
                      gradient_accumulation_steps=1, checkpointing="gpu", kept_layers=language[-1:])
    keep_planned_activations(trainer, plan)
    trainer.train()
    assert checkpointed_layers(model)["language"] == f"{len(language) - 1}/{len(language)}"
    import json

    recorded = json.loads((tmp_path / "run" / "train_stats.json").read_text())["checkpointed_layers"]
    assert recorded["language"] == f"{len(language) - 1}/{len(language)}"  # what the steps really ran with
    assert "kept_layers" not in plan.record()


@pytest.mark.parametrize("ahead", [0, 2])
def test_prefetch_keeps_the_order_and_times_the_input_side(ahead):
    """Evaluation prepares the next batches in a background thread on a GPU (ahead=2), inline on a CPU (0)."""
    import threading
    import time

    from unsloth_med.evaluate.inputs import Prefetch

    threads = set()

    def prepare(item):
        threads.add(threading.get_ident())
        time.sleep(0.01)
        return item * 10

    feed = Prefetch(range(7), prepare, ahead=ahead)
    assert list(feed) == [(i, i * 10) for i in range(7)]
    stats = feed.summary()
    assert stats["batches"] == 7 and stats["prepare_s"] >= 0.07 and 0 <= stats["waited_s"]
    assert (threading.get_ident() in threads) == (ahead == 0)  # inline on a CPU, a worker thread on a GPU


# ----------------------------------------------------------------------------- plans kept for identical runs
def _trainer(tiny_path, tmp_path, *, lora_r: int = 16, batch: int = 2, accumulation: int = 2, name: str = "run"):
    from unsloth_med.config import LoraArgs, parse_config
    from unsloth_med.train import build_trainer

    rng = np.random.default_rng(1)
    rows = []
    for i in range(4):
        path = tmp_path / f"x{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 48 + 16 * i, 3), dtype=np.uint8)).save(path)
        rows.append({"image": str(path), "target": RECIPE.labels[i], "id": f"x{i}"})
    backend = HFBackend()
    model, processor = backend.load(str(tiny_path("mistral3")), ModelArgs())
    model = backend.add_adapters(model, LoraArgs(lora_r=lora_r, lora_alpha=lora_r), ModelArgs(), seed=0)
    fit = ImageFit(64, 16, True)
    train_set, _ = prepare_images(datasets.Dataset.from_list(rows), fit, tmp_path / "prepared")
    collator = backend.collator(model, processor, RECIPE, image_size=fit, max_seq_length=4096)
    config = parse_config(["--output_dir", str(tmp_path / name), "--max_steps", "1", "--save_strategy", "no",
                           "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps",
                           str(accumulation), "--gradient_checkpointing", "true"], RECIPE)
    return build_trainer(model, processor, train_set, collator, config.training, tmp_path / name), train_set


def test_the_kept_plan_is_keyed_by_what_the_probes_measured(tiny_path, tmp_path):
    from unsloth_med.memory_plan import plan_key

    trainer, data = _trainer(tiny_path, tmp_path)
    key = dict(budget_gib=24.0, gpu="NVIDIA H200 150119763968", checkpointing="gpu", keep_activations=True)
    same = plan_key(trainer, data, **key)
    assert plan_key(trainer, data, **key) == same  # deterministic
    assert plan_key(trainer, data.select(range(4)), **key) == same
    assert plan_key(trainer, data, **{**key, "budget_gib": 48.0}) != same
    assert plan_key(trainer, data, **{**key, "gpu": "NVIDIA RTX A6000 51041271808"}) != same
    assert plan_key(trainer, data, **{**key, "keep_activations": False}) != same
    assert plan_key(trainer, data, **{**key, "eager_probes": True}) != same  # eager peaks may differ from compiled
    assert plan_key(trainer, data, **{**key, "max_micro_batch": 2}) != same  # probes fewer, smaller micro-batches
    assert plan_key(trainer, data, **{**key, "max_micro_batch": None}) == same  # unset: plans kept before still found
    assert plan_key(trainer, data.select(range(3)), **key) != same  # another longest sample
    trainer.args.gradient_accumulation_steps = 4  # another effective batch
    assert plan_key(trainer, data, **key) != same
    other, other_data = _trainer(tiny_path, tmp_path, lora_r=8, name="r8")  # other adapters
    assert plan_key(other, other_data, **key) != same


def test_no_plan_is_kept_for_data_without_lengths(tiny_path, tmp_path):
    """--preprocess_images false: no `length`/`image_shape` columns, so a key could name neither the samples nor the
    image size the collator sizes them at (a plan probed on small images was reused on large ones: the same key)."""
    from unsloth_med.memory_plan import plan_key

    trainer, data = _trainer(tiny_path, tmp_path, name="raw")
    key = dict(budget_gib=24.0, gpu="NVIDIA H200 150119763968", checkpointing="gpu", keep_activations=True)
    assert plan_key(trainer, data, **key) is not None  # prepared data: kept
    raw = data.remove_columns([c for c in ("length", "image_shape", "image_tokens") if c in data.column_names])
    assert plan_key(trainer, raw, **key) is None


def test_an_eager_probe_step_runs_compiled_modules_without_tracing_and_changes_nothing(tiny_path, tmp_path):
    """The memory plan's probe steps run eager: Unsloth discards graphs traced before Trainer.train, so tracing there is
    paid for nothing. The language model, compiled with dynamo's eager backend (no compiler needed), traces no frame
    in an eager probe step and does in a normal one; neither step changes a weight or leaves a gradient."""
    from torch._dynamo.utils import counters

    from unsloth_med.memory_plan import step_without_update

    trainer, data = _trainer(tiny_path, tmp_path, name="eager")
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.base_model.model.model.language_model.compile(backend="eager", dynamic=True)
    traced = lambda: counters["frames"]["total"]  # noqa: E731
    frames = traced()
    step_without_update(trainer, [data[0], data[1]], eager=True)
    assert traced() == frames
    step_without_update(trainer, [data[0], data[1]])
    assert traced() > frames
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_training_with_train_compiled_false_traces_nothing(tiny_path, tmp_path):
    """--train_compiled false: Trainer.train runs compiled functions as plain Python (here the language model, compiled
    with dynamo's eager backend): no frame is traced, and the step trains (the weights move). Even when train() first
    sets the compiler's stance back to default, as Unsloth's patched train() does (its for_training)."""
    from torch._dynamo.utils import counters

    from unsloth_med.train import train

    trainer, _ = _trainer(tiny_path, tmp_path, name="eager-train")
    trainer.args.warmup_steps = 0  # the defaults' warm-up gives step 1 a learning rate of 0
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.base_model.model.model.language_model.compile(backend="eager", dynamic=True)
    frames = counters["frames"]["total"]
    unpatched = trainer.train

    def train_as_unsloth_does(*args, **kwargs):
        torch.compiler.set_stance("default")
        return unpatched(*args, **kwargs)

    trainer.train = train_as_unsloth_does
    history = train(trainer, compiled=False)
    assert counters["frames"]["total"] == frames and any("loss" in h for h in history)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_a_kept_plan_is_applied_without_probing_and_forgotten_after_running_out_of_memory(
        tiny_path, tmp_path, monkeypatch):
    from unsloth_med.memory_plan import apply_stored_plan, forget_plan, read_stored_plan, store_plan
    from unsloth_med.models.speedups import checkpointed_layers, decoder_layers

    monkeypatch.setenv("UNSLOTH_MED_CACHE", str(tmp_path / "cache"))
    trainer, _ = _trainer(tiny_path, tmp_path, batch=2, accumulation=2)
    model = trainer.model
    model.gradient_checkpointing_enable()
    language, vision = decoder_layers(model, "language"), decoder_layers(model, "vision")
    assert len(language) >= 2 and vision
    probed = MemoryPlan(budget_gib=24.0, budget_reason="--max_memory_gib 24", effective_batch=4, micro_batch=4,
                        gradient_accumulation_steps=1, micro_batches_tried=[4], checkpointing="gpu",
                        language_layers_unchecked=f"1/{len(language)}", vision_layers_unchecked=f"0/{len(vision)}",
                        probe_peak_reserved_gib=19.6, probe_peak_allocated_gib=18.4, probes=4)
    where = store_plan("k1", probed)
    assert where and read_stored_plan("missing") is None

    plan = apply_stored_plan(trainer, *read_stored_plan("k1"), language, vision)
    assert plan.probes == 0 and plan.reused_from == where and plan.micro_batch == 4
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (4, 1)
    assert checkpointed_layers(model) == {"language": f"{len(language) - 1}/{len(language)}",
                                          "vision": f"{len(vision)}/{len(vision)}"}
    assert plan.kept_layers == language[-1:]
    assert "probed by an identical earlier run" in plan.line() and where in plan.line()
    assert plan.record()["reused_from"] == where and "kept_layers" not in plan.record()

    # A plan for another model's layers or another effective batch is not applied.
    assert apply_stored_plan(trainer, *read_stored_plan("k1"), language[:-1], vision) is None
    trainer.args.gradient_accumulation_steps = 2  # effective batch 8
    assert apply_stored_plan(trainer, *read_stored_plan("k1"), language, vision) is None

    forget_plan(plan.record())  # what the pipeline does when training with it ran out of memory
    assert read_stored_plan("k1") is None
    forget_plan({"stored_at": store_plan("k2", probed)})  # a plan probed by the run that ran out of memory
    assert read_stored_plan("k2") is None
