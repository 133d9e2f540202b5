"""Tests for core/precision.py: the one rule for the frozen weights' dtype and the device."""
from __future__ import annotations

import pytest
import torch

from core.config import Config
from core.errors import ConfigError
from core.precision import DTYPES, default_device, frozen_dtype, resolve_precision


def config(mixed_precision: str) -> Config:
    return Config.from_dict({"train": {"mixed_precision": mixed_precision}})


def test_every_precision_setting_has_a_dtype():
    assert DTYPES == {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for name in ("no", "bf16"):
        assert resolve_precision(config(name)) == name


def test_on_the_cpu_auto_is_full_precision_and_fp16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"
    assert resolve_precision(config("auto")) == "no"
    with pytest.raises(ConfigError, match=r"fp16 needs an NVIDIA GPU.*train\.mixed_precision"):
        resolve_precision(config("fp16"))


def test_on_a_gpu_auto_is_fp16(monkeypatch):
    """The rule the GPU gets, checked here by saying there is one (nothing is put on a device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"
    assert resolve_precision(config("auto")) == "fp16" == resolve_precision(config("fp16"))
    assert resolve_precision(config("bf16")) == "bf16"


def test_frozen_weights_stay_float32_only_without_mixed_precision():
    assert frozen_dtype("no") is None  # loaded in float32: nothing to cast
    assert frozen_dtype("fp16") is torch.float16 and frozen_dtype("bf16") is torch.bfloat16


def test_on_a_gpu_auto_is_each_familys_half_precision(monkeypatch, tmp_path):
    """FLUX.1 runs in bf16 (its activations overflow fp16); the family is read from the model's configs without
    loading it: a name, a folder, a file's header."""
    from core.families import get
    from core.models import spec_family
    from core.families.flux_files import save_flux_files

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    files = save_flux_files(get("flux").build_tiny(), tmp_path / "flux", dtype=None)
    for spec, family, precision in (("tiny-flux", "flux", "bf16"), (str(files["transformer"]), "flux", "bf16"),
                                    ("demo", "sd1", "fp16"), ("tiny-sdxl", "sdxl", "fp16")):
        found = spec_family(spec)
        assert found is not None and found.name == family, spec
        assert resolve_precision(config("auto"), found) == precision, spec
    assert resolve_precision(config("fp16"), spec_family("tiny-flux")) == "fp16"  # asked for: as asked
    assert spec_family("someone/not-cached-here") is None


def test_the_real_flux_waits_in_main_memory_in_bf16():
    """12 B parameters would take 48 GB in float32; a small FLUX (tests) stays float32 for exact CPU maths."""
    import json

    from core.families.flux_files import FLUX_CONFIGS, held_dtype

    real = json.loads((FLUX_CONFIGS / "transformer" / "config.json").read_text())
    assert held_dtype(real) is torch.bfloat16
    assert held_dtype({**real, "num_attention_heads": 2, "attention_head_dim": 16}) is torch.float32
