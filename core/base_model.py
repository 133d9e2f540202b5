"""The frozen parts of a latent diffusion model (SD 1.x / 2.x, SDXL), and the CLIP tokenizer shipped with the app.

A leaf module (no other core module imported), so that every module that handles a model (loading,
single-file checkpoints, adapters, sampling) can name its type without importing the loaders.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"
# the parts of a diffusers Stable Diffusion folder (model_index.json) that a BaseModel is made of
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "scheduler", "tokenizer")


@dataclass
class BaseModel:
    """The frozen parts of a text-to-image latent diffusion model."""

    name: str  # what the user asked for; recorded in adapter metadata
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler  # the training noise scheduler
    # SDXL's second text encoder (OpenCLIP ViT-bigG, with projection) and its tokenizer; None for SD 1.x / 2.x
    text_encoder_2: Any = None
    tokenizer_2: CLIPTokenizer | None = None
    # where a VAE that replaced the model's own came from (model.vae); "" for the model's own VAE
    vae_source: str = ""
    # the family when its parts alone do not tell it ("flux": `unet` holds the FLUX transformer, `text_encoder` is
    # CLIP-L and `text_encoder_2` T5, which never trains); "" to tell it from the parts (SD 1.x / 2.x, SDXL)
    family_name: str = ""

    @property
    def transformer(self):
        """The denoiser of a transformer family (FLUX) under its own name; the same object as `unet`."""
        return self.unet

    @transformer.setter
    def transformer(self, module) -> None:
        self.unet = module

    @property
    def denoiser_name(self) -> str:
        return "transformer" if self.family_name == "flux" else "unet"

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def family(self) -> str:
        """sdxl with a second text encoder, else sd1 or sd2 by the text encoder width (768: CLIP ViT-L, 1024: OpenCLIP ViT-H)."""
        if self.family_name:
            return self.family_name
        if self.text_encoder_2 is not None:
            return "sdxl"
        return "sd2" if self.text_encoder.config.hidden_size == 1024 else "sd1"

    @property
    def parts(self):
        """The parts adapters attach to, by name."""
        parts = {self.denoiser_name: self.unet, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None and self.family_name != "flux":
            parts["text_encoder_2"] = self.text_encoder_2
        return parts

    @property
    def all_parts(self) -> dict:
        """Every part with weights, by name: the adapter parts, frozen-only encoders (FLUX's T5) and the VAE."""
        frozen = {"text_encoder_2": self.text_encoder_2} if self.family_name == "flux" else {}
        return {**self.parts, **frozen, "vae": self.vae}

    @property
    def modules(self) -> list:
        """Every part with weights (the VAE too)."""
        return [m for m in (self.text_encoder, self.text_encoder_2, self.vae, self.unet) if m is not None]

    def to(self, device, dtype=None) -> "BaseModel":
        kwargs = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
        for m in self.modules:
            m.to(**kwargs)
        return self

    def freeze(self) -> "BaseModel":
        for m in self.modules:
            m.requires_grad_(False)
            m.eval()
        return self


def clip_tokenizer(model_max_length: int = 77, pad_token: str | None = None) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (49,408 tokens) shipped in core/assets; SD 2.x pads with "!"."""
    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer(str(CLIP_TOKENIZER_DIR / "vocab.json"), str(CLIP_TOKENIZER_DIR / "merges.txt"),
                         model_max_length=model_max_length, **extra)
