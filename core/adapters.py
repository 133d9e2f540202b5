"""LoRA, LoHa and LoKr adapters through peft: inject, save, read, load, weight and remove them on a model's parts.

The parts are a mapping name -> module, e.g. {"unet": unet, "text_encoder": text_encoder} (`BaseModel.parts`);
an adapter file keys its weights by the same names (core/adapter_file.py).
"""
from __future__ import annotations

import contextlib

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from diffusers.training_utils import cast_training_params
from peft.functional import (
    delete_adapter as peft_delete_adapter,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_adapter,
    set_peft_model_state_dict,
    set_requires_grad,
)
from peft.tuners.lycoris_utils import LycorisLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from .adapter_file import (
    COLUMN_SCALE,
    AdapterFile,
    AdapterSpec,
    Reader,
    read_adapter_file,
    read_ours,
    save_adapter_file,
)
from .community import read_diffusers, read_kohya, refuse_checkpoint, resolve_kohya
from .config import BLOCK_KINDS, LORA_LAYER_TYPES, UNET_TARGETS_FULL, Config, adapter_name, parse_blocks
from . import families
from .errors import ConfigError, ModelLoadError
from .weights import base_weight, lora_product, row_norms
from .families.base import Family

Parts = Mapping[str, torch.nn.Module]
# Which reader knows a file: ours (by its tag), then kohya / LyCORIS, then diffusers; a checkpoint is named as one.
READERS: tuple[Reader, ...] = (read_ours, read_kohya, read_diffusers, refuse_checkpoint)


def specs_from_config(cfg: Config, text_encoders: tuple[str, ...] = ("text_encoder",),
                      denoiser: str = "unet", family_targets: Sequence[str] = ()) -> dict[str, AdapterSpec]:
    """The adapter of each part a run trains: the denoiser, and every text encoder of the model's family (its
    `text_encoders`) when the text encoders train, each with the text-encoder settings. `family_targets`: the
    denoiser's targets when `adapter.unet_targets` is left at its (UNet) default, for a family whose denoiser has
    other module names (FLUX's transformer)."""
    a = cfg.adapter
    targets = list(a.unet_targets)
    if family_targets and targets == list(UNET_TARGETS_FULL):
        targets = list(family_targets)
    shared = dict(type=a.type, dropout=a.dropout, module_dropout=a.module_dropout, decompose_both=a.decompose_both,
                  decompose_factor=a.decompose_factor, use_effective_conv2d=a.use_effective_conv2d)
    specs = {denoiser: AdapterSpec(rank=a.rank, alpha=a.alpha, targets=targets, blocks=a.blocks, **shared)}
    if a.train_text_encoder:
        for part in text_encoders:
            specs[part] = AdapterSpec(rank=cfg.text_encoder_rank, alpha=cfg.text_encoder_alpha,
                                      targets=list(a.text_encoder_targets), **shared)
    return specs


def training_metadata(cfg: Config, step: int, base_name: str, family: str | None = None) -> dict[str, Any]:
    """What a user (or another tool) wants to know about how the adapter was made (`family`: the base model's,
    which exports name their modules and architecture by)."""
    return ({"family": family} if family else {}) | {
        "base_model": base_name, "adapter_type": cfg.adapter.type, "rank": cfg.adapter.rank, "alpha": cfg.adapter.alpha,
        "unet_targets": cfg.adapter.unet_targets, "train_text_encoder": cfg.adapter.train_text_encoder,
        "instance_prompt": cfg.data.instance_prompt, "class_prompt": cfg.data.class_prompt, "steps": step,
        "resolution": cfg.data.resolution, "seed": cfg.train.seed, "learning_rate": cfg.train.learning_rate,
        "prior_preservation": cfg.train.prior_preservation, "batch_size": cfg.train.batch_size,
    }


# --- training: inject and save --------------------------------------------------------------------------------------

def block_modules(model: torch.nn.Module, targets: Sequence[str], blocks: str) -> list[str]:
    """The full names of the `targets` modules (peft's suffix rule) inside the blocks `blocks` names."""
    chosen = parse_blocks(blocks)
    if not any(hasattr(model, attr) for attr in BLOCK_KINDS.values()):
        raise ConfigError("`adapter.blocks` chooses among a FLUX.1 transformer's double and single blocks; this model "
                          "has none: leave it at all.")
    names = []
    for name, _ in model.named_modules():
        head, _, rest = name.partition(".")
        index, _, inner = rest.partition(".")
        kind = next((k for k, attr in BLOCK_KINDS.items() if attr == head), None)
        if kind not in chosen or not index.isdigit() or not inner:
            continue
        wanted = chosen[kind]
        if (wanted is None or int(index) in wanted) and any(inner == t or inner.endswith("." + t) for t in targets):
            names.append(name)
    if not names:
        raise ConfigError(f"`adapter.blocks` ({blocks}) leaves no target module in this transformer: check the block "
                          "numbers (FLUX.1 has double blocks 0-18 and single blocks 0-37).")
    return names


def inject(model: torch.nn.Module, spec: AdapterSpec, name: str = "default") -> list[torch.nn.Parameter]:
    """Add adapter `name` to `model` in place; return its parameters (trainable, float32).

    Other parameters keep their trainable flag (peft's injection would otherwise change them).
    """
    before = {pname: p.requires_grad for pname, p in model.named_parameters()}
    config = spec.peft_config()
    if spec.blocks != "all":
        config.target_modules = block_modules(model, spec.targets, spec.blocks)
    try:
        inject_adapter_in_model(config, model, adapter_name=name)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ModelLoadError(f"The adapter's target modules do not exist in this model: {e}") from None
    # peft has frozen everything but the new adapter, so the cast reaches its weights only: adapters train
    # in float32 even when the frozen weights are fp16/bf16
    set_requires_grad(model, name, True)
    cast_training_params(model, torch.float32)
    for layer in tuner_layers(model):
        variant = getattr(layer, "lora_variant", {}).get(name)
        if variant is not None and not isinstance(variant, WeightedDora):
            layer.lora_variant[name] = WeightedDora(variant)
    params = []
    for pname, p in model.named_parameters():
        if f".{name}." in f".{pname}.":  # e.g. "...to_q.lora_A.default.weight", "...to_q.hada_w1_a.default"
            params.append(p)
        else:  # base weights, renamed "<module>.base_layer.weight" by the wrapping, stay as they were
            p.requires_grad_(before.get(pname, before.get(pname.replace(".base_layer.", "."), False)))
    return params


def inject_all(parts: Parts, specs: dict[str, AdapterSpec], name: str = "default") -> dict[str, list[torch.nn.Parameter]]:
    return {part: inject(parts[part], spec, name) for part, spec in specs.items()}


def state_dict(parts: Parts, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter weights of every part (each must hold adapter `name`), keyed `<part>.<peft key>`, as contiguous
    CPU float32 copies (never views of weights that go on training: a paused run's copy must hold still); a DoRA
    layer also gets its row lengths (`dora_norms`)."""
    out = {}
    for part, module in parts.items():
        sd = get_peft_model_state_dict(module, adapter_name=name)
        out.update({f"{part}.{k}": v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in sd.items()})
    return out | dora_norms(parts, name)


# --- DoRA: strength and the weight a layer computes with ------------------------------------------------------------

class WeightedDora:
    """peft's DoRA variant of a layer with its whole change times a strength: W + strength x (W' - W).

    peft's own strength (`set_scale`) scales dW inside DoRA's normalisation, so at 0 a DoRA layer still rescales
    every output row to its learned length (the base model is not drawn) and between 0 and 1 the weight matches
    no other tool. Scaling the whole change instead is what ComfyUI and Forge do with a DoRA file's strength:
    0 is the base, 1 is as trained, and the playground and a merge at 0.7 give what ComfyUI gives at 0.7.
    Everything else (init, merge) is peft's variant's.
    """

    def __init__(self, inner):
        self.inner, self.strength = inner, 1.0

    def __getattr__(self, attr):  # only for what this class lacks; "inner" itself is missing only mid-copy
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def forward(self, module, active_adapter, x, result, **kwargs):
        # peft rescales `result` as the base layer's output: with other adapters active on this layer before this
        # one it already holds their changes, which this DoRA would rescale too; each adapter's change is taken
        # against the base alone (in any order: as a merge adds them), so the base output is computed again
        others = any(a != active_adapter and a in module.lora_A for a in module.active_adapters)
        base = result
        if others:
            plain = module.get_base_layer()
            weight = getattr(plain, "weight", None)
            floating = weight is not None and weight.dtype.is_floating_point  # (quantized layers cast themselves)
            base = plain(x.to(weight.dtype) if floating else x).to(result.dtype)
        out = self.inner.forward(module, active_adapter=active_adapter, x=x, result=base, **kwargs)
        if base is result and self.strength == 1.0:
            return out
        return result + self.strength * (out - base)


class ColumnDora:
    """A DoRA whose lengths are per input column (older LyCORIS and OneTrainer files), which peft has no layer
    for: on a peft LoRA layer, W' = (W + dW) x d / |column of W + dW|, as ComfyUI, Forge, A1111 and LyCORIS apply
    such a file (their one shared reading), at a strength as WeightedDora's."""

    def __init__(self, scale: torch.Tensor):
        self.scale, self.strength = scale.float(), 1.0

    def weight(self, layer: BaseTunerLayer, name: str, base: torch.Tensor) -> torch.Tensor:
        merged = base + lora_change(layer, name, base.shape)
        columns = merged.transpose(0, 1).flatten(1).norm(dim=1)  # one length per input (channel)
        scale = self.scale.to(base.device).reshape(1, -1, *[1] * (base.dim() - 2))
        return merged * scale / (columns.reshape(1, -1, *[1] * (base.dim() - 2)) + torch.finfo(torch.float32).eps)

    def forward(self, module, active_adapter, x, result, **kwargs):
        base = base_weight(module)
        change = (self.weight(module, active_adapter, base) - base) * self.strength
        plain = module.get_base_layer()
        if isinstance(plain, torch.nn.Conv2d):
            return result + torch.nn.functional.conv2d(x, change.to(x.dtype), None, plain.stride, plain.padding,
                                                       plain.dilation, plain.groups)
        return result + torch.nn.functional.linear(x, change.to(x.dtype))


def set_strength(layer: BaseTunerLayer, name: str, strength: float) -> None:
    """Adapter `name` of `layer` at `strength` x as trained (a DoRA: its whole change, see WeightedDora)."""
    variant = getattr(layer, "lora_variant", {}).get(name)
    if isinstance(variant, (WeightedDora, ColumnDora)):
        layer.set_scale(name, 1.0)
        variant.strength = strength
    else:
        layer.set_scale(name, strength)


def is_dora(layer: torch.nn.Module, name: str) -> bool:
    return name in getattr(layer, "lora_magnitude_vector", {})


def lora_change(layer: BaseTunerLayer, name: str, shape: torch.Size) -> torch.Tensor:
    """scaling x B @ A of LoRA layer `layer`'s adapter `name`, in float32 and the base weight's `shape`."""
    return lora_product(layer.lora_B[name].weight, layer.lora_A[name].weight, layer.scaling[name], shape)


def dora_weight(layer: BaseTunerLayer, name: str, base: torch.Tensor) -> torch.Tensor:
    """The weight DoRA adapter `name` makes of `base`, as peft computes it: (W + dW) x m / |row of W + dW|, where
    dW = scaling x B @ A and m is the learned length of each output."""
    merged = base + lora_change(layer, name, base.shape)
    magnitude = layer.lora_magnitude_vector[name].weight.detach().float().reshape(-1)
    return merged * (magnitude / row_norms(merged)).reshape(-1, *[1] * (base.dim() - 1))


def weight_change(layer: BaseTunerLayer, name: str) -> torch.Tensor:
    """What adapter `name` adds to the layer's base weight at its current strength (float32, the weight's
    shape)."""
    base = base_weight(layer)
    if is_dora(layer, name):
        return (dora_weight(layer, name, base) - base) * layer.lora_variant[name].strength
    variant = getattr(layer, "lora_variant", {}).get(name)
    if isinstance(variant, ColumnDora):
        return (variant.weight(layer, name, base) - base) * variant.strength
    return layer.get_delta_weight(name).detach().float().reshape(base.shape)


def dora_norms(parts: Parts, name: str = "default") -> dict[str, torch.Tensor]:
    """`<part>.<module>.dora_base_norm` / `.dora_weight_norm` of every DoRA layer of adapter `name`: the output
    rows' lengths in W and in W + dW, which an export for ComfyUI needs (core/formats.py) and a file cannot
    recompute without the base model. A layer that other tools fuse with a DoRA layer (FLUX's q / k / v / MLP
    input) but that did not train gets its base lengths alone: the fused layer's scale needs every row."""
    family = families.of_parts(parts)
    out = {}
    for part, module in parts.items():
        layers = dict(module.named_modules())
        for path, layer in layers.items():
            if not (isinstance(layer, BaseTunerLayer) and is_dora(layer, name)):
                continue
            base = base_weight(layer)
            out[f"{part}.{path}.dora_weight_norm"] = row_norms(base + lora_change(layer, name, base.shape)).cpu()
            for member in family.fused_members(part, path):
                out[f"{part}.{member}.dora_base_norm"] = row_norms(base_weight(layers[member])).cpu()
    return out


def save_adapter(path, parts: Parts, specs: dict[str, AdapterSpec], info: dict[str, Any], name: str = "default") -> Path:
    return save_adapter_file(path, state_dict({part: parts[part] for part in specs}, name), specs, info)


# --- using adapter files: read, load, weight, remove -----------------------------------------------------------------

def read_adapter(path: str | Path) -> AdapterFile:
    """Read an adapter file of ours or of another tool (see READERS); a clear ModelLoadError for anything else."""
    return read_adapter_file(path, READERS)


def load_into(parts: Parts, adapter: AdapterFile, name: str, family: Family | None = None) -> None:
    """Inject `adapter` as `name` into the model's parts and load its weights (all or nothing); a kohya file's
    names are read as `family` names them (by default the family with these parts).

    Every failure, in any part, removes what was already injected and becomes a ModelLoadError: peft's
    size-mismatch RuntimeError (an adapter from a differently shaped model) and its AttributeError (a LoRA on
    a layer already wrapped by LoHa/LoKr) would otherwise escape raw and leave a half-loaded adapter.
    """
    if adapter.layout == "kohya":
        adapter = resolve_kohya(adapter, parts, family)  # names and ranks read against this model's layers
    try:
        for part, spec in adapter.specs.items():
            _load_part(parts[part], spec, adapter, part, name)
    except ModelLoadError:
        delete_adapter(parts, name)
        raise
    except AttributeError as e:
        delete_adapter(parts, name)
        if spec.type in LORA_LAYER_TYPES and has_lycoris(parts):  # peft: "'Conv2d' object has no attribute 'groups'"
            raise ModelLoadError(
                f"{adapter.path.name} is a {adapter_name(spec.type)} and cannot be added on top of the LoHa/LoKr "
                f"adapters already loaded in this model ({', '.join(adapter_names(parts))}): peft cannot put a LoRA "
                "or DoRA on a layer that already has a LoHa or LoKr. Load the LoRA / DoRA files first, then the "
                "LoHa/LoKr ones.") from e
        raise
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # e.g. "size mismatch for ...lora_A..."
        delete_adapter(parts, name)
        detail = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip().rstrip(".")[:200]
        raise ModelLoadError(f"{adapter.path.name} does not fit this base model's {part}: it was made for a model "
                             f"with other layer sizes or layers ({detail}).") from e


def load_all(parts: Parts, files: Mapping[str, AdapterFile], family: Family | None = None) -> None:
    """Load each file under its name (all or nothing), the LoRA / DoRA files first: peft cannot put a LoRA on a
    layer that already holds a LoHa/LoKr, while a LoHa/LoKr wraps a LoRA layer fine."""
    loaded = []
    try:
        for name, adapter in sorted(files.items(), key=lambda item: item[1].type not in LORA_LAYER_TYPES):
            load_into(parts, adapter, name, family)
            loaded.append(name)
    except Exception:
        for name in loaded:
            delete_adapter(parts, name)
        raise


def has_lycoris(parts: Parts) -> bool:
    """Whether any layer is wrapped by LoHa/LoKr (even with its adapters deleted): no LoRA can be added there."""
    return any(isinstance(layer, LycorisLayer) for module in parts.values() for layer in tuner_layers(module))


def _load_part(module: torch.nn.Module, spec: AdapterSpec, adapter: AdapterFile, part: str, name: str) -> None:
    inject(module, spec, name)
    result = set_peft_model_state_dict(module, adapter.part_state(part), adapter_name=name)
    suffix = f".{COLUMN_SCALE}"
    for key, scale in adapter.tensors.items():  # imported DoRA lengths per input column
        if key.startswith(f"{part}.") and key.endswith(suffix):
            layer = module.get_submodule(key[len(part) + 1: -len(suffix)])
            layer.lora_variant[name] = ColumnDora(scale.to(layer.lora_A[name].weight.device))
    # the adapter name must match a whole key component, as in `inject`: a substring test would count base keys
    # such as "...attentions.0.norm.weight" as missing for an adapter called "a"
    missing = [k for k in result.missing_keys if f".{name}." in f".{k}."]
    if result.unexpected_keys or missing:
        bad = (result.unexpected_keys or missing)[:3]
        raise ModelLoadError(f"{adapter.path.name} does not fit this base model's {part} (for example {bad}).")
    module.requires_grad_(False)


def tuner_layers(module: torch.nn.Module):
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_off(parts: Parts):
    """Within: the model as if it had no adapter (every tuner layer passes its input to the base layer alone);
    after: as before, which parameters train included (peft's switch also changes `requires_grad`)."""
    layers = [layer for module in parts.values() for layer in tuner_layers(module)]
    trains = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in trains.items():
            p.requires_grad_(flag)


@contextlib.contextmanager
def scaled(parts: Parts, name: str, weight: float):
    """Within: adapter `name` at `weight` times its trained strength (a training run's own adapter, drawn at a
    strength while paused); after: at 1.0 again, every parameter's trainable flag as before."""
    layers = [layer for module in parts.values() for layer in tuner_layers(module)]
    trains = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        set_strength(layer, name, weight)
    try:
        yield
    finally:
        for layer in layers:
            set_strength(layer, name, 1.0)
        for p, flag in trains.items():
            p.requires_grad_(flag)


def delete_adapter(parts: Parts, name: str) -> None:
    """Remove adapter `name` from every layer that has it (the base weights are untouched)."""
    for module in parts.values():
        # peft skips modules whose name holds `prefix` (the insides of its adapter containers); no layer of ours has it
        peft_delete_adapter(module, name, prefix="lora_")


def set_weights(parts: Parts, weights: dict[str, float]) -> None:
    """Activate exactly the adapters in `weights`, each scaled by its weight (1.0 = as trained), all frozen.

    Works across LoRA, DoRA, LoHa and LoKr at once: every peft tuner layer skips an active name it does not hold,
    and `set_scale` ignores one.
    """
    for module in parts.values():
        set_adapter(module, list(weights), inference_mode=True)
        for layer in tuner_layers(module):
            for name, weight in weights.items():
                set_strength(layer, name, weight)


def adapter_names(parts: Parts) -> list[str]:
    names: set[str] = set()
    for module in parts.values():
        for layer in tuner_layers(module):
            names.update(layer.scaling)
    return sorted(names)


def remove_all(parts: Parts) -> None:
    """Take every adapter out of the model: each wrapped layer is replaced by its original module.

    The base weights are never touched, so this restores the plain base model without reloading it. Needed
    because peft cannot add a LoRA on a layer that holds a LoHa/LoKr (even a deleted one): to add a LoRA to
    such a model, remove all, then load the LoRAs first and the LoHa/LoKr after (core/playground.py does).
    """
    for module in parts.values():
        outer: list[str] = []
        for name, m in module.named_modules():  # pre-order: a wrapper comes before the layers inside it
            if isinstance(m, BaseTunerLayer) and not (outer and name.startswith(outer[-1] + ".")):
                outer.append(name)
        for name in outer:
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, getattr(parent, child).get_base_layer())
        if hasattr(module, "peft_config"):
            del module.peft_config
