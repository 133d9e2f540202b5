"""Buckets seen and shaped: images of any width and height (generate, the playground, `app.py sample`), samples in the
dataset's most common bucket, and the Dataset tab's bucket report and crops."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import draw_subject, tiny_config
from PIL import Image
from ui_helpers import launched_app

from gradio_client.exceptions import AppError  # noqa: E402

from core import buckets, datasets as ds  # noqa: E402
from core.config import Config  # noqa: E402
from core.data import ImageItem  # noqa: E402

ui = pytest.fixture(scope="module", name="ui")(launched_app)


@pytest.fixture(scope="module")
def client(ui):
    return ui.client()


@pytest.fixture(scope="module")
def pipe():
    from core.models import build_tiny_model
    from core.sampling import make_pipeline

    return make_pipeline(build_tiny_model(seed=0).freeze())


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def shaped_photos(folder: Path) -> Path:
    """Two squares, two portraits and one landscape; at 64 px with 16 px steps: 64x64, 48x80 (x2) and 80x48."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        draw_subject(folder / f"a-square{i}.png", i)
        Image.new("RGB", (100, 160), (30 * i, 90, 200)).save(folder / f"b-tall{i}.png")
    Image.new("RGB", (160, 100), (200, 90, 30)).save(folder / "c-wide.png")
    return folder


# --------------------------------------------------------------------------- generate, playground, CLI

def test_generate_takes_width_and_height_and_each_image_depends_on_its_seed(pipe):
    from core.sampling import generate

    pair = generate(pipe, ["a photo of sks ball"] * 2, [1, 2], steps=2, width=48, height=32)
    assert [img.size for img in pair] == [(48, 32), (48, 32)]  # (width, height): 48 wide, 32 high
    (alone,) = generate(pipe, ["a photo of sks ball"], [2], steps=2, width=48, height=32)
    assert np.abs(pixels(alone) - pixels(pair[1])).max() <= 1  # batch composition moves a value by one level at most
    assert np.abs(pixels(pair[0]) - pixels(pair[1])).max() > 10  # another seed, another image
    (tall,) = generate(pipe, ["a photo of sks ball"], [2], steps=2, width=32, height=48)
    assert tall.size == (32, 48)


def test_a_square_by_width_and_height_is_the_square_by_size(pipe):
    """`size` stays the square shortcut: the same noise and the same image (the bucketing-off previews)."""
    from core.sampling import generate

    (by_size,) = generate(pipe, ["a photo of sks ball"], [3], steps=2, size=32)
    (by_sides,) = generate(pipe, ["a photo of sks ball"], [3], steps=2, width=32, height=32)
    assert by_size.size == (32, 32) and by_size.tobytes() == by_sides.tobytes()


def test_playground_width_and_height_through_the_handler(ui, client):
    pg = dict(pg_base_choice="tiny", pg_prompt="a photo of sks ball", pg_steps=2, pg_seed=1)
    info = ui.call(client, "playground_generate", **pg, pg_width=48, pg_height=32)["pg_info"]
    made = Path(info.split("saved as `")[1].rstrip("`"))
    assert Image.open(made).size == (48, 32)
    info = ui.call(client, "playground_generate", **pg, pg_width=0, pg_height=48)["pg_info"]
    assert Image.open(info.split("saved as `")[1].rstrip("`")).size == (32, 48)  # 0: the model's own (32 px)
    with pytest.raises(AppError, match="width must be a multiple of 8"):
        ui.call(client, "playground_generate", **pg, pg_width=50, pg_height=32)


def test_cli_sample_width_and_height(tmp_path, cli):
    out = tmp_path / "wide.png"
    r = cli("sample", "--base", "tiny", "--prompt", "a photo of sks ball", "--seed", 3, "--steps", 2,
            "--width", 48, "--height", 32, "--out", out)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (48, 32)
    r = cli("sample", "--base", "tiny", "--prompt", "x", "--steps", 2, "--size", 32, "--height", 48,
            "--out", tmp_path / "tall.png")
    assert r.returncode == 0 and Image.open(tmp_path / "tall.png").size == (32, 48)  # --size fills the side not given
    r = cli("sample", "--base", "tiny", "--prompt", "x", "--width", 44, "--out", tmp_path / "bad.png")
    assert r.returncode == 2 and "multiple of 8" in r.stderr and not (tmp_path / "bad.png").exists()


# --------------------------------------------------------------------------- samples during training

def test_most_common_bucket_ties_go_to_the_squarer_one():
    assert buckets.most_common([(24, 40), (32, 32)]) == (32, 32)
    assert buckets.most_common([(24, 40), (24, 40), (32, 32)]) == (24, 40)
    assert buckets.most_common([(24, 40), (40, 24)]) == buckets.most_common([(40, 24), (24, 40)]) == (40, 24)
    data = Config.from_dict({"data": {"resolution": 32, "bucket_step": 8}}).data
    sizes = [(64, 96), (64, 96), (64, 64)]
    assert buckets.sample_size(sizes, data) == (24, 40)
    data.bucketing = False
    assert buckets.sample_size(sizes, data) == (32, 32)  # off: the training square, as before buckets


def test_samples_follow_the_dataset_most_common_bucket(tmp_path):
    from core.trainer import train

    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 96), (40 * i, 90, 200)).save(folder / f"tall{i}.png")
    draw_subject(folder / "square.png", 0)
    cfg = Config.from_dict(tiny_config(tmp_path, folder, data={"bucket_step": 8},
                                       train={"max_steps": 1, "sample_every": 1}))
    run_dir = train(cfg)
    samples = sorted((run_dir / "samples").glob("*.png"))
    assert len(samples) >= 2  # the step-0 baseline and step 1
    assert {Image.open(p).size for p in samples} == {(24, 40)}  # the portraits' bucket, not the square


# --------------------------------------------------------------------------- Dataset tab

def test_crop_notes_in_bucket_terms():
    tall = ImageItem(Path("x.jpg"), None, 1200, 1600)
    assert ds.crop_note(tall, 512, bucket=(384, 704)) == "1200x1600: scaled to 528x704, the centre 384x704 kept"
    assert ds.crop_note(tall, 512, center=False, bucket=(384, 704)).endswith("a random 384x704 kept")
    exact = ImageItem(Path("y.jpg"), None, 768, 1408)
    assert ds.crop_note(exact, 512, bucket=(384, 704)) == "768x1408: scaled to 384x704"
    small = ImageItem(Path("z.jpg"), None, 200, 300)
    assert "scaled UP to 469x704" in ds.crop_note(small, 512, bucket=(384, 704))
    square = ImageItem(Path("w.jpg"), None, 800, 600)
    assert ds.crop_note(square, 512, bucket=(512, 512)) == ds.crop_note(square, 512)  # a square bucket: as before


def crop_sizes(view: dict) -> dict[str, tuple[int, int]]:
    """The crops gallery as {caption: image size}."""
    out = {}
    for entry in view["crops"]:
        image = entry["image"]
        out[entry["caption"]] = Image.open(image["path"] if isinstance(image, dict) else image).size
    return out


def test_dataset_tab_counts_buckets_and_shows_crops_in_their_shape(ui, client, tmp_path):
    photos = shaped_photos(tmp_path / "photos")
    shape = dict(bucketing=True, bucket_step=16, bucket_min_side=0, bucket_max_side=0, bucket_no_upscale=False)
    ui.call(client, "create_dataset", new_name="shapes", resolution=64, **shape)
    view = ui.call(client, "add_folder", dataset="shapes", folder=str(photos), resolution=64, **shape)
    report = view["report"]
    assert "**Buckets at 64 px:** 64x64: 2, 48x80: 2, 80x48: 1." in report
    assert "80x48 has one image: it trains in batches of one" in report
    assert "64x64 has one" not in report and "48x80 has one" not in report
    assert "`b-tall0.png` 100x160: scaled to 50x80, the centre 48x80 kept" in report
    assert crop_sizes(view) == {"a-square0.png · 64x64": (64, 64), "a-square1.png · 64x64": (64, 64),
                                "b-tall0.png · 48x80": (48, 80), "b-tall1.png · 48x80": (48, 80),
                                "c-wide.png · 80x48": (80, 48)}

    off = ui.call(client, "dataset_view", dataset="shapes", resolution=64, **dict(shape, bucketing=False))
    assert "**At 64x64 px:**" in off["report"] and "Buckets at" not in off["report"]
    assert "has one image" not in off["report"]
    assert "`b-tall0.png` 100x160: the centre 100x100 square, scaled down to 64x64" in off["report"]
    assert set(crop_sizes(off).values()) == {(64, 64)}  # bucketing off: every crop the training square

    bad = ui.call(client, "dataset_view", dataset="shapes", resolution=64, **dict(shape, bucket_step=12))
    assert "**Check the settings:**" in bad["report"] and "bucket_step" in bad["report"] and not bad["crops"]
