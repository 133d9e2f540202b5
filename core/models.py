"""Base model loading: the parts of a Stable Diffusion 1.x / 2.x pipeline.

`load_base_model(spec)` accepts:
- "tiny": a tiny random model built in code (tests, smoke runs);
- "demo": the small demo model shipped in core/assets/demo_model (when installed);
- a local diffusers folder (holds model_index.json);
- a single-file checkpoint in the original Stable Diffusion layout: `.safetensors`, or a pickled
  `.ckpt` / `.pt` / `.pth` / `.bin` only with `allow_pickle=True`. Loading is offline: files we wrote
  carry their diffusers configs in the metadata, other files use the configs in core/assets/model_configs;
- a hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5": the local Hugging Face cache first,
  then a download through that cache unless HF_HUB_OFFLINE=1.
Every failure the user can fix is a ModelLoadError in plain words.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import ldm_convert as ldm
from .errors import ModelLoadError

log = logging.getLogger(__name__)


class _EmptyFp32ListFilter(logging.Filter):
    """diffusers 0.42 warns on every `ModelMixin.to(dtype=...)`, even when no module must stay in float32
    ("...should be kept in float32: []"); drop only that empty-list case."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFp32ListFilter())

ASSETS = Path(__file__).resolve().parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"
MODEL_CONFIGS_DIR = ASSETS / "model_configs"
DEMO_MODEL_DIR = ASSETS / "demo_model"

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
_PARTS = ("unet", "vae", "text_encoder", "scheduler", "tokenizer")
_CONFIG_FILES = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}  # others: config.json
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# what a Stable Diffusion repo needs for load_model_folder (not the .ckpt, fp16 or .bin copies beside it)
_HUB_FILES = ["model_index.json", "scheduler/*", "tokenizer/*", "unet/config.json", "vae/config.json",
              "text_encoder/config.json", "unet/diffusion_pytorch_model*.safetensors*",
              "vae/diffusion_pytorch_model*.safetensors*", "text_encoder/model*.safetensors*"]
_HUB_IGNORE = ["*.fp16.*", "*.non_ema.*", "*.ema.*"]


@dataclass
class BaseModel:
    """The frozen parts of a text-to-image latent diffusion model."""

    name: str  # what the user asked for; recorded in adapter metadata
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler  # the training noise scheduler

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def parts(self) -> dict[str, torch.nn.Module]:
        """The modules adapters go on, by name (what core/adapters.py takes)."""
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    @property
    def family(self) -> str:
        """"sd1" or "sd2", from the text encoder width (768: CLIP ViT-L, 1024: OpenCLIP ViT-H)."""
        return "sd2" if self.text_encoder.config.hidden_size == 1024 else "sd1"

    def to(self, device, dtype=None) -> "BaseModel":
        kwargs = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
        for m in (self.text_encoder, self.vae, self.unet):
            m.to(**kwargs)
        return self

    def freeze(self) -> "BaseModel":
        for m in (self.text_encoder, self.vae, self.unet):
            m.requires_grad_(False)
            m.eval()
        return self


def clip_tokenizer(model_max_length: int = 77, pad_token: str | None = None) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (49,408 tokens) shipped in core/assets; SD 2.x pads with "!"."""
    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer(str(CLIP_TOKENIZER_DIR / "vocab.json"), str(CLIP_TOKENIZER_DIR / "merges.txt"),
                         model_max_length=model_max_length, **extra)


def build_tiny_model(seed: int = 0, prediction_type: str = "epsilon") -> BaseModel:
    """A tiny random SD-shaped model (about 1 M parameters) with the real tokenizer; deterministic per seed."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=False, steps_offset=1,
    )
    return BaseModel("tiny", tokenizer, text_encoder, vae, unet, scheduler)


def parts_from_configs(configs: Mapping[str, dict]) -> tuple[UNet2DConditionModel, CLIPTextModel, AutoencoderKL]:
    """UNet, text encoder and VAE with fresh (random) weights from diffusers-style configs, on the default device
    (wrap the call in `with torch.device("meta"):` for shapes only, or a GPU to build there directly)."""
    plain = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731  (drop "_class_name" ...)
    unet = UNet2DConditionModel.from_config(plain(configs["unet"]))
    text_encoder = CLIPTextModel(CLIPTextConfig(**plain(configs["text_encoder"])))
    vae = AutoencoderKL.from_config(plain(configs["vae"]))
    return unet, text_encoder, vae


def save_model_folder(model: BaseModel, folder: str | Path) -> Path:
    """Write `model` as a diffusers folder (model_index.json + one subfolder per part)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=model.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def load_model_folder(folder: str | Path, name: str | None = None, **kwargs) -> BaseModel:
    """Load the parts from a diffusers folder (local, or a hub id with `local_files_only`)."""
    folder = str(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True, **kwargs)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True, **kwargs)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True, **kwargs)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **kwargs)
    return BaseModel(name or folder, tokenizer, text_encoder, vae, unet, scheduler)


def load_base_model(spec: str, prediction_type: str = "auto", allow_pickle: bool = False, **kwargs) -> BaseModel:
    """Load the base model named by `spec` (see the module docstring) on the CPU in float32, frozen.

    `prediction_type` other than "auto" overrides what the model says (e.g. "v_prediction" for an SD 2.x
    768-v checkpoint). `allow_pickle` lets pickled `.ckpt`-style files load (they can run code when opened).
    """
    spec = str(spec).strip()
    if prediction_type != "auto" and prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(f"Unknown prediction type {prediction_type!r}: use auto, {', '.join(PREDICTION_TYPES)}.")
    path = Path(spec).expanduser()
    if not spec:
        raise ModelLoadError("No base model given: set model.base to a hub id, a diffusers folder or a checkpoint file.")
    elif spec == "tiny":
        model = build_tiny_model()
    elif spec == "demo":
        if not DEMO_MODEL_DIR.is_dir():
            raise ModelLoadError(f"The demo model is not installed (expected in {DEMO_MODEL_DIR}). "
                                 "Choose another base model, or reinstall the app to get it back.")
        model = _load_local_folder(DEMO_MODEL_DIR, "demo")
    elif path.is_dir():
        model = _load_local_folder(path, spec)
    elif path.is_file():
        model = load_single_file(path, prediction_type, allow_pickle=allow_pickle, name=spec)
    elif looks_like_path(spec) or (path.parent != Path(".") and path.parent.is_dir()):  # "models/x": a local typo
        raise ModelLoadError(f"Base model file or folder not found: {path}. Check the path in model.base.")
    elif _HUB_ID.fullmatch(spec) and "--" not in spec and ".." not in spec:
        model = load_from_hub(spec)
    else:
        raise ModelLoadError(
            f"Cannot find a base model called {spec!r}: it is not a file or folder here, and not a Hugging Face "
            "model id (those look like 'org/name', e.g. 'stable-diffusion-v1-5/stable-diffusion-v1-5').")
    if prediction_type != "auto" and prediction_type != model.prediction_type:
        model.scheduler = DDPMScheduler.from_config(model.scheduler.config, prediction_type=prediction_type)
    return model.to("cpu", torch.float32).freeze()


def model_fingerprint(spec: str) -> str:
    """A short id of the weights a local `spec` names (demo, folder or file), "" for tiny and hub ids.

    Caches that depend on the model (class images) include it, so a model replaced under the same name or
    path never reuses another model's images. Content, not dates: files up to 64 MiB are hashed whole,
    larger ones by size and their first and last MiB (a 4 GB checkpoint costs two reads, not a minute).
    """
    spec = str(spec).strip()
    root = DEMO_MODEL_DIR if spec == "demo" else Path(spec).expanduser()
    if spec == "tiny" or not root.exists():
        return ""
    files = [root] if root.is_file() else sorted(
        f for f in root.rglob("*") if f.is_file() and (f.suffix in SINGLE_FILE_SUFFIXES or f.name.endswith(".json")))
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        name = f.relative_to(root) if f != root else f.name
        digest.update(f"{name}:{st.st_size}:{_content_digest(str(f), st.st_size, st.st_mtime_ns)};".encode())
    return digest.hexdigest()[:10]


@functools.lru_cache(maxsize=256)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's content (whole up to 64 MiB, else its first and last MiB); cached per size and mtime,
    because the class-images view asks for the fingerprint again for every image that arrives."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= 64 << 20:
            digest.update(fh.read())
        else:
            digest.update(fh.read(1 << 20))
            fh.seek(size - (1 << 20))
            digest.update(fh.read())
    return digest.hexdigest()


def looks_like_path(spec: str) -> bool:
    """True for strings meant as a file system path rather than a hub id ('org/name')."""
    return (spec.startswith((".", "~", "/", "\\")) or os.path.isabs(spec) or "\\" in spec or spec.count("/") > 1
            or (os.sep != "/" and os.sep in spec) or spec.lower().endswith(SINGLE_FILE_SUFFIXES))


# --- diffusers folders and the hub -------------------------------------------------------------------------------

def _check_sd_folder(folder: Path) -> None:
    """Refuse, in plain words, a diffusers folder that is not a Stable Diffusion 1.x/2.x text-to-image model."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{folder} is a folder but not a diffusers model (it has no model_index.json).")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        unet_file = folder / "unet" / "config.json"
        unet = json.loads(unet_file.read_text(encoding="utf-8")) if unet_file.is_file() else {}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot read the model configs in {folder}: {e}") from e
    kind = index.get("_class_name", "an unknown pipeline")
    if "text_encoder_2" in index or "XL" in kind or unet.get("addition_embed_type") == "text_time":
        raise ModelLoadError(f"{folder} holds an SDXL model ({kind}); this app trains Stable Diffusion 1.x and 2.x only.")
    missing = [p for p in _PARTS if p not in index]
    if missing:
        raise ModelLoadError(f"{folder} holds {kind}, not a Stable Diffusion 1.x/2.x model (it has no "
                             f"{', '.join(missing)}).")
    if unet.get("in_channels", 4) != 4:
        raise ModelLoadError(f"{folder} holds a UNet with {unet['in_channels']} input channels (an inpainting or "
                             "image-editing model); this app trains plain text-to-image SD 1.x/2.x models.")


def _load_local_folder(folder: Path, name: str) -> BaseModel:
    _check_sd_folder(folder)
    try:
        return load_model_folder(folder, name=name)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot load the diffusers model in {folder}: {_first_line(e)}. It must hold unet, vae, "
                             "text_encoder (with .safetensors weights), tokenizer and scheduler.") from e


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(cache)).expanduser()


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    now = any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
              for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return now or bool(constants.HF_HUB_OFFLINE)


def load_from_hub(repo_id: str) -> BaseModel:
    """Load a diffusers SD 1.x/2.x repo: from the local cache if it is there, else download it into the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    cache = hf_cache_dir()
    pattern_kw = dict(cache_dir=cache, allow_patterns=_HUB_FILES, ignore_patterns=_HUB_IGNORE)
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, **pattern_kw))
    except IncompleteSnapshotError as e:  # try what is there; a download completes it otherwise
        folder = Path(e.snapshot_path) if getattr(e, "snapshot_path", None) else None
    except (LocalEntryNotFoundError, OSError, ValueError):
        folder = None
    if folder is not None and (folder / "model_index.json").is_file():
        _check_sd_folder(folder)  # an SDXL repo in the cache is refused here, not downloaded again
        try:
            return load_model_folder(folder, name=repo_id)
        except (OSError, ValueError) as e:
            log.info("cached copy of %s is incomplete (%s); trying a download", repo_id, _first_line(e))
    if hub_offline():
        raise _hub_error(repo_id, cache, "offline mode is on: HF_HUB_OFFLINE=1")
    try:
        log.warning("Downloading %s from the Hugging Face Hub into %s (several GB the first time)...", repo_id, cache)
        folder = Path(snapshot_download(repo_id, **pattern_kw))
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"The Hugging Face repo {repo_id!r} is not a diffusers model (it has no model_index.json). If it "
                "offers a .safetensors checkpoint, download that file and point model.base at it.")
        _check_sd_folder(folder)
        return load_model_folder(folder, name=repo_id)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one plain message
        raise _hub_error(repo_id, cache, _hub_reason(e)) from e


def _hub_reason(e: Exception) -> str:
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    if isinstance(e, GatedRepoError):
        return "it is a gated model: accept its license on huggingface.co and log in"
    if isinstance(e, RepositoryNotFoundError):
        return "the Hub has no public model with that id"
    if isinstance(e, OfflineModeIsEnabled):
        return "offline mode is on: HF_HUB_OFFLINE=1"
    return f"{type(e).__name__}: {_first_line(e)}"


def _hub_error(repo_id: str, cache: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"Cannot load the base model {repo_id!r}: it is not in the local Hugging Face cache ({cache}) and could not "
        f"be downloaded ({reason}). Check the spelling of the id and your internet connection; for a gated model, "
        "accept its license on huggingface.co and log in with `hf auth login`; or point model.base at a local "
        "diffusers folder or a .safetensors checkpoint file.")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


# --- single-file checkpoints ---------------------------------------------------------------------------------------

_LORA_KEY = re.compile(r"lora_|\.alpha$|hada_w|lokr_w|\.oft_")
_EMBEDDING_KEYS = {"emb_params", "clip_l", "clip_g"}  # textual-inversion files (A1111 / SDXL style)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def check_sd_checkpoint(keys, name: str = "The file") -> None:
    """Raise a plain-words ModelLoadError unless `keys` hold an SD UNet, VAE and text encoder in LDM layout."""
    keys = list(keys)
    has = lambda *prefixes: any(k.startswith(prefixes) for k in keys)  # noqa: E731
    if any(_LORA_KEY.search(k) for k in keys):
        raise ModelLoadError(f"{name} is a LoRA / LyCORIS adapter, not a base model. Load it as an adapter; "
                             "model.base needs a full SD 1.x/2.x checkpoint, a diffusers folder or a hub id.")
    if has("conditioner.embedders.") or any(k.startswith(ldm.UNET_PREFIX + "label_emb.") for k in keys):
        raise ModelLoadError(f"{name} is an SDXL checkpoint; this app trains Stable Diffusion 1.x and 2.x only.")
    if keys and set(keys) <= _EMBEDDING_KEYS:
        raise ModelLoadError(f"{name} is a textual-inversion embedding, not a base model.")
    parts = {"UNet": ldm.UNET_PREFIX, "VAE": ldm.VAE_PREFIX, "text encoder": "cond_stage_model."}
    missing = [part for part, prefix in parts.items() if not has(prefix)]
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


def detect_family(shapes: Mapping[str, Any], name: str = "The file") -> str:
    """"sd1" or "sd2" for a full original-layout checkpoint, from its keys and shapes (tensors or shape tuples)."""
    check_sd_checkpoint(shapes, name)
    conv_in = shapes.get(ldm.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and _shape(conv_in)[1] != 4:
        raise ModelLoadError(f"{name} has a UNet with {_shape(conv_in)[1]} input channels (an inpainting or "
                             "image-editing model); this app trains plain text-to-image SD 1.x/2.x models.")
    to_k = sorted(k for k in shapes if k.startswith(ldm.UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    context = _shape(shapes[to_k[0]])[-1] if to_k else None
    open_clip = any(k.startswith(ldm.OPEN_CLIP_PREFIX) for k in shapes)
    if context == 768 and not open_clip:
        return "sd1"
    if context == 1024 and open_clip:
        return "sd2"
    if context == 2048:
        raise ModelLoadError(f"{name} is an SDXL checkpoint; this app trains Stable Diffusion 1.x and 2.x only.")
    raise ModelLoadError(f"{name} does not have the shapes of Stable Diffusion 1.x or 2.x (cross-attention width "
                         f"{context}, {'OpenCLIP' if open_clip else 'CLIP'} text encoder), and it carries no configs "
                         "saying what it is.")


def _read_safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        raise ModelLoadError(
            f"{path.name} is not a valid .safetensors file ({_first_line(e)}). It may be truncated (an interrupted "
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
        raise ModelLoadError(f"{path.name} cannot be read as a PyTorch checkpoint ({_first_line(e)}). It may be "
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
            for part in _PARTS if (folder / part / _CONFIG_FILES.get(part, "config.json")).is_file()}


def shipped_config_folder(family: str, prediction_type: str) -> Path:
    """core/assets/model_configs/sd15, sd2 (768-v, v_prediction) or sd2-base (512, epsilon)."""
    if family == "sd1":
        return MODEL_CONFIGS_DIR / "sd15"
    return MODEL_CONFIGS_DIR / ("sd2" if prediction_type == "v_prediction" else "sd2-base")


def _guess_prediction_type(family: str, extra: Mapping[str, Any], name: str) -> str:
    """diffusers' rule: SD 2.x is v_prediction (768-v) unless global_step says 2.x-base (875000)."""
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
    """
    path = Path(path).expanduser()
    label = path.name
    if path.suffix.lower() == ".safetensors":
        metadata, shapes = _read_safetensors_header(path)
        state, extra = None, {}
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        state, extra = _read_pickle(path, allow_pickle)
        metadata, shapes = {}, state
    else:
        raise ModelLoadError(f"{label}: unsupported file type {path.suffix!r}. Use a .safetensors checkpoint, a "
                             "diffusers folder or a hub id.")
    configs = ldm.embedded_configs(metadata) if config_dir is None else read_config_folder(config_dir)
    if config_dir is not None and not {"unet", "vae", "text_encoder"} <= set(configs):
        raise ModelLoadError(f"{config_dir} lacks unet/, vae/ or text_encoder/ config.json files.")
    if configs is None:  # a foreign file: the family's shipped configs
        family = detect_family(shapes, label)
        pred = prediction_type if prediction_type != "auto" else _guess_prediction_type(family, extra, label)
        configs = read_config_folder(shipped_config_folder(family, pred))
        configs["scheduler"] = {**configs.get("scheduler", {}), "prediction_type": pred}
    else:
        check_sd_checkpoint(shapes, label)
    if state is None:
        from safetensors.torch import load_file

        state = load_file(str(path))
    unet, vae, text_encoder = _convert_parts(state, configs, label)
    scheduler_config = configs.get("scheduler") or read_config_folder(MODEL_CONFIGS_DIR / "sd15")["scheduler"]
    scheduler = DDPMScheduler.from_config(scheduler_config)
    tok = configs.get("tokenizer", {})
    tokenizer = clip_tokenizer(tok.get("model_max_length", 77), tok.get("pad_token"))
    return BaseModel(name or str(path), tokenizer, text_encoder, vae, unet, scheduler)


def _convert_parts(state: dict[str, torch.Tensor], configs: dict[str, dict], label: str):
    """UNet, VAE and text encoder from an LDM state dict via diffusers' single-file loaders, with local configs."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    # diffusers keeps the layers SD uses: drop OpenCLIP blocks past the configured depth (SD 2: the 24th of 24)
    layers = configs["text_encoder"].get("num_hidden_layers", 0)
    block = re.compile(re.escape(ldm.OPEN_CLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
    state = {k: v for k, v in state.items() if not ((m := block.match(k)) and int(m.group(1)) >= layers)}
    # some old SD 1.x files lack the `text_model.` level of current CLIP names (A1111 renames them the same way)
    old_clip = "cond_stage_model.transformer."
    if not any(k.startswith(ldm.CLIP_PREFIX) for k in state) and any(k.startswith(old_clip) for k in state):
        state = {ldm.CLIP_PREFIX + k[len(old_clip):] if k.startswith(old_clip) else k: v for k, v in state.items()}
    with tempfile.TemporaryDirectory(prefix="sd-configs-") as tmp:
        for part in ("unet", "vae", "text_encoder"):
            (Path(tmp) / part).mkdir()
            (Path(tmp) / part / "config.json").write_text(json.dumps(configs[part]), encoding="utf-8")
        common = dict(config=tmp, local_files_only=True, torch_dtype=torch.float32)
        loaders = {
            "UNet": lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **common),
            "VAE": lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **common),
            "text encoder": lambda: create_diffusers_clip_model_from_ldm(
                CLIPTextModel, state, subfolder="text_encoder", **common),
        }
        models = []
        for part, load in loaders.items():
            try:
                model = load()
            except Exception as e:  # noqa: BLE001 - shape mismatches, missing weights (meta tensors), bad configs
                if "meta tensor" in str(e):  # diffusers left missing weights on the meta device, then moved it
                    raise ModelLoadError(f"{label} lacks some {part} weights: the file is incomplete (or a variant "
                                         "this app does not know).") from e
                raise ModelLoadError(f"The {part} weights in {label} do not fit the expected Stable Diffusion "
                                     f"1.x/2.x model ({_first_line(e)}). The file may be incomplete or a "
                                     "variant this app does not know.") from e
            missing = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
            if missing:
                raise ModelLoadError(f"{label} lacks {len(missing)} {part} weights (e.g. {missing[0]}): the file "
                                     "is incomplete.")
            model.__dict__.pop("hf_device_map", None)  # set by diffusers' single-device dispatch; means nothing here
            models.append(model)
    return models
