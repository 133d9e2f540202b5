"""The form: which UI field sets which config key, and the conversions both ways.

Every settings field of every tab is named here once. Handlers receive the fields as keyword arguments
(`inputs_kwargs`), so the same names are the API parameter names (`client.predict(max_steps=4, ...)`).
The widgets take their limits, choices and help from the config fields (`widget`), and the values they send
are checked here and by the config, whose messages name the key.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import gradio as gr
import yaml

from core.config import CONFIG_VERSION, Config, list_presets, load_config, user_presets_dir
from core.datasets import check_name, dataset_dir
from core.errors import ConfigError, UserError
from core.fileio import write_text

OTHER = "other"  # the base-model picker's "other model" choice
BASE_CHOICES = [
    ("demo: the small built-in model (default)", "demo"),
    ("tiny: random weights, for testing only", "tiny"),
    ("tiny-sdxl: random SDXL-shaped weights, for testing only", "tiny-sdxl"),
    ("tiny-flux: random FLUX.1-shaped weights, for testing only", "tiny-flux"),
    ("Other: a Hugging Face id, a model folder or a .safetensors file", OTHER),
]
DEFAULT_PRESET = "demo-lora"


@dataclass(frozen=True)
class Field:
    name: str  # keyword / API parameter name
    key: str  # config key, section.name
    kind: str = "plain"  # plain, int, float, opt_int / opt_float (0 = unset), off_float (0 = off), lines, list


FIELDS = [Field(*f) for f in [
    # Dataset tab
    ("instance_prompt", "data.instance_prompt"), ("resolution", "data.resolution", "int"),
    ("bucketing", "data.bucketing"),
    # Class images tab
    ("class_prompt", "data.class_prompt"), ("num_class_images", "data.num_class_images", "int"),
    ("class_steps", "data.class_steps", "int"), ("class_guidance", "data.class_guidance", "float"),
    ("class_seed", "data.class_seed", "int"), ("class_batch_size", "data.class_batch_size", "int"),
    ("class_negative_prompt", "data.class_negative_prompt"),
    # Train tab
    ("adapter_type", "adapter.type"), ("rank", "adapter.rank", "int"), ("alpha", "adapter.alpha", "float"),
    ("train_text_encoder", "adapter.train_text_encoder"), ("max_steps", "train.max_steps", "int"),
    ("learning_rate", "train.learning_rate", "float"), ("batch_size", "train.batch_size", "int"),
    ("prior_preservation", "train.prior_preservation"), ("prior_loss_weight", "train.prior_loss_weight", "float"),
    ("run_name", "output.name"),
    # Train tab, advanced
    ("repeats", "data.repeats", "int"), ("center_crop", "data.center_crop"), ("random_flip", "data.random_flip"),
    ("bucket_step", "data.bucket_step", "int"), ("bucket_min_side", "data.bucket_min_side", "int"),
    ("bucket_max_side", "data.bucket_max_side", "int"), ("bucket_no_upscale", "data.bucket_no_upscale"),
    ("text_encoder_learning_rate", "train.text_encoder_learning_rate", "opt_float"),
    ("text_encoder_rank", "adapter.text_encoder_rank", "opt_int"),
    ("text_encoder_alpha", "adapter.text_encoder_alpha", "opt_float"),
    ("dropout", "adapter.dropout", "float"), ("module_dropout", "adapter.module_dropout", "float"),
    ("lr_scheduler", "train.lr_scheduler"), ("lr_warmup_steps", "train.lr_warmup_steps", "int"),
    ("mixed_precision", "train.mixed_precision"), ("optimizer", "train.optimizer"),
    ("gradient_checkpointing", "train.gradient_checkpointing"),
    ("gradient_accumulation_steps", "train.gradient_accumulation_steps", "int"),
    ("max_grad_norm", "train.max_grad_norm", "float"), ("min_snr_gamma", "train.min_snr_gamma", "off_float"),
    ("noise_offset", "train.noise_offset", "float"), ("ema_decay", "train.ema_decay", "float"),
    ("seed", "train.seed", "int"),
    ("sample_every", "train.sample_every", "int"), ("sample_prompts", "train.sample_prompts", "lines"),
    ("sample_steps", "train.sample_steps", "int"), ("sample_guidance", "train.sample_guidance", "float"),
    ("compare_at_end", "train.compare_at_end"),
    ("checkpoint_every", "train.checkpoint_every", "int"), ("unet_targets", "adapter.unet_targets", "list"),
    ("text_encoder_targets", "adapter.text_encoder_targets", "list"),
    ("blocks", "adapter.blocks"), ("decompose_both", "adapter.decompose_both"), ("decompose_factor", "adapter.decompose_factor", "int"),
    ("use_effective_conv2d", "adapter.use_effective_conv2d"), ("cache_latents", "train.cache_latents"),
    ("prediction_type", "model.prediction_type"), ("zero_terminal_snr", "model.zero_terminal_snr"),
    ("vae", "model.vae"), ("text_encoder", "model.text_encoder"), ("text_encoder_2", "model.text_encoder_2"),
    ("quantize", "model.quantize"),
    ("offload_frozen", "train.offload_frozen"),
    ("timestep_sampling", "train.timestep_sampling"), ("logit_mean", "train.logit_mean", "float"),
    ("logit_std", "train.logit_std", "float"), ("mode_scale", "train.mode_scale", "float"),
    ("flow_shift", "train.flow_shift"), ("flow_shift_value", "train.flow_shift_value", "float"),
    ("flow_loss_weighting", "train.flow_loss_weighting"), ("guidance_scale", "train.guidance_scale", "float"),
]]
BY_NAME = {f.name: f for f in FIELDS}
# Every name whose value ends up in a config: the fields and the base-model picker.
SETTINGS = set(BY_NAME) | {"base_choice", "base_other"}
NUMBER_KINDS = ("int", "float", "opt_int", "opt_float", "off_float")
UNSET_KINDS = ("opt_int", "opt_float", "off_float")  # 0 (or empty) in the form: None in the config
# Settings that belong to one dataset, not to a way of training: presets neither set nor save them.
DATASET_KEYS = {"data.instance_dir", "data.instance_prompt", "data.class_prompt", "data.class_dir", "output.name",
                "output.dir"}


def _label(f: Field) -> str:
    return f"`{f.key}`"


def to_config_value(f: Field, value: Any) -> Any:
    """A form value as the config wants it; a plain-words error naming the key for a value that is no number."""
    if f.kind in NUMBER_KINDS:
        return to_number(f, value)
    if f.kind == "lines":
        return [line.strip() for line in (value or "").splitlines() if line.strip()]
    if f.kind == "list":
        return [v.strip() for v in (value or "").replace("\n", ",").split(",") if v.strip()]
    return "" if value is None else value


def to_number(f: Field, value: Any) -> int | float | None:
    """A number field's value: checked for what a number box can hold (the config checks the range)."""
    if value is None or value == "":
        if f.kind in UNSET_KINDS:
            return None
        raise ConfigError(f"{_label(f)} is empty: enter a number.")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{_label(f)} must be a number, got {value!r}.")
    if f.kind in UNSET_KINDS and value == 0:
        return None
    if f.kind.endswith("int"):
        if value != int(value):
            raise ConfigError(f"{_label(f)} must be a whole number, got {value:g}.")
        return int(value)
    return float(value)


def to_form_value(f: Field, value: Any) -> Any:
    if f.kind == "lines":
        return "\n".join(value or [])
    if f.kind == "list":
        return ", ".join(value or [])
    if f.kind in ("opt_int", "opt_float", "off_float") and value is None:
        return 0
    return value


def get_key(d: dict, key: str) -> Any:
    for part in key.split("."):
        d = d[part]
    return d


def set_key(d: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def base_spec(choice: str, other: str) -> str:
    if choice != OTHER:
        offered = [value for _, value in BASE_CHOICES]
        if choice and choice not in offered:
            raise ConfigError(f"`model.base` must be one of {', '.join(offered)}; got {choice!r}.")
        return choice or "demo"
    spec = (other or "").strip()
    if not spec:
        raise UserError("Enter the other base model: a Hugging Face id (org/name), a diffusers folder or a "
                        ".safetensors checkpoint file.")
    return spec


def picker_values(spec: str) -> tuple[str, str]:
    """A config's model.base as the picker's (choice, other text)."""
    listed = {value for _, value in BASE_CHOICES} - {OTHER}
    return (spec, "") if spec in listed else (OTHER, spec)


def form_dict(values: dict[str, Any], workspace: Path, dataset: str | None = None, allow_pickle: bool = False) -> dict:
    """The nested config dict of the given form values (only the fields present)."""
    d: dict = {"output": {"dir": str(workspace / "runs")}}
    if allow_pickle:
        set_key(d, "model.allow_pickle", True)
    for name, value in values.items():
        if name in BY_NAME:
            set_key(d, BY_NAME[name].key, to_config_value(BY_NAME[name], value))
    if "base_choice" in values:
        set_key(d, "model.base", base_spec(values["base_choice"], values.get("base_other", "")))
    if dataset is not None:
        set_key(d, "data.instance_dir", str(dataset_dir(workspace, dataset)))
    return d


def form_config(values: dict[str, Any], workspace: Path, dataset: str | None = None, allow_pickle: bool = False) -> Config:
    return Config.from_dict(form_dict(values, workspace, dataset, allow_pickle))


def form_values(cfg: dict, names=None, skip_dataset_keys: bool = False) -> dict[str, Any]:
    """Form values for a full config dict: {field name: value} (and the base-model picker)."""
    out = {}
    for f in FIELDS:
        if (names is None or f.name in names) and not (skip_dataset_keys and f.key in DATASET_KEYS):
            out[f.name] = to_form_value(f, get_key(cfg, f.key))
    out["base_choice"], out["base_other"] = picker_values(cfg["model"]["base"])
    return out


# --------------------------------------------------------------------------- widgets

def config_field(key: str) -> tuple[Any, Mapping[str, Any]]:
    """The type and the metadata (range, help) of the config field `section.name`."""
    section, name = key.split(".")
    cls = typing.get_type_hints(Config)[section]
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    return typing.get_type_hints(cls)[name], meta


def help_text(f: Field, meta: Mapping[str, Any]) -> str | None:
    help, unset = meta.get("help", ""), meta.get("unset", "")
    if unset and f.kind in UNSET_KINDS:  # the form writes 0 for "unset"
        return f"0: {unset}; {help}" if help else f"0: {unset}."
    return help or None


# config key -> the label of its field in the app (filled as the widgets are built), so that messages name the field
# a user sees; the key follows it.
LABELS: dict[str, str] = {"model.base": "Base model", "data.instance_dir": "Dataset"}
_KEY = re.compile(r"`([a-z_]+\.[a-z0-9_]+)`|\(([a-z_]+\.[a-z0-9_]+)\)")


def in_field_names(message: str) -> str:
    """A message for the app: "`train.learning_rate` must be positive" -> "Learning rate (`train.learning_rate`)
    must be positive"; keys without a field in the app stay as they are."""
    def named(m: re.Match) -> str:
        key = m.group(1) or m.group(2)
        if key not in LABELS:
            return m.group(0)
        return f"{LABELS[key]} (`{key}`)" if m.group(1) else f"({LABELS[key]}: `{key}`)"

    return _KEY.sub(named, message)


def widget(name: str, initial: dict[str, Any], component: type | None = None, **kwargs) -> gr.components.Component:
    """The field `name` as a Gradio widget holding `initial[name]`, with the range, choices and help of its config
    field; `kwargs` (label, layout, a choice's display names) are added and win."""
    f = BY_NAME[name]
    tp, meta = config_field(f.key)
    options: dict[str, Any] = {"info": help_text(f, meta)}
    if f.kind in NUMBER_KINDS:
        component = component or gr.Number
        options |= {"minimum": meta.get("min", meta.get("above")), "maximum": meta.get("max"),
                    "step": meta.get("step", 1), "precision": 0 if f.kind.endswith("int") else None}
    elif tp is bool:
        component = component or gr.Checkbox
    elif typing.get_origin(tp) is Literal:
        component = component or gr.Dropdown
        options["choices"] = list(typing.get_args(tp))
    else:
        component = component or gr.Textbox
    if kwargs.get("label"):  # "Run name (optional)" -> "Run name"
        LABELS[f.key] = re.sub(r"\s*\(.*\)$", "", kwargs["label"])
    return component(value=initial[name], **(options | kwargs))


# --------------------------------------------------------------------------- presets

def preset_names(workspace: Path) -> list[str]:
    """The Presets list: the built-in ones, then the user's own."""
    return list_presets(workspace)


def preset_config(workspace: Path, name: str) -> dict:
    """Defaults with the preset merged in, checked, resolved as the command line's --preset is."""
    if not name:
        raise UserError("Choose a preset first.")
    return load_config(preset=name, workspace=workspace).to_dict()


def initial_config() -> dict:
    """The form's starting values: the demo preset over the defaults (the defaults alone if it is missing)."""
    try:
        return preset_config(Path("."), DEFAULT_PRESET) if DEFAULT_PRESET in list_presets() else Config().to_dict()
    except UserError:
        return Config().to_dict()


def sparse(d: dict, defaults: dict, prefix: str = "") -> dict:
    """Only the settings of `d` that differ from `defaults`, leaving out the dataset-specific ones."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            sub = sparse(v, defaults.get(k, {}), key + ".")
            if sub:
                out[k] = sub
        elif key not in DATASET_KEYS and key != "version" and v != defaults.get(k):
            out[k] = v
    return out


def save_preset(workspace: Path, name: str, cfg: Config) -> Path:
    name = check_name(name, "preset")
    if name in list_presets():
        raise UserError(f"{name!r} is a built-in preset; choose another name for yours.")
    body = {"version": CONFIG_VERSION, **sparse(cfg.to_dict(), Config().to_dict())}
    path = user_presets_dir(workspace) / f"{name}.yaml"
    text = (f"# A preset saved from the app (listed under Presets on the Train tab).\n"
            f"# Command line: ./launch.sh train --config {path} --set data.instance_dir=... (and the prompts)\n"
            + yaml.safe_dump(body, sort_keys=False))
    return write_text(path, text)
