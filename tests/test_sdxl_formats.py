"""SDXL adapter files: kohya / A1111 / ComfyUI export with SGM names, diffusers export, import of community files,
and merges, each checked by code that is not ours (LyCORIS, diffusers) or against the single-file layout.

The kohya export must name every UNet module as the original SGM layout does (the layout core/single_file.py
writes: `model.diffusion_model.input_blocks.4.1...`), CLIP-L `lora_te1_` and OpenCLIP-G `lora_te2_` with CLIP's
names, which A1111 / ComfyUI map onto OpenCLIP's fused `attn.in_proj_weight`.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lycoris.functional import factorization
from lycoris.modules import get_module, make_module
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_adapters import TOKENS, make_cfg
from test_sdxl_parts import unet_out

from core import adapters, families, formats
from core.base_model import BaseModel
from core.errors import ModelLoadError
from core.families.sdxl_parts import build_tiny_sdxl, save_sdxl_folder
from core.single_file import save_single_file, unet_module_ldm_names

SDXL = families.get("sdxl")
PARTS = ("unet", "text_encoder", "text_encoder_2")
CASES = [("lora", {}), ("loha", {}), ("lokr", {}), ("lokr", {"rank": 1, "text_encoder_rank": 1}),
         ("lokr", {"decompose_both": True})]
IDS = [f"{t}{'-' + '-'.join(e) if e else ''}" for t, e in CASES]


def tiny_xl() -> BaseModel:
    return build_tiny_sdxl(seed=0).freeze()


def adapted_xl(adapter_type: str, text_encoders: bool = True, seed: int = 0, **adapter):
    """A tiny SDXL with adapter "default" on the UNet (and both encoders), given random trained-like weights."""
    base = tiny_xl()
    specs = adapters.specs_from_config(make_cfg(adapter_type, text_encoders, **adapter), SDXL.text_encoders)
    adapters.inject_all(base.parts, specs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in specs:
            for name, p in base.parts[part].named_parameters():
                if ".default." in f".{name}.":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return base, specs


def saved_xl(tmp_path, name: str, adapter_type: str, **extra):
    base, specs = adapted_xl(adapter_type, **extra)
    path = adapters.save_adapter(tmp_path / f"{name}.safetensors", base.parts, specs,
                                 {"family": "sdxl", "base_model": "tiny-sdxl", "steps": 5})
    return base, path


@torch.no_grad()
def outputs_xl(base: BaseModel) -> tuple[torch.Tensor, ...]:
    return (unet_out(base), base.text_encoder(TOKENS).last_hidden_state,
            base.text_encoder_2(TOKENS).last_hidden_state, base.text_encoder_2(TOKENS).text_embeds)


def assert_same_outputs(a: BaseModel, b: BaseModel, atol: float = 1e-5) -> None:
    for x, y in zip(outputs_xl(a), outputs_xl(b)):
        torch.testing.assert_close(x, y, atol=atol, rtol=atol)


def assert_changed(model: BaseModel) -> None:
    """Every part's output moved: the adapter reached the UNet and both encoders."""
    for x, y in zip(outputs_xl(model), outputs_xl(tiny_xl())):
        assert (x - y).abs().max() > 1e-4


# --- the SGM layout of the single file, as A1111 / ComfyUI look layers up by kohya name -------------------------

OPEN_CLIP = {"mlp_fc1": "mlp.c_fc", "mlp_fc2": "mlp.c_proj", "self_attn_out_proj": "attn.out_proj"}


@pytest.fixture(scope="module")
def sgm_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    """kohya module name -> the base weight the single file (SGM layout) holds for it."""
    state = load_file(str(save_single_file(tiny_xl(), tmp_path_factory.mktemp("sgm") / "xl.safetensors", dtype=None)))
    out = {}
    for key, tensor in state.items():
        if not key.endswith("weight") or tensor.dim() not in (2, 4):
            continue
        if key.startswith("model.diffusion_model."):
            out["lora_unet_" + key[22:-7].replace(".", "_")] = tensor
        elif key.startswith("conditioner.embedders.0.transformer.text_model."):
            out["lora_te1_text_model_" + key[47:-7].replace(".", "_")] = tensor
        elif key.startswith("conditioner.embedders.1.model.transformer.resblocks."):
            layer, rest = key[52:].split(".", 1)
            prefix = f"lora_te2_text_model_encoder_layers_{layer}_"
            if rest == "attn.in_proj_weight":  # q, k and v stacked, as OpenCLIP fuses them
                for name, chunk in zip(("q", "k", "v"), tensor.chunk(3)):
                    out[f"{prefix}self_attn_{name}_proj"] = chunk
            out.update({prefix + ours: tensor for ours, theirs in OPEN_CLIP.items() if rest == f"{theirs}.weight"})
    return out


def plain_layer(weight: torch.Tensor) -> torch.nn.Module:
    """A bare layer holding `weight` (a convolution without padding: its delta is compared, not its output)."""
    if weight.dim() == 2:
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    else:
        layer = torch.nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], bias=False)
    layer.weight.data.copy_(weight)
    return layer


def probe(weight: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(weight.numel())
    return torch.randn((4, weight.shape[1], *weight.shape[2:]), generator=g)


def apply_delta(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return F.linear(x, delta) if delta.dim() == 2 else F.conv2d(x, delta)


def our_layers(base: BaseModel, exported_modules) -> dict[str, torch.nn.Module]:
    """kohya name -> our peft-wrapped layer, by the names the export gives them."""
    out = {}
    for part in PARTS:
        layers = {n: m for n, m in base.parts[part].named_modules()
                  if isinstance(m, BaseTunerLayer) and "default" in m.active_adapters}
        if layers:
            out.update({name: layers[m] for m, name in SDXL.export_names(part, list(layers)).items()})
    assert set(out) <= set(exported_modules)
    return out


@pytest.mark.parametrize("adapter_type,extra", CASES, ids=IDS)
def test_kohya_export_names_sgm_modules_and_lycoris_applies_our_delta(tmp_path, sgm_weights, adapter_type, extra):
    """Every exported module is a real layer of the SGM single file (its base weight is the very weight our
    layer wraps), and LyCORIS's own modules, reading the exported tensors and alpha, add our delta to it."""
    base, ours = saved_xl(tmp_path, "ours", adapter_type, **extra)
    weights = load_file(str(formats.export_adapter(ours, tmp_path / "kohya.safetensors")))
    modules = sorted({k.split(".")[0] for k in weights})
    assert {m for m in modules if not m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                                    "lora_unet_output_blocks_", "lora_te1_text_model_encoder_",
                                                    "lora_te2_text_model_encoder_"))} == set()
    assert all(any(m.startswith(p) for m in modules) for p in ("lora_unet_input_blocks_4_1_transformer_blocks_0_",
                                                                "lora_unet_middle_block_1_", "lora_unet_output_blocks_",
                                                                "lora_te1_", "lora_te2_"))
    mine = our_layers(base, modules)
    zero = set(modules) - set(mine)  # the out_proj diffusers needs, LoRA only (see core/formats.py)
    assert zero == ({"lora_te1_text_model_encoder_layers_0_self_attn_out_proj",
                     "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"} if adapter_type == "lora" else set())
    with torch.no_grad():
        for name in modules:
            assert name in sgm_weights, f"{name} names no layer of the SGM layout"
            weight = sgm_weights[name]
            theirs = plain_layer(weight)
            kind, params = get_module(weights, name)
            assert kind is not None, f"LyCORIS does not recognise {name}"
            make_module(kind, params, name, theirs).apply_to()
            x = probe(weight)
            their_delta = theirs(x) - apply_delta(x, weight)
            if name in zero:
                assert their_delta.abs().max() == 0
                continue
            layer = mine[name]
            assert torch.equal(layer.get_base_layer().weight, weight), name  # the name points at our layer
            our_delta = apply_delta(x, layer.get_delta_weight("default").reshape(weight.shape))
            assert our_delta.abs().max() > 1e-4, name
            torch.testing.assert_close(their_delta, our_delta, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("adapter_type", ["lora", "dora", "loha", "lokr"])
def test_kohya_export_metadata_says_sdxl(tmp_path, adapter_type):
    _, ours = saved_xl(tmp_path, "star", adapter_type, text_encoders=False)
    with safe_open(str(formats.export_adapter(ours, tmp_path / "k.safetensors")), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert all(k.startswith("lora_unet_") for k in keys) and not any("down_blocks" in k for k in keys)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_module"] == ("networks.lora" if adapter_type == "lora" else "lycoris.kohya")
    assert meta["ss_text_encoder_trained"] == "false" and meta["ss_max_train_steps"] == "5"


def test_sgm_names_follow_a_recorded_unet_config(tmp_path):
    """An adapter that records its UNet's config is named by it; the shipped SDXL config otherwise (the tiny
    model shares SDXL's block structure, so both give the same names here)."""
    import json

    base, _ = adapted_xl("lora", text_encoders=False)
    layers = [n for n, m in base.unet.named_modules() if isinstance(m, BaseTunerLayer)]
    assert SDXL.export_names("unet", layers) == SDXL.export_names("unet", layers, dict(base.unet.config))
    base, specs = adapted_xl("lora", text_encoders=False, unet_targets=["down_blocks.1.attentions.0.proj_in"])
    other = dict(base.unet.config, layers_per_block=1)  # a UNet numbered otherwise: one layer per level
    ours = adapters.save_adapter(tmp_path / "a.safetensors", base.parts, specs,
                                 {"family": "sdxl", "unet_config": json.dumps(other)})
    with safe_open(str(formats.export_adapter(ours, tmp_path / "k.safetensors")), "pt") as f:
        assert "lora_unet_input_blocks_3_1_proj_in.alpha" in f.keys()  # down_blocks.1.attentions.0: 4_1 in SDXL
    with pytest.raises(ModelLoadError, match="layers no_such.layer have no name in the original SDXL layout"):
        SDXL.export_names("unet", ["down_blocks.1.attentions.0.proj_in", "no_such.layer"])


def test_kohya_lora_export_loads_with_diffusers_sdxl_loader(tmp_path):
    """diffusers maps SGM names back with its own code (lora_conversion_utils) and gets our model exactly."""
    from core.sampling import make_pipeline

    base, ours = saved_xl(tmp_path, "a", "lora", text_encoder_alpha=1.0)  # alpha != rank in the encoders
    kohya = formats.export_adapter(ours, tmp_path / "kohya.safetensors")
    plain = tiny_xl()
    make_pipeline(plain).load_lora_weights(str(kohya), adapter_name="kohya")
    assert_changed(plain)
    assert_same_outputs(plain, base)


def test_diffusers_export_loads_with_sdxl_load_lora_weights(tmp_path):
    from core.sampling import make_pipeline

    base, ours = saved_xl(tmp_path, "a", "lora")
    out = formats.export_adapter(ours, tmp_path / "d.safetensors", fmt="diffusers")
    with safe_open(str(out), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    plain = tiny_xl()
    make_pipeline(plain).load_lora_weights(str(out), adapter_name="exported")
    assert_changed(plain)
    assert_same_outputs(plain, base)
    again = tiny_xl()  # read back by our diffusers reader: the same model
    adapters.load_into(again.parts, adapters.read_adapter(out), "again", SDXL)
    assert_same_outputs(again, base)


# --- importing community SDXL files -------------------------------------------------------------------------------

@pytest.mark.parametrize("adapter_type,extra", CASES + [("dora", {})], ids=IDS + ["dora"])
def test_exported_kohya_files_import_back(tmp_path, adapter_type, extra):
    """Our SGM-named export read back (a DoRA's dora_scale too, in ComfyUI's reading) gives the trained model."""
    base, ours = saved_xl(tmp_path, "a", adapter_type, **extra)
    f = adapters.read_adapter(formats.export_adapter(ours, tmp_path / "community.safetensors"))
    assert f.layout == "kohya" and f.type == adapter_type
    fresh = tiny_xl()
    adapters.load_into(fresh.parts, f, "imported", SDXL)
    loaded = set(adapters.state_dict({p: fresh.parts[p] for p in PARTS}, "imported"))
    assert {k for k in loaded if ".self_attn.out_proj." not in k} == set(adapters.read_adapter(ours).tensors)
    assert_same_outputs(fresh, base)


@pytest.mark.parametrize("adapter_type", ["lora", "loha"])
def test_diffusers_style_kohya_names_import_on_sdxl(tmp_path, adapter_type):
    """Some SDXL trainers name UNet modules the diffusers way (lora_unet_down_blocks_1_attentions_0_...)."""
    base, ours = saved_xl(tmp_path, "a", adapter_type)
    fresh = tiny_xl()
    layers = [n for n, m in fresh.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    to_diffusers = {"lora_unet_" + sgm.replace(".", "_"): SDXL.kohya_name("unet", n)
                    for n, sgm in unet_module_ldm_names(fresh.unet, layers).items()}
    renamed = {}
    for key, tensor in load_file(str(formats.export_adapter(ours, tmp_path / "k.safetensors"))).items():
        module, _, rest = key.partition(".")
        renamed[f"{to_diffusers.get(module, module)}.{rest}"] = tensor
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in renamed)
    save_file(renamed, str(tmp_path / "diffusers-names.safetensors"))
    adapters.load_into(fresh.parts, adapters.read_adapter(tmp_path / "diffusers-names.safetensors"), "x", SDXL)
    assert_same_outputs(fresh, base)


# SGM module -> (kind of layer) for a hand-written community file; what A1111 / ComfyUI users download
HAND = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_7_1_proj_in",
        "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k", "lora_unet_output_blocks_2_2_conv",
        "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_output_blocks_5_1_transformer_blocks_0_ff_net_2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_1_mlp_fc1",
        "lora_te2_text_model_encoder_layers_0_self_attn_v_proj"]


def hand_written(name: str, weight: torch.Tensor, kind: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One module's tensors as LyCORIS / kohya write them (shapes from LyCORIS's own factorization)."""
    out_dim, in_dim, k = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    r = lambda *shape: torch.randn(shape, generator=g) * 0.3  # noqa: E731
    if kind == "lora":
        return {"lora_down.weight": r(2, in_dim, *k), "lora_up.weight": r(out_dim, 2, *([1] * len(k))),
                "alpha": torch.tensor(1.0)}
    flat_in = in_dim * (k[0] * k[1] if k else 1)
    if kind == "loha":
        return {"hada_w1_a": r(out_dim, 2), "hada_w1_b": r(2, flat_in), "hada_w2_a": r(out_dim, 2),
                "hada_w2_b": r(2, flat_in), "alpha": torch.tensor(3.0)}
    (out_l, out_k), (in_m, in_n) = factorization(out_dim, -1), factorization(in_dim, -1)
    if k:  # two full factors: no scale at all in LyCORIS, whatever alpha says
        return {"lokr_w1": r(out_l, in_m), "lokr_w2": r(out_k, in_n, *k), "alpha": torch.tensor(7.0)}
    return {"lokr_w1": r(out_l, in_m), "lokr_w2_a": r(out_k, 1), "lokr_w2_b": r(1, in_n), "alpha": torch.tensor(0.5)}


@pytest.mark.parametrize("adapter_type", ["lora", "loha", "lokr"])
def test_hand_written_sgm_file_imports_as_lycoris_applies_it(tmp_path, sgm_weights, adapter_type):
    """A community SDXL file with SGM names, written by hand, loads through peft and gives the model LyCORIS's
    maths gives: LyCORIS's modules applied to the plain model's layers, found by their SGM names."""
    g = torch.Generator().manual_seed(11)
    tensors = {f"{name}.{suffix}": t for name in HAND
               for suffix, t in hand_written(name, sgm_weights[name], adapter_type, g).items()}
    path = tmp_path / "civitai.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    ours = tiny_xl()
    adapters.load_into(ours.parts, adapters.read_adapter(path), "civitai", SDXL)
    theirs = tiny_xl()
    by_name = {}
    for part in PARTS:
        model = theirs.parts[part]
        layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        by_name.update({name: model.get_submodule(m) for m, name in SDXL.export_names(part, layers).items()})
    for name in HAND:
        assert torch.equal(by_name[name].weight, sgm_weights[name])  # the layer the SGM name means
        kind, params = get_module(tensors, name)
        make_module(kind, params, name, by_name[name]).apply_to()
    assert_changed(theirs)
    assert_same_outputs(ours, theirs, atol=1e-4)


def kohya_file(tmp_path, name: str, keys: list[str], **metadata):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path), metadata=metadata or None)
    return adapters.read_adapter(path)


def test_files_of_the_other_family_say_which_it_is(tmp_path):
    from core.models import build_tiny_model

    sdxl_te = kohya_file(tmp_path, "a", ["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                                         "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"])
    deep = "lora_unet_input_blocks_8_1_transformer_blocks_1_attn1_to_q"  # no such block in SD 1.x
    sdxl_unet = kohya_file(tmp_path, "b", [f"{deep}.lora_down.weight", f"{deep}.lora_up.weight"],
                           ss_base_model_version="sdxl_base_v1-0")
    sd = kohya_file(tmp_path, "c", ["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                                    "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"])
    sd_unet = kohya_file(tmp_path, "d", ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                                         "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"],
                         ss_base_model_version="sd_v1")
    sd_model, xl_model = build_tiny_model(seed=0), tiny_xl()
    for f in (sdxl_te, sdxl_unet):
        with pytest.raises(ModelLoadError, match="is an adapter for Stable Diffusion XL .* base model here is Stable "
                                                 "Diffusion 1.x"):
            adapters.load_into(sd_model.parts, f, "x")
    for f in (sd, sd_unet):
        with pytest.raises(ModelLoadError, match="is an adapter for Stable Diffusion 1.x .* base model here is Stable "
                                                 "Diffusion XL"):
            adapters.load_into(xl_model.parts, f, "x", SDXL)
    assert adapters.adapter_names(sd_model.parts) == adapters.adapter_names(xl_model.parts) == []


# --- merges ------------------------------------------------------------------------------------------------------

def with_adapters_xl(files) -> BaseModel:
    model = tiny_xl()
    loaded = {f"x{i}": adapters.read_adapter(path) for i, (path, _) in enumerate(files)}
    adapters.load_all(model.parts, loaded, SDXL)
    adapters.set_weights(model.parts, {f"x{i}": w for i, (_, w) in enumerate(files)})
    return model


def test_merge_into_sdxl_single_file_and_folder(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from core.merge import merge_to_model
    from core.models import load_base_model

    files = [(saved_xl(tmp_path, "a", "lora")[1], 0.8), (saved_xl(tmp_path, "b", "loha", seed=1)[1], 0.5)]
    expected = with_adapters_xl(files)
    assert_changed(expected)
    single = merge_to_model("tiny-sdxl", files, tmp_path / "merged.safetensors")
    config = save_sdxl_folder(tiny_xl(), tmp_path / "config")
    pipe = StableDiffusionXLPipeline.from_single_file(str(single), config=str(config), local_files_only=True)
    read = BaseModel("read", pipe.tokenizer, pipe.text_encoder.float(), pipe.vae, pipe.unet.float(), pipe.scheduler,
                     pipe.text_encoder_2.float(), pipe.tokenizer_2)
    assert_same_outputs(read, expected, atol=2e-2)  # the file is fp16, as checkpoints are shared
    folder = merge_to_model("tiny-sdxl", files, tmp_path / "merged")
    loaded = load_base_model(str(folder))
    assert loaded.family == "sdxl"
    assert_same_outputs(loaded, expected)


def test_sdxl_loras_merge_into_one_lora(tmp_path):
    from core.merge import merge_loras

    files = [(saved_xl(tmp_path, "a", "lora")[1], 0.7), (saved_xl(tmp_path, "b", "lora", seed=2, rank=2)[1], -0.4)]
    expected = with_adapters_xl(files)
    out = merge_loras(files, tmp_path / "merged.safetensors")
    merged = adapters.read_adapter(out)
    assert set(merged.specs) == set(PARTS) and merged.metadata["family"] == "sdxl"
    model = tiny_xl()
    adapters.load_into(model.parts, merged, "m", SDXL)
    assert_same_outputs(model, expected)
    with safe_open(str(formats.export_adapter(out, tmp_path / "k.safetensors")), "pt") as f:
        assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())  # still named as SDXL
