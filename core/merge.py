"""Fuse adapters into a base model and save the result as a new base model (diffusers folder or one file).

Every adapter type works (LoRA, LoHa, LoKr, ours or imported), mixed, each at its weight: peft computes
each layer's delta (its own scaling times the weight), the deltas are added to the base weights, and the
adapter wrappers are taken out, leaving a plain Stable Diffusion model that any tool loads.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import adapters
from .errors import ModelLoadError
from .models import BaseModel, load_base_model, save_model_folder


def fuse_into(base: BaseModel, files: list[tuple[str | Path, float]]) -> BaseModel:
    """Add the weighted deltas of adapter `files` [(path, weight)] to `base`'s weights, in place; returns base."""
    if not files:
        raise ModelLoadError("Choose at least one adapter to merge into the model.")
    loaded = [(adapters.read_adapter(path), weight) for path, weight in files]
    names = {}
    for i, (f, weight) in sorted(enumerate(loaded), key=lambda x: 0 if x[1][0].type == "lora" else 1):
        names[f"m{i}"] = weight
        adapters.load_into(base, f, f"m{i}")  # LoRA first: peft cannot wrap a LoRA around a LoHa/LoKr layer
    adapters.set_weights(base, names)
    with torch.no_grad():
        for part in adapters.PARTS:
            for layer in adapters.tuner_layers(adapters.module_of(base, part)):
                weight = layer.get_base_layer().weight
                for name in names:
                    if name in layer.scaling:
                        weight += layer.get_delta_weight(name).to(weight.dtype).reshape(weight.shape)
    adapters.remove_all(base)
    base.name = f"{base.name} + " + " + ".join(f"{Path(p).stem}×{w:g}" for p, w in files)
    return base


def merge_to_model(base_spec: str, files: list[tuple[str | Path, float]], out: str | Path) -> Path:
    """Load `base_spec`, fuse the adapters, save to `out`: a `.safetensors` single file, else a diffusers folder."""
    from .ldm_convert import save_single_file

    out = Path(out)
    if out.exists() and out.suffix.lower() != ".safetensors" and any(out.iterdir()):
        raise ModelLoadError(f"{out} already exists and is not empty: choose a new folder for the merged model.")
    base = fuse_into(load_base_model(base_spec), files)
    if out.suffix.lower() == ".safetensors":
        return save_single_file(base, out, metadata={"merged_from": base.name})
    tmp = out.with_name(f".{out.name}.tmp")  # a whole folder appears at once, or nothing
    save_model_folder(base, tmp)
    tmp.rename(out)
    return out
