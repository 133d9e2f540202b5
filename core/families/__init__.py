"""The model families this app trains, and how a model, a diffusers folder or a checkpoint is matched to one.

A family is one module (core/families/sd.py ...) holding a `Family` subclass (core/families/base.py), made
known here by one `register(...)` line. Recognition asks each registered family in turn; what none claims is
refused in plain words, naming what it is when it is a known kind this app does not train (yet).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from ..base_model import BaseModel
from ..errors import ModelLoadError
from ..single_file import detect_family
from .base import Family
from .flux import FluxFamily
from .sd import SD1Family, SD2Family
from .sdxl import SDXLFamily

FAMILIES: dict[str, Family] = {}

# kinds of folder that no registered family may claim, said by name instead of "not a Stable Diffusion model"
KNOWN_KINDS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], bool]] = {
    "a Stable Diffusion 3 model": lambda index, unet: "StableDiffusion3" in index.get("_class_name", ""),
}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


register(SD1Family())
register(SD2Family())
register(SDXLFamily())
register(FluxFamily())


def trained() -> str:
    """The families this app trains, in words."""
    return " and ".join(f.label for f in FAMILIES.values())


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ModelLoadError(f"This app has no support for {name!r} models; it trains {trained()}.")
    return FAMILIES[name]


def of(base: BaseModel) -> Family:
    """The family of a loaded model."""
    return get(base.family)


def of_pipeline(pipe) -> Family:
    """The family of a diffusers pipeline built by one (its class name is the family's pipeline)."""
    name = type(pipe).__name__
    return next((f for f in FAMILIES.values() if f.pipeline == name), next(iter(FAMILIES.values())))


def of_parts(parts: Mapping[str, Any]) -> Family:
    """The first family that has every part named in `parts` (an adapter's or a model's parts)."""
    return next((f for f in FAMILIES.values() if set(parts) <= set(f.kohya_prefixes)), next(iter(FAMILIES.values())))


def of_adapter(metadata: Mapping[str, str], parts: Mapping[str, Any]) -> Family:
    """The family an adapter file was trained on: as its metadata records it, else the one with its parts."""
    return FAMILIES.get(metadata.get("family", ""), None) or of_parts(parts)


def kohya_prefixes() -> set[str]:
    """Every kohya module-name prefix of every registered family."""
    return {p for f in FAMILIES.values() for p in f.kohya_prefixes.values()}


def hub_patterns() -> tuple[list[str], list[str]]:
    """(allow, ignore) file patterns that fetch the files any family's loader needs from a hub repo."""
    allow = list(dict.fromkeys(p for f in FAMILIES.values() for p in f.hub_files))
    ignore = list(dict.fromkeys(p for f in FAMILIES.values() for p in f.hub_ignore))
    return allow, ignore


# --- diffusers folders --------------------------------------------------------------------------------------------

def read_folder_configs(folder: Path) -> tuple[dict, dict]:
    """(model_index.json, unet/config.json or {}) of a diffusers folder, or a plain-words ModelLoadError."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{folder} is a folder but not a diffusers model (it has no model_index.json).")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        unet_file = folder / "unet" / "config.json"
        unet = json.loads(unet_file.read_text(encoding="utf-8")) if unet_file.is_file() else {}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot read the model configs in {folder}: {e}") from e
    return index, unet


def of_configs(index: Mapping[str, Any], unet_config: Mapping[str, Any]) -> Family | None:
    """The registered family that claims a model with these part configs, or None."""
    return next((f for f in FAMILIES.values() if f.matches_folder(index, unet_config)), None)


def of_folder(folder: str | Path) -> Family:
    """The family of a diffusers folder that this app can train, or a plain-words ModelLoadError saying why not."""
    folder = Path(folder)
    index, unet = read_folder_configs(folder)
    family = of_configs(index, unet)
    if family is None:
        kind = index.get("_class_name", "an unknown pipeline")
        named = next((what for what, test in KNOWN_KINDS.items() if test(index, unet)), None)
        if named:
            raise ModelLoadError(f"{folder} holds {named} ({kind}); this app trains {trained()} only.")
        family = next(iter(FAMILIES.values()))  # its check says what the folder lacks
        family.check_folder(folder, index, unet)
        raise ModelLoadError(f"{folder} holds {kind}, which this app cannot train ({trained()} only).")
    family.check_folder(folder, index, unet)
    return family


# --- single-file checkpoints --------------------------------------------------------------------------------------

def of_checkpoint(shapes: Mapping[str, Any], name: str = "The file") -> Family:
    """The family of an original-layout checkpoint from its keys -> shapes, or a plain-words ModelLoadError."""
    family = next((f for f in FAMILIES.values() if f.matches_checkpoint(shapes)), None)
    if family is not None:
        return family
    found = detect_family(shapes, name)  # raises, in plain words, for what it knows is not a base model
    raise ModelLoadError(f"{name} is a {found} checkpoint; this app trains {trained()} only.")
