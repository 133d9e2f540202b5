"""Adapter files for other tools: diffusers (LoRA), and the kohya / A1111 / Forge / ComfyUI / LyCORIS layout.

Our files hold peft-named weights (`unet.<module>.lora_A.weight`, `...hada_w1_a`, `...lokr_w1`). Those
tools want one flat name per module (`lora_unet_down_blocks_0_..._to_q`, `lora_te_text_model_encoder_
layers_0_self_attn_q_proj`), kohya tensor names (`lora_down` / `lora_up`; LyCORIS keeps `hada_*` and
`lokr_*`) and a scalar `.alpha` per module, whose meaning differs by type:

- LoRA and LoHa: the tools scale by alpha / rank, as peft does: alpha is written as it is.
- LoKr: LyCORIS and ComfyUI use alpha / rank only when a factor is itself low-rank (`lokr_w1_a` or
  `lokr_w2_a` present); with two full factors they use no scale at all, while peft still scales by
  alpha / r. Then the scale is folded into `lokr_w1` and alpha is written as the rank (a no-op).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .adapters import PARTS, AdapterFile, AdapterSpec, read_adapter
from .errors import ModelLoadError
from .fileio import save_safetensors
from .single_file import unet_module_ldm_names

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# transformers 5's CLIPTextModel names its modules without the `text_model.` level the tools expect
TEXT_MODEL = "text_model."
PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
LYCORIS_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                   "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FORMATS = ("kohya", "diffusers")


def kohya_name(part: str, module: str) -> str:
    if part == "text_encoder" and not module.startswith(TEXT_MODEL):
        module = TEXT_MODEL + module
    return KOHYA_PREFIX[part] + module.replace(".", "_")


def split_key(key: str) -> tuple[str, str, str]:
    """'unet.down_blocks.0.attn1.to_q.lora_A.weight' -> ('unet', 'down_blocks.0.attn1.to_q', 'lora_A.weight')."""
    part, _, rest = key.partition(".")
    for suffix in (*PEFT_TO_KOHYA, *LYCORIS_TENSORS):
        if rest.endswith("." + suffix):
            return part, rest[: -len(suffix) - 1], suffix
    raise ModelLoadError(f"Unexpected tensor {key!r} in the adapter file: not a LoRA, LoHa or LoKr weight.")


def to_kohya(adapter: AdapterFile) -> dict[str, torch.Tensor]:
    """The adapter's tensors under kohya / LyCORIS names, with an `.alpha` per module (see the module doc)."""
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.tensors.items():
        part, module, suffix = split_key(key)
        modules.setdefault((part, module), {})[suffix] = tensor.float()
    out = {}
    for (part, module), tensors in sorted(modules.items()):
        spec = adapter.specs[part]
        name = kohya_name(part, module)
        alpha = float(spec.alpha)
        if spec.type == "lokr" and not ({"lokr_w1_a", "lokr_w2_a"} & tensors.keys()):
            tensors = dict(tensors, lokr_w1=tensors["lokr_w1"] * (spec.alpha / spec.rank))
            alpha = float(spec.rank)
        for suffix, tensor in tensors.items():
            out[f"{name}.{PEFT_TO_KOHYA.get(suffix, suffix)}"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def to_diffusers(adapter: AdapterFile) -> dict[str, torch.Tensor]:
    """LoRA for diffusers' `pipe.load_lora_weights`: our peft names (`unet.` / `text_encoder.` prefixes) with
    alpha / rank folded into `lora_B`, because diffusers assumes alpha = rank when a file does not say."""
    if adapter.type != "lora":
        raise ModelLoadError(f"{adapter.path.name} is a {adapter.type.upper()}: diffusers' load_lora_weights loads "
                             "LoRA only. Export it with --format kohya (A1111, Forge, ComfyUI) instead.")
    out = {}
    for key, tensor in adapter.tensors.items():
        part, _, suffix = split_key(key)
        spec = adapter.specs[part]
        out[key] = (tensor.float() * (spec.alpha / spec.rank) if suffix == "lora_B.weight" else tensor.float()).contiguous()
    return out


def kohya_metadata(adapter: AdapterFile) -> dict[str, str]:
    """`ss_*` (kohya) and `modelspec.*` keys, all strings, describing the adapter and its training."""
    info = adapter.metadata
    spec = adapter.main_spec
    lycoris = spec.type in ("loha", "lokr")
    meta = {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(spec.rank), "ss_network_alpha": str(spec.alpha),
        "ss_network_args": json.dumps({"algo": spec.type} if lycoris else {}),
        "ss_base_model_version": "sd_v1", "ss_output_name": adapter.path.stem,
        "ss_text_encoder_trained": str("text_encoder" in adapter.specs).lower(),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": adapter.path.stem,
    }
    for ours, theirs in (("steps", "ss_max_train_steps"), ("learning_rate", "ss_learning_rate"),
                         ("resolution", "ss_resolution"), ("seed", "ss_seed"), ("base_model", "ss_sd_model_name"),
                         ("instance_prompt", "modelspec.trigger_phrase"), ("batch_size", "ss_batch_size_per_device")):
        if info.get(ours):
            meta[theirs] = str(info[ours])
    return meta


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
    return save_safetensors(to_kohya(adapter), out, kohya_metadata(adapter))


# --- reading community files ---------------------------------------------------------------------------------------

CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def foreign_adapter(path: Path, f, metadata: dict[str, str]) -> AdapterFile:
    """An adapter file another tool wrote (f: an open safe_open handle), or a ModelLoadError saying what it is."""
    keys = list(f.keys())
    if keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return AdapterFile(path, {}, {k: f.get_tensor(k) for k in keys}, metadata, layout="kohya")
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        raise ModelLoadError(f"{path.name} is an adapter for SDXL (it has two text encoders); this app uses "
                             "Stable Diffusion 1.x / 2.x models.")
    if any(k.startswith(CHECKPOINT_PREFIXES) for k in keys):
        raise ModelLoadError(f"{path.name} is a whole model checkpoint, not an adapter: choose it as the base model.")
    if keys and all(k.startswith(("unet.", "text_encoder.")) and k.endswith(("lora_A.weight", "lora_B.weight"))
                    for k in keys):
        return diffusers_lora(path, {k: f.get_tensor(k) for k in keys}, metadata)
    raise ModelLoadError(f"{path.name} was not written by this app and is not a kohya / LyCORIS / diffusers "
                         f"adapter either, so its layout is unknown (keys like {', '.join(keys[:3]) or 'none'}).")


def _patterns(ranks: dict[str, int], alphas: dict[str, float]) -> tuple[int, float, dict, dict]:
    """The most common rank / alpha of a part, and per-module patterns (peft's rank_pattern) for the others."""
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    rank_pattern = {re.escape(m): r for m, r in ranks.items() if r != rank}
    alpha_pattern = {re.escape(m): a for m, a in alphas.items() if a != alpha}
    return rank, alpha, rank_pattern, alpha_pattern


def part_spec(kind: str, ranks: dict[str, int], alphas: dict[str, float], **extra) -> AdapterSpec:
    rank, alpha, rank_pattern, alpha_pattern = _patterns(ranks, alphas)
    return AdapterSpec(type=kind, rank=rank, alpha=alpha, targets=sorted(ranks), rank_pattern=rank_pattern,
                       alpha_pattern=alpha_pattern, **extra)


def diffusers_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> AdapterFile:
    """A diffusers / peft LoRA file: our names already; alpha = rank, as diffusers assumes."""
    ranks: dict[str, dict[str, int]] = {}
    for key, tensor in tensors.items():
        part, module, suffix = split_key(key)
        if suffix == "lora_A.weight":
            ranks.setdefault(part, {})[module] = tensor.shape[0]
    specs = {part: part_spec("lora", r, {m: float(v) for m, v in r.items()}) for part, r in ranks.items()}
    return AdapterFile(path, specs, tensors, metadata)


def kohya_groups(adapter: AdapterFile) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.tensors.items():
        module, _, suffix = key.partition(".")
        groups.setdefault(module, {})[suffix] = tensor
    return groups


def kohya_type(adapter: AdapterFile) -> str:
    kinds = {("loha" if any(s.startswith("hada_") for s in g) else "lokr" if any(s.startswith("lokr_") for s in g)
              else "lora" if "lora_down.weight" in g else "?") for g in kohya_groups(adapter).values()}
    if len(kinds) != 1 or "?" in kinds:
        raise ModelLoadError(f"{adapter.path.name} mixes adapter kinds or holds ones this app cannot load "
                             f"({', '.join(sorted(kinds))}); it loads LoRA (incl. conv), LoHa and LoKr files.")
    return kinds.pop()


def _lokr_rank(g: dict[str, torch.Tensor]) -> tuple[int, bool]:
    """(peft rank, decompose_both) that rebuild this LoKr module's factors; full factors get a rank so large
    that peft keeps them full."""
    if "lokr_w2_a" in g:
        return g["lokr_w2_a"].shape[1], "lokr_w1_a" in g
    if "lokr_w1_a" in g:
        return g["lokr_w1_a"].shape[1], True
    return max(g["lokr_w2"].shape[:2]) * 2, False


def resolve_kohya(adapter: AdapterFile, base) -> AdapterFile:
    """A kohya / LyCORIS file as one of ours, its layer names read against `base` (all or nothing)."""
    kind = kohya_type(adapter)
    names = {}
    for part in PARTS:
        layers = [n for n, m in getattr(base, part).named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        names.update({kohya_name(part, n): (part, n) for n in layers})
        if part == "unet":  # older A1111-era files name UNet layers in the original SD layout (input_blocks ...)
            ldm = unet_module_ldm_names(base.unet, layers)
            names.update({KOHYA_PREFIX["unet"] + ldm[n].replace(".", "_"): (part, n) for n in layers if n in ldm})
    groups = kohya_groups(adapter)
    unknown = sorted(m for m in groups if m not in names)
    if unknown:
        raise ModelLoadError(f"{adapter.path.name} has {len(unknown)} layer(s) this base model does not have (e.g. "
                             f"{', '.join(unknown[:3])}): it was made for another model family (SD 1.x and 2.x "
                             "differ in the text encoder, SDXL in everything).")
    unsupported = {"lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2", "dora_scale"}
    tensors, ranks, alphas, decompose = {}, {}, {}, {}
    for module, g in groups.items():
        part, path = names[module]
        if unsupported & g.keys():
            raise ModelLoadError(f"{adapter.path.name} uses {', '.join(sorted(unsupported & g.keys()))} (Tucker / "
                                 "DoRA variants), which this app cannot load.")
        if kind == "lora":
            rank = g["lora_down.weight"].shape[0]
            renamed = {"lora_A.weight": g["lora_down.weight"], "lora_B.weight": g["lora_up.weight"]}
        elif kind == "loha":
            rank = g["hada_w1_b"].shape[0]
            renamed = {k: v for k, v in g.items() if k != "alpha"}
        else:
            rank, both = _lokr_rank(g)
            decompose[part] = decompose.get(part, both) or both
            renamed = {k: v for k, v in g.items() if k != "alpha"}
        full_lokr = kind == "lokr" and "lokr_w1" in g and "lokr_w2" in g
        alpha = float(rank) if full_lokr or "alpha" not in g else float(g["alpha"])  # LyCORIS: no scale for full
        ranks.setdefault(part, {})[path] = rank
        alphas.setdefault(part, {})[path] = alpha
        tensors.update({f"{part}.{path}.{suffix}": t.float() for suffix, t in renamed.items()})
    extra = lambda part: {"decompose_both": decompose.get(part, False)} if kind == "lokr" else {}  # noqa: E731
    specs = {part: part_spec(kind, ranks[part], alphas[part], **extra(part)) for part in ranks}
    return AdapterFile(adapter.path, specs, tensors, adapter.metadata)


def describe(adapter: AdapterFile) -> str:
    """What a user wants to know about an adapter file, in one markdown line (ours, kohya or diffusers)."""
    meta = adapter.metadata
    if adapter.layout == "kohya":
        kind = adapter.type
        rank, alpha = meta.get("ss_network_dim", "?"), meta.get("ss_network_alpha", "?")
        base = meta.get("ss_sd_model_name") or meta.get("ss_base_model_version") or "not recorded"
        trigger = meta.get("modelspec.trigger_phrase") or _top_tags(meta.get("ss_tag_frequency", ""))
        steps, lr = meta.get("ss_max_train_steps"), meta.get("ss_learning_rate")
        parts = "UNet + text encoder" if any(k.startswith("lora_te_") for k in adapter.tensors) else "UNet"
    else:
        spec = adapter.main_spec
        kind, rank, alpha = spec.type, spec.rank, f"{spec.alpha:g}"
        base = meta.get("base_model") or "not recorded"
        trigger, steps, lr = meta.get("instance_prompt", ""), meta.get("steps"), meta.get("learning_rate")
        parts = " + ".join({"unet": "UNet", "text_encoder": "text encoder"}[p] for p in adapter.specs)
    text = f"**{adapter.path.name}**: {kind.upper()} rank {rank}, alpha {alpha}, on the {parts}; base model: {base}"
    if trigger:
        text += f"; trigger: `{trigger}`"
    if steps:
        text += f"; {steps} steps" + (f" at learning rate {lr}" if lr else "")
    return text + "."


def _top_tags(frequency_json: str, n: int = 3) -> str:
    """kohya's ss_tag_frequency ({folder: {tag: count}}) -> its most frequent tags."""
    try:
        counts: dict[str, int] = {}
        for tags in json.loads(frequency_json).values():
            for tag, count in tags.items():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(count)
    except (ValueError, AttributeError, TypeError):
        return ""
    return ", ".join(sorted(counts, key=counts.get, reverse=True)[:n])
