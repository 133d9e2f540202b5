"""Aspect-ratio buckets (core/buckets.py): the list, the assignment, the cover size."""
from __future__ import annotations

import math

import pytest

from core import buckets
from core.config import Config


@pytest.mark.parametrize("resolution,step", [(512, 64), (768, 64), (1024, 64), (64, 8)])
def test_bucket_list_properties(resolution, step):
    sizes = buckets.bucket_sizes(resolution, step)
    target = resolution * resolution
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % step == 0 and h % step == 0
        assert abs(w * h / target - 1) <= 0.05, (w, h)  # about the same pixels as the square
        assert (h, w) in sizes  # both orientations
        assert resolution // 2 <= min(w, h) and max(w, h) <= 2 * resolution
    ratios = [w / h for w, h in sizes]
    assert max(ratios) >= 3 and min(ratios) <= 1 / 3  # tall and wide shapes, not only near-squares
    assert len(set(sizes)) == len(sizes)


def test_side_limits_and_small_resolutions():
    sizes = buckets.bucket_sizes(512, 64, min_side=384, max_side=704)
    assert min(min(s) for s in sizes) >= 384 and max(max(s) for s in sizes) <= 704 and (384, 704) in sizes
    assert buckets.bucket_sizes(32, 64) == [(32, 32)]  # below one step: the square only


def test_assignment_picks_the_nearest_ratio():
    sizes = buckets.bucket_sizes(512)
    for w, h in [(300, 500), (500, 300), (1000, 1000), (1200, 1600), (4000, 1000), (768, 1024)]:
        chosen = buckets.nearest_bucket(w, h, sizes)
        best = min(abs(math.log(b[0] / b[1]) - math.log(w / h)) for b in sizes)
        assert abs(math.log(chosen[0] / chosen[1]) - math.log(w / h)) == pytest.approx(best)
    assert buckets.nearest_bucket(300, 500, sizes) == (384, 704)  # a portrait photo stays a portrait
    assert buckets.nearest_bucket(500, 300, sizes) == (704, 384)


def test_no_upscale_gives_small_images_their_own_size():
    sizes = buckets.bucket_sizes(512)
    assert buckets.assign([(300, 500)], sizes) == [(384, 704)]  # enlarged to cover
    assert buckets.assign([(300, 500)], sizes, no_upscale=True) == [(256, 448)]  # its own size, rounded down
    assert buckets.assign([(2000, 3000)], sizes, no_upscale=True) == [buckets.nearest_bucket(2000, 3000, sizes)]


def test_cover_size_covers_the_bucket_keeping_the_shape():
    for (w, h), b in [((300, 500), (384, 704)), ((1000, 600), (704, 384)), ((64, 64), (512, 512))]:
        cw, ch = buckets.cover_size(w, h, b)
        assert cw >= b[0] and ch >= b[1] and (cw == b[0] or ch == b[1])
        assert cw / ch == pytest.approx(w / h, rel=0.02)


def test_settings():
    on = Config.from_dict({"data": {"resolution": 512}}).data
    assert buckets.for_settings(on) == buckets.bucket_sizes(512)
    off = Config.from_dict({"data": {"resolution": 512, "bucketing": False}}).data
    assert buckets.for_settings(off) == [(512, 512)] and buckets.assign_for_settings([(300, 500)], off) == [(512, 512)]
    assert buckets.counts([(1, 2), (3, 4), (1, 2)]) == [((1, 2), 2), ((3, 4), 1)]
