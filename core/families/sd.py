"""Stable Diffusion 1.x (CLIP ViT-L text encoder) and 2.x (OpenCLIP ViT-H): the base family's behaviour is theirs.

They differ only in the text encoder (width 768 / 1024, SD 2.x pads with "!"), which loading and the single-file
layout (core/single_file.py) read from the text encoder's config; here they differ in their names and metadata.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..base_model import PIPELINE_PARTS, BaseModel, clip_tokenizer
from ..errors import ModelLoadError
from ..single_file import unet_module_ldm_names
from .base import Family


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers-style config without its private keys ("_class_name", "_diffusers_version" ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


class SD1Family(Family):
    name = "sd1"
    label = "Stable Diffusion 1.x"
    adapter_metadata = {"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora"}
    hub_ids = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")
    cross_attention_width = 768  # the text encoder's width, which tells SD 1.x and 2.x folders apart

    def matches_folder(self, index, unet_config) -> bool:
        """A single-text-encoder UNet model with no extra conditioning (SDXL has text_encoder_2 and text_time)."""
        if "text_encoder" not in index or "text_encoder_2" in index or unet_config.get("addition_embed_type"):
            return False
        return (unet_config.get("cross_attention_dim") == 1024) == (self.cross_attention_width == 1024)

    def check_folder(self, folder, index, unet_config) -> None:
        kind = index.get("_class_name", "an unknown pipeline")
        missing = [p for p in PIPELINE_PARTS if p not in index]
        if missing:
            raise ModelLoadError(f"{folder} holds {kind}, not a Stable Diffusion 1.x/2.x model (it has no "
                                 f"{', '.join(missing)}).")
        if unet_config.get("in_channels", 4) != 4:
            raise ModelLoadError(f"{folder} holds a UNet with {unet_config['in_channels']} input channels (an "
                                 "inpainting or image-editing model); this app trains plain text-to-image SD "
                                 "1.x/2.x models.")

    def load_folder(self, folder, name=None, **kwargs) -> BaseModel:
        """The parts of a diffusers folder (local, or a hub id with `local_files_only`)."""
        folder = str(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True, **kwargs)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True, **kwargs)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True, **kwargs)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **kwargs)
        return BaseModel(name or folder, tokenizer, text_encoder, vae, unet, scheduler)

    def build_tiny(self, seed: int = 0, prediction_type: str = "epsilon") -> BaseModel:
        """A tiny random SD-shaped model (about 1 M parameters) with the real tokenizer; deterministic per seed."""
        torch.manual_seed(seed)
        tokenizer = clip_tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=49407,
        ))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8, sample_size=32,
        )
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
            norm_num_groups=8,
        )
        scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type=prediction_type, clip_sample=False, steps_offset=1,
        )
        return BaseModel("tiny", tokenizer, text_encoder, vae, unet, scheduler)

    def parts_from_configs(self, configs) -> dict[str, torch.nn.Module]:
        return {"unet": UNet2DConditionModel.from_config(plain_config(configs["unet"])),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**plain_config(configs["text_encoder"]))),
                "vae": AutoencoderKL.from_config(plain_config(configs["vae"]))}

    def extra_unet_names(self, unet, modules: list[str]) -> dict[str, str]:
        """Older A1111-era files name UNet layers in the original SD layout (input_blocks ...)."""
        return unet_module_ldm_names(unet, modules)


class SD2Family(SD1Family):
    name = "sd2"
    label = "Stable Diffusion 2.x"
    adapter_metadata = {"ss_base_model_version": "sd_v2", "modelspec.architecture": "stable-diffusion-v2-512/lora"}
    hub_ids = ()  # the 2.x repos differ in shape (768-v, 512-base): none is assumed before it is downloaded
    cross_attention_width = 1024
