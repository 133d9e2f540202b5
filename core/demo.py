"""The procedural world of the embedded demo model: coloured shapes on plain backgrounds.

Used to train the demo base model (tools/train_demo_model.py), to draw the demo subject (a star
with a two-colour pattern the base model never saw), and to measure what the models generate.
Everything is a pure function of its random generator, so data sets are reproducible.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and downsample: smooth, anti-aliased edges

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross"]
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 30), "purple": (140, 50, 180), "orange": (245, 140, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}

# The demo subject: a star whose left half is cyan and right half is magenta. Neither colour is in COLOURS,
# so the base model has never drawn it; "star" is a class it knows.
SUBJECT_COLOURS = ((0, 200, 210), (230, 30, 200))
SUBJECT_TOKEN = "tms"  # a rare word the small demo text encoder tells apart from "a" well (see README)
SUBJECT_PROMPT = f"a photo of {SUBJECT_TOKEN} star"
SUBJECT_CLASS_PROMPT = "a photo of a star"
SUBJECT_DIR = Path(__file__).resolve().parent / "assets" / "demo_subject"


@dataclass
class Scene:
    shape: str
    colour: str
    background: str
    size: float  # radius as a fraction of the image side
    cx: float
    cy: float
    angle: float  # radians


def random_scene(rng: random.Random, shape: str | None = None, colour: str | None = None,
                 background: str | None = None) -> Scene:
    size = rng.uniform(0.2, 0.38)
    margin = size + 0.04
    return Scene(shape or rng.choice(SHAPES), colour or rng.choice(list(COLOURS)),
                 background or rng.choice(list(BACKGROUNDS)), size, rng.uniform(margin, 1 - margin),
                 rng.uniform(margin, 1 - margin), rng.uniform(0, 2 * math.pi))


def outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon points of a shape of 'radius' r (circle: a 64-gon)."""
    def ring(n, radius_of, start):
        return [(cx + radius_of(k) * math.cos(start + 2 * math.pi * k / n),
                 cy + radius_of(k) * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "circle":
        return ring(64, lambda k: r, 0)
    if shape == "square":
        return ring(4, lambda k: r * 1.05, angle + math.pi / 4)
    if shape == "triangle":
        return ring(3, lambda k: r * 1.15, angle - math.pi / 2)
    if shape == "hexagon":
        return ring(6, lambda k: r, angle)
    if shape == "star":
        return ring(10, lambda k: r * 1.15 if k % 2 == 0 else r * 0.48, angle - math.pi / 2)
    if shape == "cross":
        w = r * 0.36
        arm = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, pattern: tuple | None = None) -> Image.Image:
    """Draw a scene as a 64x64 RGB image; `pattern` (two colours) splits the shape into left / right halves."""
    big = SIZE * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    pts = outline(scene.shape, scene.cx * big, scene.cy * big, scene.size * big, scene.angle)
    if pattern is None:
        ImageDraw.Draw(img).polygon(pts, fill=COLOURS[scene.colour])
    else:
        mask = Image.new("L", (big, big), 0)
        ImageDraw.Draw(mask).polygon(pts, fill=255)
        left = Image.new("RGB", (big, big), pattern[0])
        right = Image.new("RGB", (big, big), pattern[1])
        split = Image.new("L", (big, big), 0)
        ImageDraw.Draw(split).rectangle((0, 0, int(scene.cx * big), big), fill=255)
        two = Image.composite(left, right, split)
        img = Image.composite(two, img, mask)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def caption(scene: Scene, rng: random.Random) -> str:
    """Varied phrasings, sometimes leaving out colour or background, so partial prompts ('a star') work too."""
    s, c, b = scene.shape, scene.colour, scene.background
    return rng.choices([
        f"a {c} {s} on a {b} background", f"a photo of a {c} {s} on a {b} background", f"a {c} {s}",
        f"a photo of a {c} {s}", f"a {s} on a {b} background", f"a photo of a {s}", f"a {s}",
    ], weights=[40, 15, 15, 10, 8, 6, 6])[0]


def subject_scene(rng: random.Random) -> Scene:
    return random_scene(rng, shape="star", colour="red")


def write_subject(folder: Path = SUBJECT_DIR, n: int = 5, seed: int = 7) -> list[Path]:
    """The demo subject's instance images: the two-colour star at varied size, place, angle and background."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    backgrounds = ["white", "gray", "black", "white", "gray"]
    for i in range(n):
        scene = random_scene(rng, shape="star", colour="red", background=backgrounds[i % len(backgrounds)])
        path = folder / f"star_{i}.png"
        render(scene, pattern=SUBJECT_COLOURS).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Measuring generated images
# --------------------------------------------------------------------------------------------

def background_colour(img: np.ndarray) -> np.ndarray:
    """The median colour of the 2-pixel border: the background, as shapes never touch the edge."""
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def object_mask(img: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels that differ clearly from the background colour."""
    return np.linalg.norm(img.astype(np.float32) - background_colour(img), axis=-1) > threshold


def object_colour(image: Image.Image) -> np.ndarray | None:
    """The median colour of the object's pixels (None: no object found)."""
    img = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = object_mask(img)
    return np.median(img[mask], axis=0) if mask.sum() >= 20 else None


def palette_colour(rgb: np.ndarray | None) -> str | None:
    """The palette colour nearest to `rgb` (None for None)."""
    if rgb is None:
        return None
    names = list(COLOURS)
    return names[int(np.argmin([np.linalg.norm(rgb - np.array(COLOURS[n])) for n in names]))]


def dominant_colour(image: Image.Image) -> str | None:
    """The palette colour nearest to the median colour of the object's pixels (None: no object found)."""
    return palette_colour(object_colour(image))


def subject_score(image: Image.Image) -> float:
    """How much the image shows the subject's pattern, 0 (a one-colour shape, or nothing) to 1 (the pattern).

    The subject is a shape whose left half has the first subject colour and whose right half the second.
    The score is the colour difference between the object's left and right halves (split at the object's
    centre, median colour of each), projected on the subject's own difference (first minus second colour)
    and divided by its length: the instance images score about 0.9-1, one-colour shapes about 0, and a
    left-bluish / right-pinkish star in between, by how far its halves move towards the subject's colours.
    """
    img = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = object_mask(img)
    if mask.sum() < 20:
        return 0.0
    xs = np.nonzero(mask)[1]
    centre = (xs.min() + xs.max()) / 2
    columns = np.arange(img.shape[1])[None, :].repeat(img.shape[0], axis=0)
    left, right = img[mask & (columns < centre)], img[mask & (columns > centre)]
    if len(left) < 5 or len(right) < 5:
        return 0.0
    want = np.array(SUBJECT_COLOURS[0], np.float32) - np.array(SUBJECT_COLOURS[1], np.float32)
    have = np.median(left, axis=0) - np.median(right, axis=0)
    return float(np.clip(have @ want / (want @ want), 0.0, 1.0))


CLASSIFIER_PATH = Path(__file__).resolve().parent / "assets" / "shape_classifier.safetensors"


def shape_classifier():
    """A small CNN that names the shape in a 64x64 image (trained by `train_shape_classifier`)."""
    import torch.nn as nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), *block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, len(SHAPES)))


def _augmented_batch(rng: random.Random, n: int):
    """Rendered shapes in any colour (not only the palette), blurred and noised like generated images."""
    import torch
    from PIL import ImageFilter

    images, labels = [], []
    for _ in range(n):
        scene = random_scene(rng)
        img = render(scene, pattern=None if rng.random() < 0.8 else (tuple(rng.randrange(256) for _ in range(3)),) * 2)
        if rng.random() < 0.7:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
        arr = np.asarray(img, dtype=np.float32) + np.random.default_rng(rng.randrange(2**31)).normal(0, rng.uniform(0, 12), (SIZE, SIZE, 3))
        images.append(np.clip(arr, 0, 255) / 127.5 - 1)
        labels.append(SHAPES.index(scene.shape))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float(), torch.tensor(labels)


def train_shape_classifier(steps: int = 1500, seed: int = 0, path: Path = CLASSIFIER_PATH):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = shape_classifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for step in range(steps):
        x, y = _augmented_batch(rng, 64)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = _augmented_batch(random.Random(seed + 1), 600)
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata={"accuracy": f"{accuracy:.4f}"})
    return accuracy


def load_shape_classifier():
    from safetensors.torch import load_file

    net = shape_classifier()
    net.load_state_dict(load_file(str(CLASSIFIER_PATH)))
    return net.eval()


def classify_shapes(net, images: list[Image.Image]) -> list[str]:
    import torch

    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1 for im in images]))
    with torch.no_grad():
        return [SHAPES[i] for i in net(x.permute(0, 3, 1, 2)).argmax(1).tolist()]
