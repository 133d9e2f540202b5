"""Fusing adapters into the base model: the merged model equals base + adapters."""
from __future__ import annotations

import pytest
import torch
from test_adapters import make_cfg, outputs, randomise, tiny
from test_formats import adapted

from core import adapters
from core.errors import ModelLoadError
from core.merge import fuse_into, lora_pairs, merge_loras, merge_to_model
from core.models import load_base_model


def saved(tmp_path, kind, seed_name, **extra):
    base, specs = adapted(kind, **extra)
    return adapters.save_adapter(tmp_path / f"{seed_name}.safetensors", base.parts, specs, {"steps": 1})


def with_adapters(files):
    model = tiny()
    order = sorted(files, key=lambda f: adapters.read_adapter(f[0]).type not in ("lora", "dora"))  # LoRA layers first
    for i, (path, _) in enumerate(order):
        adapters.load_into(model.parts, adapters.read_adapter(path), f"x{i}")
    adapters.set_weights(model.parts, {f"x{i}": w for i, (_, w) in enumerate(order)})
    return outputs(model)


@pytest.mark.parametrize("kinds", [("lora",), ("dora",), ("loha",), ("lokr",), ("lora", "loha", "lokr"), ("dora", "lora", "lokr")])
def test_fused_model_equals_base_plus_adapters(tmp_path, kinds):
    files = [(saved(tmp_path, kind, f"{kind}{i}"), w) for i, (kind, w) in enumerate(zip(kinds, (0.7, 1.2, -0.5)))]
    expected = with_adapters(files)
    fused = fuse_into(tiny(), files)
    assert adapters.adapter_names(fused.parts) == [] and not adapters.tuner_layers(fused.unet)  # a plain model again
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


def test_merge_command(tmp_path, cli):
    path = saved(tmp_path, "lokr", "k")
    r = cli("merge", "--base", "tiny", "--adapter", f"{path}@0.5", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "merged" / "model_index.json").is_file()
    r = cli("merge", "--base", "tiny", "--adapter", tmp_path / "missing.safetensors", "--out", tmp_path / "m2")
    assert r.returncode == 2 and "not found" in r.stderr and not (tmp_path / "m2").exists()
    r = cli("merge", "--adapter", path, "--out", tmp_path / "m3")
    assert r.returncode == 2 and "--base" in r.stderr and not (tmp_path / "m3").exists()


def test_merge_command_into_one_lora(tmp_path, cli):
    (a, _), (b, _) = two_loras(tmp_path)
    r = cli("merge", "--into", "lora", "--adapter", f"{a}@0.5", "--adapter", f"{b}@0.5", "--rank", "2",
            "--out", tmp_path / "ab.safetensors")
    assert r.returncode == 0, r.stderr
    merged = adapters.read_adapter(tmp_path / "ab.safetensors")
    assert merged.type == "lora" and max(t.shape[0] for k, t in merged.tensors.items() if "lora_A" in k) == 2


# --- several LoRAs into one LoRA ---------------------------------------------------------------------------------

def lora_file(tmp_path, name, seed, **adapter):
    cfg = make_cfg("lora", **adapter)
    base, specs = tiny(), adapters.specs_from_config(cfg)
    adapters.inject_all(base.parts, specs)
    randomise(base, seed=seed, scale=0.2)
    return adapters.save_adapter(tmp_path / f"{name}.safetensors", base.parts, specs, {"instance_prompt": f"{name} dog"})


def two_loras(tmp_path):
    """Different ranks, alphas, target sets and parts: the merged file needs per-module ranks."""
    a = lora_file(tmp_path, "a", 1, rank=4, alpha=2)
    b = lora_file(tmp_path, "b", 2, rank=2, alpha=8, train_text_encoder=False, unet_targets=["to_q", "to_v", "conv1"])
    return [(a, 0.7), (b, -0.4)]


def test_loras_merge_into_one_lora_exactly(tmp_path):
    files = two_loras(tmp_path)
    expected = with_adapters(files)
    out = merge_loras(files, tmp_path / "merged.safetensors")
    merged = adapters.read_adapter(out)
    assert merged.type == "lora" and set(merged.specs) == {"unet", "text_encoder"}
    assert merged.metadata["merged_from"] == "a×0.7 + b×-0.4" and merged.metadata["instance_prompt"] == "a dog, b dog"
    ranks = {t.shape[0] for k, t in merged.tensors.items() if k.startswith("unet.") and k.endswith("lora_A.weight")}
    assert ranks == {4, 6}  # modules only `a` adapts keep rank 4; shared ones stack to 4 + 2
    model = tiny()
    adapters.load_into(model.parts, merged, "merged")
    for got, want in zip(outputs(model), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (outputs(model)[0] - outputs(tiny())[0]).abs().max() > 1e-3


def test_lora_merge_reads_kohya_files_against_the_base_model(tmp_path):
    from core.formats import export_adapter

    (a, wa), (b, wb) = two_loras(tmp_path)
    kohya = export_adapter(b, tmp_path / "b-kohya.safetensors")
    expected = with_adapters([(a, wa), (b, wb)])
    with pytest.raises(ModelLoadError, match="choose the base model"):
        merge_loras([(a, wa), (kohya, wb)], tmp_path / "x.safetensors")
    out = merge_loras([(a, wa), (kohya, wb)], tmp_path / "m.safetensors", base_spec="tiny")
    model = tiny()
    adapters.load_into(model.parts, adapters.read_adapter(out), "m")
    for got, want in zip(outputs(model), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lora_merge_to_a_smaller_rank_is_the_best_approximation(tmp_path):
    files = two_loras(tmp_path)
    exact = adapters.read_adapter(merge_loras(files, tmp_path / "exact.safetensors"))
    small = adapters.read_adapter(merge_loras(files, tmp_path / "small.safetensors", rank=3))
    exact_pairs, small_pairs = lora_pairs(exact), lora_pairs(small)
    assert small_pairs.keys() == exact_pairs.keys()
    for key, (a, b) in exact_pairs.items():
        sa, sb = small_pairs[key]
        assert sa.shape[0] == min(3, a.shape[0]) and sa.shape[1:] == a.shape[1:] and sb.shape[0] == b.shape[0]
        delta, approx = b.flatten(1) @ a.flatten(1), sb.flatten(1) @ sa.flatten(1)
        singular = torch.linalg.svdvals(delta)
        best_error = singular[3:].square().sum().sqrt()  # Eckart-Young: nothing of rank 3 is closer
        assert torch.isclose((delta - approx).norm(), best_error, rtol=1e-3, atol=1e-5)


def test_lora_merge_refuses_loha_and_bad_input(tmp_path):
    files = two_loras(tmp_path)
    loha = saved(tmp_path, "loha", "h")
    with pytest.raises(ModelLoadError, match="only LoRAs merge into one LoRA"):
        merge_loras(files + [(loha, 1.0)], tmp_path / "x.safetensors")
    with pytest.raises(ModelLoadError, match="at least one"):
        merge_loras([], tmp_path / "x.safetensors")
    with pytest.raises(ModelLoadError, match="rank must be 1 or more"):
        merge_loras(files, tmp_path / "x.safetensors", rank=0)
    assert not (tmp_path / "x.safetensors").exists()
