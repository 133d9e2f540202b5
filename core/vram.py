"""VRAM planner: the GPU memory a training run will need, estimated before it starts.

The peak of a run is the frozen weights on the GPU + the adapters with their gradients and optimizer state +
the activations the forward pass keeps for the backward pass + a few transient buffers, or, when it is larger,
the VAE encoding the latent cache before training (the UNet not on the GPU yet). The first two are parameter
counts; the parts kept in main memory while training (core/placement.py) count only in the phase they work in. The activations are measured, not guessed: the UNet (and text encoder, when trained)
is built on PyTorch's "meta" device (shapes only, no memory, well under a second for SD 1.5), the
adapters are injected as in training, and one forward pass at the run's batch and resolution is traced
with autograd's saved-tensor hooks, which see every tensor kept for backward. Attention is traced as the
fused kernels behave on a GPU (they keep q, k, v and the output, never the attention matrix).

`bench/train_step.py` prints this estimate beside the measured peak of each case.
"""
from __future__ import annotations

import contextlib
import functools
import json
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from . import adapters, buckets, families, quantize
from .adapter_file import AdapterSpec
from .buckets import Size
from .config import Config, list_presets, preset_dict
from .families.base import Family
from .models import model_configs
from .placement import latents_cached, offloaded_parts
from .precision import DTYPES

GIB = 2 ** 30
CUDA_CONTEXT = 0.4 * GIB  # what the CUDA context and kernels take on a card besides PyTorch's allocations


@dataclass
class MemoryPlan:
    weights: int  # every frozen part (UNet, text encoders, VAE), in the run's precision
    adapter: int  # adapter weights, their gradients and the optimizer state (float32)
    activations: int  # what one training step keeps for its backward pass
    transient: int  # buffers alive at the peak besides those (gradients of the largest activations)
    assumed: str = ""  # set when the model's shape was assumed (a hub id not downloaded yet)
    encode: int = 0  # what the VAE encoding the images takes at its peak, besides the weights (no grad)
    offloaded: int = 0  # of `weights`, the parts kept in main memory while training (train.offload_frozen)
    vae: int = 0  # of `weights`, the VAE's
    cached: bool = False  # the latent cache is encoded before training; else the VAE encodes within each step
    bucket: str = ""  # the bucket planned for, when the images train in several (the largest)

    @property
    def on_gpu(self) -> int:
        """The frozen weights on the GPU while training."""
        return self.weights - self.offloaded

    @property
    def training(self) -> int:
        """The peak of the training steps: an encode within a step comes before its forward pass, never inside."""
        encode = 0 if self.cached else self.encode
        return self.on_gpu + self.adapter + max(self.activations + self.transient, encode)

    @property
    def caching(self) -> int:
        """The peak of encoding the latent cache: the UNet comes to the GPU after it, so the VAE is there alone."""
        return self.vae + self.encode if self.cached else 0

    @property
    def total(self) -> int:
        return max(self.training, self.caching)

    def text(self) -> str:
        kept = f" ({size(self.offloaded)} more kept in main memory)" if self.offloaded else ""
        parts = (f"weights {size(self.on_gpu)}{kept}, adapters {size(self.adapter)}, "
                 f"activations {size(self.training - self.on_gpu - self.adapter)}")
        caching = f"; {size(self.caching)} while the VAE encodes the images" if self.caching > self.training else ""
        at = f" at {self.bucket}, the largest bucket" if self.bucket else ""
        return f"about {size(self.total)}{at} ({parts}{caching})" + (f"; {self.assumed}" if self.assumed else "")


def size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 2 else f"{n / 2 ** 20:.0f} MiB"


class _FusedAttention(torch.autograd.Function):
    """A stand-in for scaled_dot_product_attention while tracing: keeps what the GPU's fused kernels keep."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: tracing runs the forward only
        raise NotImplementedError


_trace_lock = threading.Lock()  # one trace at a time (the stand-in below is installed for its duration)
_tracing = threading.local()  # set only in the thread that traces


def _attention_for(original):
    """scaled_dot_product_attention that is the stand-in in the tracing thread only: training running in another
    thread of the app at the same moment keeps the real attention."""
    def attention(*args, **kwargs):
        if getattr(_tracing, "on", False):
            q, k, v = (*args, *(kwargs[n] for n in ("query", "key", "value") if n in kwargs))[:3]
            return _FusedAttention.apply(q, k, v)
        return original(*args, **kwargs)

    return attention


@contextlib.contextmanager
def _fused_attention():
    """While tracing in this thread, attention keeps and allocates what the GPU's fused kernels do (never the
    attention matrix, which the meta device's fallback would build)."""
    with _trace_lock:
        original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _attention_for(original)
        _tracing.on = True
        try:
            yield
        finally:
            _tracing.on = False
            F.scaled_dot_product_attention = original


def _traced_bytes(module: torch.nn.Module, run) -> tuple[int, int]:
    """(bytes of the activations `run()` keeps for backward, bytes of the largest one); weights excluded."""
    weight_shapes = {tuple(p.shape) for p in module.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor):
        if t.dim() and tuple(t.shape) not in weight_shapes:
            kept[id(t)] = t  # by identity: a tensor saved by two operations is in memory once
        return t

    with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # hooks are per thread
        run()
    sizes = [t.numel() * t.element_size() for t in kept.values()]
    return sum(sizes), max(sizes, default=0)


class _LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that operations create, each counted until it is freed: what a
    no-grad pass (the VAE encoding the latent cache) takes at its peak, besides the weights."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if all(r.alias_info is None for r in func._schema.returns):  # views and in-place results allocate nothing
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    n = t.untyped_storage().nbytes()
                    self.live += n
                    weakref.finalize(t, self._free, n)
            self.peak = max(self.peak, self.live)
        return out


def _encode_peak(vae: torch.nn.Module, images: int, pixels: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes a no-grad VAE encode of `images` images of `pixels` (height, width) takes at its peak, besides the
    VAE's weights."""
    x = torch.empty((images, vae.config.in_channels, *pixels), device="meta", dtype=dtype)
    counter = _LiveBytes()
    with torch.no_grad(), _fused_attention(), counter:
        vae.encode(x).latent_dist.mean  # noqa: B018 - the pass is what is measured
    return counter.peak


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _weight_bytes(module: torch.nn.Module, itemsize: int, kind: str) -> int:
    """A part's weights on the GPU: `itemsize` bytes each, the quantized block layers' at their own size."""
    if kind == "none":
        return count(module) * itemsize
    layers = [layer for _, _, layer in quantize.quantizable(module)]
    quantized = sum(layer.weight.numel() for layer in layers)
    return int((count(module) - quantized) * itemsize + sum(quantize.weight_bytes(layer, kind) for layer in layers))


def family_of(configs: dict[str, dict]) -> Family:
    """The family of a model by its part configs (SD 1.x when no family claims them: the planner's assumption)."""
    return families.of_configs(configs, configs.get("unet", {})) or families.get("sd1")


@functools.lru_cache(maxsize=32)
def _plan(configs_json: str, key: str) -> tuple[tuple[tuple[str, int], ...], int, int, int, int]:
    """(bytes of each frozen part, adapter state, activations, transient, encode peak)."""
    configs = json.loads(configs_json)
    k = json.loads(key)
    dtype = DTYPES[k["precision"]]
    family = family_of(configs)
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        models = family.parts_from_configs(configs)
    weights = tuple((part, _weight_bytes(m, dtype.itemsize if part != "vae" or family.vae_fp16_safe else 4,
                                         k["quantize"] if part == family.denoiser else "none"))
                    for part, m in models.items())  # a VAE that overflows in half precision stays fp32
    parts = {part: models[part] for part in family.parts}
    for m in parts.values():
        m.requires_grad_(False)
        m.to(dtype)
    specs = {part: AdapterSpec(**s) for part, s in k["specs"].items()}
    params = adapters.inject_all(parts, specs)
    trainable = sum(p.numel() for ps in params.values() for p in ps)
    state_bytes = 4 + 4 + (2 if k["optimizer"] == "adamw8bit" else 8)  # weight, gradient, AdamW moments
    unet = parts[family.denoiser]
    if k["checkpointing"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    images = k["batch"]
    factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    latent = (k["height"] // factor, k["width"] // factor)
    args, kwargs = family.trace_inputs(configs, images, latent, dtype)  # what the family's UNet call gets
    act, largest = _traced_bytes(unet, lambda: unet(*args, **kwargs))
    for part in (p for p in family.text_encoders if p in specs):  # each text encoder that trains
        text_encoder = parts[part]
        text_encoder.train()
        ids = torch.zeros((images, 77), device="meta", dtype=torch.long)
        te_act, te_largest = _traced_bytes(text_encoder, lambda: text_encoder(ids))  # noqa: B023 - called at once
        act, largest = act + te_act, max(largest, te_largest)
    vae = models["vae"].to(dtype if family.vae_fp16_safe else torch.float32)
    encode = _encode_peak(vae, k["encoded"], (k["height"], k["width"]), next(vae.parameters()).dtype)
    return weights, trainable * state_bytes, act, 2 * largest, encode


def plan(cfg: Config, precision: str | None = None) -> MemoryPlan:
    """The expected peak GPU memory of training `cfg` (allocated by PyTorch, without the CUDA context)."""
    configs, assumed = model_configs(cfg.model.base)
    t = cfg.train
    family = family_of(configs)
    # auto: the family's half precision on a GPU
    precision = precision or (t.mixed_precision if t.mixed_precision in DTYPES else family.half_precision)
    specs = adapters.specs_from_config(cfg, family.text_encoders, family.denoiser, family.default_targets)
    sizes = buckets.for_settings(cfg.data)
    width, height = largest_bucket(sizes)
    key = json.dumps({
        "precision": precision, "optimizer": t.optimizer, "checkpointing": t.gradient_checkpointing,
        "batch": t.batch_size * (2 if t.prior_preservation else 1), "width": width, "height": height,
        "specs": {part: vars(s) for part, s in specs.items()}, "encoded": images_per_encode(cfg),
        "quantize": cfg.model.quantize,
    }, sort_keys=True, default=str)
    weights, adapter, act, transient, encode = _plan(json.dumps(configs, sort_keys=True, default=str), key)
    by_part = dict(weights)
    offloaded = sum(by_part[part] for part in offloaded_parts(cfg, family.encoders, specs, family.text_encoders))
    return MemoryPlan(sum(by_part.values()), adapter, act, transient, assumed, encode, offloaded, by_part["vae"],
                      latents_cached(cfg), buckets.describe((width, height)) if len(sizes) > 1 else "")


def largest_bucket(sizes: list[Size]) -> Size:
    """The bucket a step needs the most memory for: the most pixels (activations grow with the latent's area); among
    equal areas the one with the longest side, so that the answer never depends on the list's order."""
    return max(sizes, key=lambda s: (s[0] * s[1], max(s), s))


def images_per_encode(cfg: Config) -> int:
    """Images in one VAE encode: an image and its mirror when the latent cache holds both (core/trainer.py)."""
    return 2 if latents_cached(cfg) and cfg.data.random_flip else 1


def preset_config(name: str) -> Config:
    return Config.from_dict(preset_dict(name))


def suggest_preset(family: Family, free_bytes: int, adapter_type: str = "lora") -> str | None:
    """The built-in preset for `family`'s reference models and `adapter_type` that plans the most memory while
    fitting `free_bytes` (the CUDA context included), or None when none fits."""
    fits = []
    for name in list_presets():
        cfg = preset_config(name)
        if cfg.model.base in family.hub_ids and cfg.adapter.type == adapter_type:
            need = plan(cfg).total + CUDA_CONTEXT
            if need <= free_bytes:
                fits.append((need, name))
    return max(fits)[1] if fits else None


def advice(cfg: Config, free_bytes: int | None) -> str:
    """One line for the Train tab: the expected peak and whether it fits the GPU's free memory."""
    p = plan(cfg)
    line = f"Expected GPU memory: {p.text()}."
    if free_bytes is None:
        return line + " No NVIDIA GPU found: training runs on the CPU."
    need = p.total + CUDA_CONTEXT
    line += f" The GPU has {size(free_bytes)} free"
    if need <= free_bytes:
        return line + ": it fits."
    suggested = suggest_preset(family_of(model_configs(cfg.model.base)[0]), free_bytes, cfg.adapter.type)
    choose = f"Use the {suggested} preset" if suggested else "Choose a low-VRAM preset"
    checkpointing = "" if cfg.train.gradient_checkpointing else ", or turn on gradient checkpointing"
    return line + f": **not enough**. {choose}, or lower the resolution or batch size{checkpointing}."


def free_gpu_memory() -> int | None:
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return int(free)
