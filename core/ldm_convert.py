"""Write a base model as one original-layout ("LDM" / CompVis) Stable Diffusion checkpoint.

A1111 / Forge / ComfyUI load a single `.safetensors` file whose keys look like
`model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight` (UNet),
`first_stage_model.encoder.down.0.block.0.conv1.weight` (VAE) and
`cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight` (SD 1.x CLIP) or
`cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight` (SD 2.x OpenCLIP).

`diffusers_to_ldm` renames diffusers' parameters into that layout with prefix tables built from the
model configs; `save_single_file` writes them with the diffusers configs as JSON strings in the
safetensors metadata, so `core.models.load_base_model(path)` rebuilds a model of any shape exactly.
Reading goes the other way through diffusers' own single-file conversion (see core/models.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # core.models imports this module; avoid the cycle at run time
    from .models import BaseModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

# safetensors metadata keys under which our own files carry their diffusers configs (JSON strings)
CONFIG_KEYS = {
    "unet": "diffusers.unet_config",
    "vae": "diffusers.vae_config",
    "text_encoder": "diffusers.text_encoder_config",
    "scheduler": "diffusers.scheduler_config",
    "tokenizer": "diffusers.tokenizer_config",
}

# inner names of a UNet resnet / VAE resnet / VAE attention: diffusers -> LDM
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# OpenCLIP names of a CLIP encoder layer's parts (q/k/v are fused into in_proj)
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_ADAPTER_KEY = re.compile(r"\.(lora|hada|lokr|oft)_")  # peft layers still wrapped around a base weight


def _unet_prefixes(cfg) -> list[tuple[str, str, dict[str, str]]]:
    """(diffusers prefix, LDM prefix, inner renames) for every block of a UNet2DConditionModel config."""
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    if not isinstance(per, int) or cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise NotImplementedError("Only SD 1.x/2.x-style UNets (one layers_per_block, cross-attention mid block) "
                                  "can be written as a single-file checkpoint.")
    pairs = [("conv_in.", "input_blocks.0.0.", {}), ("time_embedding.linear_1.", "time_embed.0.", {}),
             ("time_embedding.linear_2.", "time_embed.2.", {}), ("conv_norm_out.", "out.0.", {}),
             ("conv_out.", "out.2.", {}), ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
             ("mid_block.attentions.0.", "middle_block.1.", {}), ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    for i in range(n):
        for j in range(per):  # input block 0 is conv_in; each down block has `per` layers + a downsampler
            k = 1 + i * (per + 1) + j
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", _UNET_RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", {})]
        for j in range(per + 1):  # each up block has `per + 1` layers, the upsampler sits in its last one
            k = i * (per + 1) + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", _UNET_RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", {})]
        if i < n - 1:
            last = i * (per + 1) + per
            slot = 2 if "CrossAttn" in cfg["up_block_types"][i] else 1
            pairs += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{1 + last}.0.op.", {}),
                      (f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{last}.{slot}.conv.", {})]
    return pairs


def _vae_prefixes(cfg) -> list[tuple[str, str, dict[str, str]]]:
    """(diffusers prefix, LDM prefix, inner renames) for an AutoencoderKL config; LDM numbers decoder blocks bottom-up."""
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out.", {}), ("decoder.conv_norm_out.", "decoder.norm_out.", {})]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTN)]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
                  for j in range(per)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", _VAE_RESNET)
                  for j in range(per + 1)]  # the decoder has one resnet more per block
        pairs += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", {}),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.", {})]
    return pairs


def _rename(state: dict[str, torch.Tensor], pairs, passthrough: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Rename every key by its matching prefix pair; keys starting with `passthrough` keep their names."""
    out = {}
    for key, value in state.items():
        for old, new, inner in pairs:
            if key.startswith(old):
                rest = key[len(old):]
                for a, b in inner.items():
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
                out[new + rest] = value
                break
        else:
            if not key.startswith(passthrough):
                raise NotImplementedError(f"No single-file (LDM) name for the diffusers parameter {key!r}.")
            out[key] = value
    return out


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights under LDM names (without the `model.diffusion_model.` prefix)."""
    return _rename(unet.state_dict(), _unet_prefixes(unet.config))


def unet_module_ldm_names(unet, modules: list[str]) -> dict[str, str]:
    """diffusers UNet module name -> its LDM name, e.g. 'down_blocks.0.attentions.0.proj_in' ->
    'input_blocks.1.1.proj_in' (how older A1111-era LoRA files name their layers)."""
    try:
        renamed = _rename({f"{m}.weight": m for m in modules}, _unet_prefixes(unet.config))
    except NotImplementedError:  # not an SD 1.x/2.x-shaped UNet: it has no LDM names
        return {}
    return {m: key.removesuffix(".weight") for key, m in renamed.items()}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights under LDM names (without the `first_stage_model.` prefix)."""
    out = _rename(vae.state_dict(), _vae_prefixes(vae.config),
                  passthrough=("encoder.conv_", "decoder.conv_", "quant_conv.", "post_quant_conv."))
    # LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers
    return {k: v[:, :, None, None] if ".attn_1." in k and k.endswith(("q.weight", "k.weight", "v.weight",
                                                                        "proj_out.weight")) and v.ndim == 2 else v
            for k, v in out.items()}


def _clip_state(text_encoder) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); accept both
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()
            if not k.endswith("position_ids")}


def clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """SD 1.x layout: the transformers CLIP text model under `cond_stage_model.transformer.text_model.`."""
    return {CLIP_PREFIX + k: v for k, v in _clip_state(text_encoder).items()}


def open_clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """SD 2.x layout: OpenCLIP names under `cond_stage_model.model.`.

    diffusers keeps only the layers SD 2 uses (23 of OpenCLIP ViT-H's 24: it conditions on the penultimate
    layer). Tools that build the full 24-layer OpenCLIP expect one more block and a text projection: we
    write an all-zero block (an exact identity in a pre-norm residual block) and an identity projection,
    so the penultimate-layer output, the one SD 2 uses, is the same in every tool.
    """
    state, out = _clip_state(text_encoder), {}
    n = text_encoder.config.num_hidden_layers
    for key, value in state.items():
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value
            continue
        layer, rest = key.removeprefix("encoder.layers.").split(".", 1)
        name, kind = rest.rsplit(".", 1)
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if name == "self_attn.q_proj":  # fuse q, k, v in that order
                parts = [state[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)
            continue
        out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[name]}.{kind}"] = value
    for key in [k for k in out if k.startswith("transformer.resblocks.0.")]:
        out[key.replace("resblocks.0.", f"resblocks.{n}.", 1)] = torch.zeros_like(out[key])
    hidden = text_encoder.config.hidden_size
    out["text_projection"] = torch.eye(hidden, dtype=out["ln_final.weight"].dtype)
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def default_text_encoder_layout(model: "BaseModel") -> str:
    """"clip" (SD 1.x, OpenAI CLIP names) or "open_clip" (SD 2.x)."""
    return "open_clip" if model.family == "sd2" else "clip"


def diffusers_to_ldm(model: "BaseModel", text_encoder_layout: str | None = None) -> dict[str, torch.Tensor]:
    """All weights of `model` under original Stable Diffusion (LDM) key names (tensors are shared, not copied).

    `text_encoder_layout` ("clip" or "open_clip") defaults to the model family's (SD 1.x: clip, SD 2.x: open_clip).
    """
    layout = text_encoder_layout or default_text_encoder_layout(model)
    if layout not in ("clip", "open_clip"):
        raise ValueError(f"text_encoder_layout must be 'clip' or 'open_clip', not {layout!r}")
    for part in (model.unet, model.vae, model.text_encoder):
        wrapped = next((k for k in part.state_dict() if ".base_layer." in k or _ADAPTER_KEY.search(k)), None)
        if wrapped:
            raise ValueError(f"The model still holds adapter layers ({wrapped}): merge them into the weights "
                             "first (peft's merge_and_unload), then write the single file.")
    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(model.unet).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(model.vae).items()})
    state.update(clip_to_ldm(model.text_encoder) if layout == "clip" else open_clip_to_ldm(model.text_encoder))
    return state


def _plain(config) -> dict[str, Any]:
    """A JSON-safe dict of a diffusers FrozenDict / transformers config (private `_` keys dropped)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps({k: v for k, v in d.items() if not k.startswith("_")}, default=list))


def model_metadata(model: "BaseModel") -> dict[str, str]:
    """The diffusers configs of `model` as safetensors metadata, plus ModelSpec fields other tools show."""
    tok = model.tokenizer
    configs = {
        "unet": {"_class_name": "UNet2DConditionModel", **_plain(model.unet.config)},
        "vae": {"_class_name": "AutoencoderKL", **_plain(model.vae.config)},
        "text_encoder": _plain(model.text_encoder.config),
        "scheduler": {"_class_name": type(model.scheduler).__name__, **_plain(model.scheduler.config)},
        "tokenizer": {"model_max_length": tok.model_max_length, "pad_token": str(tok.pad_token)},
    }
    meta = {CONFIG_KEYS[part]: json.dumps(cfg, sort_keys=True) for part, cfg in configs.items()}
    v = model.prediction_type == "v_prediction"
    arch = "stable-diffusion-v1" if model.family == "sd1" else f"stable-diffusion-v2-{'768-v' if v else '512'}"
    meta.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
                 "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                 "modelspec.title": str(model.name)})
    return meta


def embedded_configs(metadata: dict[str, str] | None) -> dict[str, dict] | None:
    """The diffusers configs a file written by `save_single_file` carries, or None for a foreign file."""
    metadata = metadata or {}
    if not all(CONFIG_KEYS[p] in metadata for p in ("unet", "vae", "text_encoder")):
        return None
    try:
        return {part: json.loads(metadata[key]) for part, key in CONFIG_KEYS.items() if key in metadata}
    except json.JSONDecodeError:
        return None


def save_single_file(model: "BaseModel", path: str | Path, dtype: torch.dtype | None = torch.float16,
                     metadata: dict[str, Any] | None = None, text_encoder_layout: str | None = None) -> Path:
    """Write `model` as one LDM-layout `.safetensors` file, atomically (temp file + rename in the same folder).

    `dtype` None keeps each tensor's dtype; `metadata` values that are not strings are stored as JSON.
    """
    from .fileio import save_safetensors

    path = Path(path)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in diffusers_to_ldm(model, text_encoder_layout).items()}
    meta = {"format": "pt", **model_metadata(model)}
    meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    save_safetensors(state, path, meta)
    return path
