"""Where the frozen parts of a run live: which stay on the GPU while training, which wait in main memory.

The VAE and frozen text encoders are needed only to encode the training images and prompts; once their outputs
are cached (latents, text embeddings) they would sit idle on the GPU beside the UNet for the whole run. With
`train.offload_frozen` they go back to main memory after their cache and come to the GPU again only to draw
samples (kohya's recipe for 8 GB cards). The trainer moves the parts and the VRAM planner counts them by the
same rules, both from this module.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from .base_model import BaseModel
from .config import Config

HOME = torch.device("cpu")  # where a part waits while it is not needed on the GPU


def latents_cached(cfg: Config) -> bool:
    """The VAE encodes every training image once, before training: a centre crop is the same every step (random
    crops differ every step, so they are encoded in each step)."""
    return cfg.train.cache_latents and cfg.data.center_crop


def text_cached(cfg: Config, text_encoders: Iterable[str], trained: Iterable[str]) -> bool:
    """The prompts are encoded once, before training: the text encoders are all frozen, so a prompt's embedding
    never changes."""
    return cfg.train.cache_text_embeddings and not set(text_encoders) & set(trained)


def cached_encoders(cfg: Config, text_encoders: Iterable[str], trained: Iterable[str],
                    trainable: Iterable[str] | None = None) -> tuple[str, ...]:
    """The text encoders whose outputs are computed once, before training: all of them when none trains; else
    those that never train (`text_encoders` not in `trainable`: FLUX's T5 while CLIP-L trains)."""
    text_encoders = tuple(text_encoders)
    if not cfg.train.cache_text_embeddings:
        return ()
    if text_cached(cfg, text_encoders, trained):
        return text_encoders
    return tuple(e for e in text_encoders if trainable is not None and e not in set(trainable))


def offloaded_parts(cfg: Config, text_encoders: tuple[str, ...], trained: Iterable[str],
                    trainable: Iterable[str] | None = None) -> tuple[str, ...]:
    """The frozen parts kept in main memory while training: the VAE when the latents are cached, the text encoders
    whose embeddings are (none when `train.offload_frozen` is off)."""
    if not cfg.train.offload_frozen:
        return ()
    vae = ("vae",) if latents_cached(cfg) else ()
    return vae + cached_encoders(cfg, text_encoders, trained, trainable)


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def move_parts(model: BaseModel, names: Iterable[str], device: torch.device | str) -> None:
    """Move parts of `model` by name ("unet", "vae", "text_encoder", ...), each in its own dtype."""
    for name in names:
        getattr(model, name).to(device)


@contextlib.contextmanager
def parts_on(model: BaseModel, names: Iterable[str], device: torch.device | str) -> Iterator[None]:
    """Parts `names` of `model` on `device` for the block, each back where it was afterwards (an offloaded part
    brought to the GPU to draw a sample goes back to main memory)."""
    homes = {name: device_of(getattr(model, name)) for name in names}
    move_parts(model, homes, device)
    try:
        yield
    finally:
        for name, home in homes.items():
            getattr(model, name).to(home)
