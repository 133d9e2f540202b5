"""The playground engine: one base model kept loaded, adapters swapped in and out, images generated.

Adapters are cached by their file (path, size, modification time) or, for a paused run's live adapter,
by run and step. Switching adapters never reloads the base model: unused adapters are deleted from the
layers, and when a LoRA must join a model that already holds LoHa/LoKr layers (which peft cannot do),
all adapter layers are taken out (`adapters.remove_all`) and the wanted set is loaded again (`adapters.load_all`).
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import adapters, families, quantize
from .adapter_file import AdapterFile
from .base_model import BaseModel
from .errors import ConfigError, ModelLoadError, UserError
from .models import load_base_model, place
from .config import LORA_LAYER_TYPES, adapter_name
from .precision import DTYPES, default_device, frozen_dtype
from .placement import move_parts
from .sampling import encoded_apart, generate, make_pipeline, save_png

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)  # the compare grid: adapters off, then a strength sweep


@dataclass
class Wanted:
    """One enabled adapter: a cache key, how to get the file when it is not loaded yet, and its weight."""

    key: str
    load: Callable[[], AdapterFile]
    weight: float = 1.0


def file_key(path: str | Path) -> str:
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise ModelLoadError(f"Adapter file not found: {p}") from None
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def from_file(path: str | Path, weight: float = 1.0) -> Wanted:
    return Wanted(file_key(path), lambda: adapters.read_adapter(path), weight)


def check_sides(**sides: int | None) -> None:
    """Refuse an image side that is not a multiple of 8 (the VAE works on 8x8 blocks); None or 0: the model's own."""
    for name, value in sides.items():
        if value and (value < 0 or value % 8):
            raise UserError(f"The image {name} must be a multiple of 8 pixels (or 0 for the model's own), got {value}.")


class Playground:
    """Thread-safe: one generation at a time."""

    def __init__(self, device: str | None = None, allow_pickle: bool = False):
        self.allow_pickle = allow_pickle  # pickled .ckpt base models (the app's --allow-pickle)
        self.device = torch.device(device or default_device())
        self.on_gpu = self.device.type == "cuda"  # generation only: half precision is safe on a GPU
        self._lock = threading.Lock()
        self.base: BaseModel | None = None
        self.base_spec = ""
        self.base_loads = 0  # how many times a base model was loaded (the tests check swaps do not reload)
        self.apart: list[str] = []  # encoders kept in main memory between prompts (FLUX.1 on a GPU)
        self.quantized = "none"  # the base model's quantization (core/quantize.py)
        self._loaded: dict[str, tuple[str, AdapterFile]] = {}  # key -> (name in the model, file)
        self._names = itertools.count()

    # -- model and adapters --------------------------------------------------------------------------------------
    def _ensure_base(self, spec: str, kind: str = "none") -> BaseModel:
        """The base model `spec` on the device; `kind` (none / int8 / nf4): its denoiser's block layers quantized,
        as `model.quantize` does in training (FLUX.1 on a 16-24 GB card)."""
        spec = (spec or "").strip()
        if self.base is None or spec != self.base_spec or kind != self.quantized:
            self.base = None  # free the old one first
            self._loaded = {}
            base = load_base_model(spec, allow_pickle=self.allow_pickle)
            family = families.of(base)
            precision = family.half_precision if self.on_gpu else "no"  # FLUX.1: bf16, others fp16
            # FLUX.1's text encoders wait in main memory and come to the GPU only to encode the prompt
            self.apart = list(family.encoders) if family.encode_apart and self.on_gpu else []
            self.base = place(base, "cpu", frozen_dtype(precision))
            quantize.check(kind, "lora")
            quantize.quantize(self.base.unet, kind, DTYPES[precision])  # quantized as it reaches the device
            self.quantized = kind
            move_parts(self.base, [p for p in self.base.all_parts if p not in self.apart], self.device)
            self.base_spec = spec
            self.base_loads += 1
        return self.base

    def _ensure_adapters(self, wanted: list[Wanted]) -> dict[str, float]:
        """Make the model hold exactly the wanted adapters; return {name in model: weight}."""
        parts = self.base.parts
        keys = {w.key for w in wanted}
        for key in [k for k in self._loaded if k not in keys]:
            adapters.delete_adapter(parts, self._loaded.pop(key)[0])
        new = [(w.key, w.load()) for w in wanted if w.key not in self._loaded]
        lycoris = [f for _, f in new if f.type not in LORA_LAYER_TYPES]
        if lycoris and self.quantized != "none":
            raise UserError(f"{lycoris[0].path.name} is a {adapter_name(lycoris[0].type)}: LoHa and LoKr cannot run on "
                            "quantized weights (peft wraps only LoRA and DoRA around them). Set Quantized weights to none.")
        for _, f in new:
            try:
                quantize.check(self.quantized, f.type)
            except ConfigError as e:  # e.g. a DoRA on int8 weights
                raise UserError(f"{f.path.name}: {e}") from None
        if any(f.type in LORA_LAYER_TYPES for _, f in new) and adapters.has_lycoris(parts):
            # A LoRA cannot wrap a LoHa/LoKr layer: start again from the plain model and load them all.
            new = [(k, f) for k, (_, f) in self._loaded.items()] + new
            adapters.remove_all(parts)
            self._loaded = {}
        named = {f"a{next(self._names)}": (key, f) for key, f in new}
        adapters.load_all(parts, {name: f for name, (_, f) in named.items()}, families.of(self.base))
        self._loaded.update({key: (name, f) for name, (key, f) in named.items()})
        return {self._loaded[w.key][0]: w.weight for w in wanted}

    def loaded_names(self) -> list[str]:
        return sorted(name for name, _ in self._loaded.values())

    # -- generation ----------------------------------------------------------------------------------------------
    def generate(self, base_spec: str, wanted: list[Wanted], prompt: str, negative_prompt: str = "", seed: int = 0,
                 steps: int = 25, guidance: float = 7.5, size: int | None = None,
                 strengths: tuple[float, ...] = (1.0,), width: int | None = None, height: int | None = None,
                 quantize: str = "none") -> list:
        """One image per strength (a multiplier on every adapter's weight), all from the same seed; `width` x
        `height` pixels (`size`: a square; a side not given: the model's own)."""
        if not prompt.strip():
            raise UserError("Write a prompt first, e.g. 'a photo of sks dog on the beach'.")
        width, height = width or size, height or size
        check_sides(width=width, height=height)
        with self._lock:
            base = self._ensure_base(base_spec, quantize)
            weights = self._ensure_adapters(wanted)
            pipe = make_pipeline(base, self.device)
            images = []
            try:
                for s in strengths:
                    adapters.set_weights(base.parts, {n: w * s for n, w in weights.items()})
                    with encoded_apart(base, [prompt], self.device, self.apart) as inputs:
                        images += generate(pipe, [prompt], [int(seed)], steps=int(steps), guidance=float(guidance),
                                           width=width or None, height=height or None,
                                           negative_prompt=negative_prompt, prompt_inputs=inputs)
            finally:
                adapters.set_weights(base.parts, weights)
        return images

    def save(self, image, folder: str | Path, info: dict) -> Path:
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{int(time.time() * 1000) % 1000:03d}-seed{info.get('seed', 0)}.png"
        return save_png(image, Path(folder) / name, {k: str(v) for k, v in info.items()})

