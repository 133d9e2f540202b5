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
from ..errors import ModelLoadError
from ..single_file import detect_family, load_single_file

# transformers 5's CLIPTextModel names its modules without the `text_model.` level other tools expect
TEXT_MODEL = "text_model."
Conditioning = dict[str, torch.Tensor]  # what a UNet call needs from the prompts, one row per prompt


class Family:
    """One model family. Class attributes are its facts; methods the operations callers ask it for."""

    name = ""  # what BaseModel.family says, e.g. "sd1"
    label = ""  # in messages, e.g. "Stable Diffusion 1.x"
    denoiser = "unet"  # the part that predicts the noise
    text_encoders: tuple[str, ...] = ("text_encoder",)
    # the parts adapters attach to -> the prefix of their module names in kohya / A1111 / ComfyUI files
    kohya_prefixes: Mapping[str, str] = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    default_resolution = 512
    # whether the model's own VAE encodes and decodes in fp16 without overflowing (SDXL's does not: it runs in
    # float32 unless model.vae names another VAE, such as the fp16-fix one)
    vae_fp16_safe = True
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
                  name: str | None = None) -> BaseModel:
        """A single-file checkpoint in the original layout (core/single_file.py reads it offline)."""
        return load_single_file(path, prediction_type, allow_pickle=allow_pickle, name=name)

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

    def unet_forward(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                     geometry: Sequence[Any], dtype: torch.dtype) -> torch.Tensor:
        """The denoiser's prediction for a training batch (`geometry`: each image's, see core/data.py Geometry)."""
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

    def claims_metadata(self, metadata: Mapping[str, str]) -> bool:
        """Whether a community file's metadata (kohya's ss_base_model_version, ModelSpec's architecture) says it
        was made for this family."""
        ours = self.adapter_metadata
        version, arch = metadata.get("ss_base_model_version", ""), metadata.get("modelspec.architecture", "")
        return bool((version and version == ours.get("ss_base_model_version"))
                    or (arch and arch.split("/")[0] == ours.get("modelspec.architecture", "").split("/")[0]))
