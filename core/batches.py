"""Which images a batch trains on when the images are in several aspect-ratio buckets (core/buckets.py).

A batch is stacked into one tensor, so all its images have one size: batches are cut from one bucket at a time.
Every draw is a pure function of the seed and the batch's number, so a resumed run sees exactly the batches an
uninterrupted one would: epoch e shuffles each bucket's images (each `repeats` times) by (seed, e, bucket), cuts
them into batches of `batch_size` (a bucket's last batch may be smaller), and shuffles the epoch's batches by
(seed, e). Class images (prior preservation) are drawn per bucket in their own endless shuffled epochs, as many as
the instance images of the batch, so both halves of a batch have the same size.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .buckets import Size

_SEED_MASK = 0x7FFF_FFFF


def permutation(n: int, *key) -> list[int]:
    """A permutation of range(n), a pure function of `key` (ints and tuples of ints, whose hashes do not change
    between processes as strings' do)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(hash(key) & _SEED_MASK)).tolist()


def epoch_index(seed: int, k: int, n: int, salt) -> int:
    """The k-th draw of an endless sequence of shuffled epochs over n items (pure function of seed and k)."""
    epoch, pos = divmod(k, n)
    return permutation(n, seed, salt, epoch)[pos]


@dataclass(frozen=True)
class PlannedBatch:
    bucket: Size
    instance: tuple[int, ...]  # instance image indices
    class_draw: int  # the number of this bucket's class images drawn before this batch, over the whole run


class BucketBatches:
    """The batches of a run whose instance images are in several buckets (indices into the image sets)."""

    def __init__(self, instance_buckets: list[Size], class_buckets: list[Size] | None, repeats: int,
                 batch_size: int, seed: int):
        self.seed, self.repeats, self.batch_size = seed, repeats, batch_size
        self.members = members(instance_buckets)
        self.klass = members(class_buckets) if class_buckets is not None else None
        missing = [b for b in self.members if self.klass is not None and b not in self.klass]
        if missing:
            raise ValueError(f"no class images of the bucket sizes {missing}")
        self.per_epoch = sum(math.ceil(len(m) * repeats / batch_size) for m in self.members.values())

    @functools.lru_cache(maxsize=4)  # consecutive steps fall in the same epoch
    def epoch(self, e: int) -> tuple[PlannedBatch, ...]:
        batches = []
        for bucket, images in self.members.items():
            drawn = [images[i % len(images)] for i in permutation(len(images) * self.repeats, self.seed, 2, e, bucket)]
            batches += [(bucket, tuple(drawn[i:i + self.batch_size])) for i in range(0, len(drawn), self.batch_size)]
        order = [batches[i] for i in permutation(len(batches), self.seed, 3, e)]
        planned, seen = [], dict.fromkeys(self.members, 0)  # class images drawn per bucket so far this epoch
        for bucket, images in order:
            before = e * len(self.members[bucket]) * self.repeats + seen[bucket]
            planned.append(PlannedBatch(bucket, images, before))
            seen[bucket] += len(images)
        return tuple(planned)

    def batch(self, number: int) -> PlannedBatch:
        """The `number`-th batch of the run (numbered across steps, micro-steps and processes)."""
        e, pos = divmod(number, self.per_epoch)
        return self.epoch(e)[pos]

    def picks(self, number: int) -> dict[str, list[int]]:
        """{"instance": [...], "class": [...]} of batch `number`, as the trainer's `batch_indices` gives them."""
        b = self.batch(number)
        out = {"instance": list(b.instance)}
        if self.klass is not None:
            pool = self.klass[b.bucket]
            draws = range(b.class_draw, b.class_draw + len(b.instance))
            out["class"] = [pool[epoch_index(self.seed, k, len(pool), (1, b.bucket))] for k in draws]
        return out


def members(assigned: list[Size]) -> dict[Size, list[int]]:
    """bucket -> the indices of its images, buckets in a fixed order (by size)."""
    out: dict[Size, list[int]] = {}
    for i, bucket in enumerate(assigned):
        out.setdefault(bucket, []).append(i)
    return dict(sorted(out.items()))
