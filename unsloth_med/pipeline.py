"""The whole job, in order: data -> evaluate before -> train -> evaluate after -> export -> report.

This is the only module that knows the order of the stages. Each stage writes into the run folder
as soon as it finishes, so a crash loses at most the stage in progress, and `run.json` says how far
the run got (it claims "complete" only at the very end).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from . import distributed
from .config import Config, save_config
from .errors import BackendError, ConfigError, ExportError
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


def _write_status(run_dir: Path, **fields) -> None:
    if not distributed.current().is_main:  # under DDP rank 0 alone writes the run folder
        return
    path = run_dir / "run.json"
    status = json.loads(path.read_text()) if path.exists() else {}
    status.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=2))
    tmp.replace(path)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


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
        status = _read_json(run_dir / "run.json")
        started_training = any(run_dir.glob("checkpoint-*")) or (run_dir / "adapter").exists()
        if status is not None and not config.run.resume:
            if started_training or status.get("stage") not in BEFORE_TRAINING:
                raise ConfigError(f"Run folder {run_dir} already holds a run. Pass --resume to continue it, "
                                  "or another --output_dir.")
            log.info("Run folder %s: an earlier run stopped before training (stage %s); starting afresh",
                     run_dir, status.get("stage"))
            (run_dir / "run.json").unlink()
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


def _push(run_dir: Path, config: Config) -> None:
    """Push the run's export; a failure (no network, no token) leaves the complete run and says how to retry."""
    from .export import export_run
    from .hub import push, write_model_card

    folder = run_dir / "merged"
    if not folder.is_dir():
        folder = Path(export_run(run_dir, format="adapter")["path"])
    write_model_card(folder, run_dir=run_dir, repo_id=config.export.push_to_hub_id)
    url = push(folder, config.export.push_to_hub_id, private=not config.export.hub_public)
    print(f"Pushed {folder} to {url}")


def out_of_memory_error(config: Config, run_dir: Path) -> BackendError:
    from .train import last_checkpoint

    checkpoint = last_checkpoint(run_dir)
    return BackendError(
        "CUDA out of memory while training. Lower what drives memory, most effective first: --image_size "
        f"(now {config.data.image_size or 'the recipe default'}; image tokens grow with its square), "
        f"--per_device_train_batch_size (now {config.training.per_device_train_batch_size}; raise "
        f"--gradient_accumulation_steps, now {config.training.gradient_accumulation_steps}, "
        "to keep the effective batch), "
        "--load_in_4bit true, --finetune_vision_layers false, --lora_r. "
        + (f"Then continue from {checkpoint} with --resume --output_dir {run_dir}." if checkpoint
           else "No checkpoint was written yet; start again with the smaller settings.")
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
DEMO_ATTRIBUTION = ("Generated fracture-like X-ray cartoons (unsloth_med.data.synthetic, written by the --demo run: "
                    "10 classes, 64 px, no real patient data). They show that the pipeline learns through the "
                    "image; they say nothing about real radiographs.")


def run(recipe: Recipe, config: Config) -> dict:
    from transformers import AutoConfig

    from .backends import pick_backend
    from .data.checks import drop_leaked, leak_counts, leak_message, leaked_test_images
    from .data.images import fit_record
    from .data.prepare import check_image_tokens, prepare_images
    from .data.samples import check_placeholders
    from .data.sources import load_recipe_data, subsample
    from .data.splits import split_by_image
    from .data.summary import summarize
    from .data.validate import validate_splits
    from .disk import is_disk_full
    from .evaluate import evaluate
    from .evaluate.report import format_table, write_report
    from .models import resolve_model_name
    from .models.families import image_fit
    from .models.speedups import apply_training_speedups
    from .recipes import recipe_record
    from .recipes.generic import record_resolved, resolve_recipe
    from .train import (
        build_trainer,
        disk_full_error,
        fit_micro_batch,
        last_checkpoint,
        save_adapter,
        train,
        warm_up_when_training_starts,
    )

    started = time.time()
    if (not config.data.preprocess_images
            and config.training.train_sampling_strategy in ("group_by_length", "batch_rebalance")):
        raise ConfigError(f"--train_sampling_strategy {config.training.train_sampling_strategy} needs each sample's "
                          "length, which image preparation records: drop --preprocess_images false, or add "
                          "--train_sampling_strategy random.")
    if config.model.max_memory_gib and not torch.cuda.is_available():
        raise ConfigError("--max_memory_gib caps GPU memory, and no CUDA GPU is visible: leave it unset on a CPU.")
    ranks = distributed.start(config.training)  # torchrun / accelerate launch; one process: rank 0 of 1
    run_dir, lock = prepare_run_dir(config) if ranks.is_main else (Path(config.training.output_dir), None)
    ranks.barrier()  # the other ranks start once rank 0 has checked, locked and made the run folder
    handler = _setup_logging(run_dir, ranks.log_name)
    files = ranks.files_dir(run_dir)  # side files: the run folder on rank 0, scratch on the others
    try:
        backend = pick_backend(config.model.backend)
        data_dir = config.data.data_dir
        demo_data = config.run.demo and data_dir is None  # the generated images, not the recipe's data
        if demo_data:
            data_dir = str(ranks.main_first(demo_data_dir, recipe))
        config.data.data_dir = data_dir
        recipe = resolve_recipe(recipe, config)  # generic recipes: labels, instruction, columns from the config
        if demo_data:  # reports and model cards credit the data actually used
            recipe = dataclasses.replace(recipe, source=dataclasses.replace(recipe.source, id="",
                                                                            attribution=DEMO_ATTRIBUTION))
        _write_status(run_dir, recipe=recipe.name, backend=backend.name, stage="data")

        # The data is found, validated and checked before any model is built or loaded: a data error costs seconds.
        seed = config.training.seed
        image_size = config.data.image_size or recipe.image_size
        splits = load_recipe_data(recipe, data_dir, seed=seed)
        if config.data.split_by == "image":
            splits = split_by_image(splits, test_fraction=config.data.test_fraction, seed=seed)
        check_placeholders(recipe.instruction, splits["train"].column_names, data_dir or recipe.source.id)
        train_set = subsample(splits["train"], config.data.max_train_samples, seed)
        test_set = subsample(splits["test"], config.data.max_eval_samples, seed)
        checked, skipped = validate_splits({"train": train_set, "test": test_set}, image_size=image_size,
                                           max_bad_fraction=config.data.max_bad_fraction, run_dir=files)
        train_set, test_set = checked["train"], checked["test"]
        summary = summarize(recipe, {"train": train_set, "test": test_set}, files, image_size=image_size)
        summary["skipped_images"] = len(skipped)
        # Test images that are copies of training images measure memory, not skill: always reported.
        leaks = leaked_test_images({"train": train_set, "test": test_set})
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

        named_model = config.model.model or resolve_model_name(None, recipe, backend.name)  # as the user named it
        model_name = ranks.main_first(resolve_model_name, config.model.model, recipe, backend.name)  # built once
        config.model.model = model_name
        record_resolved(config, recipe)  # config.yaml alone rebuilds it later (predict, export)
        save_config(config, files / "config.yaml")
        _write_status(run_dir, model=model_name)
        log.info("recipe=%s backend=%s model=%s run_dir=%s", recipe.name, backend.name, model_name, run_dir)
        # One sizing rule for training, evaluation and export (longest side, patch grid, buckets), read from the
        # model's config alone, so that preparation and the image-token check also run before the model loads.
        fit = image_fit(AutoConfig.from_pretrained(model_name), image_size, buckets=config.data.image_buckets)
        if config.data.preprocess_images:
            train_set, summary["prepared_images"] = ranks.share_then_all(prepare_images, train_set, fit)
            test_set, _ = ranks.share_then_all(prepare_images, test_set, fit)
            check_image_tokens(train_set, config.model.max_seq_length, fit)  # before any GPU time is spent

        model, processor = backend.load(model_name, config.model)
        eval_kw = dict(mode=config.eval.eval_mode, batch_size=config.eval.eval_batch_size,
                       max_new_tokens=config.eval.max_new_tokens, image_size=fit)
        before = None
        resume_from = ranks.broadcast(last_checkpoint(run_dir) if config.run.resume else None)  # rank 0's view
        if config.eval.eval_before and not resume_from:
            _write_status(run_dir, stage="eval_before")
            before = evaluate(backend.for_inference(model), processor, recipe, test_set, **eval_kw)
            (files / "eval_before.json").write_text(json.dumps(before, indent=1))
        elif resume_from and (run_dir / "eval_before.json").exists():
            before = json.loads((run_dir / "eval_before.json").read_text())

        _write_status(run_dir, stage="train")
        model = backend.add_adapters(model, config.lora, config.model, seed)
        backend.for_training(model)
        collator = backend.collator(model, processor, recipe, image_size=fit,
                                    max_seq_length=config.model.max_seq_length)
        pre_train = {"speedups": apply_training_speedups(model) if config.model.training_speedups else None}
        trainer = build_trainer(model, processor, train_set, collator, config.training, run_dir)
        # Building the trainer can switch gradient checkpointing off again (seen with Unsloth: 0 of 40 layers
        # until Trainer.train turns it back on). The memory probe and the shape warm-up must run the model
        # as training will, or the probe measures a model without checkpointing and picks a far smaller batch.
        backend.for_training(trainer.model)
        try:
            if config.model.max_memory_gib:
                pre_train["memory_fit"] = fit_micro_batch(trainer, train_set, config.model.max_memory_gib)
            warm_up = config.model.warm_up_shapes
            if warm_up or (warm_up is None and torch.cuda.is_available()):
                warm_up_when_training_starts(trainer, train_set)  # records "shape_warmup" in train_stats.json
            (files / "train_stats.json").write_text(json.dumps(pre_train, indent=1))
            history = train(trainer, resume_from=resume_from)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory_error(config, run_dir) from exc
        except Exception as exc:
            if is_disk_full(exc, run_dir):
                raise disk_full_error(run_dir, "a checkpoint") from exc
            raise
        model = trainer.model

        record = {**recipe_record(recipe), "model": named_model, "base_model": model_name, **fit_record(fit)}
        save_adapter(model, processor, files, record)
        _write_status(run_dir, stage="eval_after")
        after = None
        if config.eval.eval_after:
            after = evaluate(backend.for_inference(model), processor, recipe, test_set, **eval_kw)
            (files / "eval_after.json").write_text(json.dumps(after, indent=1))
        ranks.finish()  # the last step all ranks take together: export, report and push are rank 0's
        if not ranks.is_main:
            return {}

        exported, export_error = None, None
        if config.export.export in ("merged-16bit", "gguf"):
            from .export import export_merged

            _write_status(run_dir, stage="export")
            try:
                exported = export_merged(backend, model, processor, recipe, test_set, run_dir / "merged",
                                         image_size=fit, base_model=model_name, model_name=named_model)
                if config.export.export == "gguf":  # converted from merged/, verified in llama.cpp
                    from .gguf import export_gguf

                    exported = {"merged": exported, "gguf": export_gguf(run_dir)}
            except ExportError as exc:  # keep the evaluation results: write the report, then fail
                exported, export_error = {"ok": False, "error": str(exc)}, exc

        metrics = write_report(run_dir, recipe, before, after, log_history=history,
                               extra={"data": summary, "export": exported,
                                      "train_stats": _read_json(run_dir / "train_stats.json"),
                                      "wall_seconds": round(time.time() - started, 1)})
        if export_error is not None:
            raise export_error
        _write_status(run_dir, stage="done", complete=True, wall_seconds=round(time.time() - started, 1))
        print(format_table(before, after))
        if config.run.demo and after is not None and "accuracy" in after.get("metrics", after):
            scores = after.get("metrics", after)
            print(f"Demo: accuracy {scores['accuracy']:.3f} on this machine ({scores.get('n', '?')} generated test "
                  "X-rays). Reproducible: >= 0.8 on any machine; the exact figure depends on the CPU's arithmetic.")
        print(f"Run folder: {run_dir}  ({time.time() - started:.0f} s)")
        if config.export.push_to_hub_id:
            _push(run_dir, config)
        return metrics
    except BaseException as exc:
        ranks.report_failure(exc)
        raise
    finally:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
        if lock is not None:
            lock.release()
        if files != run_dir:
            shutil.rmtree(files, ignore_errors=True)
