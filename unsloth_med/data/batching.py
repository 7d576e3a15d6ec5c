"""Micro-batches that hold one image shape each.

With image buckets every prepared image has one of a few shapes (`image_shape`, "WxH"). A micro-batch
of one shape needs no image padding, runs the vision tower as one real batch (models/speedups.py) and
repeats a shape the GPU has already seen, so nothing is compiled or planned again mid-training.
transformers' LengthGroupedSampler only sorts by length inside large random chunks, so its batches
straddle shapes at every chunk boundary; this order makes the grouping exact.

The order: each shape's samples shuffled and cut into full micro-batches; what is left of every shape
(fewer than a micro-batch each) is put together, by shape, into a few mixed batches; all the batches
shuffled; the one short batch, if the data does not divide evenly, last. A new seed per epoch.

With several ranks (DDP) the order is made for batches of micro-batch x world size: the data loader hands
the consecutive micro-batches of one such batch to the ranks of one step, so all ranks run one image
shape in a step (no rank compiles a shape while the others wait for it in the gradient all-reduce).
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence

import torch


def same_shape_order(shapes: Sequence[str], batch_size: int, seed: int) -> list[int]:
    """A permutation of range(len(shapes)) whose consecutive batch_size chunks hold one shape each,
    except the few chunks made of each shape's remainder."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(index)
    batches, remainder = [], []
    for shape in sorted(groups):
        members = groups[shape]
        rng.shuffle(members)
        full = len(members) - len(members) % batch_size
        batches += [members[i:i + batch_size] for i in range(0, full, batch_size)]
        remainder += members[full:]  # stays sorted by shape: a mixed batch spans as few shapes as possible
    batches += [remainder[i:i + batch_size] for i in range(0, len(remainder), batch_size)]
    short = batches.pop() if batches and len(batches[-1]) < batch_size else None
    rng.shuffle(batches)
    if short:  # the data loader cuts consecutive chunks: a short batch anywhere but last would shift the rest
        batches.append(short)
    return [index for batch in batches for index in batch]


def batch_kind(shapes: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """What a GPU compiles and plans kernels for: how many images of each shape a batch holds."""
    return tuple(sorted(Counter(shapes).items()))


def describe_kind(kind: tuple[tuple[str, int], ...]) -> str:
    return " + ".join(f"{count}x {shape}" for shape, count in kind)


def one_batch_of_each_kind(shapes: Sequence[str], batch_size: int, seed: int,
                           world_size: int = 1, max_batches: int | None = None) -> list[list[int]]:
    """The first batch of every kind (`batch_kind`) in the epoch `same_shape_order` gives, in epoch order:
    each shape's full batches, the mixed batches of the shapes' remainders and the short last batch.
    With `world_size` ranks, the micro-batches of every rank (`SameShapeSampler`), the same list on each.

    Which kinds an epoch holds does not depend on the seed (the remainders are each shape's count modulo
    the batch size, packed in shape order), so warming these up covers every epoch. `max_batches` (micro-batches
    of all ranks together) keeps only the kinds a run that stops within the first epoch meets, e.g. a quick trial
    that never reaches the short last batch.
    """
    order = same_shape_order(shapes, batch_size * world_size, seed)
    if max_batches is not None:
        order = order[:max_batches * batch_size]
    kinds: dict[tuple, list[int]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        kinds.setdefault(batch_kind([shapes[i] for i in batch]), batch)
    return list(kinds.values())


class SameShapeSampler(torch.utils.data.Sampler):
    """The training sampler for bucketed images: `same_shape_order`, reshuffled every epoch.

    `batch_size` is the micro-batch of one rank; the order is made for the step's micro-batches of all
    `world_size` ranks together, which accelerate's data loader then deals out (rank r: the r-th of each).
    """

    def __init__(self, shapes: Sequence[str], batch_size: int, seed: int = 0, world_size: int = 1):
        self.shapes, self.batch_size, self.seed, self.epoch = list(shapes), batch_size * world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by accelerate's data loader at every epoch
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(same_shape_order(self.shapes, self.batch_size, self.seed + self.epoch))

    def __len__(self) -> int:
        return len(self.shapes)
