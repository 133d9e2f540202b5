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


def train_demo_adapter(adapter_type: str, prior: bool, out_dir: Path, class_dir: Path, steps: int = 200,
                       num_class_images: int = 24, overrides: tuple[str, ...] = (), tag: str = "") -> Path:
    """A short demo-preset run (no samples, no checkpoints); returns the adapter file."""
    from core.trainer import train

    name = f"{adapter_type}-{'prior' if prior else 'noprior'}{tag}"
    cfg = load_config(preset=f"demo-{adapter_type}", overrides=[
        f"output.dir={out_dir}", f"output.name={name}", f"train.max_steps={steps}", "train.sample_every=0",
        "train.checkpoint_every=0", f"train.prior_preservation={str(prior).lower()}", f"data.class_dir={class_dir}",
        f"data.num_class_images={num_class_images}", *overrides])
    run = train(cfg)
    return run / f"{name}.safetensors"


def images_for(pipe, prompt: str, seeds) -> list:
    return generate(pipe, [prompt] * len(seeds), list(seeds), steps=STEPS, guidance=GUIDANCE, size=demo.SIZE)


def pixel_drift(a: list, b: list) -> float:
    return float(np.mean([np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() for x, y in zip(a, b)]))


def fidelity(images: list) -> float:
    return float(np.mean([demo.subject_score(im) for im in images]))


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
        adapters.load_into(base.parts, adapters.read_adapter(path), name)
        adapters.set_weights(base.parts, {name: 1.0})
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
    return out


def numbers(result: dict) -> dict:
    return {name: {k: round(v, 4) for k, v in m.items() if isinstance(v, float)} for name, m in result.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="*")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--train", action="store_true", help="train the four test adapters first (in --work)")
    p.add_argument("--measure-only", action="store_true", help="with --train: measure the adapters trained before")
    p.add_argument("--steps", type=int, default=400)
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
