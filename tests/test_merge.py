"""Fusing adapters into the base model (issue 5, merging): the merged model equals base + adapters."""
from __future__ import annotations

import pytest
import torch
from test_adapters import outputs, tiny
from test_formats import adapted

from core import adapters
from core.errors import ModelLoadError
from core.merge import fuse_into, merge_to_model
from core.models import load_base_model


def saved(tmp_path, kind, seed_name, **extra):
    base, specs = adapted(kind, **extra)
    return adapters.save_adapter(tmp_path / f"{seed_name}.safetensors", base, specs, {"steps": 1})


def with_adapters(files):
    model = tiny()
    for i, (path, _) in enumerate(sorted(files, key=lambda f: 0 if adapters.read_adapter(f[0]).type == "lora" else 1)):
        adapters.load_into(model, adapters.read_adapter(path), f"x{i}")
    order = sorted(files, key=lambda f: 0 if adapters.read_adapter(f[0]).type == "lora" else 1)
    adapters.set_weights(model, {f"x{i}": w for i, (_, w) in enumerate(order)})
    return outputs(model)


@pytest.mark.parametrize("kinds", [("lora",), ("loha",), ("lokr",), ("lora", "loha", "lokr")])
def test_fused_model_equals_base_plus_adapters(tmp_path, kinds):
    files = [(saved(tmp_path, kind, f"{kind}{i}"), w) for i, (kind, w) in enumerate(zip(kinds, (0.7, 1.2, -0.5)))]
    expected = with_adapters(files)
    fused = fuse_into(tiny(), files)
    assert adapters.adapter_names(fused) == [] and not adapters.tuner_layers(fused.unet)  # a plain model again
    for got, want in zip(outputs(fused), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (outputs(fused)[0] - outputs(tiny())[0]).abs().max() > 1e-3  # the adapters did change it


def test_merged_model_saves_as_folder_and_single_file(tmp_path):
    files = [(saved(tmp_path, "lora", "a"), 1.0), (saved(tmp_path, "loha", "b"), 0.5)]
    expected = with_adapters(files)
    folder = merge_to_model("tiny", files, tmp_path / "merged")
    for got, want in zip(outputs(load_base_model(str(folder))), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    single = merge_to_model("tiny", files, tmp_path / "merged.safetensors")  # fp16, as checkpoints are shared
    for got, want in zip(outputs(load_base_model(str(single))), expected):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    with pytest.raises(ModelLoadError, match="already exists"):
        merge_to_model("tiny", files, tmp_path / "merged")
    with pytest.raises(ModelLoadError, match="at least one adapter"):
        merge_to_model("tiny", [], tmp_path / "empty")
    assert not (tmp_path / "empty").exists() and not list(tmp_path.glob(".*.tmp"))


def test_merge_command(tmp_path):
    from test_cli import cli

    path = saved(tmp_path, "lokr", "k")
    r = cli("merge", "--base", "tiny", "--adapter", f"{path}@0.5", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "merged" / "model_index.json").is_file()
    r = cli("merge", "--base", "tiny", "--adapter", tmp_path / "missing.safetensors", "--out", tmp_path / "m2")
    assert r.returncode == 2 and "not found" in r.stderr and not (tmp_path / "m2").exists()
