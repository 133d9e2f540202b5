"""Tensor arithmetic on layer weights that the adapter code and the file readers share: a layer's frozen base
weight, a LoRA pair's weight change, and the row lengths DoRA works with. Imports no other core module."""
from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import dequantize_module_weight


def base_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The frozen weight of a layer, wrapped by peft or not, in float32 (a quantized one dequantized)."""
    plain = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
    return dequantize_module_weight(plain).detach().float()


def lora_product(up: torch.Tensor, down: torch.Tensor, scale: float, shape: torch.Size) -> torch.Tensor:
    """scale x up @ down in float32 and the base weight's `shape` (a convolution's pair flattened to matrices),
    outside autograd (trained weights or a file's tensors alike)."""
    return (up.detach().float().flatten(1) @ down.detach().float().flatten(1) * scale).reshape(shape)


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The length of each output row of a weight (a convolution's whole filter per output channel), as DoRA
    takes it."""
    return weight.flatten(1).norm(dim=1)
