"""The VRAM planner: its parts, how it reacts to the settings, and its activation tracing."""
from __future__ import annotations

import shutil

import pytest
import torch
from test_adapters import make_cfg

from core import adapters, families, vram
from core.config import Config, preset_dict
from core.models import build_tiny_model, load_base_model


def preset(name: str, **sections) -> Config:
    d = preset_dict(name)
    d.pop("description", None)
    d["model"]["base"] = "demo"
    d["data"]["resolution"] = 64
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return Config.from_dict(d)


def test_weights_are_the_models_parameter_count():
    model = load_base_model("demo")
    params = sum(p.numel() for m in (model.unet, model.text_encoder, model.vae) for p in m.parameters())
    assert vram.plan(preset("sd15-lora"), "fp16").weights == params * 2
    assert vram.plan(preset("sd15-lora"), "no").weights == params * 4


def test_adapter_state_is_weight_gradient_and_optimizer():
    cfg = preset("sd15-lora")
    base = load_base_model("demo")
    trainable = sum(p.numel() for ps in adapters.inject_all(base.parts, adapters.specs_from_config(cfg)).values() for p in ps)
    assert vram.plan(cfg, "fp16").adapter == trainable * (4 + 4 + 8)
    eight_bit = preset("sd15-lora", train={"optimizer": "adamw8bit"})
    assert vram.plan(eight_bit, "fp16").adapter == trainable * (4 + 4 + 2)


def test_activations_follow_the_settings():
    base = vram.plan(preset("sd15-lora"), "fp16")
    bigger = vram.plan(preset("sd15-lora", train={"batch_size": 4}), "fp16")
    larger = vram.plan(preset("sd15-lora", data={"resolution": 128}), "fp16")
    checkpointed = vram.plan(preset("sd15-lora", train={"gradient_checkpointing": True}), "fp16")
    frozen_te = vram.plan(preset("sd15-lora", adapter={"train_text_encoder": False}), "fp16")
    assert 3.0 < bigger.activations / base.activations < 5.0  # 4 x the images (8 with the class images)
    assert 3.0 < larger.activations / base.activations < 5.0  # 4 x the pixels
    assert checkpointed.activations < 0.5 * base.activations
    assert frozen_te.activations < base.activations and frozen_te.adapter < base.adapter
    low = vram.plan(preset("sd15-lora-lowvram"), "fp16")
    assert low.activations < 0.2 * base.activations and low.total < base.total


def test_meta_trace_equals_a_real_forward():
    """Tracing on the meta device (shapes only) counts what a real forward keeps for backward, byte for byte."""
    cfg = make_cfg("lora", False)
    real = build_tiny_model().freeze()
    adapters.inject_all(real.parts, adapters.specs_from_config(cfg))
    real.unet.train()
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([3, 500]), torch.randn(2, 77, 32)
    real_bytes, _ = vram._traced_bytes(real.unet, lambda: real.unet(x, t, cond))
    with torch.device("meta"):
        meta = build_tiny_model().freeze()
    adapters.inject_all(meta.parts, adapters.specs_from_config(cfg))
    meta.unet.train()
    meta_bytes, _ = vram._traced_bytes(meta.unet, lambda: meta.unet(x.to("meta"), t.to("meta"), cond.to("meta")))
    assert meta_bytes == real_bytes > 0


def test_advice_says_whether_it_fits():
    cfg = preset("sd15-lora")
    need = vram.plan(cfg).total + vram.CUDA_CONTEXT
    assert vram.advice(cfg, need + 2 ** 30).endswith("it fits.")
    assert "not enough" in vram.advice(cfg, need - 2 ** 20) and "low-VRAM preset" in vram.advice(cfg, need - 2 ** 20)
    assert "training runs on the CPU" in vram.advice(cfg, None)


def test_a_hub_model_not_downloaded_is_assumed_sd15(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cfg = preset("sd15-lora")
    cfg.model.base = "someone/some-model"
    p = vram.plan(cfg, "fp16")
    assert "assumed to be SD 1.5" in p.text()
    assert 1.8 * 2 ** 30 < p.weights < 2.1 * 2 ** 30  # SD 1.5: about 1.07 billion parameters in fp16


@pytest.mark.parametrize("name", ["sd15-lora", "sd15-lora-lowvram", "sdxl-lora-24gb", "sdxl-lora-12gb", "sdxl-lora-8gb",
                                  "sdxl-loha", "sdxl-lokr", "sdxl-dora", "sd15-dora"])
def test_presets_load(name):
    assert Config.from_dict({k: v for k, v in preset_dict(name).items() if k != "description"}).model.base


def test_tracing_leaves_attention_alone_in_other_threads():
    """The app traces in a handler thread while a run may train in another: that run keeps the real attention
    (it once got the trace's stand-in, whose backward raises, and failed)."""
    import threading

    import torch.nn.functional as F

    q, k, v = (torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    seen = {}

    def other_thread():
        seen["out"] = F.scaled_dot_product_attention(q, k, v)

    def run():
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        seen["traced"] = F.scaled_dot_product_attention(q.clone().requires_grad_(), k, v)

    vram._traced_bytes(torch.nn.Linear(1, 1), run)
    torch.testing.assert_close(seen["out"], expected)
    assert seen["traced"].grad_fn is not None and type(seen["traced"].grad_fn).__name__ == "_FusedAttentionBackward"
    assert F.scaled_dot_product_attention(q, k, v).equal(expected)  # restored afterwards


# ----------------------------------------------------------------------------- SDXL

SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
# GiB planned (allocated, CUDA context included)
CARD_LIMITS = {"sdxl-lora-24gb": 22.0, "sdxl-lora-12gb": 10.5, "sdxl-lora-8gb": 7.0, "sdxl-dora": 22.0}


def sdxl_parts():
    from core.single_file import read_config_folder, shipped_config_folder

    with torch.device("meta"):
        return families.get("sdxl").parts_from_configs(read_config_folder(shipped_config_folder("sdxl", "epsilon")))


@pytest.mark.parametrize("name", CARD_LIMITS)
def test_sdxl_presets_fit_their_cards(name):
    cfg = vram.preset_config(name)
    assert cfg.model.base == SDXL_ID and cfg.data.resolution == 1024 and cfg.train.gradient_checkpointing
    need = (vram.plan(cfg).total + vram.CUDA_CONTEXT) / 2 ** 30
    assert need <= CARD_LIMITS[name]


def test_the_8gb_preset_trains_with_the_frozen_encoders_in_main_memory():
    parts = sdxl_parts()
    p = vram.plan(vram.preset_config("sdxl-lora-8gb"), "fp16")
    assert p.cached and p.offloaded == sum(vram.count(parts[te]) for te in ("text_encoder", "text_encoder_2")) * 2 + p.vae
    assert p.on_gpu == vram.count(parts["unet"]) * 2 and p.vae == vram.count(parts["vae"]) * 4
    assert p.caching == p.vae + p.encode < p.training == p.total  # the VAE encodes alone, before the UNet comes


def test_low_memory_sdxl_presets_train_the_unet_only_with_8bit_adam():
    for name in ("sdxl-lora-12gb", "sdxl-lora-8gb"):
        cfg = vram.preset_config(name)
        assert not cfg.adapter.train_text_encoder and cfg.train.cache_text_embeddings and cfg.train.cache_latents
        assert cfg.train.optimizer == "adamw8bit"
    assert vram.preset_config("sdxl-lora-8gb").adapter.rank < vram.preset_config("sdxl-lora-12gb").adapter.rank


def test_full_size_sdxl_weights_count_every_part_and_an_fp32_vae():
    parts = sdxl_parts()
    fp16 = sum(vram.count(parts[p]) for p in ("unet", "text_encoder", "text_encoder_2")) * 2
    weights = vram.plan(vram.preset_config("sdxl-lora-12gb"), "fp16").weights
    assert weights == fp16 + vram.count(parts["vae"]) * 4  # SDXL's VAE overflows in fp16
    assert 6.9e9 < weights < 7.2e9  # UNet + both encoders in fp16 about 6.8 GB, the VAE 0.33 GB


def test_sdxl_plan_is_larger_than_sd_and_checkpointing_lowers_it():
    cfg = vram.preset_config("sdxl-lora-12gb")
    sdxl = vram.plan(cfg, "fp16")
    cfg.model.base = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the same settings on SD 1.5's shape
    sd = vram.plan(cfg, "fp16")
    assert not sd.assumed and sdxl.total > sd.total and sdxl.weights > 3 * sd.weights
    cfg.model.base, cfg.train.gradient_checkpointing = SDXL_ID, False
    assert vram.plan(cfg, "fp16").activations > 3 * sdxl.activations
    assert 1e9 < sdxl.activations < 6e9 and 1e9 < sdxl.encode < 4e9  # 1024 px: GiBs, not MiBs or hundreds of GiB


def test_both_sdxl_text_encoders_are_traced_when_they_train(monkeypatch):
    traced = []
    real = vram._traced_bytes
    monkeypatch.setattr(vram, "_traced_bytes", lambda module, run: traced.append(type(module).__name__) or real(module, run))
    vram._plan.cache_clear()
    cfg = make_cfg("lora", True)
    cfg.model.base = "tiny-sdxl"
    p = vram.plan(cfg, "fp16")
    assert traced == ["UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection"]
    cfg.adapter.train_text_encoder = False
    frozen = vram.plan(cfg, "fp16")
    assert frozen.activations < p.activations and frozen.adapter < p.adapter and frozen.weights == p.weights


def test_model_configs_of_every_sdxl_source(monkeypatch, tmp_path):
    from safetensors.torch import load_file, save_file

    from core.single_file import save_single_file, shipped_config_folder

    tiny, note = vram.model_configs("tiny-sdxl")
    assert not note and vram.family_of(tiny).name == "sdxl" and "text_encoder_2" in tiny
    folder = tmp_path / "sdxl-folder"
    shutil.copytree(shipped_config_folder("sdxl", "epsilon"), folder)
    assert vram.family_of(vram.model_configs(str(folder))[0]).name == "sdxl"
    # a foreign SGM single file (no configs in its metadata): recognised from its header, shaped as SDXL 1.0
    written = save_single_file(load_base_model("tiny-sdxl"), tmp_path / "written.safetensors")
    save_file(load_file(written), tmp_path / "foreign.safetensors")
    configs, note = vram.model_configs(str(tmp_path / "foreign.safetensors"))
    assert not note and vram.family_of(configs).name == "sdxl" and configs["unet"]["cross_attention_dim"] == 2048
    # a hub id: from the cache when downloaded, from the shipped configs when it is the family's reference model
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    configs, note = vram.model_configs(SDXL_ID)
    assert not note and configs["unet"]["cross_attention_dim"] == 2048
    snapshot = tmp_path / "hub" / "models--someone--my-sdxl" / "snapshots" / "abc"
    shutil.copytree(folder, snapshot)
    assert vram.family_of(vram.model_configs("someone/my-sdxl")[0]).name == "sdxl"


def test_the_planner_suggests_the_largest_preset_that_fits():
    sdxl = families.get("sdxl")
    assert vram.suggest_preset(sdxl, 30 * 2 ** 30) == "sdxl-lora-24gb"
    assert vram.suggest_preset(sdxl, 8.5 * 2 ** 30) == "sdxl-lora-12gb"
    assert vram.suggest_preset(sdxl, 7 * 2 ** 30) == "sdxl-lora-8gb"
    assert vram.suggest_preset(sdxl, 2 * 2 ** 30) is None
    assert vram.suggest_preset(sdxl, 30 * 2 ** 30, "loha") == "sdxl-loha"
    assert vram.suggest_preset(families.get("sd1"), 4 * 2 ** 30) == "sd15-lora-lowvram"
    line = vram.advice(vram.preset_config("sdxl-lora-24gb"), 8.5 * 2 ** 30)
    assert "not enough" in line and "Use the sdxl-lora-12gb preset" in line


# ----------------------------------------------------------------------------- frozen parts in main memory

def tiny_sdxl_cfg(**train) -> Config:
    cfg = make_cfg("lora", False)
    cfg.model.base = "tiny-sdxl"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_offloaded_parts_count_only_while_they_encode():
    kept = vram.plan(tiny_sdxl_cfg(), "fp16")
    resident = vram.plan(tiny_sdxl_cfg(offload_frozen=False), "fp16")
    parts = load_base_model("tiny-sdxl").all_parts
    frozen = sum(vram.count(parts[p]) for p in ("text_encoder", "text_encoder_2")) * 2 + kept.vae
    assert kept.weights == resident.weights and resident.offloaded == 0 and kept.offloaded == frozen
    assert kept.on_gpu == resident.on_gpu - frozen == vram.count(parts["unet"]) * 2
    assert kept.training == resident.training - frozen and kept.caching == resident.caching == kept.vae + kept.encode
    assert "more kept in main memory" in kept.text() and "main memory" not in resident.text()


def test_what_the_steps_need_stays_on_the_gpu():
    both = vram.plan(tiny_sdxl_cfg(), "fp16")
    trained_te = tiny_sdxl_cfg()
    trained_te.adapter.train_text_encoder = True  # the text encoders work in every step: they stay
    p = vram.plan(trained_te, "fp16")
    assert p.offloaded == p.vae > 0 and p.cached
    random_crops = tiny_sdxl_cfg()
    random_crops.data.center_crop = False  # the VAE encodes in every step, beside the UNet: it stays
    p = vram.plan(random_crops, "fp16")
    assert not p.cached and p.caching == 0 and p.offloaded == both.offloaded - both.vae > 0
    assert p.total == p.on_gpu + p.adapter + max(p.activations + p.transient, p.encode)
