"""Does DreamBooth work? Train adapters on the demo subject and measure them against the demo base model.

    .venv/bin/python tools/measure_dreambooth.py RUN.safetensors [...] [--seeds 8]
    .venv/bin/python tools/measure_dreambooth.py --train [--steps 200]   # train lora/loha/lokr (+ lora without
                                                                         # prior preservation), then measure

- subject fidelity: the mean `subject_score` (core/demo.py: share of object pixels in the subject's
  two colours, halved when only one is present) of images for the instance prompt, with the adapter
  and without it (the base model has never seen the pattern, so it scores near 0);
- class preservation: the mean absolute pixel difference (0-255) between images made with and
  without the adapter, same prompt and seed, for the class prompt and for an unrelated prompt.
  Small means the model still draws what it drew before; prior preservation should keep it small.

tests/test_dreambooth.py runs the same functions with the thresholds found here.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import adapters, demo  # noqa: E402
from core.config import load_config  # noqa: E402
from core.models import load_base_model  # noqa: E402
from core.sampling import generate, make_pipeline  # noqa: E402

UNRELATED_PROMPT = "a blue circle on a white background"
STEPS, GUIDANCE = 20, 5.0
SUBJECT_LEAK = 0.15  # a subject score above this: the image shows the subject's pattern
PROMPTS = {"instance": demo.SUBJECT_PROMPT, "class": demo.SUBJECT_CLASS_PROMPT, "unrelated": UNRELATED_PROMPT}


def train_demo_adapter(adapter_type: str, prior: bool, out_dir: Path, class_dir: Path, steps: int | None = None,
                       num_class_images: int | None = None, overrides: tuple[str, ...] = (), tag: str = "") -> Path:
    """A demo-preset run (no samples, no checkpoints; steps and class images as the preset says unless given);
    returns the adapter file."""
    from core.trainer import train

    name = f"{adapter_type}-{'prior' if prior else 'noprior'}{tag}"
    given = [f"train.max_steps={steps}"] * (steps is not None) + \
        [f"data.num_class_images={num_class_images}"] * (num_class_images is not None)
    cfg = load_config(preset=f"demo-{adapter_type}", overrides=[
        f"output.dir={out_dir}", f"output.name={name}", "train.sample_every=0", "train.checkpoint_every=0",
        "train.compare_at_end=false", f"train.prior_preservation={str(prior).lower()}", f"data.class_dir={class_dir}",
        *given, *overrides])
    run = train(cfg)
    return run / f"{name}.safetensors"


def images_for(pipe, prompt: str, seeds) -> list:
    return generate(pipe, [prompt] * len(seeds), list(seeds), steps=STEPS, guidance=GUIDANCE, size=demo.SIZE)


def pixel_drift(a: list, b: list) -> float:
    return float(np.mean([np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() for x, y in zip(a, b)]))


def fidelity(images: list) -> float:
    return float(np.mean([demo.subject_score(im) for im in images]))


def colour_kept(before: list, after: list) -> tuple[float, float]:
    """Per seed, does the adapter's image keep the base model's object colour? (share of seeds whose palette
    colour is the same, mean RGB distance of the object colours, 0-441; a lost object counts as 255)."""
    same, dist = [], []
    for a, b in zip(before, after):
        ca, cb = demo.object_colour(a), demo.object_colour(b)
        same.append(ca is not None and cb is not None and demo.palette_colour(ca) == demo.palette_colour(cb))
        dist.append(float(np.linalg.norm(ca - cb)) if ca is not None and cb is not None else 255.0)
    return float(np.mean(same)), float(np.mean(dist))


def colour_spread_kept(before: list, after: list) -> float:
    """How much of the base model's colour mix the images keep, 0-1: one minus the total-variation distance between
    the two histograms of palette colours (over all seeds; "no object" counts as a colour of its own). 1: the same
    mix of red, green, blue... stars; a collapse onto one colour scores the share that colour had before."""
    def histogram(images):
        names = [demo.dominant_colour(im) for im in images]
        return {n: names.count(n) / len(names) for n in set(names)}

    a, b = histogram(before), histogram(after)
    return 1.0 - 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def class_kept(images: list, shape: str, colour: str | None = None) -> float:
    """Share of images that still show a plain one-colour `shape` (of `colour`, if given): no subject pattern."""
    net = demo.load_shape_classifier()
    ok = [s == shape and demo.subject_score(im) < SUBJECT_LEAK and (colour is None or demo.dominant_colour(im) == colour)
          for im, s in zip(images, demo.classify_shapes(net, images))]
    return float(np.mean(ok))


def measure(adapter_paths: dict[str, str | Path], seeds=range(8), base_spec: str = "demo") -> dict:
    """{"base": base-model fidelity, name: metrics of that adapter alone at weight 1} (images included)."""
    base = load_base_model(base_spec)
    pipe = make_pipeline(base)
    before = {k: images_for(pipe, p, seeds) for k, p in PROMPTS.items()}
    out = {"base": {"fidelity": fidelity(before["instance"]), "class_kept": class_kept(before["class"], "star"),
                    "unrelated_kept": class_kept(before["unrelated"], "circle", "blue"), "images": before}}
    for name, path in adapter_paths.items():
        base = load_base_model(base_spec)  # fresh: peft cannot wrap a LoRA around a layer a LoHa/LoKr wrapped
        adapters.load_into(base.parts, adapters.read_adapter(path), "measured")  # (peft: no "." in a name)
        adapters.set_weights(base.parts, {"measured": 1.0})
        after = {k: images_for(make_pipeline(base), p, seeds) for k, p in PROMPTS.items()}
        out[name] = {
            "fidelity": fidelity(after["instance"]),
            "class_drift": pixel_drift(before["class"], after["class"]),
            "unrelated_drift": pixel_drift(before["unrelated"], after["unrelated"]),
            "class_fidelity": fidelity(after["class"]),  # the subject leaking into the plain class
            "class_kept": class_kept(after["class"], "star"),
            "unrelated_kept": class_kept(after["unrelated"], "circle", "blue"),
            "images": after,
        }
        out[name]["class_colour_kept"], out[name]["class_colour_distance"] = colour_kept(before["class"], after["class"])
        out[name]["class_colours_kept"] = colour_spread_kept(before["class"], after["class"])
    return out


def numbers(result: dict) -> dict:
    return {name: {k: round(v, 4) for k, v in m.items() if isinstance(v, float)} for name, m in result.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="*")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--train", action="store_true", help="train the four test adapters first (in --work)")
    p.add_argument("--measure-only", action="store_true", help="with --train: measure the adapters trained before")
    p.add_argument("--steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--work", default="workspace/dreambooth-check")
    args = p.parse_args()
    paths = {Path(a).stem: a for a in args.adapters}
    t0 = time.time()
    if args.train:
        work = Path(args.work)
        if not args.measure_only:
            shutil.rmtree(work / "runs", ignore_errors=True)  # this tool's scratch runs (class images are kept)
        for kind, prior in (("lora", True), ("loha", True), ("lokr", True), ("lora", False)):
            name = f"{kind}-{'prior' if prior else 'noprior'}"
            path = work / "runs" / name / f"{name}.safetensors"
            if not args.measure_only:
                path = train_demo_adapter(kind, prior, work / "runs", work / "class_images", steps=args.steps)
                print(f"trained {path} ({time.time() - t0:.0f} s)", flush=True)
            paths[name] = path
    print(json.dumps(numbers(measure(paths, range(args.seeds))), indent=1))
    print(f"{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
