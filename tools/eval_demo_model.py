"""Measure the demo base model: does it draw the asked colour and shape?

    .venv/bin/python tools/eval_demo_model.py [--base demo] [--seeds 2] [--grid out.png]

For every prompt "a {colour} {shape} on a {background} background" of the training distribution
(6 colours x 6 shapes x 3 backgrounds = 108 prompts) and held-out seeds (never used in training),
it generates an image and checks it automatically: the colour is the palette colour nearest to the
median of the object's pixels (pixels far from the border colour); the shape is named by a small
CNN trained on the synthetic shapes (core/assets/shape_classifier.safetensors, 99.7% on held-out
renderings). Prints one JSON object: accuracies overall and per shape / colour.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import demo  # noqa: E402
from core.models import load_base_model  # noqa: E402
from core.sampling import generate, make_pipeline  # noqa: E402

GUIDANCE = 5.0
STEPS = 25


def evaluate(base, seeds_per_prompt: int = 1, first_seed: int = 100_000, steps: int = STEPS, guidance: float = GUIDANCE,
             combos=None, batch: int = 54):
    """Generate and check; returns (report dict, list of (prompt, image, colour_ok, shape_ok))."""
    combos = combos or list(itertools.product(demo.COLOURS, demo.SHAPES, demo.BACKGROUNDS))
    jobs = [(c, s, b, first_seed + k * len(combos) + i) for k in range(seeds_per_prompt) for i, (c, s, b) in enumerate(combos)]
    pipe = make_pipeline(base)
    net = demo.load_shape_classifier()
    results = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        prompts = [f"a {c} {s} on a {b} background" for c, s, b, _ in chunk]
        images = generate(pipe, prompts, [seed for *_, seed in chunk], steps=steps, guidance=guidance, size=demo.SIZE)
        shapes = demo.classify_shapes(net, images)
        for (c, s, b, seed), prompt, img, shape in zip(chunk, prompts, images, shapes):
            results.append({"prompt": prompt, "seed": seed, "colour": c, "shape": s, "colour_ok": demo.dominant_colour(img) == c,
                            "shape_ok": shape == s, "image": img})
    n = len(results)

    def acc(rows, key):
        return round(sum(r[key] for r in rows) / max(len(rows), 1), 4)

    report = {
        "images": n, "steps": steps, "guidance": guidance,
        "colour_accuracy": acc(results, "colour_ok"), "shape_accuracy": acc(results, "shape_ok"),
        "both_accuracy": round(sum(r["colour_ok"] and r["shape_ok"] for r in results) / n, 4),
        "per_shape": {s: acc([r for r in results if r["shape"] == s], "shape_ok") for s in demo.SHAPES},
        "per_colour": {c: acc([r for r in results if r["colour"] == c], "colour_ok") for c in demo.COLOURS},
    }
    return report, results


def grid(results, path: Path, columns: int = 18) -> None:
    from PIL import Image

    rows = (len(results) + columns - 1) // columns
    out = Image.new("RGB", (columns * 66, rows * 66), (255, 255, 255))
    for i, r in enumerate(results):
        out.paste(r["image"], ((i % columns) * 66, (i // columns) * 66))
    out.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="demo")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (108 prompts each)")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--guidance", type=float, default=GUIDANCE)
    p.add_argument("--grid", help="also save a grid of all images to this PNG")
    args = p.parse_args()
    t0 = time.time()
    report, results = evaluate(load_base_model(args.base), args.seeds, steps=args.steps, guidance=args.guidance)
    report["seconds"] = round(time.time() - t0, 1)
    if args.grid:
        grid(results, Path(args.grid))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
