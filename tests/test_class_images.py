"""Tests for core/class_images.py: generation with the tiny base model, manifest, resume, user images, cache folder.

The tiny model makes 32 px images in 2 sampler steps; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.class_images import (MANIFEST, class_dir_for, class_min_size, class_sets, ensure_class_images,
                                read_manifest)
from core.config import Config
from core.errors import DataError
from core.events import ClassImagesProgress, ClassImagesStep, Log
from core.models import build_tiny_model

PROMPT = "a photo of a dog"


@pytest.fixture(scope="module")
def model():
    # generation only reads the model, so one frozen tiny model serves every test here
    return build_tiny_model(seed=0).freeze()


def make_cfg(tmp_path: Path, folder: Path | None = None, **data) -> Config:
    values = {"class_prompt": PROMPT, "num_class_images": 5, "resolution": 32, "class_steps": 2,
              "class_batch_size": 2, "class_seed": 7, **data}
    if folder is not None:
        values["class_dir"] = str(folder)
    return Config.from_dict({"model": {"base": "tiny"}, "data": values,
                             "output": {"dir": str(tmp_path / "workspace" / "runs")}})


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".png")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(np.int16)


def stop_after(folder: Path, images: int):
    """A should_stop that asks to stop once `images` images are saved in `folder` (it is asked every step too)."""
    def should_stop() -> bool:
        return folder.is_dir() and len(pngs(folder)) >= images

    return should_stop


def user_image(path: Path, size: int = 40, colour=(10, 200, 30)) -> Path:
    Image.new("RGB", (size, size), colour).save(path)
    return path


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """An uninterrupted run of 5 images in batches of 2, made once for comparisons."""
    root = tmp_path_factory.mktemp("reference")
    folder = root / "class"
    events = []
    items = ensure_class_images(make_cfg(root, folder), model, emit=events.append)
    return folder, items, events


# ----------------------------------------------------------------------------- a fresh folder


def test_fresh_folder_gets_exactly_the_requested_images(reference):
    folder, items, _ = reference
    assert pngs(folder) == [f"class_{i:05d}.png" for i in range(5)]
    assert [i.path for i in items] == [folder / f"class_{i:05d}.png" for i in range(5)]
    assert all((i.width, i.height) == (32, 32) for i in items)
    assert sorted(os.listdir(folder)) == sorted([*pngs(folder), MANIFEST])  # no temp files left behind
    # the images are real pictures, not blank or all alike
    first = pixels(folder / "class_00000.png")
    assert first.std() > 1
    assert np.abs(first - pixels(folder / "class_00001.png")).max() > 10


def test_manifest_records_model_prompt_and_seed_per_image(reference):
    folder, _, _ = reference
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["model"] == "tiny" and manifest["prompt"] == PROMPT
    assert sorted(manifest["images"]) == pngs(folder)
    for i in range(5):
        record = manifest["images"][f"class_{i:05d}.png"]
        assert record["seed"] == 7 + i
        assert record["model"] == "tiny" and record["prompt"] == PROMPT and record["steps"] == 2
    # the PNG itself carries the same provenance
    with Image.open(folder / "class_00003.png") as img:
        assert img.text["seed"] == "10" and img.text["prompt"] == PROMPT


def test_progress_events(reference):
    folder, _, events = reference
    progress = [e for e in events if isinstance(e, ClassImagesProgress)]
    assert [(e.done, e.total) for e in progress] == [(2, 5), (4, 5), (5, 5)]
    assert [Path(p).name for e in progress for p in e.paths] == pngs(folder)
    assert all(Path(p).is_file() for e in progress for p in e.paths)
    assert any(isinstance(e, Log) and PROMPT in e.message for e in events)


def test_progress_for_every_denoising_step(reference):
    _, _, events = reference
    steps = [(e.done, e.total, e.batch, e.step, e.steps) for e in events if isinstance(e, ClassImagesStep)]
    assert steps == [(0, 5, 2, 1, 2), (0, 5, 2, 2, 2), (2, 5, 2, 1, 2), (2, 5, 2, 2, 2), (4, 5, 1, 1, 2),
                     (4, 5, 1, 2, 2)]


def test_one_image_is_one_image_in_the_log(model, tmp_path):
    events = []
    ensure_class_images(make_cfg(tmp_path, tmp_path / "one", num_class_images=1), model, emit=events.append)
    assert any(isinstance(e, Log) and e.message.startswith("Generating 1 class image for") for e in events)


def test_stop_acts_within_a_batch_and_the_batch_is_made_again_later(model, tmp_path, reference):
    """One batch of all five images: a stop after its first denoising step ends the generation there."""
    folder = tmp_path / "class"
    cfg = make_cfg(tmp_path, folder, class_batch_size=5)
    events = []
    stop = lambda: any(isinstance(e, ClassImagesStep) for e in events)  # noqa: E731 - as soon as one step is done
    items = ensure_class_images(cfg, model, emit=events.append, should_stop=stop)
    assert items == [] and pngs(folder) == []  # the unfinished batch is dropped, not saved half made
    assert [e.step for e in events if isinstance(e, ClassImagesStep)] == [1]  # the second step never ran
    assert any(isinstance(e, Log) and "stopped" in e.message for e in events)
    assert not any(isinstance(e, ClassImagesProgress) for e in events)
    ensure_class_images(cfg, model)  # continuing makes the same pictures from the same seeds
    assert pngs(folder) == pngs(reference[0])
    for name in pngs(folder):
        assert np.abs(pixels(folder / name) - pixels(reference[0] / name)).max() <= 1, name  # batch-size rounding


def test_generation_is_deterministic(model, tmp_path, reference):
    folder = tmp_path / "again"
    ensure_class_images(make_cfg(tmp_path, folder), model)
    for name in pngs(reference[0]):
        assert np.array_equal(pixels(folder / name), pixels(reference[0] / name)), name


def test_seed_changes_the_images(model, tmp_path, reference):
    folder = tmp_path / "other-seed"
    ensure_class_images(make_cfg(tmp_path, folder, num_class_images=1, class_seed=8), model)
    # class_seed 8 makes image 0 from seed 8, which is image 1 of the reference (seed 7 + 1)
    diff = np.abs(pixels(folder / "class_00000.png") - pixels(reference[0] / "class_00001.png")).max()
    assert diff <= 1  # batch composition may move a value by one level
    assert np.abs(pixels(folder / "class_00000.png") - pixels(reference[0] / "class_00000.png")).max() > 10


def test_each_image_depends_on_its_seed_not_on_the_batch(model, tmp_path, reference):
    folder = tmp_path / "batch3"
    ensure_class_images(make_cfg(tmp_path, folder, class_batch_size=3), model)
    for name in pngs(reference[0]):
        # a different batch size changes float rounding only: at most one level in a few pixels
        assert np.abs(pixels(folder / name) - pixels(reference[0] / name)).max() <= 1, name


def test_enough_images_means_no_generation(model, reference):
    folder, items, _ = reference
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    events = []
    again = ensure_class_images(make_cfg(folder.parent, folder, num_class_images=3), model, emit=events.append)
    assert [i.path for i in again] == [i.path for i in items[:3]]
    assert not any(isinstance(e, ClassImagesProgress) for e in events)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()} == before


# ----------------------------------------------------------------------------- resume


def test_stopped_generation_resumes_to_the_same_images(model, tmp_path, reference):
    folder = tmp_path / "class"
    cfg = make_cfg(tmp_path, folder)
    events = []
    partial = ensure_class_images(cfg, model, emit=events.append, should_stop=stop_after(folder, 2))
    assert pngs(folder) == ["class_00000.png", "class_00001.png"]
    assert len(partial) == 2
    assert any(isinstance(e, Log) and "stopped" in e.message for e in events)
    manifest = read_manifest(folder)
    assert sorted(manifest["images"]) == ["class_00000.png", "class_00001.png"]
    first = {name: ((folder / name).stat().st_mtime_ns, (folder / name).read_bytes()) for name in pngs(folder)}

    events = []
    done = ensure_class_images(cfg, model, emit=events.append)
    assert pngs(folder) == [f"class_{i:05d}.png" for i in range(5)]
    assert len(done) == 5
    progress = [(e.done, e.total) for e in events if isinstance(e, ClassImagesProgress)]
    assert progress == [(2, 3), (3, 3)]  # only the three missing images were made
    for name, (mtime, data) in first.items():  # images from the first call were not rewritten
        assert (folder / name).stat().st_mtime_ns == mtime and (folder / name).read_bytes() == data
    for name in pngs(folder):
        assert np.array_equal(pixels(folder / name), pixels(reference[0] / name)), name
    manifest = read_manifest(folder)
    assert {n: r["seed"] for n, r in manifest["images"].items()} == {f"class_{i:05d}.png": 7 + i for i in range(5)}


def test_stop_before_the_first_batch_makes_nothing(model, tmp_path):
    folder = tmp_path / "class"
    items = ensure_class_images(make_cfg(tmp_path, folder), model, should_stop=lambda: True)
    assert items == [] and pngs(folder) == []


def test_a_missing_image_in_the_middle_is_filled_with_its_own_seed(model, tmp_path, reference):
    folder = tmp_path / "class"
    cfg = make_cfg(tmp_path, folder)
    ensure_class_images(cfg, model)
    (folder / "class_00002.png").unlink()
    ensure_class_images(cfg, model)
    assert pngs(folder) == [f"class_{i:05d}.png" for i in range(5)]
    remade = pixels(folder / "class_00002.png")
    assert np.abs(remade - pixels(reference[0] / "class_00002.png")).max() <= 1
    assert read_manifest(folder)["images"]["class_00002.png"]["seed"] == 9


# ----------------------------------------------------------------------------- the user's own files


def test_user_images_count_toward_the_total(model, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    mine = [user_image(folder / "my_dog_a.png"), user_image(folder / "my_dog_b.jpg", colour=(200, 10, 10))]
    before = {p: p.read_bytes() for p in mine}
    items = ensure_class_images(make_cfg(tmp_path, folder, num_class_images=4), model)
    assert pngs(folder) == ["class_00000.png", "class_00001.png", "my_dog_a.png"]
    assert sorted(i.path.name for i in items) == ["class_00000.png", "class_00001.png", "my_dog_a.png", "my_dog_b.jpg"]
    assert {p: p.read_bytes() for p in mine} == before  # the user's files are untouched
    assert sorted(read_manifest(folder)["images"]) == ["class_00000.png", "class_00001.png"]


def test_corrupt_file_is_not_counted_and_not_deleted(model, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    user_image(folder / "good.png")
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    small = user_image(folder / "tiny.png", size=8)  # smaller than the resolution: not usable either
    items = ensure_class_images(make_cfg(tmp_path, folder, num_class_images=3), model)
    assert sorted(i.path.name for i in items) == ["class_00000.png", "class_00001.png", "good.png"]
    assert broken.read_bytes() == b"\x89PNG\r\n\x1a\n this is not really a png"
    assert small.is_file()


def test_min_size_never_rejects_generated_images():
    cfg = Config.from_dict({"data": {"resolution": 32, "min_image_size": 64}})
    assert class_min_size(cfg) == 32
    assert class_min_size(Config.from_dict({"data": {"resolution": 512, "min_image_size": 64}})) == 64


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"tool": "other", "images": [1]}'],
                         ids=["damaged", "a-list", "foreign"])
def test_odd_manifest_is_replaced_without_losing_images(model, tmp_path, content):
    folder = tmp_path / "class"
    folder.mkdir()
    user_image(folder / "mine.png")
    (folder / MANIFEST).write_text(content, encoding="utf-8")
    items = ensure_class_images(make_cfg(tmp_path, folder, num_class_images=2), model)
    assert sorted(i.path.name for i in items) == ["class_00000.png", "mine.png"]
    manifest = read_manifest(folder)
    assert manifest["images"]["class_00000.png"]["seed"] == 7
    if content.startswith('{"tool"'):
        assert json.loads((folder / MANIFEST).read_text())["tool"] == "other"  # its other keys are kept


# ----------------------------------------------------------------------------- errors and folders


@pytest.mark.parametrize("prompt", ["", "   "])
def test_missing_class_prompt_is_a_data_error(model, tmp_path, prompt):
    folder = tmp_path / "class"
    with pytest.raises(DataError, match="class prompt"):
        ensure_class_images(make_cfg(tmp_path, folder, class_prompt=prompt), model)
    assert not folder.exists()  # nothing created for a run that cannot start


def test_class_dir_is_used_when_set(tmp_path):
    folder = tmp_path / "my classes"
    assert class_dir_for(make_cfg(tmp_path, folder)) == folder
    cfg = Config.from_dict({"data": {"class_dir": "~/classes", "class_prompt": PROMPT}})
    assert class_dir_for(cfg) == Path("~/classes").expanduser()


def test_cache_folder_is_per_model_prompt_and_resolution(tmp_path):
    def folder(**kw):
        base = kw.pop("base", "tiny")
        cfg = make_cfg(tmp_path, **kw)
        cfg.model.base = base
        return class_dir_for(cfg)

    default = folder()
    assert default.is_relative_to(tmp_path / "workspace" / "class_images")  # beside output.dir, not inside it
    assert not default.is_relative_to(tmp_path / "workspace" / "runs")
    assert default == folder()  # stable: the same settings find the same cache
    assert folder(class_prompt="a photo of a cat") != default
    assert folder(resolution=64) != default
    assert folder(base="stable-diffusion-v1-5/stable-diffusion-v1-5") != default
    # settings that do not change which images are wanted share the cache
    assert folder(num_class_images=50, class_batch_size=1) == default
    assert "32" in default.name and "dog" in default.name  # readable names


def test_cache_folder_is_per_companion_file_and_quantization(tmp_path):
    """FLUX.1 draws its class images with the text encoders and VAE chosen beside it and with its transformer
    quantized as it trains: another T5 / CLIP-L / VAE file, or another quantization, makes other images."""
    t5, clip = tmp_path / "t5xxl_fp8.safetensors", tmp_path / "clip_l.safetensors"
    t5.write_bytes(b"t5 weights")
    clip.write_bytes(b"clip weights")

    def folder(**model):
        cfg = make_cfg(tmp_path)
        for key, value in {"base": "tiny-flux", **model}.items():
            setattr(cfg.model, key, value)
        return class_dir_for(cfg)

    plain = folder()
    assert not any(tag in plain.parent.name for tag in ("-vae", "-te", "-nf4", "-int8"))  # the model alone
    others = [folder(text_encoder_2=str(t5)), folder(text_encoder=str(clip)), folder(vae=str(clip)),
              folder(quantize="nf4"), folder(quantize="int8")]
    assert len({plain, *others}) == 6  # each its own cache
    assert folder(text_encoder_2=str(t5)) == others[0]  # and stable
    t5.write_bytes(b"t5 weights, another version")
    assert folder(text_encoder_2=str(t5)) != others[0]


def test_cache_folder_keeps_long_or_similar_names_apart(tmp_path):
    # regression: the folder name was a 60-character slug, so these pairs shared one cache
    long_prefix = "/home/someone/stable-diffusion-webui/models/Stable-diffusion/checkpoints/"
    a = make_cfg(tmp_path)
    b = make_cfg(tmp_path)
    a.model.base, b.model.base = long_prefix + "realistic.safetensors", long_prefix + "dreamy.safetensors"
    assert class_dir_for(a) != class_dir_for(b)
    prompt = "a professional studio photograph of a golden retriever dog sitting on grass, "
    c = make_cfg(tmp_path, class_prompt=prompt + "morning light")
    d = make_cfg(tmp_path, class_prompt=prompt + "evening light")
    assert class_dir_for(c) != class_dir_for(d)


def test_cache_folder_changes_when_the_model_weights_change(tmp_path):
    """A model replaced under the same path (a re-download, a retrained demo model) must not reuse the class
    images of the old one: the cache folder includes a fingerprint of the weights."""
    from core.models import model_fingerprint

    checkpoint = tmp_path / "models" / "mine.safetensors"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights version 1")
    cfg = make_cfg(tmp_path)
    cfg.model.base = str(checkpoint)
    first = class_dir_for(cfg)
    assert first == class_dir_for(cfg) and model_fingerprint(str(checkpoint)) in first.parent.name
    checkpoint.write_bytes(b"weights version 2")
    assert class_dir_for(cfg) != first
    cfg.model.base = "demo"
    assert model_fingerprint("demo") and model_fingerprint("demo") in class_dir_for(cfg).parent.name


def test_fingerprint_of_large_files_reads_their_ends(tmp_path):
    from core.models import model_fingerprint

    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:  # sparse: 65 MiB without writing them
        f.truncate(65 << 20)
    before = model_fingerprint(str(big))
    with open(big, "r+b") as f:
        f.seek((65 << 20) - 10)
        f.write(b"changed")
    assert model_fingerprint(str(big)) != before
    assert model_fingerprint("tiny") == "" and model_fingerprint("org/some-hub-model") == ""


def test_cache_folder_is_filled_by_ensure(model, tmp_path):
    cfg = make_cfg(tmp_path, num_class_images=2)
    items = ensure_class_images(cfg, model)
    assert {i.path.parent for i in items} == {class_dir_for(cfg)}
    assert len(items) == 2


def test_counts_say_one_image_and_two_images():
    from core.words import count

    assert [count(n, "class image") for n in (0, 1, 2)] == ["0 class images", "1 class image", "2 class images"]


MIXED = [(96, 160), (100, 170), (90, 150), (160, 96), (170, 100), (96, 96)]  # 3 portraits, 2 landscapes, 1 square


def test_class_sets_are_the_buckets_of_the_instance_images_in_proportion(tmp_path):
    cfg = make_cfg(tmp_path, resolution=64, bucket_step=16, num_class_images=6)
    assert class_sets(cfg, MIXED) == [((48, 80), 3), ((80, 48), 2), ((64, 64), 1)]  # the fullest first
    assert class_sets(make_cfg(tmp_path, resolution=64, bucket_step=16, num_class_images=2), MIXED) == \
        [((48, 80), 1), ((80, 48), 1), ((64, 64), 1)]  # at least one per bucket: every batch finds partners
    # No images, or bucketing off: the resolution's square alone, all of them, in today's folder.
    assert class_sets(cfg, []) == [((64, 64), 6)]
    off = make_cfg(tmp_path, resolution=64, bucket_step=16, num_class_images=6, bucketing=False)
    assert class_sets(off, MIXED) == [((64, 64), 6)]
    assert class_dir_for(off, (64, 64)) == class_dir_for(off)
