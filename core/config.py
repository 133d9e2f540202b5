"""One typed configuration tree for the UI, presets, the CLI and tests.

A config is built from a nested dict (a YAML file, a preset, a form) by `Config.from_dict`, which
refuses a config made by a newer app, then unknown keys and wrong types, with a message naming the key.
Presets are sparse YAML files with a `version` field, built in (presets/) or the user's own
(<workspace>/presets/); they are merged over the defaults, then the user's own file and any
`--set key=value` overrides are merged over the preset.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from .errors import ConfigError

CONFIG_VERSION = 1
APP_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = APP_ROOT / "presets"
PRESET_ONLY_KEYS = ("description",)  # what a preset file holds besides settings

# The full UNet target set: attention, feed-forward, resnet convs, up/down sampling convs and time embedding.
UNET_TARGETS_FULL = [
    "to_q", "to_k", "to_v", "to_out.0", "proj", "proj_in", "proj_out",
    "conv", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "ff.net.2",
]
UNET_TARGETS_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "v_proj"]
TEXT_ENCODER_TARGETS_ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


BLOCK_KINDS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}  # FLUX.1's two kinds


def parse_blocks(text: str) -> dict[str, set[int] | None]:
    """`adapter.blocks` -> {kind: indices (None: all of them)}: "double", "single", "double 0-9, single 0-19,25"
    (each kind, then optional indices and ranges); "all" -> both kinds, every block."""
    text = text.strip().lower()
    if text in ("", "all"):
        return dict.fromkeys(BLOCK_KINDS)
    chosen: dict[str, set[int] | None] = {}
    kind = None
    for word in re.split(r"[\s,]+", text):
        if word in BLOCK_KINDS:
            kind = word
            chosen.setdefault(kind, None)
        elif kind is not None and re.fullmatch(r"\d+(-\d+)?", word):
            lo, _, hi = word.partition("-")
            chosen[kind] = (chosen[kind] or set()) | set(range(int(lo), int(hi or lo) + 1))
        elif word:
            raise ConfigError(f"`adapter.blocks` must be all, double, single, or kinds with block numbers such as "
                              f"'double 0-9, single 0-19'; {word!r} is not understood.")
    return chosen


def _setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, help: str = "",
             unset: str = "", **limits: float) -> Any:
    """A field with its metadata, the one source for the checks and for the app's form: the range that
    `Config.validate` enforces and the form's widget offers (`min` / `max` inclusive, `above` exclusive; `step`
    for the widget only), the help shown beside it, and for an optional field what leaving it unset means."""
    return field(default=default, default_factory=factory, metadata={"help": help, "unset": unset, **limits})


@dataclass
class ModelConfig:
    # "demo" (the small model shipped with the app), "tiny" / "tiny-sdxl" / "tiny-flux" (random, for tests), a hub id,
    # a local diffusers folder or a single-file .safetensors checkpoint (SD 1.x, 2.x or SDXL).
    base: str = "demo"
    # "auto" reads it from the model's scheduler; set it for single-file SD 2.x 768 checkpoints ("v_prediction").
    # "sample": the model predicts the clean image (x0), as some fine-tunes do.
    prediction_type: Literal["auto", "epsilon", "v_prediction", "sample"] = "auto"
    revision: str | None = None
    # Refuse pickled .ckpt files unless the user says so; even then they load with weights_only=True.
    allow_pickle: bool = False
    vae: str = _setting("", help="Another VAE instead of the model's own: a diffusers VAE folder, a .safetensors VAE "
                                 "file or a hub id (e.g. the SDXL fp16-fix VAE). Empty: the model's own VAE.")
    # FLUX.1 single files hold only the transformer: its text encoders (the VAE is model.vae), when they are not
    # in the file, beside it, or in ComfyUI's / Forge's model folders next to it
    text_encoder: str = _setting("", help="The CLIP-L of a FLUX.1 transformer file: clip_l.safetensors or a FLUX "
                                          "diffusers folder. Empty: looked for beside the file.")
    text_encoder_2: str = _setting("", help="The T5-XXL of a FLUX.1 transformer file: t5xxl_fp16.safetensors, an "
                                            "fp8 one, or a FLUX diffusers folder. Empty: looked for beside the file.")
    # the denoiser's block layers held in 4-bit NF4 or 8-bit integers while training (core/quantize.py; LoRA only)
    quantize: Literal["none", "nf4", "int8"] = _setting(
        "none", help="FLUX.1 on a 16-24 GB card: the frozen transformer in 8-bit (int8) or 4-bit (nf4) weights; "
                     "LoRA only (bitsandbytes).")
    zero_terminal_snr: bool = _setting(
        False, help="For models trained with zero terminal SNR (e.g. NoobAI-XL v-pred): the noise schedule reaches "
                    "pure noise. On by itself when the model's file says so.")


@dataclass
class DataConfig:
    instance_dir: str = ""
    # Used for images without a caption file; must contain the identifier, e.g. "a photo of sks dog".
    instance_prompt: str = _setting("", help="Used for every image without its own caption.")
    caption_extension: str = ".txt"
    class_dir: str = ""
    class_prompt: str = ""
    num_class_images: int = _setting(100, min=0, help="100-200 for real photos.")
    resolution: int = _setting(512, min=8, step=8, help="Demo model: 64. SD 1.x: 512. SD 2.x 768-v: 768. SDXL: 1024.")
    center_crop: bool = True
    random_flip: bool = False
    # Aspect-ratio buckets (core/buckets.py): each image trains in the shape nearest its own, at about the pixel
    # area of resolution x resolution; off: every image is cropped to a resolution x resolution square.
    bucketing: bool = _setting(True, help="Photos keep their shape (portrait, landscape); off: square crops.")
    bucket_step: int = _setting(64, min=8, step=8, help="Bucket sides are multiples of this; 64 for SD / SDXL.")
    bucket_min_side: int = _setting(0, min=0, step=8, help="0: half the resolution.")
    bucket_max_side: int = _setting(0, min=0, step=8, help="0: twice the resolution.")
    bucket_no_upscale: bool = _setting(False, help="Small images train at their own size instead of being enlarged.")
    repeats: int = _setting(1, min=1)
    min_image_size: int = 64  # smaller images are rejected (the shorter side, in pixels)
    # Class-image generation with the base model (prior preservation).
    class_steps: int = _setting(30, min=1)
    class_guidance: float = _setting(7.5, min=0, step=0.5)
    class_seed: int = _setting(0, help="Image i uses seed + i: stopping and continuing gives the same set.")
    class_batch_size: int = _setting(4, min=1)
    class_negative_prompt: str = ""


ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}  # how each adapter type is written for people


# DoRA is peft's LoRA that also learns each output's length (LoraConfig(use_dora=True)): both live in peft's LoRA
# layers, so what holds for a LoRA layer (load order, quantized weights) holds for a DoRA one
LORA_LAYER_TYPES = ("lora", "dora")


def adapter_name(kind: str) -> str:
    """`loha` -> `LoHa`: the one spelling of an adapter type in messages, labels and file descriptions."""
    return ADAPTER_NAMES.get(kind, kind)


@dataclass
class AdapterConfig:
    type: Literal["lora", "dora", "loha", "lokr"] = _setting(
        "lora", help="LoRA: the standard. DoRA: LoRA that also learns each output's length (often better "
                     "likeness; slower steps). LoHa / LoKr: more expressive per parameter.")
    rank: int = _setting(8, min=1, help="Size of the adapter; 4-32.")
    alpha: float = _setting(8.0, min=0, help="Strength scale; usually = rank.")
    # LoRA dropout; for LoHa/LoKr the rank dropout
    dropout: float = _setting(0.0, min=0, max=0.99, step=0.05)
    module_dropout: float = _setting(0.0, min=0, max=0.99, step=0.05)  # LoHa/LoKr only
    unet_targets: list[str] = _setting(
        factory=lambda: list(UNET_TARGETS_FULL),
        help=f"Attention only: {', '.join(UNET_TARGETS_ATTENTION)}. Full set: {', '.join(UNET_TARGETS_FULL)}. "
             "FLUX.1 (a transformer): the full set means its own list (attn.to_q, attn.add_q_proj, ff.net.2 ...).")
    # FLUX.1: which transformer blocks get adapters (core/adapters.py, parse_blocks), as kohya's train_blocks
    blocks: str = _setting("all", help="FLUX.1: all, double, single, or block numbers such as "
                                       "'double 0-9, single 0-19'.")
    # LoKr: also factorize the small matrix; the split factor (-1 = as square as possible).
    decompose_both: bool = False
    decompose_factor: int = _setting(-1, help="-1: as square as possible.")
    # LoHa/LoKr: Tucker-style decomposition of 3x3 convolutions.
    use_effective_conv2d: bool = False
    train_text_encoder: bool = _setting(False, help="Better likeness, larger file.")
    text_encoder_targets: list[str] = _setting(factory=lambda: list(TEXT_ENCODER_TARGETS),
                                               help=f"Choices: {', '.join(TEXT_ENCODER_TARGETS_ALL)}.")
    # None: same as rank / alpha. "above" (not min=1) for the rank: the form writes 0 for unset, so its box must offer 0.
    text_encoder_rank: int | None = _setting(None, above=0, unset="same as rank")
    text_encoder_alpha: float | None = _setting(None, min=0, unset="same as alpha")


@dataclass
class TrainConfig:
    max_steps: int = _setting(800, min=1)
    learning_rate: float = _setting(1e-4, above=0, step=1e-5)
    # None: same as learning_rate; a rate of 0 would train nothing, so like learning_rate it must be positive
    text_encoder_learning_rate: float | None = _setting(None, above=0, step=1e-5, unset="same as the UNet")
    # instance images per step (plus as many class images with prior preservation)
    batch_size: int = _setting(1, min=1)
    gradient_accumulation_steps: int = _setting(1, min=1)
    prior_preservation: bool = True
    prior_loss_weight: float = _setting(1.0, min=0, step=0.1)
    # auto: fp16 on CUDA, no on CPU
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = _setting("auto", help="auto: fp16 on an NVIDIA GPU (FLUX.1: bf16).")
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = _setting(0, min=0)
    max_grad_norm: float = _setting(1.0, min=0)
    # The samples and the saved adapter are an average of the last steps' weights (core/ema.py); 0 turns it off
    ema_decay: float = _setting(0.0, min=0, max=0.9999, step=0.01,
                                help="0: off. 0.98: samples and files hold the average of about the last 50 steps.")
    gradient_checkpointing: bool = False
    min_snr_gamma: float | None = _setting(None, min=0, unset="off", help="5 is usual.")  # e.g. 5.0; None turns it off
    noise_offset: float = _setting(0.0, min=0, step=0.01)
    # Flow-matching models (FLUX.1): how the noise level (sigma) of each training image is drawn and weighed; the
    # defaults are the diffusers FLUX DreamBooth script's.
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = _setting(
        "uniform", help="FLUX: how training noise levels are drawn (SD3's densities).")
    logit_mean: float = 0.0  # logit_normal: the mean and spread of the normal whose sigmoid is sigma
    logit_std: float = _setting(1.0, above=0)
    mode_scale: float = 1.29  # mode: how much the density leans to the middle noise levels
    flow_shift: Literal["none", "fixed", "resolution"] = _setting(
        "none", help="FLUX: shift noise levels towards noise: by flow_shift_value, or by image size as its sampler.")
    flow_shift_value: float = _setting(3.0, above=0)
    flow_loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    # FLUX.1-dev embeds the guidance scale it is told; training tells it 1.0 (kohya's advice), samples their own
    guidance_scale: float = _setting(1.0, min=0, help="FLUX.1-dev: the distilled guidance while training.")
    cache_latents: bool = True
    cache_text_embeddings: bool = True  # only when the text encoder is not trained
    offload_frozen: bool = _setting(True, help="Keep the VAE and frozen text encoders in main memory while training "
                                    "when their outputs are cached: less GPU memory, samples take a little longer.")
    seed: int = 42
    # 0 turns samples off (the step-0 baseline is taken whenever samples are on)
    sample_every: int = _setting(100, min=0, help="0: no samples.")
    # empty: the instance prompt and the class prompt
    sample_prompts: list[str] = _setting(factory=list, help="Empty: the instance prompt and the class prompt.")
    sample_seed: int = 1234
    sample_steps: int = _setting(25, min=1)
    sample_guidance: float = _setting(7.5, min=0)
    compare_at_end: bool = _setting(True, help="When the run finishes: the instance and class prompts with the "
                                    "adapter off and on (same seeds as the samples).")
    checkpoint_every: int = _setting(200, min=0, help="0: only at the end and on stop.")
    keep_checkpoints: int = 2


@dataclass
class OutputConfig:
    dir: str = "workspace/runs"
    name: str = ""  # run folder name; empty: "<adapter>-<date>-<time>"


@dataclass
class Config:
    version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Config":
        check_version(d, "This config")
        cfg = _build(cls, d or {}, "")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        """Check values that types alone cannot; each message names the key."""
        for key, value, meta in self._fields():
            problem = range_problem(value, meta)
            if problem:
                raise ConfigError(f"`{key}` {problem}, got {value}.")
        if self.data.bucket_step % 8:
            raise ConfigError(f"`data.bucket_step` must be a multiple of 8, got {self.data.bucket_step}.")
        if self.data.bucket_max_side and self.data.bucket_max_side < self.data.bucket_min_side:
            raise ConfigError("`data.bucket_max_side` must not be smaller than `data.bucket_min_side`.")
        if self.data.resolution % 8:
            raise ConfigError(f"`data.resolution` must be a multiple of 8 (the VAE works on 8x8 blocks), got {self.data.resolution}.")
        if not self.adapter.unet_targets:
            raise ConfigError("`adapter.unet_targets` is empty: name at least one UNet module type, e.g. to_q.")
        name = self.output.name  # a run name such as "../x" would put the run outside the workspace
        if name in (".", "..") or any(c in name for c in "/\\\0"):
            raise ConfigError(f"`output.name` must be a plain folder name (no / or \\, not . or ..), got {name!r}.")
        parse_blocks(self.adapter.blocks)
        if self.adapter.train_text_encoder and not self.adapter.text_encoder_targets:
            raise ConfigError("`adapter.text_encoder_targets` is empty while `adapter.train_text_encoder` is on.")
        check_version(vars(self), "This config")

    def _fields(self):
        """(section.name, value, metadata) of every setting."""
        for section in dataclasses.fields(self):
            part = getattr(self, section.name)
            if dataclasses.is_dataclass(part):
                for f in dataclasses.fields(part):
                    yield f"{section.name}.{f.name}", getattr(part, f.name), f.metadata

    # Derived values, so every caller agrees on them.
    @property
    def text_encoder_rank(self) -> int:
        return self.adapter.text_encoder_rank or self.adapter.rank

    @property
    def text_encoder_alpha(self) -> float:
        return self.adapter.text_encoder_alpha if self.adapter.text_encoder_alpha is not None else self.adapter.alpha

    @property
    def text_encoder_learning_rate(self) -> float:
        lr = self.train.text_encoder_learning_rate
        return lr if lr is not None else self.train.learning_rate


def range_problem(value: Any, meta: Mapping[str, Any]) -> str | None:
    """What is wrong with a number outside the range in a field's metadata ("must be at least 1"); None if fine."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # unset, or not a number: the type check says so
    low, high, above = meta.get("min"), meta.get("max"), meta.get("above")
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            return f"must be between {low:g} and {high:g}"
        return "must not be negative" if low == 0 else (f"must be at least {low:g}" if low is not None
                                                         else f"must be at most {high:g}")
    if above is not None and value <= above:
        return "must be positive" if above == 0 else f"must be more than {above:g}"
    return None


def check_version(d: Any, source: str) -> None:
    """Refuse the settings `d` when a newer version of the app wrote them, before their keys are read: the
    settings it added would otherwise be refused as unknown, as if mistyped. (Version 1 is the first, so
    there is no older version to migrate.) `source` names the file in the message."""
    version = d.get("version") if isinstance(d, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > CONFIG_VERSION:
        raise ConfigError(f"{source} has version {version}: it was made by a newer version of this app (this one "
                          f"reads version {CONFIG_VERSION}). Update the app to use it.")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int where float is expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"`{key}` has the wrong type: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"`{key}` must be one of {', '.join(map(str, choices))}; got {value!r}.")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{key}` must be a list, got {value!r}.")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, key) for v in value]
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as text; accept it as the number it clearly is
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"`{key}` must be true or false, got {value!r}.")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool) and tp is not bool):
        raise ConfigError(f"`{key}` must be {'a number' if tp in (int, float) else 'text'}"
                          f"{' (a whole number)' if tp is int else ''}, got {value!r}.")
    return value


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"`{prefix.rstrip('.') or 'config'}` must be a mapping of settings, got {d!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"Unknown setting `{prefix}{unknown[0]}`. Known settings here: {', '.join(sorted(names))}.")
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _convert(tp, value, f"{prefix}{name}")
    return cls(**kwargs)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `over` merged in; nested dicts merge, everything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`train.max_steps=400` -> {"train": {"max_steps": 400}}; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"Override {text!r} must look like section.key=value, e.g. train.max_steps=400.")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if raw.strip().lower() in ("null", "none", "~"):
        value = None  # "unset", e.g. train.min_snr_gamma=None
    elif value is None or (isinstance(value, dict) and not raw.strip().startswith("{")):
        value = raw  # plain text such as a prompt with "style: anime" in it
    for part in reversed(parts):
        value = {part: value}
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings (section: key: value).")
    return data


def read_settings(path: str | Path) -> dict[str, Any]:
    """A config or preset file's settings, refused first if a newer version of the app wrote it."""
    data = read_yaml(path)
    check_version(data, str(path))
    return data


def user_presets_dir(workspace: str | Path) -> Path:
    return Path(workspace) / "presets"


def list_presets(workspace: str | Path | None = None) -> list[str]:
    """The built-in presets, then the user's own in `workspace` (a built-in name wins)."""
    built_in = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    if workspace is None:
        return built_in
    user = sorted(p.stem for p in user_presets_dir(workspace).glob("*.yaml"))
    return built_in + [n for n in user if n not in built_in]


def preset_path(name: str, workspace: str | Path | None = None) -> Path:
    """The file of preset `name`: built in, else the user's own in `workspace`."""
    names = list_presets(workspace)
    if name not in names:
        raise ConfigError(f"No preset named {name!r}. Presets: {', '.join(names)}.")
    built_in = PRESETS_DIR / f"{name}.yaml"
    return built_in if built_in.is_file() else user_presets_dir(workspace) / f"{name}.yaml"


def preset_dict(name: str, workspace: str | Path | None = None) -> dict[str, Any]:
    """The settings of preset `name` (see preset_path), without its description."""
    data = read_settings(preset_path(name, workspace))
    return {k: v for k, v in data.items() if k not in PRESET_ONLY_KEYS}


def preset_description(name: str, workspace: str | Path | None = None) -> str:
    """The one-line description preset `name` gives of itself ("" when it has none, e.g. a preset the user saved)."""
    return str(read_settings(preset_path(name, workspace)).get("description") or "").strip()


def load_config(path: str | Path | None = None, overrides: list[str] = (), preset: str | None = None,
                workspace: str | Path | None = None, settings: dict[str, Any] | None = None) -> Config:
    """Defaults <- preset (the file's own `preset:` key or the argument) <- file <- `settings` <- overrides.

    Presets are the built-in ones and, with `workspace`, the user's own; the GUI and the CLI both load them here.
    `settings` is a nested dict from the command line's own flags (e.g. --workspace), below `--set`.
    """
    data = read_settings(path) if path else {}
    preset = data.pop("preset", None) or preset
    merged = preset_dict(preset, workspace) if preset else {}
    merged = deep_merge(merged, data)
    merged = deep_merge(merged, settings or {})
    for text in overrides:
        merged = deep_merge(merged, parse_override(text))
    return Config.from_dict(merged)


def resolve_path(path: str) -> Path:
    """A user path; a relative one that is not found here but is inside the app (e.g. the demo subject
    `core/assets/demo_subject` named by the demo presets) is taken from the app folder."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (APP_ROOT / p).exists():
        return APP_ROOT / p
    return p
