"""Training images: find and check them, read captions, decode, resize, crop, make tensors.

The folder the user points at is theirs: everything here only reads it. Bad files are not
"fixed" silently; the scan lists each skipped file with a reason the user can act on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .buckets import Size, cover_size
from .errors import DataError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

# Files the app itself may keep next to the images; they are neither images nor junk.
_IGNORED_NAMES = frozenset({"manifest.json"})

# EXIF orientations 5..8 include a quarter turn, so width and height swap.
_QUARTER_TURN_ORIENTATIONS = frozenset({5, 6, 7, 8})

# Modes holding more than 8 bits per greyscale sample; see _sixteen_bit_to_l.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})

# Modes that carry an alpha channel, to be composited over white.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

_WHITE = (255, 255, 255, 255)
LINK_REASON = "a link to another file (links are not followed: copy the picture itself into the folder)"
_MAX_NAMES_IN_MESSAGE = 5
_MAX_NAMES_IN_SUMMARY = 10


@dataclass
class ImageItem:
    """A usable training image, as found by scan_folder."""

    path: Path
    caption: str | None  # text of the sibling caption file, stripped; None if absent/empty
    width: int  # size after EXIF rotation, i.e. as the user sees it
    height: int


@dataclass
class Rejected:
    """A file in the image folder that will not be used, and why (in plain words)."""

    path: Path
    reason: str


@dataclass
class ScanReport:
    """What scan_folder found: the usable images and the skipped files."""

    images: list[ImageItem]
    rejected: list[Rejected]

    def summary(self) -> str:
        """One line for the UI/CLI, e.g. '5 images usable, 1 skipped: a.pdf (not an image)'."""
        count = len(self.images)
        text = f"{count} image{'' if count == 1 else 's'} usable"
        if not self.rejected:
            return text
        shown = [f"{shown_name(r.path.name)} ({r.reason})" for r in self.rejected[:_MAX_NAMES_IN_SUMMARY]]
        hidden = len(self.rejected) - len(shown)
        if hidden:
            shown.append(f"and {hidden} more")
        return f"{text}, {len(self.rejected)} skipped: " + "; ".join(shown)


# --------------------------------------------------------------------------- scanning


def scan_folder(
    folder: str | Path, min_size: int = 64, caption_extension: str = ".txt"
) -> ScanReport:
    """Check every file in `folder` (not sub-folders) and report usable images and skipped files.

    Images are decoded fully, so a truncated download is caught here rather than mid-training.
    Nothing in the folder is written or modified.
    """
    entries = list_folder_files(Path(folder))
    caption_ext = _normalise_extension(caption_extension)
    # Map image stem -> caption file; matching on the listing also finds "IMG.TXT" for "IMG.JPG".
    captions = {p.stem: p for p in entries if p.suffix.lower() == caption_ext}
    images: list[ImageItem] = []
    rejected: list[Rejected] = []
    for path in entries:
        if path.suffix.lower() == caption_ext or path.name in _IGNORED_NAMES:
            continue
        item_or_reason = check_image_file(path, min_size)
        if isinstance(item_or_reason, str):
            rejected.append(Rejected(path, item_or_reason))
            continue
        caption = captions.get(path.stem)
        caption_name = shown_name(f"{path.stem}{caption_ext}")
        # A caption that is a link is not read either (it could be any text file on the machine).
        if caption is not None and caption.is_symlink():
            reason = f"its caption file {caption_name} is a link (not followed: put the caption text itself there)"
            rejected.append(Rejected(path, reason))
            continue
        try:
            item_or_reason.caption = _read_caption(caption)
        except UnicodeDecodeError:
            reason = f"its caption file {caption_name} is not UTF-8 text; re-save it as UTF-8"
            rejected.append(Rejected(path, reason))
            continue
        except OSError as exc:  # e.g. no permission: a reason, not a crash of the whole scan
            rejected.append(Rejected(path, f"its caption file {caption_name} cannot be read ({exc.strerror or exc})"))
            continue
        images.append(item_or_reason)
    return ScanReport(images=images, rejected=rejected)


def list_folder_files(folder: Path) -> list[Path]:
    """The visible plain files in `folder`, sorted by name; DataError if it is not a folder."""
    if not folder.exists():
        raise DataError(
            f"The image folder '{folder}' does not exist. "
            "Check the path, or create the folder and put your training images in it."
        )
    if not folder.is_dir():
        raise DataError(
            f"'{folder}' is a file, not a folder. Choose the folder that contains your training images."
        )
    try:
        children = list(folder.iterdir())
    except OSError as exc:
        raise DataError(
            f"The image folder '{folder}' cannot be read ({exc.strerror or exc}). "
            "Check that the folder's permissions let you open it."
        ) from exc
    # Dot files are OS/editor clutter (.DS_Store, ._img.jpg); sub-folders are not scanned.
    # Links to files (even broken ones) are listed so that check_image_file rejects them with a reason.
    visible = [p for p in children if not p.name.startswith(".") and (p.is_file() or _is_file_link(p))]
    return sorted(visible, key=lambda p: p.name)


def _is_file_link(path: Path) -> bool:
    """A symbolic link that does not lead to a folder (it may lead nowhere)."""
    return path.is_symlink() and not path.is_dir()


def shown_name(name: str) -> str:
    """`name` as text that can be printed or sent to the browser.

    A file name that is not valid UTF-8 (e.g. from an old zip archive) reaches Python with
    stand-in characters that crash print() and JSON encoding; show its bad bytes as U+FFFD.
    """
    return os.fsencode(name).decode("utf-8", "replace")


def _normalise_extension(extension: str) -> str:
    """'.TXT', 'txt' and '.txt' all mean the same caption extension."""
    extension = extension.strip().lower()
    return extension if extension.startswith(".") else "." + extension


def check_image_file(path: Path, min_size: int) -> ImageItem | str:
    """An ImageItem (caption not yet filled in) for a good image, else the reason to skip it."""
    # A link is never followed: it could lead anywhere on the machine (outside the folder the
    # user chose), and copying or training on its target would be a surprise.
    if path.is_symlink():
        return LINK_REASON
    # The extension decides what counts as an image: simple and predictable for the user.
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return "not an image"
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        width, height = _decoded_size(path)
    except PermissionError:
        return "cannot be read (no permission to open the file)"
    except Image.DecompressionBombError:
        return "too large to open safely (more pixels than any photo needs)"
    except UnidentifiedImageError:
        return f"corrupt or not an image (its contents are not a {path.suffix.lower()} picture)"
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad data; all mean the same
        return "corrupt or truncated image file"
    if min(width, height) < min_size:
        return f"too small ({width}x{height}; needs at least {min_size} px on the shorter side)"
    return ImageItem(path=path, caption=None, width=width, height=height)


def _decoded_size(path: Path) -> tuple[int, int]:
    """Decode the whole image (to catch truncation) and return its size after EXIF rotation."""
    with Image.open(path) as img:  # opened read-only; Pillow never writes back
        _refuse_bomb(img)
        img.load()
        width, height = img.size
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation in _QUARTER_TURN_ORIENTATIONS:
        return height, width
    return width, height


def _refuse_bomb(img: Image.Image) -> None:
    """Raise DecompressionBombError before decoding an image with more pixels than Pillow's limit.

    Image.open raises only above twice the limit and merely warns between 1x and 2x; load()
    would then allocate the whole picture (a tiny file can claim 12000x12000 px).
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise Image.DecompressionBombError(f"{img.width}x{img.height} px is over the limit of {limit} px")


def _read_caption(caption_path: Path | None) -> str | None:
    """The stripped caption text, or None when there is no caption file or it is blank."""
    if caption_path is None:
        return None
    # utf-8-sig drops the byte-order mark that Windows Notepad likes to add.
    text = caption_path.read_text(encoding="utf-8-sig").strip()
    return text or None


# --------------------------------------------------------------------------- decoding


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file as 8-bit RGB, upright (EXIF applied) and with transparency on white.

    Raises DataError naming the file if it cannot be decoded or its colour mode is unusable.
    """
    path = Path(path)
    name, parent = shown_name(path.name), shown_name(str(path.parent))
    try:
        with Image.open(path) as img:
            _refuse_bomb(img)  # the file may have changed since the scan
            # exif_transpose returns a new image, so closing the file afterwards is safe.
            upright = ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - any decode failure means "this file is unusable"
        raise DataError(
            f"Could not read the image '{name}' ({parent}): it is missing, corrupt, "
            "truncated, too large or not an image. Replace it with a good copy or remove it from the folder."
        ) from exc
    try:
        return _to_rgb(upright)
    except (ValueError, OSError) as exc:
        raise DataError(
            f"The image '{name}' uses the colour mode '{upright.mode}', which cannot be "
            "converted to RGB. Re-save it as an ordinary RGB PNG or JPEG."
        ) from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded Pillow mode to 8-bit RGB without losing the picture."""
    if img.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(img).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        # A plain convert("RGB") would keep the colour hidden under transparent pixels,
        # often black; the user sees white (or a checkerboard), so composite over white.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    # P, L, 1, CMYK, YCbCr, RGB: Pillow's own conversions are right for these.
    return img.convert("RGB")


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Scale 16-bit greyscale (0..65535) down to 8-bit (0..255).

    Pillow's convert("L") clips instead of scaling, which turns most 16-bit images white.
    Mode "I" (32-bit int) is how Pillow hands over 16-bit files of some formats, so it is
    treated as 16-bit too; values outside 0..65535 are clipped.
    """
    values = np.asarray(img).astype(np.float64)
    scaled = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


# --------------------------------------------------------------------------- geometry


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize keeping the aspect ratio so that the shorter side is exactly `size` pixels."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return resize_to_cover(img, (size, size))


def resize_to_cover(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Resize keeping the aspect ratio so that the image covers `target` (width, height): one side exactly, the
    other at least (a square target: the shorter side becomes its side)."""
    new_size = cover_size(*img.size, target)
    if new_size == img.size:
        return img.copy()
    # LANCZOS is sharpest for shrinking; when enlarging it rings, BICUBIC is smoother.
    upscaling = new_size[0] > img.size[0] or new_size[1] > img.size[1]
    resample = Image.Resampling.BICUBIC if upscaling else Image.Resampling.LANCZOS
    return img.resize(new_size, resample=resample)


def crop_box(
    width: int,
    height: int,
    size: int | tuple[int, int],
    center: bool,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a `size` crop (a side, or (width, height)) inside a width x height image.

    Centred when `center` is true or no generator is given; otherwise the offset is drawn from
    `generator`, so a run with the same seed sees the same crops.
    """
    crop_w, crop_h = (size, size) if isinstance(size, int) else size
    if width < crop_w or height < crop_h:
        raise ValueError(f"cannot crop {crop_w}x{crop_h} from a {width}x{height} image")
    if center or generator is None:
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
    else:
        # Always draw both offsets so the generator advances the same way for every image.
        left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator).item())
        top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator).item())
    return left, top, left + crop_w, top + crop_h


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float32 (3, H, W) tensor scaled to [-1, 1], as the VAE expects."""
    if img.mode != "RGB":
        # Converting here would hide alpha/16-bit mistakes; load_rgb does it properly.
        raise ValueError(f"to_tensor needs an RGB image (use load_rgb), got mode {img.mode!r}")
    array = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    return tensor.to(torch.float32) / 127.5 - 1.0


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Geometry:
    """How one training view was made from its image file, in pixels, (height, width) / (top, left) order."""

    original: tuple[int, int]  # the file's size before resizing
    crop: tuple[int, int]  # the crop's top-left corner in the resized image, mirrored when the view is flipped
    target: tuple[int, int]  # the size of the view the model trains on
    flipped: bool = False


class ImageSet:
    """Decoded training images kept in memory, each already scaled to cover its bucket (the training size: the
    resolution's square without buckets), with one prompt each."""

    def __init__(
        self,
        items: list[ImageItem],
        prompts: list[str],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        buckets: list[Size] | None = None,
    ) -> None:
        if len(items) != len(prompts):
            raise ValueError(f"got {len(items)} images but {len(prompts)} prompts")
        if buckets is not None and len(buckets) != len(items):
            raise ValueError(f"got {len(items)} images but {len(buckets)} buckets")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.prompts = list(prompts)
        self.buckets: list[Size] = list(buckets) if buckets is not None else [(resolution, resolution)] * len(items)
        # Decode once up front: a bad file fails now, before any training time is spent, and
        # DreamBooth sets are small enough (tens of images) to keep resized in memory.
        self._images: list[Image.Image] = []
        self._original_sizes: list[tuple[int, int]] = []  # (height, width) of each file, for SDXL's size conditioning
        for item, bucket in zip(items, self.buckets):  # one full-size image in memory at a time
            img = load_rgb(item.path)
            self._original_sizes.append((img.height, img.width))
            self._images.append(resize_to_cover(img, bucket))

    def __len__(self) -> int:
        return len(self._images)

    def get(self, index: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, str]:
        """A (3, H, W) tensor in [-1, 1] (the image's bucket size) and its prompt.

        With a generator: random crop (unless center_crop) and a coin-flip mirror (if
        random_flip), drawn only from `generator`. Without one: centre crop, no flip.
        """
        tensor, prompt, _ = self.sample(index, generator)
        return tensor, prompt

    def sample(self, index: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, str, Geometry]:
        """As `get`, with the geometry of the view it gives (what SDXL's size / crop conditioning is built from)."""
        img = self._images[index]
        box = crop_box(*img.size, self.buckets[index], self.center_crop, generator)
        tensor = to_tensor(img.crop(box))
        flipped = generator is not None and self.random_flip and torch.rand((), generator=generator).item() < 0.5
        if flipped:
            tensor = torch.flip(tensor, dims=[2])
        return tensor, self.prompts[index], self.geometry(index, box, flipped)

    def geometry(self, index: int, box: tuple[int, int, int, int], flipped: bool) -> Geometry:
        """Where crop `box` (left, top, right, bottom) of the resized image sits, as the model sees it: a mirrored
        view puts the crop's left edge at width - right (kohya's rule for SDXL's crop coordinates)."""
        width = self._images[index].size[0]
        left, top, right, bottom = box
        x = width - right if flipped else left
        return Geometry(self._original_sizes[index], (top, x), (bottom - top, right - left), flipped)

    def cached_variants(self, index: int) -> list[torch.Tensor]:
        """The deterministic views worth caching as latents: the centre crop, plus its mirror
        when random_flip is on. Random crops cannot be cached."""
        return [tensor for tensor, _ in self.cached_views(index)]

    def cached_views(self, index: int) -> list[tuple[torch.Tensor, Geometry]]:
        """`cached_variants` with the geometry of each view."""
        centre, _, geometry = self.sample(index)
        if not self.random_flip:
            return [(centre, geometry)]
        box = crop_box(*self._images[index].size, self.buckets[index], center=True)
        return [(centre, geometry), (torch.flip(centre, dims=[2]), self.geometry(index, box, True))]

    def preview(self, index: int) -> Image.Image:
        """The centre crop at the image's training size, for the UI's crop preview."""
        img = self._images[index]
        return img.crop(crop_box(*img.size, self.buckets[index], center=True))


def caption_prompts(items: list[ImageItem], default_prompt: str) -> list[str]:
    """Each image's caption, or `default_prompt` (the instance prompt) where it has none.

    DataError when an image has no caption and there is no prompt to fall back on.
    """
    fallback = default_prompt.strip()
    uncaptioned = [shown_name(item.path.name) for item in items if not item.caption]
    if uncaptioned and not fallback:
        shown = ", ".join(uncaptioned[:_MAX_NAMES_IN_MESSAGE])
        more = len(uncaptioned) - _MAX_NAMES_IN_MESSAGE
        if more > 0:
            shown += f" and {more} more"
        raise DataError(
            f"{len(uncaptioned)} image(s) have no caption and no instance prompt is set: {shown}. "
            'Set an instance prompt such as "a photo of sks dog", or add a .txt caption file '
            "next to each image with the same name (img01.png -> img01.txt)."
        )
    return [item.caption or fallback for item in items]
