"""Tests for core/families/sdxl_parts.py and the SDXL (SGM) layout in core/single_file.py, on a tiny SDXL model."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core import single_file
from core.base_model import BaseModel
from core.errors import ModelLoadError
from core.families.sdxl_parts import (
    TIME_IDS,
    build_sdxl_from_configs,
    build_tiny_sdxl,
    check_sdxl_folder,
    is_sdxl_folder,
    load_sdxl_folder,
    save_sdxl_folder,
)
from core.models import build_tiny_model, save_model_folder
from core.single_file import (
    detect_family,
    diffusers_to_ldm,
    load_sdxl_single_file,
    load_single_file,
    read_config_folder,
    read_safetensors_header,
    save_single_file,
    shipped_config_folder,
    unet_module_ldm_names,
)

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every load here is offline: a connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny() -> BaseModel:
    return build_tiny_sdxl(seed=0).freeze()


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory) -> Path:
    return save_single_file(tiny, tmp_path_factory.mktemp("xl") / "tiny-xl.safetensors", dtype=None)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def unet_out(model: BaseModel, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    width = model.unet.config.cross_attention_dim
    pooled = model.text_encoder_2.config.projection_dim
    with torch.no_grad():
        return model.unet(torch.randn(batch, 4, 32, 32), torch.tensor([10, 700][:batch]),
                          encoder_hidden_states=torch.randn(batch, 77, width),
                          added_cond_kwargs={"text_embeds": torch.randn(batch, pooled),
                                             "time_ids": torch.tensor([[64.0, 80, 0, 8, 64, 64]] * batch)}).sample


def ldm_shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# ----------------------------------------------------------------------------- the tiny model


def test_tiny_sdxl_is_sdxl_shaped_and_runs_fast(tiny):
    cfg = tiny.unet.config
    assert tiny.family == "sdxl" and set(tiny.parts) == {"unet", "text_encoder", "text_encoder_2"}
    assert cfg.addition_embed_type == "text_time" and cfg.down_block_types[0] == "DownBlock2D"
    assert cfg.cross_attention_dim == tiny.text_encoder.config.hidden_size + tiny.text_encoder_2.config.hidden_size
    assert cfg.projection_class_embeddings_input_dim == (tiny.text_encoder_2.config.projection_dim
                                                         + TIME_IDS * cfg.addition_time_embed_dim)
    assert len(tiny.unet.down_blocks[1].attentions[0].transformer_blocks) == 1
    assert len(tiny.unet.down_blocks[2].attentions[0].transformer_blocks) == 2
    assert tiny.tokenizer_2.pad_token == "!" and tiny.tokenizer.pad_token == "<|endoftext|>"
    sched = tiny.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert sched.steps_offset == 1 and sched.num_train_timesteps == 1000
    unet_out(tiny)  # warm-up
    start = time.perf_counter()
    out = unet_out(tiny)
    assert time.perf_counter() - start < 1.0
    assert out.shape == (2, 4, 32, 32) and torch.isfinite(out).all()


def test_tiny_sdxl_uses_the_time_ids_and_is_deterministic(tiny):
    again = build_tiny_sdxl(seed=0)
    for part in PARTS:
        assert_same_weights(getattr(tiny, part), getattr(again, part))
    assert not torch.equal(build_tiny_sdxl(seed=1).unet.conv_in.weight, tiny.unet.conv_in.weight)
    torch.manual_seed(1)
    x, ctx, pooled = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 96), torch.randn(1, 24)
    with torch.no_grad():
        a, b = (tiny.unet(x, 10, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.tensor([ids])}).sample
                for ids in ([64.0, 64, 0, 0, 64, 64], [128.0, 96, 16, 0, 64, 64]))
    assert not torch.allclose(a, b)  # the size / crop conditioning reaches the output
    v = build_tiny_sdxl(prediction_type="v_prediction")
    assert v.prediction_type == "v_prediction" and v.scheduler.config.rescale_betas_zero_snr


# ----------------------------------------------------------------------------- single files we write


def test_single_file_round_trip_is_exact(tiny, written):
    loaded = load_sdxl_single_file(written)
    for part in PARTS:
        assert_same_weights(getattr(tiny, part), getattr(loaded, part))
    assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection" and loaded.family == "sdxl"
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.pad_token == "<|endoftext|>"
    assert loaded.prediction_type == "epsilon"
    assert dict(loaded.unet.config)["transformer_layers_per_block"] == [1, 1, 2]
    torch.testing.assert_close(unet_out(loaded), unet_out(tiny))
    metadata, shapes = read_safetensors_header(written)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert json.loads(metadata["diffusers.text_encoder_2_config"])["projection_dim"] == 24
    assert "v_pred" not in shapes


def test_written_keys_follow_the_sgm_layout(tiny, written):
    keys = set(load_file(str(written)))
    for key in (
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.label_emb.0.2.bias",
        "model.diffusion_model.input_blocks.3.0.op.weight",  # first level: two resnets, then the downsampler
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.1.ff.net.2.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",  # upsampler after an attention
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
        "first_stage_model.decoder.up.0.block.1.conv2.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.ln_final.weight",
    ):
        assert key in keys, key
    assert not any(k.startswith("cond_stage_model.") or "attentions" in k for k in keys)
    assert "conditioner.embedders.1.model.transformer.resblocks.2.ln_1.weight" not in keys  # no padding block
    # OpenCLIP computes x @ text_projection: the transformers Linear weight, transposed
    proj = load_file(str(written))["conditioner.embedders.1.model.text_projection"]
    assert torch.equal(proj, tiny.text_encoder_2.text_projection.weight.T)
    assert proj.shape == (64, 24)


def test_diffusers_own_loader_reads_our_sdxl_file(tiny, written, tmp_path):
    """diffusers' pipeline-level single-file reader (not our code) gives the same weights, offline."""
    from diffusers import StableDiffusionXLPipeline

    config = save_sdxl_folder(tiny, tmp_path / "config")
    pipe = StableDiffusionXLPipeline.from_single_file(str(written), config=str(config), local_files_only=True)
    for part in PARTS:
        assert_same_weights(getattr(pipe, part), getattr(tiny, part))


def test_every_sgm_unet_name_is_in_the_written_file(tiny, written):
    layers = [n for n, m in tiny.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    names = unet_module_ldm_names(tiny.unet, layers)
    assert set(names) == set(layers)
    keys = set(load_file(str(written)))
    assert all(f"model.diffusion_model.{ldm}.weight" in keys for ldm in names.values())
    assert names["add_embedding.linear_1"] == "label_emb.0.0"


def test_sgm_names_of_real_sdxl():
    """kohya SDXL files name UNet layers by these SGM names (lora_unet_input_blocks_4_1_...)."""
    from types import SimpleNamespace

    unet = SimpleNamespace(config=read_config_folder(shipped_config_folder("sdxl", "epsilon"))["unet"])
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks.8.1.transformer_blocks.9.ff.net.2",
        "mid_block.attentions.0.transformer_blocks.9.attn2.to_k": "middle_block.1.transformer_blocks.9.attn2.to_k",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.attentions.2.proj_out": "output_blocks.5.1.proj_out",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
        "add_embedding.linear_2": "label_emb.0.2",
        "time_embedding.linear_1": "time_embed.0",
    }
    assert unet_module_ldm_names(unet, list(expected)) == expected


def test_v_prediction_sdxl_is_marked_for_other_tools(tmp_path):
    model = build_tiny_sdxl(seed=2, prediction_type="v_prediction")
    path = save_single_file(model, tmp_path / "v.safetensors")
    _, shapes = read_safetensors_header(path)
    assert {"v_pred", "ztsnr"} <= set(shapes)  # ComfyUI / Forge read these
    loaded = load_sdxl_single_file(path)
    assert loaded.prediction_type == "v_prediction" and loaded.scheduler.config.rescale_betas_zero_snr


# ----------------------------------------------------------------------------- foreign files and refusals


@pytest.fixture()
def tiny_shipped(tmp_path, monkeypatch, tiny) -> Path:
    """Stand-ins for the shipped sdxl / sdxl-v config folders, sized for the tiny model."""
    root = tmp_path / "model_configs"
    save_sdxl_folder(tiny, root / "sdxl")
    save_sdxl_folder(build_tiny_sdxl(prediction_type="v_prediction"), root / "sdxl-v")
    monkeypatch.setattr(single_file, "MODEL_CONFIGS_DIR", root)
    return root


def save_foreign(model: BaseModel, path: Path, **extra) -> Path:
    """A file as other tools write it: SGM keys, no configs in the metadata."""
    save_file({**{k: v.contiguous() for k, v in diffusers_to_ldm(model).items()}, **extra}, str(path))
    return path


def test_foreign_sdxl_file_uses_the_shipped_configs(tiny, tiny_shipped, tmp_path):
    path = save_foreign(tiny, tmp_path / "civitai.safetensors")
    loaded = load_sdxl_single_file(path)
    for part in PARTS:
        assert_same_weights(getattr(tiny, part), getattr(loaded, part))
    assert loaded.prediction_type == "epsilon" and loaded.tokenizer_2.pad_token == "!"
    v = load_sdxl_single_file(path, prediction_type="v_prediction")
    assert v.prediction_type == "v_prediction" and v.scheduler.config.rescale_betas_zero_snr
    marked = save_foreign(tiny, tmp_path / "noob-vpred.safetensors", v_pred=torch.zeros(0), ztsnr=torch.zeros(0))
    assert load_sdxl_single_file(marked).prediction_type == "v_prediction"


def test_sd_loader_still_refuses_sdxl_and_sdxl_loader_refuses_sd(tiny, written, tmp_path):
    with pytest.raises(ModelLoadError, match="SDXL checkpoint; this app trains Stable Diffusion 1.x and 2.x only"):
        load_single_file(written)
    with pytest.raises(ModelLoadError, match="is an SDXL checkpoint; this app trains"):
        load_single_file(save_foreign(tiny, tmp_path / "foreign.safetensors"))
    sd = save_single_file(build_tiny_model(), tmp_path / "sd.safetensors")
    with pytest.raises(ModelLoadError, match="1.x/2.x model .*not SDXL"):
        load_sdxl_single_file(sd)


def shapes_of(model: BaseModel) -> dict[str, tuple[int, ...]]:
    return ldm_shapes(diffusers_to_ldm(model))


def test_detect_family_recognises_sdxl_and_refuses_refiner_and_inpainting(tiny):
    base = shapes_of(tiny)
    assert detect_family(base) == "sdxl"
    with pytest.raises(ModelLoadError, match="shapes of Stable Diffusion 1.x or 2.x"):  # SD keys take the SD path
        detect_family(shapes_of(build_tiny_model()))
    # the refiner: OpenCLIP-G alone as embedder 0, no CLIP-L
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in base.items()
               if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        detect_family(refiner)
    inpaint = {**base, "model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)}
    with pytest.raises(ModelLoadError, match="SDXL inpainting model .*9 input channels"):
        detect_family(inpaint)
    one_encoder = {k: v for k, v in base.items() if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(ModelLoadError, match="without both SDXL text encoders"):
        detect_family(one_encoder)
    odd = {**base, "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (32, 80)}
    with pytest.raises(ModelLoadError, match="cross-attention width of 80"):
        detect_family(odd)


# ----------------------------------------------------------------------------- shipped configs at full size


@pytest.fixture(scope="module")
def full_size() -> BaseModel:
    with torch.device("meta"):
        return build_sdxl_from_configs(read_config_folder(shipped_config_folder("sdxl", "epsilon")))


def test_shipped_sdxl_configs_build_sdxl_base(full_size):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(full_size.unet) == 2_567_463_684  # SDXL base 1.0
    assert count(full_size.text_encoder_2) == 694_659_840 and count(full_size.text_encoder) == 123_060_480
    assert count(full_size.vae) == 83_653_863
    for name in ("sdxl", "sdxl-v"):
        folder = single_file.MODEL_CONFIGS_DIR / name
        cfg = read_config_folder(folder)
        assert set(cfg) == {"unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2"}
        assert cfg["tokenizer_2"]["pad_token"] == "!" and cfg["vae"]["scaling_factor"] == 0.13025
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    v = read_config_folder(shipped_config_folder("sdxl", "v_prediction"))["scheduler"]
    assert v["prediction_type"] == "v_prediction" and v["rescale_betas_zero_snr"] is True


def test_full_size_layout_matches_diffusers_reader(full_size):
    """At real SDXL shapes, our writer's keys are exactly what diffusers' reader turns back into the model."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )

    state = diffusers_to_ldm(full_size)
    assert sum(k.startswith("model.diffusion_model.") for k in state) == 1680
    known = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    }
    for key, shape in known.items():
        assert tuple(state[key].shape) == shape, key
    assert infer_diffusers_model_type(state) == "xl_base"

    def same(converted: dict, module: torch.nn.Module) -> None:
        ref = module.state_dict()
        assert set(converted) == set(ref)
        assert all(tuple(converted[k].shape) == tuple(ref[k].shape) for k in ref)

    same(convert_ldm_unet_checkpoint(state, dict(full_size.unet.config)), full_size.unet)
    same(convert_ldm_vae_checkpoint(state, dict(full_size.vae.config)), full_size.vae)
    clip = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith("conditioner.embedders.0.")})
    same({k.removeprefix("text_model."): v for k, v in clip.items()}, full_size.text_encoder)
    same(convert_open_clip_checkpoint(full_size.text_encoder_2, state, prefix="conditioner.embedders.1.model."),
         full_size.text_encoder_2)
    assert detect_family(ldm_shapes(state)) == "sdxl"


# ----------------------------------------------------------------------------- diffusers folders


def test_sdxl_folder_is_recognised_and_loads(tiny, tmp_path):
    folder = save_sdxl_folder(tiny, tmp_path / "xl")
    assert is_sdxl_folder(folder)
    check_sdxl_folder(folder)
    loaded = load_sdxl_folder(folder, local_files_only=True)
    for part in PARTS:
        assert_same_weights(getattr(tiny, part), getattr(loaded, part))
    assert loaded.tokenizer_2.pad_token == "!" and loaded.name == str(folder)
    assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    sd = save_model_folder(build_tiny_model(), tmp_path / "sd")
    assert not is_sdxl_folder(sd) and not is_sdxl_folder(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="not an SDXL base model"):
        check_sdxl_folder(sd)


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_refiner_and_inpainting_folders_are_refused(tiny, tmp_path):
    refiner = save_sdxl_folder(tiny, tmp_path / "refiner")
    edit_json(refiner / "model_index.json", _class_name="StableDiffusionXLImg2ImgPipeline",
              text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True)
    assert is_sdxl_folder(refiner)
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        load_sdxl_folder(refiner, local_files_only=True)
    inpaint = save_sdxl_folder(tiny, tmp_path / "inpaint")
    edit_json(inpaint / "unet" / "config.json", in_channels=9)
    with pytest.raises(ModelLoadError, match="SDXL inpainting model .*9 input channels"):
        check_sdxl_folder(inpaint, name="my-inpaint")
