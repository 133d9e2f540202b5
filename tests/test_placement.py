"""Where the frozen parts are while a run trains (core/placement.py): the VAE and frozen text encoders in main memory
once their outputs are cached, on the device for their caches, samples and class images."""
from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_config

import core.sampling
import core.trainer
from core import adapters, placement
from core.config import Config
from core.events import Finished, SampleReady
from core.models import build_tiny_model
from core.trainer import train

SD_TE = ("text_encoder",)
SDXL_TE = ("text_encoder", "text_encoder_2")


def config(tmp_path, instance_dir, base="tiny", **sections) -> Config:
    cfg = tiny_config(tmp_path, instance_dir, **sections)
    cfg["model"] = {"base": base}
    return Config.from_dict(cfg)


# ----------------------------------------------------------------------------- the rules

def test_cached_frozen_encoders_are_offloaded(tmp_path, instance_dir):
    cfg = config(tmp_path, instance_dir)
    assert placement.offloaded_parts(cfg, SDXL_TE, ["unet"]) == ("vae", *SDXL_TE)
    assert placement.offloaded_parts(cfg, SDXL_TE, ["unet", "text_encoder"]) == ("vae",)  # the encoders work each step
    cfg.train.cache_text_embeddings = False
    assert placement.offloaded_parts(cfg, SD_TE, ["unet"]) == ("vae",)
    cfg.data.center_crop = False  # random crops: the VAE encodes in every step
    assert placement.offloaded_parts(cfg, SD_TE, ["unet"]) == ()
    cfg = config(tmp_path, instance_dir, train={"offload_frozen": False})
    assert placement.offloaded_parts(cfg, SDXL_TE, ["unet"]) == ()


def test_parts_on_brings_parts_and_puts_them_back_where_they_were():
    base = build_tiny_model()
    moves = []
    for name in ("vae", "text_encoder", "unet"):
        setattr(getattr(base, name), "to", lambda device, name=name: moves.append((name, str(device))))
    with placement.parts_on(base, ["vae", "text_encoder"], "meta"):
        assert moves == [("vae", "meta"), ("text_encoder", "meta")]
    assert moves[2:] == [("vae", "cpu"), ("text_encoder", "cpu")]
    moves.clear()
    with pytest.raises(RuntimeError), placement.parts_on(base, ["vae"], "meta"):
        raise RuntimeError("a sample failed")
    assert moves == [("vae", "meta"), ("vae", "cpu")]  # back even when the block fails


# ----------------------------------------------------------------------------- the trainer

class Ledger:
    """Where the trainer asked each part to be ("home": main memory, "device"), with the real moves left out: on a
    CPU-only machine both are the CPU, so the requests are what can be told apart."""

    def __init__(self, monkeypatch, base):
        self.where = dict.fromkeys(base.all_parts, "home")  # the trainer starts with every part at home
        self.seen: list[tuple[str, bool, dict]] = []  # (what ran, with gradients, where the parts were)
        monkeypatch.setattr(core.trainer, "move_parts", self.move)
        monkeypatch.setattr(core.trainer, "parts_on", self.parts_on)
        monkeypatch.setattr(core.sampling, "parts_on", self.parts_on)  # samples and class images
        for name in base.all_parts:
            getattr(base, name).register_forward_pre_hook(lambda *_, name=name: self.record(name))
        base.vae.encoder.register_forward_pre_hook(lambda *_: self.record("vae encode"))

    def record(self, what: str) -> None:
        self.seen.append((what, torch.is_grad_enabled(), dict(self.where)))

    def move(self, model, names, device) -> None:
        # by identity: the trainer's device (the accelerator's) is another object than HOME, though equal on a CPU
        self.where.update(dict.fromkeys(names, "home" if device is placement.HOME else "device"))

    @contextlib.contextmanager
    def parts_on(self, model, names, device):
        before = dict(self.where)
        self.where.update(dict.fromkeys(names, "device"))
        yield
        self.where = before

    def places(self, what: str, grad: bool) -> list[dict]:
        return [where for w, g, where in self.seen if w == what and g == grad]


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "resident"])
@pytest.mark.parametrize("base_name", ["tiny", "tiny-sdxl"])
def test_frozen_parts_are_where_each_phase_needs_them(tmp_path, instance_dir, monkeypatch, base_name, offload):
    base = build_tiny_model(family="sdxl" if base_name == "tiny-sdxl" else "sd1")
    ledger = Ledger(monkeypatch, base)
    cfg = config(tmp_path, instance_dir, base_name, train={"max_steps": 2, "sample_every": 2, "offload_frozen": offload,
                                                           "prior_preservation": True})
    train(cfg, base=base)
    encoders = [part for part in base.all_parts if part != "unet"]
    everywhere = dict.fromkeys(base.all_parts, "device")

    # class images, then samples: the whole pipeline on the device (the UNet runs without gradients only there)
    assert ledger.places("unet", False) and all(w == everywhere for w in ledger.places("unet", False))
    # the latent cache: the VAE alone on the device (class images are decoded, never encoded)
    assert ledger.places("vae encode", False)
    assert all(w == dict.fromkeys(base.all_parts, "home") | {"vae": "device"} for w in ledger.places("vae encode", False))
    # the text-embedding cache: the text encoders on the device, the UNet not yet
    caching = [w for w in ledger.places("text_encoder", False) if w["unet"] == "home"]
    assert caching and all(w[te] == "device" for w in caching for te in encoders if te != "vae")
    # the training steps: the UNet on the device; the encoders in main memory when offloaded
    steps = ledger.places("unet", True)
    assert len(steps) == 2 and all(w["unet"] == "device" for w in steps)
    assert all(w[part] == ("home" if offload else "device") for w in steps for part in encoders)
    assert ledger.where == (dict(everywhere, **dict.fromkeys(encoders, "home")) if offload else everywhere)


def test_random_crops_keep_the_vae_on_the_device(tmp_path, instance_dir, monkeypatch):
    base = build_tiny_model()
    ledger = Ledger(monkeypatch, base)
    train(config(tmp_path, instance_dir, data={"center_crop": False}), base=base)
    steps = ledger.places("unet", True)
    assert steps and all(w["vae"] == "device" and w["text_encoder"] == "home" for w in steps)
    assert all(w["unet"] == "device" for what, _, w in ledger.seen if what == "vae encode")  # encoded within the steps


@pytest.mark.parametrize("base_name", ["tiny", "tiny-sdxl"])
def test_offloading_changes_no_result_and_samples_work(tmp_path, instance_dir, base_name):
    tensors = {}
    for offload in (True, False):
        events = []
        cfg = config(tmp_path, instance_dir, base_name, output={"name": f"offload-{offload}"},
                     train={"max_steps": 3, "sample_every": 3, "offload_frozen": offload})
        train(cfg, emit=events.append)
        assert sorted(e.step for e in events if isinstance(e, SampleReady)) == [0, 3]
        tensors[offload] = adapters.read_adapter([e for e in events if isinstance(e, Finished)][0].adapter_path).tensors
    assert tensors[True].keys() == tensors[False].keys()
    assert all(torch.equal(tensors[True][k], tensors[False][k]) for k in tensors[True])


@pytest.mark.gpu  # the parts really move there (bench/gpu.sh runs it)
def test_on_a_gpu_the_offloaded_parts_are_in_main_memory_while_training(tmp_path, instance_dir):
    base = build_tiny_model(family="sdxl")
    seen = []
    base.unet.register_forward_pre_hook(lambda *_: seen.append(
        (torch.is_grad_enabled(), {name: placement.device_of(m).type for name, m in base.all_parts.items()})))
    train(config(tmp_path, instance_dir, "tiny-sdxl", train={"max_steps": 2, "sample_every": 2}), base=base)
    steps = [where for grad, where in seen if grad]
    samples = [where for grad, where in seen if not grad]
    assert steps and all(w == {"unet": "cuda", "text_encoder": "cpu", "text_encoder_2": "cpu", "vae": "cpu"}
                         for w in steps)
    assert samples and all(set(w.values()) == {"cuda"} for w in samples)
    assert placement.device_of(base.vae).type == "cpu" and placement.device_of(base.unet).type == "cuda"
