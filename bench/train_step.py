"""Training speed and memory: this project's trainer against a plain reference loop, in one run.

    python -m bench.train_step                      # GPU: SD 1.5-shaped model, 512 px; CPU: the demo model
    python -m bench.train_step --model tiny --steps 4 --warmup 1      # seconds, anywhere (what the tests run)
    python -m bench.train_step --only ours-default,reference-lora --steps 40 --warmup 10
    python -m bench.train_step --model sdxl --steps 10 --warmup 3   # GPU: SDXL-shaped, 1024 px, the SDXL cases
    python -m bench.train_step --model flux --steps 6 --warmup 2    # GPU: FLUX.1-dev-shaped, 1024 px, the FLUX cases

Every case trains on 4 instance + 4 class images (random pixels: speed does not depend on content) with
prior preservation, so a step at batch 1 sees 1 instance + 1 class image. Models are built from configs
with random weights (`sd15` / `sdxl`: the shipped SD 1.5 / SDXL 1.0 configs; nothing is downloaded) or loaded
(`demo`, `tiny`, `tiny-sdxl`).

Cases (adapters r8 on the full UNet target set + the text encoder's q/v, as the issue asks):
- ours-default / ours-lowvram / ours-dora / ours-loha / ours-lokr: `core.trainer.train` with the sd15-lora,
  sd15-lora-lowvram preset settings (DoRA/LoHa/LoKr: the default preset with that adapter type);
- ours-batch2 / ours-batch8: the default preset at 2 and 8 instance images per step (throughput);
- reference-lora / -dora / -loha / -lokr: the plain loop in bench/reference.py (peft get_peft_model, fp16 autocast
  on a GPU, VAE encode and text encoder every step, AdamW, loss.item() every step);
- class-images: generation images/s, one at a time vs batched; preview: seconds per preview during training.
SDXL models (`sdxl`, `tiny-sdxl`) run their own cases instead:
- ours-24gb / ours-12gb / ours-8gb: `core.trainer.train` with the sdxl-lora-24gb / -12gb / -8gb preset settings as
  they are (on a CPU 8-bit AdamW, which needs a GPU, becomes AdamW);
- reference-lora: bench/reference.py's SDXL loop, what diffusers' train_dreambooth_lora_sdxl.py does per step.
FLUX.1 models (`flux`: FLUX.1-dev's shapes in bf16, random weights; `tiny-flux`) run theirs:
- ours-flux-24gb / ours-flux-16gb: the flux-dev-lora-24gb / -16gb presets as they are (8-bit / NF4 transformer);
- ours-flux-bf16: the 24 GB preset's settings with the transformer in bf16 at batch 1 and rank 16, the
  reference loop's own settings (what the two loops' speed-up compares);
- reference-lora: bench/reference.py's FLUX loop, what diffusers' train_dreambooth_lora_flux.py does per step.

Output: one JSON line per case (stdout, and --out FILE), then a table with ours/reference ratios.
Step times are medians after --warmup steps; memory is PyTorch's peak allocated / reserved on the GPU
(0 on the CPU), with the VRAM planner's estimate (core/vram.py) beside it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core import events as ev  # noqa: E402
from core.config import Config, TEXT_ENCODER_TARGETS, UNET_TARGETS_FULL, preset_dict  # noqa: E402
from core.base_model import BaseModel, clip_tokenizer  # noqa: E402
from core.models import load_base_model, parts_from_configs  # noqa: E402
from core.families.sdxl_parts import build_sdxl_from_configs  # noqa: E402
from core.single_file import read_config_folder, shipped_config_folder  # noqa: E402

GIB = 2 ** 30
OURS = {  # case -> (preset, overrides)
    "ours-default": ("sd15-lora", {}),
    "ours-lowvram": ("sd15-lora-lowvram", {}),
    "ours-dora": ("sd15-lora", {"adapter": {"type": "dora"}}),
    "ours-loha": ("sd15-lora", {"adapter": {"type": "loha"}}),
    "ours-lokr": ("sd15-lora", {"adapter": {"type": "lokr"}}),
    "ours-batch2": ("sd15-lora", {"train": {"batch_size": 2}}),
    "ours-batch8": ("sd15-lora", {"train": {"batch_size": 8}}),
    "ours-24gb": ("sdxl-lora-24gb", {}),
    "ours-12gb": ("sdxl-lora-12gb", {}),
    "ours-8gb": ("sdxl-lora-8gb", {}),
    "ours-flux-24gb": ("flux-dev-lora-24gb", {}),
    "ours-flux-16gb": ("flux-dev-lora-16gb", {}),
    # the 24 GB preset's settings with the transformer in bf16 at batch 1: the reference loop's memory settings
    "ours-flux-bf16": ("flux-dev-lora-24gb", {"model": {"quantize": "none"}, "train": {"batch_size": 1},
                                              "adapter": {"rank": 16, "alpha": 16}}),
}
# the presets' own adapters, not the shared r8 one
PRESET_AS_IS = ("ours-24gb", "ours-12gb", "ours-8gb", "ours-flux-24gb", "ours-flux-16gb", "ours-flux-bf16")
REFERENCE = {"reference-lora": "lora", "reference-dora": "dora", "reference-loha": "loha", "reference-lokr": "lokr"}
EXTRA = ("class-images", "preview")
ALL = (*OURS, *REFERENCE, *EXTRA)
CPU_DEFAULT = ("ours-default", "ours-dora", "ours-loha", "ours-lokr", "ours-batch2", "ours-batch8", "reference-lora",
               "reference-dora", "reference-loha", "reference-lokr", "class-images", "preview")
SDXL_DEFAULT = ("ours-24gb", "ours-12gb", "ours-8gb", "reference-lora")
FLUX_DEFAULT = ("ours-flux-bf16", "reference-lora", "ours-flux-24gb", "ours-flux-16gb")
# models built at full size from the shipped configs, random weights
SHAPED = {"sd15": "sd1", "sdxl": "sdxl", "flux": "flux"}


# --------------------------------------------------------------------------- models and data

def build_model(name: str, device: torch.device) -> BaseModel:
    """`sd15` / `sdxl`: full-size, random weights, built on `device` directly; else core.models.load_base_model."""
    if name not in SHAPED:
        return load_base_model(name)
    from diffusers import DDPMScheduler

    cfg = read_config_folder(shipped_config_folder(SHAPED[name], "epsilon"))
    torch.manual_seed(0)
    if name == "flux":
        return build_flux(cfg, device)
    with torch.device(device):
        if name == "sdxl":
            base = build_sdxl_from_configs(cfg, "sdxl-random")
        else:
            unet, text_encoder, vae = parts_from_configs(cfg)
            base = BaseModel("sd15-random", clip_tokenizer(), text_encoder, vae, unet,
                             DDPMScheduler.from_config(cfg["scheduler"]))
    for m in (*base.parts.values(), base.vae):  # random init can overflow fp16 in deep stacks; keep activations sane
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() > 1:
                    p.mul_(0.5)
    return base


def build_flux(cfg: dict, device: torch.device) -> BaseModel:
    """FLUX.1-dev's shapes with random weights (12 B transformer, T5-XXL), made on `device` and kept in bf16 (as the
    real files are); the shipped tokenizers and scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from core.families.flux import FluxFamily
    from core.families.flux_files import t5_tokenizer

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # made in bf16 at once: 33 GB instead of 67 in float32 first
    try:
        with torch.device(device):
            parts = FluxFamily().parts_from_configs(cfg)
    finally:
        torch.set_default_dtype(default)
    for part in parts.values():
        with torch.no_grad():
            for p in part.parameters():
                if p.dim() > 1:
                    p.mul_(0.5)
    return BaseModel("flux-random", clip_tokenizer(), parts["text_encoder"], parts["vae"], parts["transformer"],
                     FlowMatchEulerDiscreteScheduler.from_config(cfg["scheduler"]), text_encoder_2=parts["text_encoder_2"],
                     tokenizer_2=t5_tokenizer(), family_name="flux")


def is_sdxl(model: str) -> bool:
    return model in ("sdxl", "tiny-sdxl")


def is_flux(model: str) -> bool:
    return model in ("flux", "tiny-flux")


def native_resolution(base: BaseModel) -> int:
    from core import families

    return int(families.of(base).native_size(base))


def make_images(folder: Path, n: int, size: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return folder


def case_config(case: str, model: str, resolution: int, work: Path, steps: int, device: str = "cuda") -> Config:
    preset, overrides = OURS[case]
    d = preset_dict(preset)
    d.pop("description", None)
    d["model"] = {**d.get("model", {}), "base": model}  # a preset's quantization stays
    d["data"].update(instance_dir=str(work / "instance"), instance_prompt="a photo of sks dog", class_dir=str(work / "class"),
                     class_prompt="a photo of a dog", num_class_images=4, resolution=resolution, min_image_size=8)
    if case not in PRESET_AS_IS:
        d["adapter"].update(rank=8, alpha=8, unet_targets=list(UNET_TARGETS_FULL),
                            text_encoder_targets=list(TEXT_ENCODER_TARGETS), text_encoder_rank=8, text_encoder_alpha=8)
    if not d["adapter"].get("train_text_encoder", False) and case not in ("ours-lowvram", *PRESET_AS_IS):
        d["adapter"]["train_text_encoder"] = True
    if device == "cpu" and d["train"].get("optimizer") == "adamw8bit":
        d["train"]["optimizer"] = "adamw"  # bitsandbytes' 8-bit AdamW runs on NVIDIA GPUs only
    d["train"].update(max_steps=steps, sample_every=0, checkpoint_every=0, prior_preservation=True, seed=0)
    d["output"] = {"dir": str(work / "runs"), "name": case}
    for section, values in overrides.items():
        d.setdefault(section, {}).update(values)
    return Config.from_dict(d)


# --------------------------------------------------------------------------- timing

class Clock:
    """Step times from the trainer's Progress events; the peak-memory counter restarts after warm-up."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.times, self.loop_start_peak = warmup, device, [], None

    def __call__(self, event) -> None:
        if isinstance(event, ev.Progress):
            self.times.append(time.perf_counter())  # the trainer reads the loss every step: the GPU is synced

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])][self.warmup:]


def memory_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory_peak(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0}
    torch.cuda.synchronize()
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3)}


def summary(seconds: list[float], images_per_step: int) -> dict:
    med = statistics.median(seconds)
    return {"median_step_s": round(med, 5), "images_per_s": round(images_per_step / med, 3), "steps_timed": len(seconds)}


def run_ours(case: str, args, device: torch.device, work: Path) -> dict:
    from core import families, vram
    from core.trainer import train

    cfg = case_config(case, args.model, args.resolution, work, args.warmup + args.steps + 1, device.type)
    # built on the device (fast), handed over in main memory: the trainer brings each part when a phase needs it,
    # so the peak measured from here is the trainer's own
    base = build_model(args.model, device).to("cpu")
    clock = Clock(args.warmup, device)
    memory_start(device)
    train(cfg, emit=clock, base=base)
    out = {**summary(clock.step_seconds(), cfg.train.batch_size * 2), **memory_peak(device)}
    precision = families.of(base).half_precision if device.type == "cuda" else "no"
    out["planner_gib"] = round(vram.plan(cfg, precision).total / GIB, 3)
    if out["peak_allocated_gib"]:
        out["planner_ratio"] = round(out["planner_gib"] / out["peak_allocated_gib"], 3)
    del base
    return out


def run_reference(kind: str, args, device: torch.device, work: Path) -> dict:
    from bench.reference import reference_loop, reference_loop_flux, reference_loop_sdxl

    base = build_model(args.model, device)
    memory_start(device)
    loop = reference_loop_sdxl if is_sdxl(args.model) else reference_loop_flux if is_flux(args.model) else reference_loop
    seconds = loop(base, kind, work / "instance", work / "class", args.resolution, args.warmup + args.steps + 1, device)
    out = {**summary(seconds[args.warmup + 1:], 2), **memory_peak(device)}  # as ours: the first step untimed
    del base
    return out


def run_class_images(args, device: torch.device, work: Path) -> dict:
    """Images/s of class-image generation, one image per batch vs `--class-batch` per batch."""
    from core.class_images import ensure_class_images

    base = build_model(args.model, device).to(device, torch.float16 if device.type == "cuda" else None)
    out = {}
    for label, batch in (("one_at_a_time", 1), ("batched", args.class_batch)):
        d = preset_dict("sd15-lora")
        d.pop("description", None)
        d["model"] = {"base": args.model}
        d["data"].update(instance_dir=str(work / "instance"), class_prompt="a photo of a dog", resolution=args.resolution,
                         class_dir=str(work / f"gen-{label}"), num_class_images=1, class_steps=args.class_steps,
                         class_batch_size=batch)
        ensure_class_images(Config.from_dict(d), base, device)  # warm-up: one image
        d["data"]["num_class_images"] = 1 + args.class_images
        tic = time.perf_counter()
        ensure_class_images(Config.from_dict(d), base, device)
        out[f"{label}_images_per_s"] = round(args.class_images / (time.perf_counter() - tic), 3)
    out["batched_speedup"] = round(out["batched_images_per_s"] / out["one_at_a_time_images_per_s"], 3)
    out.update(class_batch=args.class_batch, class_steps=args.class_steps)
    return out


def run_preview(args, device: torch.device, work: Path) -> dict:
    """Seconds per preview (the sample images shown while training), timed around the trainer's own call."""
    from core import trainer

    cfg = case_config("ours-default", args.model, args.resolution, work, 4)
    cfg.output.name = "preview"
    cfg.train.sample_every = 2
    cfg.train.sample_steps = args.class_steps
    cfg.train.sample_prompts = ["a photo of sks dog", "a photo of a dog"]
    times = []
    original = trainer.Run.sample

    def timed(self):
        tic = time.perf_counter()
        original(self)
        times.append(time.perf_counter() - tic)

    trainer.Run.sample = timed
    try:
        trainer.train(cfg, base=build_model(args.model, device))
    finally:
        trainer.Run.sample = original
    return {"preview_s": round(statistics.median(times[1:] or times), 4), "previews": len(times),
            "images_per_preview": len(cfg.train.sample_prompts), "sample_steps": cfg.train.sample_steps}


# --------------------------------------------------------------------------- main

def table(rows: list[dict]) -> str:
    ref = {r["case"].split("-", 1)[1]: r for r in rows if r["case"].startswith("reference-")}
    lines = ["case                 s/step   img/s  peak GiB  planner GiB  speed-up vs reference"]
    for r in rows:
        if "median_step_s" not in r:
            continue
        kind = {"ours-dora": "dora", "ours-loha": "loha", "ours-lokr": "lokr"}.get(r["case"], "lora")
        vs = ""
        if r["case"].startswith("ours-") and kind in ref and r["case"] not in ("ours-batch2", "ours-batch8",
                                                                               "ours-flux-24gb"):
            vs = f"{ref[kind]['median_step_s'] / r['median_step_s']:.2f}x"
        lines.append(f"{r['case']:<20} {r['median_step_s']:>7.4f} {r['images_per_s']:>7.2f} "
                     f"{r['peak_allocated_gib']:>9.2f} {r.get('planner_gib', float('nan')):>12.2f}  {vs}")
    for r in rows:
        if r["case"] == "class-images":
            lines.append(f"class images: {r['one_at_a_time_images_per_s']} img/s one at a time, "
                         f"{r['batched_images_per_s']} img/s in batches of {r['class_batch']} ({r['batched_speedup']}x)")
        if r["case"] == "preview":
            lines.append(f"preview during training: {r['preview_s']} s each ({r['images_per_preview']} images, "
                         f"{r['sample_steps']} steps)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="sd15 / sdxl (random weights, SD 1.5 / SDXL 1.0 shape), demo, tiny or tiny-sdxl "
                                   "(default: sd15 on a GPU, else demo)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=0, help="pixels (default: the model's own, 512 for sd15)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--only", help=f"comma-separated cases (default: all on a GPU; on a CPU: {', '.join(CPU_DEFAULT)})")
    p.add_argument("--class-images", type=int, default=8, help="class images generated per timing")
    p.add_argument("--class-batch", type=int, default=8)
    p.add_argument("--class-steps", type=int, default=20, help="sampling steps for class images and previews")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.model = args.model or ("sd15" if device.type == "cuda" else "demo")
    if not args.resolution:
        full = {"sd15": 512, "sdxl": 1024, "flux": 1024}
        args.resolution = full.get(args.model) or native_resolution(load_base_model(args.model))
    sd_cases = [c for c in ALL if c not in PRESET_AS_IS] if device.type == "cuda" else CPU_DEFAULT
    cases = args.only.split(",") if args.only else list(SDXL_DEFAULT if is_sdxl(args.model) else
                                                        FLUX_DEFAULT if is_flux(args.model) else sd_cases)
    unknown = [c for c in cases if c not in ALL]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(ALL)}")
    if device.type == "cpu":
        torch.set_num_threads(torch.get_num_threads())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work / "instance", 4, args.resolution, 0)
        make_images(work / "class", 4, args.resolution, 1)
        for case in cases:
            tic = time.perf_counter()
            if case in OURS:
                result = run_ours(case, args, device, work)
            elif case in REFERENCE:
                result = run_reference(REFERENCE[case], args, device, work)
            elif case == "class-images":
                result = run_class_images(args, device, work)
            else:
                result = run_preview(args, device, work)
            row = {"case": case, **result, "model": args.model, "resolution": args.resolution, "device": name,
                   "torch": torch.__version__, "wall_s": round(time.perf_counter() - tic, 1)}
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
