"""Does DreamBooth work? Measure an adapter trained on the demo subject against the demo base model.

    .venv/bin/python tools/measure_dreambooth.py RUN.safetensors [--seeds 8]

- subject fidelity: the mean `subject_score` (core/demo.py: share of object pixels in the subject's
  two colours, halved when only one is present) of images for the instance prompt, with the adapter
  and without it (the base model has never seen the pattern, so it scores near 0);
- class preservation: the mean absolute pixel difference (0-255) between images made with and
  without the adapter, same prompt and seed, for the class prompt and for an unrelated prompt.
  Small means the model still draws what it drew before; prior preservation should keep it small.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import adapters, demo  # noqa: E402
from core.models import load_base_model  # noqa: E402
from core.sampling import generate, make_pipeline  # noqa: E402

UNRELATED_PROMPT = "a blue circle on a white background"
STEPS, GUIDANCE = 20, 5.0


def images_for(pipe, prompt: str, seeds) -> list:
    return generate(pipe, [prompt] * len(seeds), list(seeds), steps=STEPS, guidance=GUIDANCE, size=demo.SIZE)


def pixel_drift(a: list, b: list) -> float:
    return float(np.mean([np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() for x, y in zip(a, b)]))


def measure(adapter_path: str | Path, seeds=range(8), base_spec: str = "demo") -> dict:
    base = load_base_model(base_spec)
    pipe = make_pipeline(base)
    prompts = {"instance": demo.SUBJECT_PROMPT, "class": demo.SUBJECT_CLASS_PROMPT, "unrelated": UNRELATED_PROMPT}
    before = {k: images_for(pipe, p, seeds) for k, p in prompts.items()}
    adapters.load_into(base, adapters.read_adapter(adapter_path), "subject")
    adapters.set_weights(base, {"subject": 1.0})
    after = {k: images_for(pipe, p, seeds) for k, p in prompts.items()}
    score = lambda imgs: float(np.mean([demo.subject_score(im) for im in imgs]))  # noqa: E731
    return {
        "fidelity_base": score(before["instance"]), "fidelity_adapter": score(after["instance"]),
        "class_drift": pixel_drift(before["class"], after["class"]),
        "unrelated_drift": pixel_drift(before["unrelated"], after["unrelated"]),
        "class_subject_score": score(after["class"]),
        "images": after, "base_images": before,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter")
    p.add_argument("--seeds", type=int, default=8)
    args = p.parse_args()
    m = measure(args.adapter, range(args.seeds))
    print(json.dumps({k: round(v, 4) for k, v in m.items() if isinstance(v, float)}, indent=1))


if __name__ == "__main__":
    main()
