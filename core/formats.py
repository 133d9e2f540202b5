"""Exporting our adapter files for other tools: diffusers (LoRA, DoRA), and the kohya / A1111 / Forge / ComfyUI / LyCORIS
layout (reading such files is core/community.py).

Our files hold peft-named weights (`unet.<module>.lora_A.weight`, `...hada_w1_a`, `...lokr_w1`). Those
tools want one flat name per module (`lora_unet_down_blocks_0_..._to_q`, `lora_te_text_model_encoder_
layers_0_self_attn_q_proj`), kohya tensor names (`lora_down` / `lora_up`; LyCORIS keeps `hada_*` and
`lokr_*`) and a scalar `.alpha` per module, whose meaning differs by type:

- LoRA and LoHa: the tools scale by alpha / rank, as peft does: alpha is written as it is.
- LoKr: LyCORIS and ComfyUI use alpha / rank only when a factor is itself low-rank (`lokr_w1_a` or
  `lokr_w2_a` present); with two full factors they use no scale at all, while peft still scales by
  alpha / r. Then the scale is folded into `lokr_w1` and alpha is written as the rank (a no-op).
- DoRA: a LoRA (`lora_down` / `lora_up` / alpha as LoRA's) plus `dora_scale`, one per output row. peft divides
  each row of W + dW by its own length and multiplies by the learned magnitude m. ComfyUI and Forge divide an
  output-axis `dora_scale` by the row length of the base W instead, and LyCORIS by that of W + dW (as peft), so
  no one `dora_scale` is exact in both: ours is written for ComfyUI / Forge (m x |W row| / |W + dW row|, exact
  there), its metadata says so, and LyCORIS applies it approximately (README). A1111 reads `dora_scale` per
  input column only and gets it wrong: merge the adapter into the model for A1111.

diffusers' `load_lora_weights` also reads kohya LoRA files, but it tells the text encoder's key style by an
`out_proj` entry (kohya's own files always have one): a LoRA text encoder part on q/k/v_proj without out_proj
gets one zero out_proj module (lora_down and lora_up zeros), which adds nothing in any tool.

Module names are the family's (Family.export_groups): SDXL's UNet modules by their original SGM names
(`lora_unet_input_blocks_4_1_...`), its encoders `lora_te1_` (CLIP-L) and `lora_te2_` (OpenCLIP-G); FLUX's
transformer by the original BFL names (`lora_unet_double_blocks_0_img_attn_qkv`), where q, k and v are one fused
layer (see `fuse`).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from . import families
from .adapter_file import DORA_CONVENTION, DORA_NORMS, AdapterFile, split_key
from .adapters import read_adapter
from .config import LORA_LAYER_TYPES, adapter_name
from .errors import ModelLoadError
from .fileio import save_safetensors

PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
# kohya: the kohya / A1111 / Forge / ComfyUI layout; lycoris: the same, a DoRA's dora_scale for LyCORIS' own loader
FORMATS = ("kohya", "diffusers", "lycoris")


def zero_out_proj(adapter: AdapterFile, modules: dict[tuple[str, str], dict[str, torch.Tensor]],
                  part: str = "text_encoder") -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """{(part, module): tensors} of the zero out_proj entry diffusers needs in text encoder `part` (see the
    module doc), or {}."""
    te = [m for p, m in modules if p == part]
    attention = sorted(m for m in te if m.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj"))
    if not attention or adapter.specs[part].type != "lora" or any(m.endswith(".out_proj") for m in te):
        return {}
    like = modules[(part, attention[0])]  # out_proj maps the same width to itself as q/k/v_proj
    zeros = {suffix: torch.zeros_like(t) for suffix, t in like.items()}
    return {(part, attention[0].rsplit(".", 1)[0] + ".out_proj"): zeros}


def recorded_unet_config(adapter: AdapterFile) -> dict | None:
    """The config of the UNet the adapter was trained on, where its metadata records one (`unet_config`)."""
    try:
        config = json.loads(adapter.metadata.get("unet_config", "null"))
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


def export_groups(adapter: AdapterFile, family, modules) -> dict[tuple[str, str], list[tuple[str | None, int]]]:
    """(part, exported name) -> the modules it holds, as the family names and fuses them for other tools."""
    unet_config = recorded_unet_config(adapter)
    groups = {}
    for part in dict.fromkeys(p for p, _ in modules):
        ours = [m for p, m in modules if p == part]
        groups.update({(part, n): members for n, members in family.export_groups(part, ours, unet_config).items()})
    return groups


def lokr_delta(tensors: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """The weight change of a linear LoKr module: scale * kron(w1, w2), each factor whole or a product."""
    w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    w2 = tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
    return torch.kron(w1, w2) * scale


def block_rows(blocks: list[torch.Tensor | None], widths: list[int], columns: int) -> torch.Tensor:
    """Matrices placed block-diagonally: block i in rows of member i (zeros for a member with None) and the next
    free columns; `columns` in all."""
    out = torch.zeros(sum(widths), columns)
    row = col = 0
    for block, width in zip(blocks, widths):
        if block is not None:
            out[row:row + width, col:col + block.shape[1]] = block
            col += block.shape[1]
        row += width
    return out


def fuse(members: list[tuple[dict[str, torch.Tensor] | None, int]], spec,
         reader: str = "comfyui") -> tuple[dict[str, torch.Tensor], float]:
    """(tensors, alpha) of one layer that fuses several along its outputs (FLUX's q, k, v), whose weight change is
    exactly the members' changes stacked (zeros for members that did not train). LoRA and LoHa stay low-rank:
    the down / inner factors are concatenated and the up / outer ones placed block-diagonally, so the rank is the
    members' ranks added and alpha grows with it (alpha / rank, the scale, is unchanged). A LoKr is not a
    Kronecker product once stacked: it is written as the full weight change (`.diff`, which ComfyUI and Forge add
    as it is)."""
    if spec.type == "dora":  # DoRA works row by row: the rows' scales are stacked as the rows are
        if any(t is None for t, _ in members):
            raise ModelLoadError("This DoRA file has no row lengths for the untrained layers fused with its trained "
                                 "ones (a file this app did not train): merge it into the model instead.")
        lora = [(t if "lora_A.weight" in t else None, w) for t, w in members]
        fused, alpha = fuse(lora, replace(spec, type="lora"))
        return fused | {"dora_scale": torch.cat([dora_scale(t, reader=reader) for t, _ in members])}, alpha
    if spec.type == "lokr":
        members = [(lokr_delta(t, spec.alpha / spec.rank) if t is not None else None, w) for t, w in members]
    present = [t for t, _ in members if t is not None]
    first, unit = next((t, w) for t, w in members if t is not None)
    out_key = {"lora": "lora_B.weight", "loha": "hada_w1_a"}.get(spec.type)
    width = (first[out_key] if out_key else first).shape[0] // unit
    widths = [w * width for _, w in members]
    if spec.type == "lokr":
        stacked = [d if d is not None else torch.zeros(w, first.shape[1]) for (d, _), w in zip(members, widths)]
        return {"diff": torch.cat(stacked)}, float(spec.rank)
    n = len(present)
    if spec.type == "lora":
        ups = [t["lora_B.weight"] if t is not None else None for t, _ in members]
        fused = {"lora_A.weight": torch.cat([t["lora_A.weight"] for t in present]),
                 "lora_B.weight": block_rows(ups, widths, sum(u.shape[1] for u in ups if u is not None))}
    else:  # loha: (w1a w1b) * (w2a w2b), each product stacked the same way
        fused = {}
        for a, b in (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")):
            outer = [t[a] if t is not None else None for t, _ in members]
            fused[a] = block_rows(outer, widths, sum(o.shape[1] for o in outer if o is not None))
            fused[b] = torch.cat([t[b] for t in present])
    return fused, float(spec.alpha) * n


def dora_scale(tensors: dict[str, torch.Tensor], module: str = "", reader: str = "comfyui") -> torch.Tensor:
    """A DoRA module's `dora_scale` on the output axis for `reader`. ComfyUI and Forge scale each row of W + dW by
    dora_scale / (|row of W| + eps), where peft scales it by m / |row of W + dW|: for them the scale written is
    m x (|row of W| + eps) / |row of W + dW| (both lengths kept in our file when it was saved), exact there to
    float32 rounding. LyCORIS divides by |row of W + dW| + eps as peft does: for it, m itself. Shaped (out, 1) for
    a linear layer, (out, 1, 1, 1) for a convolution."""
    eps = torch.finfo(torch.float32).eps
    if tensors.keys() == {"dora_base_norm"}:  # a layer fused with DoRA layers that did not train: W' = W
        return (tensors["dora_base_norm"].double() + (eps if reader == "comfyui" else 0.0)).float().reshape(-1, 1)
    shape = (-1, *[1] * (tensors["lora_A.weight"].dim() - 1))
    magnitude = tensors["lora_magnitude_vector"].reshape(-1).double()
    if reader == "lycoris":
        return magnitude.float().reshape(shape)
    if not set(DORA_NORMS) <= tensors.keys():
        raise ModelLoadError(f"The DoRA module {module} has no saved row lengths (a file this app did not train, or an "
                             "old one): it cannot be exported for ComfyUI without its base model. Merge it into the "
                             "model instead.")
    base, merged = (tensors[k].double() for k in DORA_NORMS)
    return (magnitude * (base + eps) / merged).float().reshape(shape)


def kohya_module(tensors: dict[str, torch.Tensor], spec, module: str = "",
                 reader: str = "comfyui") -> tuple[dict[str, torch.Tensor], float]:
    """(tensors, alpha) of one module as the tools read it: LoKr with two whole factors gets its scale folded
    into lokr_w1; a DoRA its `dora_scale` (see the module doc)."""
    if spec.type == "lokr" and not ({"lokr_w1_a", "lokr_w2_a"} & tensors.keys()):
        return dict(tensors, lokr_w1=tensors["lokr_w1"] * (spec.alpha / spec.rank)), float(spec.rank)
    if spec.type == "dora":
        lora = {k: tensors[k] for k in ("lora_A.weight", "lora_B.weight")}
        return lora | {"dora_scale": dora_scale(tensors, module, reader)}, float(spec.alpha)
    return tensors, float(spec.alpha)


def to_kohya(adapter: AdapterFile, reader: str = "comfyui") -> dict[str, torch.Tensor]:
    """The adapter's tensors under kohya / LyCORIS names, with an `.alpha` per module (see the module doc); a DoRA's
    `dora_scale` as `reader` (comfyui: ComfyUI and Forge; lycoris: LyCORIS' own loader) applies it exactly."""
    family = families.of_adapter(adapter.metadata, adapter.specs)
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.tensors.items():
        part, module, suffix = split_key(key)
        modules.setdefault((part, module), {})[suffix] = tensor.float()
    for part in family.text_encoders:
        modules.update(zero_out_proj(adapter, modules, part))
    out = {}
    for (part, name), members in sorted(export_groups(adapter, family, modules).items()):
        spec = adapter.specs[part]
        if len(members) == 1:
            tensors, alpha = kohya_module(modules[(part, members[0][0])], spec, name, reader)
        else:
            tensors, alpha = fuse([(modules[(part, m)] if m else None, w) for m, w in members], spec, reader)
        for suffix, tensor in tensors.items():
            out[f"{name}.{PEFT_TO_KOHYA.get(suffix, suffix)}"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def to_diffusers(adapter: AdapterFile) -> dict[str, torch.Tensor]:
    """LoRA / DoRA for diffusers' `pipe.load_lora_weights`: our peft names (`unet.` / `text_encoder.` prefixes) with
    alpha / rank folded into `lora_B`, because diffusers assumes alpha = rank when a file does not say (a DoRA's
    `lora_magnitude_vector` as it is: diffusers sees it and loads a DoRA)."""
    if adapter.type not in LORA_LAYER_TYPES:
        raise ModelLoadError(f"{adapter.path.name} is a {adapter_name(adapter.type)}: diffusers' load_lora_weights loads "
                             "LoRA and DoRA only. Export it with --format kohya (A1111, Forge, ComfyUI) instead.")
    out = {}
    for key, tensor in adapter.tensors.items():
        part, _, suffix = split_key(key)
        if suffix in DORA_NORMS:  # ours, for the kohya export; peft's DoRA recomputes them
            continue
        if suffix == "lora_magnitude_vector":  # diffusers loads a text encoder's magnitudes only under this name
            key += ".weight"
        spec = adapter.specs[part]
        out[key] = (tensor.float() * (spec.alpha / spec.rank) if suffix == "lora_B.weight" else tensor.float()).contiguous()
    return out


def kohya_metadata(adapter: AdapterFile, reader: str = "comfyui") -> dict[str, str]:
    """`ss_*` (kohya) and `modelspec.*` keys, all strings, describing the adapter and its training."""
    info = adapter.metadata
    spec = adapter.main_spec
    lycoris = spec.type in ("loha", "lokr", "dora")
    family = families.of_adapter(info, adapter.specs)
    # a DoRA is LyCORIS' LoRA with its weight decomposition (`dora_wd`), as kohya's trainer writes one
    args = {"algo": "lora", "dora_wd": "True"} if spec.type == "dora" else {"algo": spec.type} if lycoris else {}
    meta = {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(spec.rank), "ss_network_alpha": str(spec.alpha),
        "ss_network_args": json.dumps(args),
        "ss_output_name": adapter.path.stem,
        "ss_text_encoder_trained": str(any(part in adapter.specs for part in family.text_encoders)).lower(),
        "modelspec.sai_model_spec": "1.0.0", **family.adapter_metadata,
        "modelspec.implementation": "diffusers", "modelspec.title": adapter.path.stem,
    }
    if spec.type == "dora":  # which norm its dora_scale is meant for, so that importing it back is exact
        meta[DORA_CONVENTION] = reader
    for ours, theirs in (("steps", "ss_max_train_steps"), ("learning_rate", "ss_learning_rate"),
                         ("resolution", "ss_resolution"), ("seed", "ss_seed"), ("base_model", "ss_sd_model_name"),
                         ("instance_prompt", "modelspec.trigger_phrase"), ("batch_size", "ss_batch_size_per_device")):
        if info.get(ours):
            meta[theirs] = str(info[ours])
    return meta


def where_to_use(kind: str) -> str:
    """One sentence for a user about where an exported kohya file of adapter type `kind` goes (and where not)."""
    if kind == "dora":
        return ("Put it in ComfyUI's `models/loras` or Forge's `models/Lora` folder: both apply a DoRA exactly. "
                "A1111 reads DoRA files differently and would draw wrong pictures: for A1111, merge the adapter "
                "into a model (playground: Merge the chosen adapters).")
    return "Put it in A1111/Forge's `models/Lora` or ComfyUI's `models/loras` folder."


def export_adapter(path: str | Path, out: str | Path, fmt: str = "kohya") -> Path:
    """Write our adapter file `path` in format `fmt` to `out` (atomic)."""
    if fmt not in FORMATS:
        raise ModelLoadError(f"Unknown export format {fmt!r}: use one of {', '.join(FORMATS)}.")
    adapter = read_adapter(path)
    if adapter.layout == "kohya":
        raise ModelLoadError(f"{adapter.path.name} is already in the kohya / LyCORIS layout: use it as it is.")
    if fmt == "diffusers":
        # not our format tag: the folded scale must never be read back as one of our files (it would apply twice)
        meta = {"format": "pt", "exported_by": "dreambooth-peft", "exported_from": adapter.path.name}
        meta.update({k: v for k, v in adapter.metadata.items() if k not in ("format", "format_version", "adapters")})
        return save_safetensors(to_diffusers(adapter), out, meta)
    reader = "lycoris" if fmt == "lycoris" else "comfyui"
    return save_safetensors(to_kohya(adapter, reader), out, kohya_metadata(adapter, reader))
