"""LoRA, LoHa and LoKr adapters through peft: build, inject, save, load and weight.

An adapter file is one `.safetensors` holding peft-named weights under the prefixes `unet.` and
`text_encoder.`, with metadata (all strings) describing each part's adapter and the training.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open

from .config import Config
from .errors import ModelLoadError
from .fileio import save_safetensors

FORMAT_TAG = "dreambooth-peft"
FORMAT_VERSION = "1"
PARTS = ("unet", "text_encoder")


@dataclass
class AdapterSpec:
    """What peft needs to rebuild one part's adapter (dropouts only matter in training)."""

    type: str
    rank: int
    alpha: float
    targets: list[str]
    dropout: float = 0.0
    module_dropout: float = 0.0
    decompose_both: bool = False
    decompose_factor: int = -1
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)  # per-module ranks/alphas (imported files)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def peft_config(self):
        common = dict(r=self.rank, target_modules=list(self.targets), rank_pattern=dict(self.rank_pattern),
                      alpha_pattern=dict(self.alpha_pattern))
        if self.type == "lora":
            return LoraConfig(lora_alpha=self.alpha, lora_dropout=self.dropout, **common)
        lycoris = dict(alpha=self.alpha, rank_dropout=self.dropout, module_dropout=self.module_dropout,
                       use_effective_conv2d=self.use_effective_conv2d, **common)
        if self.type == "loha":
            return LoHaConfig(**lycoris)
        if self.type == "lokr":
            return LoKrConfig(decompose_both=self.decompose_both, decompose_factor=self.decompose_factor, **lycoris)
        raise ModelLoadError(f"Unknown adapter type {self.type!r}; expected lora, loha or lokr.")


def specs_from_config(cfg: Config) -> dict[str, AdapterSpec]:
    a = cfg.adapter
    shared = dict(type=a.type, dropout=a.dropout, module_dropout=a.module_dropout, decompose_both=a.decompose_both,
                  decompose_factor=a.decompose_factor, use_effective_conv2d=a.use_effective_conv2d)
    specs = {"unet": AdapterSpec(rank=a.rank, alpha=a.alpha, targets=list(a.unet_targets), **shared)}
    if a.train_text_encoder:
        specs["text_encoder"] = AdapterSpec(rank=cfg.text_encoder_rank, alpha=cfg.text_encoder_alpha,
                                            targets=list(a.text_encoder_targets), **shared)
    return specs


def inject(model: torch.nn.Module, spec: AdapterSpec, name: str = "default") -> list[torch.nn.Parameter]:
    """Add adapter `name` to `model` in place; return its parameters (trainable, float32).

    Other parameters keep their trainable flag (peft's injection would otherwise change them).
    """
    before = {pname: p.requires_grad for pname, p in model.named_parameters()}
    try:
        inject_adapter_in_model(spec.peft_config(), model, adapter_name=name)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ModelLoadError(f"The adapter's target modules do not exist in this model: {e}") from None
    params = []
    for pname, p in model.named_parameters():
        if f".{name}." in f".{pname}.":  # e.g. "...to_q.lora_A.default.weight", "...to_q.hada_w1_a.default"
            p.requires_grad_(True)
            p.data = p.data.float()  # adapters train in float32 even when frozen weights are fp16/bf16
            params.append(p)
        else:  # base weights, renamed "<module>.base_layer.weight" by the wrapping, stay as they were
            p.requires_grad_(before.get(pname, before.get(pname.replace(".base_layer.", "."), False)))
    return params


def module_of(base, part: str) -> torch.nn.Module:
    return getattr(base, part)


def inject_all(base, specs: dict[str, AdapterSpec], name: str = "default") -> dict[str, list[torch.nn.Parameter]]:
    return {part: inject(module_of(base, part), spec, name) for part, spec in specs.items()}


def state_dict(base, parts, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter weights of every part, keyed `<part>.<peft key>`, as contiguous CPU float32."""
    out = {}
    for part in parts:
        sd = get_peft_model_state_dict(module_of(base, part), adapter_name=name)
        out.update({f"{part}.{k}": v.detach().float().cpu().contiguous() for k, v in sd.items()})
    return out


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """safetensors save through a temp file in the same folder and an atomic rename."""
    return save_safetensors(tensors, path, metadata)


def training_metadata(cfg: Config, step: int, base_name: str) -> dict[str, Any]:
    """What a user (or another tool) wants to know about how the adapter was made."""
    return {
        "base_model": base_name, "adapter_type": cfg.adapter.type, "rank": cfg.adapter.rank, "alpha": cfg.adapter.alpha,
        "unet_targets": cfg.adapter.unet_targets, "train_text_encoder": cfg.adapter.train_text_encoder,
        "instance_prompt": cfg.data.instance_prompt, "class_prompt": cfg.data.class_prompt, "steps": step,
        "resolution": cfg.data.resolution, "seed": cfg.train.seed, "learning_rate": cfg.train.learning_rate,
        "prior_preservation": cfg.train.prior_preservation, "batch_size": cfg.train.batch_size,
    }


def file_metadata(specs: dict[str, AdapterSpec], info: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata of our adapter files: format tag, each part's spec, then `info` (as strings)."""
    metadata = {"format": FORMAT_TAG, "format_version": FORMAT_VERSION,
                "adapters": json.dumps({part: asdict(s) for part, s in specs.items()})}
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()})
    return metadata


def save_adapter(path, base, specs: dict[str, AdapterSpec], info: dict[str, Any], name: str = "default") -> Path:
    return atomic_save_file(state_dict(base, specs, name), path, file_metadata(specs, info))


@dataclass
class AdapterFile:
    path: Path
    specs: dict[str, AdapterSpec]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = "peft"  # "kohya": a community file whose names are resolved against the base model on load

    @property
    def type(self) -> str:
        if self.layout == "kohya":
            from .formats import kohya_type

            return kohya_type(self)
        return self.main_spec.type

    @property
    def main_spec(self) -> AdapterSpec:
        """The UNet's spec (the text encoder's when a file holds only that): what a one-line summary names."""
        return self.specs.get("unet") or next(iter(self.specs.values()))

    def part_state(self, part: str) -> dict[str, torch.Tensor]:
        prefix = f"{part}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def read_adapter(path: str | Path) -> AdapterFile:
    """Read one of our adapter files; a clear ModelLoadError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"Adapter file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name} is not a .safetensors file; adapters are loaded from .safetensors only.")
    try:  # one open: the metadata first (a foreign file is refused before its tensors are read), then the tensors
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT_TAG:
                from .formats import foreign_adapter

                return foreign_adapter(path, f, metadata)  # kohya / LyCORIS / diffusers files, or a clear error
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path.name} is damaged or not a safetensors file ({e}).") from None
    # Fix (tests/test_adapters.py): a damaged `adapters` entry raised a raw KeyError/JSONDecodeError/TypeError.
    try:
        specs = {part: AdapterSpec(**d) for part, d in json.loads(metadata["adapters"]).items()}
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{path.name} has damaged adapter metadata ({type(e).__name__}: {e}); "
                             "save or export the adapter again.") from None
    return AdapterFile(path, specs, tensors, metadata)


def load_into(base, adapter: AdapterFile, name: str) -> None:
    """Inject `adapter` as `name` into the base model's parts and load its weights (all or nothing)."""
    # Fix (tests/test_adapters.py): every failure, in any part, now removes what was already injected and
    # becomes a ModelLoadError. Before, peft's size-mismatch RuntimeError (an adapter from a differently
    # shaped model) and its AttributeError (a LoRA on a layer already wrapped by LoHa/LoKr) escaped raw and
    # left a half-loaded adapter, and a failing text encoder part left the UNet part loaded.
    if adapter.layout == "kohya":
        from .formats import resolve_kohya

        adapter = resolve_kohya(adapter, base)  # names and ranks read against this base model's layers
    try:
        for part, spec in adapter.specs.items():
            _load_part(module_of(base, part), spec, adapter, part, name)
    except ModelLoadError:
        delete_adapter(base, name)
        raise
    except AttributeError as e:
        delete_adapter(base, name)
        if spec.type == "lora" and _has_lycoris(base):  # peft: "'Conv2d' object has no attribute 'groups'"
            raise ModelLoadError(
                f"{adapter.path.name} is a LoRA and cannot be added on top of the LoHa/LoKr adapters already loaded "
                f"in this model ({', '.join(adapter_names(base))}): peft cannot put a LoRA on a layer that already "
                "has a LoHa or LoKr. Load the LoRA files first, then the LoHa/LoKr ones.") from e
        raise
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # e.g. "size mismatch for ...lora_A..."
        delete_adapter(base, name)
        detail = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip().rstrip(".")[:200]
        raise ModelLoadError(f"{adapter.path.name} does not fit this base model's {part}: it was made for a model "
                             f"with other layer sizes or layers ({detail}).") from e


def _has_lycoris(base) -> bool:
    return any(hasattr(layer, "hada_w1_a") or hasattr(layer, "lokr_w1")
               for part in PARTS for layer in tuner_layers(module_of(base, part)))


def _load_part(module: torch.nn.Module, spec: AdapterSpec, adapter: AdapterFile, part: str, name: str) -> None:
    inject(module, spec, name)
    result = set_peft_model_state_dict(module, adapter.part_state(part), adapter_name=name)
    # Fix: match the adapter name as a whole key component, as `inject` does. The old substring test
    # (`f".{name}" in k`) counted base keys such as "...attentions.0.norm.weight" as missing adapter
    # keys for a name like "a", so a valid file failed to load under a short name.
    missing = [k for k in result.missing_keys if f".{name}." in f".{k}."]
    if result.unexpected_keys or missing:
        bad = (result.unexpected_keys or missing)[:3]
        raise ModelLoadError(f"{adapter.path.name} does not fit this base model's {part} (for example {bad}).")
    module.requires_grad_(False)


def tuner_layers(module: torch.nn.Module):
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def delete_adapter(base, name: str) -> None:
    """Remove adapter `name` from every layer that has it (the base weights are untouched)."""
    for part in PARTS:
        for layer in tuner_layers(module_of(base, part)):
            if name in layer.scaling:
                layer.delete_adapter(name)


def set_weights(base, weights: dict[str, float]) -> None:
    """Activate exactly the adapters in `weights`, each scaled by its weight (1.0 = as trained).

    Works across LoRA, LoHa and LoKr at once: every peft tuner layer has `set_adapter` and `set_scale`.
    peft's `set_adapter` also marks active adapters trainable, so each parameter's flag is restored after.
    """
    names = list(weights)
    for part in PARTS:
        module = module_of(base, part)
        trainable = {p: p.requires_grad for p in module.parameters()}
        for layer in tuner_layers(module):
            present = [n for n in names if n in layer.scaling]
            layer.set_adapter(present)
            for n in present:
                layer.set_scale(n, weights[n])
        for p, flag in trainable.items():
            p.requires_grad_(flag)


def adapter_names(base) -> list[str]:
    names: set[str] = set()
    for part in PARTS:
        for layer in tuner_layers(module_of(base, part)):
            names.update(layer.scaling)
    return sorted(names)


def remove_all(base) -> None:
    """Take every adapter out of the model: each wrapped layer is replaced by its original module.

    The base weights are never touched, so this restores the plain base model without reloading it. Needed
    because peft cannot add a LoRA on a layer that holds a LoHa/LoKr (even a deleted one): to add a LoRA to
    such a model, remove all, then load the LoRAs first and the LoHa/LoKr after (core/playground.py does).
    """
    for part in PARTS:
        module = module_of(base, part)
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
