"""What a model family is: the operations that differ between families, with Stable Diffusion 1.x's as the defaults.

A family (core/families/sd.py, ...) subclasses `Family` and overrides only what differs; the registry
(core/families/__init__.py) finds the family of a model, a folder or a checkpoint. The trainer, sampling,
the planner and the file formats ask the family instead of assuming one text encoder and `unet(x, t, hidden)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import diffusers
import torch

from ..base_model import BaseModel
from ..errors import ConfigError, ModelLoadError
from ..single_file import detect_family, load_single_file

# transformers 5's CLIPTextModel names its modules without the `text_model.` level other tools expect
TEXT_MODEL = "text_model."
Conditioning = dict[str, torch.Tensor]  # what a UNet call needs from the prompts, one row per prompt


class Family:
    """One model family. Class attributes are its facts; methods the operations callers ask it for."""

    name = ""  # what BaseModel.family says, e.g. "sd1"
    label = ""  # in messages, e.g. "Stable Diffusion 1.x"
    denoiser = "unet"  # the part that predicts the noise
    text_encoders: tuple[str, ...] = ("text_encoder",)  # the encoders adapters may train
    # every encoder a prompt goes through (FLUX's T5 too, which never trains): cached and offloaded together
    prompt_encoders: tuple[str, ...] = ()
    default_targets: tuple[str, ...] = ()  # the denoiser's adapter targets by default; () for the UNet's
    # the parts adapters attach to -> the prefix of their module names in kohya / A1111 / ComfyUI files
    kohya_prefixes: Mapping[str, str] = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    default_resolution = 512
    # whether the model's own VAE encodes and decodes in fp16 without overflowing (SDXL's does not: it runs in
    # float32 unless model.vae names another VAE, such as the fp16-fix one)
    vae_fp16_safe = True
    # the half precision its weights run in on a GPU when train.mixed_precision is auto (FLUX.1: bf16; its
    # activations overflow fp16)
    half_precision = "fp16"
    # what a hub repo of this family must hold for `load_folder` (not the .ckpt, fp16 or .bin copies beside it)
    hub_files: tuple[str, ...] = ("model_index.json", "scheduler/*", "tokenizer/*", "unet/config.json",
                                  "vae/config.json", "text_encoder/config.json",
                                  "unet/diffusion_pytorch_model*.safetensors*",
                                  "vae/diffusion_pytorch_model*.safetensors*", "text_encoder/model*.safetensors*")
    hub_ignore: tuple[str, ...] = ("*.fp16.*", "*.non_ema.*", "*.ema.*")
    # hub repos of the family's reference models, shaped as its shipped configs: the built-in presets train them,
    # and the VRAM planner knows their size before they are downloaded
    hub_ids: tuple[str, ...] = ()
    pipeline: str = "StableDiffusionPipeline"  # the diffusers pipeline class for samples, class images, folders
    # kohya's `ss_base_model_version` and ModelSpec's architecture of an adapter for this family
    adapter_metadata: Mapping[str, str] = {}

    @property
    def encoders(self) -> tuple[str, ...]:
        """Every encoder a prompt goes through."""
        return self.prompt_encoders or self.text_encoders

    @property
    def parts(self) -> tuple[str, ...]:
        """The adapter-attachable parts, the denoiser first."""
        return (self.denoiser, *self.text_encoders)

    # --- recognising and loading ----------------------------------------------------------------------------------

    def matches_folder(self, index: Mapping[str, Any], unet_config: Mapping[str, Any]) -> bool:
        """Whether a diffusers folder with this model_index.json and unet/config.json is of this family."""
        return False

    def check_folder(self, folder: Path, index: Mapping[str, Any], unet_config: Mapping[str, Any]) -> None:
        """Raise a plain-words ModelLoadError for a folder of this family that cannot be trained (e.g. inpainting)."""

    def matches_checkpoint(self, shapes: Mapping[str, Any]) -> bool:
        """Whether an original-layout single file with these keys -> shapes is of this family (as the layout's
        detection names it; what it refuses belongs to no family)."""
        try:
            return detect_family(shapes) == self.name
        except ModelLoadError:
            return False

    def load_folder(self, folder: str | Path, name: str | None = None, **kwargs) -> BaseModel:
        raise NotImplementedError

    def load_file(self, path: Path, prediction_type: str = "auto", allow_pickle: bool = False,
                  name: str | None = None, companions: Mapping[str, str] | None = None) -> BaseModel:
        """A single-file checkpoint in the original layout (core/single_file.py reads it offline). `companions`:
        part -> file or folder, for families whose files hold only the denoiser (FLUX.1); SD files are whole."""
        return load_single_file(path, prediction_type, allow_pickle=allow_pickle, name=name)

    def held_dtype(self, model: BaseModel) -> torch.dtype:
        """The dtype a loaded model waits in main memory (float32: exact CPU maths; the GPU casts it to half)."""
        return torch.float32

    def build_tiny(self, seed: int = 0, prediction_type: str = "epsilon") -> BaseModel:
        """A tiny random model of this family's architecture (tests, smoke runs)."""
        raise NotImplementedError

    def parts_from_configs(self, configs: Mapping[str, dict]) -> dict[str, torch.nn.Module]:
        """Every part with weights (denoiser, text encoders, VAE), fresh, from diffusers-style configs."""
        raise NotImplementedError

    # --- training ---------------------------------------------------------------------------------------------------

    def tokenize(self, tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    def encode_prompts(self, base: BaseModel, prompts: Sequence[str], device) -> Conditioning:
        """The UNet's conditioning for `prompts`, one row per prompt: here the text encoder's last hidden state."""
        return {"hidden": base.text_encoder(self.tokenize(base.tokenizer, prompts, device))[0]}

    def frozen_conditioning(self, base: BaseModel, prompts: Sequence[str], device) -> Conditioning:
        """The part of the conditioning from encoders that never train (encoded once while others train): none
        here, where every encoder may train."""
        return {}

    def scale_latents(self, base: BaseModel, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's latents as the denoiser sees them."""
        return latents * base.vae.config.scaling_factor

    def noisy_and_target(self, base: BaseModel, x0: torch.Tensor, generator: torch.Generator, t):
        """(noisy latents, timesteps, target, per-image loss weights or None) of a training batch: DDPM noise at
        random timesteps (`train.noise_offset`, min-SNR weights). The order of the random draws is part of a run's
        identity: noise, offset noise, timesteps, all from `generator`."""
        sched = base.scheduler
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        if t.noise_offset:  # a per-channel shift: lets the model learn overall brightness (very dark / light images)
            noise = noise + t.noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=generator).to(x0.device)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=generator)
        timesteps = timesteps.to(x0.device)
        weights = min_snr_weights(sched, timesteps, t.min_snr_gamma) if t.min_snr_gamma else None
        return sched.add_noise(x0, noise, timesteps), timesteps, training_target(sched, x0, noise, timesteps), weights

    def check_training(self, t) -> None:
        """Raise a ConfigError for training settings this family cannot use."""

    def check_sizes(self, data, vae_scale_factor: int) -> None:
        """Raise a ConfigError for image sizes this family cannot train on (`data`: the DataConfig)."""

    def unet_forward(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                     geometry: Sequence[Any], dtype: torch.dtype, guidance: float = 1.0) -> torch.Tensor:
        """The denoiser's prediction for a training batch (`geometry`: each image's, see core/data.py Geometry;
        `guidance`: the distilled guidance scale of a model that embeds one)."""
        return unet(noisy, timesteps, cond["hidden"].to(dtype)).sample

    def trace_inputs(self, configs: Mapping[str, dict], images: int, latent: tuple[int, int], dtype: torch.dtype,
                     device: str = "meta") -> tuple[tuple, dict]:
        """(args, kwargs) of one denoiser call at this batch and latent size (height, width), for the VRAM
        planner's trace."""
        sample = torch.empty((images, configs["unet"].get("in_channels", 4), *latent), device=device, dtype=dtype)
        cond = torch.empty((images, 77, configs["text_encoder"]["hidden_size"]), device=device, dtype=dtype)
        return (sample, torch.zeros(images, device=device, dtype=torch.long), cond), {}

    def vae_dtype(self, base: BaseModel, dtype: torch.dtype | None) -> torch.dtype | None:
        """The dtype the VAE runs in when the frozen weights are `dtype` (None: as loaded, float32)."""
        if dtype is None or self.vae_fp16_safe or base.vae_source:
            return dtype
        return torch.float32

    # --- pipelines --------------------------------------------------------------------------------------------------

    def pipeline_components(self, base: BaseModel, scheduler=None, **parts) -> dict[str, Any]:
        """The keyword arguments of the pipeline class over the base model's parts; `parts` replace some of them."""
        chosen = {**base.parts, **{k: v for k, v in parts.items() if v is not None}}
        return dict(vae=base.vae, text_encoder=chosen["text_encoder"], tokenizer=base.tokenizer, unet=chosen["unet"],
                    scheduler=scheduler or base.scheduler, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)

    def sampling_scheduler(self, base: BaseModel):
        """The sampler of previews and class images: a fast multistep solver over the training schedule (a
        zero-terminal-SNR schedule starts at its last, pure-noise step: "trailing" spacing)."""
        trailing = {"timestep_spacing": "trailing"} if zero_terminal_snr(base.scheduler) else {}
        return diffusers.DPMSolverMultistepScheduler.from_config(base.scheduler.config, **trailing)

    def native_size(self, pipe) -> int:
        """The image side the model was made for: the UNet's sample size in pixels."""
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    def start_latents(self, pipe, generators, height: int, width: int, device) -> torch.Tensor:
        """Each image's starting noise, drawn on the CPU from its own seed (the same image on every device)."""
        shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)

    # whether samples encode their prompts first, with only the encoders on the device, then denoise without them
    # (FLUX.1: T5 alone is 9.5 GB, too much beside the transformer on a 16-24 GB card); SD / SDXL: one pipeline call
    encode_apart = False

    def prompt_inputs(self, base: BaseModel, prompts: Sequence[str], device) -> dict:
        """The pipeline call's prompt keywords computed ahead (`encode_apart` families): its prompt embeddings."""
        raise NotImplementedError

    def call_options(self, pipe, negative_prompt: str, n: int, guidance: float) -> dict:
        """The pipeline call's family-specific keywords: classifier-free guidance and the negative prompt."""
        return {"guidance_scale": guidance, "guidance_rescale": guidance_rescale(pipe.scheduler),
                "negative_prompt": [negative_prompt] * n if negative_prompt else None}

    def decode(self, pipe, latents: torch.Tensor, height: int, width: int) -> list:
        """Images from the pipeline's final latents (output_type="latent"), as its own "pil" step makes them."""
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

    def make_pipeline(self, base: BaseModel, scheduler=None, **parts):
        # looked up when needed: importing the pipelines is slow and loading a model does not need them
        return getattr(diffusers, self.pipeline)(**self.pipeline_components(base, scheduler, **parts))

    # --- names other tools use --------------------------------------------------------------------------------------

    def kohya_name(self, part: str, module: str) -> str:
        """kohya / A1111 name of `module` of `part`, e.g. lora_te_text_model_encoder_layers_0_self_attn_q_proj."""
        if part in self.text_encoders and not module.startswith(TEXT_MODEL):
            module = TEXT_MODEL + module
        return self.kohya_prefixes[part] + module.replace(".", "_")

    def extra_unet_names(self, unet, modules: list[str]) -> dict[str, str]:
        """diffusers UNet module name -> another name files of this family use for it (older layouts); {} if none."""
        return {}

    def export_names(self, part: str, modules: Sequence[str],
                     unet_config: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Module name -> the kohya / A1111 / ComfyUI name an export gives it. `unet_config`: the config of the
        UNet the adapter was trained on, for families whose exported UNet names follow it (None: the family's
        standard model)."""
        return {m: self.kohya_name(part, m) for m in modules}

    def export_groups(self, part: str, modules: Sequence[str],
                      unet_config: Mapping[str, Any] | None = None) -> dict[str, list[tuple[str | None, int]]]:
        """Exported name -> the modules it holds, in order: [(module, 1)] each here; a family whose other tools
        fuse layers (FLUX's q, k, v) lists several, None where a member did not train, with their relative widths."""
        return {name: [(m, 1)] for m, name in self.export_names(part, modules, unet_config).items()}

    def fused_members(self, part: str, module: str) -> list[str]:
        """The layers of `part` that other tools' files fuse with `module` into one (itself included, in order):
        FLUX's q, k, v (and a single block's MLP input); here every layer stands alone."""
        return [module]

    def split_kohya(self, groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """A kohya file's modules (name -> tensors) with layers other tools fuse split into this app's layers
        (FLUX's qkv); as they are here."""
        return groups

    def claims_metadata(self, metadata: Mapping[str, str]) -> bool:
        """Whether a community file's metadata (kohya's ss_base_model_version, ModelSpec's architecture) says it
        was made for this family."""
        ours = self.adapter_metadata
        version, arch = metadata.get("ss_base_model_version", ""), metadata.get("modelspec.architecture", "")
        return bool((version and version == ours.get("ss_base_model_version"))
                    or (arch and arch.split("/")[0] == ours.get("modelspec.architecture", "").split("/")[0]))


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output, by the scheduler's prediction type: the noise, the velocity, or the clean latents."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ConfigError(f"Cannot train a model with prediction type {kind!r}: use epsilon, v_prediction or sample "
                      "(model.prediction_type).")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(snr, gamma) on the x0 error, which is
    min(snr, gamma) / snr on the noise error and min(snr, gamma) / (snr + 1) on the velocity error."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    w = torch.clamp(snr, max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return w
    if kind == "v_prediction":
        return w / (snr + 1)
    # min(snr, gamma) / snr written so that a zero-terminal-SNR schedule's last step (snr 0) weighs 1, not 0 / 0
    return torch.clamp(gamma / snr, max=1.0)


def zero_terminal_snr(scheduler) -> bool:
    """Whether a scheduler's noise schedule ends at pure noise (model.zero_terminal_snr, or the model says so)."""
    return bool(scheduler.config.get("rescale_betas_zero_snr", False))


def guidance_rescale(scheduler) -> float:
    """Classifier-free guidance over-exposes images of a zero-terminal-SNR model; the diffusers docs advise
    rescaling it by 0.7 there (Lin et al. 2023, section 3.4)."""
    return 0.7 if zero_terminal_snr(scheduler) else 0.0
