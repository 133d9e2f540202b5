"""Hostile dataset input, through both ways images come in.

The ways: adding files to a workspace dataset (`datasets.add_folder`, `datasets.add_images` as the
upload box calls it) and loading a folder for training (`data.scan_folder` -> `caption_prompts` ->
`ImageSet`, as `trainer.load_data` does). For every odd file the guarantees are: it is used correctly
(decoded at the right size and colour) or rejected with a reason that names it; nothing raises
except the app's own UserError; nothing is written outside the workspace; the user's originals
(and whatever a link points at) are never modified.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from core import datasets as ds
from core.data import IMAGE_EXTENSIONS, ImageSet, caption_prompts, load_rgb, scan_folder, shown_name
from core.errors import DataError, UserError

# Pillow warns about the 12000x12000 test bomb (which the loader then refuses) and about the fuzzed
# TIFFs' broken tags; those warnings are expected.
pytestmark = [pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")]

MIN = 16  # min_size for these tests: small pictures keep the fuzzing fast
RES = 16  # training resolution
PROMPT = "a photo of sks dog"
RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


# ----------------------------------------------------------------------------- building files


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_by_hand(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG written chunk by chunk: for what Pillow cannot save (48-bit RGB) and for lying headers."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_from_array(array: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG of an (H, W, C) uint16 array (colour type 2 = RGB, 6 = RGBA)."""
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    return png_by_hand(array.shape[1], array.shape[0], 16, colour_type, zlib.compress(rows))


@cache
def bomb_png() -> bytes:
    """A valid 12000x12000 greyscale PNG of zeros in about 140 kB: 144 M pixels, between Pillow's
    limit (89 M, where it only warns) and twice the limit (where Image.open itself refuses).
    Compressed row by row so the test never holds the whole picture either."""
    side = 12000
    packer = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + one zero byte per pixel
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return png_by_hand(side, side, 8, 0, idat)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 30), colour) for colour in (RED, GREEN, BLUE)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)


def cmyk_jpeg() -> bytes:
    return encoded(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in print


def sixteen_bit_grey() -> bytes:
    return encoded(Image.fromarray(np.full((30, 40), 32896, dtype=np.uint16)), "PNG")  # mid grey, I;16


def sixteen_bit_rgb() -> bytes:
    array = np.zeros((30, 40, 3), np.uint16)
    array[..., 0], array[..., 2] = 65535, 32896
    return png_from_array(array, 2)


def sixteen_bit_rgba_half_transparent() -> bytes:
    array = np.zeros((30, 40, 4), np.uint16)
    array[..., 1], array[..., 3] = 65535, 32896  # green at half opacity: on white that is (127, 255, 127)
    return png_from_array(array, 6)


def write(data: bytes) -> Callable[[Path, Path], None]:
    def make(path: Path, elsewhere: Path) -> None:
        path.write_bytes(data)

    return make


def truncated(data: bytes) -> Callable[[Path, Path], None]:
    return write(data[: len(data) // 2])


def link_outside(path: Path, elsewhere: Path) -> None:
    """A link to a picture (with a caption) in a folder that is not the dataset's."""
    elsewhere.mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), RED).save(elsewhere / "private.png")
    path.symlink_to(elsewhere / "private.png")


def broken_link(path: Path, elsewhere: Path) -> None:
    path.symlink_to(elsewhere / "gone.png")


# ----------------------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    name: str  # the file's name in the user's folder
    make: Callable[[Path, Path], None]  # make(path, elsewhere): write the file (elsewhere: outside everything)
    size: tuple[int, int] | None = None  # used: the decoded (width, height)
    colour: tuple[int, int, int] | None = None  # used: the centre pixel after conversion to RGB
    reason: str | None = None  # rejected: words the reason must contain
    tolerance: int = 2  # JPEG is lossy


CASES = [
    Case("zero-byte-png", "empty.png", write(b""), reason="empty file"),
    Case("zero-byte-jpg", "empty.jpg", write(b""), reason="empty file"),
    Case("truncated-png", "cut.png", truncated(encoded(noise(64, 48), "PNG")), reason="truncated"),
    Case("truncated-jpg", "cut.jpg", truncated(encoded(noise(64, 48), "JPEG", quality=95)), reason="truncated"),
    Case("bomb-header", "bomb.png", write(png_by_hand(100_000, 100_000, 8, 0, zlib.compress(b""))),
         reason="too large"),
    Case("bomb-valid", "bomb_valid.png", lambda p, e: p.write_bytes(bomb_png()), reason="too large"),
    Case("text-as-png", "notes.png", write(b"shopping list: eggs, milk\n"), reason="not an image"),
    Case("pdf-as-jpg", "scan.jpg", write(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"),
         reason="not an image"),
    Case("html-as-webp", "page.webp", write(b"<!doctype html><title>404</title>"), reason="not an image"),
    Case("png-named-jpg", "really_a_png.jpg", write(encoded(Image.new("RGB", (40, 30), BLUE), "PNG")),
         size=(40, 30), colour=BLUE),
    Case("animated-gif", "anim.gif", write(animated("GIF")), size=(40, 30), colour=RED),
    Case("animated-webp", "anim.webp", write(animated("WEBP")), size=(40, 30), colour=RED),
    Case("animated-png", "anim.png", write(animated("PNG")), size=(40, 30), colour=RED),
    Case("16-bit-grey", "deep_grey.png", write(sixteen_bit_grey()), size=(40, 30), colour=(128, 128, 128)),
    Case("16-bit-rgb", "deep_rgb.png", write(sixteen_bit_rgb()), size=(40, 30), colour=(255, 0, 128)),
    Case("16-bit-rgba", "deep_rgba.png", write(sixteen_bit_rgba_half_transparent()), size=(40, 30),
         colour=(127, 255, 127)),
    Case("cmyk-jpeg", "print.jpg", write(cmyk_jpeg()), size=(40, 30), colour=(255, 0, 0), tolerance=6),
    Case("unicode-name", "Фото 写真 ✓ é.png", write(encoded(Image.new("RGB", (40, 30), GREEN), "PNG")),
         size=(40, 30), colour=GREEN),
    Case("long-name", "a" * 240 + ".png", write(encoded(Image.new("RGB", (40, 30), RED), "PNG")),
         size=(40, 30), colour=RED),
    Case("long-unicode-name", "写" * 80 + ".jpg", write(encoded(Image.new("RGB", (40, 30), BLUE), "JPEG")),
         size=(40, 30), colour=BLUE, tolerance=6),
    Case("not-utf8-name", os.fsdecode(b"caf\xe9 \xff.png"), write(encoded(Image.new("RGB", (40, 30), RED), "PNG")),
         size=(40, 30), colour=RED),
    Case("link-outside", "link.png", link_outside, reason="link"),
    Case("broken-link", "dangling.png", broken_link, reason="link"),
]


# ----------------------------------------------------------------------------- checks


def outside_state(root: Path, workspace: Path) -> dict[str, tuple]:
    """Every entry under `root` except the workspace: file contents (hash), mtime and mode, link
    targets. Links are recorded, never followed."""
    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [n for n in dirnames if here / n != workspace]
        for name in dirnames + filenames:
            path = here / name
            info = path.lstat()
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = ("link", os.readlink(path))
            elif path.is_file():
                state[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), info.st_mtime_ns, info.st_mode)
            else:
                state[key] = ("dir", info.st_mode)
    return state


def no_leftovers(workspace: Path) -> None:
    """Atomic writes leave no temp files, and nothing in the workspace is a link."""
    for path in workspace.rglob("*"):
        assert not path.name.endswith(".tmp"), path
        assert not path.is_symlink(), path


@pytest.fixture
def decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image Pillow decodes from a file during the test."""
    seen: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def spy(self):
        seen.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return seen


@dataclass
class Outcome:
    used: Image.Image | None  # the picture as training will see it (load_rgb of the kept file)
    text: str  # the report shown to the user


def via_add_folder(src: Path, path: Path, workspace: Path) -> Outcome:
    folder = ds.create_dataset(workspace, "set")
    report = ds.add_folder(folder, src, min_size=MIN)
    return _dataset_outcome(folder, path, report)


def via_uploads(src: Path, path: Path, workspace: Path) -> Outcome:
    folder = ds.create_dataset(workspace, "set")
    report = ds.add_images(folder, [str(path)], min_size=MIN, uploaded=True)
    return _dataset_outcome(folder, path, report)


def _dataset_outcome(folder: Path, path: Path, report: ds.AddReport) -> Outcome:
    if not report.added:
        assert [n for n, _ in report.skipped] == [path.name]
        return Outcome(None, report.summary())
    assert report.added and not report.skipped
    (name,) = report.added
    kept = folder / name
    assert kept.read_bytes() == path.read_bytes()  # an exact copy
    # The copy is what training will use: the dataset's own scan must accept it.
    assert [i.path.name for i in scan_folder(folder, min_size=MIN).images] == [name]
    return Outcome(load_rgb(kept), report.summary())


def via_training_folder(src: Path, path: Path, workspace: Path) -> Outcome:
    report = scan_folder(src, min_size=MIN)
    if not report.images:
        assert [r.path.name for r in report.rejected] == [path.name]
        return Outcome(None, report.summary())
    (item,) = report.images
    images = ImageSet(report.images, caption_prompts(report.images, PROMPT), RES)
    tensor, prompt = images.get(0)
    assert tensor.shape == (3, RES, RES) and prompt == PROMPT
    assert (item.width, item.height) == load_rgb(item.path).size
    return Outcome(load_rgb(item.path), report.summary())


WAYS = {"add_folder": via_add_folder, "uploads": via_uploads, "training_folder": via_training_folder}


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_each_hostile_file_is_used_correctly_or_rejected_with_a_reason(tmp_path, case, way, decoded_sizes):
    src, workspace = tmp_path / "photos", tmp_path / "workspace"
    src.mkdir()
    path = src / case.name
    case.make(path, tmp_path / "elsewhere")
    before = outside_state(tmp_path, workspace)

    outcome = WAYS[way](src, path, workspace)

    assert outside_state(tmp_path, workspace) == before  # originals and link targets untouched, nothing new
    if workspace.exists():
        no_leftovers(workspace)
    outcome.text.encode("utf-8")  # printable by the CLI and sendable to the browser, whatever the name
    # Nothing bigger than Pillow's pixel limit was ever decoded (a bomb is refused from its header).
    assert all(w * h <= Image.MAX_IMAGE_PIXELS for w, h in decoded_sizes)
    if case.reason:
        assert outcome.used is None, f"{case.name!r} should have been rejected"
        assert f"{shown_name(case.name)}: " in outcome.text or f"{shown_name(case.name)} (" in outcome.text
        assert case.reason in outcome.text
    else:
        assert outcome.used is not None, outcome.text
        assert outcome.used.mode == "RGB" and outcome.used.size == case.size
        centre = outcome.used.getpixel((case.size[0] // 2, case.size[1] // 2))
        assert all(abs(a - b) <= case.tolerance for a, b in zip(centre, case.colour)), (centre, case.colour)


def test_names_kept_in_a_dataset_are_printable_visible_and_short(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    names = {"unicode": "Фото 写真 ✓ é.png", "long": "a" * 240 + ".png", "long_wide": "写" * 80 + ".jpg",
             "bytes": os.fsdecode(b"caf\xe9 \xff.png")}
    for i, name in enumerate(names.values()):
        Image.new("RGB", (40, 30), (i * 60, 0, 0)).save(src / name, format="JPEG" if name.endswith("jpg") else "PNG")
    folder = ds.create_dataset(tmp_path / "workspace", "set")

    report = ds.add_folder(folder, src, min_size=MIN)

    assert len(report.added) == 4 and not report.skipped
    assert names["unicode"] in report.added  # ordinary unicode is kept as it is
    for name in report.added:
        assert len(name.encode("utf-8")) <= 255 and Path(name).suffix in (".png", ".jpg")
    assert ("a" * 120 + ".png") in report.added and ("写" * 40 + ".jpg") in report.added
    assert "caf\ufffd \ufffd.png" in report.added  # undecodable bytes become U+FFFD, not a crash in the UI
    # A long name still gets its caption and a "-1" when a second one arrives.
    (src / ("a" * 240 + ".txt")).write_text("a long caption")
    Image.new("RGB", (40, 30), "white").save(src / ("a" * 240 + ".png"))
    again = ds.add_folder(folder, src, min_size=MIN)
    assert again.added == ["a" * 120 + "-1.png"]
    assert (folder / ("a" * 120 + "-1.txt")).read_text() == "a long caption"


def test_an_upload_named_like_a_hidden_file_or_dots_is_kept_visible(tmp_path):
    """Dot files are never scanned for training, so an image must not be kept under such a name."""
    up = tmp_path / "upload"
    up.mkdir()
    for name, colour in ((".hidden.png", RED), ("..png", GREEN), (". .png", BLUE)):
        Image.new("RGB", (40, 30), colour).save(up / name, format="PNG")
    folder = ds.create_dataset(tmp_path / "workspace", "set")

    report = ds.add_images(folder, [up / ".hidden.png", up / "..png", up / ". .png"], min_size=MIN, uploaded=True)

    assert report.added == ["hidden.png", "image.png", "image-1.png"]
    assert [i.path.name for i in scan_folder(folder, min_size=MIN).images] == ["hidden.png", "image-1.png", "image.png"]


def test_paths_with_dot_dot_never_lead_outside_the_dataset(tmp_path):
    src, workspace = tmp_path / "photos", tmp_path / "workspace"
    (src / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), RED).save(src / "x.png")
    Image.new("RGB", (40, 30), GREEN).save(src / "..\\..\\evil.png", format="PNG")  # a legal name on Linux
    folder = ds.create_dataset(workspace, "set")
    before = outside_state(tmp_path, workspace)

    report = ds.add_images(folder, [f"{src}/sub/../x.png", f"{src}/..\\..\\evil.png", f"{folder}/../../x.png"],
                           min_size=MIN, uploaded=True)
    # Names from the browser's caption table and selection: only the last part counts.
    assert ds.write_captions(folder, {"../../photos/x.png": "a red square"}) == 1
    assert (folder / "x.txt").read_text() == "a red square\n"
    with pytest.raises(DataError, match="not an image of this dataset"):
        ds.write_captions(folder, {"../../photos/sub/../x.png/..": "overwritten?"})
    moved = ds.remove_images(folder, ["../../photos/x.png", "../set/x.png", ".."])

    assert report.added == ["x.png", "\\..\\evil.png"]  # the leading dots go: no hidden file in the dataset
    assert [n for n, _ in report.skipped] == ["x.png"]  # workspace/x.png does not exist
    assert moved == ["x.png"]  # the dataset's own x.png (with its caption), once
    assert sorted(p.name for p in (folder / ds.REMOVED_DIR).iterdir()) == ["x.png", "x.txt"]
    assert (folder / "\\..\\evil.png").is_file()
    assert outside_state(tmp_path, workspace) == before


def test_a_caption_that_links_outside_is_never_read_or_copied(tmp_path):
    src, elsewhere, workspace = tmp_path / "photos", tmp_path / "elsewhere", tmp_path / "workspace"
    src.mkdir()
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_text("SECRET")
    Image.new("RGB", (40, 30), RED).save(src / "dog.png")
    (src / "dog.txt").symlink_to(elsewhere / "secret.txt")
    before = outside_state(tmp_path, workspace)

    scan = scan_folder(src, min_size=MIN)
    folder = ds.create_dataset(workspace, "set")
    added = ds.add_folder(folder, src, min_size=MIN)
    uploaded = ds.add_images(ds.create_dataset(workspace, "up"), [src / "dog.png", src / "dog.txt"], min_size=MIN)

    # Training refuses the image rather than train it with a stranger's text or silently without its caption.
    assert not scan.images and "dog.txt is a link" in scan.rejected[0].reason
    for report in (added, uploaded):
        assert report.added == ["dog.png"]
        assert "dog.txt: a link to another file" in report.summary()
    assert not any("SECRET" in p.read_text(errors="replace") for p in workspace.rglob("*") if p.is_file())
    assert outside_state(tmp_path, workspace) == before


def test_same_name_uploads_keep_their_own_captions(tmp_path):
    folder = ds.create_dataset(tmp_path / "workspace", "set")
    files = []
    for i, (colour, caption) in enumerate(((RED, "the red one"), (GREEN, "the green one"))):
        d = tmp_path / f"u{i}"
        d.mkdir()
        Image.new("RGB", (40, 30), colour).save(d / "photo.png")
        (d / "photo.txt").write_text(caption)
        files += [d / "photo.png", d / "photo.txt"]

    report = ds.add_images(folder, files, min_size=MIN, uploaded=True)

    assert report.added == ["photo.png", "photo-1.png"]
    by_colour = {load_rgb(i.path).getpixel((0, 0)): i.caption for i in scan_folder(folder, min_size=MIN).images}
    assert by_colour == {RED: "the red one", GREEN: "the green one"}


def test_two_captions_with_one_name_are_reported_not_guessed(tmp_path):
    """As the browser uploads them: every file in a folder of its own, so no caption sits beside its image."""
    folder = ds.create_dataset(tmp_path / "workspace", "set")
    files = []
    for i, (name, content) in enumerate((("photo.png", RED), ("photo.txt", "the red one"),
                                         ("photo.png", GREEN), ("photo.txt", "the green one"))):
        path = tmp_path / f"upload{i}" / name
        path.parent.mkdir()
        path.write_text(content) if isinstance(content, str) else Image.new("RGB", (40, 30), content).save(path)
        files.append(path)

    report = ds.add_images(folder, files, min_size=MIN, uploaded=True)

    assert report.added == ["photo.png", "photo-1.png"]
    assert not list(folder.glob("*.txt"))
    assert "photo.txt: 2 caption files have this name" in report.summary()


def test_same_names_differing_in_case_and_duplicate_contents(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    Image.new("RGB", (40, 30), RED).save(src / "Photo.PNG")
    Image.new("RGB", (40, 30), GREEN).save(src / "photo.png")
    (src / "z_copy.png").write_bytes((src / "photo.png").read_bytes())
    folder = ds.create_dataset(tmp_path / "workspace", "set")

    report = ds.add_folder(folder, src, min_size=MIN)

    assert report.added == ["Photo.PNG", "photo-1.png"]  # one stem, case aside: captions stay unambiguous
    assert report.skipped == [("z_copy.png", "already in the dataset")]
    colours = [load_rgb(i.path).getpixel((0, 0)) for i in scan_folder(folder, min_size=MIN).images]
    assert colours == [RED, GREEN]
    assert len(scan_folder(src, min_size=MIN).images) == 3  # a training folder is used as the user made it


def test_huge_image_is_refused_before_decoding(tmp_path, decoded_sizes):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    assert len(bomb_png()) < 200_000  # the test itself never makes a big file

    report = scan_folder(tmp_path, min_size=MIN)
    with pytest.raises(DataError, match="bomb.png"):
        load_rgb(tmp_path / "bomb.png")

    assert report.rejected[0].reason.startswith("too large to open safely")
    assert decoded_sizes == []  # refused from the header: no 144 M pixel buffer was ever made


# ----------------------------------------------------------------------------- property-based fuzzing

EXTENSIONS = sorted(IMAGE_EXTENSIONS) + [".PNG", ".JpG", ".txt", ".pdf", ""]
NAME_CHARS = st.characters(codec="utf-8", exclude_characters="/\x00")


@st.composite
def file_names(draw) -> str:
    """Names a Linux file system accepts: unicode, very long, dots and spaces, bytes that are not UTF-8."""
    stem = draw(st.one_of(
        st.text(NAME_CHARS, min_size=1, max_size=24),
        st.text(NAME_CHARS, min_size=1, max_size=3).map(lambda s: s * 100),  # very long
        st.sampled_from([".", "..", " ", "...", ". .", "-", "manifest"]),
        st.binary(min_size=1, max_size=24).map(lambda b: os.fsdecode(b.replace(b"/", b"_").replace(b"\0", b"_"))),
    ))
    ext = draw(st.sampled_from(EXTENSIONS))
    # Cut to the 255-byte limit; the cut may split a character, which is just one more odd name.
    name = os.fsdecode(os.fsencode(stem)[: 255 - len(ext)]) + ext
    assume(name not in (".", "..", "manifest.json"))
    return name


def _bases() -> dict[str, bytes]:
    img = noise(24, 20, seed=3)
    return {"png": encoded(img, "PNG"), "jpeg": encoded(img, "JPEG", quality=80), "gif": animated("GIF"),
            "webp": encoded(img, "WEBP", quality=80), "tiff": encoded(img, "TIFF"), "bmp": encoded(img, "BMP"),
            "grey16": sixteen_bit_grey(), "cmyk": cmyk_jpeg(), "apng": animated("PNG")}


BASES = _bases()


@st.composite
def contents(draw) -> bytes:
    """Random bytes, or a valid picture with a few random flips, cuts, insertions and deletions."""
    kind = draw(st.sampled_from(["random", *BASES]))
    if kind == "random":
        return draw(st.binary(max_size=1024))
    data = bytearray(BASES[kind])
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.tuples(file_names(), contents()), min_size=1, max_size=4, unique_by=lambda f: f[0]))
def test_fuzzed_files_never_crash_and_never_write_outside_the_workspace(files):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src, workspace = root / "photos", root / "workspace"
        src.mkdir()
        for name, data in files:
            (src / name).write_bytes(data)
        before = outside_state(root, workspace)
        folder = ds.create_dataset(workspace, "fuzz")

        # Adding never raises, and reports every image file: added, or skipped under its own name.
        from_folder = ds.add_folder(folder, src, min_size=MIN)
        uploads = ds.add_images(ds.create_dataset(workspace, "up"), [src / name for name, _ in files],
                                min_size=MIN, uploaded=True)
        images = [name for name, _ in files if Path(name).suffix.lower() != ".txt"]
        visible = [name for name in images if not name.startswith(".")]  # dot files are not even listed
        empty_note = 0 if any(not name.startswith(".") for name, _ in files) else 1  # "the folder is empty"
        assert _accounted(from_folder) == len(visible) + empty_note
        assert _accounted(uploads) == len(images)
        for report in (from_folder, uploads):
            report.summary().encode("utf-8")

        # What was added is what training uses (unless its copied caption is unusable, which is reported).
        scan = scan_folder(folder, min_size=MIN)
        scan.summary().encode("utf-8")
        caption_problems = {r.path.name for r in scan.rejected if "caption" in r.reason}
        assert set(from_folder.added) <= {i.path.name for i in scan.images} | caption_problems

        # Loading for training: only the app's own error, with a message that can be shown.
        for training_folder in (src, folder):
            report = scan_folder(training_folder, min_size=MIN)
            report.summary().encode("utf-8")
            try:
                ImageSet(report.images, caption_prompts(report.images, PROMPT), RES)
            except UserError as exc:
                str(exc).encode("utf-8")

        assert outside_state(root, workspace) == before
        no_leftovers(workspace)


def _accounted(report: ds.AddReport) -> int:
    """How many files the report gives an outcome for (a caption that was not copied is extra news)."""
    return len(report.added) + sum(not name.lower().endswith(".txt") for name, _ in report.skipped)
