"""The whole job, in order: setup -> data -> prepare -> load model -> evaluate before -> train -> evaluate after
-> export -> report -> push (STAGES below; each stage a small function of the run context).

This is the only module that knows the order of the stages. Each stage writes into the run folder
as soon as it finishes, so a crash loses at most the stage in progress, and `run.json` says how far
the run got (it claims "complete" only at the very end).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import collector, distributed
from .config import Config, save_config
from .disk import update_json, write_json
from .errors import BackendError, ConfigError, ExportError, UnslothMedError
from .recipes.base import Recipe
from .run_lock import RunLock
from .secrets import RedactingFilter

log = logging.getLogger("unsloth_med")
LOGGERS = ("unsloth_med", "transformers", "trl", "peft", "huggingface_hub")


def _setup_logging(run_dir: Path, name: str = "run.log") -> logging.Handler:
    handler = logging.FileHandler(run_dir / name)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    for name in LOGGERS:
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("unsloth_med").setLevel(logging.INFO)
    return handler


def _write_status(run_dir: Path, *, drop: tuple[str, ...] = (), **fields) -> None:
    if distributed.current().is_main:  # under DDP rank 0 alone writes the run folder
        update_json(run_dir / "run.json", {**fields, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}, drop=drop)


# What only a run that got to the end writes into run.json (write_results). A resumed run's folder still holds the
# earlier run's: its first status write drops them, so that it never claims a completion or times it did not reach.
FINISHED_KEYS = ("complete", "wall_seconds", "timings_s", "garbage_collection")


# Stages that leave nothing a rerun would lose: a run that stopped in them is simply started again.
BEFORE_TRAINING = ("data", "eval_before")


def prepare_run_dir(config: Config) -> tuple[Path, RunLock]:
    """The run folder, locked for this run (a second run into it refuses at once; see run_lock).

    A folder whose run got to training is protected (--resume continues it); one whose run stopped
    before training (bad data, a model that did not load) holds nothing to lose and is reused.
    """
    run_dir = Path(config.training.output_dir)
    lock = RunLock(run_dir).acquire()
    try:
        status = _read_json_or_none(run_dir / "run.json")  # None: no run.json, or one cut short by a full disk
        started_training = any(run_dir.glob("checkpoint-*")) or (run_dir / "adapter").exists()
        if not config.run.resume:
            # Checkpoints or an adapter are work to keep, whatever run.json says (or if it is gone).
            if started_training or (isinstance(status, dict) and status.get("stage") not in BEFORE_TRAINING):
                raise ConfigError(f"Run folder {run_dir} already holds a run. Pass --resume to continue it, "
                                  "or another --output_dir.")
            if (run_dir / "run.json").exists():
                log.info("Run folder %s: an earlier run stopped before training (stage %s); starting afresh",
                         run_dir, status.get("stage") if isinstance(status, dict) else "unreadable")
                (run_dir / "run.json").unlink()
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


def _push(run_dir: Path, config: Config, *, merged_now: bool) -> None:
    """Push the run's export; a failure (no network, no token) leaves the complete run and says how to retry.

    merged/ only when this run's export wrote it (`merged_now`): one left from an earlier training of the folder
    holds other weights than the adapter this run trained, under a card that would describe this run's metrics."""
    from .export import export_run
    from .hub import push, write_model_card

    folder = folder_to_push(run_dir, config.export.export, merged_now=merged_now)
    if folder is None:
        folder = Path(export_run(run_dir, format="adapter")["path"])
    write_model_card(folder, run_dir=run_dir, repo_id=config.export.push_to_hub_id)
    url = push(folder, config.export.push_to_hub_id, private=not config.export.hub_public)
    print(f"Pushed {folder} to {url}")


def folder_to_push(run_dir: Path, export: str, *, merged_now: bool) -> Path | None:
    """What --push_to_hub_id uploads: what this run's export stage wrote (gguf/ for --export gguf, with its
    llama.cpp card; else merged/); None when it wrote nothing, and the adapter is exported and pushed."""
    if not merged_now:
        return None
    if export == "gguf" and (run_dir / "gguf").is_dir():
        return run_dir / "gguf"
    return run_dir / "merged"


def out_of_memory_error(config: Config, run_dir: Path) -> BackendError:
    from .train import last_checkpoint

    checkpoint = last_checkpoint(run_dir)
    return BackendError(
        "CUDA out of memory while training. Lower what drives memory, most effective first: --image_size "
        f"(now {config.data.image_size or 'the recipe default'}; image tokens grow with its square), "
        f"--per_device_train_batch_size (now {config.training.per_device_train_batch_size}; raise "
        f"--gradient_accumulation_steps, now {config.training.gradient_accumulation_steps}, "
        "to keep the effective batch), "
        "--load_in_4bit true. "
        + (f"Then continue from {checkpoint} with --resume --output_dir {run_dir} and those flags. " if checkpoint
           else "No checkpoint was written yet; start again with the smaller settings. ")
        + "Or adapt less of the model, from the start into another --output_dir (a checkpoint's adapters cannot "
          "change shape): --finetune_vision_layers false, a smaller --lora_r."
    )


def demo_data_dir(recipe: Recipe | None = None) -> Path:
    """The generated fracture X-rays for the offline demo, written once into the cache; for a VQA recipe,
    the listing of three questions per X-ray (data/synthetic.write_fracture_vqa)."""
    from .data.sources import cache_dir
    from .data.synthetic import write_fracture_vqa, write_synthetic_fractures

    root = cache_dir() / "demo-fractures-v4"
    if not (root / ".complete").exists():
        write_synthetic_fractures(root, **DEMO_DATA)
        (root / ".complete").touch()
    if recipe is not None and recipe.is_vqa:
        listing = cache_dir() / "demo-fracture-vqa-v2" / "vqa.csv"
        if not listing.exists():
            write_fracture_vqa(root, listing, seed=DEMO_DATA["seed"], **DEMO_VQA)
        return listing
    return root


# The demo's generated X-rays: 10 classes x (200 train + 12 test), 64 px, upright and centred
# (pose_jitter 0: with random rotations the tiny random-weight model stayed at chance; see README).
DEMO_DATA: dict = {"train_per_class": 200, "test_per_class": 12, "size": 64, "seed": 0, "pose_jitter": 0.0}
# The VQA demo asks three questions about each X-ray of two clearly different classes (see README: with ten
# classes the tiny model answered "yes" to every closed question after 1,000 steps).
DEMO_VQA: dict = {"classes": ("Fracture Dislocation", "Impacted fracture")}
DEMO_ATTRIBUTION = ("Generated fracture-like X-ray cartoons (unsloth_med.data.synthetic, written by the --demo run; "
                    "no real patient data). They show that the pipeline learns through the image; they say "
                    "nothing about real radiographs.")


@dataclasses.dataclass
class RunContext:
    """What the stages hand on to each other: the run's inputs, then what each stage made."""

    recipe: Recipe
    config: Config
    started: float = dataclasses.field(default_factory=time.perf_counter)
    collections_before: tuple = dataclasses.field(default_factory=collector.track)  # the collector's totals so far
    timings: dict = dataclasses.field(default_factory=dict)  # stage -> seconds, in the order they ran
    current_stage: str = ""
    stage_started: float = 0.0  # perf_counter at the start of current_stage; 0 between stages
    ranks: distributed.Ranks | None = None
    run_dir: Path | None = None
    lock: RunLock | None = None
    files: Path | None = None  # side files: the run folder on rank 0, scratch on the other ranks
    log_handler: logging.Handler | None = None
    backend: Any = None
    train_set: Any = None
    test_set: Any = None
    summary: dict = dataclasses.field(default_factory=dict)
    named_model: str | None = None  # as the user named it (tiny:mistral3, a hub id)
    model_name: str | None = None  # the resolved folder or id that loads
    fit: Any = None  # the image sizing rule (models.families.image_fit)
    model: Any = None
    processor: Any = None
    eval_kw: dict = dataclasses.field(default_factory=dict)
    eval_inputs: Any = None  # the pass before training's encoded batches, read again by the pass after it
    budget: tuple[float, str] | None = None  # the GPU memory budget (GiB, why); None on a CPU
    lazy: bool = False  # the training split's images are decoded as batches need them (data/lazy.py)
    resume_from: str | None = None
    before: dict | None = None
    after: dict | None = None
    history: list | None = None
    exported: dict | None = None
    export_error: ExportError | None = None
    metrics: dict = dataclasses.field(default_factory=dict)
    stop: bool = False  # set on ranks other than 0 once the ranks' shared work is done
    trained_step: int | None = None  # the step training ended at, once the adapter is saved
    timed_before_stage: set = dataclasses.field(default_factory=set)  # the timings' keys when the stage started

    def timed_apart(self) -> float:
        """Seconds the stage in progress recorded under names of their own (the training's warm-up)."""
        return sum(seconds for key, seconds in self.timings.items() if key not in self.timed_before_stage)

    def breakdown(self) -> dict:
        """Seconds per finished stage, the stage in progress under its own name, and the total so far."""
        now = time.perf_counter()
        timings = dict(self.timings)
        if self.stage_started and self.current_stage not in timings:
            # less any part the stage already timed apart (the training's warm-up, when saving the adapter fails)
            timings[self.current_stage] = now - self.stage_started - self.timed_apart()
        return {**{name: round(max(seconds, 0.0), 3) for name, seconds in timings.items()},
                "total": round(now - self.started, 3)}


def setup(ctx: RunContext) -> None:
    """Refuse settings that cannot work, start the ranks, lock the run folder and log into it."""
    config = ctx.config
    if (not config.data.preprocess_images
            and config.training.train_sampling_strategy in ("group_by_length", "batch_rebalance")):
        raise ConfigError(f"--train_sampling_strategy {config.training.train_sampling_strategy} needs each sample's "
                          "length, which image preparation records: drop --preprocess_images false, or add "
                          "--train_sampling_strategy random.")
    if config.model.max_memory_gib and not torch.cuda.is_available():
        raise ConfigError("--max_memory_gib caps GPU memory, and no CUDA GPU is visible: leave it unset on a CPU.")
    from .memory_plan import gpu_budget

    ctx.budget = gpu_budget(config.model.max_memory_gib)
    ctx.ranks = ranks = distributed.start(config.training)  # torchrun / accelerate launch; one process: rank 0 of 1
    ctx.run_dir = Path(config.training.output_dir)
    refused = None
    if ranks.is_main:
        try:
            ctx.run_dir, ctx.lock = prepare_run_dir(config)
        except Exception as exc:
            refused = exc
    # The other ranks start once rank 0 has checked, locked and made the run folder; a folder it refuses (in use by
    # another run, not writable) stops them with its reason.
    ranks.after_main(refused)
    if refused is not None:
        raise refused
    ctx.log_handler = _setup_logging(ctx.run_dir, ranks.log_name)
    ctx.files = ranks.files_dir(ctx.run_dir)


def load_data(ctx: RunContext) -> None:
    """Find, validate and check the data, before any model is built or loaded: a data error costs seconds."""
    from .backends import pick_backend
    from .data.checks import drop_leaked, leak_counts, leak_message, leaked_test_images
    from .data.lazy import is_lazy, scan_split
    from .data.samples import check_placeholders, pack_questions
    from .data.sources import run_splits, subsample
    from .data.summary import summarize
    from .data.validate import validate_splits
    from .recipes.resolve import resolve_recipe

    config, ranks, files = ctx.config, ctx.ranks, ctx.files
    _write_status(ctx.run_dir, stage="data", complete=False, drop=FINISHED_KEYS)  # the run's first status write
    ctx.backend = pick_backend(config.model.backend)
    data_dir = config.data.data_dir
    demo_data = config.run.demo and data_dir is None  # the generated images, not the recipe's data
    if demo_data:
        data_dir = str(ranks.main_first(demo_data_dir, ctx.recipe))
    config.data.data_dir = data_dir
    try:
        recipe = resolve_recipe(ctx.recipe, config)  # generic recipes: labels, instruction, columns from the config
    except UnslothMedError as exc:
        raise _with_run_folders_named(exc, data_dir) from exc
    if demo_data:  # reports and model cards credit the data actually used
        recipe = dataclasses.replace(recipe, source=dataclasses.replace(recipe.source, id="",
                                                                        attribution=DEMO_ATTRIBUTION))
    if config.eval.max_new_tokens:  # the run's generation budget travels with its recipe into every export's record
        recipe = dataclasses.replace(recipe, max_new_tokens=config.eval.max_new_tokens)
    ctx.recipe = recipe
    _write_status(ctx.run_dir, recipe=recipe.name, backend=ctx.backend.name)

    seed = config.training.seed
    image_size = config.data.image_size or recipe.image_size
    try:
        splits = run_splits(recipe, data_dir, seed=seed, split_by=config.data.split_by,
                            test_fraction=config.data.test_fraction)
    except UnslothMedError as exc:
        raise _with_run_folders_named(exc, data_dir) from exc
    _refuse_run_folder_images(splits, data_dir)
    check_placeholders(recipe.instruction, splits["train"].column_names, data_dir or recipe.source.id)
    train_set = subsample(splits["train"], config.data.max_train_samples, seed)
    test_set = subsample(splits["test"], config.data.max_eval_samples, seed)
    if config.data.pack_questions:  # one conversation per image; the test split stays one question per row
        if not recipe.is_vqa:
            raise ConfigError("--pack_questions packs the questions of a VQA recipe; this recipe asks one per image.")
        train_set, packing = pack_questions(train_set, recipe.instruction)
        log.info("--pack_questions: %d training questions in %d conversations", packing["rows"], packing["samples"])
    # A large training split is checked from image headers only and decoded as batches need it (data/lazy.py).
    ctx.lazy = lazy = is_lazy(len(train_set), config.data.lazy_images_above)
    if lazy:
        train_set, lazy_skipped = scan_split(train_set, "train", max_bad_fraction=config.data.max_bad_fraction)
    checked, skipped = validate_splits({"test": test_set} if lazy else {"train": train_set, "test": test_set},
                                       image_size=image_size, max_bad_fraction=config.data.max_bad_fraction,
                                       run_dir=files, also_skipped=lazy_skipped if lazy else ())
    train_set, test_set = checked.get("train", train_set), checked["test"]
    summary = summarize(recipe, {"train": train_set, "test": test_set}, files, image_size=image_size)
    summary["skipped_images"] = len(skipped)
    # Test images that are copies of training images measure memory, not skill: always reported.
    leaks = (None if lazy and not config.data.drop_leaked_test_images  # decodes every image: check-data's job
             else leaked_test_images({"train": train_set, "test": test_set}))
    if leaks is None:
        log.warning("Leakage check skipped for %d training rows (more than --lazy_images_above): run "
                    "`unsloth-med check-data` on this data to find test images copied from training",
                    len(train_set))
    summary["leaked_test_images"] = leaks
    if leaks:
        summary["leak_counts"] = counts = leak_counts(test_set, leaks)
        log.warning("%s%s", leak_message(counts), " (dropped)" if config.data.drop_leaked_test_images
                    else "; --drop_leaked_test_images removes them")
        if config.data.drop_leaked_test_images:
            if counts["leaked_rows"] == counts["test_rows"]:
                raise ConfigError(f"--drop_leaked_test_images would empty the test split: {leak_message(counts)}. "
                                  "Re-split with --split_by image instead.")
            test_set = drop_leaked(test_set, leaks)
            summary["sizes"]["test"] = len(test_set)
    print(f"Data: {summary['sizes']['train']} train / {summary['sizes']['test']} test examples")
    ctx.train_set, ctx.test_set, ctx.summary = train_set, test_set, summary


def _run_folders_in(data_dir: str | None) -> list[Path]:
    """Run folders (run.json beside the run's config.yaml, or its lock) inside a local data folder."""
    import os

    from .run_lock import LOCK_NAME

    root = Path(data_dir).absolute() if data_dir else None  # the loaders' paths are absolute
    if root is None or not root.is_dir():
        return []
    # os.walk, not Path.rglob: every run reads its whole data folder here, and rglob took 2.2 s over 200,000 images
    # in class folders (os.walk 0.2 s), more on a network disk.
    return sorted(Path(folder) for folder, _, files in os.walk(root)
                  if "run.json" in files and ("config.yaml" in files or LOCK_NAME in files))


def _run_folders_message(data_dir: str, folders: list[Path]) -> str:
    return (f"--data_dir {data_dir} holds the run folder{'s' if len(folders) > 1 else ''} "
            f"{', '.join(map(str, folders))}, whose sample grid and plots are images: read from class folders, they "
            "become a class of their own. Move the run folders out of the data folder, and give --output_dir a "
            "folder outside it.")


def _with_run_folders_named(exc: UnslothMedError, data_dir: str | None) -> UnslothMedError:
    """A data error, with the likely cause named when the data folder holds run folders (--output_dir inside it)."""
    folders = _run_folders_in(data_dir)
    if not folders:
        return exc
    try:
        return type(exc)(f"{exc} ({_run_folders_message(data_dir, folders)})")
    except TypeError:  # an error class with other arguments
        return exc


def _refuse_run_folder_images(splits: dict, data_dir: str | None) -> None:
    """An earlier run's folder inside the data folder: its samples.png, loss.png, confusion_*.png were read as
    images of a class named after the folder, and a new run trained on them without a word."""
    folders = _run_folders_in(data_dir)
    if not folders:
        return
    for split in splits.values():
        for column in {"image", "images"} & set(getattr(split, "column_names", ())):
            for value in split[column]:
                paths = value if isinstance(value, (list, tuple)) else [value]
                for path in paths:
                    if isinstance(path, str) and any(Path(path).is_relative_to(f) for f in folders):
                        raise ConfigError(f"The data holds {path}, a run's own file. "
                                          + _run_folders_message(data_dir, folders))


def prepare_data(ctx: RunContext) -> None:
    """Name the model, record the resolved config, and size the images once for training, evaluation and export."""
    from transformers import AutoConfig

    from .data.lazy import plan_images
    from .data.prepare import check_image_tokens, prepare_images
    from .models import resolve_model_name
    from .models.families import image_fit
    from .recipes.resolve import record_resolved

    config, ranks, recipe, backend = ctx.config, ctx.ranks, ctx.recipe, ctx.backend
    ctx.named_model = config.model.model or resolve_model_name(None, recipe, backend.name)
    ctx.model_name = model_name = ranks.main_first(resolve_model_name, config.model.model, recipe,
                                                   backend.name)  # built once
    # Past the ranks' first collective: every rank's data stage is done (under DDP rank 0 gets here while a rank
    # whose data failed is still stopping, and the run stopped in its data).
    _write_status(ctx.run_dir, stage="prepare")
    config.model.model = model_name
    record_resolved(config, recipe)  # config.yaml alone rebuilds it later (predict, export)
    save_config(config, ctx.files / "config.yaml")
    _write_status(ctx.run_dir, model=model_name)
    log.info("recipe=%s backend=%s model=%s run_dir=%s", recipe.name, backend.name, model_name, ctx.run_dir)
    # One sizing rule for training, evaluation and export (longest side, patch grid, buckets), read from the
    # model's config alone, so that preparation and the image-token check also run before the model loads.
    ctx.fit = fit = image_fit(AutoConfig.from_pretrained(model_name), config.data.image_size or recipe.image_size,
                              buckets=config.data.image_buckets)
    if config.data.preprocess_images:
        ctx.train_set, ctx.summary["prepared_images"] = (
            plan_images(ctx.train_set, fit) if ctx.lazy else ranks.share_then_all(prepare_images, ctx.train_set, fit))
        ctx.test_set, _ = ranks.share_then_all(prepare_images, ctx.test_set, fit)
        check_image_tokens(ctx.train_set, config.model.max_seq_length, fit)  # before any GPU time is spent


def load_model(ctx: RunContext) -> None:
    """The model, with checkpointing chosen for the memory budget, and the vision tower batched for evaluation too."""
    from .memory_plan import cap_gpu_memory, checkpointing_mode
    from .models.speedups import batch_same_size_images

    config = ctx.config
    _write_status(ctx.run_dir, stage="load_model")  # a model that does not load, or a sample too long for it
    if ctx.budget and config.model.max_memory_gib:  # the asked cap holds from the load on: the pass before training
        cap_gpu_memory(ctx.budget[0])             # (its folded or dequantized copies) stays within it too
    config.model.use_gradient_checkpointing = checkpointing_mode(config.model.use_gradient_checkpointing,
                                                                  ctx.budget[0] if ctx.budget else None)
    ctx.model, ctx.processor = ctx.backend.load(ctx.model_name, config.model)
    if ctx.train_set is not None:  # a sample too long for max_seq_length stops the run now, not hours into training
        from .models.prompting import check_sample_lengths

        check_sample_lengths(ctx.processor, ctx.recipe, ctx.train_set, config.model.max_seq_length, ctx.fit.max_side
                             if ctx.fit else config.data.image_size)
    if config.model.training_speedups:  # evaluation before training runs the vision tower batched too
        batch_same_size_images(ctx.model)
    batch_size = config.eval.eval_batch_size or (32 if torch.cuda.is_available() else 8)
    compiled = config.eval.eval_compiled
    if compiled is None:  # eager where it was measured to pay: label scoring only
        compiled = not (ctx.recipe.is_classification and config.eval.eval_mode == "score")
    ctx.eval_kw = dict(mode=config.eval.eval_mode, batch_size=batch_size, max_new_tokens=config.eval.max_new_tokens,
                       image_size=ctx.fit, eager=not compiled, fold_adapters=config.eval.eval_fold_adapters,
                       dequantize=config.eval.eval_dequantize)  # None: evaluate() dequantizes when it generates


def evaluate_before(ctx: RunContext) -> None:
    """The untrained model's scores; a resumed run keeps those it measured the first time."""
    from .evaluate import EncodedBatches, evaluate
    from .train import last_checkpoint

    config, run_dir = ctx.config, ctx.run_dir
    ctx.resume_from = ctx.ranks.broadcast(last_checkpoint(run_dir) if config.run.resume else None)  # rank 0's view
    if config.eval.eval_before and not ctx.resume_from:
        _write_status(run_dir, stage="eval_before")
        ctx.eval_inputs = EncodedBatches() if config.eval.eval_after else None
        ctx.before = evaluate(ctx.backend.for_inference(ctx.model), ctx.processor, ctx.recipe, ctx.test_set,
                              inputs=ctx.eval_inputs, **ctx.eval_kw)
        write_json(ctx.files / "eval_before.json", ctx.before)
    elif ctx.resume_from:
        path = run_dir / "eval_before.json"
        before = _read_json_or_none(path)  # None when cut off by a kill (before writes were whole)
        usable = before is not None and _same_examples(before, ctx.test_set)
        # rank 0's view decides; every rank takes the same branch (evaluation is a collective under DDP)
        decision = ctx.ranks.broadcast("none" if not path.exists() else "keep" if usable else
                                       "measure" if config.eval.eval_before else "drop")
        if decision == "keep":
            ctx.before = before
        elif decision == "drop":  # asked not to measure it: no scores of other examples either
            log.warning("%s is unreadable or scored other test examples than this run's test split: the report "
                        "has no scores before training (--eval_before false)", path)
        elif decision == "measure":  # the model is untrained here: score it on the split the trained one meets
            log.warning("%s is unreadable or scored other test examples than this run's test split (the data, the "
                        "split or --max_eval_samples changed since): evaluating the untrained model again", path)
            _write_status(run_dir, stage="eval_before")
            ctx.before = evaluate(ctx.backend.for_inference(ctx.model), ctx.processor, ctx.recipe, ctx.test_set,
                                  **ctx.eval_kw)
            write_json(ctx.files / "eval_before.json", ctx.before)


def _read_json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _same_examples(result: dict, test_set) -> bool:
    """Whether an evaluation's predictions are of exactly the examples of `test_set` (by id). A resumed run's
    before-training scores on another split would be compared with after-training scores as if paired."""
    if not isinstance(result, dict):
        return False
    predictions = result.get("predictions")
    if not isinstance(predictions, list) or "id" not in getattr(test_set, "column_names", ()):
        return True  # nothing to compare by: kept, as before
    return sorted(str(p.get("id")) for p in predictions) == sorted(str(i) for i in test_set["id"])


def train_model(ctx: RunContext) -> None:
    """Adapters, trainer, memory fit and shape warm-up, training, then the adapter saved into the run folder.

    The time before the trainer's first step (building the trainer, the memory probe, the shape warm-up, which
    runs inside Trainer.train before the step clock starts) is recorded apart as `warm_up` when train_stats.json
    says how long the steps themselves took."""
    from .data.images import fit_record
    from .data.lazy import SKIP_FILE, LazyImages, add_skipped, skipped_in_training
    from .disk import is_disk_full
    from .models.speedups import apply_training_speedups
    from .recipes import recipe_record
    from .train import (
        WarmUpParts,
        build_trainer,
        disk_full_error,
        save_adapter,
        train,
        warm_up_when_training_starts,
    )

    config, run_dir, backend, files, train_set = ctx.config, ctx.run_dir, ctx.backend, ctx.files, ctx.train_set
    started = time.perf_counter()
    parts = WarmUpParts()
    _write_status(run_dir, stage="train")
    model = backend.add_adapters(ctx.model, config.lora, config.model, config.training.seed)
    backend.for_training(model)
    collator = backend.collator(model, ctx.processor, ctx.recipe, image_size=ctx.fit,
                                max_seq_length=config.model.max_seq_length)
    if ctx.lazy:  # decodes, sizes and caches each image as a batch first needs it; skips (and logs) a bad one
        collator = LazyImages(collator, ctx.fit if config.data.preprocess_images else None,
                              files / SKIP_FILE, config.data.max_bad_fraction)
    pre_train = {"speedups": apply_training_speedups(model) if config.model.training_speedups else None,
                 "train_compiled": config.model.train_compiled}
    parts.lap("adapters")
    trainer = build_trainer(model, ctx.processor, train_set, collator, config.training, run_dir)
    # Building the trainer can switch gradient checkpointing off again (seen with Unsloth: 0 of 40 layers
    # until Trainer.train turns it back on). The memory probe and the shape warm-up must run the model
    # as training will, or the probe measures a model without checkpointing and picks a far smaller batch.
    backend.for_training(trainer.model)
    parts.lap("trainer")
    profiler = None  # --profile_step's callback: closed below however training ends
    try:
        pre_train["memory_plan"] = _plan_memory(ctx, trainer)
        parts.lap("memory_plan")
        warm_up = config.model.warm_up_shapes
        if warm_up or (warm_up is None and torch.cuda.is_available()):
            warm_up_when_training_starts(trainer, train_set)  # records "shape_warmup" in train_stats.json
        if config.model.profile_step:
            from .profiling import ProfileStepCallback

            profiler = ProfileStepCallback(files / "profile_step.json", config.model.profile_step)
            trainer.add_callback(profiler)
        write_json(files / "train_stats.json", pre_train)
        ctx.history = train(trainer, resume_from=ctx.resume_from, compiled=config.model.train_compiled)
        parts.lap("train_call")
    except torch.OutOfMemoryError as exc:
        from .memory_plan import forget_plan

        forget_plan(pre_train.get("memory_plan"))  # a kept plan that did not fit: the next run probes again
        raise out_of_memory_error(config, run_dir) from exc
    except Exception as exc:
        if is_disk_full(exc, run_dir):
            raise disk_full_error(run_dir, "a checkpoint") from exc
        raise
    finally:
        if profiler is not None:  # a step that failed while profiled: the Trainer calls no callback after an error
            profiler.close()
    # Rank 0 writes train_stats.json in the run folder; another rank reading it could meet it half written.
    stats = (_read_json_or_none(run_dir / "train_stats.json") or {}) if ctx.ranks.is_main else {}
    steps_seconds = stats.get("train_seconds")
    if steps_seconds is not None:  # from the first step's start (after the warm-up) to the end of training
        ctx.timings["warm_up"] = max(time.perf_counter() - started - steps_seconds, 0.0)
        update_json(run_dir / "train_stats.json", {"warm_up_parts": parts.record(
            steps_seconds, (stats.get("shape_warmup") or {}).get("seconds", 0.0))})
    ctx.model = trainer.model
    if ctx.lazy:  # every rank's skips; the other ranks' side files are scratch: rank 0 lists theirs with its own
        per_rank = ctx.ranks.gather(skipped_in_training(files))
        if ctx.ranks.is_main:
            add_skipped(files, [record for records in per_rank[1:] for record in records])
        ctx.summary["skipped_in_training"] = sum(len(records) for records in per_rank)
    record = {**recipe_record(ctx.recipe), "model": ctx.named_model, "base_model": ctx.model_name,
              **fit_record(ctx.fit), "global_step": trainer.state.global_step}
    if ctx.ranks.is_main and not _adapter_unchanged(run_dir, ctx.resume_from, trainer.state.global_step):
        _set_aside_earlier_exports(run_dir)
    save_adapter(ctx.model, ctx.processor, files, record)
    ctx.trained_step = trainer.state.global_step  # from here on, a failure costs no training (finish_hint)


# The exports `unsloth-med export` writes into a run folder by default. Made from the adapter a resumed run is about
# to replace, they hold another model than the run's from then on, and the push (merged/) and the GGUF export
# (which converts an existing merged/) would take them for this run's.
EARLIER_EXPORTS = ("merged", "gguf", "adapter-export")


def _adapter_unchanged(run_dir: Path, resume_from: str | None, step: int) -> bool:
    """A resume that took no step (its checkpoint was already the final one: a run stopped in evaluation or export)
    saves the adapter the folder holds when that one was saved at the same step; its exports stay this run's."""
    if resume_from is None or int(Path(resume_from).name.split("-")[-1]) != step:
        return False
    return (_read_json_or_none(run_dir / "adapter" / "unsloth_med.json") or {}).get("global_step") == step


def _set_aside_earlier_exports(run_dir: Path) -> None:
    """Rename the exports of the folder's earlier adapter (moved, never deleted: they are still that model)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in EARLIER_EXPORTS:
        folder = run_dir / name
        if folder.is_dir():
            aside, n = run_dir / f"{name}-superseded-{stamp}", 1
            while aside.exists():  # two resumes within a second
                aside, n = run_dir / f"{name}-superseded-{stamp}-{n}", n + 1
            folder.rename(aside)
            log.warning("%s was exported from the adapter this resumed training replaces: moved to %s (it is not "
                        "the model this run trains; delete it when no longer needed)", folder, aside)


def _plan_memory(ctx: RunContext, trainer) -> dict:
    """The micro-batch and the layers that keep their activations (memory_plan.py), printed in one line."""
    from .memory_plan import MemoryPlan, keep_planned_activations, plan_memory

    config = ctx.config
    if ctx.budget and (config.model.memory_plan or config.model.max_memory_gib):  # by real probe steps
        gc_mode = str(config.model.use_gradient_checkpointing).lower()
        plan = plan_memory(trainer, ctx.train_set, *ctx.budget, keep_activations=config.model.memory_plan,
                           checkpointing="offload" if gc_mode == "unsloth" else "gpu",
                           max_micro_batch=config.model.max_micro_batch)
        keep_planned_activations(trainer, plan)  # Trainer.train would check every layer again
    elif ctx.budget:
        plan = MemoryPlan.as_configured(config.training, "--memory_plan false")
    else:
        plan = MemoryPlan.as_configured(config.training, "no GPU, so no memory budget to plan")
    if ctx.ranks.is_main:
        print(plan.line())
    return plan.record()


def evaluate_after(ctx: RunContext) -> None:
    """The trained model's scores; the last step all ranks take together (export, report and push are rank 0's)."""
    from .evaluate import evaluate

    _write_status(ctx.run_dir, stage="eval_after")
    if ctx.config.eval.eval_after:
        ctx.after = evaluate(ctx.backend.for_inference(ctx.model), ctx.processor, ctx.recipe, ctx.test_set,
                             inputs=ctx.eval_inputs, **ctx.eval_kw)
        write_json(ctx.files / "eval_after.json", ctx.after)
    ctx.eval_inputs = None  # its memory back before the export, which may need the RAM
    ctx.ranks.finish()
    ctx.stop = not ctx.ranks.is_main


def export_model(ctx: RunContext) -> None:
    """Merged weights (and GGUF from them), verified; a failed export still lets the report be written."""
    if ctx.config.export.export not in ("merged-16bit", "gguf"):
        return
    from .export import export_merged

    _write_status(ctx.run_dir, stage="export")
    try:
        ctx.exported = export_merged(ctx.backend, ctx.model, ctx.processor, ctx.recipe, ctx.test_set,
                                     ctx.run_dir / "merged", image_size=ctx.fit, base_model=ctx.model_name,
                                     model_name=ctx.named_model)
        if ctx.config.export.export == "gguf":  # converted from merged/, verified in llama.cpp
            from .gguf import export_gguf

            ctx.exported = {"merged": ctx.exported, "gguf": export_gguf(ctx.run_dir)}
    except ExportError as exc:  # keep the evaluation results: write the report, then fail
        ctx.exported, ctx.export_error = {"ok": False, "error": str(exc)}, exc


def write_results(ctx: RunContext) -> None:
    """metrics.json and report.md, then run.json's "done" with the time breakdown, and the summary printed."""
    from .evaluate.report import format_table, write_report

    run_dir, before, after = ctx.run_dir, ctx.before, ctx.after
    ctx.metrics = write_report(run_dir, ctx.recipe, before, after, log_history=ctx.history,
                               extra={"data": ctx.summary, "export": ctx.exported,
                                      "train_stats": _read_json_or_none(run_dir / "train_stats.json"),
                                      "wall_seconds": round(time.perf_counter() - ctx.started, 1)})
    if ctx.export_error is not None:
        raise ctx.export_error
    timings = ctx.breakdown()
    _write_status(run_dir, stage="done", complete=True, wall_seconds=round(timings["total"], 1), timings_s=timings,
                  garbage_collection=collector.since(ctx.collections_before))
    print(format_table(before, after, ctx.metrics))
    if ctx.config.run.demo and after is not None and "accuracy" in after.get("metrics", after):
        scores = after.get("metrics", after)
        changed = _changed_from_demo(ctx.config, ctx.recipe.name)
        claim = ("Reproducible: >= 0.8 on any machine; the exact figure depends on the CPU's arithmetic." if not changed
                 else f"The >= 0.8 on any machine is for the demo's own training settings; {', '.join(changed)} "
                 "changed here.")
        print(f"Demo: accuracy {scores['accuracy']:.3f} on this machine ({scores.get('n', '?')} generated test "
              f"X-rays). {claim}")
    print(format_timings(timings))
    print(f"Run folder: {run_dir}  ({timings['total']:.0f} s)")


def _changed_from_demo(config: Config, recipe_name: str) -> list[str]:
    """The training settings of the demo preset that this --demo run changed (--max_steps 300, another learning
    rate): its reproducible figure holds for the preset's own. --seed is not one: seeds 0-4 and 42 were measured."""
    import yaml

    from .config import presets_dir

    path = presets_dir() / recipe_name / "demo.yaml"
    preset = ((yaml.safe_load(path.read_text()) or {}).get("training") or {}) if path.is_file() else {}
    training = config.training
    changed = [f"--{key}" for key, value in preset.items()
               if key not in ("seed", "logging_steps", "save_strategy") and getattr(training, key, value) != value]
    if "max_steps" not in preset and (training.max_steps or -1) > 0:  # the preset's epochs no longer count
        changed.append("--max_steps")
    return changed


def push_export(ctx: RunContext) -> None:
    if ctx.config.export.push_to_hub_id:  # ctx.exported: merged/ (and gguf/) written by this run's export stage
        _push(ctx.run_dir, ctx.config, merged_now=ctx.exported is not None)


def finish_hint(ctx: RunContext) -> str:
    """For a run that failed or was interrupted after its adapter was saved: the training is not lost, and how to
    get what is missing (evaluation, export, report, push) without training again."""
    from .train import last_checkpoint

    run_dir, config = ctx.run_dir, ctx.config
    checkpoint = last_checkpoint(run_dir)
    final = checkpoint is not None and int(Path(checkpoint).name.split("-")[-1]) == ctx.trained_step
    stage = ctx.current_stage  # what is missing: what this stage and the ones after it write
    commands = [f"unsloth-med evaluate --model {run_dir}"] if config.eval.eval_after and stage == "eval_after" else []
    exported = stage not in ("eval_after", "export") and ctx.export_error is None  # a failed export: see report
    hub_id = config.export.push_to_hub_id  # pushed as the run would have: public only where it was asked
    push = f" --push-to-hub {hub_id}" + (" --public" if config.export.hub_public else "") if hub_id else ""
    if config.export.export in ("merged-16bit", "gguf") and not exported:
        commands.append(f"unsloth-med export {run_dir} --format {config.export.export}{push}")
    elif hub_id and not exported:
        commands.append(f"unsloth-med export {run_dir} --format adapter{push}")
    text = (f"Training finished (step {ctx.trained_step}) and the trained model is saved in {run_dir / 'adapter'}; "
            f"the run stopped after it, in its {stage} stage. Nothing needs training again")
    if final:
        text += (f": the same command with --resume loads {checkpoint} (no training step) and writes what is missing "
                 "into the run folder (evaluation, export, report)")
    if commands:
        text += f"{'; or' if final else ':'} run {' and '.join(f'`{c}`' for c in commands)}"
    return text + "."


def _tell_how_to_finish(exc: BaseException, hint: str) -> None:
    """Say `hint` on stderr and in run.log (the log line), and again under a traceback (a note on the exception),
    where the user reads a failure that is not one of the package's one-line errors or an interrupt."""
    from .errors import UnslothMedError

    log.warning(hint)
    if not isinstance(exc, (UnslothMedError, KeyboardInterrupt)) and hasattr(exc, "add_note"):
        exc.add_note(hint)


def format_timings(timings: dict) -> str:
    """One line: `Time: data 1.2 s, prepare 0.4 s, ..., total 42 s`."""
    parts = [f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in timings.items() if name != "total"]
    return f"Time: {', '.join(parts)}; total {timings['total']:.1f} s"


# The order of the job, here and nowhere else. Each stage takes the run context and fills in what it made.
# run.json's "stage" field names the stage a crash stopped in (data, eval_before, train, eval_after, export);
# the time breakdown (run.json "timings_s") has one entry per stage, and warm_up apart from train.
STAGES: tuple[tuple[str, Callable[[RunContext], None]], ...] = (
    ("data", load_data),
    ("prepare", prepare_data),
    ("load_model", load_model),
    ("eval_before", evaluate_before),
    ("train", train_model),
    ("eval_after", evaluate_after),
    ("export", export_model),
    ("report", write_results),
    ("push", push_export),
)


def _run_stage(ctx: RunContext, name: str, stage: Callable[[RunContext], None]) -> None:
    """Run one stage and record its seconds, less any part the stage timed apart (the training's warm-up)."""
    ctx.timed_before_stage = set(ctx.timings)
    ctx.current_stage, ctx.stage_started = name, time.perf_counter()
    stage(ctx)
    ctx.timings[name] = time.perf_counter() - ctx.stage_started - ctx.timed_apart()
    ctx.stage_started = 0.0


def run(recipe: Recipe, config: Config, *, startup_s: float | None = None) -> dict:
    """The whole job (STAGES in order); returns the metrics (an empty dict on ranks other than 0).

    `startup_s`: how long the process ran before the job (interpreter, imports, parsing), when the job is the
    process's command; the breakdown then starts with it and its total is the command's time."""
    ctx = RunContext(recipe, config)
    if startup_s is not None:
        ctx.timings["startup"] = startup_s
        ctx.started -= startup_s
    _run_stage(ctx, "setup", setup)
    try:
        for name, stage in STAGES:
            _run_stage(ctx, name, stage)
            if ctx.stop:
                return {}
        return ctx.metrics
    except BaseException as exc:
        ctx.ranks.report_failure(exc)
        if (ctx.run_dir / "run.json").is_file():  # how long each part took, next to the stage it stopped in
            with contextlib.suppress(Exception):
                _write_status(ctx.run_dir, timings_s=ctx.breakdown())
        if ctx.trained_step is not None and ctx.ranks.is_main and ctx.current_stage != "push":  # push: hub.py says
            _tell_how_to_finish(exc, finish_hint(ctx))
        raise
    finally:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(ctx.log_handler)
        ctx.log_handler.close()
        if ctx.lock is not None:
            ctx.lock.release()
        if ctx.files != ctx.run_dir:
            shutil.rmtree(ctx.files, ignore_errors=True)
