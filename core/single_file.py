"""Single-file Stable Diffusion checkpoints in the original ("LDM" / CompVis) layout: reading and writing.

A1111 / Forge / ComfyUI load a single `.safetensors` file whose keys look like
`model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight` (UNet),
`first_stage_model.encoder.down.0.block.0.conv1.weight` (VAE) and
`cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight` (SD 1.x CLIP) or
`cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight` (SD 2.x OpenCLIP). SDXL files use the
same UNet and VAE names (Stability's "SGM" code kept them) and hold two text encoders:
`conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L) and `conditioner.embedders.1.model.*`
(OpenCLIP ViT-bigG, with its text projection).

Writing: `diffusers_to_ldm` renames diffusers' parameters into that layout with prefix tables built from
the model configs; `save_single_file` writes them with the diffusers configs as JSON strings in the
safetensors metadata, so `load_single_file(path)` rebuilds a model of any shape exactly.

Reading goes the other way through diffusers' own single-file conversion, offline: `.safetensors`, or a
pickled `.ckpt` / `.pt` / `.pth` / `.bin` only with `allow_pickle=True`. Configs come from the file's
metadata (files we wrote), else from core/assets/model_configs for the family its keys and shapes show.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
from itertools import chain
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .base_model import ASSETS, PIPELINE_PARTS, BaseModel, clip_tokenizer
from .errors import ModelLoadError, first_line
from .fileio import save_safetensors

log = logging.getLogger(__name__)

MODEL_CONFIGS_DIR = ASSETS / "model_configs"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
_CONFIG_FILES = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json",
                 "tokenizer_2": "tokenizer_config.json"}  # others: config.json

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_EMBEDDERS = "conditioner.embedders."

# safetensors metadata keys under which our own files carry their diffusers configs (JSON strings)
CONFIG_KEYS = {
    "unet": "diffusers.unet_config",
    "vae": "diffusers.vae_config",
    "text_encoder": "diffusers.text_encoder_config",
    "scheduler": "diffusers.scheduler_config",
    "tokenizer": "diffusers.tokenizer_config",
    "text_encoder_2": "diffusers.text_encoder_2_config",  # SDXL only
    "tokenizer_2": "diffusers.tokenizer_2_config",
}
# the parts of a config folder: SD's, plus SDXL's second text encoder and tokenizer where present
CONFIG_PARTS = (*PIPELINE_PARTS, "text_encoder_2", "tokenizer_2", "transformer")

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
    """(diffusers prefix, LDM prefix, inner renames) for every block of a UNet2DConditionModel config.

    The block numbering follows from the config alone, so SD 1.x/2.x (four levels) and SDXL (three levels,
    no attention in the first, several transformer blocks per attention) share these tables.
    """
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    if not isinstance(per, int) or cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise NotImplementedError("Only SD / SDXL-style UNets (one layers_per_block, cross-attention mid block) "
                                  "can be written as a single-file checkpoint.")
    pairs = [("conv_in.", "input_blocks.0.0.", {}), ("time_embedding.linear_1.", "time_embed.0.", {}),
             ("time_embedding.linear_2.", "time_embed.2.", {}), ("conv_norm_out.", "out.0.", {}),
             ("conv_out.", "out.2.", {}), ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
             ("mid_block.attentions.0.", "middle_block.1.", {}), ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    if cfg.get("addition_embed_type") == "text_time":  # SDXL's embedding of the pooled text and the size/crop ids
        pairs += [("add_embedding.linear_1.", "label_emb.0.0.", {}), ("add_embedding.linear_2.", "label_emb.0.2.", {})]
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
    return unet_config_ldm_names(unet.config, modules)


def unet_config_ldm_names(config: Mapping[str, Any], modules: list[str]) -> dict[str, str]:
    """`unet_module_ldm_names` for a UNet known by its config only; modules without an LDM name are left out."""
    try:
        pairs = _unet_prefixes(config)
    except NotImplementedError:  # not an SD / SDXL-shaped UNet: it has no LDM names
        return {}
    names = {}
    for m in modules:
        try:
            names[m] = next(iter(_rename({f"{m}.weight": m}, pairs))).removesuffix(".weight")
        except NotImplementedError:
            continue
    return names


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


def clip_to_ldm(text_encoder, prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """SD 1.x layout: the transformers CLIP text model under `cond_stage_model.transformer.text_model.`
    (SDXL's CLIP-L: the same names under `SDXL_CLIP_PREFIX`)."""
    return {prefix + k: v for k, v in _clip_state(text_encoder).items()}


def _open_clip_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's embeddings, layers and final norm under OpenCLIP names (no prefix)."""
    out = {}
    for key, value in state.items():
        if key == "text_projection.weight":  # the caller decides how its layout stores the projection
            continue
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
    return out


def open_clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """SD 2.x layout: OpenCLIP names under `cond_stage_model.model.`.

    diffusers keeps only the layers SD 2 uses (23 of OpenCLIP ViT-H's 24: it conditions on the penultimate
    layer). Tools that build the full 24-layer OpenCLIP expect one more block and a text projection: we
    write an all-zero block (an exact identity in a pre-norm residual block) and an identity projection,
    so the penultimate-layer output, the one SD 2 uses, is the same in every tool.
    """
    out = _open_clip_names(_clip_state(text_encoder))
    n = text_encoder.config.num_hidden_layers
    for key in [k for k in out if k.startswith("transformer.resblocks.0.")]:
        out[key.replace("resblocks.0.", f"resblocks.{n}.", 1)] = torch.zeros_like(out[key])
    hidden = text_encoder.config.hidden_size
    out["text_projection"] = torch.eye(hidden, dtype=out["ln_final.weight"].dtype)
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def open_clip_g_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """SDXL's second encoder (CLIPTextModelWithProjection) under `conditioner.embedders.1.model.`: every layer
    (SDXL's pooled embedding comes from the last one) and the projection, which OpenCLIP multiplies from the
    right (`x @ text_projection`), so it is stored transposed relative to transformers' Linear weight."""
    state = _clip_state(text_encoder)
    out = _open_clip_names(state)
    out["text_projection"] = state["text_projection.weight"].T
    return {SDXL_OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def default_text_encoder_layout(model: BaseModel) -> str:
    """"clip" (SD 1.x, OpenAI CLIP names), "open_clip" (SD 2.x) or "sdxl" (CLIP-L + OpenCLIP-G embedders)."""
    return {"sd2": "open_clip", "sdxl": "sdxl"}.get(model.family, "clip")


def _text_encoders_to_ldm(model: BaseModel, layout: str) -> dict[str, torch.Tensor]:
    if layout == "sdxl":
        return {**clip_to_ldm(model.text_encoder, SDXL_CLIP_PREFIX), **open_clip_g_to_ldm(model.text_encoder_2)}
    return clip_to_ldm(model.text_encoder) if layout == "clip" else open_clip_to_ldm(model.text_encoder)


def diffusers_to_ldm(model: BaseModel, text_encoder_layout: str | None = None) -> dict[str, torch.Tensor]:
    """All weights of `model` under original Stable Diffusion (LDM / SGM) key names (tensors are shared, not copied).

    `text_encoder_layout` ("clip" or "open_clip") defaults to the model family's (SD 1.x: clip, SD 2.x: open_clip);
    an SDXL model has one layout for its two encoders ("sdxl").
    """
    layout = text_encoder_layout or default_text_encoder_layout(model)
    allowed = ("sdxl",) if model.family == "sdxl" else ("clip", "open_clip")
    if layout not in allowed:
        raise ValueError(f"text_encoder_layout must be {' or '.join(map(repr, allowed))}, not {layout!r}")
    for part in model.modules:
        wrapped = next((k for k in part.state_dict() if ".base_layer." in k or _ADAPTER_KEY.search(k)), None)
        if wrapped:
            raise ValueError(f"The model still holds adapter layers ({wrapped}): merge them into the weights "
                             "first (peft's merge_and_unload), then write the single file.")
    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(model.unet).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(model.vae).items()})
    state.update(_text_encoders_to_ldm(model, layout))
    return state


def _plain(config) -> dict[str, Any]:
    """A JSON-safe dict of a diffusers FrozenDict / transformers config (private `_` keys dropped)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps({k: v for k, v in d.items() if not k.startswith("_")}, default=list))


def model_metadata(model: BaseModel) -> dict[str, str]:
    """The diffusers configs of `model` as safetensors metadata, plus ModelSpec fields other tools show."""
    configs = {
        "unet": {"_class_name": "UNet2DConditionModel", **_plain(model.unet.config)},
        "vae": {"_class_name": "AutoencoderKL", **_plain(model.vae.config)},
        "text_encoder": _plain(model.text_encoder.config),
        "scheduler": {"_class_name": type(model.scheduler).__name__, **_plain(model.scheduler.config)},
        "tokenizer": _tokenizer_config(model.tokenizer),
    }
    if model.text_encoder_2 is not None:
        configs["text_encoder_2"] = _plain(model.text_encoder_2.config)
        configs["tokenizer_2"] = _tokenizer_config(model.tokenizer_2)
    meta = {CONFIG_KEYS[part]: json.dumps(cfg, sort_keys=True) for part, cfg in configs.items()}
    v = model.prediction_type == "v_prediction"
    arch = {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}.get(
        model.family, f"stable-diffusion-v2-{'768-v' if v else '512'}")
    meta.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
                 "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                 "modelspec.title": str(model.name)})
    return meta


def _tokenizer_config(tok) -> dict[str, Any]:
    return {"model_max_length": tok.model_max_length, "pad_token": str(tok.pad_token)}


def embedded_configs(metadata: dict[str, str] | None) -> dict[str, dict] | None:
    """The diffusers configs a file written by `save_single_file` carries, or None for a foreign file."""
    metadata = metadata or {}
    if not all(CONFIG_KEYS[p] in metadata for p in ("unet", "vae", "text_encoder")):
        return None
    try:
        return {part: json.loads(metadata[key]) for part, key in CONFIG_KEYS.items() if key in metadata}
    except json.JSONDecodeError:
        return None


def save_single_file(model: BaseModel, path: str | Path, dtype: torch.dtype | None = torch.float16,
                     metadata: dict[str, Any] | None = None, text_encoder_layout: str | None = None) -> Path:
    """Write `model` as one LDM-layout `.safetensors` file, atomically (temp file + rename in the same folder).

    `dtype` None keeps each tensor's dtype; `metadata` values that are not strings are stored as JSON.
    """
    path = Path(path)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in diffusers_to_ldm(model, text_encoder_layout).items()}
    if model.family == "sdxl":
        state.update(sdxl_prediction_markers(model.scheduler.config))
    meta = {"format": "pt", **model_metadata(model)}
    meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    save_safetensors(state, path, meta)
    return path


def sdxl_prediction_markers(scheduler_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Empty `v_pred` / `ztsnr` tensors: how SDXL v-prediction (and zero-terminal-SNR) files tell ComfyUI their
    prediction type, since an SDXL file's weights cannot show it."""
    marks = {}
    if scheduler_config.get("prediction_type") == "v_prediction":
        marks["v_pred"] = torch.zeros(0)
        if scheduler_config.get("rescale_betas_zero_snr"):
            marks["ztsnr"] = torch.zeros(0)
    return marks


# --- reading ---------------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(r"lora_|\.alpha$|hada_w|lokr_w|\.oft_")
_EMBEDDING_KEYS = {"emb_params", "clip_l", "clip_g"}  # textual-inversion files (A1111 / SDXL style)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def has_sdxl_keys(keys) -> bool:
    """Whether checkpoint keys are in the SGM layout of SDXL (text encoders as conditioner embedders, or the
    UNet's `label_emb` for the pooled text and size/crop ids)."""
    return any(k.startswith((SDXL_EMBEDDERS, UNET_PREFIX + "label_emb.")) for k in keys)


def check_sd_checkpoint(keys, name: str = "The file", allow_sdxl: bool = False) -> None:
    """Raise a plain-words ModelLoadError unless `keys` hold an SD UNet, VAE and text encoder in LDM layout
    (or, with `allow_sdxl`, SDXL's in SGM layout)."""
    keys = list(keys)
    has = lambda *prefixes: any(k.startswith(prefixes) for k in keys)  # noqa: E731
    if any(_LORA_KEY.search(k) for k in keys):
        raise ModelLoadError(f"{name} is a LoRA / LyCORIS adapter, not a base model. Load it as an adapter; "
                             "model.base needs a full SD 1.x/2.x checkpoint, a diffusers folder or a hub id.")
    if not allow_sdxl and has_sdxl_keys(keys):
        raise ModelLoadError(f"{name} is an SDXL checkpoint; this app trains Stable Diffusion 1.x and 2.x only.")
    if keys and set(keys) <= _EMBEDDING_KEYS:
        raise ModelLoadError(f"{name} is a textual-inversion embedding, not a base model.")
    parts = {"UNet": (UNET_PREFIX,), "VAE": (VAE_PREFIX,), "text encoder": ("cond_stage_model.", SDXL_EMBEDDERS)}
    missing = [part for part, prefixes in parts.items() if not has(*prefixes)]
    if len(missing) == len(parts):
        if has("down_blocks.", "encoder.down_blocks.", "text_model.", "encoder.layers.", "unet.", "vae."):
            what = "a model part in diffusers format (not a full original-layout checkpoint); point model.base " \
                   "at the whole diffusers folder instead"
        elif has("encoder.down.", "decoder.up."):
            what = "a VAE on its own, not a full model"
        else:
            what = "not a Stable Diffusion 1.x/2.x checkpoint (it has no 'model.diffusion_model.*' weights)"
        raise ModelLoadError(f"{name} is {what}.")
    if missing:
        raise ModelLoadError(f"{name} has no {' or '.join(missing)} weights: it is an incomplete checkpoint. "
                             "model.base needs a full SD 1.x/2.x checkpoint (UNet, VAE and text encoder in one file).")


def _context_width(shapes: Mapping[str, Any]) -> int | None:
    """The UNet's cross-attention (text embedding) width, from its first attn2.to_k; None without attention."""
    to_k = sorted(k for k in shapes if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    return _shape(shapes[to_k[0]])[-1] if to_k else None


def _check_sdxl_base(shapes: Mapping[str, Any], name: str) -> str:
    """"sdxl" for an SDXL base-shaped checkpoint; the refiner and incomplete files refused in plain words."""
    has = lambda prefix: any(k.startswith(prefix) for k in shapes)  # noqa: E731
    if has(SDXL_EMBEDDERS + "0.model.") and not has(SDXL_CLIP_PREFIX):
        # the refiner conditions on OpenCLIP-G alone (its embedder 0), with no CLIP-L: robust across fine-tunes
        raise ModelLoadError(f"{name} is the SDXL refiner, which only polishes the last denoising steps of SDXL "
                             "images; it cannot be trained here. Use an SDXL base checkpoint (SDXL 1.0 base or a "
                             "fine-tune of it such as Pony, Illustrious or Juggernaut).")
    if not (has(SDXL_CLIP_PREFIX) and has(SDXL_OPEN_CLIP_PREFIX)):
        raise ModelLoadError(f"{name} is an SDXL checkpoint without both SDXL text encoders (CLIP-L as "
                             "conditioner.embedders.0, OpenCLIP-G as conditioner.embedders.1): it is incomplete "
                             "or a variant this app does not know.")
    context = _context_width(shapes)
    widths = [shapes.get(SDXL_CLIP_PREFIX + "embeddings.token_embedding.weight"),
              shapes.get(SDXL_OPEN_CLIP_PREFIX + "token_embedding.weight")]
    if context is None:
        raise ModelLoadError(f"{name} is an SDXL checkpoint without UNet cross-attention weights: it is incomplete.")
    if None not in widths and context != sum(_shape(w)[-1] for w in widths):
        raise ModelLoadError(f"{name} has SDXL's text encoders but a UNet cross-attention width of {context}, not "
                             "the sum of their widths: it is a variant this app does not know.")
    return "sdxl"


def detect_family(shapes: Mapping[str, Any], name: str = "The file") -> str:
    """"sd1", "sd2" or "sdxl" for a full original-layout checkpoint, from its keys and shapes (tensors or shape
    tuples); SDXL refiner and inpainting files and anything else unknown are refused in plain words."""
    check_sd_checkpoint(shapes, name, allow_sdxl=True)
    sdxl = has_sdxl_keys(shapes)
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and _shape(conv_in)[1] != 4:
        if sdxl:
            raise ModelLoadError(f"{name} is an SDXL inpainting model (a UNet with {_shape(conv_in)[1]} input "
                                 "channels); this app trains plain text-to-image SDXL base models.")
        raise ModelLoadError(f"{name} has a UNet with {_shape(conv_in)[1]} input channels (an inpainting or "
                             "image-editing model); this app trains plain text-to-image SD 1.x/2.x models.")
    if sdxl:
        return _check_sdxl_base(shapes, name)
    context = _context_width(shapes)
    open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in shapes)
    if context == 768 and not open_clip:
        return "sd1"
    if context == 1024 and open_clip:
        return "sd2"
    if context == 2048:
        raise ModelLoadError(f"{name} is an SDXL checkpoint; this app trains Stable Diffusion 1.x and 2.x only.")
    raise ModelLoadError(f"{name} does not have the shapes of Stable Diffusion 1.x or 2.x (cross-attention width "
                         f"{context}, {'OpenCLIP' if open_clip else 'CLIP'} text encoder), and it carries no configs "
                         "saying what it is.")


def read_safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, {key: shape}) of a .safetensors file, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        raise ModelLoadError(
            f"{path.name} is not a valid .safetensors file ({first_line(e)}). It may be truncated (an interrupted "
            "download) or another kind of file renamed: download or export it again.") from e


def _read_pickle(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and top-level scalars (e.g. global_step) of a pickled checkpoint, loaded with weights_only."""
    import pickle

    if not allow_pickle:
        raise ModelLoadError(
            f"{path.name} is a pickled checkpoint ({path.suffix}); pickle files can run code on your computer when "
            "they are opened, so they are not loaded by default. Prefer a .safetensors version of the model (or "
            "convert this one with a tool you trust). If you trust where the file came from, allow it: start the app "
            "with --allow-pickle, add --allow-pickle to the command, or set model.allow_pickle: true in the config "
            "(it is then read with torch.load(weights_only=True)).")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not found:
            raise ModelLoadError(f"{path.name} cannot be read as a PyTorch checkpoint: it is damaged (e.g. an "
                                 "interrupted download) or not a checkpoint at all. Download it again.") from e
        raise ModelLoadError(f"{path.name} holds Python objects other than tensors ({found.group(1)}), which a safe "
                             "load refuses. Use a .safetensors version of this model.") from e
    except Exception as e:  # noqa: BLE001 - zip / EOF / storage errors all mean a damaged or foreign file
        raise ModelLoadError(f"{path.name} cannot be read as a PyTorch checkpoint ({first_line(e)}). It may be "
                             "truncated or not a checkpoint at all: download it again.") from e
    extra: dict[str, Any] = {}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        extra.update({k: v for k, v in obj.items() if isinstance(v, (int, float, str))})
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path.name} does not hold a dictionary of weights ({type(obj).__name__}).")
    extra.update({k: v for k, v in obj.items() if isinstance(v, (int, float, str))})
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, extra


def read_config_folder(folder: str | Path) -> dict[str, dict]:
    """The part configs of a diffusers-style config folder (core/assets/model_configs/<family>)."""
    folder = Path(folder)
    return {part: json.loads((folder / part / _CONFIG_FILES.get(part, "config.json")).read_text(encoding="utf-8"))
            for part in CONFIG_PARTS if (folder / part / _CONFIG_FILES.get(part, "config.json")).is_file()}


def shipped_config_folder(family: str, prediction_type: str) -> Path:
    """core/assets/model_configs/sd15, sd2 (768-v, v_prediction), sd2-base (512, epsilon), sdxl (base 1.0,
    epsilon), sdxl-v (v_prediction with zero terminal SNR, as v-prediction SDXL fine-tunes are trained) or
    flux-dev (FLUX.1-dev's shapes; the planner's FLUX.1 before a model is downloaded)."""
    if family == "sd1":
        return MODEL_CONFIGS_DIR / "sd15"
    if family == "sdxl":
        return MODEL_CONFIGS_DIR / ("sdxl-v" if prediction_type == "v_prediction" else "sdxl")
    if family == "flux":
        return MODEL_CONFIGS_DIR / "flux-dev"
    return MODEL_CONFIGS_DIR / ("sd2" if prediction_type == "v_prediction" else "sd2-base")


def _guess_prediction_type(family: str, extra: Mapping[str, Any], name: str, keys=()) -> str:
    """diffusers' rule: SD 2.x is v_prediction (768-v) unless global_step says 2.x-base (875000); SDXL is
    epsilon unless the file carries ComfyUI's `v_pred` marker."""
    if family == "sdxl":
        return "v_prediction" if "v_pred" in keys else "epsilon"
    if family == "sd1":
        return "epsilon"
    if extra.get("global_step") == 875000:
        return "epsilon"
    log.warning("%s is an SD 2.x checkpoint without a prediction type: assuming v_prediction (the 768 models). "
                "For a 512 'base' model set model.prediction_type: epsilon.", name)
    return "v_prediction"


def load_single_file(path: str | Path, prediction_type: str = "auto", allow_pickle: bool = False,
                     name: str | None = None, config_dir: str | Path | None = None) -> BaseModel:
    """Load an original-layout SD 1.x/2.x checkpoint file, offline, through diffusers' single-file conversion.

    Configs come from `config_dir` when given (a diffusers-style folder of part configs), else the file's
    metadata (files we wrote), else the shipped folder for the family detected from the keys and shapes.
    An SDXL file is refused here; `load_sdxl_single_file` reads it.
    """
    return _load_checkpoint_file(path, prediction_type, allow_pickle, name, config_dir, sdxl=False)


def load_sdxl_single_file(path: str | Path, prediction_type: str = "auto", allow_pickle: bool = False,
                          name: str | None = None, config_dir: str | Path | None = None) -> BaseModel:
    """Load an SDXL base checkpoint in the SGM layout (as Civitai ships them), offline; as `load_single_file`.

    A foreign file gets the shipped SDXL configs: epsilon, or v_prediction with zero terminal SNR when the file
    carries the `v_pred` marker or `prediction_type` says so.
    """
    return _load_checkpoint_file(path, prediction_type, allow_pickle, name, config_dir, sdxl=True)


def _read_checkpoint(path: Path, allow_pickle: bool):
    """(metadata, {key: shape or tensor}, tensors or None until needed, top-level scalars) of a checkpoint file."""
    if path.suffix.lower() == ".safetensors":
        metadata, shapes = read_safetensors_header(path)
        return metadata, shapes, None, {}
    if path.suffix.lower() in PICKLE_SUFFIXES:
        state, extra = _read_pickle(path, allow_pickle)
        return {}, state, state, extra
    raise ModelLoadError(f"{path.name}: unsupported file type {path.suffix!r}. Use a .safetensors checkpoint, a "
                         "diffusers folder or a hub id.")


def _expected_family(shapes: Mapping[str, Any], label: str, sdxl: bool) -> str:
    """The family of a foreign file, refused when it is not the one the caller loads."""
    if not sdxl:
        check_sd_checkpoint(shapes, label)  # names an SDXL file as such before any shape detail
        return detect_family(shapes, label)
    family = detect_family(shapes, label)
    if family != "sdxl":
        raise ModelLoadError(f"{label} is a Stable Diffusion {'1.x' if family == 'sd1' else '2.x'} checkpoint, "
                             "not SDXL.")
    return family


def _load_checkpoint_file(path, prediction_type: str, allow_pickle: bool, name: str | None, config_dir,
                          sdxl: bool) -> BaseModel:
    path = Path(path).expanduser()
    label = path.name
    metadata, shapes, state, extra = _read_checkpoint(path, allow_pickle)
    configs = embedded_configs(metadata) if config_dir is None else read_config_folder(config_dir)
    if config_dir is not None and not {"unet", "vae", "text_encoder"} <= set(configs):
        raise ModelLoadError(f"{config_dir} lacks unet/, vae/ or text_encoder/ config.json files.")
    if configs is None:  # a foreign file: the family's shipped configs
        family = _expected_family(shapes, label, sdxl)
        pred = prediction_type if prediction_type != "auto" else _guess_prediction_type(family, extra, label, shapes)
        configs = read_config_folder(shipped_config_folder(family, pred))
        configs["scheduler"] = {**configs.get("scheduler", {}), "prediction_type": pred}
    else:
        check_sd_checkpoint(shapes, label, allow_sdxl=sdxl)
        if sdxl and "text_encoder_2" not in configs:
            raise ModelLoadError(f"{label} is a Stable Diffusion 1.x/2.x model (its configs name one text encoder), "
                                 "not SDXL.")
    if state is None:
        from safetensors.torch import load_file

        state = load_file(str(path))
    parts = _convert_parts(state, configs, label)
    scheduler_config = configs.get("scheduler") or read_config_folder(MODEL_CONFIGS_DIR / "sd15")["scheduler"]
    scheduler = DDPMScheduler.from_config(scheduler_config)
    tokenizer = _tokenizer_from_config(configs.get("tokenizer", {}))
    tokenizer_2 = _tokenizer_from_config(configs.get("tokenizer_2", {"pad_token": "!"})) if sdxl else None
    return BaseModel(name or str(path), tokenizer, parts["text_encoder"], parts["vae"], parts["unet"], scheduler,
                     parts.get("text_encoder_2"), tokenizer_2)


def _tokenizer_from_config(tok: Mapping[str, Any]):
    return clip_tokenizer(tok.get("model_max_length", 77), tok.get("pad_token"))


def _part_loaders(state: dict[str, torch.Tensor], configs: dict[str, dict], common: dict) -> dict[str, tuple]:
    """part -> (what to call it in messages, loader) for the parts `configs` describe."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    loaders = {
        "unet": ("UNet", lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)),
        "vae": ("VAE", lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **common)),
        "text_encoder": ("text encoder", lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state, subfolder="text_encoder", **common)),
    }
    if "text_encoder_2" in configs:  # diffusers tells the two SDXL encoders apart by their widths
        loaders["text_encoder_2"] = ("second text encoder", lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModelWithProjection, state, subfolder="text_encoder_2", **common))
    return loaders


def _convert_parts(state: dict[str, torch.Tensor], configs: dict[str, dict], label: str) -> dict[str, Any]:
    """UNet, VAE and text encoder(s) from an LDM state dict via diffusers' single-file loaders, with local configs."""
    # diffusers keeps the layers SD uses: drop OpenCLIP blocks past the configured depth (SD 2: the 24th of 24)
    layers = configs["text_encoder"].get("num_hidden_layers", 0)
    block = re.compile(re.escape(OPEN_CLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
    state = {k: v for k, v in state.items() if not ((m := block.match(k)) and int(m.group(1)) >= layers)}
    # some old SD 1.x files lack the `text_model.` level of current CLIP names (A1111 renames them the same way)
    old_clip = "cond_stage_model.transformer."
    if not any(k.startswith(CLIP_PREFIX) for k in state) and any(k.startswith(old_clip) for k in state):
        state = {CLIP_PREFIX + k[len(old_clip):] if k.startswith(old_clip) else k: v for k, v in state.items()}
    kind = "SDXL" if "text_encoder_2" in configs else "Stable Diffusion 1.x/2.x"
    with tempfile.TemporaryDirectory(prefix="sd-configs-") as tmp:
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if part in configs:
                (Path(tmp) / part).mkdir()
                (Path(tmp) / part / "config.json").write_text(json.dumps(configs[part]), encoding="utf-8")
        common = dict(config=tmp, local_files_only=True, torch_dtype=torch.float32)
        models = {}
        for key, (part, load) in _part_loaders(state, configs, common).items():
            try:
                model = load()
            except Exception as e:  # noqa: BLE001 - shape mismatches, missing weights (meta tensors), bad configs
                if "meta tensor" in str(e):  # diffusers left missing weights on the meta device, then moved it
                    raise ModelLoadError(f"{label} lacks some {part} weights: the file is incomplete (or a variant "
                                         "this app does not know).") from e
                raise ModelLoadError(f"The {part} weights in {label} do not fit the expected {kind} model "
                                     f"({first_line(e)}). The file may be incomplete or a variant this app does "
                                     "not know.") from e
            missing = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
            if missing:
                raise ModelLoadError(f"{label} lacks {len(missing)} {part} weights (e.g. {missing[0]}): the file "
                                     "is incomplete.")
            model.__dict__.pop("hf_device_map", None)  # set by diffusers' single-device dispatch; means nothing here
            models[key] = model
    return models
