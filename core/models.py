"""Base model loading: the parts of a model of a family this app trains (core/families).

`load_base_model(spec)` accepts:
- "tiny" / "tiny-sdxl" / "tiny-flux": a tiny random SD 1.x / SDXL / FLUX.1-architecture model built in code (tests,
  smoke runs);
- "demo": the small demo model shipped in core/assets/demo_model (when installed);
- a local diffusers folder (holds model_index.json);
- a single-file checkpoint in the original Stable Diffusion layout (read by core/single_file.py);
- a hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5": the local Hugging Face cache first,
  then a download through that cache unless HF_HUB_OFFLINE=1.
Every failure the user can fix is a ModelLoadError in plain words.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from diffusers import AutoencoderKL, DDPMScheduler

from . import families
from .base_model import ASSETS, BaseModel
from .config import Config
from .errors import ConfigError, ModelLoadError, first_line
from .single_file import (SINGLE_FILE_SUFFIXES, embedded_configs, read_config_folder, read_safetensors_header,
                          shipped_config_folder)

log = logging.getLogger(__name__)


class _EmptyFp32ListFilter(logging.Filter):
    """diffusers 0.42 warns on every `ModelMixin.to(dtype=...)`, even when no module must stay in float32
    ("...should be kept in float32: []"); drop only that empty-list case."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFp32ListFilter())

DEMO_MODEL_DIR = ASSETS / "demo_model"
TINY = {"tiny": "sd1", "tiny-sdxl": "sdxl", "tiny-flux": "flux"}  # tiny random models built in code, by family

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def build_tiny_model(seed: int = 0, prediction_type: str = "epsilon", family: str = "sd1") -> BaseModel:
    """A tiny random model of `family`'s architecture with the real tokenizer; deterministic per seed."""
    return families.get(family).build_tiny(seed, prediction_type)


def parts_from_configs(configs: Mapping[str, dict]) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """UNet, text encoder and VAE of an SD model with fresh (random) weights from diffusers-style configs, on the
    default device (wrap the call in `with torch.device("meta"):` for shapes only, or a GPU to build there
    directly). Other families: `families.<family>.parts_from_configs`, which gives every part by name."""
    parts = families.get("sd1").parts_from_configs(configs)
    return parts["unet"], parts["text_encoder"], parts["vae"]


def save_model_folder(model: BaseModel, folder: str | Path) -> Path:
    """Write `model` as a diffusers folder (model_index.json + one subfolder per part), in its family's pipeline."""
    families.of(model).make_pipeline(model).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def load_model_folder(folder: str | Path, name: str | None = None, **kwargs) -> BaseModel:
    """Load the parts from a diffusers folder by its family (a hub id with `local_files_only`: as SD 1.x/2.x)."""
    family = families.of_folder(Path(folder)) if Path(folder).is_dir() else families.get("sd1")
    return family.load_folder(folder, name=name, **kwargs)


def load_base_model(spec: str, prediction_type: str = "auto", allow_pickle: bool = False,
                    companions: Mapping[str, str] | None = None, **kwargs) -> BaseModel:
    """Load the base model named by `spec` (see the module docstring) on the CPU in float32, frozen.

    `prediction_type` other than "auto" overrides what the model says (e.g. "v_prediction" for an SD 2.x
    768-v checkpoint). `allow_pickle` lets pickled `.ckpt`-style files load (they can run code when opened).
    `companions` (part -> file or folder) complete a FLUX.1 transformer file: its text encoders and VAE.
    """
    spec = str(spec).strip()
    if prediction_type != "auto" and prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(f"Unknown prediction type {prediction_type!r}: use auto, {', '.join(PREDICTION_TYPES)}.")
    path = Path(spec).expanduser()
    if not spec:
        raise ModelLoadError("No base model given: set model.base to a hub id, a diffusers folder or a checkpoint file.")
    elif spec in TINY:
        model = families.get(TINY[spec]).build_tiny()
    elif spec == "demo":
        if not DEMO_MODEL_DIR.is_dir():
            raise ModelLoadError(f"The demo model is not installed (expected in {DEMO_MODEL_DIR}). "
                                 "Choose another base model, or reinstall the app to get it back.")
        model = _load_local_folder(DEMO_MODEL_DIR, "demo")
    elif path.is_dir():
        model = _load_local_folder(path, spec)
    elif path.is_file():
        model = checkpoint_family(path).load_file(path, prediction_type, allow_pickle=allow_pickle, name=spec,
                                                  companions={k: v for k, v in (companions or {}).items() if v})
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
    return model.to("cpu", families.of(model).held_dtype(model)).freeze()


def checkpoint_family(path: Path) -> families.Family:
    """The family of a single-file checkpoint, from the keys and shapes in its header. A pickled file is only
    opened (with the user's permission) by the loader: its keys are read there, as SD 1.x/2.x or SDXL."""
    if path.suffix.lower() != ".safetensors":
        return families.get("sd1")
    metadata, shapes = read_safetensors_header(path)
    configs = embedded_configs(metadata)  # files this app wrote say what they hold (tiny models have no SD shapes)
    family = families.of_configs(dict.fromkeys(configs, []), configs.get("unet", {})) if configs else None
    return family or families.of_checkpoint(shapes, path.name)


def spec_family(spec: str) -> families.Family | None:
    """The family of base model `spec` from its configs, read without loading weights; None when unknown."""
    try:
        configs, assumed = model_configs(spec)
    except Exception:  # noqa: BLE001 - a bad spec is reported by the loader, in its words
        return None
    return None if assumed else families.of_configs(configs, configs.get("unet", {}))


def model_configs(spec: str) -> tuple[dict[str, dict], str]:
    """The diffusers configs of base model `spec` without loading weights, and a note when they are assumed."""
    if spec == "demo":
        return read_config_folder(DEMO_MODEL_DIR), ""
    if spec in TINY:
        m = build_tiny_model(family=TINY[spec])
        configs = {part: module.config for part, module in (*m.all_parts.items(), ("scheduler", m.scheduler))}
        return {part: c.to_dict() if hasattr(c, "to_dict") else dict(c) for part, c in configs.items()}, ""
    path = Path(spec).expanduser()
    if looks_like_path(spec) and path.is_dir():
        return read_config_folder(path), ""
    if looks_like_path(spec) and path.is_file() and path.suffix.lower() == ".safetensors":
        metadata, shapes = read_safetensors_header(path)
        configs = embedded_configs(metadata)
        if configs:
            return configs, ""
        return read_config_folder(shipped_config_folder(families.of_checkpoint(shapes, path.name).name, "epsilon")), ""
    snapshots = sorted((hf_cache_dir() / f"models--{spec.replace('/', '--')}" / "snapshots").glob("*/model_index.json"))
    if snapshots:
        return read_config_folder(snapshots[-1].parent), ""
    family = next((f for f in families.FAMILIES.values() if spec in f.hub_ids), None)
    if family is not None:  # a family's reference model, not downloaded yet: its shapes are the shipped configs
        return read_config_folder(shipped_config_folder(family.name, "epsilon")), ""
    return read_config_folder(shipped_config_folder("sd1", "epsilon")), "model shape assumed to be SD 1.5"


def load_base_from_config(cfg: Config) -> BaseModel:
    """The base model a config names, with its prediction type, pickle permission, noise schedule and VAE (see
    load_base_model, with_zero_terminal_snr and load_vae)."""
    companions = {"text_encoder": cfg.model.text_encoder, "text_encoder_2": cfg.model.text_encoder_2,
                  "vae": cfg.model.vae}
    model = load_base_model(cfg.model.base, prediction_type=cfg.model.prediction_type,
                            allow_pickle=cfg.model.allow_pickle, companions=companions)
    if cfg.model.zero_terminal_snr:
        if model.prediction_type == "epsilon":  # at the pure-noise step the noise tells nothing about the image
            raise ConfigError("model.zero_terminal_snr needs a v-prediction (or sample) model: set "
                              "model.prediction_type: v_prediction, as NoobAI-XL v-pred and other zero-SNR models use.")
        with_zero_terminal_snr(model)
    if cfg.model.vae and model.vae_source != cfg.model.vae:  # (a FLUX.1 file took it as its VAE already)
        model.vae = load_vae(cfg.model.vae, model.vae).to("cpu", torch.float32).requires_grad_(False).eval()
        model.vae_source = cfg.model.vae
    return model


def place(model: BaseModel, device, dtype: torch.dtype | None) -> BaseModel:
    """Move the frozen parts to `device` in `dtype` (None: keep float32), the VAE in the dtype its family trusts
    it with (SDXL's own VAE stays float32: it overflows in fp16)."""
    model.to(device, dtype)
    vae_dtype = families.of(model).vae_dtype(model, dtype)
    if vae_dtype != dtype:
        model.vae.to(dtype=vae_dtype)
    return model


def with_zero_terminal_snr(model: BaseModel) -> BaseModel:
    """Rescale the training schedule so its last step is pure noise (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed"): what zero-terminal-SNR models such as NoobAI-XL v-pred were trained
    with. Samplers made from this scheduler follow (core/sampling.py)."""
    model.scheduler = DDPMScheduler.from_config(model.scheduler.config, rescale_betas_zero_snr=True)
    return model


# --- another VAE (model.vae) ---------------------------------------------------------------------------------------

def load_vae(spec: str, like: AutoencoderKL) -> AutoencoderKL:
    """The VAE `spec` names (a diffusers VAE folder, a pipeline folder with vae/, a .safetensors VAE file in the
    original or the diffusers layout, or a hub id), on the CPU in float32. A file has no config: it is read with
    the config of `like` (the base model's VAE, which it replaces). Safetensors only; plain-words errors."""
    spec = str(spec).strip()
    path = Path(spec).expanduser()
    if path.is_dir():
        return _vae_from_folder(path / "vae" if (path / "vae" / "config.json").is_file() else path, spec)
    if path.is_file():
        return _vae_from_file(path, like)
    if looks_like_path(spec) or not _HUB_ID.fullmatch(spec) or "--" in spec or ".." in spec:
        raise ModelLoadError(f"VAE file or folder not found: {path}. Check the path in model.vae (or leave it empty "
                             "to use the base model's own VAE).")
    return _vae_from_hub(spec)


def _vae_from_folder(folder: Path, label: str) -> AutoencoderKL:
    try:
        return AutoencoderKL.from_pretrained(str(folder), use_safetensors=True, torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot load the VAE in {label}: {first_line(e)}. A VAE folder holds config.json and "
                             "diffusion_pytorch_model.safetensors.") from e


def _vae_from_file(path: Path, like: AutoencoderKL) -> AutoencoderKL:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name}: a VAE file must be .safetensors (pickled files can run code when opened).")
    read_safetensors_header(path)  # a damaged or renamed file, in plain words
    state = load_file(str(path))
    if not any(k.startswith("encoder.down_blocks.") for k in state):  # the original (LDM) layout
        state = convert_ldm_vae_checkpoint(state, dict(like.config))
    vae = AutoencoderKL.from_config(like.config)
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{path.name} is not a VAE that fits this base model ({first_line(e)[:200]}).") from e
    return vae.to(torch.float32)


def _vae_from_hub(repo_id: str) -> AutoencoderKL:
    """A VAE repo from the local Hugging Face cache, downloaded into it unless HF_HUB_OFFLINE=1."""
    cache = hf_cache_dir()
    try:
        return AutoencoderKL.from_pretrained(repo_id, use_safetensors=True, torch_dtype=torch.float32,
                                             cache_dir=cache, local_files_only=True)
    except (OSError, ValueError) as e:
        if hub_offline():
            raise ModelLoadError(f"Cannot load the VAE {repo_id!r}: it is not in the local Hugging Face cache "
                                 f"({cache}) and offline mode is on (HF_HUB_OFFLINE=1). Point model.vae at a local "
                                 "VAE folder or .safetensors file.") from e
    try:
        return AutoencoderKL.from_pretrained(repo_id, use_safetensors=True, torch_dtype=torch.float32, cache_dir=cache)
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one plain message
        raise ModelLoadError(f"Cannot load the VAE {repo_id!r} ({_hub_reason(e)}). Point model.vae at a local VAE "
                             "folder or .safetensors file.") from e


def model_fingerprint(spec: str) -> str:
    """A short id of the weights a local `spec` names (demo, folder or file), "" for tiny and hub ids.

    Caches that depend on the model (class images) include it, so a model replaced under the same name or
    path never reuses another model's images. Content, not dates: files up to 64 MiB are hashed whole,
    larger ones by size and their first and last MiB (a 4 GB checkpoint costs two reads, not a minute).
    """
    spec = str(spec).strip()
    root = DEMO_MODEL_DIR if spec == "demo" else Path(spec).expanduser()
    if spec in TINY or not root.exists():
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

def _load_local_folder(folder: Path, name: str) -> BaseModel:
    family = families.of_folder(folder)
    try:
        return family.load_folder(folder, name=name)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot load the diffusers model in {folder}: {first_line(e)}. It must hold unet, vae, "
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
    """Load a diffusers repo of a family this app trains: from the local cache if it is there, else download it
    into the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    cache = hf_cache_dir()
    allow, ignore = families.hub_patterns()
    pattern_kw = dict(cache_dir=cache, allow_patterns=allow, ignore_patterns=ignore)
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, **pattern_kw))
    except IncompleteSnapshotError as e:  # try what is there; a download completes it otherwise
        folder = Path(e.snapshot_path) if getattr(e, "snapshot_path", None) else None
    except (LocalEntryNotFoundError, OSError, ValueError):
        folder = None
    if folder is not None and (folder / "model_index.json").is_file():
        family = families.of_folder(folder)  # a repo of another kind is refused here, not downloaded again
        try:
            return family.load_folder(folder, name=repo_id)
        except (OSError, ValueError) as e:
            log.info("cached copy of %s is incomplete (%s); trying a download", repo_id, first_line(e))
    if hub_offline():
        raise _hub_error(repo_id, cache, "offline mode is on: HF_HUB_OFFLINE=1")
    try:
        log.warning("Downloading %s from the Hugging Face Hub into %s (several GB the first time)...", repo_id, cache)
        folder = Path(snapshot_download(repo_id, **pattern_kw))
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"The Hugging Face repo {repo_id!r} is not a diffusers model (it has no model_index.json). If it "
                "offers a .safetensors checkpoint, download that file and point model.base at it.")
        return families.of_folder(folder).load_folder(folder, name=repo_id)
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
    return f"{type(e).__name__}: {first_line(e)}"


def _hub_error(repo_id: str, cache: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"Cannot load the base model {repo_id!r}: it is not in the local Hugging Face cache ({cache}) and could not "
        f"be downloaded ({reason}). Check the spelling of the id and your internet connection; for a gated model, "
        "accept its license on huggingface.co and log in with `hf auth login`; or point model.base at a local "
        "diffusers folder or a .safetensors checkpoint file.")

