"""Stable Diffusion XL (and its descendants: Pony, Illustrious, NoobAI, Juggernaut ...): two text encoders and a UNet
that also takes the pooled text embedding and each image's size / crop ids.

What differs from SD 1.x/2.x, as the diffusers SDXL DreamBooth script and pipeline do it:
- the prompt embedding is the penultimate hidden state of CLIP-L and of OpenCLIP-G, concatenated; the pooled
  (projected) embedding of OpenCLIP-G goes in beside it;
- six "time ids" per image: its original size, the crop's top-left corner and the target size, so the model knows
  a crop for a crop (taken from what the data pipeline really did: core/data.py Geometry);
- kohya / A1111 / ComfyUI files name the UNet's modules in the original SGM layout (input_blocks_4_1_...) and
  the text encoders lora_te1_ (CLIP-L) and lora_te2_ (OpenCLIP-G).
The building blocks (tiny model, folders) are in sdxl_parts.py; single files in core/single_file.py.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..base_model import BaseModel
from ..errors import ModelLoadError
from ..single_file import (load_sdxl_single_file, read_config_folder, shipped_config_folder,
                           unet_config_ldm_names, unet_module_ldm_names)
from .base import Conditioning, Family
from .sdxl_parts import (TIME_IDS, build_sdxl_from_configs, build_tiny_sdxl, check_sdxl_folder, load_sdxl_folder)


def time_ids(geometry: Sequence[Any]) -> torch.Tensor:
    """(n, 6) float: original (h, w), crop top-left (y, x), target (h, w) of each image, as SDXL was trained."""
    return torch.tensor([[*g.original, *g.crop, *g.target] for g in geometry], dtype=torch.float32)


class SDXLFamily(Family):
    name = "sdxl"
    label = "Stable Diffusion XL"
    text_encoders = ("text_encoder", "text_encoder_2")
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    default_resolution = 1024
    vae_fp16_safe = False  # SDXL's VAE overflows in fp16 (hence the community's fp16-fix VAE)
    hub_files = (*Family.hub_files, "tokenizer_2/*", "text_encoder_2/config.json",
                 "text_encoder_2/model*.safetensors*")
    pipeline = "StableDiffusionXLPipeline"
    hub_ids = ("stabilityai/stable-diffusion-xl-base-1.0",)
    adapter_metadata = {"ss_base_model_version": "sdxl_base_v1-0",
                        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}

    # --- recognising and loading ----------------------------------------------------------------------------------

    def matches_folder(self, index, unet_config) -> bool:
        """Any SDXL-architecture folder (base, refiner, inpainting, incomplete): check_folder says what is wrong."""
        if "transformer" in index:  # a transformer model with two text encoders (FLUX, SD3) is not SDXL
            return False
        return (str(index.get("_class_name", "")).startswith("StableDiffusionXL") or "text_encoder_2" in index
                or unet_config.get("addition_embed_type") == "text_time")

    def check_folder(self, folder, index, unet_config) -> None:
        check_sdxl_folder(folder)  # the refiner and inpainting models, in plain words

    def load_folder(self, folder, name=None, **kwargs) -> BaseModel:
        return load_sdxl_folder(folder, name, **kwargs)

    def load_file(self, path, prediction_type="auto", allow_pickle=False, name=None, companions=None) -> BaseModel:
        return load_sdxl_single_file(path, prediction_type, allow_pickle=allow_pickle, name=name)

    def build_tiny(self, seed: int = 0, prediction_type: str = "epsilon") -> BaseModel:
        return build_tiny_sdxl(seed, prediction_type)

    def parts_from_configs(self, configs) -> dict[str, torch.nn.Module]:
        model = build_sdxl_from_configs(configs)
        return {"unet": model.unet, "text_encoder": model.text_encoder, "text_encoder_2": model.text_encoder_2,
                "vae": model.vae}

    # --- training ---------------------------------------------------------------------------------------------------

    def encode_prompts(self, base: BaseModel, prompts: Sequence[str], device) -> Conditioning:
        """Penultimate hidden states of both encoders side by side, and the second encoder's projected pooled
        output (what StableDiffusionXLPipeline.encode_prompt gives for a prompt, without classifier-free guidance)."""
        states = []
        for encoder, tokenizer in ((base.text_encoder, base.tokenizer), (base.text_encoder_2, base.tokenizer_2)):
            out = encoder(self.tokenize(tokenizer, prompts, device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        return {"hidden": torch.cat(states, dim=-1), "pooled": out[0]}

    def unet_forward(self, unet, noisy, timesteps, cond, geometry, dtype, guidance: float = 1.0) -> torch.Tensor:
        added = {"text_embeds": cond["pooled"].to(dtype), "time_ids": time_ids(geometry).to(noisy.device, dtype)}
        return unet(noisy, timesteps, cond["hidden"].to(dtype), added_cond_kwargs=added).sample

    def trace_inputs(self, configs, images, latent, dtype, device="meta") -> tuple[tuple, dict]:
        (sample, steps, _), _ = super().trace_inputs(configs, images, latent, dtype, device)
        width = configs["unet"]["cross_attention_dim"]
        if isinstance(width, (list, tuple)):
            width = width[0]
        cond = torch.empty((images, 77, width), device=device, dtype=dtype)
        pooled = configs["text_encoder_2"].get("projection_dim") or configs["text_encoder_2"]["hidden_size"]
        added = {"text_embeds": torch.empty((images, pooled), device=device, dtype=dtype),
                 "time_ids": torch.empty((images, TIME_IDS), device=device, dtype=dtype)}
        return (sample, steps, cond), {"added_cond_kwargs": added}

    # --- pipelines --------------------------------------------------------------------------------------------------

    def pipeline_components(self, base: BaseModel, scheduler=None, **parts) -> dict[str, Any]:
        chosen = {**base.parts, **{k: v for k, v in parts.items() if v is not None}}
        # no invisible watermark: it needs a package we do not ship, and it would mark the user's own samples
        return dict(vae=base.vae, text_encoder=chosen["text_encoder"], text_encoder_2=chosen["text_encoder_2"],
                    tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=chosen["unet"],
                    scheduler=scheduler or base.scheduler, add_watermarker=False)

    # --- names other tools use --------------------------------------------------------------------------------------

    def extra_unet_names(self, unet, modules: list[str]) -> dict[str, str]:
        """kohya, A1111, Forge and ComfyUI name SDXL's UNet modules by the original SGM layout."""
        return unet_module_ldm_names(unet, modules)

    def export_names(self, part, modules, unet_config=None) -> dict[str, str]:
        """The UNet's modules by their SGM names, as Civitai's SDXL files have them (A1111's converter of
        diffusers-style UNet names assumes SD 1.x's block layout). The SGM numbering follows the UNet's block
        structure only (levels, layers per level, which up blocks have attention), which every SDXL base and
        fine-tune shares; the shipped config stands in for a UNet the adapter did not record."""
        if part != self.denoiser:
            return super().export_names(part, modules)
        config = unet_config or read_config_folder(shipped_config_folder(self.name, "epsilon"))["unet"]
        sgm = unet_config_ldm_names(config, list(modules))
        missing = [m for m in modules if m not in sgm]
        if missing:
            raise ModelLoadError(f"The UNet layers {', '.join(missing[:3])} have no name in the original SDXL layout, "
                                 "so other tools could not load them: export this adapter with --format diffusers.")
        return {m: self.kohya_prefixes[part] + sgm[m].replace(".", "_") for m in modules}
