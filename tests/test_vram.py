"""The VRAM planner: its parts, how it reacts to the settings, and its activation tracing."""
from __future__ import annotations

import pytest
import torch
from test_adapters import make_cfg

from core import adapters, vram
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


@pytest.mark.parametrize("name", ["sd15-lora", "sd15-lora-lowvram"])
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
