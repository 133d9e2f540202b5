"""Quantized frozen weights (`model.quantize`): the denoiser's big linear layers held in 4-bit NF4 or 8-bit integers
by bitsandbytes, so that FLUX.1 (a 12 B transformer, 22 GiB in bf16) trains on a 16 or 24 GB card.

Only the layers inside the transformer / UNet blocks are quantized (nearly all the weights); the embedders, the
final layer, convolutions and norms stay in the run's precision, as do the text encoders and the VAE (their
outputs are cached). LoRA wraps the quantized layers (peft's bitsandbytes LoRA layers; the adapter trains in
float32, the layer's own weight is dequantized per call); LoHa and LoKr cannot wrap them (peft supports LoRA
only there) and are refused in plain words. A merge always loads the base unquantized: rounding a merged weight to
4 or 8 bits would round the adapter's change away.

Quantizing happens when the layers reach their device (bitsandbytes quantizes on the move), so the full-precision
copy exists only once, for a moment, per layer.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .config import LORA_LAYER_TYPES
from .errors import ConfigError

KINDS = ("none", "nf4", "int8")
BLOCKS = ("transformer_blocks", "single_transformer_blocks", "down_blocks", "mid_block", "up_blocks")
NF4_BLOCK = 64  # bitsandbytes' NF4 block size: one float32 absmax per 64 weights


def quantizable(module: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every plain linear layer inside the denoiser's blocks."""
    for block_name in BLOCKS:
        blocks = getattr(module, block_name, None)
        if blocks is None:
            continue
        for parent in blocks.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    yield parent, name, child


def weight_bytes(layer: nn.Linear, kind: str) -> float:
    """Bytes a quantized layer's weight takes on the GPU (its bias stays in the run's precision)."""
    n = layer.in_features * layer.out_features
    if kind == "nf4":
        return n / 2 + 4 * n / NF4_BLOCK  # two 4-bit codes per byte, a float32 absmax per block
    return n + 4 * layer.out_features  # one byte per weight, a float32 scale per output row


def missing_reason() -> str | None:
    """Why quantized weights cannot be used here, or None."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return ("Quantized weights need the bitsandbytes package: ./launch.sh installs it (requirements-dev.txt); "
                "by hand: pip install bitsandbytes==0.50.2.")
    return None


def check(kind: str, adapter_type: str) -> None:
    """Refuse, before anything loads, a quantization this run cannot use."""
    if kind == "none":
        return
    if kind not in KINDS:
        raise ConfigError(f"`model.quantize` must be one of {', '.join(KINDS)}, got {kind!r}.")
    if adapter_type not in LORA_LAYER_TYPES:
        raise ConfigError(f"`model.quantize: {kind}` works with LoRA and DoRA only: peft cannot put a LoHa or LoKr "
                          "around a quantized layer. Choose LoRA or DoRA, or model.quantize: none (more GPU memory).")
    if adapter_type == "dora" and kind == "int8":  # found in tests/test_quantize.py: int8 + DoRA fails in forward
        raise ConfigError("`model.quantize: int8` does not work with DoRA: bitsandbytes' 8-bit layers lose their "
                          "scales when peft reads the weight back for DoRA's row lengths. Choose nf4 (or none).")
    reason = missing_reason()
    if reason:
        raise ConfigError(reason)


def quantize(module: nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Put bitsandbytes layers in place of the denoiser's block linear layers, in place (quantized when moved to
    a device); returns how many. `compute_dtype`: the precision each layer computes in (the run's)."""
    if kind == "none":
        return 0
    import bitsandbytes as bnb

    count = 0
    for parent, name, layer in list(quantizable(module)):
        bias = layer.bias is not None
        if kind == "nf4":
            new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias, compute_dtype=compute_dtype,
                                    quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4")
            # bitsandbytes repacks a layer for its AVX-512 CPU kernel the first time it runs without gradients
            # (samples, class images) and then fails on that layer in training, and on layers narrower than a
            # block: on the CPU (tests) the layers dequantize per call instead; the GPU never takes that path
            new.support_avx512bf16_for_cpu = False
        else:
            new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False,
                                      threshold=6.0, device="meta")
            new.weight = bnb.nn.Int8Params(layer.weight.data, requires_grad=False, has_fp16_weights=False)
        if bias:
            new.bias = nn.Parameter(layer.bias.data, requires_grad=False)
        setattr(parent, name, new)
        count += 1
    return count

