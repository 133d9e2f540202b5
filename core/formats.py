"""Adapter files for other tools: the kohya / A1111 / Forge / ComfyUI / LyCORIS layout.

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
from pathlib import Path

import torch

from .adapters import AdapterFile, read_adapter
from .errors import ModelLoadError
from .fileio import save_safetensors

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# transformers 5's CLIPTextModel names its modules without the `text_model.` level the tools expect
TEXT_MODEL = "text_model."
PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
LYCORIS_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                   "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FORMATS = ("kohya",)


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


def kohya_metadata(adapter: AdapterFile) -> dict[str, str]:
    """`ss_*` (kohya) and `modelspec.*` keys, all strings, describing the adapter and its training."""
    info = adapter.metadata
    spec = adapter.specs.get("unet") or next(iter(adapter.specs.values()))
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
    return save_safetensors(to_kohya(adapter), out, kohya_metadata(adapter))
