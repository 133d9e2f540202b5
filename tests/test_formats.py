"""Export to the kohya / A1111 / ComfyUI / LyCORIS layout, checked against LyCORIS itself (issue 5, part 1).

LyCORIS (the `lycoris-lora` package, requirements-dev.txt) reads the exported file with its own kohya
loader, against the plain base model; each module's weight delta must equal what peft applies in our
model, layer by layer, to float32 round-off. That checks the names, the tensor layouts and the meaning
of every `.alpha` (LoKr's differs, see core/formats.py).
"""
from __future__ import annotations

import pytest
import torch
from conftest import ADAPTER_TYPES
from lycoris.modules import get_module, make_module
from safetensors import safe_open
from safetensors.torch import load_file
from test_adapters import make_cfg, randomise, tiny

from core import adapters, formats
from core.errors import ModelLoadError


def adapted(adapter_type: str, **adapter):
    cfg = make_cfg(adapter_type, True, **adapter)
    base = tiny()
    specs = adapters.specs_from_config(cfg)
    adapters.inject_all(base, specs)
    randomise(base, scale=0.2)
    return base, specs


def peft_layers(base) -> dict[str, torch.nn.Module]:
    """Kohya module name -> our peft-wrapped layer."""
    return {formats.kohya_name(part, name): module for part in ("unet", "text_encoder")
            for name, module in getattr(base, part).named_modules()
            if isinstance(module, adapters.BaseTunerLayer) and "default" in module.active_adapters}


def kohya_named_layers(base) -> dict[str, torch.nn.Module]:
    """Every layer of a plain base model under the name kohya-style loaders give it."""
    text_encoder = torch.nn.ModuleDict({"text_model": base.text_encoder})  # kohya names have this level
    return {f"{prefix}_{name}".replace(".", "_"): module
            for prefix, model in (("lora_unet", base.unet), ("lora_te", text_encoder))
            for name, module in model.named_modules()}


def lycoris_layers(path) -> dict[str, torch.nn.Module]:
    """Kohya module name -> a plain base-model layer running LyCORIS's forward with the exported weights.

    The name lookup is LyCORIS's (as in lycoris.kohya.create_network_from_weights, whose default network
    refuses our tiny UNet); LyCORIS's own module classes read the tensors and the alpha. Outputs, not
    `get_diff_weight`, are compared: in lycoris-lora 4.1.3 that applies the LoHa/LoKr scale twice, while its
    forward (what inference uses) applies it once."""
    by_name = kohya_named_layers(tiny())
    weights = load_file(str(path))
    out = {}
    for lora_name in sorted({k.split(".")[0] for k in weights}):
        kind, params = get_module(weights, lora_name)
        assert kind is not None, f"LyCORIS does not recognise {lora_name}"
        make_module(kind, params, lora_name, by_name[lora_name]).apply_to()
        out[lora_name] = by_name[lora_name]
    return out


def probe(layer: torch.nn.Module) -> torch.Tensor:
    weight = layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight
    g = torch.Generator().manual_seed(weight.numel())
    shape = (3, weight.shape[1]) if weight.dim() == 2 else (1, weight.shape[1], 6, 6)
    return torch.randn(shape, generator=g)


CASES = [("lora", {}), ("loha", {}), ("lokr", {}), ("lokr", {"rank": 1, "text_encoder_rank": 1}),
         ("lokr", {"decompose_both": True})]


@pytest.mark.parametrize("adapter_type,extra", CASES, ids=[f"{t}{'-' + '-'.join(e) if e else ''}" for t, e in CASES])
def test_kohya_export_matches_lycoris(tmp_path, adapter_type, extra):
    base, specs = adapted(adapter_type, **extra)
    ours = adapters.save_adapter(tmp_path / "ours.safetensors", base, specs, {"steps": 10})
    out = formats.export_adapter(ours, tmp_path / "kohya.safetensors")
    ours_layers, theirs = peft_layers(base), lycoris_layers(out)
    assert ours_layers and set(theirs) == set(ours_layers)  # every module found by its kohya name, none left over
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in theirs)
    assert any("_conv1" in k for k in theirs)  # conv layers too
    plain_layers = kohya_named_layers(tiny())  # the base layers alone, for the size of each delta
    with torch.no_grad():
        for name, layer in ours_layers.items():
            x = probe(layer)
            base_y, ours_y, theirs_y = plain_layers[name](x), layer(x), theirs[name](x)
            assert (ours_y - base_y).abs().max() > 1e-4, name  # a real delta, not zeros on both sides
            torch.testing.assert_close(theirs_y, ours_y, atol=1e-5, rtol=1e-5, msg=name)


def test_lokr_cases_cover_full_and_low_rank_factors(tmp_path):
    """The LoKr cases above include modules with two full factors (scale folded) and with a low-rank one."""
    keys = set()
    for extra in ({}, {"rank": 1, "text_encoder_rank": 1}, {"decompose_both": True}):
        base, specs = adapted("lokr", **extra)
        out = formats.export_adapter(adapters.save_adapter(tmp_path / "a.safetensors", base, specs, {}),
                                     tmp_path / "k.safetensors")
        with safe_open(str(out), "pt") as f:
            keys |= {k.rsplit(".", 1)[-1] for k in f.keys()}
    assert {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w1_a"} <= keys


@pytest.mark.parametrize("adapter_type", ADAPTER_TYPES)
def test_kohya_file_names_and_metadata(tmp_path, adapter_type):
    base, specs = adapted(adapter_type)
    ours = adapters.save_adapter(tmp_path / "star.safetensors", base, specs,
                                 {"steps": 400, "instance_prompt": "a photo of tms star", "learning_rate": 2e-3})
    out = formats.export_adapter(ours, tmp_path / "out" / "star-kohya.safetensors")
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in keys)
    suffixes = {"lora": "lora_down.weight", "loha": "hada_w1_a", "lokr": "lokr_w1"}
    assert any(k.endswith(suffixes[adapter_type]) for k in keys)
    modules = {k.split(".")[0] for k in keys}
    assert {m + ".alpha" for m in modules} <= set(keys)  # one alpha per module
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == ("networks.lora" if adapter_type == "lora" else "lycoris.kohya")
    assert meta["ss_max_train_steps"] == "400" and meta["modelspec.trigger_phrase"] == "a photo of tms star"
    assert not list((tmp_path / "out").glob("*.tmp*"))  # written through a temp file, nothing left over


def test_export_refuses_foreign_files_and_formats(tmp_path):
    base, specs = adapted("lora")
    ours = adapters.save_adapter(tmp_path / "a.safetensors", base, specs, {})
    with pytest.raises(ModelLoadError, match="Unknown export format"):
        formats.export_adapter(ours, tmp_path / "b.safetensors", fmt="ckpt")
    with pytest.raises(ModelLoadError, match="not written by this app"):
        formats.export_adapter(formats.export_adapter(ours, tmp_path / "k.safetensors"), tmp_path / "again.safetensors")
