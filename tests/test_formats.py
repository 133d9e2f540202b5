"""Export to the kohya / A1111 / ComfyUI / LyCORIS layout, checked against LyCORIS itself, and by diffusers.

LyCORIS (the `lycoris-lora` package, requirements-dev.txt) reads the exported file with its own kohya
loader, against the plain base model; each module's weight delta must equal what peft applies in our
model, layer by layer, to float32 round-off. That checks the names, the tensor layouts and the meaning
of every `.alpha` (LoKr's differs, see core/formats.py).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ADAPTER_TYPES
from lycoris.modules import get_module, make_module
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_adapters import make_cfg, randomise, tiny

from core import adapters, community, formats
from core.errors import ModelLoadError


def adapted(adapter_type: str, **adapter):
    cfg = make_cfg(adapter_type, True, **adapter)
    base = tiny()
    specs = adapters.specs_from_config(cfg)
    adapters.inject_all(base.parts, specs)
    randomise(base, scale=0.2)
    return base, specs


def peft_layers(base) -> dict[str, torch.nn.Module]:
    """Kohya module name -> our peft-wrapped layer."""
    return {community.kohya_name(part, name): module for part in ("unet", "text_encoder")
            for name, module in getattr(base, part).named_modules()
            if isinstance(module, BaseTunerLayer) and "default" in module.active_adapters}


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
    ours = adapters.save_adapter(tmp_path / "ours.safetensors", base.parts, specs, {"steps": 10})
    out = formats.export_adapter(ours, tmp_path / "kohya.safetensors")
    ours_layers, theirs = peft_layers(base), lycoris_layers(out)
    # every module found by its kohya name; the only one more is the zero out_proj diffusers needs (LoRA only)
    extra = {"lora_te_text_model_encoder_layers_0_self_attn_out_proj"} if adapter_type == "lora" else set()
    assert ours_layers and set(theirs) == set(ours_layers) | extra
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in theirs)
    assert any("_conv1" in k for k in theirs)  # conv layers too
    plain_layers = kohya_named_layers(tiny())  # the base layers alone, for the size of each delta
    with torch.no_grad():
        for name, layer in ours_layers.items():
            x = probe(layer)
            base_y, ours_y, theirs_y = plain_layers[name](x), layer(x), theirs[name](x)
            assert (ours_y - base_y).abs().max() > 1e-4, name  # a real delta, not zeros on both sides
            torch.testing.assert_close(theirs_y, ours_y, atol=1e-5, rtol=1e-5, msg=name)
        for name in extra:  # applied by LyCORIS as A1111 / ComfyUI do, it changes nothing
            x = probe(plain_layers[name])
            torch.testing.assert_close(theirs[name](x), plain_layers[name](x), atol=0, rtol=0, msg=name)


def test_lokr_cases_cover_full_and_low_rank_factors(tmp_path):
    """The LoKr cases above include modules with two full factors (scale folded) and with a low-rank one."""
    keys = set()
    for extra in ({}, {"rank": 1, "text_encoder_rank": 1}, {"decompose_both": True}):
        base, specs = adapted("lokr", **extra)
        out = formats.export_adapter(adapters.save_adapter(tmp_path / "a.safetensors", base.parts, specs, {}),
                                     tmp_path / "k.safetensors")
        with safe_open(str(out), "pt") as f:
            keys |= {k.rsplit(".", 1)[-1] for k in f.keys()}
    assert {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w1_a"} <= keys


@pytest.mark.parametrize("adapter_type", ADAPTER_TYPES)
def test_kohya_file_names_and_metadata(tmp_path, adapter_type):
    base, specs = adapted(adapter_type)
    ours = adapters.save_adapter(tmp_path / "star.safetensors", base.parts, specs,
                                 {"steps": 400, "instance_prompt": "a photo of tms star", "learning_rate": 2e-3})
    out = formats.export_adapter(ours, tmp_path / "out" / "star-kohya.safetensors")
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in keys)
    suffixes = {"lora": "lora_down.weight", "dora": "dora_scale", "loha": "hada_w1_a", "lokr": "lokr_w1"}
    assert any(k.endswith(suffixes[adapter_type]) for k in keys)
    modules = {k.split(".")[0] for k in keys}
    assert {m + ".alpha" for m in modules} <= set(keys)  # one alpha per module
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == ("networks.lora" if adapter_type == "lora" else "lycoris.kohya")
    assert (json.loads(meta["ss_network_args"]).get("dora_wd") == "True") == (adapter_type == "dora")
    assert meta["ss_max_train_steps"] == "400" and meta["modelspec.trigger_phrase"] == "a photo of tms star"
    assert not list((tmp_path / "out").glob("*.tmp*"))  # written through a temp file, nothing left over


def test_export_refuses_foreign_files_and_formats(tmp_path):
    base, specs = adapted("lora")
    ours = adapters.save_adapter(tmp_path / "a.safetensors", base.parts, specs, {})
    with pytest.raises(ModelLoadError, match="Unknown export format"):
        formats.export_adapter(ours, tmp_path / "b.safetensors", fmt="ckpt")
    with pytest.raises(ModelLoadError, match="already in the kohya / LyCORIS layout"):
        formats.export_adapter(formats.export_adapter(ours, tmp_path / "k.safetensors"), tmp_path / "again.safetensors")


@pytest.mark.parametrize("adapter_type", ["lora", "dora"])
def test_diffusers_export_loads_with_load_lora_weights(tmp_path, adapter_type):
    """diffusers' own loader on the exported LoRA / DoRA gives our model's outputs and our images."""
    from test_adapters import SAMPLE, TIMESTEPS, TOKENS, CONTEXT

    from core.sampling import generate, make_pipeline

    base, specs = adapted(adapter_type)
    ours = adapters.save_adapter(tmp_path / "ours.safetensors", base.parts, specs, {"steps": 3})
    out = formats.export_adapter(ours, tmp_path / "diffusers.safetensors", fmt="diffusers")
    plain = tiny()
    pipe = make_pipeline(plain)
    pipe.load_lora_weights(str(out), adapter_name="exported")
    with torch.no_grad():
        torch.testing.assert_close(plain.unet(SAMPLE, TIMESTEPS, CONTEXT).sample,
                                   base.unet(SAMPLE, TIMESTEPS, CONTEXT).sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain.text_encoder(TOKENS).last_hidden_state,
                                   base.text_encoder(TOKENS).last_hidden_state, atol=1e-5, rtol=1e-5)
    mine = tiny()
    adapters.load_into(mine.parts, adapters.read_adapter(ours), "ours")
    a = generate(pipe, ["a photo of sks dog"], [5], steps=2, guidance=5.0, size=32)[0]
    b = generate(make_pipeline(mine), ["a photo of sks dog"], [5], steps=2, guidance=5.0, size=32)[0]
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1  # same image (rounding aside)
    assert np.asarray(a).std() > 0
    again = tiny()  # read back as a diffusers LoRA (alpha = rank, the scale folded): the same model again
    adapters.load_into(again.parts, adapters.read_adapter(out), "again")
    with torch.no_grad():
        torch.testing.assert_close(again.unet(SAMPLE, TIMESTEPS, CONTEXT).sample,
                                   base.unet(SAMPLE, TIMESTEPS, CONTEXT).sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("te_targets", [["q_proj", "v_proj"], ["q_proj", "out_proj"], ["k_proj", "fc1"], ["fc2"]])
def test_kohya_export_loads_with_diffusers_load_lora_weights(tmp_path, te_targets):
    """diffusers' own loader reads our kohya LoRA file (the default text encoder targets have no out_proj, from
    which diffusers tells the key style) and gives exactly our peft-adapted text encoder and UNet."""
    from test_adapters import CONTEXT, SAMPLE, TIMESTEPS, TOKENS

    from core.sampling import make_pipeline

    base, specs = adapted("lora", text_encoder_targets=te_targets, text_encoder_alpha=1.0)  # alpha != rank
    kohya = formats.export_adapter(adapters.save_adapter(tmp_path / "a.safetensors", base.parts, specs, {}),
                                   tmp_path / "kohya.safetensors")
    plain = tiny()
    make_pipeline(plain).load_lora_weights(str(kohya), adapter_name="kohya")
    with torch.no_grad():
        te, unet = plain.text_encoder(TOKENS).last_hidden_state, plain.unet(SAMPLE, TIMESTEPS, CONTEXT).sample
        assert (te - tiny().text_encoder(TOKENS).last_hidden_state).abs().max() > 1e-3  # the text encoder part loaded
        torch.testing.assert_close(te, base.text_encoder(TOKENS).last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unet, base.unet(SAMPLE, TIMESTEPS, CONTEXT).sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("adapter_type", ["loha", "lokr"])
def test_diffusers_export_refuses_lycoris_types(tmp_path, adapter_type):
    base, specs = adapted(adapter_type)
    ours = adapters.save_adapter(tmp_path / "a.safetensors", base.parts, specs, {})
    with pytest.raises(ModelLoadError, match="LoRA and DoRA only.*--format kohya"):
        formats.export_adapter(ours, tmp_path / "d.safetensors", fmt="diffusers")
    assert not (tmp_path / "d.safetensors").exists()


# --------------------------------------------------------------------------- importing community files

def outputs_of(base):
    from test_adapters import outputs

    return outputs(base)


@pytest.mark.parametrize("adapter_type,extra", CASES, ids=[f"{t}{'-' + '-'.join(e) if e else ''}" for t, e in CASES])
def test_kohya_files_import_back(tmp_path, adapter_type, extra):
    """ours -> kohya file -> read as a community file -> loaded into a fresh model: the same model."""
    base, specs = adapted(adapter_type, **extra)
    kohya = formats.export_adapter(adapters.save_adapter(tmp_path / "a.safetensors", base.parts, specs, {}),
                                   tmp_path / "community.safetensors")
    f = adapters.read_adapter(kohya)
    assert f.layout == "kohya" and f.type == adapter_type
    fresh = tiny()
    adapters.load_into(fresh.parts, f, "imported")
    for ours, theirs in zip(outputs_of(fresh), outputs_of(base)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_community_locon_with_its_own_ranks_matches_deltas_applied_by_hand(tmp_path):
    """A kohya LoCon as other trainers write it: conv layers at another rank and alpha, one module without
    alpha (= rank). Loaded through peft it must equal the base model with W += up @ down * alpha / rank."""
    g = torch.Generator().manual_seed(7)
    plain, by_hand = tiny(), tiny()
    layers = kohya_named_layers(by_hand)
    chosen = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (4, 2.0),
              "lora_unet_down_blocks_0_resnets_0_conv1": (2, 1.0),
              "lora_unet_up_blocks_1_resnets_0_conv2": (2, 1.0),
              "lora_te_text_model_encoder_layers_0_self_attn_v_proj": (3, None)}
    tensors = {}
    with torch.no_grad():
        for name, (rank, alpha) in chosen.items():
            w = layers[name].weight
            down = torch.randn((rank, *w.shape[1:]), generator=g) * 0.3
            up = torch.randn((w.shape[0], rank, *([1, 1] if w.dim() == 4 else [])), generator=g) * 0.3
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            if alpha is not None:
                tensors[f"{name}.alpha"] = torch.tensor(alpha)
            scale = (alpha if alpha is not None else rank) / rank
            w += (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * scale
    path = tmp_path / "locon.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    f = adapters.read_adapter(path)
    adapters.load_into(plain.parts, f, "locon")
    for ours, theirs in zip(outputs_of(plain), outputs_of(by_hand)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keys,message", [
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "an adapter for Stable Diffusion XL"),
    (["model.diffusion_model.input_blocks.0.0.weight"], "whole model checkpoint"),
    (["something.else"], "layout is unknown"),
    (["lora_unet_input_blocks_40_1_proj_in.lora_down.weight", "lora_unet_input_blocks_40_1_proj_in.lora_up.weight"],
     "another model family"),
    (["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight",
      "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"], "another model family"),
])
def test_foreign_files_that_cannot_load_say_why(tmp_path, keys, message):
    path = tmp_path / "foreign.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    fresh = tiny()
    before = [o.clone() for o in outputs_of(fresh)]
    with pytest.raises(ModelLoadError, match=message):
        adapters.load_into(fresh.parts, adapters.read_adapter(path), "x")
    assert adapters.adapter_names(fresh.parts) == []  # nothing loaded half-way
    for a, b in zip(outputs_of(fresh), before):
        torch.testing.assert_close(a, b)


def test_original_sd_layer_names_of_sd15():
    """Older A1111-era files name UNet layers as the original SD code did; these are SD 1.5's."""
    from types import SimpleNamespace

    from core.single_file import read_config_folder, shipped_config_folder, unet_module_ldm_names

    unet = SimpleNamespace(config=read_config_folder(shipped_config_folder("sd1", "epsilon"))["unet"])
    expected = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.resnets.0.conv1": "input_blocks.4.0.in_layers.2",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0": "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0",
        "up_blocks.3.attentions.2.proj_out": "output_blocks.11.1.proj_out",
        "time_embedding.linear_1": "time_embed.0",
    }
    assert unet_module_ldm_names(unet, list(expected)) == expected


@pytest.mark.parametrize("adapter_type", ["lora", "loha"])
def test_files_with_original_sd_layer_names_load(tmp_path, adapter_type):
    """The same adapter named the diffusers way and the original-SD way (input_blocks ...) loads the same."""
    from core.single_file import unet_module_ldm_names

    base, specs = adapted(adapter_type)
    kohya = formats.export_adapter(adapters.save_adapter(tmp_path / "a.safetensors", base.parts, specs, {}),
                                   tmp_path / "diffusers-names.safetensors")
    plain = tiny()
    layers = [n for n, m in plain.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    rename = {community.kohya_name("unet", n): "lora_unet_" + ldm.replace(".", "_")
              for n, ldm in unet_module_ldm_names(plain.unet, layers).items()}
    old = {}
    for key, tensor in load_file(str(kohya)).items():
        module, _, rest = key.partition(".")
        old[f"{rename.get(module, module)}.{rest}"] = tensor
    assert any(k.startswith("lora_unet_input_blocks_") for k in old) and any("output_blocks" in k for k in old)
    path = tmp_path / "sd-names.safetensors"
    save_file(old, str(path))
    adapters.load_into(plain.parts, adapters.read_adapter(path), "old")
    for ours, theirs in zip(outputs_of(plain), outputs_of(base)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_describe_ours_and_community_files(tmp_path):
    base, specs = adapted("lokr")
    ours = adapters.save_adapter(tmp_path / "star.safetensors", base.parts, specs,
                                 {"steps": 400, "instance_prompt": "a photo of tms star", "base_model": "demo",
                                  "family": "sd1"})  # as training_metadata records it
    text = community.describe(adapters.read_adapter(ours))
    assert "LoKr rank 4" in text and "trigger: `a photo of tms star`" in text and "base model: demo" in text
    assert "text encoder, for Stable Diffusion 1.x;" in text  # the family the file records
    kohya = formats.export_adapter(ours, tmp_path / "star-kohya.safetensors")
    text = community.describe(adapters.read_adapter(kohya))
    assert "LoKr rank 4" in text and "UNet + text encoder" in text and "400 steps" in text
    assert "for Stable Diffusion 1.x" in text  # from kohya's ss_base_model_version
    tags = json.dumps({"10_tms star": {"tms star": 5, "star": 2}})
    save_file(load_file(str(kohya)), str(tmp_path / "tagged.safetensors"), metadata={"ss_tag_frequency": tags})
    assert "trigger: `tms star, star`" in community.describe(adapters.read_adapter(tmp_path / "tagged.safetensors"))


def test_a_kohya_file_mixing_adapter_kinds_is_refused_when_read(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 2), "lora_unet_a.lora_up.weight": torch.zeros(2, 2),
               "lora_unet_b.hada_w1_a": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match="mixes adapter kinds"):
        adapters.read_adapter(path)
