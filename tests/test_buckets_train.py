"""Aspect-ratio buckets from the images to the loss: each image trains at its bucket's size, batches never mix sizes,
class images come in the same sizes, resume stays exact, SDXL's time ids follow each view, the planner plans for the
largest bucket; bucketing off is today's square pipeline bit for bit. Tiny models at 32 px, bucket step 8."""
from __future__ import annotations

import hashlib
import queue
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import stop_and_resume, tiny_config
from PIL import Image

from core import buckets
from core.batches import BucketBatches
from core.class_images import class_dir_for
from core.config import Config
from core.data import ImageSet, load_rgb, resize_to_cover, scan_folder, to_tensor
from core.events import STOP, Finished, Log, Progress
from core.models import build_tiny_model
from core.trainer import TrainData, batch_indices, train
from core.vram import plan

BUCKETS = {"bucket_step": 8}  # at 32 px: 32x32, 40x24, 24x40, 64x16, 16x64


def noise_image(path, width, height, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def mixed_dir(tmp_path):
    """Two portraits, a square and a landscape photo: buckets 24x40 (2), 32x32 (1), 40x24 (1)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, (w, h) in enumerate([(300, 500), (310, 520), (64, 64), (500, 300)]):
        noise_image(folder / f"p{i}.png", w, h, i)
    return folder


def run(cfg_dict, **kw):
    events = []
    run_dir = train(Config.from_dict(cfg_dict), emit=events.append, **kw)
    return run_dir, events


class UNetSpy:
    """Records the latent shape and time ids of every training forward pass."""

    def __init__(self, monkeypatch, base):
        self.shapes, self.time_ids = [], []
        forward = base.unet.forward

        def spy(sample, *args, **kwargs):
            if torch.is_grad_enabled():
                self.shapes.append(tuple(sample.shape))
                if "added_cond_kwargs" in kwargs:
                    self.time_ids.append(kwargs["added_cond_kwargs"]["time_ids"].detach().clone())
            return forward(sample, *args, **kwargs)

        monkeypatch.setattr(base.unet, "forward", spy)


# ---------------------------------------------------------------------------------------------- bucketing off


# sha256 (first 16 hex digits) of each training tensor of the square pipeline before buckets existed, at 32 px:
# centre crops without flips, then random crops with flips (generator seeded by the image index)
SQUARE_TODAY = ["f1bac787985fa65d", "6effc17dd022c13b", "0b24110917bde6c6", "b2b79198b284d243",
                "c13a1ffbb9b1f90e", "bc4316a423d4e3a6", "0b24110917bde6c6", "c658285b3952121f"]


def square_hashes(folder, buckets_of=None):
    items = scan_folder(folder, min_size=8).images
    out = []
    for flip, center in ((False, True), (True, False)):
        images = ImageSet(items, ["p"] * len(items), 32, center, flip, buckets_of(items) if buckets_of else None)
        for i in range(len(images)):
            tensor, _, _ = images.sample(i, torch.Generator().manual_seed(i))
            out.append(hashlib.sha256(tensor.numpy().tobytes()).hexdigest()[:16])
    return out


def test_bucketing_off_is_todays_square_pipeline_bit_for_bit(tmp_path):
    for name, (w, h) in {"a": (300, 500), "b": (517, 389), "c": (40, 40), "d": (57, 203)}.items():
        noise_image(tmp_path / f"{name}.png", w, h, sum(map(ord, name)))
    assert square_hashes(tmp_path) == SQUARE_TODAY
    off = Config.from_dict({"data": {"resolution": 32, "bucketing": False, **BUCKETS}}).data
    square_only = Config.from_dict({"data": {"resolution": 32}}).data  # step 64 at 32 px: the square alone
    for data in (off, square_only):
        sizes = lambda items: buckets.assign_for_settings([(i.width, i.height) for i in items], data)  # noqa: E731
        assert square_hashes(tmp_path, sizes) == SQUARE_TODAY


def test_one_size_keeps_todays_draws():
    """Images of one size are drawn image by image as before buckets (draws frozen from that code)."""
    class Sized:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    t = Config.from_dict({"train": {"batch_size": 2, "seed": 5}}).train
    data = TrainData(Sized(3), Sized(4), 2)
    assert [batch_indices(data, t, s, 0) for s in range(4)] == [
        {"instance": [1, 0], "class": [2, 3]}, {"instance": [2, 2], "class": [1, 0]},
        {"instance": [0, 1], "class": [1, 2]}, {"instance": [2, 0], "class": [0, 3]}]


def test_square_class_images_keep_todays_folder(tmp_path, instance_dir):
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir))
    assert class_dir_for(cfg, (32, 32)) == class_dir_for(cfg) and class_dir_for(cfg).name.endswith("-32")
    assert class_dir_for(cfg, (24, 40)) != class_dir_for(cfg) and class_dir_for(cfg, (24, 40)).name.endswith("-24x40")


# ---------------------------------------------------------------------------------------------- images


def test_a_portrait_photo_is_not_squared(tmp_path):
    path = noise_image(tmp_path / "portrait.png", 300, 500, 0)
    data = Config.from_dict({"data": {"resolution": 32, **BUCKETS}}).data
    assigned = buckets.assign_for_settings([(300, 500)], data)
    assert assigned == [(24, 40)]
    images = ImageSet(scan_folder(tmp_path).images, ["p"], 32, buckets=assigned)
    tensor, _, geometry = images.sample(0)
    assert tensor.shape == (3, 40, 24)
    assert geometry.original == (500, 300) and geometry.target == (40, 24) and geometry.crop == (0, 0)
    assert images.preview(0).size == (24, 40)
    # the whole photo is in view: the scaled image equals the crop
    assert torch.equal(tensor, to_tensor(resize_to_cover(load_rgb(path), (24, 40))))


# ---------------------------------------------------------------------------------------------- batches


def test_batches_never_mix_sizes_and_pair_class_images_of_their_bucket():
    inst = [(24, 40), (24, 40), (32, 32), (40, 24), (24, 40)]
    klass = [(24, 40), (32, 32), (40, 24), (24, 40)]
    plan_ = BucketBatches(inst, klass, repeats=2, batch_size=2, seed=3)
    again = BucketBatches(inst, klass, repeats=2, batch_size=2, seed=3)
    per_epoch = plan_.per_epoch
    assert per_epoch == 3 + 1 + 1  # 24x40: 6 draws in 3 batches; the others: 2 draws, one batch each
    seen = Counter()
    for number in range(per_epoch):
        picks = plan_.picks(number)
        assert picks == again.picks(number)  # a pure function of the seed and the batch's number
        assert len({inst[i] for i in picks["instance"]} | {klass[i] for i in picks["class"]}) == 1
        assert len(picks["class"]) == len(picks["instance"])
        seen.update(picks["instance"])
    assert seen == {i: 2 for i in range(len(inst))}  # an epoch shows each image `repeats` times
    other = BucketBatches(inst, klass, repeats=2, batch_size=2, seed=4)
    assert [plan_.picks(n) for n in range(10)] != [other.picks(n) for n in range(10)]
    with pytest.raises(ValueError):
        BucketBatches(inst, [(24, 40)], 1, 2, 3)  # a bucket without class images


def test_class_images_come_in_proportion_at_least_one_per_bucket():
    assert buckets.shares([((24, 40), 2), ((32, 32), 1), ((40, 24), 1)], 8) == {(24, 40): 4, (32, 32): 2, (40, 24): 2}
    assert buckets.shares([((24, 40), 9), ((40, 24), 1)], 4) == {(24, 40): 3, (40, 24): 1}
    assert sum(buckets.shares([((24, 40), 3), ((32, 32), 2), ((40, 24), 2)], 10).values()) == 10


def test_prior_preservation_in_buckets(tmp_path, mixed_dir, monkeypatch):
    """Class images are generated at the buckets the instance images use, in proportion; every batch is one size,
    its instance and class halves alike; the log counts the buckets."""
    cfg = tiny_config(tmp_path, mixed_dir, data={**BUCKETS, "num_class_images": 8},
                      train={"prior_preservation": True, "batch_size": 2, "max_steps": 6})
    base = build_tiny_model()
    spy = UNetSpy(monkeypatch, base)
    _, events = run(cfg, base=base)
    config = Config.from_dict(cfg)
    for size, n in {(24, 40): 4, (32, 32): 2, (40, 24): 2}.items():
        found = scan_folder(class_dir_for(config, size), min_size=8).images
        assert len(found) == n and all((i.width, i.height) == size for i in found)
    latents = {(h // 2, w // 2) for w, h in [(24, 40), (32, 32), (40, 24)]}  # the tiny VAE halves each side
    assert len(spy.shapes) == 6 and {s[2:] for s in spy.shapes} <= latents and len({s[2:] for s in spy.shapes}) > 1
    # batches of 2 instance + 2 class images, or 1 + 1 from a bucket of one image
    assert {s[0] for s in spy.shapes} <= {4, 2}
    logs = [e.message for e in events if isinstance(e, Log)]
    assert "Buckets: 24x40: 2 images, 32x32: 1 image, 40x24: 1 image; 32x32 has 1 image (batches of one); " \
           "40x24 has 1 image (batches of one)" in logs


def test_resume_matches_uninterrupted_run_with_buckets(tmp_path, mixed_dir):
    common = dict(data={**BUCKETS, "random_flip": True}, adapter={"dropout": 0.1},
                  train={"max_steps": 6, "checkpoint_every": 3, "batch_size": 2})
    r = stop_and_resume(lambda name: tiny_config(tmp_path, mixed_dir, output={"name": name}, **common), 4)
    assert [e.step for e in r.resumed_events if isinstance(e, Progress)] == [5, 6]
    assert [e for e in r.resumed_events if isinstance(e, Finished)][0].step == 6
    assert r.full.keys() == r.resumed.keys() and all(torch.equal(r.full[k], r.resumed[k]) for k in r.full)


# ---------------------------------------------------------------------------------------------- SDXL


def test_sdxl_time_ids_of_a_cropped_flipped_landscape_photo(tmp_path, monkeypatch):
    from core.families import get

    folder = tmp_path / "wide"
    folder.mkdir()
    path = noise_image(folder / "wide.png", 560, 300, 1)  # bucket 40x24, scaled to 45x24: 5 px of crop slack
    cfg = tiny_config(tmp_path, folder, model={"base": "tiny-sdxl"}, data={**BUCKETS, "center_crop": False,
                                                                           "random_flip": True},
                      train={"max_steps": 6})
    base = get("sdxl").build_tiny()
    spy = UNetSpy(monkeypatch, base)
    encoded = []
    encode = base.vae.encode
    monkeypatch.setattr(base.vae, "encode", lambda x, *a, **k: (encoded.append(x.detach().clone()), encode(x, *a, **k))[1])
    run(cfg, base=base)

    scaled = to_tensor(resize_to_cover(load_rgb(path), (40, 24)))
    assert scaled.shape == (3, 24, 45)
    ids = torch.cat(spy.time_ids)
    assert len(encoded) == len(ids) == 6
    flips, offsets = set(), set()
    for view, row in zip(encoded, ids):
        view = view[0].float()
        assert view.shape == (3, 24, 40)
        matches = [(left, flipped) for left in range(6) for flipped in (False, True)
                   if torch.allclose(torch.flip(view, [2]) if flipped else view, scaled[:, :, left:left + 40], atol=1e-5)]
        left, flipped = matches[0]
        x = 45 - (left + 40) if flipped else left  # a mirrored view's crop is counted from the other edge
        assert row.tolist() == [300, 560, 0, x, 24, 40]
        flips.add(flipped)
        offsets.add(left)
    assert flips == {False, True} and len(offsets) > 1  # both cases were seen


# ---------------------------------------------------------------------------------------------- planner


def test_planner_plans_for_the_largest_bucket():
    from core.vram import largest_bucket

    on = Config.from_dict({"model": {"base": "tiny"}, "data": {"resolution": 512}})
    off = Config.from_dict({"model": {"base": "tiny"}, "data": {"resolution": 512, "bucketing": False}})
    sizes = buckets.for_settings(on.data)
    largest = largest_bucket(sizes)
    assert largest == (704, 384) and largest[0] * largest[1] == max(w * h for w, h in sizes) > 512 * 512
    assert largest_bucket([(16, 64), (32, 32), (64, 16)]) == (64, 16)  # equal areas: the longest side, any order
    planned, square = plan(on), plan(off)
    assert "at 704x384, the largest bucket" in planned.text() and "largest bucket" not in square.text()
    assert planned.activations > square.activations


def test_a_stop_while_class_images_generate_stops_in_plain_words(tmp_path, mixed_dir):
    from core.errors import UserError

    commands = queue.Queue()
    commands.put(STOP)
    cfg = tiny_config(tmp_path, mixed_dir, data=BUCKETS, train={"prior_preservation": True})
    with pytest.raises(UserError, match="Stopped before training started"):
        train(Config.from_dict(cfg), commands=commands, base=build_tiny_model())
