"""The whole job, in order: data -> evaluate before -> train -> evaluate after -> export -> report.

This is the only module that knows the order of the stages. Each stage writes into the run folder
as soon as it finishes, so a crash loses at most the stage in progress, and `run.json` says how far
the run got (it claims "complete" only at the very end).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .config import Config, save_config
import torch

from .errors import BackendError, ConfigError, ExportError
from .recipes.base import Recipe
from .secrets import RedactingFilter

log = logging.getLogger("unsloth_med")
LOGGERS = ("unsloth_med", "transformers", "trl", "peft", "huggingface_hub")


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    for name in LOGGERS:
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("unsloth_med").setLevel(logging.INFO)
    return handler


def _write_status(run_dir: Path, **fields) -> None:
    path = run_dir / "run.json"
    status = json.loads(path.read_text()) if path.exists() else {}
    status.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=2))
    tmp.replace(path)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def prepare_run_dir(config: Config) -> Path:
    run_dir = Path(config.training.output_dir)
    status = run_dir / "run.json"
    if status.exists() and not config.run.resume:
        raise ConfigError(
            f"Run folder {run_dir} already holds a run. Pass --resume to continue it, or another --output_dir."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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
        f"--gradient_accumulation_steps, now {config.training.gradient_accumulation_steps}, to keep the effective batch), "
        "--load_in_4bit true, --finetune_vision_layers false, --lora_r. "
        + (f"Then continue from {checkpoint} with --resume --output_dir {run_dir}." if checkpoint
           else "No checkpoint was written yet; start again with the smaller settings.")
    )


def demo_data_dir() -> Path:
    """The generated fracture X-rays for the offline demo, written once into the cache."""
    from .data.sources import cache_dir
    from .data.synthetic import write_synthetic_fractures

    root = cache_dir() / "demo-fractures-v4"
    if not (root / ".complete").exists():
        write_synthetic_fractures(root, **DEMO_DATA)
        (root / ".complete").touch()
    return root


# The demo's generated X-rays: 10 classes x (200 train + 12 test), 64 px, upright and centred
# (pose_jitter 0: with random rotations the tiny random-weight model stayed at chance; see README).
DEMO_DATA: dict = {"train_per_class": 200, "test_per_class": 12, "size": 64, "seed": 0, "pose_jitter": 0.0}


def run(recipe: Recipe, config: Config) -> dict:
    from .backends import pick_backend
    from .data.sources import load_recipe_data, subsample
    from .data.checks import drop_leaked, leaked_test_images
    from .data.summary import summarize
    from .data.validate import validate_splits
    from .evaluate import evaluate
    from .evaluate.report import format_table, write_report
    from .models import resolve_model_name
    from .recipes.generic import record_resolved, resolve_recipe
    from .data.images import fit_record
    from .data.prepare import check_image_tokens, prepare_images
    from .models.families import image_fit
    from .models.speedups import apply_training_speedups
    from .train import build_trainer, fit_micro_batch, last_checkpoint, train, warm_up_when_training_starts

    started = time.time()
    if not config.data.preprocess_images and config.training.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
        raise ConfigError(f"--train_sampling_strategy {config.training.train_sampling_strategy} needs each sample's "
                          "length, which image preparation records: drop --preprocess_images false, or add "
                          "--train_sampling_strategy random.")
    if config.model.max_memory_gib and not torch.cuda.is_available():
        raise ConfigError("--max_memory_gib caps GPU memory, and no CUDA GPU is visible: leave it unset on a CPU.")
    run_dir = prepare_run_dir(config)
    handler = _setup_logging(run_dir)
    try:
        backend = pick_backend(config.model.backend)
        data_dir = config.data.data_dir
        if config.run.demo and data_dir is None:
            data_dir = str(demo_data_dir())
        model_name = resolve_model_name(config.model.model, recipe, backend.name)
        config.data.data_dir, config.model.model = data_dir, model_name
        recipe = resolve_recipe(recipe, config)  # generic recipes: labels, instruction, columns from the config
        record_resolved(config, recipe)  # config.yaml alone rebuilds it later (predict, export)
        save_config(config, run_dir / "config.yaml")
        _write_status(run_dir, recipe=recipe.name, backend=backend.name, model=model_name, stage="data")
        log.info("recipe=%s backend=%s model=%s run_dir=%s", recipe.name, backend.name, model_name, run_dir)

        seed = config.training.seed
        image_size = config.data.image_size or recipe.image_size
        splits = load_recipe_data(recipe, data_dir, seed=seed)
        train_set = subsample(splits["train"], config.data.max_train_samples, seed)
        test_set = subsample(splits["test"], config.data.max_eval_samples, seed)
        checked, skipped = validate_splits({"train": train_set, "test": test_set}, image_size=image_size,
                                           max_bad_fraction=config.data.max_bad_fraction, run_dir=run_dir)
        train_set, test_set = checked["train"], checked["test"]
        summary = summarize(recipe, {"train": train_set, "test": test_set}, run_dir, image_size=image_size)
        summary["skipped_images"] = len(skipped)
        # Test images that are copies of training images measure memory, not skill: always reported.
        leaks = leaked_test_images({"train": train_set, "test": test_set})
        summary["leaked_test_images"] = leaks
        if leaks:
            log.warning("%d test images are near-identical copies of training images%s", len(leaks),
                        " (dropped)" if config.data.drop_leaked_test_images else "; --drop_leaked_test_images removes them")
        if config.data.drop_leaked_test_images and leaks:
            test_set = drop_leaked(test_set, leaks)
            summary["sizes"]["test"] = len(test_set)
        print(f"Data: {summary['sizes']['train']} train / {summary['sizes']['test']} test examples")

        model, processor = backend.load(model_name, config.model)
        # One sizing rule for training, evaluation and export (longest side, patch grid, buckets).
        fit = image_fit(model.config, image_size, buckets=config.data.image_buckets)
        if config.data.preprocess_images:
            train_set, summary["prepared_images"] = prepare_images(train_set, fit)
            test_set, _ = prepare_images(test_set, fit)
            check_image_tokens(train_set, config.model.max_seq_length, fit)  # before any GPU time is spent

        eval_kw = dict(mode=config.eval.eval_mode, batch_size=config.eval.eval_batch_size,
                       max_new_tokens=config.eval.max_new_tokens, image_size=fit)
        before = None
        resume_from = last_checkpoint(run_dir) if config.run.resume else None
        if config.eval.eval_before and not resume_from:
            _write_status(run_dir, stage="eval_before")
            before = evaluate(backend.for_inference(model), processor, recipe, test_set, **eval_kw)
            (run_dir / "eval_before.json").write_text(json.dumps(before, indent=1))
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
            (run_dir / "train_stats.json").write_text(json.dumps(pre_train, indent=1))
            history = train(trainer, resume_from=resume_from)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory_error(config, run_dir) from exc
        model = trainer.model

        adapter_dir = run_dir / "adapter"
        model.save_pretrained(adapter_dir)
        processor.save_pretrained(adapter_dir)
        (adapter_dir / "unsloth_med.json").write_text(json.dumps({"recipe": recipe.name, "base_model": model_name,
                                                                   **fit_record(fit),
                                                                   "labels": list(recipe.labels),
                                                                   "instruction": recipe.instruction}, indent=1))
        _write_status(run_dir, stage="eval_after")
        after = None
        if config.eval.eval_after:
            after = evaluate(backend.for_inference(model), processor, recipe, test_set, **eval_kw)
            (run_dir / "eval_after.json").write_text(json.dumps(after, indent=1))

        exported, export_error = None, None
        if config.export.export in ("merged-16bit", "gguf"):
            from .export import export_merged

            _write_status(run_dir, stage="export")
            try:
                exported = export_merged(backend, model, processor, recipe, test_set, run_dir / "merged",
                                         image_size=fit, base_model=model_name)
                if config.export.export == "gguf":  # converted from merged/, verified in llama.cpp
                    from .gguf import export_gguf

                    exported = {"merged": exported, "gguf": export_gguf(run_dir)}
            except ExportError as exc:  # keep the evaluation results: write the report, then fail
                exported, export_error = {"ok": False, "error": str(exc)}, exc

        metrics = write_report(run_dir, recipe, before, after, log_history=history,
                               extra={"data": summary, "export": exported, "train_stats": _read_json(run_dir / "train_stats.json"),
                                      "wall_seconds": round(time.time() - started, 1)})
        if export_error is not None:
            raise export_error
        _write_status(run_dir, stage="done", complete=True, wall_seconds=round(time.time() - started, 1))
        print(format_table(before, after))
        print(f"Run folder: {run_dir}  ({time.time() - started:.0f} s)")
        if config.export.push_to_hub_id:
            _push(run_dir, config)
        return metrics
    finally:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
