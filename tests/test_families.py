"""The model-family seam: the registry finds SD 1.x / 2.x for models, folders and checkpoints; a second family
registered in a test is picked by detection and used by the trainer, sampling and exports with no other code
change; per-image geometry is what the crop and flip did; cached prompt conditioning equals live encoding."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from core import adapters, families
from core.base_model import BaseModel
from core.config import Config
from core.data import Geometry, ImageSet, load_rgb, resize_shorter_side, scan_folder, to_tensor
from core.errors import ModelLoadError
from core.families.sd import SD1Family
from core.models import build_tiny_model, load_base_model, save_model_folder
from core.rundir import RunDir
from core.trainer import Batch, predict, prompt_encoder, train

SD1_SHAPES = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
}


# ----------------------------------------------------------------------------- the registry finds SD


def test_registry_finds_sd_for_the_tiny_model_and_refuses_unknown_names():
    assert {"sd1", "sd2"} <= set(families.FAMILIES)
    family = families.of(build_tiny_model())
    assert family.name == "sd1" and family.parts == ("unet", "text_encoder")
    assert family.kohya_name("text_encoder", "encoder.layers.0.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    with pytest.raises(ModelLoadError, match="no support for 'sd3'"):
        families.get("sd3")


def test_folder_detection_asks_the_families(tmp_path):
    assert families.of_folder(save_model_folder(build_tiny_model(), tmp_path / "tiny")).name == "sd1"
    sd2 = tmp_path / "sd2"
    (sd2 / "unet").mkdir(parents=True)
    (sd2 / "model_index.json").write_text(json.dumps({p: ["x", "y"] for p in ("unet", "vae", "text_encoder",
                                                                                "scheduler", "tokenizer")}))
    (sd2 / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1024, "in_channels": 4}))
    assert families.of_folder(sd2).name == "sd2"
    xl = tmp_path / "xl"
    (xl / "unet").mkdir(parents=True)
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                     "unet": ["diffusers", "UNet2DConditionModel"],
                                                     "text_encoder": ["transformers", "CLIPTextModel"],
                                                     "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    (xl / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    assert families.of_folder(xl).name == "sdxl"
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": []}))
    with pytest.raises(ModelLoadError, match="not a complete FLUX.1 model: it has no vae, text_encoder"):
        families.of_folder(flux)  # claimed by the FLUX family, which says what the folder lacks
    fill = tmp_path / "fill"
    fill.mkdir()
    (fill / "model_index.json").write_text(json.dumps({"_class_name": "FluxFillPipeline", "transformer": []}))
    with pytest.raises(ModelLoadError, match="FluxFillPipeline model"):
        families.of_folder(fill)
    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", "transformer": []}))
    with pytest.raises(ModelLoadError, match="a Stable Diffusion 3 model"):  # a known kind no family claims: named
        families.of_folder(sd3)


def test_checkpoint_detection_asks_the_families():
    assert families.of_checkpoint(SD1_SHAPES).name == "sd1"
    sd2 = {k: v for k, v in SD1_SHAPES.items() if not k.startswith("cond_stage_model.")}
    sd2["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (320, 1024)
    sd2["cond_stage_model.model.token_embedding.weight"] = (49408, 1024)
    assert families.of_checkpoint(sd2).name == "sd2"
    xl = {**SD1_SHAPES, "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280)}
    with pytest.raises(ModelLoadError, match="SDXL"):
        families.of_checkpoint(xl)


def test_specs_give_every_text_encoder_of_the_family_the_text_encoder_settings():
    cfg = Config.from_dict({"adapter": {"train_text_encoder": True, "rank": 8, "text_encoder_rank": 2}})
    specs = adapters.specs_from_config(cfg, ("text_encoder", "text_encoder_2"))
    assert list(specs) == ["unet", "text_encoder", "text_encoder_2"]
    assert specs["unet"].rank == 8 and specs["text_encoder"] == specs["text_encoder_2"]
    assert specs["text_encoder_2"].rank == 2


# ----------------------------------------------------------------------------- a second family, registered here


class FakeBase(BaseModel):
    """The tiny SD model, saying it is of the fake family."""

    @property
    def family(self) -> str:
        return "fake"


class FakeFamily(SD1Family):
    """SD's architecture under another name, other kohya prefixes, and a conditioning dict of two entries."""

    name = "fake"
    label = "Fake Diffusion"
    kohya_prefixes = {"unet": "lora_fakeunet_", "text_encoder": "lora_fakete_"}
    adapter_metadata = {"ss_base_model_version": "fake_v1", "modelspec.architecture": "fake/lora"}

    def __init__(self):
        self.calls = {"encode": 0, "forward": 0, "pipeline": 0}
        self.geometry = []

    def matches_folder(self, index, unet_config) -> bool:
        return index.get("_class_name") == "FakePipeline"

    def check_folder(self, folder, index, unet_config) -> None:
        pass

    def load_folder(self, folder, name=None, **kwargs):
        return self.build_tiny()

    def build_tiny(self, seed=0, prediction_type="epsilon"):
        tiny = super().build_tiny(seed, prediction_type)
        return FakeBase(**{f.name: getattr(tiny, f.name) for f in fields(tiny)})

    def encode_prompts(self, base, prompts, device):
        self.calls["encode"] += 1
        hidden = super().encode_prompts(base, prompts, device)["hidden"]
        return {"hidden": hidden, "pooled": hidden[:, 0] * 2}

    def unet_forward(self, unet, noisy, timesteps, cond, geometry, dtype, guidance=1.0):
        self.calls["forward"] += 1
        self.geometry += list(geometry)
        assert cond["pooled"].shape == (noisy.shape[0], cond["hidden"].shape[-1])
        return super().unet_forward(unet, noisy, timesteps, cond, geometry, dtype, guidance)

    def make_pipeline(self, base, scheduler=None, **parts):
        self.calls["pipeline"] += 1
        return super().make_pipeline(base, scheduler, **parts)


@pytest.fixture
def fake(monkeypatch):
    family = FakeFamily()
    monkeypatch.setitem(families.FAMILIES, "fake", family)
    return family


def test_a_registered_family_is_picked_by_folder_detection(tmp_path, fake):
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FakePipeline"}))
    model = load_base_model(str(folder))
    assert model.family == "fake" and families.of(model) is fake


def test_a_registered_family_trains_samples_and_exports_without_other_changes(tmp_path, instance_dir, fake):
    from safetensors import safe_open

    from core.formats import export_adapter

    cfg = tiny_config(tmp_path, instance_dir, adapter={"train_text_encoder": True},
                      train={"max_steps": 2, "sample_every": 2, "cache_text_embeddings": False})
    run_dir = train(Config.from_dict(cfg), base=fake.build_tiny())
    assert fake.calls["forward"] == 2 and fake.calls["encode"] >= 2  # every step through the family
    assert fake.calls["pipeline"] == 4  # the step-0 and the step-2 samples, the end's adapter off / on
    assert len(fake.geometry) == 2 and all(isinstance(g, Geometry) for g in fake.geometry)
    adapter = adapters.read_adapter(RunDir(run_dir).adapter)
    assert adapter.metadata["family"] == "fake" and set(adapter.specs) == {"unet", "text_encoder"}
    out = export_adapter(RunDir(run_dir).adapter, tmp_path / "kohya.safetensors")
    with safe_open(str(out), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(("lora_fakeunet_", "lora_fakete_text_model_")) for k in keys)
    assert meta["ss_base_model_version"] == "fake_v1" and meta["ss_text_encoder_trained"] == "true"
    # the exported file reads back (its prefixes are a registered family's) and loads into a model of that family
    model = fake.build_tiny()
    adapters.load_all(model.parts, {"k": adapters.read_adapter(out)}, fake)
    assert adapters.adapter_names(model.parts) == ["k"]


def test_prompt_cache_with_a_dict_conditioning_gives_the_live_loss(fake):
    base = fake.build_tiny()
    prompts = ["a photo of sks ball", "a photo of a ball", "a photo of sks ball"]
    batch = Batch(torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1)), prompts)
    t = Config.from_dict({}).train
    live = predict(base, batch, torch.Generator().manual_seed(3), prompt_encoder(base, "cpu"), torch.float32, t)
    cached_encoder = prompt_encoder(base, "cpu", fixed=sorted(set(prompts)))
    encodes = fake.calls["encode"]
    cached = predict(base, batch, torch.Generator().manual_seed(3), cached_encoder, torch.float32, t)
    assert fake.calls["encode"] == encodes  # looked up, not encoded again
    assert set(cached_encoder(prompts)) == {"hidden", "pooled"}
    torch.testing.assert_close(cached.pred, live.pred, rtol=0, atol=1e-5)
    assert torch.equal(cached.target, live.target)


# ----------------------------------------------------------------------------- per-image geometry


def test_geometry_of_a_random_crop_with_a_flip_is_what_the_crop_and_flip_did(tmp_path):
    """A 300x500 (h x w) image at resolution 100 is resized to 100x167; the crop is read back from the pixels."""
    path = tmp_path / "wide.png"
    pixels = torch.arange(300 * 500 * 3, dtype=torch.float64).reshape(300, 500, 3)
    Image.fromarray((pixels % 251).numpy().astype("uint8")).save(path)
    images = ImageSet([scan_folder(tmp_path).images[0]], ["p"], 100, center_crop=False, random_flip=True)
    resized = resize_shorter_side(load_rgb(path), 100)  # the image the crop is cut from
    seen_flip = {False: 0, True: 0}
    for seed in range(12):
        tensor, _, geometry = images.sample(0, torch.Generator().manual_seed(seed))
        assert geometry.original == (300, 500) and geometry.target == (100, 100)
        top, x = geometry.crop
        left = resized.width - x - 100 if geometry.flipped else x  # the crop's left edge in the unflipped image
        view = images.get(0, torch.Generator().manual_seed(seed))[0]
        assert torch.equal(view, tensor)
        expected = to_tensor(resized.crop((left, top, left + 100, top + 100)))
        assert torch.equal(tensor, torch.flip(expected, dims=[2]) if geometry.flipped else expected)
        seen_flip[geometry.flipped] += 1
    assert all(seen_flip.values())  # both cases were checked
    (centre, g0), (mirror, g1) = images.cached_views(0)
    assert g0 == Geometry((300, 500), (0, 33), (100, 100), False)
    assert g1 == Geometry((300, 500), (0, resized.width - 33 - 100), (100, 100), True)
    assert torch.equal(mirror, torch.flip(centre, dims=[2]))
