"""Tests for core/adapters.py and core/adapter_file.py on tiny in-code models: inject, save, read, load, weight, mix, delete.

Every model is built here with `build_tiny_model()` (random weights, real tokenizer); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from core import adapters
from core.adapter_file import FORMAT_TAG, AdapterFile, AdapterSpec
from core.adapters import (
    adapter_names,
    delete_adapter,
    inject_all,
    load_into,
    read_adapter,
    save_adapter,
    set_weights,
    specs_from_config,
    training_metadata,
    tuner_layers,
)
from core.config import Config
from core.errors import ModelLoadError
from core.base_model import BaseModel
from core.models import build_tiny_model

TYPES = ["lora", "dora", "loha", "lokr"]
ATOL = 1e-6

# peft warns "Already found a `peft_config` attribute" whenever a second adapter is injected: expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning"),
    # a failed load deletes the adapter it half-injected, which peft reports when that adapter was active
    pytest.mark.filterwarnings("ignore:Adapter a0 was active which is now deleted:UserWarning"),
]




# ----------------------------------------------------------------------------- helpers


def make_cfg(adapter_type: str, text_encoder: bool = True, **adapter) -> Config:
    return Config.from_dict({
        "model": {"base": "tiny"},
        "data": {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog", "resolution": 32},
        "adapter": {"type": adapter_type, "rank": 4, "alpha": 2, "train_text_encoder": text_encoder,
                    "text_encoder_rank": 2, **adapter},
        "train": {"seed": 3},
    })


def tiny() -> BaseModel:
    return build_tiny_model(seed=0).freeze()


def is_adapter_param(param_name: str, name: str = "default") -> bool:
    return f".{name}." in f".{param_name}."


def randomise(base: BaseModel, name: str = "default", seed: int = 0, scale: float = 0.3) -> None:
    """Give adapter `name` non-zero weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in ("unet", "text_encoder"):
            for pname, p in getattr(base, part).named_parameters():
                if is_adapter_param(pname, name):
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


_g = torch.Generator().manual_seed(1234)
SAMPLE = torch.randn(2, 4, 8, 8, generator=_g)
TIMESTEPS = torch.tensor([10, 500])
CONTEXT = torch.randn(2, 5, 32, generator=_g)
TOKENS = torch.tensor([[49406, 320, 1125, 539, 48136, 1929, 49407, 49407]])  # "a photo of sks dog" + padding


@torch.no_grad()
def unet_out(base: BaseModel) -> torch.Tensor:
    dtype = next(base.unet.parameters()).dtype
    return base.unet(SAMPLE.to(dtype), TIMESTEPS, CONTEXT.to(dtype)).sample.float()


@torch.no_grad()
def te_out(base: BaseModel) -> torch.Tensor:
    return base.text_encoder(TOKENS).last_hidden_state.float()


def outputs(base: BaseModel) -> tuple[torch.Tensor, torch.Tensor]:
    return unet_out(base), te_out(base)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-4


def trained(adapter_type: str, text_encoder: bool = True, seed: int = 0) -> tuple[BaseModel, dict, Config]:
    """A tiny model with adapter "default" injected and given random (trained-like) weights."""
    cfg = make_cfg(adapter_type, text_encoder)
    base = tiny()
    specs = specs_from_config(cfg)
    inject_all(base.parts, specs)
    randomise(base, seed=seed)
    return base, specs, cfg


@pytest.fixture(scope="module")
def base_outputs():
    return outputs(tiny())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One saved adapter file per type (UNet + text encoder), with its expected outputs."""
    folder = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, t in enumerate(TYPES):
        base, specs, cfg = trained(t, seed=10 + i)
        path = save_adapter(folder / f"{t}.safetensors", base.parts, specs, training_metadata(cfg, 7, "tiny"))
        out[t] = (path, outputs(base))
    return out


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize("text_encoder", [True, False])
def test_specs_from_config(text_encoder):
    cfg = make_cfg("lokr", text_encoder, unet_targets=["to_q", "to_k"], text_encoder_targets=["q_proj"],
                   decompose_both=True, decompose_factor=4, dropout=0.1, module_dropout=0.2)
    specs = specs_from_config(cfg)
    assert set(specs) == ({"unet", "text_encoder"} if text_encoder else {"unet"})
    u = specs["unet"]
    assert (u.type, u.rank, u.alpha, u.targets) == ("lokr", 4, 2.0, ["to_q", "to_k"])
    assert (u.decompose_both, u.decompose_factor, u.dropout, u.module_dropout) == (True, 4, 0.1, 0.2)
    if text_encoder:
        te = specs["text_encoder"]
        assert (te.rank, te.alpha, te.targets) == (2, 2.0, ["q_proj"])  # alpha falls back to adapter.alpha


@pytest.mark.parametrize("adapter_type", TYPES)
def test_peft_config_matches_spec(adapter_type):
    spec = AdapterSpec(type=adapter_type, rank=3, alpha=6.0, targets=["to_q"], dropout=0.1)
    config = spec.peft_config()
    assert config.r == 3 and set(config.target_modules) == {"to_q"}
    assert (config.lora_alpha if adapter_type in ("lora", "dora") else config.alpha) == 6.0
    assert getattr(config, "use_dora", False) == (adapter_type == "dora")


def test_unknown_adapter_type_is_a_model_load_error():
    with pytest.raises(ModelLoadError, match="Unknown adapter type 'oft'"):
        AdapterSpec(type="oft", rank=1, alpha=1, targets=["to_q"]).peft_config()


# ----------------------------------------------------------------------------- inject


@pytest.mark.parametrize("text_encoder", [True, False], ids=["te", "no-te"])
@pytest.mark.parametrize("adapter_type", TYPES)
def test_only_adapter_parameters_are_trainable(adapter_type, text_encoder):
    base = tiny()
    params = inject_all(base.parts, specs_from_config(make_cfg(adapter_type, text_encoder)))
    assert set(params) == ({"unet", "text_encoder"} if text_encoder else {"unet"})
    for part in ("unet", "text_encoder"):
        module = getattr(base, part)
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert all(is_adapter_param(n) for n in trainable), sorted(trainable)[:3]
        returned = params.get(part, [])
        assert {id(p) for p in returned} == {id(p) for p in module.parameters() if p.requires_grad}
        if part in params:
            assert len(trainable) > 0
            assert all(p.dtype == torch.float32 for p in returned)
        else:
            assert trainable == set() and tuner_layers(module) == []
    assert not any(p.requires_grad for p in base.vae.parameters())


@pytest.mark.parametrize("adapter_type", TYPES)
def test_inject_keeps_the_trainable_flag_of_base_weights(adapter_type):
    base = build_tiny_model(seed=0)  # not frozen: base weights stay trainable as they were
    inject_all(base.parts, specs_from_config(make_cfg(adapter_type, text_encoder=False)))
    wrapped = [n for n, p in base.unet.named_parameters() if ".base_layer." in n]
    assert wrapped
    assert all(p.requires_grad for n, p in base.unet.named_parameters())


def test_inject_unknown_target_is_a_model_load_error():
    base = tiny()
    spec = AdapterSpec(type="lora", rank=2, alpha=2, targets=["no_such_module"])
    with pytest.raises(ModelLoadError, match="target modules do not exist"):
        adapters.inject(base.unet, spec)


@pytest.mark.parametrize("adapter_type", TYPES)
def test_adapters_are_float32_on_a_bfloat16_base(adapter_type):
    base = tiny()
    base.unet.to(torch.bfloat16)
    base.text_encoder.to(torch.bfloat16)
    params = inject_all(base.parts, specs_from_config(make_cfg(adapter_type)))
    for part in ("unet", "text_encoder"):
        assert params[part] and all(p.dtype == torch.float32 for p in params[part])
        module = getattr(base, part)
        base_weights = [p for n, p in module.named_parameters() if not is_adapter_param(n)]
        assert base_weights and all(p.dtype == torch.bfloat16 for p in base_weights)
        assert not any(p.requires_grad for p in base_weights)


@pytest.mark.parametrize("adapter_type", TYPES)
def test_fresh_adapter_is_a_zero_delta_and_trained_one_is_not(adapter_type, base_outputs):
    base = tiny()
    inject_all(base.parts, specs_from_config(make_cfg(adapter_type)))
    u, t = outputs(base)
    assert_same(u, base_outputs[0])
    assert_same(t, base_outputs[1])
    randomise(base)
    u2, t2 = outputs(base)
    assert_differs(u2, base_outputs[0])
    assert_differs(t2, base_outputs[1])


# ----------------------------------------------------------------------------- save / read / load


@pytest.mark.parametrize("text_encoder", [True, False], ids=["te", "no-te"])
@pytest.mark.parametrize("adapter_type", TYPES)
def test_save_read_load_reproduces_outputs(adapter_type, text_encoder, tmp_path, base_outputs):
    model, specs, cfg = trained(adapter_type, text_encoder)
    expected_u, expected_t = outputs(model)
    path = save_adapter(tmp_path / "adapter.safetensors", model.parts, specs, training_metadata(cfg, 7, "tiny"))
    assert path == tmp_path / "adapter.safetensors"

    adapter = read_adapter(path)
    assert adapter.type == adapter_type
    assert adapter.specs == specs
    assert all(k.startswith(("unet.", "text_encoder.")) for k in adapter.tensors)
    assert any(k.startswith("text_encoder.") for k in adapter.tensors) == text_encoder
    assert all(v.dtype == torch.float32 for v in adapter.tensors.values())

    fresh = tiny()
    load_into(fresh.parts, adapter, "a0")
    assert adapter_names(fresh.parts) == ["a0"]
    u, t = outputs(fresh)
    assert_same(u, expected_u)
    assert_same(t, expected_t)
    assert_differs(u, base_outputs[0])
    if text_encoder:
        assert_differs(t, base_outputs[1])
    else:
        assert_same(t, base_outputs[1])
        assert tuner_layers(fresh.text_encoder) == []
    # a loaded adapter is for inference: nothing becomes trainable
    assert not any(p.requires_grad for m in (fresh.unet, fresh.text_encoder) for p in m.parameters())


@pytest.mark.parametrize("name", ["a", "default", "x"])
def test_load_under_a_short_name(name, files):
    # regression: the missing-key check once matched ".a" inside "attentions" and refused valid files
    path, (expected_u, expected_t) = files["loha"]
    fresh = tiny()
    load_into(fresh.parts, read_adapter(path), name)
    assert adapter_names(fresh.parts) == [name]
    assert_same(unet_out(fresh), expected_u)
    assert_same(te_out(fresh), expected_t)


@pytest.mark.parametrize("adapter_type", TYPES)
def test_metadata_is_complete_and_all_strings(adapter_type, files):
    path, _ = files[adapter_type]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    for key in ("base_model", "adapter_type", "rank", "alpha", "instance_prompt", "class_prompt", "steps",
                "resolution", "seed"):
        assert key in meta, key
    assert meta["format"] == FORMAT_TAG
    assert meta["base_model"] == "tiny"
    assert meta["adapter_type"] == adapter_type
    assert json.loads(meta["rank"]) == 4 and json.loads(meta["alpha"]) == 2.0
    assert meta["instance_prompt"] == "a photo of sks dog" and meta["class_prompt"] == "a photo of a dog"
    assert (meta["steps"], meta["resolution"], meta["seed"]) == ("7", "32", "3")
    parts = json.loads(meta["adapters"])
    assert set(parts) == {"unet", "text_encoder"} and parts["text_encoder"]["rank"] == 2
    assert read_adapter(path).metadata == meta


def test_save_is_atomic_and_replaces_an_existing_file(tmp_path):
    model, specs, cfg = trained("lora", text_encoder=False)
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(b"an older adapter")
    save_adapter(target, model.parts, specs, training_metadata(cfg, 1, "tiny"))
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors"]  # no temp file left
    assert read_adapter(target).type == "lora"  # the old bytes were replaced
    # saving again over our own file also works and leaves nothing behind
    save_adapter(target, model.parts, specs, training_metadata(cfg, 2, "tiny"))
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors"]
    assert read_adapter(target).metadata["steps"] == "2"


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    model, specs, cfg = trained("lora", text_encoder=False)
    target = tmp_path / "adapter.safetensors"
    save_adapter(target, model.parts, specs, training_metadata(cfg, 1, "tiny"))
    before = target.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)  # what core.fileio calls
    with pytest.raises(OSError, match="disk full"):
        save_adapter(target, model.parts, specs, training_metadata(cfg, 2, "tiny"))
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors"]
    assert target.read_bytes() == before


def test_save_creates_missing_folders(tmp_path):
    model, specs, cfg = trained("lokr", text_encoder=False)
    path = save_adapter(tmp_path / "a" / "b" / "x.safetensors", model.parts, specs, training_metadata(cfg, 1, "tiny"))
    assert path.is_file()


# ----------------------------------------------------------------------------- read_adapter errors


def _valid_bytes(files) -> bytes:
    return files["lora"][0].read_bytes()


def test_read_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        read_adapter(tmp_path / "nope.safetensors")


def test_read_non_safetensors_file(tmp_path, files):
    path = tmp_path / "adapter.pt"
    path.write_bytes(_valid_bytes(files))
    with pytest.raises(ModelLoadError, match=r"adapter\.pt is not a \.safetensors file"):
        read_adapter(path)


def test_read_truncated_file(tmp_path, files):
    data = _valid_bytes(files)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"cut\.safetensors is damaged"):
        read_adapter(path)


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"],
                         ids=["random", "empty", "bad-header"])
def test_read_garbage_named_safetensors(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"junk\.safetensors is damaged"):
        read_adapter(path)


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}], ids=["none", "foreign"])
def test_read_safetensors_without_our_metadata(tmp_path, metadata):
    path = tmp_path / "other.safetensors"
    save_file({"unet.x": torch.zeros(2)}, str(path), metadata=metadata)
    with pytest.raises(ModelLoadError, match=r"other\.safetensors was not written by this app"):
        read_adapter(path)


@pytest.mark.parametrize("adapters_meta", [None, "{not json", json.dumps({"unet": {"kind": "lora"}})],
                         ids=["missing", "bad-json", "bad-fields"])
def test_read_our_tag_with_damaged_adapter_metadata(tmp_path, adapters_meta):
    path = tmp_path / "odd.safetensors"
    meta = {"format": FORMAT_TAG}
    if adapters_meta is not None:
        meta["adapters"] = adapters_meta
    save_file({"unet.x": torch.zeros(2)}, str(path), metadata=meta)
    with pytest.raises(ModelLoadError, match=r"odd\.safetensors has damaged adapter metadata"):
        read_adapter(path)


# ----------------------------------------------------------------------------- set_weights


@pytest.mark.parametrize("adapter_type", TYPES)
def test_set_weights_scales_between_base_and_trained(adapter_type, files, base_outputs):
    path, (full_u, full_t) = files[adapter_type]
    model = tiny()
    load_into(model.parts, read_adapter(path), "a0")
    set_weights(model.parts, {"a0": 0.0})
    assert_same(unet_out(model), base_outputs[0])
    assert_same(te_out(model), base_outputs[1])
    set_weights(model.parts, {"a0": 1.0})
    assert_same(unet_out(model), full_u)
    assert_same(te_out(model), full_t)
    set_weights(model.parts, {"a0": 0.5})
    half = unet_out(model)
    assert_differs(half, full_u)
    assert_differs(half, base_outputs[0])
    set_weights(model.parts, {})
    assert_same(unet_out(model), base_outputs[0])
    assert not any(p.requires_grad for p in model.unet.parameters())  # set_adapter must not unfreeze


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_lora_weight_is_linear_on_one_module(files, kind):
    """The weight is linear for LoRA, and for DoRA too (its whole change scales, as ComfyUI applies a DoRA file's
    strength; peft's own scale inside the normalisation would not give the base at 0)."""
    model = tiny()
    load_into(model.parts, read_adapter(files[kind][0]), "a0")
    layer = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert "a0" in layer.scaling
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    out = {}
    for w in (0.0, 0.5, 1.0, 2.0):
        set_weights(model.parts, {"a0": w})
        with torch.no_grad():
            out[w] = layer(x)
    assert_differs(out[1.0], out[0.0])
    torch.testing.assert_close(out[0.5], (out[0.0] + out[1.0]) / 2, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2.0], 2 * out[1.0] - out[0.0], atol=1e-5, rtol=0)
    with torch.no_grad():
        assert_same(out[0.0], layer.base_layer(x))


# ----------------------------------------------------------------------------- mixing


@pytest.fixture(scope="module")
def mixed(files):
    """LoRA, DoRA, LoHa and LoKr in one model (LoRA / DoRA first: peft cannot wrap a LoHa/LoKr layer in a LoRA)."""
    model = tiny()
    for i, t in enumerate(TYPES):
        load_into(model.parts, read_adapter(files[t][0]), f"a{i}")
    return model


def test_mixed_model_has_all_adapters(mixed):
    assert adapter_names(mixed.parts) == [f"a{i}" for i in range(len(TYPES))]


@pytest.mark.parametrize("index", range(len(TYPES)), ids=TYPES)
def test_enabling_one_adapter_reproduces_it_alone(mixed, files, index):
    set_weights(mixed.parts, {f"a{index}": 1.0})
    expected_u, expected_t = files[TYPES[index]][1]
    assert_same(unet_out(mixed), expected_u)
    assert_same(te_out(mixed), expected_t)


@pytest.mark.parametrize("pair", [("lora", "loha"), ("dora", "lokr"), ("lora", "dora")])
def test_two_adapters_together_differ_from_each_alone(mixed, files, pair):
    first, second = (f"a{TYPES.index(kind)}" for kind in pair)
    set_weights(mixed.parts, {first: 1.0, second: 1.0})
    both = unet_out(mixed)
    assert_differs(both, files[pair[0]][1][0])
    assert_differs(both, files[pair[1]][1][0])
    set_weights(mixed.parts, {first: 0.0, second: 1.0})  # weight 0 removes the first one's contribution
    assert_same(unet_out(mixed), files[pair[1]][1][0])


@pytest.mark.parametrize("first", ["loha", "lokr"])
def test_lora_after_loha_or_lokr_is_refused_cleanly(first, files):
    # peft cannot put a LoRA on a Conv2d already wrapped by LoHa/LoKr ('Conv2d' object has no attribute
    # 'groups'); load_into turns that into a plain message and leaves the model as it was.
    model = tiny()
    load_into(model.parts, read_adapter(files[first][0]), "a0")
    with pytest.raises(ModelLoadError, match="Load the LoRA / DoRA files first"):
        load_into(model.parts, read_adapter(files["lora"][0]), "a1")
    assert adapter_names(model.parts) == ["a0"]
    set_weights(model.parts, {"a0": 1.0})
    assert_same(unet_out(model), files[first][1][0])
    assert_same(te_out(model), files[first][1][1])


def test_loha_then_lokr_mix(files):
    model = tiny()
    load_into(model.parts, read_adapter(files["loha"][0]), "a0")
    load_into(model.parts, read_adapter(files["lokr"][0]), "a1")
    set_weights(model.parts, {"a1": 1.0})
    assert_same(unet_out(model), files["lokr"][1][0])


# ----------------------------------------------------------------------------- delete


@pytest.mark.parametrize("adapter_type", TYPES)
def test_delete_adapter_returns_to_base(adapter_type, files, base_outputs):
    model = tiny()
    load_into(model.parts, read_adapter(files[adapter_type][0]), "a0")
    delete_adapter(model.parts, "a0")
    assert adapter_names(model.parts) == []
    assert_same(unet_out(model), base_outputs[0])
    assert_same(te_out(model), base_outputs[1])
    assert not any(is_adapter_param(n, "a0") for n, _ in model.unet.named_parameters())


def test_delete_one_of_two_keeps_the_other(files):
    model = tiny()
    load_into(model.parts, read_adapter(files["lora"][0]), "a0")
    load_into(model.parts, read_adapter(files["lokr"][0]), "a1")
    delete_adapter(model.parts, "a0")
    assert adapter_names(model.parts) == ["a1"]
    set_weights(model.parts, {"a1": 1.0})
    assert_same(unet_out(model), files["lokr"][1][0])


# ----------------------------------------------------------------------------- a model of another shape


def other_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


def other_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=48, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))


@pytest.mark.parametrize("adapter_type", TYPES)
def test_adapter_from_another_model_shape_is_refused_whole(adapter_type, files):
    model = tiny()
    model.unet = other_unet().requires_grad_(False).eval()
    # an adapter already there must survive the failed load untouched
    inject_all(model.parts, {"unet": AdapterSpec(type="lora", rank=2, alpha=2, targets=["to_q"])}, name="keep")
    randomise(model, "keep")
    model.unet.requires_grad_(False)
    before = unet_out(model)
    with pytest.raises(ModelLoadError, match=rf"{adapter_type}\.safetensors does not fit this base model's unet"):
        load_into(model.parts, read_adapter(files[adapter_type][0]), "a0")
    assert adapter_names(model.parts) == ["keep"]
    assert not any(is_adapter_param(n, "a0") for n, _ in model.unet.named_parameters())
    assert_same(unet_out(model), before)


@pytest.mark.parametrize("adapter_type", TYPES)
def test_failing_text_encoder_part_also_removes_the_unet_part(adapter_type, files, base_outputs):
    model = tiny()  # the UNet fits, the text encoder is wider than the one the adapter was made on
    model.text_encoder = other_text_encoder().requires_grad_(False).eval()
    with pytest.raises(ModelLoadError, match="text_encoder"):
        load_into(model.parts, read_adapter(files[adapter_type][0]), "a0")
    assert adapter_names(model.parts) == []
    assert_same(unet_out(model), base_outputs[0])
    # the name is free again: a fitting adapter loads under it afterwards
    model.text_encoder = tiny().text_encoder
    load_into(model.parts, read_adapter(files[adapter_type][0]), "a0")
    assert_same(unet_out(model), files[adapter_type][1][0])


def test_adapter_with_targets_missing_from_the_model_is_refused(tmp_path, files):
    # a file whose spec names layers this model does not have (e.g. made for another architecture)
    model, _, cfg = trained("lora", text_encoder=False)
    specs = {"unet": AdapterSpec(type="lora", rank=2, alpha=2, targets=["to_q"])}
    path = save_adapter(tmp_path / "x.safetensors", model.parts, specs, training_metadata(cfg, 1, "tiny"))
    adapter = read_adapter(path)
    adapter.specs["unet"].targets = ["no_such_layer"]
    fresh = tiny()
    with pytest.raises(ModelLoadError, match="target modules do not exist"):
        load_into(fresh.parts, adapter, "a0")
    assert adapter_names(fresh.parts) == []


# ----------------------------------------------------------------------------- parts, load_all, readers


def test_base_model_parts_are_its_own_modules():
    base = tiny()
    assert set(base.parts) == {"unet", "text_encoder"}
    assert base.parts["unet"] is base.unet and base.parts["text_encoder"] is base.text_encoder


@pytest.mark.parametrize("adapter_type", TYPES)
def test_inject_on_a_trainable_bfloat16_base_casts_the_adapter_only(adapter_type):
    base = build_tiny_model(seed=0).to("cpu", torch.bfloat16)  # not frozen: its weights must stay as they were
    params = inject_all(base.parts, specs_from_config(make_cfg(adapter_type, text_encoder=False)))["unet"]
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    base_weights = [p for n, p in base.unet.named_parameters() if not is_adapter_param(n)]
    assert base_weights and all(p.dtype == torch.bfloat16 and p.requires_grad for p in base_weights)


def test_load_all_loads_lora_files_first_whatever_the_order(files):
    model = tiny()
    adapters.load_all(model.parts, {f"a{i}": read_adapter(files[t][0]) for i, t in reversed(list(enumerate(TYPES)))})
    # the LoRA (a0) and DoRA (a1) came last here and still loaded
    assert adapter_names(model.parts) == [f"a{i}" for i in range(len(TYPES))]
    for i, t in enumerate(TYPES):
        set_weights(model.parts, {f"a{i}": 1.0})
        assert_same(unet_out(model), files[t][1][0])


def test_load_all_is_all_or_nothing(tmp_path, files, base_outputs):
    model = tiny()  # the text encoder of the LoHa file does not fit this model: it fails after the LoRA loaded
    model.text_encoder = other_text_encoder().requires_grad_(False).eval()
    unet_only, specs, cfg = trained("lora", text_encoder=False)
    lora = save_adapter(tmp_path / "unet-lora.safetensors", unet_only.parts, specs, training_metadata(cfg, 1, "tiny"))
    with pytest.raises(ModelLoadError, match="text_encoder"):
        adapters.load_all(model.parts, {"a0": read_adapter(files["loha"][0]), "a1": read_adapter(lora)})
    assert adapter_names(model.parts) == []
    assert_same(unet_out(model), base_outputs[0])


def test_has_lycoris(files):
    model = tiny()
    assert not adapters.has_lycoris(model.parts)
    load_into(model.parts, read_adapter(files["lora"][0]), "a0")
    assert not adapters.has_lycoris(model.parts)
    load_into(model.parts, read_adapter(files["lokr"][0]), "a1")
    assert adapters.has_lycoris(model.parts)
    delete_adapter(model.parts, "a1")  # the LoKr wrappers stay, and still refuse a LoRA
    assert adapters.has_lycoris(model.parts)


def test_readers_are_tried_in_order(files):
    from core.adapter_file import read_adapter_file

    calls = []

    def reader(name, result):
        def read(path, f, metadata):
            calls.append(name)
            return result(path) if result else None
        return read

    mine = lambda path: AdapterFile(path, {}, {}, kind="lora")  # noqa: E731
    path = files["lora"][0]
    got = read_adapter_file(path, [reader("none", None), reader("mine", mine), reader("late", mine)])
    assert calls == ["none", "mine"] and got.kind == "lora" and got.tensors == {}
    with pytest.raises(ModelLoadError, match="layout is unknown"):
        read_adapter_file(path, [reader("none", None)])
