"""Assemble TRL's SFTTrainer for a vision model and run it.

The trainer sees raw rows {image, target, id}; the backend's collator turns them into tensors, so
images are decoded lazily, one batch at a time. SFTConfig settings the vision collators need
(`remove_unused_columns=False`, `dataset_text_field=""`, `skip_prepare_dataset`) are config
defaults, so TRL never tries to tokenize the dataset itself.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)


class JsonlLogCallback(TrainerCallback):
    """Append every log record (loss, lr, grad norm) to <run>/train_log.jsonl as it happens."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class StepStatsCallback(TrainerCallback):
    """Seconds per optimizer step and peak GPU memory, written to <run>/train_stats.json at the end.

    The first `warmup` steps (compilation, first image shapes) are reported apart, not in the median.
    """

    def __init__(self, path: Path, warmup: int = 3):
        self.path, self.warmup, self.times, self._start = path, warmup, [], None

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self._sync()
            self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, args, state, control, **kwargs):
        import statistics

        import torch

        steady = self.times[self.warmup:] or self.times
        stats = {
            "steps_timed": len(self.times),
            "warmup_seconds": round(sum(self.times[: self.warmup]), 3),
            "median_step_seconds": round(statistics.median(steady), 4) if steady else None,
            "samples_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        }
        if torch.cuda.is_available():
            stats["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            stats["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        if state.is_world_process_zero:
            self.path.write_text(json.dumps(stats, indent=1))

    @staticmethod
    def _sync():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def last_checkpoint(run_dir: str | Path) -> str | None:
    """The newest COMPLETE checkpoint in the run folder.

    The Trainer writes trainer_state.json last, so a checkpoint folder without it was cut off mid-write
    (a kill -9, a full disk): it is skipped with a warning, never resumed from.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = sorted((p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for folder in found:
        if (folder / "trainer_state.json").is_file():
            return str(folder)
        log.warning("Ignoring incomplete checkpoint %s (no trainer_state.json: it was interrupted mid-write)", folder)
    return None


def _sft_trainer_class():
    from transformers import Trainer
    from trl import SFTTrainer

    class VisionSFTTrainer(SFTTrainer):
        """SFTTrainer that also trains on a CPU.

        TRL 1.15 computes the loss with a Triton kernel (chunked log-probs over the LM head), and Triton has no
        CPU backend: on a machine without a GPU it fails with "0 active drivers". Off the GPU we take the
        model's own cross-entropy over the same -100-masked labels, which is what the kernel computes.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if next(model.parameters()).device.type in ("cuda", "xpu"):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return VisionSFTTrainer


def build_trainer(model, processor, train_dataset, collator, training_args, run_dir: Path):
    return _sft_trainer_class()(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[JsonlLogCallback(run_dir / "train_log.jsonl"), StepStatsCallback(run_dir / "train_stats.json")],
    )


def train(trainer, *, resume_from: str | None = None) -> list[dict]:
    """Run training (from a checkpoint if given); returns the trainer's log history."""
    trainer.train(resume_from_checkpoint=resume_from)
    return list(trainer.state.log_history)
