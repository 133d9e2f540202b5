"""Named datasets in the workspace: folders of copied images with their captions.

`workspace/datasets/<name>/` holds copies of the user's pictures (the originals are only read),
one optional `<image>.txt` caption beside each image, and `manifest.json` (where each image came
from, and the dataset's identifier word and class noun). Every write is atomic.
"""
from __future__ import annotations

import hashlib
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .buckets import Size, cover_size, describe
from .data import (IMAGE_EXTENSIONS, LINK_REASON, ImageItem, check_image_file, list_folder_files, scan_folder,
                   shown_name)
from .errors import DataError
from .fileio import atomic_path, write_json, write_text

DATASETS_DIR = "datasets"
MANIFEST = "manifest.json"  # ignored by data.scan_folder
REMOVED_DIR = ".removed"  # removed images are moved here (dot folders are never scanned)
CAPTION_EXT = ".txt"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")
# Longest image name stem kept in a dataset, in UTF-8 bytes: with "-NN", the extension and the temp-file
# padding of fileio.atomic_path it stays well under the 255-byte file name limit of common file systems.
_MAX_STEM_BYTES = 120

# Identifiers the community already uses; each is one CLIP token with little meaning of its own.
KNOWN_IDENTIFIERS = ["sks", "ohwx", "bnha", "phol", "nlwx", "azwx"]
# Rare single tokens that nevertheless mean something; never suggested.
_MEANINGFUL = {"fck", "nips", "imdb", "mcu", "cgi", "std", "vfx", "smb", "mmo", "nsfw", "xxx", "sexy", "porn", "kkk"}


# --------------------------------------------------------------------------- datasets

def datasets_root(workspace: str | Path) -> Path:
    return Path(workspace).expanduser() / DATASETS_DIR


def list_datasets(workspace: str | Path) -> list[str]:
    root = datasets_root(workspace)
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=str.lower)


def check_name(name: str, what: str = "dataset") -> str:
    name = (name or "").strip()
    if not _NAME.fullmatch(name) or name.endswith("."):
        raise DataError(f"{name!r} cannot be a {what} name: use letters, digits, spaces, '-', '_' or '.' "
                        "(up to 64 characters, starting with a letter or digit).")
    return name


def create_dataset(workspace: str | Path, name: str) -> Path:
    """Make `workspace/datasets/<name>/`; refuse a name that is already taken."""
    folder = datasets_root(workspace) / check_name(name)
    if folder.exists():
        raise DataError(f"A dataset called {name.strip()!r} already exists: pick it from the list instead.")
    folder.mkdir(parents=True)
    write_json(folder / MANIFEST, {"sources": {}})
    return folder


def dataset_dir(workspace: str | Path, name: str) -> Path:
    """The folder of an existing dataset; a plain DataError when there is none."""
    if not (name or "").strip():
        raise DataError("No dataset chosen: create one on the Dataset tab (or pick one from the list).")
    folder = datasets_root(workspace) / check_name(name)
    if not folder.is_dir():
        raise DataError(f"There is no dataset called {name!r} in {datasets_root(workspace)}.")
    return folder


def read_manifest(folder: str | Path) -> dict:
    import json

    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"sources": {}}
    if not isinstance(data, dict):
        return {"sources": {}}
    if not isinstance(data.get("sources"), dict):
        data["sources"] = {}
    return data


def update_manifest(folder: str | Path, **values) -> dict:
    data = read_manifest(folder)
    data.update(values)
    write_json(Path(folder) / MANIFEST, data)
    return data


# --------------------------------------------------------------------------- adding images

@dataclass
class AddReport:
    added: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)

    def summary(self) -> str:
        parts = [f"Added {len(self.added)} image{'' if len(self.added) == 1 else 's'}."]
        if self.skipped:
            parts.append("Not added: " + "; ".join(f"{shown_name(n)}: {r}" for n, r in self.skipped) + ".")
        return " ".join(parts)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _free_name(folder: Path, name: str) -> str:
    """`name`, or `name-1`, `name-2`... so that no other file in the folder has the same stem
    (captions are matched to images by stem).

    The name is first made fit to keep: printable (bad bytes become U+FFFD), not hidden (leading dots
    and spaces dropped: a dot file is never scanned for training) and at most _MAX_STEM_BYTES long
    (a 250-byte name plus a temp suffix failed with "File name too long").
    """
    taken = {p.stem.lower() for p in folder.iterdir()}
    stem, suffix = Path(name).stem, Path(name).suffix
    stem = shown_name(stem).lstrip(". ").encode("utf-8")[:_MAX_STEM_BYTES].decode("utf-8", "ignore") or "image"
    candidate, i = stem, 1
    while candidate.lower() in taken:
        candidate, i = f"{stem}-{i}", i + 1
    return candidate + suffix


def _copy(src: Path, dest: Path) -> None:
    """Copy through a temp file and a rename: a crash never leaves half an image in the dataset."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def add_images(folder: str | Path, files: list[str | Path], min_size: int = 64, uploaded: bool = False) -> AddReport:
    """Copy the usable images among `files` into the dataset `folder`; the originals are only read.

    Each file is decoded first: corrupt files, non-images and too-small images are not copied and are
    listed with the reason. A caption file with the same stem among `files` (or beside the image) is copied
    along. A file whose bytes are already in the dataset is skipped; a name clash gets a "-1" suffix.
    """
    folder = Path(folder)
    paths = [Path(f) for f in files]
    captions: dict[str, list[Path]] = {}
    for p in paths:
        if p.suffix.lower() == CAPTION_EXT:
            captions.setdefault(p.stem, []).append(p)
    present = {_digest(p) for p in folder.iterdir()
               if p.is_file() and not p.is_symlink() and p.suffix.lower() in IMAGE_EXTENSIONS}
    manifest = read_manifest(folder)
    report = AddReport()
    for src in paths:
        if src.suffix.lower() == CAPTION_EXT:
            continue
        if not (src.is_file() or src.is_symlink()):  # a link goes on to check_image_file, which says why it is refused
            report.skipped.append((src.name, "not found"))
            continue
        checked = check_image_file(src, min_size)
        if isinstance(checked, str):
            report.skipped.append((src.name, checked))
            continue
        digest = _digest(src)
        if digest in present:
            report.skipped.append((src.name, "already in the dataset"))
            continue
        name = _free_name(folder, src.name)
        _copy(src, folder / name)
        present.add(digest)
        caption, problem = _caption_for(src, captions)
        if caption is not None and problem is None:
            try:
                _copy(caption, folder / (Path(name).stem + CAPTION_EXT))
            except OSError as exc:  # e.g. no permission: the image stays, the report says why its caption did not
                problem = f"cannot be read ({exc.strerror or exc})"
        if problem:
            report.skipped.append((caption.name, problem))
        manifest["sources"][name] = "uploaded" if uploaded else shown_name(str(src))
        report.added.append(name)
    write_json(folder / MANIFEST, manifest)
    return report


def _caption_for(image: Path, captions: dict[str, list[Path]]) -> tuple[Path | None, str | None]:
    """(the caption file of `image` or None, and None if it can be copied or else the reason it is not).

    The caption beside the image wins; otherwise the one caption among the given files with the image's
    stem (uploads each arrive in a folder of their own). Two such captions for two uploads named alike
    cannot be told apart, so neither is used (it used to be the last one, for both images). A caption
    that is a link is not followed, as with images.
    """
    sibling = image.with_suffix(CAPTION_EXT)
    if sibling.is_file() or sibling.is_symlink():
        found = [sibling]
    else:
        found = [p for p in captions.get(image.stem, []) if p.is_file() or p.is_symlink()]
    if not found:
        return None, None
    if len(found) > 1:
        return found[0], (f"{len(found)} caption files have this name and it is unclear which belongs to "
                          f"{shown_name(image.name)}: none copied, type its caption in the Captions table")
    if found[0].is_symlink():
        return found[0], LINK_REASON.replace("the picture", "the caption text")
    return found[0], None


def add_folder(folder: str | Path, source: str | Path, min_size: int = 64) -> AddReport:
    """Copy the images of the folder `source` (not its sub-folders) and their captions into the dataset."""
    source = Path(str(source).strip()).expanduser()
    if not str(source).strip() or not source.is_dir():
        raise DataError(f"The folder {str(source)!r} does not exist: check the path (e.g. /home/me/photos/rex).")
    if source.resolve() == Path(folder).resolve():
        raise DataError("That is the dataset's own folder: choose the folder where your original photos are.")
    files = list_folder_files(source)  # the same files a training run on `source` would see, links included
    report = add_images(folder, files, min_size)
    if not files:
        report.skipped.append((str(source), "the folder is empty"))
    return report


def remove_images(folder: str | Path, names: list[str]) -> list[str]:
    """Move images (and their captions) into the dataset's `.removed/` folder; nothing is deleted."""
    folder = Path(folder)
    moved = []
    for name in names:
        path = folder / Path(name).name
        if path.parent != folder or not path.is_file() or path.name == MANIFEST:
            continue
        for p in (path, path.with_suffix(CAPTION_EXT)):
            if p.is_file():
                dest = folder / REMOVED_DIR / p.name
                dest.parent.mkdir(exist_ok=True)
                p.replace(dest)
        moved.append(path.name)
    return moved


# --------------------------------------------------------------------------- captions

def read_captions(folder: str | Path, min_size: int = 64) -> list[tuple[str, str]]:
    """(image name, caption or "") for every usable image, in name order."""
    return [(item.path.name, item.caption or "") for item in scan_folder(folder, min_size=min_size).images]


def write_captions(folder: str | Path, captions: dict[str, str]) -> int:
    """Write each caption to `<image stem>.txt` atomically; an empty caption removes the file
    (the image then uses the instance prompt). Returns how many files changed."""
    folder = Path(folder)
    changed = 0
    for name, text in captions.items():
        image = folder / Path(name).name
        if not image.is_file():
            raise DataError(f"{name} is not an image of this dataset (it may have been removed); reload the dataset.")
        path = image.with_suffix(CAPTION_EXT)
        text = " ".join((text or "").split())  # one line: newlines in a caption are never intended
        old = path.read_text(encoding="utf-8-sig").strip() if path.is_file() else ""
        if text == old:
            continue
        if text:
            write_text(path, text + "\n")
        elif path.is_file():
            path.unlink()
        changed += 1
    return changed


# --------------------------------------------------------------------------- crops

def crop_note(item: ImageItem, resolution: int, center: bool = True, bucket: Size | None = None) -> str:
    """What training does to one image, in words: '800x600: the centre 600x600 square, scaled down to 512x512', or
    at a bucket of another shape '1200x1600: scaled to 528x704, the centre 384x704 kept'. No bucket: the square."""
    width, height = bucket or (resolution, resolution)
    if width == height:
        return square_note(item, width, center)
    w, h = item.width, item.height
    cover = cover_size(w, h, (width, height))
    if cover == (w, h):
        scale = "used at its own size"
    elif cover[0] > w:
        scale = f"scaled UP to {describe(cover)} (it will look soft; a larger photo is better)"
    else:
        scale = f"scaled to {describe(cover)}"
    if cover == (width, height):
        return f"{w}x{h}: {scale}"
    return f"{w}x{h}: {scale}, {'the centre' if center else 'a random'} {width}x{height} kept"


def square_note(item: ImageItem, resolution: int, center: bool = True) -> str:
    """crop_note at a square of `resolution` px: the square crop first, then the scale."""
    w, h = item.width, item.height
    side = min(w, h)
    what = "the centre" if center else "a random"
    crop = "" if w == h else f"{what} {side}x{side} square, "
    if side > resolution:
        scale = f"scaled down to {resolution}x{resolution}"
    elif side < resolution:
        scale = f"scaled UP to {resolution}x{resolution} (it will look soft; a larger photo is better)"
    else:
        scale = "used as it is" if w == h else f"kept at {resolution}x{resolution}"
    return f"{w}x{h}: {crop}{scale}"


# --------------------------------------------------------------------------- prompts

def token_pieces(word: str, tokenizer=None) -> list[str]:
    """How the CLIP tokenizer splits `word` (e.g. 'mydog' -> ['my', 'dog'])."""
    if tokenizer is None:
        from .base_model import clip_tokenizer

        tokenizer = clip_tokenizer()
    ids = tokenizer(word.strip(), add_special_tokens=False).input_ids
    return [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids)]


def suggest_identifiers(n: int = 6, seed: int = 0, tokenizer=None) -> list[str]:
    """Rare words that the CLIP tokenizer keeps as one token: good identifiers for a new subject.

    Seed 0 starts with the well-known ones (sks, ohwx, ...); other seeds draw from the rarest third of the
    vocabulary: 3-4 letters, at most one vowel, so they read as nonsense rather than as a word.
    """
    if tokenizer is None:
        from .base_model import clip_tokenizer

        tokenizer = clip_tokenizer()
    vocab = tokenizer.get_vocab()
    pool = sorted(tok[:-4] for tok, i in vocab.items()
                  if i > 33000 and tok.endswith("</w>") and re.fullmatch(r"[a-z]{3,4}", tok[:-4])
                  and sum(c in "aeiouy" for c in tok[:-4]) <= 1 and tok[:-4] not in _MEANINGFUL)
    known = [w for w in KNOWN_IDENTIFIERS if len(token_pieces(w, tokenizer)) == 1]
    rest = [w for w in pool if w not in known]
    random.Random(seed).shuffle(rest)
    words = (known if seed == 0 else []) + rest
    return words[:n]


def article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def instance_prompt(identifier: str, noun: str) -> str:
    """'sks' + 'dog' -> 'a photo of sks dog'."""
    identifier, noun = identifier.strip(), noun.strip()
    if not identifier or not noun:
        return ""
    return f"a photo of {identifier} {noun}"


def class_prompt(noun: str) -> str:
    """'dog' -> 'a photo of a dog'."""
    noun = noun.strip()
    return f"a photo of {article(noun)} {noun}" if noun else ""
