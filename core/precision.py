"""Precision and device: which dtype the frozen weights take and where the work runs, for every caller.

Training, class-image generation, the playground, the CLI and the VRAM planner all ask here, so the
rule "fp16 on an NVIDIA GPU, float32 on the CPU" is written once.
"""
from __future__ import annotations

import torch

from .config import Config
from .errors import ConfigError

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> str:
    """"cuda" when PyTorch sees an NVIDIA GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(cfg: Config, family=None) -> str:
    """train.mixed_precision as accelerate names it ("no", "fp16", "bf16"); "auto" is the model family's half
    precision on a GPU (fp16; FLUX.1: bf16), "no" on the CPU. `family`: the base model's; None: read from the
    model's configs (models.spec_family, no weights loaded) when it matters, on a GPU."""
    mp = cfg.train.mixed_precision
    if mp == "auto":
        if not torch.cuda.is_available():
            return "no"
        if family is None:
            from .models import spec_family

            family = spec_family(cfg.model.base)
        return family.half_precision if family is not None else "fp16"
    if mp == "fp16" and not torch.cuda.is_available():
        raise ConfigError("Mixed precision fp16 needs an NVIDIA GPU. On the CPU use `bf16` or `no` (train.mixed_precision).")
    return mp


def frozen_dtype(precision: str) -> torch.dtype | None:
    """The dtype the frozen weights are cast to under `precision`; None under "no": they stay float32 as loaded."""
    dtype = DTYPES[precision]
    return None if dtype == torch.float32 else dtype
