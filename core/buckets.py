"""Aspect-ratio buckets: training sizes of about the same pixel area in several shapes, so a portrait photo trains
as a portrait instead of losing its head and feet to a square crop (kohya's sd-scripts, OneTrainer and ai-toolkit
do the same).

A bucket is a (width, height) in pixels, each side a multiple of `step` (64 for Stable Diffusion: the VAE divides
by 8 and the UNet halves the latents three more times). Each image goes to the bucket nearest its aspect ratio, is
scaled to cover it and cropped to it. Pure functions of sizes: no images are read here.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

Size = tuple[int, int]  # (width, height) in pixels

STEP = 64


def bucket_sizes(resolution: int, step: int = STEP, min_side: int = 0, max_side: int = 0) -> list[Size]:
    """Every (width, height) with sides multiples of `step` between `min_side` and `max_side` (0: half and twice
    the resolution) whose area is the closest such shape to resolution², in both orientations, squarest first.

    For each shorter side the longer one is the multiple of `step` nearest resolution² / shorter, so every area
    lies within about step / (2 * shorter side) of the target (a few percent at SD sizes); a shape whose longer
    side would pass `max_side` is left out.
    """
    if resolution < step:
        return [(resolution, resolution)]
    area = resolution * resolution
    low = max(step, min_side or _round_to(resolution // 2, step))
    high = max(low, max_side or resolution * 2)
    sizes: set[Size] = {(_round_to(resolution, step),) * 2}
    for short in range(_round_to(low, step), resolution + 1, step):  # each shape by its shorter side
        long = _round_to(area / short, step)
        if short <= long <= high:
            sizes |= {(short, long), (long, short)}
    return sorted(sizes, key=squarest_first)


def squarest_first(size: Size) -> tuple:
    """Sort key: the squarest shape first, a landscape before its portrait (so every order of ties is fixed)."""
    return round(abs(math.log(size[0] / size[1])), 9), size[0] < size[1], size


def _round_to(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (on a log scale: 2:1 and 1:2 are equally far from 1:1);
    ties go to the squarer bucket (the list's order)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def own_size_bucket(width: int, height: int, step: int = STEP) -> Size:
    """A bucket no larger than the image itself: its sides rounded down to multiples of `step` (for "never
    upscale": a small image trains at its own size instead of being enlarged)."""
    return max(step, width // step * step), max(step, height // step * step)


def assign(sizes: Iterable[Size], buckets: Sequence[Size], no_upscale: bool = False, step: int = STEP) -> list[Size]:
    """The bucket of each image (width, height). With `no_upscale`, an image smaller than its bucket (it would have
    to be enlarged to cover it) gets a bucket of its own size instead, as large as it fills."""
    out = []
    for width, height in sizes:
        bucket = nearest_bucket(width, height, buckets)
        if no_upscale and (width < bucket[0] or height < bucket[1]):
            own = own_size_bucket(width, height, step)
            bucket = own if own[0] * own[1] < bucket[0] * bucket[1] else bucket
        out.append(bucket)
    return out


def cover_size(width: int, height: int, bucket: Size) -> Size:
    """The size an image is scaled to so that it covers `bucket` exactly on one side and at least on the other."""
    # Which side is tight is decided in integers, and the other is scaled as width * side / height: a square bucket
    # then gives exactly the shorter-side resize of the square pipeline (core/data.py resize_shorter_side).
    if bucket[0] * height >= bucket[1] * width:  # the width is the tight side
        return bucket[0], max(bucket[1], round(height * bucket[0] / width))
    return max(bucket[0], round(width * bucket[1] / height)), bucket[1]


def counts(assigned: Iterable[Size]) -> list[tuple[Size, int]]:
    """(bucket, number of images) for the buckets in use, the fullest first."""
    return Counter(assigned).most_common()


def describe(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def for_settings(data) -> list[Size]:
    """The bucket list of a config's `data` section (bucketing off: the one square)."""
    if not data.bucketing:
        return [(data.resolution, data.resolution)]
    return bucket_sizes(data.resolution, data.bucket_step, data.bucket_min_side, data.bucket_max_side)


def assign_for_settings(sizes: Iterable[Size], data) -> list[Size]:
    """The bucket of each image (width, height) under a config's `data` section."""
    return assign(sizes, for_settings(data), data.bucketing and data.bucket_no_upscale, data.bucket_step)


def shares(used: Sequence[tuple[Size, int]], total: int) -> dict[Size, int]:
    """How many of `total` items (class images) each used bucket gets: in proportion to its images (largest
    remainders round up), at least one each, so every batch finds partners of its own size."""
    images = sum(n for _, n in used)
    exact = {bucket: total * n / images for bucket, n in used}
    out = {bucket: max(1, int(x)) for bucket, x in exact.items()}
    by_remainder = sorted(exact, key=lambda b: (int(exact[b]) - exact[b], b))
    for bucket in by_remainder[:max(0, total - sum(out.values()))]:
        out[bucket] += 1
    return out


def summary(assigned: Iterable[Size], batch_size: int = 1, repeats: int = 1) -> str:
    """One line for the log, e.g. 'Buckets: 512x512: 3 images, 384x704: 2 images; 704x384 has 1 image (batches of
    one)': the buckets whose images cannot fill a batch are pointed out."""
    used = counts(assigned)
    line = "Buckets: " + ", ".join(f"{describe(b)}: {n} image{'' if n == 1 else 's'}" for b, n in used)
    small = [f"{describe(b)} has {n} image{'' if n == 1 else 's'} (batches of {_number(n * repeats)})"
             for b, n in used if n * repeats < batch_size]
    return "; ".join([line, *small])


def _number(n: int) -> str:
    return "one" if n == 1 else str(n)


def most_common(assigned: Iterable[Size]) -> Size:
    """The bucket holding the most images; ties go to the squarer one (then landscape), so the same dataset always
    gives the same answer whatever the order of its files."""
    tally = Counter(assigned)
    if not tally:
        raise ValueError("no images to choose a bucket from")
    return min(tally, key=lambda size: (-tally[size], squarest_first(size)))


def sample_size(sizes: Iterable[Size], data) -> Size:
    """The (width, height) of previews for a dataset of images (width, height): its most common bucket, so samples
    come out in the dataset's shape (bucketing off: the training square)."""
    return most_common(assign_for_settings(sizes, data))


def lonely(assigned: Iterable[Size]) -> list[Size]:
    """The buckets holding a single image, when more than one bucket is in use: such an image always trains in a
    batch of its own (batches never mix sizes)."""
    tally = counts(assigned)
    return [size for size, n in tally if n == 1] if len(tally) > 1 else []


def counts_text(assigned: Iterable[Size]) -> str:
    """'512x512: 3, 384x704: 2': the images per bucket, the fullest first."""
    return ", ".join(f"{describe(size)}: {n}" for size, n in counts(assigned))


def reshaped(width: int, height: int, bucket: Size) -> bool:
    """Whether an image loses part of itself (a crop) or is enlarged on its way to `bucket`."""
    return cover_size(width, height, bucket) != tuple(bucket) or width < bucket[0] or height < bucket[1]
