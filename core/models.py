"""Base model loading: the parts of a Stable Diffusion 1.x / 2.x pipeline.

`load_base_model(spec)` accepts:
- "tiny": a tiny random model built in code (tests, smoke runs);
- a local diffusers folder (holds model_index.json);
- a hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5", through the normal cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .errors import ModelLoadError

ASSETS = Path(__file__).resolve().parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"


@dataclass
class BaseModel:
    """The frozen parts of a text-to-image latent diffusion model."""

    name: str  # what the user asked for; recorded in adapter metadata
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler  # the training noise scheduler

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def family(self) -> str:
        """"sd1" or "sd2", from the text encoder width (768: CLIP ViT-L, 1024: OpenCLIP ViT-H)."""
        return "sd2" if self.text_encoder.config.hidden_size == 1024 else "sd1"

    def to(self, device, dtype=None) -> "BaseModel":
        for m in (self.text_encoder, self.vae, self.unet):
            m.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> "BaseModel":
        for m in (self.text_encoder, self.vae, self.unet):
            m.requires_grad_(False)
            m.eval()
        return self


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (49,408 tokens) shipped in core/assets."""
    return CLIPTokenizer(
        str(CLIP_TOKENIZER_DIR / "vocab.json"), str(CLIP_TOKENIZER_DIR / "merges.txt"), model_max_length=model_max_length
    )


def build_tiny_model(seed: int = 0, prediction_type: str = "epsilon") -> BaseModel:
    """A tiny random SD-shaped model (about 1 M parameters) with the real tokenizer; deterministic per seed."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=False, steps_offset=1,
    )
    return BaseModel("tiny", tokenizer, text_encoder, vae, unet, scheduler)


def save_model_folder(model: BaseModel, folder: str | Path) -> Path:
    """Write `model` as a diffusers folder (model_index.json + one subfolder per part)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=model.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def load_model_folder(folder: str | Path, name: str | None = None, **kwargs) -> BaseModel:
    """Load the parts from a diffusers folder (local, or a hub id with `local_files_only`)."""
    folder = str(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True, **kwargs)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True, **kwargs)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True, **kwargs)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **kwargs)
    return BaseModel(name or folder, tokenizer, text_encoder, vae, unet, scheduler)


def load_base_model(spec: str, prediction_type: str = "auto", **kwargs) -> BaseModel:
    """Load the base model named by `spec` (see the module docstring) on the CPU in float32."""
    spec = spec.strip()
    if spec == "tiny":
        model = build_tiny_model()
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"{folder} is a folder but not a diffusers model (it has no model_index.json).")
        model = load_model_folder(folder, name=spec)
    else:
        raise ModelLoadError(f"Cannot find a base model called {spec!r}.")
    if prediction_type != "auto":
        model.scheduler = DDPMScheduler.from_config(model.scheduler.config, prediction_type=prediction_type)
    return model.freeze()
