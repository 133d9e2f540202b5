"""SDXL end to end on the tiny in-code SDXL model: training (what trains, resume, prior preservation, the size / crop
time ids, cached encoders, the two encoders' adapters), the VAE's precision and model.vae, v-prediction with zero
terminal SNR, loading (hub cache, folder, single file, refused variants), class images, samples, the playground
and the CLI."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import ADAPTER_TYPES, frozen_weights, hub_cache_copy, stop_and_resume, tiny_config
from PIL import Image

from core import adapters, families
from core.config import Config
from core.data import resize_shorter_side, to_tensor
from core.errors import ModelLoadError
from core.events import Finished, Progress, SampleReady
from core.families.sdxl import SDXLFamily
from core.models import (build_tiny_model, load_base_from_config, load_base_model, load_vae, place,
                         save_model_folder)
from core.trainer import Batch, make_optimizer, predict, train

PARTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def tiny_sdxl(seed: int = 0, prediction_type: str = "epsilon"):
    return build_tiny_model(seed, prediction_type, family="sdxl")


def xl_config(tmp_path, instance_dir, **sections) -> dict:
    cfg = tiny_config(tmp_path, instance_dir, **sections)
    cfg["model"] = {"base": "tiny-sdxl", **sections.get("model", {})}
    return cfg


def run(cfg_dict, base=None, commands=None, resume_dir=None):
    events = []
    run_dir = train(Config.from_dict(cfg_dict), emit=events.append, commands=commands, resume_dir=resume_dir, base=base)
    return run_dir, events


def losses(events) -> list[float]:
    return [e.loss for e in events if isinstance(e, Progress)]


def base_weights(base):
    """Every weight of the base model (UNet, both encoders, VAE) by its name before adapters were injected."""
    return frozen_weights(base, PARTS)


class UNetSpy:
    """Records what each training call of the UNet got (the hidden states, pooled embeddings and time ids)."""

    def __init__(self, monkeypatch, base):
        self.calls: list[dict[str, torch.Tensor]] = []
        forward = base.unet.forward

        def spy(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
            if torch.is_grad_enabled():
                self.calls.append({"hidden": encoder_hidden_states.detach().clone(),
                                   **{k: v.detach().clone() for k, v in (added_cond_kwargs or {}).items()}})
            return forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs,
                           **kwargs)

        monkeypatch.setattr(base.unet, "forward", spy)


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("train_te", [False, True], ids=["unet", "unet+te"])
@pytest.mark.parametrize("kind", ADAPTER_TYPES)
def test_every_adapter_type_trains_adapters_only(tmp_path, one_image_dir, kind, train_te):
    cfg = xl_config(tmp_path, one_image_dir, adapter={"type": kind, "train_text_encoder": train_te},
                    train={"max_steps": 3, "learning_rate": 1e-2})
    base = tiny_sdxl()
    before = base_weights(base)
    run_dir, events = run(cfg, base=base)

    assert len(losses(events)) == 3 and all(math.isfinite(v) for v in losses(events))
    trainable = [f"{part}.{n}" for part in PARTS for n, p in getattr(base, part).named_parameters() if p.requires_grad]
    assert trainable and all(".default" in n for n in trainable)
    assert {n.split(".")[0] for n in trainable} == ({"unet", "text_encoder", "text_encoder_2"} if train_te else {"unet"})
    after = base_weights(base)
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == [], "a base weight changed"

    af = adapters.read_adapter(run_dir / f"{run_dir.name}.safetensors")
    expected = {"unet", "text_encoder", "text_encoder_2"} if train_te else {"unet"}
    assert af.type == kind and set(af.specs) == expected
    assert {k.split(".")[0] for k in af.tensors} == expected
    assert af.metadata["family"] == "sdxl"
    # the trained adapter reloads into a fresh model and gives the trained model's output
    fresh = tiny_sdxl().freeze()
    adapters.load_into(fresh.parts, af, "reloaded")
    for part in ("unet", "text_encoder", "text_encoder_2"):
        getattr(base, part).eval()
    assert torch.allclose(unet_out(base), unet_out(fresh), atol=1e-5)
    assert not torch.allclose(unet_out(tiny_sdxl().freeze()), unet_out(fresh), atol=1e-5)


def unet_out(model) -> torch.Tensor:
    """The UNet's output through the family's own encode + call (both encoders and their adapters take part)."""
    family = families.of(model)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    from core.data import Geometry

    geometry = [Geometry((40, 64), (0, 4), (32, 32))] * 2
    with torch.no_grad():
        cond = family.encode_prompts(model, ["a photo of sks ball", "a dog"], "cpu")
        return family.unet_forward(model.unet, noisy, torch.tensor([10, 500]), cond, geometry, torch.float32)


def test_resume_matches_uninterrupted_run(tmp_path, instance_dir):
    common = dict(adapter={"type": "lora", "train_text_encoder": True, "dropout": 0.1},
                  train={"max_steps": 5, "checkpoint_every": 2})
    r = stop_and_resume(lambda name: xl_config(tmp_path, instance_dir, output={"name": name}, **common), 3)
    assert [e.step for e in r.resumed_events if isinstance(e, Progress)] == [4, 5]
    assert r.full.keys() == r.resumed.keys() and any(k.startswith("text_encoder_2.") for k in r.full)
    assert all(torch.equal(r.full[k], r.resumed[k]) for k in r.full), "resumed run diverged from the uninterrupted one"


def test_prior_preservation_batches_instance_then_class(tmp_path, instance_dir, monkeypatch):
    cfg = xl_config(tmp_path, instance_dir, train={"prior_preservation": True, "prior_loss_weight": 0.7,
                                                   "batch_size": 2, "max_steps": 2})
    base = tiny_sdxl()
    spy = UNetSpy(monkeypatch, base)
    _, events = run(cfg, base=base)

    with torch.no_grad():
        enc = SDXLFamily().encode_prompts(base, ["a photo of sks ball", "a photo of a ball"], "cpu")
    assert len(spy.calls) == 2
    for call in spy.calls:
        for key in ("hidden", "text_embeds"):
            rows = call[key]
            ref = enc["hidden" if key == "hidden" else "pooled"]
            assert rows.shape[0] == 4
            assert all(torch.allclose(r, ref[0], atol=1e-5) for r in rows[:2])
            assert all(torch.allclose(r, ref[1], atol=1e-5) for r in rows[2:])
        assert call["time_ids"].shape == (4, 6)
    for e in [e for e in events if isinstance(e, Progress)]:
        assert e.prior_loss is not None
        assert e.loss == pytest.approx(e.instance_loss + 0.7 * e.prior_loss, rel=1e-4)


def wide_gradient(path, width=500, height=300):
    """Every pixel different (red by column, green by row): a view tells exactly where it was cropped from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, (x * 7 + y * 3) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def crop_of(view: torch.Tensor, resized: torch.Tensor) -> tuple[int, int, bool]:
    """(top, left, flipped) of the square crop of `resized` that `view` is, found by exact comparison."""
    size = view.shape[-1]
    for flipped in (False, True):
        seen = torch.flip(view, dims=[2]) if flipped else view
        for top in range(resized.shape[1] - size + 1):
            for left in range(resized.shape[2] - size + 1):
                if torch.equal(resized[:, top:top + size, left:left + size], seen):
                    return top, left, flipped
    raise AssertionError("the view is no crop of the image")


def test_time_ids_are_the_crop_and_flip_the_data_pipeline_took(tmp_path, monkeypatch):
    """A 500x300 image, randomly cropped and flipped: each UNet call's time ids are (original h, w), (crop top,
    left as seen: mirrored when flipped), (target h, w), found from the very pixels the VAE encoded."""
    folder = tmp_path / "wide"
    folder.mkdir()
    wide_gradient(folder / "wide.png")
    cfg = xl_config(tmp_path, folder, data={"center_crop": False, "random_flip": True, "resolution": 32},
                    train={"max_steps": 4, "batch_size": 2})
    base = tiny_sdxl()
    spy = UNetSpy(monkeypatch, base)
    encoded = []
    encode = base.vae.encode
    monkeypatch.setattr(base.vae, "encode", lambda x, *a, **k: (encoded.append(x.detach().clone()), encode(x, *a, **k))[1])
    run(cfg, base=base)

    resized = to_tensor(resize_shorter_side(Image.open(folder / "wide.png").convert("RGB"), 32))
    width = resized.shape[2]
    views = [v for batch in encoded for v in batch]
    time_ids = torch.cat([c["time_ids"] for c in spy.calls])
    assert len(views) == len(time_ids) == 8
    flips = set()
    for view, ids in zip(views, time_ids):
        top, left, flipped = crop_of(view, resized)
        flips.add(flipped)
        x = width - (left + 32) if flipped else left
        assert ids.tolist() == [300, 500, top, x, 32, 32]
    assert flips == {False, True}, "this seed should draw flipped and unflipped views"
    assert len({tuple(ids.tolist()) for ids in time_ids}) > 2  # the crops differ


def test_cached_frozen_encoders_give_the_live_encoders_loss(tmp_path, instance_dir):
    def run_losses(cache: bool, name: str) -> list[float]:
        cfg = xl_config(tmp_path, instance_dir, train={"max_steps": 3, "cache_text_embeddings": cache},
                        output={"name": name})
        run_dir, _ = run(cfg)
        return [float(r["loss"]) for r in csv.DictReader(open(run_dir / "loss.csv"))]

    cached, live = run_losses(True, "cached"), run_losses(False, "live")
    assert cached == pytest.approx(live, rel=1e-5)


def test_both_encoders_get_the_text_encoder_rank_alpha_and_learning_rate(tmp_path, instance_dir):
    cfg = Config.from_dict(xl_config(tmp_path, instance_dir, adapter={
        "train_text_encoder": True, "rank": 4, "alpha": 4, "text_encoder_rank": 2, "text_encoder_alpha": 1},
        train={"learning_rate": 1e-3, "text_encoder_learning_rate": 5e-5}))
    base = tiny_sdxl()
    family = families.of(base)
    specs = adapters.specs_from_config(cfg, family.text_encoders, family.denoiser)
    assert (specs["unet"].rank, specs["unet"].alpha) == (4, 4)
    for part in ("text_encoder", "text_encoder_2"):
        assert (specs[part].rank, specs[part].alpha) == (2, 1)
    params = adapters.inject_all(base.parts, specs)
    optimizer = make_optimizer(cfg, params, family.denoiser)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-5, 5e-5]
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(params[p]) for p in params]
    assert all(p.shape[0] == 2 or p.shape[1] == 2 for p in params["text_encoder_2"])


# ----------------------------------------------------------------------------------------------- the VAE


def test_sdxl_vae_encodes_in_float32_under_half_precision(tmp_path, instance_dir, monkeypatch):
    """bf16 stands in for fp16 on the CPU: the frozen weights go half, SDXL's own VAE stays float32."""
    cfg = xl_config(tmp_path, instance_dir, train={"max_steps": 1, "mixed_precision": "bf16"})
    base = tiny_sdxl()
    dtypes = []
    encode = base.vae.encode
    monkeypatch.setattr(base.vae, "encode", lambda x, *a, **k: (dtypes.append(x.dtype), encode(x, *a, **k))[1])
    run(cfg, base=base)
    assert dtypes and set(dtypes) == {torch.float32}
    assert base.vae.dtype == torch.float32 and base.text_encoder_2.dtype == torch.bfloat16


def test_vae_dtype_is_the_familys_call():
    sd, xl = build_tiny_model(), tiny_sdxl()
    assert place(sd, "cpu", torch.bfloat16).vae.dtype == torch.bfloat16  # SD's VAE is fine in half precision
    assert place(xl, "cpu", torch.bfloat16).vae.dtype == torch.float32
    assert xl.unet.dtype == torch.bfloat16
    xl.vae_source = "madebyollin/sdxl-vae-fp16-fix"  # a VAE named by model.vae is trusted in half precision
    assert place(xl, "cpu", torch.bfloat16).vae.dtype == torch.bfloat16
    assert place(tiny_sdxl(), "cpu", None).vae.dtype == torch.float32


def other_vae(seed: int = 7):
    return tiny_sdxl(seed).vae


def test_model_vae_from_a_folder_and_files(tmp_path):
    from core.fileio import save_safetensors
    from core.single_file import vae_to_ldm

    vae = other_vae()
    vae.save_pretrained(tmp_path / "vae-folder", safe_serialization=True)
    save_safetensors({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "diffusers.safetensors", {})
    save_safetensors({f"first_stage_model.{k}": v.contiguous() for k, v in vae_to_ldm(vae).items()},
                     tmp_path / "ldm.safetensors", {})
    own = tiny_sdxl().vae
    for spec in ("vae-folder", "diffusers.safetensors", "ldm.safetensors"):
        loaded = load_vae(str(tmp_path / spec), own)
        assert loaded.dtype == torch.float32
        for k, v in vae.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), (spec, k)


def test_model_vae_replaces_the_base_vae_of_either_family(tmp_path, instance_dir):
    other_vae().save_pretrained(tmp_path / "vae", safe_serialization=True)
    for base in ("tiny", "tiny-sdxl"):
        cfg = Config.from_dict(xl_config(tmp_path, instance_dir, model={"base": base, "vae": str(tmp_path / "vae")}))
        model = load_base_from_config(cfg)
        assert model.vae_source == str(tmp_path / "vae")
        assert torch.equal(model.vae.encoder.conv_in.weight, other_vae().encoder.conv_in.weight)
        assert not model.vae.encoder.conv_in.weight.requires_grad


def test_model_vae_errors_are_plain(tmp_path):
    own = tiny_sdxl().vae
    with pytest.raises(ModelLoadError, match="VAE file or folder not found.*model.vae"):
        load_vae(str(tmp_path / "missing.safetensors"), own)
    (tmp_path / "vae.ckpt").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="must be .safetensors"):
        load_vae(str(tmp_path / "vae.ckpt"), own)
    from core.fileio import save_safetensors

    save_safetensors({"encoder.down_blocks.0.x": torch.zeros(1)}, tmp_path / "odd.safetensors", {})
    with pytest.raises(ModelLoadError, match="not a VAE that fits"):
        load_vae(str(tmp_path / "odd.safetensors"), own)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="Cannot load the VAE"):
        load_vae(str(tmp_path / "empty"), own)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_vae("nobody/no-vae", own)


# ----------------------------------------------------------------------------------- v-prediction, zero SNR


def test_zero_terminal_snr_option(tmp_path, instance_dir):
    from core.sampling import generate, guidance_rescale, make_pipeline

    off = load_base_from_config(Config.from_dict(xl_config(tmp_path, instance_dir)))
    assert off.scheduler.alphas_cumprod[-1] > 1e-4 and guidance_rescale(make_pipeline(off).scheduler) == 0.0
    on = load_base_from_config(Config.from_dict(xl_config(
        tmp_path, instance_dir, model={"prediction_type": "v_prediction", "zero_terminal_snr": True})))
    assert on.prediction_type == "v_prediction"
    assert on.scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-8)
    pipe = make_pipeline(on)
    assert pipe.scheduler.config.timestep_spacing == "trailing" and guidance_rescale(pipe.scheduler) == 0.7
    pipe.scheduler.set_timesteps(4)
    assert int(pipe.scheduler.timesteps[0]) == 999  # sampling starts from pure noise
    assert len(generate(pipe, ["a ball"], [0], steps=2, size=32)) == 1


def test_zero_terminal_snr_refuses_an_epsilon_model_and_weighs_its_last_step(tmp_path, instance_dir):
    from core.errors import ConfigError
    from core.trainer import min_snr_weights

    with pytest.raises(ConfigError, match="v_prediction"):
        load_base_from_config(Config.from_dict(xl_config(tmp_path, instance_dir, model={"zero_terminal_snr": True})))
    sched = load_base_from_config(Config.from_dict(xl_config(
        tmp_path, instance_dir, model={"prediction_type": "v_prediction", "zero_terminal_snr": True}))).scheduler
    eps = type(sched).from_config(sched.config, prediction_type="epsilon")
    weights = min_snr_weights(eps, torch.tensor([0, 999]), 5.0)  # snr at 999 is 0: the weight's limit there is 1
    assert torch.isfinite(weights).all() and weights[1].item() == 1.0


def test_class_image_cache_depends_on_model_vae(tmp_path, instance_dir):
    from core.class_images import class_dir_for

    own = class_dir_for(Config.from_dict(xl_config(tmp_path, instance_dir)))
    other = class_dir_for(Config.from_dict(xl_config(tmp_path, instance_dir, model={"vae": "org/fp16-fix-vae"})))
    assert own != other and own.parent.parent == other.parent.parent


def test_v_prediction_file_marker_turns_zero_snr_on(tmp_path):
    """A v-prediction SDXL file (ComfyUI's v_pred marker) loads with the zero-terminal-SNR schedule although the
    option is off: the option and the file agree."""
    from core.single_file import save_single_file

    path = save_single_file(tiny_sdxl(prediction_type="v_prediction"), tmp_path / "vpred.safetensors")
    model = load_base_model(str(path))
    assert model.prediction_type == "v_prediction" and model.scheduler.config.rescale_betas_zero_snr


def test_v_prediction_sdxl_trains_on_the_velocity(tmp_path, instance_dir):
    base = tiny_sdxl(prediction_type="v_prediction")
    t = Config.from_dict(xl_config(tmp_path, instance_dir)).train
    latents = torch.randn(2, 4, 16, 16)
    from core.data import Geometry

    batch = Batch(latents, ["a photo of sks ball"] * 2, [Geometry((32, 32), (0, 0), (32, 32))] * 2)
    g = torch.Generator().manual_seed(3)
    p = predict(base, batch, g, lambda prompts: SDXLFamily().encode_prompts(base, prompts, "cpu"), torch.float32, t)
    # redraw what `predict` drew, in its order: noise, then timesteps
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    steps = torch.randint(0, 1000, (2,), generator=g)
    x0 = latents * base.vae.config.scaling_factor
    assert torch.allclose(p.target, base.scheduler.get_velocity(x0, noise, steps))
    assert not torch.allclose(p.target, noise)
    _, events = run(xl_config(tmp_path, instance_dir, model={"prediction_type": "v_prediction",
                                                             "zero_terminal_snr": True}, train={"max_steps": 2}))
    assert all(math.isfinite(v) for v in losses(events)) and len(losses(events)) == 2


# ----------------------------------------------------------------------------------------------- loading


def test_cached_hub_id_of_an_sdxl_repo_loads_offline(tmp_path, monkeypatch):
    """The family's hub_files pick what loading needs and skip the fp16 / single-file copies beside it."""
    from huggingface_hub.utils import filter_repo_objects

    model = tiny_sdxl()
    full = save_model_folder(model, tmp_path / "full")
    for extra in ("unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
                  "sd_xl_base_1.0.safetensors", "vae_1_0/diffusion_pytorch_model.safetensors"):
        (full / extra).parent.mkdir(parents=True, exist_ok=True)
        (full / extra).write_bytes(b"not needed")
    files = sorted(str(p.relative_to(full)) for p in full.rglob("*") if p.is_file())
    allow, ignore = families.hub_patterns()
    picked = set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))
    assert {"text_encoder_2/config.json", "tokenizer_2/tokenizer_config.json", "unet/diffusion_pytorch_model.safetensors",
            "text_encoder_2/model.safetensors", "model_index.json"} <= picked
    assert not picked & {"unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
                         "sd_xl_base_1.0.safetensors", "vae_1_0/diffusion_pytorch_model.safetensors"}

    hub_cache_copy(full, "someone/tiny-xl", tmp_path / "hub", picked)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_base_model("someone/tiny-xl")
    assert loaded.family == "sdxl" and loaded.name == "someone/tiny-xl"
    assert torch.allclose(unet_out(loaded), unet_out(model.freeze()), atol=1e-6)


def test_sdxl_folder_and_single_file_load_through_load_base_model(tmp_path):
    from core.single_file import save_single_file

    model = tiny_sdxl().freeze()
    folder = save_model_folder(model, tmp_path / "xl")
    file = save_single_file(model, tmp_path / "xl.safetensors", dtype=None)
    for spec in (folder, file):
        loaded = load_base_model(str(spec))
        assert loaded.family == "sdxl" and loaded.tokenizer_2 is not None
        assert torch.allclose(unet_out(loaded), unet_out(model), atol=1e-6)


def test_refiner_and_inpainting_are_refused_by_load_base_model(tmp_path):
    import json

    for kind in ("refiner", "inpainting"):
        folder = save_model_folder(tiny_sdxl(), tmp_path / kind)
        if kind == "refiner":
            index = json.loads((folder / "model_index.json").read_text())
            index["requires_aesthetics_score"] = True
            (folder / "model_index.json").write_text(json.dumps(index))
        else:
            unet = json.loads((folder / "unet" / "config.json").read_text())
            unet["in_channels"] = 9
            (folder / "unet" / "config.json").write_text(json.dumps(unet))
        with pytest.raises(ModelLoadError, match=kind):
            load_base_model(str(folder))


# ----------------------------------------------------------------------------- class images, samples, playground, CLI


def test_class_images_and_samples_on_sdxl(tmp_path, instance_dir):
    cfg = xl_config(tmp_path, instance_dir, data={"resolution": 48, "num_class_images": 2},
                    train={"prior_preservation": True, "max_steps": 2, "sample_every": 2, "batch_size": 1})
    run_dir, events = run(cfg)
    made = sorted((tmp_path / "workspace" / "class_images").rglob("class_*.png"))
    assert len(made) == 2 and all(Image.open(p).size == (48, 48) for p in made)
    assert sorted({e.step for e in events if isinstance(e, SampleReady)}) == [0, 2]
    samples = sorted((run_dir / "samples").glob("*.png"))
    assert samples and all(Image.open(p).size == (48, 48) for p in samples)
    assert [e for e in events if isinstance(e, Finished)][0].step == 2


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """A LoRA and a LoHa trained on tiny-sdxl (the LoHa with both encoders)."""
    from conftest import draw_subject

    root = tmp_path_factory.mktemp("pair")
    images = root / "images"
    images.mkdir()
    draw_subject(images / "a.png", 0)
    files = {}
    for kind, te in (("lora", False), ("loha", True)):
        cfg = xl_config(root, images, adapter={"type": kind, "train_text_encoder": te},
                        train={"max_steps": 2, "learning_rate": 5e-2}, output={"name": kind})
        run_dir, _ = run(cfg)
        files[kind] = run_dir / f"{kind}.safetensors"
    return files


def test_playground_mixes_lora_and_loha_on_sdxl(trained_pair):
    from core.playground import Playground, from_file

    pg = Playground(device="cpu")
    plain = pg.generate("tiny-sdxl", [], "a photo of sks ball", steps=2, size=32)[0]
    mixed = pg.generate("tiny-sdxl", [from_file(trained_pair["lora"], 1.0), from_file(trained_pair["loha"], 0.5)],
                        "a photo of sks ball", steps=2, size=32)[0]
    assert len(pg.loaded_names()) == 2 and pg.base_loads == 1
    assert np.asarray(mixed).shape == (32, 32, 3)
    assert not np.array_equal(np.asarray(plain), np.asarray(mixed))
    compare = pg.generate("tiny-sdxl", [from_file(trained_pair["lora"]), from_file(trained_pair["loha"])],
                          "a photo of sks ball", steps=2, size=32, strengths=(0.0, 1.0))
    assert len(compare) == 2 and pg.base_loads == 1
    assert np.array_equal(np.asarray(compare[0]), np.asarray(plain))  # strength 0: the plain model
    assert not np.array_equal(np.asarray(compare[0]), np.asarray(compare[1]))


def test_cli_trains_and_samples_on_sdxl(cli, tmp_path, instance_dir):
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, instance_dir, train={"max_steps": 2})))
    out = tmp_path / "workspace" / "runs"
    result = cli("train", "--config", config, "--set", "model.base=tiny-sdxl", "--set", "adapter.train_text_encoder=true",
                 "--set", "output.name=xl")
    assert result.returncode == 0, result.stderr
    adapter = out / "xl" / "xl.safetensors"
    assert set(adapters.read_adapter(adapter).specs) == {"unet", "text_encoder", "text_encoder_2"}
    result = cli("sample", "--base", "tiny-sdxl", "--adapter", f"{adapter}@0.8", "--prompt", "a photo of sks ball",
                 "--steps", "2", "--size", "32", "--out", tmp_path / "sample.png")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "sample.png").size == (32, 32)
