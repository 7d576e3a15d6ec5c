"""Assemble TRL's SFTTrainer for a vision model and run it.

The trainer sees raw rows {image, target, id}; the backend's collator turns them into tensors, so
images are decoded lazily, one batch at a time. SFTConfig settings the vision collators need
(`remove_unused_columns=False`, `dataset_text_field=""`, `skip_prepare_dataset`) are config
defaults, so TRL never tries to tokenize the dataset itself.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .disk import update_json
from .profiling import sync_gpu

log = logging.getLogger(__name__)


class JsonlLogCallback(TrainerCallback):
    """Append every log record (loss, lr, grad norm) to <run>/train_log.jsonl as it happens.

    A resumed run starts from its last complete checkpoint: the records the interrupted run logged after it (and
    its closing summary, if it wrote one) are dropped first, so that every step is in the file once."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.is_world_process_zero and self.path.is_file():
            lines = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]
            records = [(line, _record(line)) for line in lines]
            kept = [line for line, record in records if record is not None and _before_resume(record,
                                                                                               state.global_step)]
            if any(record is None for _, record in records):
                log.warning("%s: dropped a record cut off mid-write (the interrupted run's last line)", self.path)
            partial = self.path.with_name(f".{self.path.name}.tmp")
            partial.write_text("".join(line + "\n" for line in kept))
            partial.replace(self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def _record(line: str) -> dict | None:
    """One logged record; None for a line cut off mid-write (a kill or power loss mid-append, a full disk)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _before_resume(record: dict, step: int) -> bool:
    """Whether a logged record belongs to the steps a run resumed at `step` keeps: up to the checkpoint, and not a
    session's closing summary (train_runtime...), which the resumed session writes again."""
    return int(record.get("step", 0)) <= step and "train_runtime" not in record


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class ProgressLineCallback(TrainerCallback):
    """One readable line per log instead of transformers' tqdm bar and raw dicts (those go to train_log.jsonl):

        step 40/300 (13%) | loss 1.8342 | lr 1.87e-04 | 6.2 samples/s | ETA 4m10s

    Rates and the ETA count only this session's steps (a resumed run does not claim the steps it skipped).
    On a terminal the line is rewritten in place; in a log file each one is a new line.
    """

    def __init__(self, stream=None):
        self.stream = stream
        self._start_time = self._start_step = None
        self._last_line = ""

    def _out(self):
        return self.stream or sys.stdout

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_time, self._start_step = time.perf_counter(), state.global_step

    def line(self, args, state, logs: dict) -> str:
        done = state.global_step - (self._start_step or 0)
        elapsed = time.perf_counter() - (self._start_time or time.perf_counter())
        samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        share = 100 * state.global_step / max(1, state.max_steps)
        parts = [f"step {state.global_step}/{state.max_steps} ({share:.0f}%)"]
        if "loss" in logs:
            parts.append(f"loss {logs['loss']:.4f}")
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if done > 0 and elapsed > 0:
            parts.append(f"{done * samples / elapsed:.1f} samples/s")
            parts.append(f"ETA {_duration((state.max_steps - state.global_step) * elapsed / done)}")
        return " | ".join(parts)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return  # the end-of-training summary (train_runtime, ...) stays in train_log.jsonl
        line, out = self.line(args, state, logs), self._out()
        if out.isatty():
            out.write("\r" + line.ljust(len(self._last_line)))
        else:
            out.write(line + "\n")
        out.flush()
        self._last_line = line

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self._last_line and self._out().isatty():
            self._out().write("\n")
            self._out().flush()


class StepStatsCallback(TrainerCallback):
    """Seconds per optimizer step, time waiting for data, and peak GPU memory, written to <run>/train_stats.json.

    Step time runs from on_step_begin to on_step_end (forward, backward, optimizer). The Trainer fetches
    and collates a step's batches before on_step_begin, so the gap from one step's end to the next
    step's begin is the time the GPU waited for data (plus logging). data_share = median wait /
    (median wait + median step). The first `warmup` steps (compilation, first image shapes) are
    reported apart, not in the medians.
    """

    def __init__(self, path: Path, warmup: int = 3):
        self.path, self.warmup = path, warmup
        self.times: list[float] = []
        self.waits: list[float] = []
        self._start = self._last_end = self._train_start = None
        self.checkpointed: dict | None = None  # checkpointed layers when training began

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._train_start = self._last_end = time.perf_counter()
        model = kwargs.get("model")
        if model is not None:  # what the trainer trains with (Trainer.train can change checkpointing)
            from .models.speedups import checkpointed_layers

            self.checkpointed = checkpointed_layers(model)

    def on_step_begin(self, args, state, control, **kwargs):
        sync_gpu()
        self._start = time.perf_counter()
        if self._last_end is not None:
            self.waits.append(self._start - self._last_end)

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            sync_gpu()
            self._last_end = time.perf_counter()
            self.times.append(self._last_end - self._start)
            if len(self.times) % 5 == 0:  # an interrupted run still leaves its numbers so far
                self.on_train_end(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        import statistics

        import torch

        steady = self.times[self.warmup:] or self.times
        waits = self.waits[self.warmup:] or self.waits
        samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size  # all ranks
        median = statistics.median(steady) if steady else None
        wait = statistics.median(waits) if waits else None
        stats = {
            "steps_timed": len(self.times),
            "warmup_seconds": round(sum(self.times[: self.warmup]), 3),
            "median_step_seconds": round(median, 4) if median else None,
            "max_over_median": round(max(steady) / median, 3) if median else None,
            "median_data_wait_seconds": round(wait, 4) if wait is not None else None,
            "data_share": round(wait / (wait + median), 4) if median and wait is not None else None,
            "samples_per_step": samples,
            "micro_batch": args.per_device_train_batch_size,
            "world_size": args.world_size,
            "samples_per_second": round(samples / median, 3) if median else None,
            # The rate an epoch runs at: batches of different shapes differ in cost, so the median alone flatters.
            "samples_per_second_all_steps": round(samples * len(steady) / sum(steady), 3) if median else None,
            "step_seconds": [round(t, 3) for t in self.times],
            "train_seconds": round(time.perf_counter() - self._train_start, 2) if self._train_start else None,
            "dataloader_num_workers": args.dataloader_num_workers,
            "checkpointed_layers": self.checkpointed,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        }
        stats["compile_cache"] = compile_cache_counts()
        if torch.cuda.is_available():
            stats["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            stats["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
            if args.world_size > 1:  # every rank calls this at the same steps: one gather, each GPU's peak
                from .distributed import current, gather_in_order

                ranks = current()
                stats["peak_reserved_gib_per_rank"] = gather_in_order([stats["peak_reserved_gib"]], [ranks.rank])
        if state.is_world_process_zero:  # keeps what the run wrote before (the memory fit, the warm-up)
            update_json(self.path, stats)


def compile_cache_counts() -> dict:
    """torch.compile's cache hits and misses in this process (FX graphs, AOT autograd), and where the cache is:
    a second run of the same shapes should hit, not compile again."""
    from torch._dynamo.utils import counters

    inductor, aot = counters.get("inductor", {}), counters.get("aot_autograd", {})
    return {"fxgraph_hits": int(inductor.get("fxgraph_cache_hit", 0)),
            "fxgraph_misses": int(inductor.get("fxgraph_cache_miss", 0)),
            "autograd_hits": int(aot.get("autograd_cache_hit", 0)),
            "autograd_misses": int(aot.get("autograd_cache_miss", 0)),
            "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


def compile_seconds() -> dict[str, float]:
    """Seconds torch.compile has spent in this process so far, by phase, as dynamo accounts them (the whole
    `_compile.compile_inner`; within it `bytecode_tracing`, `build_guards`, `OutputGraph.call_user_compiler` for
    AOT autograd and inductor, ...). Empty where this torch does not keep the account."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
        return {name: float(value) for name, value in zip(names, values)}
    except Exception:  # a private API: its absence or a change of shape must never stop a run
        return {}


def compile_seconds_since(before: dict[str, float], at_least: float = 0.05) -> dict[str, float]:
    """The phases that took at least `at_least` seconds since `before` (a `compile_seconds()`), longest first."""
    spent = {name: value - before.get(name, 0.0) for name, value in compile_seconds().items()}
    return {name: round(value, 2) for name, value in sorted(spent.items(), key=lambda kv: -kv[1]) if value >= at_least}


class WarmUpCallback(TrainerCallback):
    """Runs `warm_up_shapes` at the start of Trainer.train, once the trainer has set the model up for training.

    Not before train(): Unsloth drops every torch.compile graph when it finds that a forward with
    gradients ran before train() (a graph compiled outside training can poison training's gradients), so
    a warm-up there compiles twice. Seen on the 14B shape: a 41 s warm-up, then a 25 s first step. Here
    the graphs and kernel plans it makes are the ones training uses. It runs before StepStatsCallback
    starts its clock, and records its result in the same train_stats.json.
    """

    def __init__(self, trainer, dataset, stats_path: Path | None):
        self.trainer, self.dataset, self.stats_path = trainer, dataset, stats_path
        self.result: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.result = warm_up_shapes(self.trainer, self.dataset)
        if self.stats_path and state.is_world_process_zero:
            update_json(self.stats_path, {"shape_warmup": self.result})


class WarmUpParts:
    """Where the seconds before the first training step go (train_stats.json "warm_up_parts"): adding the adapters,
    building the trainer, the memory plan, the shape warm-up, and the rest of Trainer.train outside its steps (its
    set-up before them, e.g. the optimizer, and its wind-down after). Each `lap(name)` ends the part it names."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now

    def record(self, steps_seconds: float, shape_warm_up_seconds: float) -> dict:
        """The parts in seconds; `lap("train_call")` must have timed the whole Trainer.train call, whose
        `steps_seconds` (StepStatsCallback's train_seconds) and shape warm-up are taken out of it."""
        record = {name: round(seconds, 2) for name, seconds in self.seconds.items() if name != "train_call"}
        record["shape_warm_up"] = round(shape_warm_up_seconds, 2)
        outside_steps = self.seconds["train_call"] - steps_seconds - shape_warm_up_seconds
        record["trainer_outside_steps"] = round(max(outside_steps, 0.0), 2)
        return record


def warm_up_when_training_starts(trainer, dataset) -> WarmUpCallback:
    """Have `trainer.train()` begin with `warm_up_shapes` (before the step clock starts)."""
    callbacks = trainer.callback_handler.callbacks
    stats = next((c for c in callbacks if isinstance(c, StepStatsCallback)), None)
    callback = WarmUpCallback(trainer, dataset, stats.path if stats else None)
    # Callbacks run in list order: insert before the step statistics, so warm-up time is not training time.
    callbacks.insert(callbacks.index(stats) if stats else len(callbacks), callback)
    return callback


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


def _remove_incomplete_checkpoints(run_dir: Path) -> None:
    for folder in Path(run_dir).glob("checkpoint-*"):
        if folder.is_dir() and not (folder / "trainer_state.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # never resumed from; frees what it took


def disk_full_error(run_dir: str | Path, what: str):
    """The error for a disk that filled while training wrote `what`: the cut-off checkpoint is removed, the last
    complete one named, with the space a checkpoint takes (the last one's size)."""
    from .disk import disk_full_message, folder_bytes
    from .errors import DiskFullError

    _remove_incomplete_checkpoints(Path(run_dir))
    checkpoint = last_checkpoint(run_dir)
    needed = folder_bytes(checkpoint) if checkpoint else None
    then = (f"; {checkpoint} is complete and intact: then continue from it with --resume --output_dir {run_dir}."
            if checkpoint else "; no checkpoint was completed, so start the run again after freeing space.")
    return DiskFullError(disk_full_message(run_dir, what, needed) + then)


def save_adapter(model, processor, run_dir: Path, info: dict) -> Path:
    """<run>/adapter, written into a hidden sibling and renamed when complete: a full disk never leaves an
    adapter folder that looks complete, and an older adapter there stays until the new one is whole."""
    from .disk import is_disk_full

    adapter_dir, partial = run_dir / "adapter", run_dir / ".adapter.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
        (partial / "unsloth_med.json").write_text(json.dumps(info, indent=1))
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if is_disk_full(exc, run_dir):
            raise disk_full_error(run_dir, "the trained adapter") from exc
        raise
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(partial, adapter_dir)
    return adapter_dir


def _sft_trainer_class():
    from transformers import Trainer
    from trl import SFTTrainer

    class VisionSFTTrainer(SFTTrainer):
        """SFTTrainer that also trains on a CPU, and batches bucketed images by shape.

        TRL 1.15 computes the loss with a Triton kernel (chunked log-probs over the LM head), and Triton has no
        CPU backend: on a machine without a GPU it fails with "0 active drivers". Off the GPU we take the
        model's own cross-entropy over the same -100-masked labels, which is what the kernel computes.
        """

        def _get_train_sampler(self, train_dataset=None):
            # Length grouping over bucketed images (the GPU default): every micro-batch one image shape, exactly.
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy == "group_by_length" and \
                    "image_shape" in getattr(dataset, "column_names", []):
                from .data.batching import SameShapeSampler

                return SameShapeSampler(dataset["image_shape"][:], self._train_batch_size, seed=self.args.seed,
                                        world_size=self.args.world_size)
            return super()._get_train_sampler(train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if next(model.parameters()).device.type in ("cuda", "xpu"):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return VisionSFTTrainer


def build_trainer(model, processor, train_dataset, collator, training_args, run_dir: Path):
    from .secrets import take_hub_token

    # The trainer pickles its arguments into each checkpoint (training_args.bin): no token may be in them. The CLI
    # takes --hub_token out when it parses the options; this covers a config built any other way.
    take_hub_token(training_args)
    if training_args.train_sampling_strategy in ("group_by_length", "batch_rebalance") and \
            "length" not in getattr(train_dataset, "column_names", []):
        from .errors import ConfigError

        raise ConfigError(f"train_sampling_strategy={training_args.train_sampling_strategy} needs a 'length' column: "
                          "prepare the images first (data.prepare.prepare_images), or use 'random'.")
    trainer = _sft_trainer_class()(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[JsonlLogCallback(run_dir / "train_log.jsonl"), StepStatsCallback(run_dir / "train_stats.json"),
                   ProgressLineCallback()],
    )
    # Our progress line replaces transformers' bar and its raw dict printing (the dicts are in train_log.jsonl).
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer


class EagerTraining(TrainerCallback):
    """Runs the training loop (the shape warm-up included) with torch.compile'd functions as plain Python.

    Set when the loop starts, not around Trainer.train: Unsloth's train() calls its `for_training`, which sets
    torch's compiler stance back to "default" (unsloth/models/vision.py, 2026.10), and it did so on the 14B shape
    (the warm-up still compiled for 13 s). Inserted first, so every later callback runs eager too."""

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        torch.compiler.set_stance("force_eager")  # train() sets it back, after a failure too


def train(trainer, *, resume_from: str | None = None, compiled: bool = True) -> list[dict]:
    """Run training (from a checkpoint if given); returns the trainer's log history. `compiled=False` runs every
    torch.compile'd function as plain Python (torch >= 2.6; an older torch traces as usual)."""
    import torch

    from .models.stance import can_run_eager

    if resume_from is not None and _load_if_finished(trainer, resume_from):
        return list(trainer.state.log_history)
    eager = not compiled and can_run_eager()
    if eager:
        trainer.callback_handler.callbacks.insert(0, EagerTraining())
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        if eager:  # also after a failure: evaluation and export choose their own stance
            torch.compiler.set_stance("default")
    return list(trainer.state.log_history)


def _steps_planned(trainer) -> int | None:
    """The optimizer step this training ends at (--max_steps, else the epochs' steps); None where it cannot tell."""
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    try:  # the Trainer's own count for epoch-based training
        return int(trainer.set_initial_training_values(args, trainer.get_train_dataloader())[-1])
    except Exception:  # noqa: BLE001 - then training runs as the Trainer decides
        return None


def _load_if_finished(trainer, checkpoint: str) -> bool:
    """Load a checkpoint that already holds all the steps this run trains, instead of training from it.

    Trainer.train resumed from the final checkpoint of a --max_steps run (a run interrupted in evaluation or export,
    then --resume) takes one more optimizer step past max_steps before it checks that it is done (transformers
    5.17, whenever max_steps is not a whole number of epochs): "step 31/30", checkpoint-31, and with a learning
    rate that has not decayed to 0 other weights than the run trained."""
    from transformers.trainer_callback import TrainerState

    state_file = Path(checkpoint) / "trainer_state.json"
    step, planned = TrainerState.load_from_json(str(state_file)).global_step, _steps_planned(trainer)
    if planned is None or step < planned:
        return False
    message = (f"{checkpoint} already holds step {step} of the {planned} this run trains: loading it, not training "
               "again.")
    log.warning(message)
    trainer._load_from_checkpoint(checkpoint)  # what Trainer.train loads from it before its first step
    trainer.state = TrainerState.load_from_json(str(state_file))
    return True


def fit_micro_batch(trainer, dataset, max_memory_gib: float) -> dict:
    """Cap GPU memory at max_memory_gib and use the largest micro-batch that fits, keeping the effective batch
    (memory_plan.plan_memory without changing which layers are checkpointed)."""
    from .memory_plan import plan_memory

    plan = plan_memory(trainer, dataset, max_memory_gib, f"--max_memory_gib {max_memory_gib:g}",
                       keep_activations=False)
    return {"max_memory_gib": max_memory_gib, "effective_batch": plan.effective_batch, "micro_batch": plan.micro_batch,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "micro_batches_tried": plan.micro_batches_tried, "probe_peak_allocated_gib": plan.probe_peak_allocated_gib}


def warm_up_shapes(trainer, dataset) -> dict:
    """One forward and backward for every kind of micro-batch the epoch holds, before the first training step:
    each image shape's full batches, the mixed batches of the shapes' remainders, the short last batch.

    A batch of a new kind (new image shapes, counts or batch size) pays for compilation and kernel planning
    (2-60 s on a 14B model; measured in benchmarks/README.md); done here, every training step after it runs
    at its steady speed, so step times, ETAs and throughput stay even. Gradients are zeroed afterwards and
    no optimizer step is taken, so training is exactly what it would have been. A run that ends within its first
    epoch (--max_steps, a quick trial) warms up only the kinds its steps meet. Needs the `image_shape` column that
    image preparation writes; without it, nothing is done.
    """
    import torch

    from .data.batching import batch_kind, describe_kind, one_batch_of_each_kind
    from .evaluate.inputs import Prefetch
    from .memory_plan import step_without_update

    if "image_shape" not in getattr(dataset, "column_names", []):
        return {"shapes": 0, "seconds": 0.0}
    args = trainer.args
    shapes = dataset["image_shape"][:]
    batch = trainer._train_batch_size or args.per_device_train_batch_size
    # Micro-batches of all ranks the run takes; a resumed run starts part-way, so it warms up every kind.
    planned = (args.max_steps * args.gradient_accumulation_steps * args.world_size
               if args.max_steps > 0 and trainer.state.global_step == 0 else None)
    # The sampler's own order (SameShapeSampler, seeded by args.seed), so the kinds are the epoch's kinds.
    batches = one_batch_of_each_kind(shapes, batch, args.seed, args.world_size, max_batches=planned)
    short = len(dataset) % batch
    compiled_before = compile_seconds()
    started = time.perf_counter()
    seconds = {}

    # On a GPU the next kind's batch is read and collated on the CPU while the GPU runs this one, as the data
    # loader's workers do in training (0.12 s a batch on the 14B shape's processor, cProfile on an H200).
    feed = Prefetch(batches, lambda indices: trainer.data_collator([dataset[i] for i in indices]),
                    ahead=1 if torch.cuda.is_available() else 0)
    for indices, inputs in feed:
        t0 = time.perf_counter()
        step_without_update(trainer, None, collated=inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds[describe_kind(batch_kind([shapes[i] for i in indices]))] = round(time.perf_counter() - t0, 2)
    distinct = len(set(shapes))
    log.info("warmed up %d kinds of micro-batch (%d image shapes) in %.1f s",
             len(batches), distinct, time.perf_counter() - started)
    return {"shapes": distinct, "batch_kinds": len(batches), "micro_batch": batch,
            "last_batch": short or None, "within_steps": args.max_steps if planned else None,
            "seconds": round(time.perf_counter() - started, 2),
            "seconds_per_batch_kind": seconds,
            # Where a warm-up's seconds go with a warm compile cache (the 14B shape's first kind: 25 s, issue 15).
            "compile_seconds": compile_seconds_since(compiled_before)}
