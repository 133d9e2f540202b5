"""Reading adapter files other tools wrote: kohya / A1111 / Forge / ComfyUI / LyCORIS, and diffusers LoRAs / DoRAs.

The kohya layout names each module once (`lora_unet_down_blocks_0_..._to_q`, `lora_te_text_model_encoder_
layers_0_self_attn_q_proj`), with kohya tensor names (`lora_down` / `lora_up`; LyCORIS keeps `hada_*` and
`lokr_*`) and a scalar `.alpha` per module (see core/formats.py for what alpha means per type). Those names
flatten the dots, so they are resolved against the layers of the base model the file is loaded into.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch

from . import families
from .adapter_file import COLUMN_SCALE, DORA_CONVENTION, AdapterFile, AdapterSpec, split_key
from .config import adapter_name
from .errors import ModelLoadError
from .families.base import Family
from .weights import base_weight, lora_product, row_norms

PART_NAMES = {"unet": "UNet", "text_encoder": "text encoder"}  # in messages; other parts by their own names
MAGNITUDE = "lora_magnitude_vector"  # peft's name of a DoRA layer's learned lengths
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def kohya_name(part: str, module: str, family: Family | None = None) -> str:
    """The kohya name of `module` of `part` in `family`'s files (by default the family that has such a part)."""
    return (family or families.of_parts({part: None})).kohya_name(part, module)


# --- readers (see core/adapter_file.py: each returns an AdapterFile, None when the file is not its kind, or
# raises ModelLoadError saying what the file is) -------------------------------------------------------------------

def read_kohya(path: Path, f, metadata: dict[str, str]) -> AdapterFile | None:
    """A kohya / LyCORIS file of a family this app trains (which one shows when it is resolved against a model)."""
    keys = list(f.keys())
    if keys and all(k.startswith(tuple(families.kohya_prefixes())) for k in keys):
        tensors = {k: f.get_tensor(k) for k in keys}
        return AdapterFile(path, {}, tensors, metadata, layout="kohya", kind=kohya_kind(path, kohya_groups(tensors)))
    return None


def read_diffusers(path: Path, f, metadata: dict[str, str]) -> AdapterFile | None:
    """A diffusers / peft LoRA file (a part's name as prefix: unet., text_encoder., text_encoder_2.; peft tensor
    names)."""
    keys = list(f.keys())
    prefixes = tuple({f"{part}." for family in families.FAMILIES.values() for part in family.kohya_prefixes})
    suffixes = ("lora_A.weight", "lora_B.weight", MAGNITUDE, f"{MAGNITUDE}.weight")
    if not (keys and all(k.startswith(prefixes) and k.endswith(suffixes) for k in keys)):
        return None
    # a magnitude is saved with or without `.weight` (peft's name; diffusers' text encoders need the other)
    return diffusers_lora(path, {k.removesuffix(f"{MAGNITUDE}.weight") + MAGNITUDE if k.endswith(f"{MAGNITUDE}.weight")
                                 else k: f.get_tensor(k) for k in keys}, metadata)


def refuse_checkpoint(path: Path, f, metadata: dict[str, str]) -> None:
    """A whole model checkpoint chosen as an adapter: say so."""
    if any(k.startswith(CHECKPOINT_PREFIXES) for k in f.keys()):
        raise ModelLoadError(f"{path.name} is a whole model checkpoint, not an adapter: choose it as the base model.")


def _patterns(ranks: dict[str, int], alphas: dict[str, float]) -> tuple[int, float, dict, dict]:
    """The most common rank / alpha of a part, and per-module patterns (peft's rank_pattern) for the others."""
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    rank_pattern = {re.escape(m): r for m, r in ranks.items() if r != rank}
    alpha_pattern = {re.escape(m): a for m, a in alphas.items() if a != alpha}
    return rank, alpha, rank_pattern, alpha_pattern


def part_spec(kind: str, ranks: dict[str, int], alphas: dict[str, float], **extra) -> AdapterSpec:
    rank, alpha, rank_pattern, alpha_pattern = _patterns(ranks, alphas)
    return AdapterSpec(type=kind, rank=rank, alpha=alpha, targets=sorted(ranks), rank_pattern=rank_pattern,
                       alpha_pattern=alpha_pattern, **extra)


def diffusers_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> AdapterFile:
    """A LoRA in our names; alpha = rank, as diffusers assumes. With peft's magnitudes, a DoRA (diffusers and peft
    save one so)."""
    ranks: dict[str, dict[str, int]] = {}
    dora = {split_key(key)[0] for key in tensors if key.endswith(MAGNITUDE)}
    for key, tensor in tensors.items():
        part, module, suffix = split_key(key)
        if suffix == "lora_A.weight":
            ranks.setdefault(part, {})[module] = tensor.shape[0]
    specs = {part: part_spec("dora" if part in dora else "lora", r, {m: float(v) for m, v in r.items()})
             for part, r in ranks.items()}
    return AdapterFile(path, specs, tensors, metadata)


def kohya_groups(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """kohya module name -> {tensor suffix: tensor}. peft's DoRA magnitudes in such files keep some of the module
    path's dots (diffusers' converter leaves them: `lora_unet_..._attn1.to_k.lora_magnitude_vector`)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.endswith((f".{MAGNITUDE}", f".{MAGNITUDE}.weight")):
            module, suffix = key[: key.rindex(f".{MAGNITUDE}")].replace(".", "_"), MAGNITUDE
        else:
            module, _, suffix = key.partition(".")
        groups.setdefault(module, {})[suffix] = tensor
    return groups


def kohya_kind(path: Path, groups: dict[str, dict[str, torch.Tensor]]) -> str:
    if any("diff" in g for g in groups.values()):
        raise ModelLoadError(f"{path.name} holds full weight changes (`.diff`: e.g. a LoKr exported for FLUX's fused "
                             "q/k/v layers), which ComfyUI and Forge apply as they are but this app cannot load as "
                             "an adapter: load the run's own .safetensors file instead.")
    kinds = {("loha" if any(s.startswith("hada_") for s in g) else "lokr" if any(s.startswith("lokr_") for s in g)
              else "dora" if {"dora_scale", MAGNITUDE} & g.keys() else "lora" if "lora_down.weight" in g else "?")
             for g in groups.values()}
    if len(kinds) != 1 or "?" in kinds:
        raise ModelLoadError(f"{path.name} mixes adapter kinds or holds ones this app cannot load "
                             f"({', '.join(sorted(kinds))}); it loads LoRA (incl. conv), DoRA, LoHa and LoKr files.")
    return kinds.pop()


def dora_magnitude(adapter: AdapterFile, module: str, g: dict[str, torch.Tensor], scale: float,
                   layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{peft's `lora_magnitude_vector`} of a DoRA module of a kohya file, for the base `layer` it loads into.

    peft's magnitude (kept as it is) and LyCORIS' output-axis `dora_scale` mean the same: each row of W + dW is
    divided by its own length and multiplied by it. Our own exports' `dora_scale` is ComfyUI's reading (the row
    length of the base W; core/formats.py), converted back here with the base weight."""
    weight = base_weight(layer)
    shape = (1, -1, 1, 1) if weight.dim() == 4 else (-1,)  # how peft holds it
    if MAGNITUDE in g:
        return {MAGNITUDE: g[MAGNITUDE].float().reshape(shape)}
    dora_scale = g["dora_scale"].float()
    if dora_scale.shape[0] != weight.shape[0] or dora_scale.numel() != weight.shape[0]:
        if dora_scale.numel() != weight.shape[1]:
            raise ModelLoadError(f"{adapter.path.name}: the DoRA layer {module} has {dora_scale.numel()} lengths, "
                                 f"but this base model's layer has {weight.shape[0]} outputs and {weight.shape[1]} "
                                 "inputs: the file is for another model.")
        return {COLUMN_SCALE: dora_scale.reshape(1, -1)}  # per input column: core/adapters.py's ColumnDora
    if adapter.metadata.get(DORA_CONVENTION) == "comfyui":
        merged = weight + lora_product(g["lora_up.weight"], g["lora_down.weight"], scale, weight.shape)
        dora_scale = dora_scale.reshape(-1) * row_norms(merged) / (row_norms(weight) + torch.finfo(torch.float32).eps)
    return {MAGNITUDE: dora_scale.reshape(shape)}


def _lokr_rank(g: dict[str, torch.Tensor]) -> tuple[int, bool]:
    """(peft rank, decompose_both) that rebuild this LoKr module's factors; full factors get a rank so large
    that peft keeps them full."""
    if "lokr_w2_a" in g:
        return g["lokr_w2_a"].shape[1], "lokr_w1_a" in g
    if "lokr_w1_a" in g:
        return g["lokr_w1_a"].shape[1], True
    return max(g["lokr_w2"].shape[:2]) * 2, False


def kohya_layer_names(parts: Mapping[str, torch.nn.Module], family: Family | None = None) -> dict[str, tuple[str, str]]:
    """Every kohya module name the layers of `parts` can have -> (part, module name), in `family`'s names (by
    default the family whose parts these are)."""
    family = family or families.of_parts(parts)
    names = {}
    for part, model in parts.items():
        if part not in family.kohya_prefixes:  # e.g. the VAE: no kohya names
            continue
        layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        names.update({family.kohya_name(part, n): (part, n) for n in layers})
        if part == family.denoiser:  # the other names a family's files give UNet layers (SD: the LDM layout)
            other = family.extra_unet_names(model, layers)
            prefix = family.kohya_prefixes[part]
            names.update({prefix + other[n].replace(".", "_"): (part, n) for n in layers if n in other})
    return names


def made_for(names: list[str], family: Family, metadata: Mapping[str, str] | None = None) -> Family | None:
    """The other family whose own kohya prefixes (lora_te1_ ... that `family` lacks) these module names carry, or
    that the file's metadata names (a UNet-only file has no such prefix)."""
    ours = set(family.kohya_prefixes.values())
    others = [f for f in families.FAMILIES.values() if f.name != family.name]
    for other in others:
        own = tuple(set(other.kohya_prefixes.values()) - ours)
        if own and any(n.startswith(own) for n in names):
            return other
    return next((other for other in others if other.claims_metadata(metadata or {})), None)


def resolve_kohya(adapter: AdapterFile, parts: Mapping[str, torch.nn.Module], family: Family | None = None) -> AdapterFile:
    """A kohya / LyCORIS file as one of ours, its layer names read against the model `parts` (all or nothing)."""
    kind = adapter.type
    family = family or families.of_parts(parts)
    names = kohya_layer_names(parts, family)
    groups = family.split_kohya(kohya_groups(adapter.tensors))
    unknown = sorted(m for m in groups if m not in names)
    if unknown:
        other = made_for(unknown, family, adapter.metadata)
        if other is not None:
            raise ModelLoadError(f"{adapter.path.name} is an adapter for {other.label} (its layer names say so); the "
                                 f"base model here is {family.label}. Choose a {other.label} base model for it.")
        raise ModelLoadError(f"{adapter.path.name} has {len(unknown)} layer(s) this base model does not have (e.g. "
                             f"{', '.join(unknown[:3])}): it was made for another model family (SD 1.x and 2.x "
                             "differ in the text encoder, SDXL in everything).")
    unsupported = {"lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2"}
    tensors, ranks, alphas, decompose = {}, {}, {}, {}
    for module, g in groups.items():
        part, path = names[module]
        if unsupported & g.keys():
            raise ModelLoadError(f"{adapter.path.name} uses {', '.join(sorted(unsupported & g.keys()))} (Tucker "
                                 "decomposition), which this app cannot load.")
        if kind in ("lora", "dora"):
            rank = g["lora_down.weight"].shape[0]
            renamed = {"lora_A.weight": g["lora_down.weight"], "lora_B.weight": g["lora_up.weight"]}
            if kind == "dora":
                scale = float(g["alpha"]) / rank if "alpha" in g else 1.0
                renamed |= dora_magnitude(adapter, module, g, scale, parts[part].get_submodule(path))
        elif kind == "loha":
            rank = g["hada_w1_b"].shape[0]
            renamed = {k: v for k, v in g.items() if k != "alpha"}
        else:
            rank, both = _lokr_rank(g)
            decompose[part] = decompose.get(part, both) or both
            renamed = {k: v for k, v in g.items() if k != "alpha"}
        full_lokr = kind == "lokr" and "lokr_w1" in g and "lokr_w2" in g
        alpha = float(rank) if full_lokr or "alpha" not in g else float(g["alpha"])  # LyCORIS: no scale for full
        ranks.setdefault(part, {})[path] = rank
        alphas.setdefault(part, {})[path] = alpha
        tensors.update({f"{part}.{path}.{suffix}": t.float() for suffix, t in renamed.items()})
    axes = {}  # part -> the DoRA length kinds its layers hold: per input column (COLUMN_SCALE), per output row
    for key in tensors:
        if key.endswith((COLUMN_SCALE, MAGNITUDE)):
            axes.setdefault(split_key(key)[0], set()).add("input" if key.endswith(COLUMN_SCALE) else "output")
    columns = {part for part, kinds in axes.items() if "input" in kinds}
    if any(len(kinds) > 1 for kinds in axes.values()):
        raise ModelLoadError(f"{adapter.path.name} mixes DoRA layers with lengths per output row and per input "
                             "column in one part, which this app cannot load.")

    def extra(part: str) -> dict:
        if kind == "lokr":
            return {"decompose_both": decompose.get(part, False)}
        return {"dora_axis": "input"} if part in columns else {}
    specs = {part: part_spec(kind, ranks[part], alphas[part], **extra(part)) for part in ranks}
    return AdapterFile(adapter.path, specs, tensors, adapter.metadata)


def describe(adapter: AdapterFile) -> str:
    """What a user wants to know about an adapter file, in one markdown line (ours, kohya or diffusers)."""
    meta = adapter.metadata
    if adapter.layout == "kohya":
        kind = adapter.type
        rank, alpha = meta.get("ss_network_dim", "?"), meta.get("ss_network_alpha", "?")
        base = meta.get("ss_sd_model_name") or meta.get("ss_base_model_version") or "not recorded"
        trigger = meta.get("modelspec.trigger_phrase") or _top_tags(meta.get("ss_tag_frequency", ""))
        steps, lr = meta.get("ss_max_train_steps"), meta.get("ss_learning_rate")
        parts = "UNet + text encoder" if any(k.startswith("lora_te") for k in adapter.tensors) else "UNet"
    else:
        spec = adapter.main_spec
        kind, rank, alpha = spec.type, spec.rank, f"{spec.alpha:g}"
        base = meta.get("base_model") or "not recorded"
        trigger, steps, lr = meta.get("instance_prompt", ""), meta.get("steps"), meta.get("learning_rate")
        parts = " + ".join(PART_NAMES.get(p, p.replace("_", " ")) for p in adapter.specs)
    made = next((f for f in families.FAMILIES.values() if meta.get("family") == f.name or f.claims_metadata(meta)),
                None)
    family = f", for {made.label}" if made else ""
    text = (f"**{adapter.path.name}**: {adapter_name(kind)} rank {rank}, alpha {alpha}, on the {parts}{family}; "
            f"base model: {base}")
    if trigger:
        text += f"; trigger: `{trigger}`"
    if steps:
        text += f"; {steps} steps" + (f" at learning rate {lr}" if lr else "")
    return text + "."


def _top_tags(frequency_json: str, n: int = 3) -> str:
    """kohya's ss_tag_frequency ({folder: {tag: count}}) -> its most frequent tags."""
    try:
        counts: dict[str, int] = {}
        for tags in json.loads(frequency_json).values():
            for tag, count in tags.items():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(count)
    except (ValueError, AttributeError, TypeError):
        return ""
    return ", ".join(sorted(counts, key=counts.get, reverse=True)[:n])
