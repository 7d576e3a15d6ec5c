"""More than one process (torchrun, accelerate launch): one process per GPU, PyTorch DDP through the Trainer.

Every rank runs the whole pipeline on the same data and the same config; what differs:
- rank 0 alone writes the run folder (config, run.json, logs, metrics, reports, adapter, export, Hub push);
  rank N logs to <run>/rankN.log and writes its side files (data summary, ...) into a scratch folder;
- image preparation and evaluation are split across the ranks and put back together in order;
- the Trainer shards the training batches (the same-shape order is cut so that the ranks of one step get
  one image shape: data/batching.py).

The process group is the one TrainingArguments starts (NCCL on GPUs, gloo on CPUs) with its `ddp_timeout`,
so a rank that stops without failing is noticed after that long at the latest. A rank that fails says which
rank and why (in its log and on stderr) and exits; torchrun then ends the other ranks at once, and under
other launchers the others fail at their next collective (gloo notices the closed connection at once,
NCCL after ddp_timeout).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UnslothMedError

log = logging.getLogger("unsloth_med")


class MainRankFailed(UnslothMedError):
    """Rank 0 failed at a step the other ranks wait for (Ranks.after_main); they stop with its reason."""


def launched_world_size() -> int:
    """How many processes the launcher started (WORLD_SIZE, set by torchrun and accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's GPU on its host (LOCAL_RANK); 0 when not launched distributed."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def log_name(self) -> str:
        return "run.log" if self.is_main else f"rank{self.rank}.log"

    def barrier(self) -> None:
        if _dist():
            _dist().barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if not _dist():
            return value
        box = [value]
        _dist().broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list:
        """Every rank's `value`, in rank order, on every rank ([value] in a single process)."""
        if not _dist():
            return [value]
        values: list = [None] * self.world
        _dist().all_gather_object(values, value)
        return values

    def min(self, value: int) -> int:
        """The smallest `value` of all ranks (what every rank can afford)."""
        return min(self.gather(value))

    def main_first(self, fn, *args):
        """fn(*args) on rank 0, then on the other ranks (which then find what rank 0 made: a download, a cache).
        Where fn fails on rank 0 (a --model that does not exist), the others stop with its reason."""
        if self.is_main:
            try:
                result = fn(*args)
            except Exception as exc:
                self.after_main(exc)
                raise
            self.after_main(None)
            return result
        self.after_main(None)
        return fn(*args)

    def after_main(self, error: Exception | None) -> None:
        """Where the other ranks wait for a step of rank 0's (`error`: how it failed, on rank 0): a collective after
        which they stop with rank 0's reason when it failed. Waiting at a barrier, they stopped with gloo's
        'Connection closed by peer' traceback as if they had failed themselves (NCCL across hosts: after
        --ddp_timeout), and rank 0's reason was only on rank 0's host."""
        reason = self.broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if reason is not None and not self.is_main:
            raise MainRankFailed(f"rank 0 stopped, so this rank stops too. Rank 0's reason: {reason}")

    def share_then_all(self, fn, dataset, *args):
        """fn(dataset, *args) for a cached preparation: each rank first prepares its share of the rows, then
        every rank runs it on all rows (from the cache, which the ranks filled together)."""
        if self.world > 1:
            part = my_shard(dataset, 1, self)[0]
            if len(part):  # a split with fewer rows than ranks leaves some ranks nothing to prepare
                fn(part, *args)
            self.barrier()
        return fn(dataset, *args)

    def finish(self) -> None:
        """Leave the process group after the last collective: rank 0 then exports and reports alone."""
        if _dist():
            _dist().destroy_process_group()

    def files_dir(self, run_dir: Path) -> Path:
        """Where this rank writes its side files: the run folder on rank 0, a scratch folder elsewhere."""
        if self.is_main:
            return run_dir
        return Path(tempfile.mkdtemp(prefix=f"unsloth_med-rank{self.rank}-"))

    def report_failure(self, exc: BaseException) -> None:
        """Say which rank failed and why, in this rank's log and on stderr (the launcher ends the others)."""
        if isinstance(exc, MainRankFailed):  # not this rank's failure; said in its log, friendly() says it on stderr
            log.error("rank %d of %d: %s", self.rank, self.world, exc)
        elif self.world > 1 and not isinstance(exc, SystemExit):
            message = f"rank {self.rank} of {self.world} failed: {type(exc).__name__}: {exc}"
            log.error("%s", message)
            print(message, file=sys.stderr, flush=True)


def start(training_args) -> Ranks:
    """Join the launcher's process group (a no-op in a plain single process) and agree on the run folder.

    Each rank trains on its own GPU (LOCAL_RANK), and DDP is told that every trainable parameter gets a
    gradient in every step (no extra pass over the graph to look for unused ones, which also fails with
    checkpointed layers that run twice).
    """
    if launched_world_size() <= 1:
        return Ranks()
    from datetime import timedelta

    import torch
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    # TrainingArguments has already started (at parsing) the process group (backend, ddp_timeout) and accelerate's
    # state, which the Trainer shares. Without CUDA that state says "not distributed" (the CPU counts as distributed
    # only with use_cpu): each rank would then train alone on all the data. Made again as a CPU (gloo) state,
    # on the same process group.
    kwargs = dict(backend=training_args.ddp_backend, timeout=timedelta(seconds=training_args.ddp_timeout))
    if PartialState(cpu=not torch.cuda.is_available(), **kwargs).distributed_type == DistributedType.NO:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState(cpu=True, **kwargs)  # training_args.distributed_state is a view of this shared state
    dist = _dist()
    if dist is None:
        from .errors import ConfigError

        raise ConfigError(f"WORLD_SIZE={launched_world_size()} but no process group started: launch with torchrun or "
                          "accelerate launch, or unset WORLD_SIZE.")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False
    if training_args.gradient_checkpointing:  # reentrant checkpointing breaks DDP's gradient hooks
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False,
                                                       **(training_args.gradient_checkpointing_kwargs or {})}
    ranks = Ranks(rank=dist.get_rank(), world=dist.get_world_size())
    # The default output_dir holds a timestamp that each rank took on its own clock.
    training_args.output_dir = ranks.broadcast(training_args.output_dir)
    return ranks


def device_map() -> dict[str, int]:
    """Load the whole model on this process's own GPU ("auto" would spread one rank over all GPUs)."""
    return {"": local_rank()}


# ----------------------------------------------------------------------------- sharded work
def shard_indices(n: int, batch_size: int, ranks: Ranks) -> list[int]:
    """This rank's rows of range(n): whole batches of `batch_size`, every world-th batch.

    The batches are the ones a single process would make, so each row is computed in the same batch
    (same padding, same numbers) as in a single process, and the ranks get near-equal shares.
    """
    batch_size = max(1, batch_size)
    starts = range(ranks.rank * batch_size, n, ranks.world * batch_size)
    return [i for start in starts for i in range(start, min(start + batch_size, n))]


def my_shard(dataset, batch_size: int, ranks: Ranks | None = None):
    """(this rank's part of `dataset`, its row indices); the whole dataset in a single process."""
    ranks = ranks or current()
    if ranks.world == 1:
        return dataset, None
    indices = shard_indices(len(dataset), batch_size, ranks)
    part = dataset.select(indices) if hasattr(dataset, "select") else [dataset[i] for i in indices]
    return part, indices


def gather_in_order(items: list, indices: list[int] | None, ranks: Ranks | None = None) -> list:
    """Every rank's `items` (one per row of its shard, `indices` from `my_shard`) as one list in row order."""
    ranks = ranks or current()
    if indices is None or ranks.world == 1:
        return items
    parts: list = [None] * ranks.world
    _dist().all_gather_object(parts, (indices, items))
    placed = {i: item for part_indices, part_items in parts for i, item in zip(part_indices, part_items)}
    return [placed[i] for i in sorted(placed)]


def current() -> Ranks:
    """This process's rank and the world size, from the running process group."""
    dist = _dist()
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size()) if dist else Ranks()
