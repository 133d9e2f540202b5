"""FLUX.1 as users download it: a BFL-layout transformer file (bf16, fp8, ComfyUI's scaled fp8 and all-in-one
files) with CLIP-L, T5-XXL and the VAE as separate files or folders, found beside it or named in the settings; the
BFL names and splits checked against diffusers' own converter (the real FLUX.1-dev shapes, on the meta device)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from accelerate import init_empty_weights
from conftest import tiny_config
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from core.config import Config
from core.errors import ModelLoadError
from core.families.flux import FluxFamily
from core.families.flux_files import (EMBEDDED, FLUX_CONFIGS, save_flux_files, t5_tokenizer, transformer_config,
                                      transformer_from_bfl, transformer_to_bfl)
from core.models import load_base_from_config, load_base_model, save_model_folder
from core.trainer import train

FLUX = FluxFamily()
PARTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


def same_weights(a, b, parts=PARTS):
    for part in parts:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        assert all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa), part


def transformer_output(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    tr = model.transformer
    x = torch.randn(1, 16, tr.config.in_channels, generator=g)
    txt = torch.randn(1, 5, tr.config.joint_attention_dim, generator=g)
    pooled = torch.randn(1, tr.config.pooled_projection_dim, generator=g)
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    kwargs = {"guidance": torch.tensor([3.5])} if tr.config.guidance_embeds else {}
    with torch.no_grad():
        return tr(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=torch.tensor([0.5]),
                  img_ids=ids, txt_ids=torch.zeros(5, 3), **kwargs).sample


@pytest.fixture(scope="module")
def tiny():
    return FLUX.build_tiny().freeze()


@pytest.fixture
def files(tmp_path, tiny):
    """The tiny model as flux1 / clip_l / t5xxl / ae .safetensors files in one folder (float32)."""
    return save_flux_files(tiny, tmp_path / "flux", dtype=None)


# ------------------------------------------------------------------------------------------ the BFL layout


def test_bfl_names_are_the_ones_diffusers_reads_for_flux_dev():
    """The real FLUX.1-dev transformer (shipped config, meta device): our BFL state is exactly what diffusers' own
    converter consumes (nothing left over) and gives back every diffusers weight in its shape; ours reads it back
    the same; the file's config is FLUX.1-dev's."""
    config = json.loads((FLUX_CONFIGS / "transformer" / "config.json").read_text())
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    state = model.state_dict()
    bfl = transformer_to_bfl(state)
    assert bfl["double_blocks.0.img_attn.qkv.weight"].shape == (3 * 3072, 3072)
    assert bfl["single_blocks.37.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 3072)
    theirs_in = dict(bfl)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(theirs_in)
    assert theirs_in == {}, f"diffusers did not read {list(theirs_in)[:3]}"
    assert theirs.keys() == state.keys() and all(theirs[k].shape == state[k].shape for k in state)
    ours = transformer_from_bfl(bfl)
    assert ours.keys() == state.keys() and all(ours[k].shape == state[k].shape for k in state)
    assert transformer_config({k: v.shape for k, v in bfl.items()}, {}, "flux1-dev.safetensors") == config


def test_bfl_values_are_split_as_diffusers_splits_them(tiny):
    """Values, against diffusers' converter: the tiny model's double blocks and outer layers; and a single block
    3072 wide (the width diffusers' converter assumes), its fused linear1 split into q, k, v and the MLP."""
    bfl = transformer_to_bfl(tiny.transformer.state_dict())
    fake_single = {"single_blocks.0.linear1.weight": torch.randn(3 * 3072 + 4 * 3072, 2),
                   "single_blocks.0.linear1.bias": torch.randn(3 * 3072 + 4 * 3072),
                   **{k: v for k, v in bfl.items() if k.startswith("single_blocks.0.") and "linear1" not in k}}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(
        {**{k: v for k, v in bfl.items() if not k.startswith("single_blocks.")}, **fake_single})
    ours = transformer_from_bfl({k: v for k, v in bfl.items() if not k.startswith("single_blocks.")})
    assert ours and all(torch.equal(ours[k], theirs[k]) for k in ours)
    wide = transformer_from_bfl({"img_in.weight": torch.zeros(3072, 2), **fake_single})
    singles = [k for k in theirs if k.startswith("single_transformer_blocks.0.")]
    assert singles and all(torch.equal(wide[k], theirs[k]) for k in singles)
    # and back: our writer fuses what our reader split
    state = tiny.transformer.state_dict()
    back = transformer_from_bfl(bfl)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_a_weight_without_a_bfl_name_is_an_error(tiny):
    state = {**tiny.transformer.state_dict(), "transformer_blocks.0.attn.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="attn.extra"):
        transformer_to_bfl(state)


# ------------------------------------------------------------------------------------------ loading files


def test_transformer_file_with_its_companions_beside_it(files, tiny):
    """flux1 / clip_l / t5xxl / ae .safetensors in one folder: model.base = the transformer file is enough."""
    loaded = load_base_model(str(files["transformer"]))
    assert loaded.family_name == "flux" and loaded.family == "flux"
    same_weights(tiny, loaded)
    # (same weights; float32 kernels on differently laid-out tensors round differently in the last bits)
    assert torch.allclose(transformer_output(tiny), transformer_output(loaded), atol=1e-5)
    ids = loaded.tokenizer_2(["a photo of sks ball"]).input_ids
    assert ids == tiny.tokenizer_2(["a photo of sks ball"]).input_ids  # a small T5 brings its own tokenizer
    assert loaded.tokenizer_2.model_max_length == 512 and loaded.scheduler.config.use_dynamic_shifting


def test_comfyui_folders_are_searched(files, tmp_path, tiny):
    """ComfyUI keeps them in models/unet (or diffusion_models), models/clip and models/vae."""
    models = tmp_path / "ComfyUI" / "models"
    for sub, part in (("diffusion_models", "transformer"), ("clip", "text_encoder"), ("clip", "text_encoder_2"),
                      ("vae", "vae")):
        (models / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(files[part], models / sub / files[part].name.replace("t5xxl", "t5xxl_fp16"))
    loaded = load_base_model(str(models / "diffusion_models" / "flux1.safetensors"))
    same_weights(tiny, loaded)


def test_missing_companions_are_named_with_their_settings(files, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(files["transformer"], alone / "flux1-dev.safetensors")
    with pytest.raises(ModelLoadError) as e:
        load_base_model(str(alone / "flux1-dev.safetensors"))
    message = str(e.value)
    for words in ("flux1-dev.safetensors", "CLIP-L text encoder (model.text_encoder)",
                  "T5-XXL text encoder (model.text_encoder_2)", "VAE (model.vae)"):
        assert words in message
    with pytest.raises(ModelLoadError, match="T5-XXL text encoder not found: .*nowhere.safetensors"):
        load_base_model(str(alone / "flux1-dev.safetensors"),
                        companions={"text_encoder": str(files["text_encoder"]), "text_encoder_2": "nowhere.safetensors",
                                    "vae": str(files["vae"])})


def test_settings_name_companions_as_files_or_folders(files, tmp_path, tiny, instance_dir):
    """model.text_encoder / text_encoder_2 / vae: files, or a diffusers FLUX folder; a run trains on the result."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(files["transformer"], alone / "flux1-dev.safetensors")
    folder = save_model_folder(tiny, tmp_path / "flux-diffusers")
    model = {"base": str(alone / "flux1-dev.safetensors"), "text_encoder": str(folder),
             "text_encoder_2": str(folder), "vae": str(files["vae"])}
    cfg = Config.from_dict({**tiny_config(tmp_path, instance_dir, train={"max_steps": 2}), "model": model})
    loaded = load_base_from_config(cfg)
    same_weights(tiny, loaded)
    assert loaded.vae_source == str(files["vae"])
    run_dir = train(cfg)
    assert (run_dir / f"{run_dir.name}.safetensors").is_file()


def test_schnell_is_told_by_its_missing_guidance_embedding(tmp_path):
    schnell = FLUX.build_tiny(guidance=False).freeze()
    paths = save_flux_files(schnell, tmp_path / "schnell", dtype=None)
    loaded = load_base_model(str(paths["transformer"]))
    assert not loaded.transformer.config.guidance_embeds
    assert loaded.tokenizer_2.model_max_length == 256  # schnell's T5 length
    assert loaded.scheduler.config.shift == 1.0 and not loaded.scheduler.config.use_dynamic_shifting
    assert torch.allclose(transformer_output(schnell), transformer_output(loaded), atol=1e-5)


def test_fp8_and_scaled_fp8_files(files, tiny, tmp_path):
    """An fp8 transformer loads as its fp8 values; ComfyUI's scaled fp8 (`scale_weight` beside each weight) is
    multiplied out; bf16 files load too."""
    state = load_file(str(files["transformer"]))
    meta = {"format": "pt", "diffusers.config": json.dumps(dict(tiny.transformer.config))}
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
    save_file(fp8, str(files["transformer"]), metadata=meta)
    loaded = load_base_model(str(files["transformer"]))
    got = transformer_to_bfl(loaded.transformer.state_dict())
    assert all(torch.equal(got[k], fp8[k].float()) for k in fp8)
    scale = {k.replace(".weight", ".scale_weight"): torch.tensor(0.5) for k in state if k.endswith("qkv.weight")}
    save_file({**fp8, **scale, "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, str(files["transformer"]),
              metadata=meta)
    got = transformer_to_bfl(load_base_model(str(files["transformer"])).transformer.state_dict())
    assert scale and all(torch.equal(got[k.replace(".scale_weight", ".weight")],
                                     fp8[k.replace(".scale_weight", ".weight")].float() * 0.5) for k in scale)
    assert all(torch.equal(got[k], fp8[k].float()) for k in fp8 if not k.endswith("qkv.weight"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(files["transformer"]), metadata=meta)
    got = transformer_to_bfl(load_base_model(str(files["transformer"])).transformer.state_dict())
    assert all(torch.equal(got[k], state[k].to(torch.bfloat16).float()) for k in state)


def test_comfyui_all_in_one_file(files, tmp_path, tiny):
    """One file with model.diffusion_model.*, text_encoders.clip_l/t5xxl.transformer.* and vae.* weights."""
    state = {f"model.diffusion_model.{k}": v for k, v in load_file(str(files["transformer"])).items()}
    for part in ("text_encoder", "text_encoder_2", "vae"):
        state.update({EMBEDDED[part] + k: v for k, v in load_file(str(files[part])).items()})
    meta = {"format": "pt", "diffusers.config": json.dumps(dict(tiny.transformer.config))}
    alone = tmp_path / "aio"
    alone.mkdir()
    save_file(state, str(alone / "flux1-dev-fp8.safetensors"), metadata=meta)
    # the embedded encoders use the shipped (FLUX.1-dev) configs: only the transformer fits a tiny model that way,
    # so the tiny encoders are given their configs here by naming them explicitly instead
    with pytest.raises(ModelLoadError, match="CLIP-L"):
        load_base_model(str(alone / "flux1-dev-fp8.safetensors"))
    loaded = load_base_model(str(alone / "flux1-dev-fp8.safetensors"),
                             companions={p: str(files[p]) for p in ("text_encoder", "text_encoder_2", "vae")})
    same_weights(tiny, loaded)


def test_files_that_are_not_plain_flux_are_refused(files, tmp_path):
    state = load_file(str(files["transformer"]))
    fill = dict(state)
    fill["img_in.weight"] = torch.zeros(state["img_in.weight"].shape[0], 384)
    save_file(fill, str(tmp_path / "flux1-fill-dev.safetensors"))  # no configs: FLUX.1's shapes are checked
    with pytest.raises(ModelLoadError, match="384 input channels.*Fill"):
        load_base_model(str(tmp_path / "flux1-fill-dev.safetensors"))
    with pytest.raises(ModelLoadError, match="not a CLIP-L text encoder"):
        load_base_model(str(files["transformer"]), companions={"text_encoder": str(files["vae"])})
    t5 = load_file(str(files["text_encoder_2"]))
    save_file(t5, str(tmp_path / "t5-small.safetensors"), metadata={"format": "pt", "diffusers.config": json.dumps(
        json.loads(json.dumps(dict(FLUX.build_tiny().text_encoder_2.config.to_dict()), default=str)))})
    with pytest.raises(ModelLoadError, match="not T5-XXL"):
        load_base_model(str(files["transformer"]), companions={"text_encoder_2": str(tmp_path / "t5-small.safetensors")})


def test_the_shipped_t5_tokenizer_is_t5s():
    """T5-XXL's tokenizer ships with the app (nothing downloaded): its known ids for "Hello world"."""
    tok = t5_tokenizer()
    assert len(tok) == 32100
    assert tok("Hello world").input_ids == [8774, 296, 1]
    assert tok(["a cat"], padding="max_length", max_length=6).input_ids == [[3, 9, 1712, 1, 0, 0]]
