"""Where a training step's time goes on the GPU: one step under torch.profiler, summarised.

Used by `unsloth-med bench --profile` (one bench step) and by a run's `--profile_step N` (optimizer step N of
training, written to <run>/profile_step.json): the share of the step the GPU spent in kernels, how many kernels it
launched, and the kernel time by kind (matmuls, attention, 4-bit dequantization, copies, the rest) and by name.
A GPU busy for most of a step is bound by its kernels; one idle for much of it waits on the CPU (Python, kernel
launches, synchronisations)."""
from __future__ import annotations

import logging
import re
import statistics
import time
from pathlib import Path

from transformers import TrainerCallback

from .disk import write_json

log = logging.getLogger(__name__)

#: Kinds of kernels, by name (first match wins). Matmuls: cuBLAS/cuBLASLt (nvjet, sm80/sm90 xmma GEMMs, cutlass);
#: attention: flash / cuDNN / memory-efficient SDPA; dequantization: bitsandbytes' NF4 kernels.
KINDS = (
    ("4-bit dequantize", re.compile(r"dequant", re.I)),
    ("optimizer", re.compile(r"optimizer|adam", re.I)),
    ("attention", re.compile(r"flash|fmha|sdpa|attention|mha_", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|cublas", re.I)),
    ("copy", re.compile(r"^Memcpy|^Memset|copy_kernel|CatArrayBatched", re.I)),
)
OTHER = "other (elementwise, norms, reductions)"


def kind_of(kernel: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(kernel)), OTHER)


def summarize(prof, wall: float, top: int = 12) -> dict:
    """A finished torch.profiler.profile of `wall` seconds: GPU kernel seconds, busy share, kernel launches,
    seconds by kind, the `top` kernels."""
    from torch.autograd import DeviceType

    # Only the device-side work (kernels, memcpy, memset): the CPU ops that launched it carry the same
    # time again, and so do GPU-side ranges of annotations such as "Optimizer.step#AdamW8bit.step"
    # (they share a CPU event's name). Summing those too would count time twice.
    averages = prof.key_averages()
    cpu_names = {e.key for e in averages if getattr(e, "device_type", None) != DeviceType.CUDA}
    events = [e for e in averages if getattr(e, "device_type", None) == DeviceType.CUDA and e.key not in cpu_names]

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

    busy = sum(device_us(e) for e in events) / 1e6
    cpu_ops = sum(e.count for e in averages if getattr(e, "device_type", None) != DeviceType.CUDA)
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + device_us(e) / 1e6
    ranked = sorted(events, key=device_us, reverse=True)[:top]
    return {"wall_s": round(wall, 4), "gpu_kernel_s": round(busy, 4),
            "gpu_busy_share": round(busy / wall, 4) if wall else None,
            "kernel_launches": int(sum(e.count for e in events)), "cpu_ops_recorded": int(cpu_ops),
            "kernel_seconds_by_kind": {k: round(v, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": e.key[:90], "kind": kind_of(e.key), "gpu_ms": round(device_us(e) / 1e3, 2),
                             "calls": e.count, "share": round(device_us(e) / 1e6 / wall, 4) if wall else None}
                            for e in ranked]}


def sync_gpu() -> None:
    """Wait for the GPU's queued work (step and profile timings end there); nothing on a CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _profiler():
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities)


def profile_call(run_step, top: int = 12) -> dict:
    """`run_step()` under torch.profiler, summarised (summarize)."""
    with _profiler() as prof:
        sync_gpu()
        started = time.perf_counter()
        run_step()
        sync_gpu()
        wall = time.perf_counter() - started
    return summarize(prof, wall, top)


class ProfileStepCallback(TrainerCallback):
    """Profiles optimizer step `step` (1-based, counted from this training's first step: a resumed run counts from
    where it resumed) and writes the summary to `path` as soon as that step ends, then again when training ends, with
    the median seconds of the steps it did not profile (the profiler slows the CPU side of the step it records:
    `gpu_kernel_s / median_unprofiled_step_s` is the fairer busy share)."""

    def __init__(self, path: Path, step: int):
        self.path, self.step = Path(path), int(step)
        self._seen = 0
        self._prof = self._started = None
        self.summary: dict | None = None
        self._times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._seen += 1
        sync_gpu()
        self._started = time.perf_counter()
        if self._seen == self.step:
            self._prof = _profiler()
            self._prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._started is None:
            return
        sync_gpu()
        wall = time.perf_counter() - self._started
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            # `step` counts this training's steps (a resumed run's first is 1); global_step is the run's.
            self.summary = {"step": self.step, "global_step": state.global_step,
                            "micro_batch": args.per_device_train_batch_size,
                            "gradient_accumulation_steps": args.gradient_accumulation_steps,
                            **summarize(self._prof, wall)}
            self._prof = None
            if state.is_world_process_zero:  # written now: a later step's failure keeps it; train end adds medians
                write_json(self.path, self.summary)
        else:
            self._times.append(wall)

    def close(self) -> None:
        """Stop the profiler if it still records: training failed inside the profiled step (out of memory, an
        interrupt), after which the Trainer calls no callback. What it recorded is dropped."""
        prof, self._prof = self._prof, None
        if prof is not None:
            try:
                prof.__exit__(None, None, None)
            except Exception as exc:  # noqa: BLE001 - the training error is the one to report
                log.debug("--profile_step: stopping the profiler after a failed step: %s", exc)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()  # training ended inside the profiled step: nothing to summarise
        if self.summary is None:
            if self._seen < self.step:
                log.warning("--profile_step %d: training took %d steps; no step was profiled.", self.step, self._seen)
            return
        steady = self._times[3:] or self._times  # the first steps meet new shapes (as StepStatsCallback)
        if steady:
            median = statistics.median(steady)
            self.summary["median_unprofiled_step_s"] = round(median, 4)
            self.summary["gpu_busy_share_of_median_step"] = round(min(self.summary["gpu_kernel_s"] / median, 1.0), 4)
        if state.is_world_process_zero:
            write_json(self.path, self.summary)
            kinds = ", ".join(f"{k} {v:.3f} s" for k, v in list(self.summary["kernel_seconds_by_kind"].items())[:4])
            log.info("Profile of step %d: GPU kernels %.3f s of the step's %.3f s (%d launches; %s) -> %s", self.step,
                     self.summary["gpu_kernel_s"], self.summary["wall_s"], self.summary["kernel_launches"], kinds,
                     self.path)
