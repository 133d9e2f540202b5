"""DoRA: the weight peft trains is the weight other tools compute from our files, and their files load here.

peft's DoRA (LoraConfig(use_dora=True)) makes each layer's weight m / |row of W + dW| x (W + dW), dW = alpha / rank
x B @ A, m learned per output row. ComfyUI and Forge apply a kohya file's output-axis `dora_scale` s as
s / (|row of W| + eps) x (W + dW), and LyCORIS as s / (|row of W + dW| + eps) x (W + dW); an input-axis one (per
column) both read as s / (|column of W + dW| + eps). `comfyui_weight` below writes out ComfyUI's rule
(comfy/weight_adapter/base.py `weight_decompose` with lora.py's LoRA difference, read from its source); the export
is checked against it layer by layer, for linear and convolution layers and FLUX's fused layers. LyCORIS' own
module code (lycoris-lora, requirements-dev.txt) makes the community files the import is checked against.
"""
from __future__ import annotations

import json

import pytest
import torch
from lycoris.modules.locon import LoConModule
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_adapters import make_cfg, randomise, tiny, unet_out

from core import adapters, community, formats
from core.weights import row_norms
from core.errors import ModelLoadError

EPS = torch.finfo(torch.float32).eps


def comfyui_weight(w: torch.Tensor, tensors: dict[str, torch.Tensor], name: str, strength: float = 1.0) -> torch.Tensor:
    """The weight ComfyUI (and Forge, the same code) makes of base weight `w` from kohya module `name` of a file."""
    up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
    alpha = tensors[f"{name}.alpha"].item() / down.shape[0]
    calc = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * alpha
    scale = tensors[f"{name}.dora_scale"]
    if scale.shape[0] == w.shape[0]:  # per output row: the base weight's row lengths
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    else:  # per input column: those of W + dW
        norm = calc.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(w.shape[1], *[1] * (w.dim() - 1))
        norm = norm.transpose(0, 1)
    calc = calc * (scale / (norm + EPS))
    return w + strength * (calc - w)


def adapted_dora(seed: int = 0):
    """A tiny SD model with a DoRA on the UNet (linear and conv layers) and the text encoder, weights as after
    training: random low-rank factors, each row's length within 20% of the base's."""
    cfg = make_cfg("dora", True, unet_targets=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"])
    base = tiny()
    specs = adapters.specs_from_config(cfg)
    adapters.inject_all(base.parts, specs)
    randomise(base, seed=seed, scale=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in dora_layers(base.parts).values():
            m = layer.lora_magnitude_vector["default"].weight
            lengths = row_norms(adapters.base_weight(layer))
            m.copy_((lengths * (1 + 0.2 * torch.randn(lengths.shape, generator=g))).reshape(m.shape))
    return base, specs


def dora_layers(parts, name: str = "default") -> dict[tuple[str, str], BaseTunerLayer]:
    return {(part, path): layer for part, module in parts.items() for path, layer in module.named_modules()
            if isinstance(layer, BaseTunerLayer) and adapters.is_dora(layer, name)}


def with_weight(layer: torch.nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What `layer`'s base layer outputs for `x` with `weight` in place of its own (bias, stride, padding kept)."""
    base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
    if isinstance(base, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight, base.bias)
    return torch.nn.functional.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)


def probe(layer: torch.nn.Module) -> torch.Tensor:
    w = adapters.base_weight(layer)
    g = torch.Generator().manual_seed(w.numel())
    return torch.randn((3, w.shape[1]) if w.dim() == 2 else (2, w.shape[1], 6, 6), generator=g)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dora")
    base, specs = adapted_dora()
    ours = adapters.save_adapter(tmp / "ours.safetensors", base.parts, specs, {"steps": 5})
    out = formats.export_adapter(ours, tmp / "kohya.safetensors")
    return base, ours, out


def test_export_is_what_comfyui_computes_for_every_layer(exported):
    """Every DoRA layer (linear and convolution, UNet and text encoder): ComfyUI's weight from the exported file
    gives the outputs the trained layer gives, to float32 rounding; and it is a real change."""
    base, _, out = exported
    tensors = load_file(str(out))
    kinds = set()
    for (part, path), layer in dora_layers(base.parts).items():
        w = adapters.base_weight(layer)
        comfy = comfyui_weight(w, tensors, community.kohya_name(part, path))
        x = probe(layer)
        with torch.no_grad():
            trained = layer(x)
        torch.testing.assert_close(with_weight(layer, comfy, x), trained, atol=1e-5, rtol=1e-5, msg=path)
        assert (trained - with_weight(layer, w, x)).abs().max() > 1e-3, path
        kinds.add((part, type(layer.get_base_layer()).__name__))
    assert kinds == {("unet", "Linear"), ("unet", "Conv2d"), ("text_encoder", "Linear")}


def test_dora_scale_is_per_output_row_and_metadata_says_whose(exported):
    _, _, out = exported
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        scales = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".dora_scale")}
        ups = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".lora_up.weight")}
    assert scales and len(scales) == len(ups)
    for key, scale in scales.items():
        up = ups[key.replace(".dora_scale", ".lora_up.weight")]
        assert scale.shape == (up.shape[0], *[1] * (up.dim() - 1))  # (out, 1) or (out, 1, 1, 1)
    assert meta[formats.DORA_CONVENTION] == "comfyui"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lora", "dora_wd": "True"}


def test_comfyui_strength_is_the_playground_weight(exported):
    """ComfyUI applies a strength s as W + s (W' - W); the playground's weight does the same for a DoRA."""
    _, ours, out = exported
    tensors = load_file(str(out))
    model = tiny()
    adapters.load_into(model.parts, adapters.read_adapter(ours), "a")
    for strength in (0.0, 0.6, 1.5):
        adapters.set_weights(model.parts, {"a": strength})
        for (part, path), layer in dora_layers(model.parts, "a").items():
            comfy = comfyui_weight(adapters.base_weight(layer), tensors, community.kohya_name(part, path), strength)
            x = probe(layer)
            with torch.no_grad():
                torch.testing.assert_close(with_weight(layer, comfy, x), layer(x), atol=1e-5, rtol=1e-5)


def test_merge_at_a_weight_equals_the_playground(tmp_path, exported):
    from core.merge import fuse_into

    _, ours, _ = exported
    model = tiny()
    adapters.load_into(model.parts, adapters.read_adapter(ours), "a")
    adapters.set_weights(model.parts, {"a": 0.7})
    want = unet_out(model)
    merged = fuse_into(tiny(), [(ours, 0.7)])
    assert not adapters.tuner_layers(merged.unet)
    torch.testing.assert_close(unet_out(merged), want, atol=1e-5, rtol=1e-5)
    assert (want - unet_out(tiny())).abs().max() > 1e-3


def test_our_export_imports_back_as_trained(tmp_path, exported):
    base, _, out = exported
    imported = adapters.read_adapter(out)
    assert imported.type == "dora"
    model = tiny()
    adapters.load_into(model.parts, imported, "k")
    torch.testing.assert_close(unet_out(model), unet_out(base), atol=1e-5, rtol=1e-5)
    # read as LyCORIS means its files (no metadata saying otherwise), the same numbers give another model
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(out)), str(bare))
    other = tiny()
    adapters.load_into(other.parts, adapters.read_adapter(bare), "k")
    assert (unet_out(other) - unet_out(base)).abs().max() > 1e-3


def lycoris_dora_file(path, wd_on_out: bool = True, seed: int = 0):
    """A DoRA file as LyCORIS writes one (its LoConModule with weight decomposition, its state dict under kohya
    names), for a UNet attention layer, a UNet convolution and a text-encoder projection of the tiny model; returns
    {(part, module): the weight LyCORIS computes with}."""
    plain = tiny()
    chosen = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
              ("unet", "down_blocks.0.resnets.0.conv1"), ("text_encoder", "encoder.layers.0.self_attn.q_proj")]
    g = torch.Generator().manual_seed(seed)
    tensors, weights = {}, {}
    for part, module in chosen:
        name = community.kohya_name(part, module)
        lyco = LoConModule(name, plain.parts[part].get_submodule(module), 1.0, lora_dim=4, alpha=2,
                           weight_decompose=True, wd_on_out=wd_on_out)
        with torch.no_grad():
            for p in (lyco.lora_up.weight, lyco.lora_down.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            lyco.dora_scale.mul_(1 + 0.2 * torch.randn(lyco.dora_scale.shape, generator=g))
            weights[(part, module)] = lyco.get_merged_weight()[0].float()
        tensors.update({f"{name}.{k}": v.detach().float().contiguous() for k, v in lyco.custom_state_dict().items()})
    save_file(tensors, str(path))
    return weights


def test_a_lycoris_dora_file_loads_as_lycoris_applies_it(tmp_path):
    weights = lycoris_dora_file(tmp_path / "lyco.safetensors")
    model = tiny()
    imported = adapters.read_adapter(tmp_path / "lyco.safetensors")
    assert imported.type == "dora"
    adapters.load_into(model.parts, imported, "c")
    for (part, module), want in weights.items():
        layer = model.parts[part].get_submodule(module)
        x = probe(layer)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), with_weight(layer, want, x), atol=1e-5, rtol=1e-5, msg=module)


def test_peft_named_dora_files_load(tmp_path, exported):
    """diffusers / peft save a DoRA with its `lora_magnitude_vector`s: under the parts' prefixes (our diffusers
    export is one), or, from diffusers' kohya converter, under kohya names with the module path's last dot left
    (`lora_unet_..._attn1.to_k.lora_magnitude_vector`); both load as the trained model."""
    from core.adapter_file import split_key

    base, ours, _ = exported
    peft_file = formats.export_adapter(ours, tmp_path / "peft.safetensors", fmt="diffusers")
    converted = {}
    for key, t in load_file(str(peft_file)).items():  # alpha = rank there: the scale is in lora_B
        part, module, suffix = split_key(key.removesuffix("_vector.weight") + "_vector" if "magnitude" in key else key)
        if suffix == "lora_magnitude_vector":
            head, _, leaf = module.rpartition(".")
            converted[f"{community.kohya_name(part, head)}.{leaf}.{suffix}"] = t
        else:
            kohya = community.kohya_name(part, module)
            converted[f"{kohya}.{formats.PEFT_TO_KOHYA[suffix]}"] = t
            converted[f"{kohya}.alpha"] = torch.tensor(float(t.shape[0] if suffix == "lora_A.weight" else t.shape[1]))
    save_file(converted, str(tmp_path / "converted.safetensors"))
    for path in (peft_file, tmp_path / "converted.safetensors"):
        imported = adapters.read_adapter(path)
        assert imported.type == "dora"
        model = tiny()
        adapters.load_into(model.parts, imported, "p")
        torch.testing.assert_close(unet_out(model), unet_out(base), atol=1e-5, rtol=1e-5, msg=str(path))


def test_a_dora_file_with_lengths_per_input_column_loads_as_the_tools_apply_it(tmp_path):
    """Older LyCORIS (and OneTrainer) files keep dora_scale per input column, which every tool reads alike (ComfyUI's
    rule, LyCORIS' module): loaded here on a peft LoRA layer with ColumnDora, the layer computes that weight; a
    strength scales the whole change, and a merge gives the same model."""
    from core.merge import fuse_into

    path = tmp_path / "columns.safetensors"
    weights = lycoris_dora_file(path, wd_on_out=False, seed=3)
    tensors = load_file(str(path))
    assert all(t.shape[0] == 1 for k, t in tensors.items() if k.endswith("dora_scale"))
    imported = adapters.read_adapter(path)
    model = tiny()
    adapters.load_into(model.parts, imported, "c")
    resolved = community.resolve_kohya(imported, tiny().parts)
    assert {s.type for s in resolved.specs.values()} == {"dora"}
    assert {s.dora_axis for s in resolved.specs.values()} == {"input"}
    assert all(isinstance(model.parts[p].get_submodule(m).lora_variant["c"], adapters.ColumnDora) for p, m in weights)
    for strength in (1.0, 0.4):
        adapters.set_weights(model.parts, {"c": strength})
        for (part, module), want in weights.items():
            layer = model.parts[part].get_submodule(module)
            w = adapters.base_weight(layer)
            comfy = comfyui_weight(w, tensors, community.kohya_name(part, module), strength)
            torch.testing.assert_close(comfy, w + strength * (want - w), atol=1e-5, rtol=1e-5)  # two readings agree
            x = probe(layer)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), with_weight(layer, comfy, x), atol=1e-5, rtol=1e-5, msg=module)
    adapters.set_weights(model.parts, {"c": 0.4})
    merged = fuse_into(tiny(), [(path, 0.4)])
    torch.testing.assert_close(unet_out(merged), unet_out(model), atol=1e-5, rtol=1e-5)


def test_flux_fused_layers_export_as_comfyui_computes_them_and_import_back(tmp_path, instance_dir):
    """FLUX.1: q, k, v (and a single block's MLP input, which did not train) are one layer in BFL's layout; the
    exported dora_scale stacks each row's scale, the untrained rows' keep W as it is, and ComfyUI's rule on the
    fused layer gives the trained layers' weights stacked. The file imports back as the trained model."""
    from test_flux import tiny_flux, trained_flux_adapter

    path = trained_flux_adapter(tmp_path, instance_dir, "dora")
    tensors = load_file(str(formats.export_adapter(path, tmp_path / "kohya.safetensors")))
    model = tiny_flux().freeze()
    adapters.load_into(model.parts, adapters.read_adapter(path), "a")
    layers = dict(model.transformer.named_modules())

    def trained(module: str) -> torch.Tensor:
        layer, base = layers[module], adapters.base_weight(layers[module])
        return adapters.dora_weight(layer, "a", base) if adapters.is_dora(layer, "a") else base

    d, s = "transformer_blocks.0.", "single_transformer_blocks.0."
    fused = {"double_blocks_0_img_attn_qkv": [d + f"attn.to_{x}" for x in "qkv"],
             "double_blocks_0_txt_attn_qkv": [d + f"attn.add_{x}_proj" for x in "qkv"],
             "single_blocks_0_linear1": [s + f"attn.to_{x}" for x in "qkv"] + [s + "proj_mlp"],
             "double_blocks_0_img_attn_proj": [d + "attn.to_out.0"]}
    assert not adapters.is_dora(layers[s + "proj_mlp"], "a")  # not a target: its rows must stay as they are
    for name, members in fused.items():
        base = torch.cat([adapters.base_weight(layers[m]) for m in members])
        want = torch.cat([trained(m) for m in members])
        torch.testing.assert_close(comfyui_weight(base, tensors, f"lora_unet_{name}"), want, atol=1e-5, rtol=1e-5,
                                   msg=name)
        assert (want - base).abs().max() > 1e-4, name
    again = tiny_flux().freeze()
    adapters.load_into(again.parts, adapters.read_adapter(tmp_path / "kohya.safetensors"), "k")
    again_layers = dict(again.transformer.named_modules())
    for module in (m for members in fused.values() for m in members):
        x = probe(layers[module])
        with torch.no_grad():
            torch.testing.assert_close(again_layers[module](x), layers[module](x), atol=1e-5, rtol=1e-5, msg=module)


def test_a_dora_beside_other_adapters_on_a_layer_adds_its_own_change_in_any_order(tmp_path, exported):
    """peft would rescale whatever the adapters before it in the layer added; here each adapter's change is taken
    against the base alone, so the order of the mix does not matter (and a merge adds them up the same way)."""
    from test_formats import adapted

    _, ours, _ = exported
    lora_base, lora_specs = adapted("lora")
    lora = adapters.save_adapter(tmp_path / "lora.safetensors", lora_base.parts, lora_specs, {})
    model = tiny()
    adapters.load_all(model.parts, {"d": adapters.read_adapter(ours), "l": adapters.read_adapter(lora)})
    adapters.set_weights(model.parts, {"d": 0.8, "l": 1.0})
    first = unet_out(model)
    adapters.set_weights(model.parts, {"l": 1.0, "d": 0.8})
    torch.testing.assert_close(unet_out(model), first, atol=1e-5, rtol=1e-5)
    alone = {}
    for name in ("d", "l"):
        adapters.set_weights(model.parts, {name: 0.8 if name == "d" else 1.0})
        alone[name] = unet_out(model)
    assert (first - alone["d"]).abs().max() > 1e-3 and (first - alone["l"]).abs().max() > 1e-3
    layer = dora_layers(model.parts, "d")[("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")]
    x = probe(layer)
    adapters.set_weights(model.parts, {"l": 1.0, "d": 0.8})
    with torch.no_grad():
        both = layer(x)
        adapters.set_weights(model.parts, {"d": 0.8})
        only_d = layer(x)
        adapters.set_weights(model.parts, {"l": 1.0})
        only_l = layer(x)
        adapters.set_weights(model.parts, {})
        torch.testing.assert_close(both, only_d + only_l - layer(x), atol=1e-5, rtol=1e-5)


def test_dora_files_that_cannot_be_used_say_why(tmp_path, exported):
    from core.adapter_file import DORA_NORMS

    _, ours, out = exported
    adapter = adapters.read_adapter(ours)
    stripped = tmp_path / "no-lengths.safetensors"
    save_file({k: v for k, v in adapter.tensors.items() if not k.endswith(DORA_NORMS)}, str(stripped), adapter.metadata)
    with pytest.raises(ModelLoadError, match="no saved row lengths.*Merge it into the model"):
        formats.export_adapter(stripped, tmp_path / "k.safetensors")
    assert not (tmp_path / "k.safetensors").exists()
    tensors = load_file(str(out))
    key = next(k for k in tensors if k.endswith(".dora_scale") and tensors[k].dim() == 2)
    tensors[key] = torch.ones(1, 3)  # neither this layer's outputs nor its inputs
    save_file(tensors, str(tmp_path / "wrong.safetensors"))
    model = tiny()
    with pytest.raises(ModelLoadError, match="has 3 lengths.*for another model"):
        adapters.load_into(model.parts, adapters.read_adapter(tmp_path / "wrong.safetensors"), "w")
    assert adapters.adapter_names(model.parts) == []  # nothing half-loaded


def test_a_file_mixing_row_and_column_lengths_in_one_part_is_refused(tmp_path, exported):
    """A kohya DoRA file whose UNet layers hold lengths per output row for some and per input column for others
    (no tool writes that): one plain message, nothing loaded. Column lengths in every layer of a part load."""
    _, _, out = exported
    tensors = load_file(str(out))
    unet = sorted(k for k in tensors if k.startswith("lora_unet_") and k.endswith(".dora_scale"))
    assert len(unet) >= 2

    def as_columns(key):  # the layer's inputs are the down weight's columns
        down = tensors[key.replace(".dora_scale", ".lora_down.weight")]
        return torch.ones(1, down.shape[1])

    save_file({**tensors, unet[0]: as_columns(unet[0])}, str(tmp_path / "mixed.safetensors"))
    model = tiny()
    with pytest.raises(ModelLoadError, match="mixes DoRA layers with lengths per output row and per input column"):
        adapters.load_into(model.parts, adapters.read_adapter(tmp_path / "mixed.safetensors"), "m")
    assert adapters.adapter_names(model.parts) == []
    save_file({**tensors, **{k: as_columns(k) for k in unet}}, str(tmp_path / "columns.safetensors"))
    adapters.load_into(model.parts, adapters.read_adapter(tmp_path / "columns.safetensors"), "c")
    assert adapters.adapter_names(model.parts) == ["c"]


def test_the_export_command_says_where_a_dora_file_works(cli, tmp_path, exported):
    _, ours, _ = exported
    r = cli("export", "--adapter", ours, "--out", tmp_path / "cli-kohya.safetensors")
    assert r.returncode == 0, r.stderr
    assert "ComfyUI" in r.stderr and "A1111" in r.stderr and "merge the adapter" in r.stderr
    with safe_open(str(tmp_path / "cli-kohya.safetensors"), "pt") as f:
        assert any(k.endswith(".dora_scale") for k in f.keys())


def test_the_lycoris_export_is_what_lycoris_computes(tmp_path, exported):
    """`--format lycoris`: the same file with each DoRA row's scale as LyCORIS reads it (its own module, built
    from the file by its own state-dict loader, gives the trained weight), and it imports back as trained."""
    from lycoris.modules import get_module, make_module

    base, ours, _ = exported
    out = formats.export_adapter(ours, tmp_path / "lyco.safetensors", fmt="lycoris")
    tensors = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        assert f.metadata()[formats.DORA_CONVENTION] == "lycoris"
    plain = tiny()
    for (part, path), layer in dora_layers(base.parts).items():
        name = community.kohya_name(part, path)
        kind, params = get_module(tensors, name)
        lyco = make_module(kind, params, name, plain.parts[part].get_submodule(path))
        with torch.no_grad():
            want = adapters.dora_weight(layer, "default", adapters.base_weight(layer))
            torch.testing.assert_close(lyco.get_merged_weight()[0].float(), want, atol=1e-5, rtol=1e-5, msg=path)
    model = tiny()
    adapters.load_into(model.parts, adapters.read_adapter(out), "l")
    torch.testing.assert_close(unet_out(model), unet_out(base), atol=1e-5, rtol=1e-5)
