"""What fits on the GPU: the memory budget, the micro-batch, and which layers recompute their activations.

A user who runs a recipe's defaults should get the speed the benchmarks measure, without reading them.
The levers, in the order they are settled (each one real training step, measured, never guessed):

1. **Budget**: `--max_memory_gib`, or else 92% of the GPU's memory (the rest is room for the CUDA context,
   cuBLAS workspaces and the allocator's fragmentation). Enforced with
   `torch.cuda.set_per_process_memory_fraction`, so every probe below is honest about it.
2. **Gradient checkpointing** (`--use_gradient_checkpointing auto`): kept on the GPU when the budget is at
   least 16 GiB (Unsloth's offload to CPU memory saves a little GPU memory and costs copies every step),
   offloaded below that.
3. **Micro-batch**: the effective batch (per_device_train_batch_size x gradient_accumulation_steps, a
   learning setting that never changes) in one micro-batch if it fits, else its largest divisor that does,
   the rest gradient accumulation. Larger micro-batches keep the GPU busy (at 2 images it idles 80% of a
   step: benchmarks/README.md).
4. **Unchecked layers**: checkpointing recomputes each layer's forward in the backward, a third of a LoRA
   step's arithmetic. Whatever the budget leaves after the micro-batch is spent keeping activations:
   every layer if all fit, else as many language layers as the measured per-layer cost allows.

The chosen settings, and why, are printed in one line and written to train_stats.json ("memory_plan").

The probes are real steps, and on the Ministral-3-14B shape they cost 27-52 s of every run (benchmarks/README.md).
Two things cut that cost:
- They run eager (`torch.compiler.set_stance("force_eager")`, torch >= 2.6). Unsloth throws away every graph compiled
  before Trainer.train (it resets dynamo's cache when it finds that a forward and backward ran before it), so a probe
  that traced paid for compilation nobody kept: a first quick trial's warm-up fell from 150.5 s to 82.8 s (issue 15).
  An eager step holds intermediates a compiled graph fuses away, so it errs on the safe side for compiled training
  (under 24 GiB: 22.05 GiB reserved eager against 19.58 traced, the same plan), and eager training (the quick
  presets') stayed below it too (55.0 GiB reserved against the probe's 64.5 on the H200).
- A plan is kept in the package's cache folder (`memory_plans/`), keyed by everything its probes measured (the
  model's configuration and adapters, the GPU, the budget, the effective batch, the longest samples, the library
  versions), and an identical later run applies it without probing. A run that then runs out of memory deletes it
  (pipeline.py), so the next run probes again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)

GiB = 2**30
#: Share of the GPU's memory a run may use when --max_memory_gib is not given.
DEFAULT_BUDGET_SHARE = 0.92
#: Below this budget (GiB) gradient checkpointing offloads activations to CPU memory (Unsloth's 'unsloth' mode).
OFFLOAD_BELOW_GIB = 16.0
#: Unchecked layers are planned to fill this share of the budget; the rest absorbs batches of other shapes.
FILL_SHARE = 0.85


def memory_budget(requested_gib: float | None, gpu_total_gib: float, gpu_name: str = "GPU") -> tuple[float, str]:
    """(budget in GiB, why): what the user asked for, or DEFAULT_BUDGET_SHARE of the GPU."""
    if requested_gib is not None and requested_gib <= 0:  # 0 was the default share, -8 an error after loading
        from .errors import ConfigError

        raise ConfigError(f"--max_memory_gib {requested_gib:g}: a budget in GiB above 0; leave it unset for "
                          f"{DEFAULT_BUDGET_SHARE:.0%} of the GPU.")
    if requested_gib:
        return float(requested_gib), f"--max_memory_gib {requested_gib:g}"
    budget = round(gpu_total_gib * DEFAULT_BUDGET_SHARE, 1)
    return budget, (f"{DEFAULT_BUDGET_SHARE:.0%} of the {gpu_name}'s {gpu_total_gib:.1f} GiB; "
                    "--max_memory_gib sets it (48 for an RTX A6000)")


def gpu_budget(requested_gib: float | None) -> tuple[float, str] | None:
    """The run's memory budget on this machine's GPU, or None without one (a CPU run keeps its configured batch)."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return memory_budget(requested_gib, props.total_memory / GiB, props.name)


def cap_gpu_memory(budget_gib: float) -> None:
    """Hold this process to `budget_gib` of the current GPU from now on (torch.cuda.set_per_process_memory_fraction:
    what models/folding.free_memory_bytes reads too). The cap limits what the allocator may reserve; memory it cached
    earlier (a previous run, a probe) would otherwise be reused beyond it, so the cache is emptied first."""
    import torch

    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GiB / total))


def checkpointing_mode(setting, budget_gib: float | None):
    """--use_gradient_checkpointing as the unsloth backend takes it, 'auto' resolved against the budget."""
    text = str(setting).strip().lower() if setting is not None else "auto"
    if text != "auto":
        return setting
    if budget_gib is None:  # no GPU budget known (CPU): the backend's own default
        return "unsloth"
    return "true" if budget_gib >= OFFLOAD_BELOW_GIB else "unsloth"


def micro_batch_candidates(effective: int, largest: int | None = None) -> list[int]:
    """Divisors of the effective batch up to `largest`, largest first: every one keeps the effective batch exact."""
    top = effective if largest is None else max(1, min(largest, effective))
    return [d for d in range(top, 0, -1) if effective % d == 0]


def layers_to_uncheck(budget_gib: float, checked_peak_gib: float, per_layer_gib: float, available: int,
                      fill_share: float = FILL_SHARE) -> int:
    """How many layers can keep their activations: the budget's fill share minus the all-checked peak, over
    the measured cost of one layer's activations; never more than `available`, never negative."""
    room = budget_gib * fill_share - checked_peak_gib
    if room <= 0 or available <= 0:
        return 0
    if per_layer_gib <= 0:
        return available
    return max(0, min(available, math.floor(room / per_layer_gib)))


@dataclass
class MemoryPlan:
    """What a run trains with, and why; recorded as train_stats.json["memory_plan"]."""
    budget_gib: float
    budget_reason: str
    effective_batch: int
    micro_batch: int
    gradient_accumulation_steps: int
    micro_batches_tried: list[int] = field(default_factory=list)
    max_micro_batch: int | None = None  # --max_micro_batch: the largest the plan was allowed to try
    checkpointing: str = "off"
    language_layers_unchecked: str = "0/0"
    vision_layers_unchecked: str = "0/0"
    probe_peak_reserved_gib: float | None = None
    probe_peak_allocated_gib: float | None = None
    probes: int = 0
    probes_eager: bool = False  # the probe steps ran without torch.compile's graphs (see the module's docstring)
    reused_from: str | None = None  # the stored plan an identical earlier run probed (then probes == 0)
    kept_layers: list = field(default_factory=list, repr=False, compare=False)  # modules; not recorded
    stored_at: str | None = None  # where this run kept it for identical later runs

    def record(self) -> dict:
        # Not dataclasses.asdict: it deep-copies every value, and kept_layers holds the model's own decoder layers
        # (all 64 on the 14B shape: 2 s and a transient copy of their weights, per call).
        return {f.name: list(value) if isinstance(value := getattr(self, f.name), list) else value
                for f in fields(self) if f.name != "kept_layers"}

    @classmethod
    def as_configured(cls, args, reason: str) -> "MemoryPlan":
        """No probing (no GPU): the configured micro-batch and accumulation, recorded the same way."""
        effective = args.per_device_train_batch_size * args.gradient_accumulation_steps
        return cls(budget_gib=0.0, budget_reason=reason, effective_batch=effective,
                   micro_batch=args.per_device_train_batch_size,
                   gradient_accumulation_steps=args.gradient_accumulation_steps,
                   checkpointing="on" if args.gradient_checkpointing else "off")

    def line(self) -> str:
        accumulation = (f" x {self.gradient_accumulation_steps} accumulation" if self.gradient_accumulation_steps > 1
                        else "")
        why = ("the whole effective batch fits" if self.micro_batch == self.effective_batch
               else f"the largest divisor of the effective batch {self.effective_batch} that fits")
        if self.max_micro_batch and self.micro_batch < self.effective_batch:
            why += f" within --max_micro_batch {self.max_micro_batch}"
        ckpt = {"off": "no gradient checkpointing", "on": "gradient checkpointing",
                "gpu": "gradient checkpointing on the GPU", "offload": "gradient checkpointing offloaded to CPU"}
        kept = ""
        if self.checkpointing != "off":
            kept = (f"; activations kept (not recomputed) for {self.language_layers_unchecked} language and "
                    f"{self.vision_layers_unchecked} vision layers")
        peak = f"; probe peak {self.probe_peak_reserved_gib:.1f} GiB" if self.probe_peak_reserved_gib else ""
        if self.reused_from:
            peak += f" (probed by an identical earlier run, not again: delete {self.reused_from} to re-probe)"
        if not self.budget_gib:
            return (f"Memory plan: {self.budget_reason}; micro-batch {self.micro_batch}{accumulation} as configured "
                    f"(effective batch {self.effective_batch}).")
        return (f"Memory plan: budget {self.budget_gib:g} GiB ({self.budget_reason}) -> micro-batch "
                f"{self.micro_batch}{accumulation} ({why}), {ckpt.get(self.checkpointing, self.checkpointing)}"
                f"{kept}{peak}.")


# ----------------------------------------------------------------------------- plans kept for identical runs
def plans_dir() -> Path:
    from .data.sources import cache_dir

    return cache_dir() / "memory_plans"


def plan_key(trainer, dataset, *, budget_gib: float, gpu: str, checkpointing: str, keep_activations: bool,
             eager_probes: bool = False, max_micro_batch: int | None = None) -> str | None:
    """A digest of everything the probes measured. Two runs with the same key probe the same steps on the same
    GPU under the same budget: the model's configuration (shape, quantization), the trainable parameters (the
    adapters), the effective batch and the lengths and image shapes of the longest samples (what the probes run),
    the checkpointing choice, and the versions of the libraries that compute the step.

    None (nothing kept, the run probes) for data without the `length` column (--preprocess_images false): the
    key could name neither the samples nor the image size they are collated at, so a plan probed on 32 px images
    would be reused at 1024 px and run out of memory in training."""
    import importlib.metadata

    args = trainer.args
    model = trainer.model
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps
    columns = getattr(dataset, "column_names", None) or []
    if "length" not in columns:
        return None
    lengths = dataset["length"][:]
    shapes = dataset["image_shape"][:] if "image_shape" in columns else [""] * len(lengths)
    longest = sorted(zip(lengths, map(str, shapes)), reverse=True)[:effective]
    versions = {}
    for package in ("torch", "transformers", "peft", "trl", "unsloth", "unsloth_zoo", "bitsandbytes"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    config = getattr(model, "config", None)
    key = {
        "model": type(model).__name__, "config": config.to_json_string() if config is not None else "",
        "trainable": [(name, tuple(p.shape)) for name, p in model.named_parameters() if p.requires_grad],
        "gpu": gpu, "budget_gib": budget_gib, "effective_batch": effective, "longest": longest,
        "max_seq_length": getattr(args, "max_length", None), "checkpointing": checkpointing,
        "keep_activations": keep_activations, "eager_probes": eager_probes, "versions": versions,
        **({"max_micro_batch": max_micro_batch} if max_micro_batch else {}),  # older kept plans keep their keys
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_stored_plan(key: str) -> tuple[dict, Path] | None:
    path = plans_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text())["plan"], path
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: probe (and store it again)
        return None


def store_plan(key: str, plan: "MemoryPlan") -> str | None:
    """Keep `plan` for identical later runs (written by rename: a reader never meets half a file)."""
    path = plans_dir() / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{time.time_ns()}.tmp")
        tmp.write_text(json.dumps({"plan": plan.record(), "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        tmp.replace(path)
    except OSError as exc:  # a read-only or full cache costs the next run its probes, never this run
        log.info("memory plan not kept for later runs (%s)", exc)
        return None
    return str(path)


def forget_plan(plan: dict | None) -> None:
    """Delete a kept plan that ran out of memory in training, so the next run probes again."""
    where = (plan or {}).get("reused_from") or (plan or {}).get("stored_at")
    if where:
        Path(where).unlink(missing_ok=True)


def apply_stored_plan(trainer, stored: dict, where: Path, language: list, vision: list) -> "MemoryPlan | None":
    """Train as a kept plan says: its micro-batch (the effective batch unchanged) and, of the checkpointed layers,
    the same last layers keeping their activations. None when it does not fit this model's layers or batch."""
    args = trainer.args
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps
    try:
        kept_language, n_language = (int(x) for x in stored["language_layers_unchecked"].split("/"))
        kept_vision, n_vision = (int(x) for x in stored["vision_layers_unchecked"].split("/"))
        micro = int(stored["micro_batch"])
    except (KeyError, ValueError, AttributeError):
        return None
    if (stored.get("effective_batch") != effective or micro < 1 or effective % micro
            or (n_language, n_vision) != (len(language), len(vision))):
        return None
    args.per_device_train_batch_size = micro
    args.gradient_accumulation_steps = effective // micro
    trainer._train_batch_size = args.train_batch_size
    _keep_last_layers(language, vision, kept_language, kept_vision)
    kept = [m for m in language + vision if not getattr(m, "gradient_checkpointing", True)]
    known = {k: v for k, v in stored.items() if k in MemoryPlan.__dataclass_fields__}
    return MemoryPlan(**{**known, "probes": 0, "reused_from": str(where), "stored_at": None, "kept_layers": kept})


# ----------------------------------------------------------------------------- on the GPU
def step_without_update(trainer, rows: list[dict] | None, *, eager: bool = False, collated: dict | None = None) -> None:
    """One real forward and backward (the trainer's own loss) on `rows`, no optimizer step, gradients cleared;
    `eager`: torch.compile'd functions run as plain Python (a torch without compiler stances traces as usual).
    `collated`: the rows already through the trainer's collator (then `rows` is not used)."""
    from .models.stance import eager_stance

    if not hasattr(trainer, "current_gradient_accumulation_steps"):  # set by Trainer.train; training_step reads it
        trainer.current_gradient_accumulation_steps = 1
    # No collective in a step of one rank alone: TRL gathers its token metrics across the ranks, and under DDP
    # a rank that ran out of memory (or probes one more size) would leave the others waiting in that gather.
    trainer.accelerator.gather_for_metrics = lambda value, **_: value
    # TRL's compute_loss (the GPU path) counts every step's tokens, entropy and token accuracy into what the first
    # logged step reports: a probe or warm-up step trains nothing and must not be counted.
    metrics = getattr(trainer, "_metrics", None)
    kept = {mode: {k: list(v) for k, v in values.items()} for mode, values in metrics.items()} \
        if isinstance(metrics, dict) else None
    tokens = getattr(trainer, "_total_train_tokens", None)
    try:
        with eager_stance(eager):
            trainer.training_step(trainer.model, collated if collated is not None else trainer.data_collator(rows))
    finally:
        del trainer.accelerator.gather_for_metrics
        trainer.model.zero_grad(set_to_none=True)
        if kept is not None:
            for mode, values in kept.items():
                metrics[mode].clear()
                metrics[mode].update(values)
        if tokens is not None:
            trainer._total_train_tokens = tokens


class _Prober:
    """Runs probe steps on the longest samples, with the optimizer's future state held in reserve."""

    def __init__(self, trainer, dataset, eager: bool):
        import torch

        self.torch, self.trainer, self.dataset, self.eager = torch, trainer, dataset, eager
        lengths = dataset["length"][:] if "length" in getattr(dataset, "column_names", []) else [0] * len(dataset)
        self.longest = sorted(range(len(dataset)), key=lambda i: -lengths[i])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        self.reserve_bytes = 8 * trainable  # AdamW's two fp32 moments, allocated at the first optimizer step
        self.count = 0

    def fits(self, batch_size: int) -> tuple[bool, float, float]:
        """(fits, peak reserved GiB, peak allocated GiB) of one training step at `batch_size`."""
        torch = self.torch
        self.count += 1
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        rows = [self.dataset[self.longest[i % len(self.longest)]] for i in range(batch_size)]
        try:
            reserve = torch.empty(self.reserve_bytes, dtype=torch.uint8, device="cuda")
            try:
                step_without_update(self.trainer, rows, eager=self.eager)
            finally:
                del reserve
        except Exception as exc:  # out of memory, as accelerate's batch-size finder recognises it (cuDNN, cuBLAS too)
            from accelerate.utils.memory import should_reduce_batch_size

            if not should_reduce_batch_size(exc):
                raise
            self.trainer.model.zero_grad(set_to_none=True)
            del exc
            import gc

            gc.collect()
            torch.cuda.empty_cache()
            return False, float("inf"), float("inf")
        return (True, torch.cuda.max_memory_reserved() / GiB, torch.cuda.max_memory_allocated() / GiB)


def _set_checked(layers: list, checked: bool) -> None:
    for layer in layers:
        layer.gradient_checkpointing = checked


def _keep_last_layers(language: list, vision: list, kept_language: int, kept_vision: int) -> None:
    """Checkpoint every layer except the last `kept_language` language and `kept_vision` vision layers."""
    _set_checked(language + vision, True)
    _set_checked(language[len(language) - kept_language:] if kept_language else [], False)
    _set_checked(vision[len(vision) - kept_vision:] if kept_vision else [], False)


def plan_memory(trainer, dataset, budget_gib: float, budget_reason: str, *, checkpointing: str = "gpu",
                keep_activations: bool = True, reuse: bool = True, eager_probes: bool | None = None,
                max_micro_batch: int | None = None) -> MemoryPlan:
    """Cap GPU memory at `budget_gib`, then settle the micro-batch and the unchecked layers by real probe steps,
    or (`reuse`, one process) apply the plan an identical earlier run probed, and keep a new one for later runs.

    Sets trainer.args.per_device_train_batch_size / gradient_accumulation_steps (their product unchanged) and
    each layer's `gradient_checkpointing` flag; returns the plan. Raises BackendError when not one sample fits.
    """
    import torch

    from .distributed import current as current_ranks
    from .errors import BackendError
    from .models.speedups import decoder_layers
    from .models.stance import can_run_eager

    if not torch.cuda.is_available():
        raise BackendError("--max_memory_gib caps GPU memory and needs a CUDA GPU; leave it unset on CPU.")
    ranks = current_ranks()
    args = trainer.args
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps
    in_use = torch.cuda.memory_allocated() / GiB
    if in_use >= budget_gib:
        raise BackendError(f"--max_memory_gib {budget_gib:g} is below the {in_use:.1f} GiB the model already "
                           "occupies on the GPU: raise the cap, or load in 4-bit / a smaller model.")
    cap_gpu_memory(budget_gib)
    if eager_probes is None:  # UNSLOTH_MED_PROBES_COMPILED=1 traces them: a side-by-side switch for benchmarks
        eager_probes = os.environ.get("UNSLOTH_MED_PROBES_COMPILED", "") != "1"
    eager_probes = bool(eager_probes and can_run_eager())
    prober = _Prober(trainer, dataset, eager_probes)
    language = [m for m in decoder_layers(trainer.model, "language") if getattr(m, "gradient_checkpointing", False)]
    vision = [m for m in decoder_layers(trainer.model, "vision") if getattr(m, "gradient_checkpointing", False)]
    key = None
    if reuse and ranks.world == 1:  # under DDP every rank probes its own GPU and all agree (ranks.min)
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        key = plan_key(trainer, dataset, budget_gib=budget_gib, gpu=f"{props.name} {props.total_memory}",
                       checkpointing=checkpointing, keep_activations=keep_activations, eager_probes=eager_probes,
                       max_micro_batch=max_micro_batch)
        stored = read_stored_plan(key) if key else None
        plan = apply_stored_plan(trainer, *stored, language, vision) if stored else None
        if plan is not None:  # the budget is part of the key: only the words saying why may differ
            plan.budget_reason = budget_reason
            log.info("%s", plan.line())
            return plan

    tried, micro, peak = [], 0, (None, None)
    for size in micro_batch_candidates(effective, max_micro_batch):
        tried.append(size)
        ok, reserved, allocated = prober.fits(size)
        if ok:
            micro, peak = size, (reserved, allocated)
            break
    micro = ranks.min(micro)  # under DDP every rank probes its own GPU; all train with what all can fit
    if micro == 0:
        raise BackendError(f"Not even one sample fits in --max_memory_gib {budget_gib:g}: lower --image_size, "
                           "load in 4-bit, or raise the cap.")
    args.per_device_train_batch_size = micro
    args.gradient_accumulation_steps = effective // micro
    trainer._train_batch_size = args.train_batch_size  # what Trainer's own auto_find_batch_size updates

    kept_language = kept_vision = 0
    if keep_activations and (language or vision):
        limit = budget_gib * FILL_SHARE
        _set_checked(language + vision, False)  # everything kept: the fastest, if it fits
        ok, reserved, allocated = prober.fits(micro)
        if ok and reserved <= limit:
            kept_language, kept_vision, peak = len(language), len(vision), (reserved, allocated)
        else:
            _set_checked(language + vision, True)
            sample = max(1, len(language) // 4)  # the cost of one layer's activations, measured on a quarter
            _set_checked(language[-sample:], False)
            ok, reserved_k, allocated_k = prober.fits(micro)
            per_layer = (reserved_k - peak[0]) / sample if ok else (limit - peak[0]) / sample
            n = layers_to_uncheck(budget_gib, peak[0], max(per_layer, 1e-3), len(language))
            while True:
                _set_checked(language, True)
                _set_checked(language[len(language) - n:] if n else [], False)
                ok, reserved_n, allocated_n = prober.fits(micro) if n else (True, *peak)
                if ok:
                    kept_language, peak = n, (reserved_n, allocated_n)
                    break
                n //= 2
        n_all = ranks.min(kept_language + kept_vision)
        if n_all < kept_language + kept_vision:  # another rank fits fewer: everyone keeps that many
            kept_vision = max(0, n_all - len(language))
            kept_language = min(kept_language, n_all)
            _keep_last_layers(language, vision, kept_language, kept_vision)
    torch.cuda.empty_cache()
    kept = [m for m in language + vision if not getattr(m, "gradient_checkpointing", True)]
    plan = MemoryPlan(
        budget_gib=budget_gib, budget_reason=budget_reason, effective_batch=effective, micro_batch=micro,
        gradient_accumulation_steps=effective // micro, micro_batches_tried=tried, max_micro_batch=max_micro_batch,
        checkpointing=checkpointing if (language or vision) else "off",
        language_layers_unchecked=f"{kept_language}/{len(language)}",
        vision_layers_unchecked=f"{kept_vision}/{len(vision)}",
        probe_peak_reserved_gib=round(peak[0], 2) if peak[0] is not None else None,
        probe_peak_allocated_gib=round(peak[1], 2) if peak[1] is not None else None,
        probes=prober.count, probes_eager=eager_probes, kept_layers=kept)
    if key:
        plan.stored_at = store_plan(key, plan)
    log.info("%s", plan.line())
    return plan


class KeepPlannedActivations(TrainerCallback):
    """Re-applies the plan's unchecked layers when Trainer.train starts.

    Unsloth's `for_training`, which its patched `train()` calls, turns checkpointing back on in every layer
    (seen on the 14B shape: 40/40 layers checkpointed in training after a plan that kept them all). Added as the
    first callback, so the shape warm-up and the step clock see the model as planned."""

    def __init__(self, layers: list):
        self.layers = layers

    def on_train_begin(self, args, state, control, **kwargs):
        _set_checked(self.layers, False)


def keep_planned_activations(trainer, plan: MemoryPlan) -> None:
    """Have trainer.train() keep the activations of the layers the plan chose (see KeepPlannedActivations)."""
    if not plan.kept_layers:
        return
    trainer.callback_handler.callbacks.insert(0, KeepPlannedActivations(plan.kept_layers))
