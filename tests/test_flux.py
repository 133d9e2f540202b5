"""FLUX.1 on the tiny in-code FLUX model (one double and one single block, tiny CLIP-L and T5 with tokenizers made in
code, a tiny VAE): the flow-matching maths against diffusers' own functions and a hand-written step, packing, what
trains (every adapter type; T5 never), resume, prior preservation, cached embeddings, dev's guidance, samples."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import ADAPTER_TYPES, frozen_weights, hub_cache_copy, stop_and_resume, tiny_config
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from core import adapters, families
from core.config import Config, TrainConfig
from core.data import Geometry
from core.errors import ConfigError, ModelLoadError, UserError
from core.events import Progress
from core.families.flux import (FluxFamily, draw_sigmas, latent_ids, loss_weights, pack, resolution_shift,
                                shift_sigmas, unpack)
from core.models import build_tiny_model, load_base_model, save_model_folder
from core.sampling import generate, make_pipeline
from core.trainer import Batch, predict, train

FLUX = FluxFamily()
PARTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
PROMPTS = ["a photo of sks ball", "a photo of a ball"]


def tiny_flux(seed: int = 0, guidance: bool = True):
    return FLUX.build_tiny(seed, guidance=guidance)


def flux_config(tmp_path, instance_dir, **sections) -> dict:
    cfg = tiny_config(tmp_path, instance_dir, **sections)
    cfg["model"] = {"base": "tiny-flux", **sections.get("model", {})}
    return cfg


def run(cfg_dict, base=None, commands=None, resume_dir=None, emit=None):
    """(run folder, events) of a run; `emit` instead of recording the events."""
    events = []
    run_dir = train(Config.from_dict(cfg_dict), emit=emit or events.append, commands=commands, resume_dir=resume_dir,
                    base=base)
    return run_dir, events


def losses(events) -> list[float]:
    return [e.loss for e in events if isinstance(e, Progress)]


# ----------------------------------------------------------------------------------------------- the maths


def test_packing_round_trips_and_matches_the_pipeline():
    x = torch.randn(2, 16, 6, 10)
    packed = pack(x)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack(packed, 6, 10), x)
    # the pipeline's unpack takes the image size in pixels (its VAE scale factor 8)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8), x)
    assert torch.equal(latent_ids(6, 10), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_sigma_densities_are_sd3s(scheme):
    t = TrainConfig(timestep_sampling=scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.29)
    ours = draw_sigmas(4096, t, torch.Generator().manual_seed(3))
    name = {"uniform": "none"}.get(scheme, scheme)
    ref = compute_density_for_timestep_sampling(name, 4096, logit_mean=0.3, logit_std=0.8, mode_scale=1.29,
                                                generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ours, ref, atol=1e-6)
    assert 0 <= ours.min() and ours.max() <= 1


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting_is_sd3s(scheme):
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    ref = compute_loss_weighting_for_sd3(scheme, sigmas)
    ours = loss_weights(sigmas, scheme)
    assert torch.allclose(ref, torch.ones(3)) if ours is None else torch.allclose(ours, ref)


def test_resolution_shift_is_the_samplers():
    for tokens in (256, 1024, 4096):
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        assert resolution_shift(tokens) == pytest.approx(math.exp(mu))
    s = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(shift_sigmas(s, 3.0), torch.tensor([0.0, 0.75, 1.0]))
    assert torch.equal(shift_sigmas(s, 1.0), s)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_a_training_step_is_flow_matching_by_hand(guidance):
    """predict() against a hand-written step on a fixed batch: x_t = (1 - s) x0 + s e, the packed transformer call
    (sigma as the timestep, dev's guidance 1.0, T5 tokens and CLIP's pooled output), target e - x0."""
    base = tiny_flux(guidance=guidance).freeze()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = Batch(latents=latents, prompts=PROMPTS, geometry=[Geometry((16, 16), (0, 0), (16, 16))] * 2)
    t = TrainConfig(guidance_scale=1.0)
    with torch.no_grad():
        cond = FLUX.encode_prompts(base, PROMPTS, "cpu")
        p = predict(base, batch, torch.Generator().manual_seed(5), lambda prompts: cond, torch.float32, t)

        g = torch.Generator().manual_seed(5)
        x0 = (latents - base.vae.config.shift_factor) * base.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(2, generator=g)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        extra = {"guidance": torch.ones(2)} if guidance else {}
        out = base.transformer(hidden_states=FluxPipeline._pack_latents(noisy, 2, 4, 8, 8), timestep=sigma,
                               pooled_projections=cond["pooled"], encoder_hidden_states=cond["hidden"],
                               txt_ids=torch.zeros(cond["hidden"].shape[1], 3),
                               img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                               return_dict=False, **extra)[0]
    assert torch.allclose(p.target, noise - x0)
    assert torch.allclose(p.pred, FluxPipeline._unpack_latents(out, 8 * 8, 8 * 8, 8), atol=1e-6)
    assert p.weights is None


def test_encoded_prompts_are_the_pipelines():
    base = tiny_flux().freeze()
    pipe = make_pipeline(base)
    with torch.no_grad():
        ours = FLUX.encode_prompts(base, PROMPTS, "cpu")
        hidden, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=512)
    assert torch.allclose(ours["hidden"], hidden) and torch.allclose(ours["pooled"], pooled)
    assert ours["hidden"].shape[1] == 512  # dev's T5 length


def test_min_snr_is_refused_for_flow_matching(tmp_path, one_image_dir):
    cfg = flux_config(tmp_path, one_image_dir, train={"min_snr_gamma": 5.0})
    with pytest.raises(ConfigError, match="flow_loss_weighting"):
        run(cfg)


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("train_te", [False, True], ids=["transformer", "transformer+clip"])
@pytest.mark.parametrize("kind", ADAPTER_TYPES)
def test_every_adapter_type_trains_adapters_only(tmp_path, one_image_dir, kind, train_te):
    cfg = flux_config(tmp_path, one_image_dir, adapter={"type": kind, "train_text_encoder": train_te},
                      train={"max_steps": 3, "learning_rate": 1e-2})
    base = tiny_flux()
    before = frozen_weights(base, PARTS)
    run_dir, events = run(cfg, base=base)

    assert len(losses(events)) == 3 and all(math.isfinite(v) for v in losses(events))
    trainable = [f"{part}.{n}" for part in PARTS for n, p in getattr(base, part).named_parameters() if p.requires_grad]
    assert trainable and all(".default" in n for n in trainable)
    # T5 never trains; CLIP-L only when the text encoder does
    assert {n.split(".")[0] for n in trainable} == ({"transformer", "text_encoder"} if train_te else {"transformer"})
    after = frozen_weights(base, PARTS)
    assert [k for k in before if not torch.equal(before[k], after[k])] == [], "a base weight changed"

    af = adapters.read_adapter(run_dir / f"{run_dir.name}.safetensors")
    assert af.type == kind and af.metadata["family"] == "flux"
    assert set(af.specs) == ({"transformer", "text_encoder"} if train_te else {"transformer"})
    wrapped = {k.split(".")[2] for k in af.tensors if k.startswith("transformer.")}
    # both block kinds of the reference's target list: the double block's attention and feed-forward, the single
    # block's attention
    assert {k.rsplit(".", 2)[0] for k in af.tensors if k.startswith("transformer.single_transformer_blocks")}
    assert wrapped and any(".ff_context." in k for k in af.tensors) and any(".add_q_proj." in k for k in af.tensors)
    # it reloads into a fresh model and gives the trained model's prediction
    fresh = tiny_flux().freeze()
    adapters.load_into(fresh.parts, af, "reloaded")
    for part in ("transformer", "text_encoder"):
        getattr(base, part).eval()
    assert torch.allclose(velocity(base), velocity(fresh), atol=1e-5)
    assert not torch.allclose(velocity(tiny_flux().freeze()), velocity(fresh), atol=1e-5)


def velocity(model) -> torch.Tensor:
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = FLUX.encode_prompts(model, PROMPTS, "cpu")
        return FLUX.unet_forward(model.transformer, noisy, torch.tensor([100.0, 700.0]), cond, [], torch.float32)


def prompt_embeddings(model) -> torch.Tensor:
    """CLIP-L's pooled output for PROMPTS (what FLUX takes from it)."""
    ids = model.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.text_encoder(ids).pooler_output


def test_resume_matches_uninterrupted_run(tmp_path, instance_dir):
    common = dict(adapter={"type": "lora", "train_text_encoder": True, "dropout": 0.1},
                  train={"max_steps": 5, "checkpoint_every": 2, "timestep_sampling": "logit_normal"})
    r = stop_and_resume(lambda name: flux_config(tmp_path, instance_dir, output={"name": name}, **common), 3)
    assert [e.step for e in r.resumed_events if isinstance(e, Progress)] == [4, 5]
    assert r.full.keys() == r.resumed.keys() and any(k.startswith("text_encoder.") for k in r.full)
    assert all(torch.equal(r.full[k], r.resumed[k]) for k in r.full), "resumed run diverged from the uninterrupted one"


def test_prior_preservation_batches_instance_then_class(tmp_path, instance_dir, monkeypatch):
    cfg = flux_config(tmp_path, instance_dir, train={"prior_preservation": True, "prior_loss_weight": 0.7,
                                                     "batch_size": 2, "max_steps": 2, "guidance_scale": 2.5})
    base = tiny_flux()
    calls = []
    forward = base.transformer.forward

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():
            calls.append({k: kwargs[k].detach().clone() for k in ("encoder_hidden_states", "pooled_projections",
                                                                   "guidance")})
        return forward(*args, **kwargs)

    monkeypatch.setattr(base.transformer, "forward", spy)
    _, events = run(cfg, base=base)
    with torch.no_grad():
        enc = FLUX.encode_prompts(base, PROMPTS, "cpu")
    assert len(calls) == 2
    for call in calls:
        for key, ref in (("encoder_hidden_states", enc["hidden"]), ("pooled_projections", enc["pooled"])):
            rows = call[key]
            assert rows.shape[0] == 4
            assert all(torch.allclose(r, ref[0], atol=1e-5) for r in rows[:2])
            assert all(torch.allclose(r, ref[1], atol=1e-5) for r in rows[2:])
        assert torch.equal(call["guidance"], torch.full((4,), 2.5))  # train.guidance_scale reaches dev's embedding
    for e in [e for e in events if isinstance(e, Progress)]:
        assert e.loss == pytest.approx(e.instance_loss + 0.7 * e.prior_loss, rel=1e-4)


@pytest.mark.parametrize("train_te", [False, True], ids=["all-frozen", "clip-trains"])
def test_cached_embeddings_give_the_live_encoders_loss(tmp_path, instance_dir, monkeypatch, train_te):
    """Cached: every prompt encoded once (encoders frozen), or T5's part alone while CLIP-L trains; the losses are
    those of running the encoders every step, and T5 runs only before training when it is cached."""
    t5_calls = []

    def run_losses(cache: bool, name: str) -> list[float]:
        base = tiny_flux()
        forward = base.text_encoder_2.forward
        monkeypatch.setattr(base.text_encoder_2, "forward", lambda *a, **k: t5_calls.append(name) or forward(*a, **k))
        cfg = flux_config(tmp_path, instance_dir, adapter={"train_text_encoder": train_te},
                          train={"max_steps": 3, "cache_text_embeddings": cache, "compare_at_end": False},
                          output={"name": name})
        run_dir, _ = run(cfg, base=base)
        return [float(r["loss"]) for r in csv.DictReader(open(run_dir / "loss.csv"))]

    assert run_losses(True, "cached") == pytest.approx(run_losses(False, "live"), rel=1e-5)
    assert t5_calls.count("cached") == 1 and t5_calls.count("live") == 3


@pytest.mark.parametrize("option", [{"timestep_sampling": "mode", "flow_shift": "resolution"},
                                    {"flow_shift": "fixed", "flow_shift_value": 3.0,
                                     "flow_loss_weighting": "cosmap"}])
def test_sampling_options_change_the_run(tmp_path, one_image_dir, option):
    plain, _ = run(flux_config(tmp_path, one_image_dir, output={"name": "plain"}))
    other, _ = run(flux_config(tmp_path, one_image_dir, train=option, output={"name": "other"}))
    read = lambda d: [float(r["loss"]) for r in csv.DictReader(open(d / "loss.csv"))]  # noqa: E731
    assert read(plain) != read(other) and all(math.isfinite(v) for v in read(other))


def test_bad_flow_option_is_refused_by_name(tmp_path, one_image_dir):
    with pytest.raises((ConfigError, UserError), match="timestep_sampling"):
        Config.from_dict(flux_config(tmp_path, one_image_dir, train={"timestep_sampling": "cubic"}))


# ----------------------------------------------------------------------------------------------- samples


def test_samples_are_the_pipelines_own_images_and_follow_the_adapter(tmp_path, one_image_dir):
    base = tiny_flux().freeze()
    pipe = make_pipeline(base)
    ours = generate(pipe, PROMPTS, [3, 4], steps=3, guidance=3.5, size=32)
    assert [im.size for im in ours] == [(32, 32)] * 2
    # the same seeds through the pipeline's own latents and decoding
    g = [torch.Generator().manual_seed(s) for s in (3, 4)]
    noise = torch.stack([torch.randn((4, 16, 16), generator=x) for x in g])
    ref = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.5, height=32, width=32,
               latents=FluxPipeline._pack_latents(noise, 2, 4, 16, 16)).images
    diff = [abs(torch.tensor(list(a.getdata()), dtype=torch.float32) - torch.tensor(list(b.getdata()),
                                                                                   dtype=torch.float32)).max()
            for a, b in zip(ours, ref)]
    assert max(diff) <= 1

    cfg = flux_config(tmp_path, one_image_dir, train={"max_steps": 3, "learning_rate": 5e-2})
    run_dir, _ = run(cfg)
    trained = tiny_flux().freeze()
    adapters.load_into(trained.parts, adapters.read_adapter(run_dir / f"{run_dir.name}.safetensors"), "a")
    after = generate(make_pipeline(trained), PROMPTS, [3, 4], steps=3, guidance=3.5, size=32)
    assert any(list(a.getdata()) != list(b.getdata()) for a, b in zip(ours, after))


def test_a_run_makes_class_images_samples_and_the_end_strip(tmp_path, instance_dir):
    cfg = flux_config(tmp_path, instance_dir, train={"prior_preservation": True, "sample_every": 2, "max_steps": 2})
    run_dir, events = run(cfg)
    samples = sorted(p.name for p in (run_dir / "samples").glob("*.png"))
    assert [n for n in samples if n.startswith("step_")] == [f"step_{s:06d}_{i}.png" for s in (0, 2) for i in (0, 1)]
    assert [n for n in samples if n.startswith("compare_")] == [f"compare_{i}_{w}.png" for i in (0, 1)
                                                                 for w in ("off", "on")]
    class_dir = tmp_path / "workspace"
    assert len(list(class_dir.rglob("class_*.png"))) == 2  # the class images, drawn by the FLUX pipeline


def test_tiny_flux_is_known_by_name_and_family():
    model = load_base_model("tiny-flux")
    assert model.family == "flux" and families.of(model) is families.get("flux")
    assert set(model.parts) == {"transformer", "text_encoder"} and "text_encoder_2" in model.all_parts
    assert model.transformer is model.unet
    assert build_tiny_model(family="flux").family == "flux"
    # with no size asked, images come at the size the model was made for: the VAE config's (a real FLUX: 1024)
    image = generate(make_pipeline(model), PROMPTS[:1], [0], steps=1)[0]
    assert image.size == (model.vae.config.sample_size,) * 2 == (32, 32)


# ----------------------------------------------------------------------------------------------- loading


def test_flux_folder_and_cached_hub_id_load_offline(tmp_path, monkeypatch):
    """A diffusers FLUX.1 folder loads through load_base_model; a hub id loads from the cache with the family's
    hub_files (the BFL single files beside them are not fetched), offline."""
    from huggingface_hub.utils import filter_repo_objects

    model = tiny_flux().freeze()
    folder = save_model_folder(model, tmp_path / "flux")
    loaded = load_base_model(str(folder))
    assert loaded.family == "flux" and isinstance(loaded.tokenizer_2.__class__.__name__, str)
    assert torch.allclose(velocity(loaded), velocity(model), atol=1e-6)

    (folder / "flux1-dev.safetensors").write_bytes(b"not needed")
    (folder / "ae.safetensors").write_bytes(b"not needed")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    allow, ignore = families.hub_patterns()
    picked = set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))
    assert {"transformer/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors",
            "tokenizer_2/tokenizer_config.json", "model_index.json"} <= picked
    assert not picked & {"flux1-dev.safetensors", "ae.safetensors"}
    hub_cache_copy(folder, "someone/tiny-flux", tmp_path / "hub", picked)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = load_base_model("someone/tiny-flux")
    assert cached.family == "flux" and cached.name == "someone/tiny-flux"
    assert torch.allclose(velocity(cached), velocity(model), atol=1e-6)
    with pytest.raises(ModelLoadError, match="offline"):
        load_base_model("someone/not-cached-flux")


# ----------------------------------------------------------------------------------------------- files for other tools

DOUBLE_ONLY = ["transformer_blocks.0." + m for m in FLUX.default_targets]  # no single block (diffusers' kohya
# converter splits the single block's fused linear1 by the real model's widths, 3 x 3072 + 12288)
# The linear layers of BFL's FLUX blocks (flux/modules/layers.py: DoubleStreamBlock, SingleStreamBlock)
BFL_LAYERS = {f"double_blocks_0_{s}_{n}" for s in ("img", "txt") for n in ("mod_lin", "attn_qkv", "attn_proj",
                                                                             "mlp_0", "mlp_2")} | \
    {f"single_blocks_0_{n}" for n in ("linear1", "linear2", "modulation_lin")}


def trained_flux_adapter(tmp_path, instance_dir, kind: str, **adapter):
    cfg = flux_config(tmp_path, instance_dir, adapter={"type": kind, **adapter},
                      train={"max_steps": 3, "learning_rate": 5e-2}, output={"name": f"{kind}-export"})
    run_dir, _ = run(cfg)
    return run_dir / f"{kind}-export.safetensors"


def test_kohya_export_loads_in_diffusers_with_fused_qkv_split_back_exactly(tmp_path, instance_dir):
    """diffusers' own kohya FLUX converter (not ours) reads the BFL names, splits each fused qkv back into q, k, v
    and gives the transformer and CLIP-L of the trained adapter."""
    from core.formats import export_adapter

    path = trained_flux_adapter(tmp_path, instance_dir, "lora", train_text_encoder=True, unet_targets=DOUBLE_ONLY)
    out = export_adapter(path, tmp_path / "kohya.safetensors")
    names = {k.split(".")[0] for k in safetensors_keys(out)}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_double_blocks_0_txt_attn_qkv" in names
    assert not any("to_q" in n or "add_q_proj" in n for n in names)

    theirs = tiny_flux().freeze()
    pipe = make_pipeline(theirs)
    pipe.load_lora_weights(str(out), adapter_name="kohya")
    ours = tiny_flux().freeze()
    adapters.load_into(ours.parts, adapters.read_adapter(path), "ours")
    assert torch.allclose(velocity(theirs), velocity(ours), atol=1e-5)
    assert not torch.allclose(velocity(tiny_flux().freeze()), velocity(ours), atol=1e-3)


def safetensors_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def applied_change(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The weight change a kohya / LyCORIS module makes at strength 1, by the rules ComfyUI applies
    (comfy/weight_adapter): LoRA up @ down * alpha / rank; LoHa (w1a w1b) * (w2a w2b) * alpha / rank; LoKr
    kron(w1, w2), scaled by alpha / rank only when a factor is low-rank; `.diff` as it is."""
    get = lambda s: tensors.get(f"{name}.{s}")  # noqa: E731
    if get("diff") is not None:
        return get("diff")
    alpha = get("alpha").item()
    if get("lora_up.weight") is not None:
        down = get("lora_down.weight")
        return get("lora_up.weight") @ down * (alpha / down.shape[0])
    if get("hada_w1_a") is not None:
        return (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b")) * \
            (alpha / get("hada_w1_b").shape[0])
    w1 = get("lokr_w1") if get("lokr_w1") is not None else get("lokr_w1_a") @ get("lokr_w1_b")
    w2 = get("lokr_w2") if get("lokr_w2") is not None else get("lokr_w2_a") @ get("lokr_w2_b")
    factor_b = get("lokr_w1_b") if get("lokr_w1_b") is not None else get("lokr_w2_b")  # a low-rank factor's
    return torch.kron(w1, w2) * (alpha / factor_b.shape[0] if factor_b is not None else 1.0)  # rank rows


@pytest.mark.parametrize("kind", ADAPTER_TYPES)
def test_kohya_export_names_bfl_layers_and_gives_the_trained_weight_change(tmp_path, instance_dir, kind):
    """Every exported transformer module is a linear layer of BFL's FLUX blocks, and the weight change each one
    makes (by ComfyUI's rules) is the trained one: the peft layers' changes stacked in BFL's order (q, k, v, and
    the single block's MLP input, zero where it did not train)."""
    from safetensors.torch import load_file

    from core.formats import export_adapter

    path = trained_flux_adapter(tmp_path, instance_dir, kind)
    exported = load_file(export_adapter(path, tmp_path / "kohya.safetensors"))
    names = {k.split(".")[0] for k in exported}
    assert {n[len("lora_unet_"):] for n in names} <= BFL_LAYERS
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"} <= names
    if kind == "lokr":  # not one Kronecker product once stacked: the full change
        assert "lora_unet_double_blocks_0_img_attn_qkv.diff" in exported

    model = tiny_flux().freeze()
    adapters.load_into(model.parts, adapters.read_adapter(path), "a")
    layers = dict(model.transformer.named_modules())

    def delta(module: str) -> torch.Tensor:
        return layers[module].get_delta_weight("a").float()

    d, s = "transformer_blocks.0.", "single_transformer_blocks.0."
    mlp_width = layers[s + "proj_mlp"].weight.shape[0]
    expected = {
        "double_blocks_0_img_attn_qkv": torch.cat([delta(d + f"attn.to_{x}") for x in "qkv"]),
        "double_blocks_0_txt_attn_qkv": torch.cat([delta(d + f"attn.add_{x}_proj") for x in "qkv"]),
        "double_blocks_0_img_attn_proj": delta(d + "attn.to_out.0"),
        "double_blocks_0_txt_mlp_2": delta(d + "ff_context.net.2"),
        "single_blocks_0_linear1": torch.cat([*(delta(s + f"attn.to_{x}") for x in "qkv"),
                                              torch.zeros(mlp_width, layers[s + "proj_mlp"].weight.shape[1])]),
    }
    for name, want in expected.items():
        got = applied_change(exported, "lora_unet_" + name)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6), name
        assert want.abs().max() > 0


# ----------------------------------------------------------------------------------------------- playground and CLI


@pytest.mark.parametrize("first", ["lora", "dora"])
def test_playground_mixes_lora_and_lokr_on_flux(tmp_path, instance_dir, first):
    """A LoRA or a DoRA mixed with a LoKr, each at its weight; strength 0 is the plain model (a DoRA too)."""
    import numpy as np

    from core.playground import Playground, from_file

    lora = trained_flux_adapter(tmp_path, instance_dir, first)
    lokr = trained_flux_adapter(tmp_path, instance_dir, "lokr", train_text_encoder=True)
    pg = Playground(device="cpu")
    prompt = "a photo of sks ball"
    plain = pg.generate("tiny-flux", [], prompt, steps=2, size=32)[0]
    mixed = pg.generate("tiny-flux", [from_file(lora, 1.0), from_file(lokr, 0.5)], prompt, steps=2, size=32)[0]
    assert len(pg.loaded_names()) == 2 and pg.base_loads == 1
    assert np.asarray(mixed).shape == (32, 32, 3) and not np.array_equal(np.asarray(plain), np.asarray(mixed))
    only_lora = pg.generate("tiny-flux", [from_file(lora, 1.0), from_file(lokr, 0.0)], prompt, steps=2, size=32)[0]
    assert not np.array_equal(np.asarray(only_lora), np.asarray(mixed))  # the LoKr's weight counts
    off = pg.generate("tiny-flux", [from_file(lora), from_file(lokr)], prompt, steps=2, size=32, strengths=(0.0,))
    assert np.array_equal(np.asarray(off[0]), np.asarray(plain))  # strength 0: the plain model


def test_cli_trains_samples_and_exports_on_flux(cli, tmp_path, instance_dir):
    import yaml

    cfg = flux_config(tmp_path, instance_dir, train={"max_steps": 2}, output={"name": "cli-flux"})
    config = tmp_path / "flux.yaml"
    config.write_text(yaml.safe_dump(cfg))
    result = cli("train", "--config", config)
    assert result.returncode == 0, result.stderr
    adapter = tmp_path / "workspace" / "runs" / "cli-flux" / "cli-flux.safetensors"
    assert adapter.is_file()
    out = tmp_path / "sample.png"
    result = cli("sample", "--base", "tiny-flux", "--adapter", adapter, "--prompt", "a photo of sks ball",
                 "--steps", "2", "--size", "32", "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    result = cli("export", "--adapter", adapter, "--out", tmp_path / "kohya.safetensors")
    assert result.returncode == 0, result.stderr
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in safetensors_keys(
        tmp_path / "kohya.safetensors"))


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_community_bfl_named_files_import_with_qkv_split_exactly(tmp_path, instance_dir, kind):
    """A kohya / ComfyUI-style FLUX file (BFL names, fused qkv and linear1: here our own export) loads into the
    app's separate q, k, v layers and gives the same model; so does the diffusers naming (`transformer.`)."""
    from core.formats import export_adapter

    path = trained_flux_adapter(tmp_path, instance_dir, kind, train_text_encoder=True)
    ours = tiny_flux().freeze()
    adapters.load_into(ours.parts, adapters.read_adapter(path), "ours")
    forms = {"kohya": export_adapter(path, tmp_path / "kohya.safetensors")}
    if kind == "lora":
        forms["diffusers"] = export_adapter(path, tmp_path / "diffusers.safetensors", fmt="diffusers")
    for form, file in forms.items():
        imported = adapters.read_adapter(file)
        model = tiny_flux().freeze()
        adapters.load_into(model.parts, imported, "imported")
        assert torch.allclose(velocity(model), velocity(ours), atol=1e-5), form
        with torch.no_grad():
            assert torch.allclose(FLUX.encode_prompts(model, PROMPTS, "cpu")["pooled"],
                                  FLUX.encode_prompts(ours, PROMPTS, "cpu")["pooled"], atol=1e-5), form


def test_a_fused_lokr_is_refused_in_plain_words(tmp_path, instance_dir):
    from core.formats import export_adapter

    file = export_adapter(trained_flux_adapter(tmp_path, instance_dir, "lokr"), tmp_path / "kohya.safetensors")
    with pytest.raises(ModelLoadError, match="full weight changes"):  # our export's fused layers: .diff
        adapters.read_adapter(file)
    # a LyCORIS-style LoKr on a fused layer (a community file) cannot be split into q, k and v
    groups = {"lora_unet_double_blocks_0_img_attn_qkv": {"lokr_w1": torch.ones(2, 2), "lokr_w2": torch.ones(48, 16),
                                                         "alpha": torch.tensor(1.0)}}
    with pytest.raises(ModelLoadError, match="cannot be split"):
        FLUX.split_kohya(groups)


def test_the_vram_planner_traces_the_flux_transformer(tmp_path):
    """The planner builds the transformer from its config (a folder's, without loading weights), traces a step,
    and counts T5 and CLIP-L as waiting in main memory while both are frozen, T5 alone while CLIP-L trains."""
    from core import vram

    folder = save_model_folder(tiny_flux(), tmp_path / "flux")
    plans = {te: vram.plan(Config.from_dict({"model": {"base": str(folder)}, "data": {"resolution": 32},
                                             "adapter": {"train_text_encoder": te}})) for te in (False, True)}
    model = tiny_flux()
    t5 = sum(p.numel() for p in model.text_encoder_2.parameters()) * 2  # fp16, the planner's GPU default
    clip = sum(p.numel() for p in model.text_encoder.parameters()) * 2
    frozen, trained = plans[False], plans[True]
    assert frozen.assumed == "" and frozen.activations > 0
    assert frozen.offloaded == frozen.vae + t5 + clip and trained.offloaded == trained.vae + t5
    assert trained.adapter > frozen.adapter  # CLIP-L's adapter
    assert frozen.weights == sum(sum(p.numel() for p in m.parameters()) * 2 for m in model.all_parts.values())


def test_unet_targets_on_flux_are_refused_with_the_families_own(tmp_path, one_image_dir):
    """The demo / SD presets' targets (attn2.to_k ...) are a UNet's: on FLUX the message names FLUX's own."""
    cfg = flux_config(tmp_path, one_image_dir, adapter={"unet_targets": ["attn2.to_k", "attn2.to_v"]})
    with pytest.raises(ConfigError, match="FLUX.1 names its transformer's layers differently.*attn.to_k, attn.to_q"):
        run(cfg)


def test_merge_into_a_flux_folder_is_the_adapted_model(tmp_path, instance_dir):
    from core.merge import merge_to_model

    lora = trained_flux_adapter(tmp_path, instance_dir, "lora", train_text_encoder=True)
    loha = trained_flux_adapter(tmp_path, instance_dir, "loha")
    merged = load_base_model(str(merge_to_model("tiny-flux", [(lora, 1.0), (loha, 0.5)], tmp_path / "merged")))
    assert merged.family == "flux"
    live = tiny_flux().freeze()
    adapters.load_all(live.parts, {"a": adapters.read_adapter(lora), "b": adapters.read_adapter(loha)}, FLUX)
    adapters.set_weights(live.parts, {"a": 1.0, "b": 0.5})
    assert torch.allclose(velocity(merged), velocity(live), atol=1e-5)
    assert not torch.allclose(velocity(merged), velocity(tiny_flux().freeze()), atol=1e-3)
    # one file: the BFL-layout transformer and (the LoRA changed CLIP-L) `<name>.clip_l.safetensors`, which the app
    # picks for that file over the base's clip_l.safetensors in the same folder
    from core.families.flux_files import save_flux_files

    folder = tmp_path / "comfy"
    save_flux_files(tiny_flux(), folder, dtype=None)
    out = merge_to_model("tiny-flux", [(lora, 1.0), (loha, 0.5)], folder / "merged.safetensors")
    assert out == folder / "merged.safetensors" and (folder / "merged.clip_l.safetensors").is_file()
    one_file = load_base_model(str(out))
    assert one_file.family == "flux"
    assert torch.allclose(velocity(one_file), velocity(live), atol=2e-2)  # bf16 weights
    assert not torch.allclose(velocity(one_file), velocity(tiny_flux().freeze()), atol=2e-2)  # the merge is in it
    assert torch.allclose(prompt_embeddings(one_file), prompt_embeddings(live), atol=2e-2)
    assert not torch.allclose(prompt_embeddings(one_file), prompt_embeddings(tiny_flux().freeze()), atol=1e-3)


def test_the_planner_knows_flux_dev_before_it_is_downloaded(tmp_path, monkeypatch):
    """A FLUX hub id not in the cache is planned from the shipped FLUX.1-dev configs: about 11.9 B transformer and
    4.8 B T5 parameters; in bf16 without quantization the transformer alone is 22 GiB, so the plan says a 24 GB card
    does not fit (the reason the FLUX presets will quantize the frozen weights)."""
    from core import vram

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    cfg = Config.from_dict({"model": {"base": "black-forest-labs/FLUX.1-dev"},
                            "data": {"resolution": 512, "bucketing": False},
                            "train": {"mixed_precision": "bf16", "gradient_checkpointing": True}})
    plan = vram.plan(cfg)
    gib = 2 ** 30
    assert plan.assumed == ""
    assert 31 * gib < plan.weights < 32 * gib  # transformer + T5 + CLIP-L + VAE, two bytes a weight
    assert 8.8 * gib < plan.offloaded - plan.vae < 9.4 * gib  # T5 + CLIP-L wait in main memory
    said = vram.advice(cfg, 23 * gib)
    assert "**not enough**" in said and "gradient checkpointing" not in said  # it is on already


@pytest.mark.parametrize("blocks, double, single", [("all", True, True), ("double", True, False),
                                                    ("single 0", False, True), ("double 0, single", True, True)])
def test_adapters_can_be_restricted_to_blocks(tmp_path, one_image_dir, blocks, double, single):
    """adapter.blocks (kohya's train_blocks / block indices): only the chosen blocks get adapters; the file
    remembers the choice and loads back onto the same layers."""
    cfg = flux_config(tmp_path, one_image_dir, adapter={"blocks": blocks}, train={"max_steps": 1})
    run_dir, _ = run(cfg)
    af = adapters.read_adapter(run_dir / f"{run_dir.name}.safetensors")
    modules = {k.split(".lora_")[0] for k in af.tensors}
    assert any(m.startswith("transformer.transformer_blocks.") for m in modules) == double
    assert any(m.startswith("transformer.single_transformer_blocks.") for m in modules) == single
    assert af.specs["transformer"].blocks == blocks
    model = tiny_flux().freeze()
    adapters.load_into(model.parts, af, "again")
    wrapped = {f"transformer.{n}" for n, m in model.transformer.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == modules


def test_block_choices_are_checked():
    for bad in ("triple", "double x", "0-3"):
        with pytest.raises(ConfigError, match="adapter.blocks"):
            Config.from_dict({"adapter": {"blocks": bad}})
    from core.config import parse_blocks

    assert parse_blocks("double 0-2,5, single") == {"double": {0, 1, 2, 5}, "single": None}
    with pytest.raises(ConfigError, match="no target module"):
        adapters.block_modules(tiny_flux().transformer, ["attn.to_q"], "double 7")
    with pytest.raises(ConfigError, match="FLUX.1 transformer"):
        adapters.block_modules(build_tiny_model().unet, ["to_q"], "double")


def test_samples_and_class_images_encode_apart_from_the_denoiser(tmp_path, instance_dir, monkeypatch):
    """FLUX.1's prompts are encoded with only the encoders brought to the device, then the transformer denoises with
    T5 and CLIP-L back in main memory (T5 alone is 9.5 GB: both would not fit a 16-24 GB card beside it); the
    images equal the pipeline's own encoding."""
    import contextlib

    from core import sampling

    present: set[str] = set()
    seen: list[set[str]] = []

    def spy(parts_on):
        @contextlib.contextmanager
        def tracked(model, names, device):
            names = list(names)
            present.update(names)
            with parts_on(model, names, device):
                yield
            present.difference_update(names)
        return tracked

    monkeypatch.setattr(sampling, "parts_on", spy(sampling.parts_on))  # samples and class images bring parts there
    base = tiny_flux()
    forward = base.transformer.forward

    def watched(*args, **kwargs):
        if not torch.is_grad_enabled():  # sampling, not a training step
            seen.append(set(present))
        return forward(*args, **kwargs)

    monkeypatch.setattr(base.transformer, "forward", watched)
    cfg = flux_config(tmp_path, instance_dir, train={"max_steps": 2, "sample_every": 2, "prior_preservation": True,
                                                     "sample_steps": 2})
    run(cfg, base=base)
    assert seen, "no sampling ran"
    assert all("text_encoder_2" not in s and "text_encoder" not in s for s in seen), seen
    # the same images as the pipeline encoding its prompts itself
    model = tiny_flux().freeze()
    pipe = make_pipeline(model)
    inputs = FLUX.prompt_inputs(model, PROMPTS, "cpu")
    a = generate(pipe, PROMPTS, [1, 2], steps=2, guidance=3.5, size=32)
    b = generate(pipe, PROMPTS, [1, 2], steps=2, guidance=3.5, size=32, prompt_inputs=inputs)
    assert all(list(x.getdata()) == list(y.getdata()) for x, y in zip(a, b))


def test_aspect_buckets_train_on_flux(tmp_path):
    """Portrait, square and landscape photos each train in their own bucket (packed latents of every shape); the
    samples come out in the most common bucket's shape; a bucket step FLUX cannot pack is refused."""
    import numpy as np
    from PIL import Image

    from core.config import DataConfig

    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(300, 500), (310, 520), (64, 64), (500, 300)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    seen = []
    base = tiny_flux()
    forward = base.transformer.forward

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():
            seen.append(tuple(kwargs["img_ids"][:, 1:].max(dim=0).values.tolist()))
        return forward(*args, **kwargs)

    base.transformer.forward = spy
    cfg = flux_config(tmp_path, folder, data={"bucket_step": 8, "min_image_size": 32},
                      train={"max_steps": 6, "sample_every": 6})
    run_dir, events = run(cfg, base=base)
    assert all(math.isfinite(v) for v in losses(events)) and len(losses(events)) == 6
    shapes = set(seen)
    assert len(shapes) >= 2, shapes  # (rows, columns) of packed tokens differ between buckets
    from PIL import Image as PILImage

    sample = PILImage.open(sorted((run_dir / "samples").glob("step_000006_*.png"))[0])
    assert sample.size == (24, 40)  # the two portraits' bucket
    with pytest.raises(ConfigError, match="multiple of 16 px for FLUX.1"):
        FLUX.check_sizes(DataConfig(bucket_step=8), 8)
    FLUX.check_sizes(DataConfig(bucket_step=64), 8)
