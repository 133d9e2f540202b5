"""FLUX.1 as users have it on disk: the transformer as one file in Black Forest Labs' layout (`flux1-dev.safetensors`,
bf16 or fp8, or ComfyUI's all-in-one files that also hold the text encoders and the VAE), with CLIP-L, T5-XXL and
the VAE as separate files (`clip_l.safetensors`, `t5xxl_fp16.safetensors`, `ae.safetensors`) or folders.

- The BFL layout fuses q, k and v (and, in the single blocks, the MLP input) into one layer; `transformer_to_bfl` /
  `transformer_from_bfl` translate it exactly (the splits come from the file's own widths). dev is told from
  schnell by its guidance embedding (`guidance_in`); the number of blocks is read from the file.
- A file without configs gets FLUX.1-dev's shipped configs (core/assets/model_configs/flux-dev), the shipped T5 and
  CLIP tokenizers (nothing is downloaded); files this app writes carry their configs (and a small T5's tokenizer)
  in their metadata.
- Companions not named in the settings are looked for in the file itself (all-in-one files), beside it, and in the
  folders ComfyUI and Forge keep them in (`models/clip`, `models/text_encoders`, `models/vae` ...); what is still
  missing is named with the setting that supplies it.
"""
from __future__ import annotations

import gzip
import json
import re
from glob import escape as glob_escape
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ..base_model import ASSETS, BaseModel, clip_tokenizer
from ..errors import ModelLoadError, first_line
from .flux_parts import DOUBLE_BLOCK, FUSED, SINGLE_BLOCK, bfl_name
from .sd import plain_config

FLUX_CONFIGS = ASSETS / "model_configs" / "flux-dev"
T5_TOKENIZER = ASSETS / "t5_tokenizer" / "tokenizer.json.gz"

# where ComfyUI's all-in-one FLUX files keep each part
BFL_PREFIX = "model.diffusion_model."
EMBEDDED = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.t5xxl.transformer.",
            "vae": "vae."}
# metadata of the part files this app writes: the diffusers config (JSON), and a T5 tokenizer that is not T5-XXL's
META_CONFIG = "diffusers.config"
META_T5_TOKENIZER = "t5.tokenizer_json"
T5_XXL_VOCAB = 32128  # T5-XXL's embedding rows (the shipped tokenizer's 32,100 pieces, padded)
SCHNELL_SCHEDULER = {"shift": 1.0, "use_dynamic_shifting": False}
SCHNELL_T5_LENGTH = 256  # schnell was trained with 256 T5 tokens, dev with 512

# what each companion is called in messages, the setting that names it, and the file names looked for
COMPANIONS = {  # ("{stem}": the transformer file's own name, as a merge writes its changed CLIP-L beside it)
    "text_encoder": ("CLIP-L text encoder", "model.text_encoder", ("{stem}.clip_l.safetensors", "clip_l*.safetensors")),
    "text_encoder_2": ("T5-XXL text encoder", "model.text_encoder_2",
                       ("t5xxl_fp16*.safetensors", "t5xxl*.safetensors", "t5*.safetensors")),
    "vae": ("VAE", "model.vae", ("ae.safetensors", "*flux*vae*.safetensors", "*flux*ae*.safetensors")),
}
SEARCH_DIRS = {"text_encoder": ("", "../clip", "../text_encoders", "../text_encoder"),
               "text_encoder_2": ("", "../clip", "../text_encoders", "../text_encoder"),
               "vae": ("", "../vae", "../VAE")}

# Whole tensors outside the blocks: diffusers module -> BFL module
GLOBAL = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # its (scale, shift) halves are (shift, scale) in BFL
}
SWAPPED = "norm_out.linear"
# q/k RMS norms: diffusers `<module>.weight` -> BFL `<module>.scale`
NORMS = {
    ("transformer_blocks", "attn.norm_q"): "img_attn.norm.query_norm",
    ("transformer_blocks", "attn.norm_k"): "img_attn.norm.key_norm",
    ("transformer_blocks", "attn.norm_added_q"): "txt_attn.norm.query_norm",
    ("transformer_blocks", "attn.norm_added_k"): "txt_attn.norm.key_norm",
    ("single_transformer_blocks", "attn.norm_q"): "norm.query_norm",
    ("single_transformer_blocks", "attn.norm_k"): "norm.key_norm",
}
BLOCKS = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}


# --- tokenizers ------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _shipped_t5_json() -> str:
    return gzip.decompress(T5_TOKENIZER.read_bytes()).decode("utf-8")


def t5_tokenizer(tokenizer_json: str | None = None, model_max_length: int = 512):
    """T5-XXL's tokenizer (32,100 pieces), shipped with the app (core/assets/t5_tokenizer), or the one a file
    carries (`tokenizer_json`: a tokenizers JSON string)."""
    from tokenizers import Tokenizer
    from transformers import T5TokenizerFast

    return T5TokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json or _shipped_t5_json()),
                           eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=model_max_length)


# --- the transformer in BFL layout ----------------------------------------------------------------------------------

def _bfl_layer(name: str) -> str:
    """flux.py's kohya-style layer name (`img_attn_qkv`, `linear1`) -> the state-dict module (`img_attn.qkv`)."""
    head, _, tail = name.rpartition("_")
    return f"{head}.{tail}" if head else name


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """The final norm's (scale, shift) <-> (shift, scale): diffusers and BFL order its output halves oppositely."""
    return torch.cat(t.chunk(2, dim=0)[::-1], dim=0)


def transformer_to_bfl(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict under BFL names, q/k/v (and the single blocks' MLP input)
    fused in BFL's order. Every key is translated or it is an error: nothing is dropped silently."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, tuple[str, dict[int, torch.Tensor]]] = {}  # BFL weight -> (its layer, members by place)
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in GLOBAL:
            out[f"{GLOBAL[module]}.{param}"] = _swap_halves(value) if module == SWAPPED else value
            continue
        blocks, _, rest = module.partition(".")
        index, _, inner = rest.partition(".")
        found = bfl_name(module)
        if (blocks, inner) in NORMS and param == "weight":
            out[f"{BLOCKS[blocks]}.{index}.{NORMS[blocks, inner]}.scale"] = value
        elif found is not None:
            (theirs, layer), member = found[0].rsplit(".", 1), found[1]
            name = f"{theirs}.{_bfl_layer(layer)}.{param}"
            if layer in FUSED:
                fused.setdefault(name, (layer, {}))[1][member] = value
            else:
                out[name] = value
        else:
            raise ValueError(f"No BFL name for the FLUX transformer weight {key}.")
    for name, (layer, members) in fused.items():
        if sorted(members) != list(range(len(FUSED[layer]))):
            raise ValueError(f"{name}: only members {sorted(members)} of the fused layer are present.")
        out[name] = torch.cat([members[i] for i in range(len(FUSED[layer]))], dim=0)
    return out


def transformer_from_bfl(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `transformer_to_bfl` (ComfyUI's `model.diffusion_model.` prefix allowed): fused layers split
    by their members' widths (units of the model width `img_in` gives; the single blocks' MLP is 4 of them)."""
    state = {k[len(BFL_PREFIX):] if k.startswith(BFL_PREFIX) else k: v for k, v in state.items()}
    width = state["img_in.weight"].shape[0]
    back = {bfl: module for module, bfl in GLOBAL.items()}
    ours = {theirs: blocks for blocks, theirs in BLOCKS.items()}
    norms = {(BLOCKS[blocks], bfl): inner for (blocks, inner), bfl in NORMS.items()}
    # (BFL blocks, BFL layer) -> (the layer's flux.py name, [(place among the fused members, diffusers module)])
    members: dict[tuple[str, str], tuple[str, list[tuple[int, str]]]] = {}
    for blocks, table in (("transformer_blocks", DOUBLE_BLOCK), ("single_transformer_blocks", SINGLE_BLOCK)):
        for inner, (layer, member) in table.items():
            members.setdefault((BLOCKS[blocks], _bfl_layer(layer)), (layer, []))[1].append((member, inner))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in back:
            out[f"{back[module]}.{param}"] = _swap_halves(value) if back[module] == SWAPPED else value
            continue
        blocks, _, rest = module.partition(".")
        index, _, inner = rest.partition(".")
        if blocks not in ours or not index.isdigit():
            raise ModelLoadError(f"Unknown FLUX transformer weight {key}: the file is not a FLUX.1 transformer.")
        prefix = f"{ours[blocks]}.{index}."
        if (blocks, inner) in norms and param == "scale":
            out[f"{prefix}{norms[blocks, inner]}.weight"] = value
        elif (blocks, inner) in members:
            layer, parts = members[blocks, inner]
            if layer not in FUSED:
                out[f"{prefix}{parts[0][1]}.{param}"] = value
                continue
            widths = [u * width for u in FUSED[layer]]
            if value.shape[0] != sum(widths):
                raise ModelLoadError(f"{key} has {value.shape[0]} rows where FLUX.1 has {sum(widths)}: the file is "
                                     "not a FLUX.1 transformer (or a variant this app does not know).")
            for (_, inner_module), piece in zip(sorted(parts), value.split(widths, dim=0)):
                out[f"{prefix}{inner_module}.{param}"] = piece.contiguous()  # its own storage, not a view
        else:
            raise ModelLoadError(f"Unknown FLUX transformer weight {key}: the file is not a FLUX.1 transformer.")
    return out


def is_flux_transformer(keys) -> bool:
    """Whether checkpoint keys hold a FLUX.1 transformer in BFL layout (bare, or ComfyUI's prefixed)."""
    keys = set(keys)
    return any(f"{p}double_blocks.0.img_attn.qkv.weight" in keys and f"{p}img_in.weight" in keys
               for p in ("", BFL_PREFIX))


def _count(keys, blocks: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"(?:{re.escape(BFL_PREFIX)})?{blocks}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


LARGE_WIDTH = 1024  # a transformer this wide (FLUX.1: 3072) is held in bf16 in main memory, as its files store it


def held_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The dtype a FLUX model waits in main memory: bf16 for the real model (its 12 B transformer would take 48 GB in
    float32, 24 GB in bf16; on the GPU it runs in bf16 anyway), float32 for small ones (tests, exact CPU maths)."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return torch.bfloat16 if width >= LARGE_WIDTH else torch.float32


def transformer_config(shapes: Mapping[str, Any], metadata: Mapping[str, str], name: str) -> dict:
    """The transformer's diffusers config: the file's own (files this app writes), else FLUX.1-dev's with the
    block counts, the guidance embedding (dev) or not (schnell) and the widths this file has."""
    if META_CONFIG in metadata:
        return json.loads(metadata[META_CONFIG])
    shapes = {k[len(BFL_PREFIX):] if k.startswith(BFL_PREFIX) else k: tuple(v) for k, v in shapes.items()}
    config = json.loads((FLUX_CONFIGS / "transformer" / "config.json").read_text(encoding="utf-8"))
    in_channels = shapes["img_in.weight"][1]
    if in_channels != config["in_channels"]:
        raise ModelLoadError(f"{name} is a FLUX.1 transformer with {in_channels} input channels (Fill, Canny, Depth "
                             "or another image-conditioned variant); this app trains plain text-to-image FLUX.1.")
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if shapes["img_in.weight"][0] != width:
        raise ModelLoadError(f"{name} has a {shapes['img_in.weight'][0]}-wide transformer where FLUX.1 has {width}: "
                             "it is not a FLUX.1 model this app knows.")
    config.update(num_layers=_count(shapes, "double_blocks"), num_single_layers=_count(shapes, "single_blocks"),
                  guidance_embeds="guidance_in.in_layer.weight" in shapes)
    return config


def dequantize(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float weights in `dtype`: fp8 files upcast, ComfyUI's scaled fp8 (`<layer>.scale_weight` beside the fp8
    `<layer>.weight`) multiplied out; its markers (`scaled_fp8`, `scale_input`) dropped."""
    scales = {k[: -len(".scale_weight")]: v for k, v in state.items() if k.endswith(".scale_weight")}
    out = {}
    for k, v in state.items():
        if k.endswith((".scale_weight", ".scale_input")) or k.rsplit(".", 1)[-1] == "scaled_fp8":
            continue
        if v.is_floating_point():
            layer = k[: -len(".weight")] if k.endswith(".weight") else None
            v = v.to(torch.float32) * scales[layer].to(torch.float32) if layer in scales else v
            v = v.to(dtype)
        out[k] = v
    return out


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    from ..single_file import read_safetensors_header

    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name}: FLUX.1 files must be .safetensors (pickled files can run code when "
                             "opened).")
    metadata, _ = read_safetensors_header(path)  # a damaged file, in plain words
    return metadata, load_file(str(path))


def _build(cls_or_factory, state: dict[str, torch.Tensor], label: str, what: str, ignore=()) -> torch.nn.Module:
    """A module made without weights and given the file's tensors (no second copy of a 12 B model in memory)."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device, buffers (position ids) real
        module = cls_or_factory()
    try:
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"The {what} weights in {label} do not fit a FLUX.1 {what} ({first_line(e)[:200]}).") \
            from None
    missing = [k for k in missing if not any(i in k for i in ignore)]
    unexpected = [k for k in unexpected if not any(i in k for i in ignore)]
    if missing or unexpected:
        detail = f"lacks {len(missing)} weights (e.g. {missing[0]})" if missing else \
            f"has {len(unexpected)} weights a FLUX.1 {what} does not (e.g. {unexpected[0]})"
        raise ModelLoadError(f"{label} {detail}: it is not a complete FLUX.1 {what}.")
    return module


def load_transformer(state: dict[str, torch.Tensor], config: dict, label: str, dtype: torch.dtype):
    state = transformer_from_bfl(dequantize(state, dtype))
    return _build(lambda: FluxTransformer2DModel.from_config(config), state, label, "transformer")


# --- CLIP-L, T5-XXL, VAE ---------------------------------------------------------------------------------------------

def _shipped_config(part: str) -> dict:
    return json.loads((FLUX_CONFIGS / part / "config.json").read_text(encoding="utf-8"))


def _strip(state: dict[str, torch.Tensor], prefixes) -> dict[str, torch.Tensor]:
    for prefix in prefixes:
        if prefix and any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def clip_from_state(state, metadata, label, dtype) -> CLIPTextModel:
    config = CLIPTextConfig(**plain_config(json.loads(metadata[META_CONFIG]) if META_CONFIG in metadata
                                     else _shipped_config("text_encoder")))
    state = dequantize(_strip(state, (EMBEDDED["text_encoder"], "cond_stage_model.transformer.")), dtype)
    if not any(k.startswith("text_model.") for k in state):
        raise ModelLoadError(f"{label} is not a CLIP-L text encoder (no text_model.* weights).")
    # files name the weights `text_model.*` (a projection, if any, is not used); the model may name them without
    state = {k: v for k, v in state.items() if k.startswith("text_model.")}
    model = _build(lambda: CLIPTextModel(config), _as_named_by(state, CLIPTextModel, config), label,
                   "CLIP-L text encoder", ignore=("position_ids",))
    return model


def _as_named_by(state: dict[str, torch.Tensor], cls, config) -> dict[str, torch.Tensor]:
    """CLIP weights as `text_model.*` (files) or without that level, as this transformers version names them."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        wrapped = any(k.startswith("text_model.") for k in cls(config).state_dict())
    if wrapped:
        return state
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}


def clip_file_state(text_encoder) -> dict[str, torch.Tensor]:
    """CLIP-L's weights as clip_l.safetensors files name them (`text_model.*`)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text_encoder.state_dict().items()}


def t5_from_state(state, metadata, label, dtype) -> tuple[T5EncoderModel, str | None]:
    config = T5Config(**plain_config(json.loads(metadata[META_CONFIG]) if META_CONFIG in metadata
                               else _shipped_config("text_encoder_2")))
    state = dequantize(_strip(state, (EMBEDDED["text_encoder_2"],)), dtype)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    if "shared.weight" not in state or not any(k.startswith("encoder.block.") for k in state):
        raise ModelLoadError(f"{label} is not a T5 text encoder (no shared / encoder.block.* weights).")
    model = _build(lambda: T5EncoderModel(config), state, label, "T5-XXL text encoder", ignore=("embed_tokens",))
    model.tie_weights()
    tokenizer_json = metadata.get(META_T5_TOKENIZER)
    if tokenizer_json is None and config.vocab_size != T5_XXL_VOCAB:
        raise ModelLoadError(f"{label} is a T5 model with {config.vocab_size} tokens, not T5-XXL (32,128): the "
                             "shipped tokenizer does not fit it.")
    return model, tokenizer_json


def vae_from_state(state, metadata, label, dtype) -> AutoencoderKL:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = json.loads(metadata[META_CONFIG]) if META_CONFIG in metadata else _shipped_config("vae")
    state = dequantize(_strip(state, (EMBEDDED["vae"], "first_stage_model.")), dtype)
    if not any(k.startswith("encoder.down_blocks.") for k in state):
        if not any(k.startswith("encoder.down.") for k in state):
            raise ModelLoadError(f"{label} is not a VAE (no encoder.down.* weights).")
        state = convert_ldm_vae_checkpoint(state, config)
    return _build(lambda: AutoencoderKL.from_config(config), state, label, "VAE")


# --- one model from its files ----------------------------------------------------------------------------------------

def find_companion(path: Path, part: str) -> Path | None:
    """The part's file beside the transformer file or in ComfyUI's / Forge's folders next to its folder."""
    patterns = COMPANIONS[part][2]
    for sub in SEARCH_DIRS[part]:
        folder = (path.parent / sub).resolve()
        if not folder.is_dir():
            continue
        for pattern in patterns:
            pattern = pattern.replace("{stem}", glob_escape(path.stem))
            found = sorted(p for p in folder.glob(pattern) if p.is_file() and p.resolve() != path.resolve())
            if found:
                return found[0]
    return None


def _companion_from_folder(folder: Path, part: str, dtype):
    """A part from a diffusers folder: the part's own folder, or a FLUX.1 pipeline folder holding it."""
    sub = folder / part if (folder / part / "config.json").is_file() else folder
    if not (sub / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no {part}/config.json or config.json: not a diffusers "
                             f"{COMPANIONS[part][0]} folder.")
    try:
        if part == "vae":
            return AutoencoderKL.from_pretrained(str(sub), use_safetensors=True, torch_dtype=dtype), None
        if part == "text_encoder":
            return CLIPTextModel.from_pretrained(str(sub), use_safetensors=True, torch_dtype=dtype), None
        model = T5EncoderModel.from_pretrained(str(sub), use_safetensors=True, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot load the {COMPANIONS[part][0]} in {sub}: {first_line(e)}.") from e
    tok = sub.parent / "tokenizer_2" / "tokenizer.json"
    return model, tok.read_text(encoding="utf-8") if sub != folder and tok.is_file() else None


LOADERS = {"text_encoder": clip_from_state, "vae": vae_from_state}


def _companion(spec: str | Path, part: str, dtype):
    path = Path(spec).expanduser()
    if path.is_dir():
        return _companion_from_folder(path, part, dtype)
    if not path.is_file():
        raise ModelLoadError(f"{COMPANIONS[part][0]} not found: {path}. Check {COMPANIONS[part][1]}.")
    metadata, state = _read(path)
    return _from_state(state, metadata, path.name, part, dtype)


def _from_state(state, metadata, label, part, dtype):
    if part == "text_encoder_2":
        return t5_from_state(state, metadata, label, dtype)
    return LOADERS[part](state, metadata, label, dtype), None


def load_flux_file(path: str | Path, name: str | None = None, companions: Mapping[str, str] | None = None,
                   dtype: torch.dtype | None = None) -> BaseModel:
    """A FLUX.1 model from a BFL-layout transformer file and its CLIP-L, T5-XXL and VAE (`companions`: part ->
    file or folder; the ones not given are looked for, see the module docstring), on the CPU in `dtype` (None:
    `held_dtype`)."""
    path = Path(path).expanduser()
    label = path.name
    metadata, state = _read(path)
    if not is_flux_transformer(state):
        raise ModelLoadError(f"{label} is not a FLUX.1 transformer in the original layout (no double_blocks.*).")
    config = transformer_config({k: v.shape for k, v in state.items()}, metadata, label)
    dtype = dtype or held_dtype(config)
    embedded = {part: {k: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
                for part, prefix in EMBEDDED.items()}
    transformer = load_transformer(state, config, label, dtype)
    del state
    parts, tokenizer_json, looked = {}, None, []
    for part, (what, setting, _) in COMPANIONS.items():
        given = (companions or {}).get(part)
        if given:
            model, tok = _companion(given, part, dtype)
        elif embedded[part]:
            model, tok = _from_state(embedded[part], {}, label, part, dtype)
        elif (found := find_companion(path, part)) is not None:
            model, tok = _companion(found, part, dtype)
        else:
            looked.append((what, setting))
            continue
        parts[part] = model
        tokenizer_json = tok if part == "text_encoder_2" else tokenizer_json
    if looked:
        names = "; ".join(f"the {what} ({setting})" for what, setting in looked)
        raise ModelLoadError(f"{label} holds only the FLUX.1 transformer, and {names} was not found beside it (nor "
                             "in ComfyUI's models/clip, models/text_encoders, models/vae folders next to its folder). "
                             "Set it to the file or folder you downloaded (e.g. clip_l.safetensors, "
                             "t5xxl_fp16.safetensors, ae.safetensors, or a FLUX.1 diffusers folder).")
    schnell = not config.get("guidance_embeds", True)
    scheduler_config = json.loads((FLUX_CONFIGS / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config({**scheduler_config, **(SCHNELL_SCHEDULER if schnell
                                                                                     else {})})
    tokenizer_2 = t5_tokenizer(tokenizer_json, SCHNELL_T5_LENGTH if schnell else 512)
    return BaseModel(name or str(path), clip_tokenizer(), parts["text_encoder"], parts["vae"], transformer,
                     scheduler, text_encoder_2=parts["text_encoder_2"], tokenizer_2=tokenizer_2, family_name="flux",
                     vae_source=str((companions or {}).get("vae") or ""))


# --- writing (merges, and files for tests) --------------------------------------------------------------------------

def part_metadata(module, tokenizer=None) -> dict[str, str]:
    """Metadata a part file carries: its config, and the tokenizer of a T5 that is not T5-XXL."""
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    meta = {"format": "pt", META_CONFIG: json.dumps(plain_config(config), sort_keys=True, default=list)}
    if tokenizer is not None and len(tokenizer) != 32100:
        meta[META_T5_TOKENIZER] = tokenizer.backend_tokenizer.to_str()
    return meta


def save_flux_files(model: BaseModel, folder: str | Path, dtype: torch.dtype | None = torch.bfloat16) -> dict[str, Path]:
    """`model` as the files FLUX.1 users have: flux1.safetensors (BFL layout), clip_l.safetensors,
    t5xxl.safetensors and ae.safetensors, each with its config in its metadata; written atomically."""
    from ..fileio import save_safetensors
    from ..single_file import vae_to_ldm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t5_state = {k: v for k, v in model.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    files = {
        "transformer": ("flux1.safetensors", transformer_to_bfl(model.transformer.state_dict()), model.transformer),
        "text_encoder": ("clip_l.safetensors", clip_file_state(model.text_encoder), model.text_encoder),
        "text_encoder_2": ("t5xxl.safetensors", t5_state, model.text_encoder_2),
        "vae": ("ae.safetensors", vae_to_ldm(model.vae), model.vae),
    }
    out = {}
    for part, (filename, state, module) in files.items():
        meta = part_metadata(module, model.tokenizer_2 if part == "text_encoder_2" else None)
        out[part] = save_safetensors(_cast(state, dtype), folder / filename, meta)
    return out


def _cast(state, dtype):
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in state.items()}


def save_merged_flux(model: BaseModel, path: str | Path, clip_changed: bool, metadata: Mapping[str, str],
                     dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """A merged FLUX.1 as the one file ComfyUI's and Forge's FLUX loaders take: the BFL-layout transformer (bf16,
    its config in its metadata); when the adapters changed CLIP-L too, `<name>.clip_l.safetensors` beside it (the
    app picks that one for this file; point ComfyUI's CLIP loader at it). T5 and the VAE are the base's."""
    from ..fileio import save_safetensors

    path = Path(path)
    meta = {**part_metadata(model.transformer), **metadata}
    written = [save_safetensors(_cast(transformer_to_bfl(model.transformer.state_dict()), dtype), path, meta)]
    if clip_changed:
        clip = path.with_name(f"{path.stem}.clip_l.safetensors")
        written.append(save_safetensors(_cast(clip_file_state(model.text_encoder), dtype), clip,
                                        part_metadata(model.text_encoder)))
    return written
