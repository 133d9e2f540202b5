"""Tests for core/models.py and core/single_file.py: every way to name a base model, on tiny in-code models.

Nothing here touches the network: hub ids are tested against a fake Hugging Face cache under tmp_path,
and downloads only through a stand-in for `snapshot_download`. Real SD 1.5 / 2.x shapes are checked on
"meta" tensors (shapes without memory), so the key layout is verified at full size in well under a second.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

import core.models as models
from core import single_file
from core.base_model import BaseModel, clip_tokenizer
from core.errors import ModelLoadError, UserError
from core.config import Config
from core.models import build_tiny_model, load_base_from_config, load_base_model, save_model_folder
from core.single_file import detect_family, diffusers_to_ldm, load_single_file, read_config_folder, save_single_file

# ----------------------------------------------------------------------------- helpers


def mini_model(context: int, open_clip: bool = False, seed: int = 0, prediction_type: str = "epsilon") -> BaseModel:
    """A small model with the *widths* an SD 1.x (768, CLIP) or 2.x (1024, OpenCLIP) checkpoint is recognised by."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=context, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
        max_position_embeddings=77, hidden_act="gelu" if open_clip else "quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    vae = AutoencoderKL(
        block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context, use_linear_projection=open_clip,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False)
    return BaseModel("mini", clip_tokenizer(pad_token="!" if open_clip else None), text_encoder, vae, unet, scheduler)


def write_configs(model: BaseModel, folder: Path, **unet_overrides) -> Path:
    """A diffusers-style config folder (no weights) for `model`, like core/assets/model_configs/<family>."""
    configs = single_file.embedded_configs(single_file.model_metadata(model))
    configs["unet"].update(unet_overrides)
    for part, cfg in configs.items():
        name = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}.get(part, "config.json")
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / name).write_text(json.dumps(cfg))
    return folder


def save_foreign(model: BaseModel, path: Path, **kw) -> Path:
    """An original-layout file as other tools write it: the weights, no configs in the metadata."""
    save_file({k: v.contiguous() for k, v in diffusers_to_ldm(model, **kw).items()}, str(path))
    return path


def meta_model(family_folder: str) -> BaseModel:
    """A full-size SD model from the shipped configs, on the meta device (shapes only, instant)."""
    cfg = read_config_folder(single_file.MODEL_CONFIGS_DIR / family_folder)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    return BaseModel(family_folder, clip_tokenizer(), text_encoder, vae, unet, DDPMScheduler.from_config(cfg["scheduler"]))


@torch.no_grad()
def outputs(model: BaseModel, vocab: int = 49408) -> dict[str, torch.Tensor]:
    """UNet, VAE (encode + decode) and text-encoder outputs on fixed small inputs."""
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[49406 % vocab, 320, 1125 % vocab, 49407 % vocab]])
    hidden = model.text_encoder(ids).last_hidden_state
    latents = torch.randn(1, 4, 8, 8, generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    return {
        "text": hidden,
        "unet": model.unet(latents, torch.tensor([10]), encoder_hidden_states=hidden).sample,
        "encode": model.vae.encode(image).latent_dist.mean,
        "decode": model.vae.decode(latents).sample,
    }


def plain(config) -> dict:
    """A config as JSON would hold it (lists, not tuples; private `_` keys dropped)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same_model(a: BaseModel, b: BaseModel, vocab: int = 49408) -> None:
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(a, part), getattr(b, part))
    oa, ob = outputs(a, vocab), outputs(b, vocab)
    for k in oa:
        torch.testing.assert_close(oa[k], ob[k], rtol=0, atol=1e-6, msg=k)


def assert_loaded_ready(model: BaseModel) -> None:
    """load_base_model's promise: float32, on the CPU, frozen, in eval mode."""
    for m in (model.unet, model.vae, model.text_encoder):
        assert not m.training
        for p in m.parameters():
            assert p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test here must work offline: any attempt to open a connection fails the test loudly."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a test in test_models.py tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny() -> BaseModel:
    return build_tiny_model(seed=0).freeze()


@pytest.fixture()
def shipped_configs(tmp_path, monkeypatch) -> Path:
    """Stand-ins for core/assets/model_configs sized for the mini models (sd2 and sd2-base differ in sample_size)."""
    root = tmp_path / "model_configs"
    write_configs(mini_model(768), root / "sd15")
    write_configs(mini_model(1024, True, prediction_type="v_prediction"), root / "sd2", sample_size=12)
    write_configs(mini_model(1024, True), root / "sd2-base", sample_size=8)
    monkeypatch.setattr(single_file, "MODEL_CONFIGS_DIR", root)
    return root


# ----------------------------------------------------------------------------- diffusers folders


def test_folder_round_trip_is_exact(tiny, tmp_path):
    folder = save_model_folder(tiny, tmp_path / "model")
    loaded = load_base_model(str(folder))
    assert_same_model(tiny, loaded)
    assert_loaded_ready(loaded)
    assert loaded.prediction_type == "epsilon" and loaded.family == "sd1"


def test_folder_prediction_type_override(tiny, tmp_path):
    folder = save_model_folder(tiny, tmp_path / "model")
    assert load_base_model(str(folder), prediction_type="v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ModelLoadError, match="Unknown prediction type"):
        load_base_model(str(folder), prediction_type="flow")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_base_model(str(tmp_path / "empty"))
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": []}))
    with pytest.raises(ModelLoadError, match="SDXL"):
        load_base_model(str(sdxl))


def test_parts_are_the_modules_adapters_attach_to(tiny):
    assert tiny.parts == {"unet": tiny.unet, "text_encoder": tiny.text_encoder}
    assert tiny.parts["unet"] is tiny.unet and tiny.parts["text_encoder"] is tiny.text_encoder


def test_load_base_from_config_uses_the_configs_model_settings(tiny, tmp_path):
    folder = save_model_folder(tiny, tmp_path / "model")
    loaded = load_base_from_config(Config.from_dict({"model": {"base": str(folder), "prediction_type": "v_prediction"}}))
    assert_same_model(tiny, loaded)
    assert loaded.prediction_type == "v_prediction" and loaded.name == str(folder)


# ----------------------------------------------------------------------------- single files we write


def test_single_file_round_trip_is_exact(tiny, tmp_path):
    path = save_single_file(tiny, tmp_path / "tiny.safetensors", dtype=None)
    loaded = load_base_model(str(path))
    assert_same_model(tiny, loaded)
    assert_loaded_ready(loaded)
    assert loaded.prediction_type == tiny.prediction_type
    for part in ("unet", "vae"):
        assert plain(getattr(loaded, part).config) == plain(getattr(tiny, part).config)
    assert loaded.tokenizer("a photo").input_ids == tiny.tokenizer("a photo").input_ids


def test_single_file_keeps_v_prediction_and_user_metadata(tmp_path):
    model = build_tiny_model(seed=1, prediction_type="v_prediction")
    path = save_single_file(model, tmp_path / "v.safetensors", metadata={"note": "hi", "steps": 5})
    loaded = load_base_model(str(path))
    assert loaded.prediction_type == "v_prediction"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16  # the default dtype
    assert meta["note"] == "hi" and json.loads(meta["steps"]) == 5
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    # float16 on disk, float32 in memory, close to the original
    torch.testing.assert_close(outputs(loaded)["unet"], outputs(model)["unet"], rtol=0.02, atol=0.02)


def test_diffusers_pipeline_reads_our_single_file(tiny, tmp_path):
    """diffusers' own pipeline-level single-file loader (not our code path) reads the file to the same weights."""
    from diffusers import StableDiffusionPipeline

    path = save_single_file(tiny, tmp_path / "tiny.safetensors", dtype=None)
    config = save_model_folder(tiny, tmp_path / "config")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    safety_checker=None)
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipe, part), getattr(tiny, part))


def test_written_keys_follow_the_sd_layout(tiny):
    keys = set(diffusers_to_ldm(tiny))
    for key in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.block.0.conv1.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.0.block.1.conv2.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in keys, key
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys)


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_full_size_layout_matches_diffusers_reader(family):
    """At real SD 1.5 / 2.x shapes, our writer's keys are exactly what diffusers' reader turns back into the model."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    model = meta_model(family)
    state = diffusers_to_ldm(model)
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    assert len(unet_keys) == 686 and sum(k.startswith("first_stage_model.") for k in state) == 248
    known = {  # key: shape, as in the released checkpoints
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    }
    if family == "sd15":
        known["model.diffusion_model.input_blocks.1.1.proj_in.weight"] = (320, 320, 1, 1)
        known["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"] = (768, 3072)
    else:
        known["model.diffusion_model.input_blocks.1.1.proj_in.weight"] = (320, 320)
        known["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"] = (3072, 1024)
        known["cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight"] = (4096, 1024)  # the 24th block
        known["cond_stage_model.model.positional_embedding"] = (77, 1024)
        known["cond_stage_model.model.text_projection"] = (1024, 1024)
    for key, shape in known.items():
        assert tuple(state[key].shape) == shape, key

    def same(converted: dict, module: torch.nn.Module) -> None:
        ref = module.state_dict()
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        assert set(converted) == set(ref)
        assert all(tuple(converted[k].shape) == tuple(ref[k].shape) for k in ref)

    same(convert_ldm_unet_checkpoint(state, dict(model.unet.config)), model.unet)
    same(convert_ldm_vae_checkpoint(state, dict(model.vae.config)), model.vae)
    clip = convert_ldm_clip_checkpoint(state) if family == "sd15" else convert_open_clip_checkpoint(model.text_encoder, state)
    same(clip, model.text_encoder)
    assert detect_family({k: v.shape for k, v in state.items()}) == ("sd1" if family == "sd15" else "sd2")


def test_open_clip_layout_round_trip(tmp_path):
    """The SD 2.x text-encoder layout (fused q/k/v, an identity 24th block) reads back exactly."""
    model = build_tiny_model(seed=2)
    path = save_single_file(model, tmp_path / "oc.safetensors", dtype=None, text_encoder_layout="open_clip")
    keys = load_file(str(path)).keys()
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in keys  # the padding block
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    assert_same_model(model, load_base_model(str(path)))


def test_model_with_unmerged_adapters_is_refused():
    from peft import LoraConfig, inject_adapter_in_model

    model = build_tiny_model(seed=3)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), model.unet)
    with pytest.raises(ValueError, match="merge them into the weights first"):
        diffusers_to_ldm(model)


def test_save_is_atomic(tiny, tmp_path, monkeypatch):
    path = save_single_file(tiny, tmp_path / "m.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_single_file(tiny, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp file left behind


# ----------------------------------------------------------------------------- foreign single files (no configs)


def test_detect_family_from_keys_and_shapes():
    sd1 = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    }
    assert detect_family(sd1) == "sd1"
    sd2 = {k: v for k, v in sd1.items() if not k.startswith("cond_stage_model.")}
    sd2["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (320, 1024)
    sd2["cond_stage_model.model.token_embedding.weight"] = (49408, 1024)
    assert detect_family(sd2) == "sd2"
    inpaint = {**sd1, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    with pytest.raises(ModelLoadError, match="9 input channels"):
        detect_family(inpaint)
    sdxl = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
    }
    with pytest.raises(ModelLoadError, match="SDXL"):
        detect_family(sdxl)
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}
    with pytest.raises(ModelLoadError, match="LoRA"):
        detect_family(lora)
    with pytest.raises(ModelLoadError, match="no VAE or text encoder"):
        detect_family({k: v for k, v in sd1.items() if k.startswith("model.")})
    with pytest.raises(ModelLoadError, match="VAE on its own"):
        detect_family({"encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3), "decoder.up.0.block.0.conv1.weight": (1,)})


def test_foreign_sd1_file_uses_the_shipped_sd15_configs(shipped_configs, tmp_path):
    model = mini_model(768, seed=3)
    path = save_foreign(model, tmp_path / "sd1.safetensors")
    loaded = load_base_model(str(path))
    assert_same_model(model, loaded, vocab=1000)
    assert loaded.prediction_type == "epsilon" and loaded.tokenizer.pad_token == "<|endoftext|>"
    # the override reaches the scheduler (an SD 1.x v-prediction fine-tune)
    assert load_base_model(str(path), prediction_type="v_prediction").prediction_type == "v_prediction"


def test_foreign_sd2_file_assumes_v_prediction_unless_told(shipped_configs, tmp_path):
    model = mini_model(1024, open_clip=True, seed=4)
    path = save_foreign(model, tmp_path / "sd2.safetensors")
    assert "cond_stage_model.model.text_projection" in load_file(str(path))
    loaded = load_base_model(str(path))
    assert_same_model(model, loaded, vocab=1000)
    assert loaded.prediction_type == "v_prediction" and loaded.unet.config.sample_size == 12  # the sd2 (768-v) folder
    assert loaded.tokenizer.pad_token == "!"
    base = load_base_model(str(path), prediction_type="epsilon")
    assert base.prediction_type == "epsilon" and base.unet.config.sample_size == 8  # the sd2-base folder


def test_old_clip_names_without_text_model_level(shipped_configs, tmp_path):
    model = mini_model(768, seed=6)
    state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v.contiguous()
             for k, v in diffusers_to_ldm(model).items()}
    save_file(state, str(tmp_path / "old.safetensors"))
    assert_same_model(model, load_base_model(str(tmp_path / "old.safetensors")), vocab=1000)


def test_shipped_configs_are_complete():
    for name, pred in (("sd15", "epsilon"), ("sd2", "v_prediction"), ("sd2-base", "epsilon")):
        cfg = read_config_folder(single_file.MODEL_CONFIGS_DIR / name)
        assert set(cfg) == {"unet", "vae", "text_encoder", "scheduler", "tokenizer"}
        assert cfg["scheduler"]["prediction_type"] == pred
        assert (single_file.MODEL_CONFIGS_DIR / name / "model_index.json").is_file()
    assert read_config_folder(single_file.MODEL_CONFIGS_DIR / "sd2")["tokenizer"]["pad_token"] == "!"


def test_config_dir_hook_loads_a_file_without_metadata(tiny, tmp_path):
    path = save_foreign(tiny, tmp_path / "plain.safetensors")
    loaded = load_single_file(path, config_dir=write_configs(tiny, tmp_path / "cfg"))
    assert_same_model(tiny, loaded)
    with pytest.raises(ModelLoadError, match="shapes of Stable Diffusion"):
        load_base_model(str(path))  # no configs and no SD widths: say so instead of guessing


def test_read_safetensors_header_gives_metadata_and_shapes_without_weights(tiny, tmp_path):
    path = save_single_file(tiny, tmp_path / "tiny.safetensors", metadata={"note": "hi"})
    metadata, shapes = single_file.read_safetensors_header(path)
    assert metadata["note"] == "hi" and single_file.embedded_configs(metadata)["unet"]["block_out_channels"] == [32, 64]
    conv_in = single_file.UNET_PREFIX + "input_blocks.0.0.weight"
    assert shapes[conv_in] == tuple(tiny.unet.conv_in.weight.shape) and len(shapes) == len(load_file(str(path)))
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="not a valid .safetensors file"):
        single_file.read_safetensors_header(tmp_path / "cut.safetensors")


# ----------------------------------------------------------------------------- pickles


def test_pickle_refused_by_default_and_loaded_when_allowed(shipped_configs, tmp_path):
    model = mini_model(1024, open_clip=True, seed=5)
    path = tmp_path / "old.ckpt"
    # SD 2.x-base's released .ckpt says global_step 875000: diffusers' rule reads that as epsilon
    torch.save({"state_dict": {k: v.contiguous() for k, v in diffusers_to_ldm(model).items()}, "global_step": 875000}, path)
    with pytest.raises(ModelLoadError) as err:
        load_base_model(str(path))
    assert "pickle" in str(err.value) and "allow_pickle" in str(err.value) and ".safetensors" in str(err.value)
    loaded = load_base_model(str(path), allow_pickle=True)
    assert_same_model(model, loaded, vocab=1000)
    assert loaded.prediction_type == "epsilon"
    # the app's --allow-pickle reaches its playground and the configs its forms make; off by default
    from core.playground import Playground
    from ui.form import form_config

    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        Playground("cpu")._ensure_base(str(path))
    assert_same_model(model, Playground("cpu", allow_pickle=True)._ensure_base(str(path)), vocab=1000)
    assert form_config({}, tmp_path, allow_pickle=True).model.allow_pickle
    assert not form_config({}, tmp_path).model.allow_pickle
    # and a config's model.allow_pickle reaches the loader
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_base_from_config(Config.from_dict({"model": {"base": str(path)}}))
    from_config = load_base_from_config(Config.from_dict({"model": {"base": str(path), "allow_pickle": True}}))
    assert_same_model(model, from_config, vocab=1000)


def test_pickle_with_code_or_damage_is_refused(tmp_path):
    damaged = tmp_path / "bad.ckpt"
    damaged.write_bytes(os.urandom(2000))
    with pytest.raises(ModelLoadError, match="cannot be read as a PyTorch checkpoint"):
        load_base_model(str(damaged), allow_pickle=True)
    sneaky = tmp_path / "obj.pt"
    torch.save({"state_dict": {}, "cb": Path("x")}, sneaky)  # a non-tensor Python object
    with pytest.raises(ModelLoadError, match=r"other than tensors \(pathlib.PosixPath\)"):
        load_base_model(str(sneaky), allow_pickle=True)


# ----------------------------------------------------------------------------- broken and wrong files


def test_truncated_and_random_files(tiny, tmp_path):
    data = save_single_file(tiny, tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(4096))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("cut", "noise", "empty"):
        with pytest.raises(ModelLoadError, match="not a valid .safetensors file.*truncated"):
            load_base_model(str(tmp_path / f"{name}.safetensors"))


def test_lora_and_sdxl_files_are_named_as_such(tmp_path):
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(lora))
    with pytest.raises(ModelLoadError, match="LoRA"):
        load_base_model(str(lora))
    sdxl = tmp_path / "xl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(2, 3, 3, 3),
               "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8)}, str(sdxl))
    with pytest.raises(ModelLoadError, match="SDXL"):
        load_base_model(str(sdxl))
    unet_only = tmp_path / "unet.safetensors"
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2, 3, 3)}, str(unet_only))
    with pytest.raises(ModelLoadError, match="diffusers format"):
        load_base_model(str(unet_only))


def test_wrong_shapes_in_an_own_file(tiny, tmp_path):
    """A file whose configs do not fit its weights fails with a message, not a traceback from the depths."""
    path = save_foreign(tiny, tmp_path / "plain.safetensors")
    other = write_configs(build_tiny_model(), tmp_path / "cfg", block_out_channels=[16, 32])
    with pytest.raises(ModelLoadError, match="UNet weights in plain.safetensors do not fit"):
        load_single_file(path, config_dir=other)


@pytest.mark.parametrize("drop", ["model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_out.weight",
                                  "cond_stage_model.transformer.text_model.final_layer_norm.weight"])
def test_missing_tensors_in_an_own_file(tiny, tmp_path, drop):
    from safetensors import safe_open

    path = save_single_file(tiny, tmp_path / "full.safetensors")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    del state[drop]
    save_file(state, str(tmp_path / "cut.safetensors"), metadata=metadata)
    with pytest.raises(ModelLoadError, match="cut.safetensors lacks .*weights.*incomplete"):
        load_base_model(str(tmp_path / "cut.safetensors"))


def test_unsupported_extension(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unsupported file type"):
        load_base_model(str(tmp_path / "model.onnx"))


# ----------------------------------------------------------------------------- names that are not there


@pytest.mark.parametrize("spec", ["./missing", "~/nowhere/model", "/no/such/dir", "models/sd15.safetensors",
                                  "a/b/c", "old.ckpt"])
def test_missing_paths_are_not_hub_lookups(spec, monkeypatch):
    monkeypatch.setattr(models, "load_from_hub", lambda *a: pytest.fail("treated a path as a hub id"))
    with pytest.raises(ModelLoadError, match="file or folder not found: "):
        load_base_model(spec)


def test_missing_local_folder_with_one_slash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(models, "load_from_hub", lambda *a: pytest.fail("treated a path as a hub id"))
    with pytest.raises(ModelLoadError, match="file or folder not found: models/sd15"):
        load_base_model("models/sd15")


def test_nonsense_spec_and_empty_spec():
    with pytest.raises(ModelLoadError, match="not a Hugging Face model id"):
        load_base_model("no such model")
    with pytest.raises(ModelLoadError, match="No base model given"):
        load_base_model("  ")


def test_demo_model(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "DEMO_MODEL_DIR", tmp_path / "demo_model")
    with pytest.raises(ModelLoadError, match="demo model is not installed"):
        load_base_model("demo")
    save_model_folder(tiny, tmp_path / "demo_model")
    demo = load_base_model("demo")
    assert demo.name == "demo"
    assert_same_weights(demo.unet, tiny.unet)


def test_errors_are_user_errors():
    assert issubclass(ModelLoadError, UserError)


# ----------------------------------------------------------------------------- hub ids


def fake_hub_cache(root: Path, repo_id: str, model: BaseModel) -> Path:
    """The layout huggingface_hub leaves behind: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_model_folder(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_from_the_local_cache(tiny, tmp_path, monkeypatch, env):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv(env, str(tmp_path / "hf"))
    cache = tmp_path / "hf" / ("hub" if env == "HF_HOME" else "")
    fake_hub_cache(cache, "someone/tiny-sd", tiny)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hf_cache_dir() == cache
    loaded = load_base_model("someone/tiny-sd")
    assert loaded.name == "someone/tiny-sd"
    assert_same_weights(loaded.unet, tiny.unet)
    assert_loaded_ready(loaded)


def test_hub_id_not_cached_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_base_model("nobody/not-a-real-model")
    text = str(err.value)
    for words in ("'nobody/not-a-real-model'", "not in the local Hugging Face cache", "could not be downloaded",
                  "HF_HUB_OFFLINE", "spelling", "internet connection", "hf auth login", "model.base",
                  ".safetensors"):
        assert words in text, words


def test_hub_download_failure_is_one_plain_message(tmp_path, monkeypatch):
    """Online but the download fails (no network, 404, gated...): a stand-in for snapshot_download, no real network."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def fake_snapshot_download(repo_id, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match=r"could not be downloaded \(ConnectionError: Failed to resolve"):
        load_base_model("someone/elsewhere")
    assert calls == [True, False]  # the cache first, then the download


def test_hub_cache_holding_sdxl_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hub" / "models--org--xl"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    with pytest.raises(ModelLoadError, match="SDXL"):
        load_base_model("org/xl")


def test_hub_repo_that_is_not_diffusers(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fake_snapshot_download(repo_id, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        (tmp_path / "snap").mkdir()
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ModelLoadError, match="not a diffusers model.*download that file"):
        load_base_model("someone/single-file-repo")
