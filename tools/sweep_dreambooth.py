"""Try DreamBooth settings on the demo: train each variant, measure it, print one table row per variant.

    .venv/bin/python tools/sweep_dreambooth.py VARIANTS.json [--jobs 2] [--seeds 8] [--out results.jsonl]

VARIANTS.json: {"name": {"type": "lora", "prior": true, "steps": 400, "overrides": ["train.learning_rate=4e-3"]}}
(steps and "class_images" default to the demo preset's own)
Each variant runs in its own process on one thread (`--jobs` at a time); rows are appended to `--out` as they
finish, so a long sweep can be read (and stopped) part-way. The metrics are tools/measure_dreambooth.py's.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEYS = ("fidelity", "class_kept", "class_colour_kept", "class_colour_distance", "class_colours_kept", "unrelated_kept", "class_fidelity")


def run_variant(name: str, spec: dict, work: str, seeds: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from tools.measure_dreambooth import measure, numbers, train_demo_adapter

    t0 = time.time()
    work_dir = Path(work)
    path = train_demo_adapter(spec.get("type", "lora"), spec.get("prior", True), work_dir / "runs",
                              work_dir / "class_images", steps=spec.get("steps"),
                              num_class_images=spec.get("class_images"), overrides=tuple(spec.get("overrides", ())),
                              tag=f"-{name}")
    trained = time.time() - t0
    result = numbers(measure({name: path}, range(seeds)))
    return {"name": name, **spec, "train_s": round(trained), **{k: result[name].get(k) for k in KEYS},
            "base_fidelity": result["base"]["fidelity"]}


def train_class_images(work: Path, variants: dict) -> None:
    """The class images the variants share, made before they start (two processes must not write one set)."""
    from core.config import load_config
    from tools.measure_dreambooth import train_demo_adapter

    wanted = [v.get("class_images") or load_config(preset=f"demo-{v.get('type', 'lora')}").data.num_class_images
              for v in variants.values() if v.get("prior", True)]
    if wanted:
        train_demo_adapter("lora", True, work / "runs", work / "class_images", steps=1, num_class_images=max(wanted),
                           tag="-class-images")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--work", default="workspace/dreambooth-sweep")
    p.add_argument("--out", default="workspace/dreambooth-sweep/results.jsonl")
    args = p.parse_args()
    variants = json.loads(Path(args.variants).read_text())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(Path(args.work) / "runs", ignore_errors=True)  # this tool's scratch runs (class images are kept)
    train_class_images(Path(args.work), variants)
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_variant, n, v, args.work, args.seeds): n for n, v in variants.items()}
        for f in as_completed(futures):
            try:
                row = f.result()
            except Exception as e:  # noqa: BLE001 - one broken variant must not end the sweep
                row = {"name": futures[f], "error": f"{type(e).__name__}: {e}"}
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
