"""An adapter file: what it holds, how ours is written, and reading any kind through an ordered list of readers.

Our file is one `.safetensors` holding peft-named weights under the prefixes `unet.` and `text_encoder.`
(`unet.<module>.lora_A.weight`, `...hada_w1_a`, `...lokr_w1`), with metadata (all strings) describing each
part's adapter and the training. Files other tools wrote are read by other readers (core/community.py);
`read_adapter_file` tries them in order, the way peft's LoRA model walks its dispatchers for a layer, so this
module knows no other layout and imports no other core module but errors and fileio.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from safetensors import SafetensorError, safe_open

from .errors import ModelLoadError
from .fileio import save_safetensors

FORMAT_TAG = "dreambooth-peft"
FORMAT_VERSION = "1"
LORA_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")  # the magnitude: DoRA's output lengths
# DoRA only, written beside the peft weights and never loaded into peft: each output row's length in the base weight
# W and in W + the LoRA change, measured when the file was saved (an export for ComfyUI needs both; see formats.py)
DORA_NORMS = ("dora_base_norm", "dora_weight_norm")
# metadata of our DoRA exports: their dora_scale divides by the row lengths of the base weight (ComfyUI's and
# Forge's reading), where LyCORIS' own files mean the row lengths of W + dW (core/community.py reads both)
DORA_CONVENTION = "dreambooth_peft_dora_scale"
# an imported DoRA whose lengths are per input column (older LyCORIS / OneTrainer files): peft has no such layer, so
# these are held beside peft's LoRA weights and applied by core/adapters.py's ColumnDora
COLUMN_SCALE = "dora_scale"
LYCORIS_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                   "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


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
    blocks: str = "all"  # which of a transformer's blocks the targets are taken in (adapters.block_modules)
    dora_axis: str = "output"  # DoRA: lengths per output row (peft's, trained here) or per input column (imported)

    def peft_config(self):
        common = dict(r=self.rank, target_modules=list(self.targets), rank_pattern=dict(self.rank_pattern),
                      alpha_pattern=dict(self.alpha_pattern))
        if self.type in ("lora", "dora"):
            use_dora = self.type == "dora" and self.dora_axis == "output"  # per column: a LoRA + ColumnDora
            return LoraConfig(lora_alpha=self.alpha, lora_dropout=self.dropout, use_dora=use_dora, **common)
        lycoris = dict(alpha=self.alpha, rank_dropout=self.dropout, module_dropout=self.module_dropout,
                       use_effective_conv2d=self.use_effective_conv2d, **common)
        if self.type == "loha":
            return LoHaConfig(**lycoris)
        if self.type == "lokr":
            return LoKrConfig(decompose_both=self.decompose_both, decompose_factor=self.decompose_factor, **lycoris)
        raise ModelLoadError(f"Unknown adapter type {self.type!r}; expected lora, dora, loha or lokr.")


@dataclass
class AdapterFile:
    path: Path
    specs: dict[str, AdapterSpec]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = "peft"  # "kohya": a community file whose names are resolved against the base model on load
    kind: str = ""  # the adapter type of a file without specs (kohya), found when it was read

    @property
    def type(self) -> str:
        return self.kind or self.main_spec.type

    @property
    def main_spec(self) -> AdapterSpec:
        """The UNet's spec (the text encoder's when a file holds only that): what a one-line summary names."""
        return self.specs.get("unet") or next(iter(self.specs.values()))

    def part_state(self, part: str) -> dict[str, torch.Tensor]:
        """The peft state dict of `part` (without the DoRA lengths peft does not hold)."""
        prefix = f"{part}."
        return {k[len(prefix):]: v for k, v in self.tensors.items()
                if k.startswith(prefix) and not k.endswith((*DORA_NORMS, COLUMN_SCALE))}


def split_key(key: str) -> tuple[str, str, str]:
    """'unet.down_blocks.0.attn1.to_q.lora_A.weight' -> ('unet', 'down_blocks.0.attn1.to_q', 'lora_A.weight')."""
    part, _, rest = key.partition(".")
    for suffix in (*LORA_TENSORS, *DORA_NORMS, COLUMN_SCALE, *LYCORIS_TENSORS):
        if rest.endswith("." + suffix):
            return part, rest[: -len(suffix) - 1], suffix
    raise ModelLoadError(f"Unexpected tensor {key!r} in the adapter file: not a LoRA, DoRA, LoHa or LoKr weight.")


# --- writing ours ---------------------------------------------------------------------------------------------------

def file_metadata(specs: dict[str, AdapterSpec], info: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata of our adapter files: format tag, each part's spec, then `info` (as strings)."""
    metadata = {"format": FORMAT_TAG, "format_version": FORMAT_VERSION,
                "adapters": json.dumps({part: asdict(s) for part, s in specs.items()})}
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()})
    return metadata


def save_adapter_file(path: str | Path, tensors: dict[str, torch.Tensor], specs: dict[str, AdapterSpec],
                      info: dict[str, Any]) -> Path:
    """One of our adapter files from peft-named `tensors` (`<part>.<peft key>`), written atomically."""
    return save_safetensors(tensors, path, file_metadata(specs, info))


# --- reading ---------------------------------------------------------------------------------------------------------

# A reader gets the path, the open safe_open handle and the file's metadata. It returns the AdapterFile when the
# file is in its layout, None when it is not (the next reader tries), or raises ModelLoadError when it recognises
# a file that cannot be used (e.g. an adapter for another model family) to say so in plain words.
Reader = Callable[[Path, Any, dict[str, str]], "AdapterFile | None"]


def read_ours(path: Path, f, metadata: dict[str, str]) -> AdapterFile | None:
    """Our own files, recognised by their format tag."""
    if metadata.get("format") != FORMAT_TAG:
        return None
    try:
        specs = {part: AdapterSpec(**d) for part, d in json.loads(metadata["adapters"]).items()}
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{path.name} has damaged adapter metadata ({type(e).__name__}: {e}); "
                             "save or export the adapter again.") from None
    return AdapterFile(path, specs, {key: f.get_tensor(key) for key in f.keys()}, metadata)


def read_adapter_file(path: str | Path, readers: Sequence[Reader]) -> AdapterFile:
    """Read an adapter file with the first of `readers` that knows its layout; a clear ModelLoadError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"Adapter file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name} is not a .safetensors file; adapters are loaded from .safetensors only.")
    try:  # one open: readers look at the metadata and key names first and read tensors only when the file is theirs
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            for reader in readers:
                adapter = reader(path, f, metadata)
                if adapter is not None:
                    return adapter
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path.name} is damaged or not a safetensors file ({e}).") from None
    raise ModelLoadError(f"{path.name} was not written by this app and is not a kohya / LyCORIS / diffusers "
                         f"adapter either, so its layout is unknown (keys like {', '.join(keys[:3]) or 'none'}).")
