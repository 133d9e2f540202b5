"""Image generation with the base model and its adapters: training previews, class images, the CLI `sample`."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from diffusers import DPMSolverMultistepScheduler, DiffusionPipeline
from PIL import Image

from . import families
from .base_model import BaseModel
from .fileio import atomic_path


def make_pipeline(base: BaseModel, device: torch.device | str = "cpu", **parts) -> DiffusionPipeline:
    """The family's text-to-image pipeline over the given parts (no copies), with a fast multistep sampler.

    `parts` (e.g. unet=..., text_encoder=...) replace the base model's parts, e.g. the unwrapped training modules.
    """
    # a zero-terminal-SNR schedule must start sampling at its last (pure-noise) step: "trailing" spacing does
    trailing = {"timestep_spacing": "trailing"} if zero_terminal_snr(base.scheduler) else {}
    scheduler = DPMSolverMultistepScheduler.from_config(base.scheduler.config, **trailing)
    pipe = families.of(base).make_pipeline(base, scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def zero_terminal_snr(scheduler) -> bool:
    """Whether a scheduler's noise schedule ends at pure noise (model.zero_terminal_snr, or the model says so)."""
    return bool(scheduler.config.get("rescale_betas_zero_snr", False))


def guidance_rescale(scheduler) -> float:
    """Classifier-free guidance over-exposes images of a zero-terminal-SNR model; the diffusers docs advise
    rescaling it by 0.7 there (Lin et al. 2023, section 3.4)."""
    return 0.7 if zero_terminal_snr(scheduler) else 0.0


def autocast_for(device: torch.device, dtype: torch.dtype):
    """Autocast when frozen weights are half precision, so fp32 adapters and fp16 weights mix."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(pipe: DiffusionPipeline, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 7.5,
             size: int | None = None, negative_prompt: str = "",
             on_step: Callable[[int, int], None] | None = None, width: int | None = None,
             height: int | None = None) -> list[Image.Image]:
    """One image per (prompt, seed), in one batch; each image depends only on its own seed.

    `on_step(steps_done, steps)` is called after every denoising step; an exception it raises abandons the batch
    (that is how a stop acts within seconds instead of after a batch of many minutes).
    """
    device = pipe.unet.device
    dtype = next(pipe.unet.parameters()).dtype
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = width or size, height or size  # a square `size` unless a side is given
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    # Draw the starting noise on the CPU so an image is the same on every device for a given seed.
    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
    # every model of the pipeline (one or two text encoders, the UNet, the VAE)
    modes = {m: m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module)}
    for m in modes:
        m.eval()  # no adapter dropout while sampling, even mid-training
    try:
        with autocast_for(device, dtype):
            out = pipe(prompts, negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
                       num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                       guidance_rescale=guidance_rescale(pipe.scheduler),
                       latents=latents.to(dtype),
                       generator=generators, output_type="latent",
                       callback_on_step_end=_step_callback(on_step) if on_step else None)
        # outside autocast, in the VAE's own dtype: a VAE kept in float32 because it overflows in half precision
        # (SDXL's) would otherwise decode in fp16 all the same
        return decode(pipe, out.images)
    finally:
        for m, mode in modes.items():
            m.train(mode)


@torch.no_grad()
def decode(pipe: DiffusionPipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Images from the pipeline's final (scaled) latents, as its own output_type="pil" step makes them."""
    vae = pipe.vae
    latents = latents.to(vae.dtype)
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is not None and std is not None:  # VAEs whose latents were normalised per channel
        shape = (1, len(mean), 1, 1)
        latents = latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor + \
            torch.tensor(mean).view(shape).to(latents)
    else:
        latents = latents / vae.config.scaling_factor
    return pipe.image_processor.postprocess(vae.decode(latents).sample, output_type="pil")


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
