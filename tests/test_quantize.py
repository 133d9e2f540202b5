"""Quantized frozen weights (model.quantize: nf4 / int8, bitsandbytes on the CPU here): which layers, how close,
training a LoRA on them (only adapter weights train, the file loads into the unquantized model), resume, what is
refused, and the VRAM planner's numbers for the FLUX.1 presets."""
from __future__ import annotations

import pytest
import torch
from conftest import stop_and_resume, tiny_config
from torch import nn

from core import adapters, families, vram
from core.config import Config
from core.errors import ConfigError
from core.events import Log, Progress
from core.quantize import quantizable, quantize, weight_bytes
from core.trainer import train

bnb = pytest.importorskip("bitsandbytes", reason="requirements-dev.txt installs bitsandbytes; without it the "
                                                 "quantized layers cannot be built")
FLUX = families.get("flux")


def flux_config(tmp_path, instance_dir, **sections):
    cfg = tiny_config(tmp_path, instance_dir, **sections)
    cfg["model"] = {"base": "tiny-flux", **sections.get("model", {})}
    return cfg


def velocity(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 16, generator=g)
    txt = torch.randn(1, 5, 32, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled,
                           timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3),
                           guidance=torch.tensor([1.0])).sample


@pytest.mark.parametrize("kind, dtype, tolerance", [("nf4", torch.uint8, 0.3), ("int8", torch.int8, 0.02)])
def test_block_layers_are_quantized_and_stay_close(kind, dtype, tolerance):
    """Every plain linear layer inside the blocks, nothing outside them; quantized on the move to the device; the
    output stays near the full-precision one (a tiny model's 32-wide layers are NF4's worst case); the weight
    bytes the planner counts are the bytes the layers hold."""
    reference = FLUX.build_tiny().freeze().transformer
    model = FLUX.build_tiny().freeze().transformer
    wanted = {id(layer) for _, _, layer in quantizable(model)}
    blocks = sum(isinstance(m, nn.Linear) for name in ("transformer_blocks", "single_transformer_blocks")
                 for m in getattr(model, name).modules())
    assert quantize(model, kind, torch.float32) == len(wanted) == blocks > 0
    assert type(model.x_embedder) is nn.Linear and type(model.proj_out) is nn.Linear  # outside the blocks
    model.to("cpu")
    layer = model.transformer_blocks[0].attn.to_q
    assert layer.weight.dtype == dtype
    held = layer.weight.numel() * layer.weight.element_size()
    if kind == "nf4":
        held += layer.weight.quant_state.absmax.numel() * 4
    else:
        held += layer.weight.SCB.numel() * 4
    assert held == pytest.approx(weight_bytes(reference.transformer_blocks[0].attn.to_q, kind), rel=0.01)
    want, got = velocity(reference), velocity(model)
    assert ((got - want).norm() / want.norm()).item() < tolerance


@pytest.mark.parametrize("kind, adapter_type", [("nf4", "lora"), ("int8", "lora"), ("nf4", "dora")])
def test_a_lora_trains_on_quantized_weights_and_loads_into_the_full_model(tmp_path, instance_dir, kind, adapter_type):
    """Only the adapter trains (the quantized weights keep their bytes); the loss is finite; the adapter file has
    the same names as one trained on full weights, and loads into the unquantized model (a DoRA too: peft
    dequantizes the weight for its row lengths)."""
    base = FLUX.build_tiny()
    events = []
    cfg = flux_config(tmp_path, instance_dir, model={"quantize": kind}, adapter={"type": adapter_type},
                      train={"max_steps": 4, "learning_rate": 1e-2, "prior_preservation": True})
    run_dir = train(Config.from_dict(cfg), emit=events.append, base=base)
    assert any(isinstance(e, Log) and f"held in {kind}" in e.message for e in events)
    quantized = [m for m in base.transformer.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert len(quantized) == 20 and all(not p.requires_grad for m in quantized for p in m.parameters())
    assert all(m.weight.dtype == (torch.uint8 if kind == "nf4" else torch.int8) for m in quantized)
    trained = [n for n, p in base.transformer.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    losses = [e.loss for e in events if isinstance(e, Progress)]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    plain = train(Config.from_dict(flux_config(tmp_path, instance_dir, output={"name": "plain"},
                                               adapter={"type": adapter_type}, train={"max_steps": 1})))
    ours = adapters.read_adapter(run_dir / f"{run_dir.name}.safetensors")
    theirs = adapters.read_adapter(plain / "plain.safetensors")
    assert ours.tensors.keys() == theirs.tensors.keys()
    full = FLUX.build_tiny().freeze()
    before = velocity(full.transformer)
    adapters.load_into(full.parts, ours, "q")
    assert not torch.allclose(velocity(full.transformer), before, atol=1e-4)


def test_resume_on_quantized_weights_matches_an_uninterrupted_run(tmp_path, instance_dir):
    common = dict(model={"quantize": "int8"}, train={"max_steps": 5, "checkpoint_every": 2, "learning_rate": 1e-2})
    r = stop_and_resume(lambda name: flux_config(tmp_path, instance_dir, output={"name": name}, **common), 3)
    assert [e.step for e in r.resumed_events if isinstance(e, Progress)] == [4, 5]
    assert all(torch.equal(r.full[k], r.resumed[k]) for k in r.full)


@pytest.mark.parametrize("kind, quantize, message", [("loha", "nf4", "LoRA and DoRA only"),
                                                     ("lokr", "nf4", "LoRA and DoRA only"),
                                                     ("dora", "int8", "does not work with DoRA.*nf4")])
def test_lycoris_types_on_quantized_weights_are_refused_before_loading(tmp_path, instance_dir, kind, quantize,
                                                                        message):
    cfg = flux_config(tmp_path, instance_dir, model={"quantize": quantize}, adapter={"type": kind})
    with pytest.raises(ConfigError, match=message):
        train(Config.from_dict(cfg))


def test_the_planner_counts_quantized_weights_and_picks_the_flux_presets():
    """Planned (meta-device trace of the real FLUX.1-dev, no GPU measurement): the 24 GB preset (8-bit) and the 16 GB
    preset (NF4) fit their cards with room to spare (issue 17's targets: 22 and 14.5 GiB); a card's free memory picks
    the preset."""
    names = ("flux-dev-lora-24gb", "flux-dev-lora-16gb", "flux-dev-dora-16gb")
    plans = {name: vram.plan(vram.preset_config(name)) for name in names}
    need = {name: (p.total + vram.CUDA_CONTEXT) / 2 ** 30 for name, p in plans.items()}
    assert need["flux-dev-lora-24gb"] <= 22 and need["flux-dev-lora-16gb"] <= 14.5 and need["flux-dev-dora-16gb"] <= 14.5
    transformer = 11.9e9  # parameters
    assert plans["flux-dev-lora-16gb"].weights < plans["flux-dev-lora-24gb"].weights < transformer * 2
    assert vram.suggest_preset(FLUX, int(23.5 * 2 ** 30)) == "flux-dev-lora-24gb"
    assert vram.suggest_preset(FLUX, int(15.5 * 2 ** 30)) == "flux-dev-lora-16gb"
    assert vram.suggest_preset(FLUX, int(15.5 * 2 ** 30), "dora") == "flux-dev-dora-16gb"
    full = vram.plan(Config.from_dict({**vram.preset_config("flux-dev-lora-16gb").to_dict(),
                                       "model": {"base": "black-forest-labs/FLUX.1-dev", "quantize": "none"}}))
    assert full.weights - plans["flux-dev-lora-16gb"].weights > 14 * 2 ** 30  # 22 GiB of bf16 weights -> about 6


def test_the_playground_loads_the_base_quantized_for_loras_only(tmp_path, instance_dir):
    """The playground's Quantized weights: the base reloads quantized (once), a LoRA runs on it and changes the
    image; a LoHa is refused in plain words; back to none reloads the full model."""
    from core.errors import UserError
    from core.playground import Playground, Wanted

    lora = train(Config.from_dict(flux_config(tmp_path, instance_dir, output={"name": "l"},
                                              train={"max_steps": 2, "learning_rate": 5e-2})))
    loha = train(Config.from_dict(flux_config(tmp_path, instance_dir, output={"name": "h"},
                                              adapter={"type": "loha"}, train={"max_steps": 1})))
    pg = Playground(device="cpu")
    want = lambda path: Wanted(str(path), lambda: adapters.read_adapter(path), 1.0)  # noqa: E731
    plain = pg.generate("tiny-flux", [], "a photo of sks ball", steps=2, guidance=3.5, size=32, quantize="int8")[0]
    assert pg.quantized == "int8" and pg.base_loads == 1
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in pg.base.transformer.modules())
    adapted = pg.generate("tiny-flux", [want(lora / "l.safetensors")], "a photo of sks ball", steps=2, guidance=3.5,
                          size=32, quantize="int8")[0]
    assert pg.base_loads == 1 and list(plain.getdata()) != list(adapted.getdata())
    with pytest.raises(UserError, match="LoHa and LoKr cannot run on quantized weights"):
        pg.generate("tiny-flux", [want(loha / "h.safetensors")], "a photo of sks ball", steps=2, size=32,
                    quantize="int8")
    pg.generate("tiny-flux", [want(loha / "h.safetensors")], "a photo of sks ball", steps=2, size=32)
    assert pg.quantized == "none" and pg.base_loads == 2
    assert not any(isinstance(m, bnb.nn.Linear8bitLt) for m in pg.base.transformer.modules())
