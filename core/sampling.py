"""Image generation with the base model and its adapters: training previews, class images, the CLI `sample`."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from . import families
from .base_model import BaseModel
from .families.base import guidance_rescale, zero_terminal_snr  # noqa: F401 (re-exported)
from .fileio import atomic_path
from .placement import parts_on


def make_pipeline(base: BaseModel, device: torch.device | str = "cpu", **parts) -> DiffusionPipeline:
    """The family's text-to-image pipeline over the given parts (no copies), with a fast multistep sampler.

    `parts` (e.g. unet=..., text_encoder=...) replace the base model's parts, e.g. the unwrapped training modules.
    """
    family = families.of(base)
    pipe = family.make_pipeline(base, family.sampling_scheduler(base), **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def autocast_for(device: torch.device, dtype: torch.dtype):
    """Autocast when frozen weights are half precision, so fp32 adapters and fp16 weights mix."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(pipe: DiffusionPipeline, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 7.5,
             size: int | None = None, negative_prompt: str = "",
             on_step: Callable[[int, int], None] | None = None, width: int | None = None,
             height: int | None = None, prompt_inputs: dict | None = None) -> list[Image.Image]:
    """One image per (prompt, seed), in one batch; each image depends only on its own seed.

    `prompt_inputs`: the prompts' embeddings computed ahead (`encoded_apart`), used instead of encoding them here.

    `on_step(steps_done, steps)` is called after every denoising step; an exception it raises abandons the batch
    (that is how a stop acts within seconds instead of after a batch of many minutes).
    """
    family = families.of_pipeline(pipe)
    denoiser = getattr(pipe, family.denoiser)
    device = denoiser.device
    dtype = next(denoiser.parameters()).dtype
    if not (size or (width and height)):
        size = family.native_size(pipe)
    width, height = width or size, height or size  # a square `size` unless a side is given
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    # Draw the starting noise on the CPU so an image is the same on every device for a given seed.
    latents = family.start_latents(pipe, generators, height, width, device)
    # every model of the pipeline (one or two text encoders, the denoiser, the VAE)
    modes = {m: m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module)}
    for m in modes:
        m.eval()  # no adapter dropout while sampling, even mid-training
    try:
        with autocast_for(device, dtype):
            prompt = {"prompt": prompts} if prompt_inputs is None else prompt_inputs
            out = pipe(**prompt, num_inference_steps=steps, height=height, width=width, latents=latents.to(dtype),
                       generator=generators, output_type="latent",
                       callback_on_step_end=_step_callback(on_step) if on_step else None,
                       **family.call_options(pipe, negative_prompt, len(prompts), guidance))
        # outside autocast, in the VAE's own dtype: a VAE kept in float32 because it overflows in half precision
        # (SDXL's) would otherwise decode in fp16 all the same
        return family.decode(pipe, out.images, height, width)
    finally:
        for m, mode in modes.items():
            m.train(mode)


@contextlib.contextmanager
def encoded_apart(base: BaseModel, prompts: list[str], device, away: list[str]):
    """For a family that encodes apart (FLUX.1): the prompts' embeddings, made while only the encoders among `away`
    (parts kept in main memory) are on the device, then the rest of `away` brought for the block; yields the
    embeddings (None for the other families: all of `away` is brought, the pipeline encodes itself). Each part goes
    back where it was after its phase (core.placement.parts_on)."""
    family = families.of(base)
    if not family.encode_apart:
        with parts_on(base, away, device):
            yield None
        return
    encoders = [p for p in away if p in family.encoders]
    with parts_on(base, encoders, device):
        inputs = family.prompt_inputs(base, prompts, device)
    with parts_on(base, [p for p in away if p not in encoders], device):
        yield inputs


def _step_callback(on_step: Callable[[int, int], None]):
    """diffusers' callback_on_step_end (pipe, step index, timestep, tensors) -> on_step(steps done, steps)."""
    def callback(pipe, index, timestep, tensors):
        on_step(index + 1, pipe.num_timesteps)
        return tensors

    return callback


def save_png(image: Image.Image, path: str | Path, pnginfo: dict[str, str] | None = None) -> Path:
    """Write a PNG atomically (temp file in the same folder, then rename)."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for k, v in (pnginfo or {}).items():
        info.add_text(k, str(v))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path
