"""Tests for core/data.py: scanning, decoding odd image modes, geometry and the ImageSet.

Every image is generated here under tmp_path; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import (
    IMAGE_EXTENSIONS,
    ImageItem,
    ImageSet,
    Rejected,
    ScanReport,
    caption_prompts,
    crop_box,
    load_rgb,
    resize_shorter_side,
    scan_folder,
    to_tensor,
)
from core.errors import DataError, UserError

# ----------------------------------------------------------------------------- helpers


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random RGB pixels: JPEGs of these are big enough to truncate meaningfully."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def asymmetric_image(width: int, height: int) -> Image.Image:
    """A horizontal gradient: its mirror image differs from it everywhere but the middle."""
    ramp = np.linspace(0, 255, width, dtype=np.float64).astype(np.uint8)
    array = np.broadcast_to(ramp[None, :, None], (height, width, 3)).copy()
    array[..., 1] = 40  # keep it a colour image
    return Image.fromarray(array, "RGB")


def opened_mode(path: Path) -> str:
    """The mode Pillow decodes a saved file as (checks the test really exercises that mode)."""
    with Image.open(path) as img:
        return img.mode


def snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Contents and mtime of everything under `folder` (hidden files and sub-folders too)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        data = path.read_bytes() if path.is_file() else None
        state[str(path.relative_to(folder))] = (data, path.stat().st_mtime_ns)
    state["."] = (None, folder.stat().st_mtime_ns)
    return state


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """A folder with everything a hobbyist's download folder might contain."""
    folder = tmp_path / "images"
    folder.mkdir()
    noise_image(96, 80, seed=1).save(folder / "b_photo.jpg", quality=90)
    asymmetric_image(80, 120).save(folder / "a_good.png")
    (folder / "a_good.txt").write_text("  a photo of sks dog on a beach \n", encoding="utf-8")
    whole = (folder / "b_photo.jpg").read_bytes()
    (folder / "c_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "d_fake.png").write_text("this is just text, not a picture\n")
    (folder / "e_notes.pdf").write_bytes(np.random.default_rng(2).bytes(500))
    Image.new("RGB", (40, 30), "red").save(folder / "f_tiny.png")
    asymmetric_image(90, 90).save(folder / ".hidden.png")
    (folder / "manifest.json").write_text("{}")
    (folder / "orphan.txt").write_text("a caption without an image")
    sub = folder / "sub"
    sub.mkdir()
    asymmetric_image(100, 100).save(sub / "nested.png")
    return folder


# ----------------------------------------------------------------------------- scanning


def test_image_extensions_are_lower_case_with_dot():
    assert IMAGE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def test_scan_mixed_folder_accepts_good_images_sorted_with_captions(mixed_folder: Path):
    report = scan_folder(mixed_folder)

    assert [item.path.name for item in report.images] == ["a_good.png", "b_photo.jpg"]
    good, photo = report.images
    assert good.caption == "a photo of sks dog on a beach"
    assert (good.width, good.height) == (80, 120)
    assert photo.caption is None
    assert (photo.width, photo.height) == (96, 80)
    assert good.path == mixed_folder / "a_good.png"


def test_scan_mixed_folder_rejects_bad_files_with_plain_reasons(mixed_folder: Path):
    report = scan_folder(mixed_folder)

    reasons = {r.path.name: r.reason for r in report.rejected}
    # Hidden files, sub-folders, caption files and manifest.json are not even mentioned.
    assert list(reasons) == ["c_truncated.jpg", "d_fake.png", "e_notes.pdf", "f_tiny.png"]
    assert "corrupt" in reasons["c_truncated.jpg"] and "truncated" in reasons["c_truncated.jpg"]
    assert "not an image" in reasons["d_fake.png"]
    assert reasons["e_notes.pdf"] == "not an image"
    assert reasons["f_tiny.png"] == "too small (40x30; needs at least 64 px on the shorter side)"


def test_scan_summary_lists_skipped_files(mixed_folder: Path):
    summary = scan_folder(mixed_folder).summary()

    assert summary.startswith("2 images usable, 4 skipped: c_truncated.jpg (corrupt or truncated")
    assert "e_notes.pdf (not an image)" in summary
    assert ScanReport(images=[], rejected=[]).summary() == "0 images usable"
    one = ImageItem(Path("x.png"), None, 64, 64)
    assert ScanReport([one], [Rejected(Path("y.pdf"), "not an image")]).summary() == (
        "1 image usable, 1 skipped: y.pdf (not an image)"
    )


def test_scan_min_size_is_configurable(mixed_folder: Path):
    report = scan_folder(mixed_folder, min_size=30)
    assert "f_tiny.png" in [item.path.name for item in report.images]
    report = scan_folder(mixed_folder, min_size=100)
    assert [item.path.name for item in report.images] == []
    assert "80x120" in {r.path.name: r.reason for r in report.rejected}["a_good.png"]


def test_scan_caption_extension_and_upper_case_names(tmp_path: Path):
    asymmetric_image(64, 64).save(tmp_path / "IMG_1.PNG")
    (tmp_path / "IMG_1.CAPTION").write_text("upper case caption")
    asymmetric_image(64, 64).save(tmp_path / "img_2.png")
    (tmp_path / "img_2.txt").write_text("   \n")  # blank caption counts as none
    (tmp_path / "img_2.caption").write_text("")

    report = scan_folder(tmp_path, caption_extension="caption")

    captions = {item.path.name: item.caption for item in report.images}
    assert captions == {"IMG_1.PNG": "upper case caption", "img_2.png": None}
    # With caption_extension="caption", the .txt file is just a stray non-image file.
    assert [(r.path.name, r.reason) for r in report.rejected] == [("img_2.txt", "not an image")]


def test_scan_rejects_image_whose_caption_is_not_utf8(tmp_path: Path):
    asymmetric_image(64, 64).save(tmp_path / "cafe.png")
    (tmp_path / "cafe.txt").write_bytes("caf\xe9".encode("latin-1"))

    report = scan_folder(tmp_path)

    assert report.images == []
    assert "UTF-8" in report.rejected[0].reason and "cafe.txt" in report.rejected[0].reason


def test_scan_and_image_set_never_modify_the_folder(mixed_folder: Path):
    before = snapshot(mixed_folder)

    report = scan_folder(mixed_folder)
    ImageSet(report.images, ["p"] * len(report.images), resolution=32).get(0)
    load_rgb(mixed_folder / "b_photo.jpg")

    assert snapshot(mixed_folder) == before


def test_scan_missing_folder_names_the_path(tmp_path: Path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DataError) as info:
        scan_folder(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, UserError)


def test_scan_file_instead_of_folder_names_the_path(tmp_path: Path):
    a_file = tmp_path / "photo.png"
    asymmetric_image(64, 64).save(a_file)
    with pytest.raises(DataError) as info:
        scan_folder(str(a_file))
    assert str(a_file) in str(info.value)
    assert "not a folder" in str(info.value)


# ----------------------------------------------------------------------------- decoding


def test_exif_rotation_is_applied_in_scan_and_load(tmp_path: Path):
    # Stored 100x60 with a red top-left corner; Orientation=6 means "turn 90 degrees clockwise".
    stored = Image.new("RGB", (100, 60), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 12, 12))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    item = scan_folder(tmp_path, min_size=10).images[0]
    assert (item.width, item.height) == (60, 100)

    upright = load_rgb(tmp_path / "rotated.jpg")
    assert upright.size == (60, 100) and upright.mode == "RGB"
    # Turning clockwise carries the top-left corner to the top-right.
    red, green, blue = upright.getpixel((54, 5))
    assert red > 200 and green < 60 and blue < 60
    assert upright.getpixel((5, 5))[2] > 200  # top-left is now blue background
    assert upright.getpixel((54, 94))[2] > 200  # and so is bottom-right


def test_rgba_transparency_becomes_white(tmp_path: Path):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    img.save(tmp_path / "alpha.png")

    rgb = load_rgb(tmp_path / "alpha.png")

    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)  # hidden red must not leak through
    assert rgb.getpixel((1, 0)) == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in rgb.getpixel((2, 0)))  # half black over white


def test_palette_with_transparency_becomes_white(tmp_path: Path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    img.putdata([0, 1])
    img.save(tmp_path / "palette.png", transparency=0)
    assert opened_mode(tmp_path / "palette.png") == "P"

    rgb = load_rgb(tmp_path / "palette.png")

    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (0, 200, 0)


def test_palette_without_transparency_keeps_colours(tmp_path: Path):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (254 * 3))
    img.putdata([0, 1])
    img.save(tmp_path / "palette.gif")

    rgb = load_rgb(tmp_path / "palette.gif")

    assert [rgb.getpixel((x, 0)) for x in range(2)] == [(10, 20, 30), (200, 100, 50)]


def test_la_transparency_becomes_white(tmp_path: Path):
    img = Image.new("LA", (2, 1))
    img.putdata([(0, 0), (100, 255)])
    img.save(tmp_path / "la.png")

    rgb = load_rgb(tmp_path / "la.png")

    assert [rgb.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (100, 100, 100)]


@pytest.mark.parametrize(
    ("mode", "values", "expected", "name"),
    [
        ("L", [0, 77, 255], [0, 77, 255], "grey.png"),
        ("1", [0, 1, 0], [0, 255, 0], "bits.png"),
    ],
)
def test_greyscale_and_one_bit_become_rgb(tmp_path: Path, mode, values, expected, name):
    img = Image.new(mode, (3, 1))
    img.putdata(values)
    img.save(tmp_path / name)

    rgb = load_rgb(tmp_path / name)

    assert rgb.mode == "RGB"
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(v, v, v) for v in expected]


def test_cmyk_becomes_rgb(tmp_path: Path):
    img = Image.new("CMYK", (3, 1))
    img.putdata([(0, 255, 255, 0), (0, 0, 0, 0), (0, 0, 0, 255)])
    img.save(tmp_path / "print.tif")
    assert opened_mode(tmp_path / "print.tif") == "CMYK"

    rgb = load_rgb(tmp_path / "print.tif")

    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(255, 0, 0), (255, 255, 255), (0, 0, 0)]


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path):
    array = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "deep.png")
    assert opened_mode(tmp_path / "deep.png") == "I;16"

    rgb = load_rgb(tmp_path / "deep.png")

    assert rgb.mode == "RGB"
    greys = [rgb.getpixel((x, 0))[0] for x in range(4)]
    assert greys[0] == 255 and abs(greys[1] - 128) <= 1 and greys[2] == 0 and greys[3] == 1
    assert all(len(set(rgb.getpixel((x, 0)))) == 1 for x in range(4))  # still grey


def test_thirty_two_bit_int_mode_is_treated_as_sixteen_bit(tmp_path: Path):
    array = np.array([[65535, 32768, 0]], dtype=np.int32)
    Image.fromarray(array, mode="I").save(tmp_path / "int.tif")
    assert opened_mode(tmp_path / "int.tif") == "I"

    greys = [load_rgb(tmp_path / "int.tif").getpixel((x, 0))[0] for x in range(3)]

    assert greys[0] == 255 and abs(greys[1] - 128) <= 1 and greys[2] == 0


def test_load_rgb_bad_file_raises_data_error_with_name(tmp_path: Path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_rgb(tmp_path / "broken.jpg")
    with pytest.raises(DataError, match="gone.png"):
        load_rgb(tmp_path / "gone.png")


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("size_in", "target", "size_out"),
    [
        ((200, 100), 64, (128, 64)),  # landscape, shrink
        ((90, 300), 64, (64, 213)),  # portrait, shrink, rounded
        ((40, 50), 64, (64, 80)),  # upscale
        ((64, 96), 64, (64, 96)),  # already right
        ((70, 70), 64, (64, 64)),  # square
    ],
)
def test_resize_shorter_side(size_in, target, size_out):
    img = noise_image(*size_in)
    out = resize_shorter_side(img, target)
    assert out.size == size_out
    assert out.mode == "RGB"
    assert out is not img


def test_crop_box_centred():
    assert crop_box(300, 200, 200, center=True) == (50, 0, 250, 200)
    assert crop_box(64, 101, 64, center=True) == (0, 18, 64, 82)
    # No generator means centred even when a random crop was asked for.
    assert crop_box(300, 200, 200, center=False) == (50, 0, 250, 200)


def test_crop_box_random_is_in_bounds_varied_and_reproducible():
    boxes = [crop_box(300, 200, 200, False, torch.Generator().manual_seed(s)) for s in range(40)]

    for left, top, right, bottom in boxes:
        assert 0 <= left and right <= 300 and (right - left, bottom - top) == (200, 200)
        assert top == 0
    assert len({box[0] for box in boxes}) > 10
    again = crop_box(300, 200, 200, False, torch.Generator().manual_seed(7))
    assert again == boxes[7]


def test_crop_box_refuses_image_smaller_than_crop():
    with pytest.raises(ValueError):
        crop_box(63, 100, 64, center=True)


def test_to_tensor_range_shape_dtype():
    img = Image.new("RGB", (2, 1))
    img.putdata([(0, 255, 0), (255, 0, 255)])

    tensor = to_tensor(img)

    assert tensor.dtype == torch.float32 and tensor.shape == (3, 1, 2)
    assert tensor[:, 0, 0].tolist() == [-1.0, 1.0, -1.0]
    assert tensor[:, 0, 1].tolist() == [1.0, -1.0, 1.0]
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(Image.new("RGBA", (2, 2)))


# ----------------------------------------------------------------------------- ImageSet


@pytest.fixture
def two_items(tmp_path: Path) -> list[ImageItem]:
    asymmetric_image(96, 64).save(tmp_path / "wide.png")
    noise_image(64, 80, seed=3).save(tmp_path / "tall.png")
    return scan_folder(tmp_path).images


def test_image_set_get_shape_range_and_prompt(two_items):
    images = ImageSet(two_items, ["tall prompt", "wide prompt"], resolution=32)

    assert len(images) == 2
    for index in range(2):
        tensor, prompt = images.get(index)
        assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
        assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert images.get(1)[1] == "wide prompt"


def test_image_set_same_seed_same_tensor(two_items):
    images = ImageSet(two_items, ["a", "b"], resolution=32, center_crop=False, random_flip=True)

    first, _ = images.get(1, torch.Generator().manual_seed(123))
    second, _ = images.get(1, torch.Generator().manual_seed(123))
    assert torch.equal(first, second)
    # Random crops of the wide image differ between seeds.
    crops = {images.get(1, torch.Generator().manual_seed(s))[0].sum().item() for s in range(20)}
    assert len(crops) > 2


def test_image_set_random_flip_gives_both_orientations(two_items):
    images = ImageSet(two_items, ["a", "b"], resolution=32, center_crop=True, random_flip=True)

    seen = []
    for seed in range(40):
        tensor, _ = images.get(1, torch.Generator().manual_seed(seed))
        if not any(torch.equal(tensor, s) for s in seen):
            seen.append(tensor)

    assert len(seen) == 2
    assert torch.equal(seen[1], torch.flip(seen[0], dims=[2]))


def test_image_set_without_generator_is_centre_crop_unflipped(two_items):
    images = ImageSet(two_items, ["a", "b"], resolution=32, center_crop=False, random_flip=True)

    tensor, _ = images.get(1)

    expected = to_tensor(resize_shorter_side(load_rgb(two_items[1].path), 32).crop((8, 0, 40, 32)))
    assert torch.equal(tensor, expected)
    assert torch.equal(to_tensor(images.preview(1)), tensor)
    assert images.preview(1).size == (32, 32) and images.preview(1).mode == "RGB"


@pytest.mark.parametrize("random_flip", [False, True])
def test_image_set_cached_variants(two_items, random_flip):
    images = ImageSet(two_items, ["a", "b"], resolution=32, random_flip=random_flip)

    variants = images.cached_variants(1)

    assert len(variants) == (2 if random_flip else 1)
    assert torch.equal(variants[0], images.get(1)[0])
    if random_flip:
        assert torch.equal(variants[1], torch.flip(variants[0], dims=[2]))


def test_image_set_needs_one_prompt_per_image(two_items):
    with pytest.raises(ValueError):
        ImageSet(two_items, ["only one"], resolution=32)


# ----------------------------------------------------------------------------- prompts


def _item(name: str, caption: str | None) -> ImageItem:
    return ImageItem(path=Path("/data") / name, caption=caption, width=64, height=64)


def test_caption_prompts_prefers_caption_then_default():
    items = [_item("a.png", "a caption"), _item("b.png", None)]
    assert caption_prompts(items, "a photo of sks dog") == ["a caption", "a photo of sks dog"]


def test_caption_prompts_all_captioned_needs_no_default():
    items = [_item("a.png", "one"), _item("b.png", "two")]
    assert caption_prompts(items, "") == ["one", "two"]


@pytest.mark.parametrize("default", ["", "   "])
def test_caption_prompts_error_lists_uncaptioned_files(default):
    items = [_item(f"img{i}.png", None) for i in range(7)] + [_item("ok.png", "fine")]

    with pytest.raises(DataError) as info:
        caption_prompts(items, default)

    message = str(info.value)
    assert all(f"img{i}.png" in message for i in range(5))
    assert "img5.png" not in message and "and 2 more" in message
    assert "ok.png" not in message
    assert "a photo of sks dog" in message and ".txt" in message
