"""SDXL's building blocks as plain functions: a tiny SDXL-architecture model built in code, and recognising,
loading and writing diffusers SDXL folders. The SDXL family wraps them; single files live in core/single_file.py.

An SDXL pipeline differs from SD's by parts, not by code: a second text encoder (OpenCLIP ViT-bigG with a
text projection, whose tokenizer is the same CLIP BPE padding with "!"), and a UNet with
`addition_embed_type="text_time"` that takes the pooled text embedding and six size/crop ids beside the
text embedding (the two encoders' hidden states concatenated, hence its cross-attention width).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..base_model import BaseModel, clip_tokenizer
from ..errors import ModelLoadError
from ..single_file import read_config_folder, shipped_config_folder

TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)
# what each part of a diffusers SDXL folder is loaded as
FOLDER_PARTS = {"tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer, "text_encoder": CLIPTextModel,
                "text_encoder_2": CLIPTextModelWithProjection, "vae": AutoencoderKL, "unet": UNet2DConditionModel,
                "scheduler": DDPMScheduler}
_WEIGHTED = ("text_encoder", "text_encoder_2", "vae", "unet")


def sdxl_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The DDPM scheduler SDXL trains with, from the shipped configs (v_prediction: with zero terminal SNR)."""
    return DDPMScheduler.from_config(read_config_folder(shipped_config_folder("sdxl", prediction_type))["scheduler"])


def _tiny_clip_config(vocab_size: int, width: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407, **extra)


def build_tiny_sdxl(seed: int = 0, prediction_type: str = "epsilon") -> BaseModel:
    """A tiny random SDXL-architecture model with the real tokenizers; deterministic per seed, fast on the CPU.

    Shaped like SDXL where layout code can tell: three UNet levels, two layers per level, no attention in the
    first, a different number of transformer blocks per attention level (and in the mid block), text_time
    conditioning, CLIP-L-like and OpenCLIP-G-like encoders of different widths (diffusers' single-file reader
    tells the two apart by width, as it does at 768 / 1280).
    """
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    text_encoder = CLIPTextModel(_tiny_clip_config(len(tokenizer), 32, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(len(tokenizer), 64, projection_dim=24))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=64, scaling_factor=0.13025,
    )
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), norm_num_groups=8,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=text_encoder_2.config.projection_dim + TIME_IDS * time_embed_dim,
    )
    return BaseModel("tiny-sdxl", tokenizer, text_encoder, vae, unet, sdxl_scheduler(prediction_type),
                     text_encoder_2, tokenizer_2)


def build_sdxl_from_configs(configs: dict[str, dict], name: str = "sdxl") -> BaseModel:
    """An SDXL model with fresh (random) weights from diffusers-style part configs (read_config_folder), on the
    default device: wrap the call in `with torch.device("meta"):` for shapes only (e.g. the shipped configs)."""
    plain = {part: {k: v for k, v in cfg.items() if not k.startswith("_")} for part, cfg in configs.items()}
    tok, tok_2 = plain.get("tokenizer", {}), plain.get("tokenizer_2", {"pad_token": "!"})
    return BaseModel(
        name, clip_tokenizer(tok.get("model_max_length", 77), tok.get("pad_token")),
        CLIPTextModel(CLIPTextConfig(**plain["text_encoder"])), AutoencoderKL.from_config(plain["vae"]),
        UNet2DConditionModel.from_config(plain["unet"]), DDPMScheduler.from_config(plain["scheduler"]),
        CLIPTextModelWithProjection(CLIPTextConfig(**plain["text_encoder_2"])),
        clip_tokenizer(tok_2.get("model_max_length", 77), tok_2.get("pad_token")),
    )


# --- diffusers folders -----------------------------------------------------------------------------------------

def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _folder_configs(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_index.json, unet/config.json) of a diffusers folder; {} for what is missing or unreadable."""
    folder = Path(folder)
    return _json(folder / "model_index.json"), _json(folder / "unet" / "config.json")


def _declared(index: dict[str, Any], part: str) -> bool:
    """Whether model_index.json names a class for `part` (a refiner writes [null, null] for its missing encoder)."""
    entry = index.get(part)
    return isinstance(entry, list) and bool(entry) and entry[-1] is not None


def is_sdxl_folder(folder: str | Path) -> bool:
    """Whether a diffusers folder holds an SDXL-architecture pipeline (base, refiner or inpainting)."""
    index, unet = _folder_configs(folder)
    return (str(index.get("_class_name", "")).startswith("StableDiffusionXL") or "text_encoder_2" in index
            or unet.get("addition_embed_type") == "text_time")


def check_sdxl_folder(folder: str | Path, name: str | None = None) -> None:
    """Raise a plain-words ModelLoadError unless `folder` holds an SDXL base pipeline; the refiner and
    inpainting models are refused, since they cannot be trained as text-to-image models."""
    index, unet = _folder_configs(folder)
    label = name or str(folder)
    if index.get("requires_aesthetics_score") or ("text_encoder_2" in index and not _declared(index, "text_encoder")):
        raise ModelLoadError(f"{label} is the SDXL refiner, which only polishes the last denoising steps of SDXL "
                             "images; it cannot be trained here. Use an SDXL base model (SDXL 1.0 base or a "
                             "fine-tune of it).")
    if unet.get("in_channels", 4) != 4:
        raise ModelLoadError(f"{label} is an SDXL inpainting model (a UNet with {unet['in_channels']} input "
                             "channels); this app trains plain text-to-image SDXL base models.")
    if not (_declared(index, "text_encoder_2") and unet.get("addition_embed_type") == "text_time"):
        raise ModelLoadError(f"{label} is not an SDXL base model: an SDXL folder has model_index.json naming "
                             "text_encoder_2 and a UNet with text_time conditioning in unet/config.json.")


def load_sdxl_folder(folder: str | Path, name: str | None = None, **kwargs) -> BaseModel:
    """Load the parts of a diffusers SDXL base folder (local, or a hub id with `local_files_only`) on the CPU.

    `kwargs` go to every `from_pretrained` (e.g. `local_files_only=True`, `revision`).
    """
    if Path(folder).is_dir():
        check_sdxl_folder(folder, name)
    parts = {part: cls.from_pretrained(str(folder), subfolder=part,
                                       **({"use_safetensors": True} if part in _WEIGHTED else {}), **kwargs)
             for part, cls in FOLDER_PARTS.items()}
    return BaseModel(name or str(folder), parts["tokenizer"], parts["text_encoder"], parts["vae"], parts["unet"],
                     parts["scheduler"], parts["text_encoder_2"], parts["tokenizer_2"])


def save_sdxl_folder(model: BaseModel, folder: str | Path) -> Path:
    """Write an SDXL `model` as a diffusers folder that `StableDiffusionXLPipeline.from_pretrained` reads."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=model.scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
