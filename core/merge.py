"""Fuse adapters into a base model and save the result as a new base model (diffusers folder or one file).

Every adapter type works (LoRA, DoRA, LoHa, LoKr, ours or imported), mixed, each at its weight: peft computes
each layer's delta (its own scaling times the weight; a DoRA's rescaled weight less the base), the deltas are added
to the base weights, and the adapter wrappers are taken out, leaving a plain Stable Diffusion model that any tool
loads.
"""
from __future__ import annotations

from pathlib import Path

import torch
from peft.utils.other import get_pattern_key

from . import adapters, families
from .adapter_file import AdapterFile, AdapterSpec, save_adapter_file, split_key
from .base_model import BaseModel
from .community import part_spec, resolve_kohya
from .config import adapter_name
from .errors import ModelLoadError
from .models import load_base_model, save_model_folder
from .single_file import save_single_file


def fuse_into(base: BaseModel, files: list[tuple[str | Path, float]]) -> BaseModel:
    """Add the weighted deltas of adapter `files` [(path, weight)] to `base`'s weights, in place; returns base."""
    if not files:
        raise ModelLoadError("Choose at least one adapter to merge into the model.")
    loaded = {f"m{i}": (adapters.read_adapter(path), weight) for i, (path, weight) in enumerate(files)}
    names = {name: weight for name, (_, weight) in loaded.items()}
    adapters.load_all(base.parts, {name: f for name, (f, _) in loaded.items()}, families.of(base))
    adapters.set_weights(base.parts, names)
    with torch.no_grad():
        # each base weight with the peft layers around it (a LoHa / LoKr layer wraps a LoRA / DoRA layer of the
        # same weight); all of a weight's changes are taken against it before any is added (a DoRA's depends on it)
        around: dict[int, list] = {}
        for module in base.parts.values():
            for layer in adapters.tuner_layers(module):
                around.setdefault(id(layer.get_base_layer().weight), []).append(layer)
        for layers in around.values():
            weight = layers[0].get_base_layer().weight
            changes = [adapters.weight_change(layer, name) for layer in layers for name in names if name in layer.scaling]
            for change in changes:
                weight += change.to(weight.device, weight.dtype)
    adapters.remove_all(base.parts)
    base.name = f"{base.name} + " + " + ".join(f"{Path(p).stem}×{w:g}" for p, w in files)
    return base


def merge_to_model(base_spec: str, files: list[tuple[str | Path, float]], out: str | Path,
                   allow_pickle: bool = False) -> Path:
    """Load `base_spec`, fuse the adapters, save to `out`: a `.safetensors` single file (FLUX.1: the BFL-layout
    transformer, plus its CLIP-L when an adapter changed it), else a diffusers folder."""
    out = Path(out)
    if out.exists() and out.suffix.lower() != ".safetensors" and any(out.iterdir()):
        raise ModelLoadError(f"{out} already exists and is not empty: choose a new folder for the merged model.")
    base = fuse_into(load_base_model(base_spec, allow_pickle=allow_pickle), files)
    if out.suffix.lower() == ".safetensors" and base.family == "flux":
        from .families.flux_files import save_merged_flux

        clip_changed = any("text_encoder" in adapters.read_adapter(path).specs for path, weight in files if weight)
        return save_merged_flux(base, out, clip_changed, {"merged_from": base.name})[0]
    if out.suffix.lower() == ".safetensors":
        return save_single_file(base, out, metadata={"merged_from": base.name})
    tmp = out.with_name(f".{out.name}.tmp")  # a whole folder appears at once, or nothing
    save_model_folder(base, tmp)
    tmp.rename(out)
    return out


# --- several LoRAs into one LoRA file ------------------------------------------------------------------------------

def _module_alpha(spec: AdapterSpec, module: str) -> float:
    """The alpha peft uses for `module`: its alpha_pattern entry (peft's own matching), else alpha."""
    return float(spec.alpha_pattern.get(get_pattern_key(spec.alpha_pattern, module), spec.alpha))


def lora_pairs(adapter: AdapterFile) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(part, module) -> (A, B * alpha / rank) of a LoRA file: the module's delta is B @ A, scale included."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.tensors.items():
        part, module, suffix = split_key(key)
        pairs.setdefault((part, module), {})[suffix] = tensor.float()
    out = {}
    for (part, module), t in pairs.items():
        a, b = t["lora_A.weight"], t["lora_B.weight"]
        out[(part, module)] = (a, b * (_module_alpha(adapter.specs[part], module) / a.shape[0]))
    return out


def _low_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` (A, B) of the delta B @ A (truncated SVD); unchanged when it is already that small."""
    if a.shape[0] <= rank:
        return a, b
    u, s, vh = torch.linalg.svd(b.flatten(1) @ a.flatten(1), full_matrices=False)
    root = s[:rank].sqrt()
    new_a = (root[:, None] * vh[:rank]).reshape(rank, *a.shape[1:])
    new_b = (u[:, :rank] * root).reshape(b.shape[0], rank, *b.shape[2:])
    return new_a.contiguous(), new_b.contiguous()


def merge_loras(files: list[tuple[str | Path, float]], out: str | Path, base_spec: str | None = None,
                rank: int | None = None, allow_pickle: bool = False) -> Path:
    """Several LoRAs at their weights -> one LoRA file (ours; export it for other tools).

    Exact by default: each module's A matrices are stacked and its B matrices (times weight * alpha / rank)
    placed side by side, so B' @ A' = sum of the weighted deltas; the file's rank is the sum of the ranks.
    With `rank`, each module keeps the best rank-`rank` approximation of that sum (smaller file, not exact).
    Community (kohya) files are read against `base_spec`'s layer names. LoHa / LoKr have no exact LoRA form:
    merge them into a model instead.
    """
    if not files:
        raise ModelLoadError("Choose at least one adapter to merge.")
    if rank is not None and rank < 1:
        raise ModelLoadError(f"The merged rank must be 1 or more (got {rank}).")
    base = None
    stacks: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    infos = []
    for path, weight in files:
        f = adapters.read_adapter(path)
        if f.layout == "kohya":
            if base_spec is None:
                raise ModelLoadError(f"{f.path.name} is a kohya / A1111 file: choose the base model it is for, so "
                                     "its layer names can be read.")
            base = base or load_base_model(base_spec, allow_pickle=allow_pickle)
            f = resolve_kohya(f, base.parts, families.of(base))
        if f.type != "lora" or any(s.type != "lora" for s in f.specs.values()):
            raise ModelLoadError(f"{f.path.name} is a {adapter_name(f.type)}: only LoRAs merge into one LoRA exactly. "
                                 "Merge DoRA / LoHa / LoKr adapters into the model instead.")
        for key, (a, b) in lora_pairs(f).items():
            stacks.setdefault(key, []).append((a, b * weight))
        infos.append((f, weight))
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, dict[str, int]] = {}
    for (part, module), pairs in sorted(stacks.items()):
        a = torch.cat([p[0] for p in pairs], dim=0)
        b = torch.cat([p[1] for p in pairs], dim=1)
        if rank is not None:
            a, b = _low_rank(a, b, rank)
        tensors[f"{part}.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{part}.{module}.lora_B.weight"] = b.contiguous()
        ranks.setdefault(part, {})[module] = a.shape[0]
    # alpha = rank everywhere: the scale is 1, everything is already in B
    specs = {part: part_spec("lora", r, {m: float(v) for m, v in r.items()}) for part, r in ranks.items()}
    first = infos[0][0].metadata
    info = {"merged_from": " + ".join(f"{f.path.stem}×{w:g}" for f, w in infos),
            "base_model": first.get("base_model") or first.get("ss_sd_model_name", ""),
            "instance_prompt": ", ".join(dict.fromkeys(p for f, _ in infos if (p := f.metadata.get("instance_prompt")))),
            "adapter_type": "lora", "family": first.get("family", "")}  # exports name modules by the family
    return save_adapter_file(out, tensors, specs, {k: v for k, v in info.items() if v})
