"""The training loop on the tiny in-code model: what trains, what stays frozen, resume, prior preservation, options."""
from __future__ import annotations

import csv
import math
import queue

import pytest
import torch
import yaml
from conftest import ADAPTER_TYPES, stop_and_resume, tiny_config

from core import adapters
from core.config import Config
from core.errors import ConfigError, DataError, ModelLoadError, UserError
from core.events import STOP, CheckpointSaved, Failed, Finished, Progress, SampleReady
from core.models import build_tiny_model
from core.rundir import load_run_config
from core.trainer import min_snr_weights, prior_preservation_loss, train


def run(cfg_dict, base=None, commands=None, resume_dir=None):
    events = []
    run_dir = train(Config.from_dict(cfg_dict), emit=events.append, commands=commands, resume_dir=resume_dir, base=base)
    return run_dir, events


def losses(events):
    return [e.loss for e in events if isinstance(e, Progress)]


def frozen_weights(base) -> dict[str, torch.Tensor]:
    """Every base weight, keyed by its name before adapters were injected."""
    out = {}
    for part in ("unet", "text_encoder", "vae"):
        for name, t in getattr(base, part).state_dict().items():
            if any(tag in name for tag in ("lora_", "hada_", "lokr_")):
                continue
            out[f"{part}.{name.replace('.base_layer.', '.')}"] = t.detach().clone()
    return out


def unet_output(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 4, 4, generator=g)
    cond = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10, 500]), cond).sample


def text_output(model):
    ids = model.tokenizer(["a photo of sks ball"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.text_encoder(ids)[0]


@pytest.mark.parametrize("train_te", [False, True], ids=["unet", "unet+te"])
@pytest.mark.parametrize("kind", ADAPTER_TYPES)
def test_training_learns_adapters_only(tmp_path, one_image_dir, kind, train_te):
    """Only adapter weights train, base weights stay bit-identical, loss falls, the file reloads exactly."""
    cfg = tiny_config(tmp_path, one_image_dir, adapter={"type": kind, "train_text_encoder": train_te},
                      train={"max_steps": 30, "batch_size": 2, "learning_rate": 3e-3, "sample_every": 15})
    base = build_tiny_model()
    before = frozen_weights(base)
    run_dir, events = run(cfg, base=base)

    trainable = [n for part in ("unet", "text_encoder", "vae") for n, p in getattr(base, part).named_parameters() if p.requires_grad]
    assert trainable and all(".default" in n for n in trainable)
    assert any(n.startswith(("text_model", "encoder")) or "self_attn" in n for n in trainable) == train_te
    after = frozen_weights(base)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen base weight changed"

    loss = losses(events)
    assert len(loss) == 30 and all(math.isfinite(v) for v in loss)
    first, last = sum(loss[:8]) / 8, sum(loss[-8:]) / 8
    assert last < 0.85 * first, f"loss did not fall: {first:.4f} -> {last:.4f}"

    # The run folder: resolved config, one loss row per step, baseline + periodic samples, the adapter.
    assert load_run_config(run_dir) == Config.from_dict(cfg)
    rows = list(csv.DictReader(open(run_dir / "loss.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert sorted({e.step for e in events if isinstance(e, SampleReady)}) == [0, 15, 30]
    assert len(list((run_dir / "samples").glob("step_000000_*.png"))) == 2
    finished = [e for e in events if isinstance(e, Finished)]
    assert finished and finished[0].step == 30 and not finished[0].stopped

    # Reloading the saved adapter into a fresh base model reproduces the trained model's outputs.
    af = adapters.read_adapter(finished[0].adapter_path)
    assert af.type == kind and set(af.specs) == ({"unet", "text_encoder"} if train_te else {"unet"})
    assert af.metadata["steps"] == "30" and af.metadata["instance_prompt"] == "a photo of sks ball"
    fresh = build_tiny_model().freeze()
    adapters.load_into(fresh.parts, af, "reloaded")
    base.unet.eval()
    assert torch.allclose(unet_output(base), unet_output(fresh), atol=1e-6)
    assert not torch.allclose(unet_output(build_tiny_model().freeze()), unet_output(fresh), atol=1e-4)
    if train_te:
        assert torch.allclose(text_output(base), text_output(fresh), atol=1e-6)


@pytest.mark.parametrize("kind", ADAPTER_TYPES)
def test_resume_matches_uninterrupted_run(tmp_path, instance_dir, kind):
    """Stop at step 4 (a checkpoint is saved), resume: the final adapter equals an uninterrupted run's."""
    common = dict(adapter={"type": kind, "train_text_encoder": True, "dropout": 0.1},
                  train={"max_steps": 7, "checkpoint_every": 3, "sample_every": 0})
    res = stop_and_resume(lambda name: tiny_config(tmp_path, instance_dir, output={"name": name}, **common), 4)
    stop = [e for e in res.stopped_events if isinstance(e, Finished)][0]
    assert stop.stopped and stop.step == 4
    assert [e.step for e in res.stopped_events if isinstance(e, CheckpointSaved)] == [3, 4]
    assert (res.run_dir / "checkpoints" / "step_000004" / "state.pt").is_file()
    assert [e.step for e in res.resumed_events if isinstance(e, Progress)] == [5, 6, 7]
    assert res.full.keys() == res.resumed.keys()
    assert all(torch.equal(res.full[k], res.resumed[k]) for k in res.full), "resumed run diverged from the uninterrupted one"
    # loss.csv continues without duplicate steps, and its losses equal the uninterrupted run's.
    full_rows = list(csv.DictReader(open(res.full_dir / "loss.csv")))
    part_rows = list(csv.DictReader(open(res.run_dir / "loss.csv")))
    assert [r["step"] for r in part_rows] == [str(i) for i in range(1, 8)]
    assert [r["loss"] for r in part_rows] == [r["loss"] for r in full_rows]


def test_prior_preservation_loss_halves():
    per_image = torch.tensor([1.0, 2.0, 3.0, 4.0])  # two instance images, then two class images
    total, inst, prior = prior_preservation_loss(per_image, True, 0.5)
    assert inst.item() == 1.5 and prior.item() == 3.5 and total.item() == 1.5 + 0.5 * 3.5
    total, inst, prior = prior_preservation_loss(per_image, False, 0.5)
    assert prior is None and total.item() == inst.item() == 2.5


def test_prior_preservation_batches_class_half(tmp_path, instance_dir, monkeypatch):
    """With prior preservation each UNet batch is [instance images, class images], and both losses are logged."""
    cfg = tiny_config(tmp_path, instance_dir, train={"prior_preservation": True, "prior_loss_weight": 0.7,
                                                     "batch_size": 2, "max_steps": 3})
    base = build_tiny_model()
    seen = []
    forward = base.unet.forward

    def spy(sample, timestep, encoder_hidden_states, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.append(encoder_hidden_states.detach().clone())
        return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(base.unet, "forward", spy)
    run_dir, events = run(cfg, base=base)
    from core.trainer import encode_prompts

    with torch.no_grad():
        inst_emb, class_emb = encode_prompts(base, ["a photo of sks ball", "a photo of a ball"], "cpu")
    assert len(seen) == 3
    for cond in seen:
        assert cond.shape[0] == 4
        assert all(torch.allclose(c, inst_emb, atol=1e-5) for c in cond[:2])
        assert all(torch.allclose(c, class_emb, atol=1e-5) for c in cond[2:])
    for e in [e for e in events if isinstance(e, Progress)]:
        assert e.prior_loss is not None
        assert e.loss == pytest.approx(e.instance_loss + 0.7 * e.prior_loss, rel=1e-4)
    class_dir = tmp_path / "workspace" / "class_images"
    assert len(list(class_dir.rglob("class_*.png"))) == 2
    rows = list(csv.DictReader(open(run_dir / "loss.csv")))
    assert all(r["prior_loss"] for r in rows)


def test_min_snr_weights_for_both_prediction_types():
    base = build_tiny_model()
    t = torch.tensor([0, 500, 999])
    a = base.scheduler.alphas_cumprod[t]
    snr = a / (1 - a)
    expected = torch.clamp(snr, max=5.0) / snr
    assert torch.allclose(min_snr_weights(base.scheduler, t, 5.0), expected)
    v = build_tiny_model(prediction_type="v_prediction").scheduler
    assert torch.allclose(min_snr_weights(v, t, 5.0), torch.clamp(snr, max=5.0) / (snr + 1))


@pytest.mark.parametrize("options", [
    {"train": {"gradient_accumulation_steps": 2, "lr_scheduler": "cosine", "lr_warmup_steps": 1}},
    {"train": {"min_snr_gamma": 5.0, "noise_offset": 0.05}, "model": {"prediction_type": "v_prediction"}},
    {"train": {"cache_latents": False, "cache_text_embeddings": False}},
    {"data": {"center_crop": False, "random_flip": True, "repeats": 2}},
    {"train": {"mixed_precision": "bf16"}, "adapter": {"type": "loha", "train_text_encoder": True}},
    {"train": {"gradient_checkpointing": True}, "adapter": {"type": "lokr", "train_text_encoder": True}},
], ids=["accumulation-cosine", "minsnr-offset-vpred", "no-caches", "random-crop-flip", "bf16", "checkpointing"])
def test_training_options_run(tmp_path, instance_dir, options):
    cfg = tiny_config(tmp_path, instance_dir, **options)
    cfg["train"] = {**cfg["train"], "max_steps": 3}
    run_dir, events = run(cfg)
    loss = losses(events)
    assert len(loss) == 3 and all(math.isfinite(v) for v in loss)
    assert (run_dir / f"{run_dir.name}.safetensors").is_file()


def test_warmup_schedule_reaches_learning_rate(tmp_path, instance_dir):
    cfg = tiny_config(tmp_path, instance_dir, train={"max_steps": 4, "lr_scheduler": "constant_with_warmup",
                                                     "lr_warmup_steps": 2, "learning_rate": 1e-3})
    _, events = run(cfg)
    assert [e.lr for e in events if isinstance(e, Progress)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


def test_originals_never_modified(tmp_path, instance_dir):
    (instance_dir / "photo0.txt").write_text("a photo of sks ball on grass")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in instance_dir.iterdir()}
    run(tiny_config(tmp_path, instance_dir, train={"max_steps": 2, "sample_every": 1}))
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in instance_dir.iterdir()} == before


@pytest.mark.parametrize("change, error, words", [
    ({"data": {"instance_dir": "/no/such/folder"}}, DataError, "/no/such/folder"),
    ({"data": {"instance_dir": "EMPTY"}}, DataError, "No usable images"),
    ({"data": {"instance_prompt": ""}}, DataError, "instance prompt"),
    ({"data": {"class_prompt": ""}, "train": {"prior_preservation": True}}, DataError, "class prompt"),
    ({"model": {"base": "/no/such/model"}}, ModelLoadError, "not found"),
    ({"train": {"mixed_precision": "fp16"}}, ConfigError, "NVIDIA GPU"),
    ({"train": {"optimizer": "adamw8bit"}}, ConfigError, "8-bit"),
], ids=["missing-folder", "empty-folder", "no-prompt", "no-class-prompt", "bad-model", "fp16-cpu", "adam8bit-cpu"])
def test_bad_input_gives_clear_error(tmp_path, instance_dir, change, error, words):
    if torch.cuda.is_available() and "NVIDIA" in words:
        pytest.fail("this test expects a machine without CUDA")
    if change.get("data", {}).get("instance_dir") == "EMPTY":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("not an image")
        change = {"data": {"instance_dir": str(tmp_path / "empty")}}
    cfg = tiny_config(tmp_path, instance_dir, **change)
    events = []
    with pytest.raises(error) as info:
        train(Config.from_dict(cfg), emit=events.append)
    assert words.lower() in str(info.value).lower()
    assert [e for e in events if isinstance(e, Failed)][-1].message == str(info.value)


def test_automatic_run_names_never_collide(tmp_path):
    """Regression: two runs started within one second got the same date-time name, and the second failed."""
    from core.trainer import unused_run_name

    assert unused_run_name(tmp_path, "lora-20261127-101010") == "lora-20261127-101010"
    (tmp_path / "lora-20261127-101010").mkdir()
    assert unused_run_name(tmp_path, "lora-20261127-101010") == "lora-20261127-101010-2"
    (tmp_path / "lora-20261127-101010-2").mkdir()
    assert unused_run_name(tmp_path, "lora-20261127-101010") == "lora-20261127-101010-3"


def test_existing_run_folder_and_bad_resume(tmp_path, instance_dir):
    cfg = tiny_config(tmp_path, instance_dir, output={"name": "same"})
    run(cfg)
    with pytest.raises(ConfigError, match="already exists"):
        run(cfg)
    with pytest.raises(ConfigError, match="no config.yaml"):
        load_run_config(tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(cfg, resume_dir=tmp_path / "workspace" / "runs" / "same")


def test_out_of_memory_becomes_plain_message(tmp_path, instance_dir, monkeypatch):
    base = build_tiny_model()

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(base.unet, "forward", oom)
    events = []
    with pytest.raises(UserError, match="ran out of memory"):
        train(Config.from_dict(tiny_config(tmp_path, instance_dir)), emit=events.append, base=base)
    assert "low-VRAM" in [e for e in events if isinstance(e, Failed)][-1].message


def test_config_yaml_is_the_resolved_config(tmp_path, instance_dir):
    run_dir, _ = run(tiny_config(tmp_path, instance_dir, output={"name": "r"}))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 4 and saved["adapter"]["unet_targets"][0] == "to_q"
    assert "version" in saved


def test_failed_start_leaves_no_run_folder(tmp_path, instance_dir):
    cfg = tiny_config(tmp_path, instance_dir, model={"base": str(tmp_path / "missing.safetensors")})
    with pytest.raises(ModelLoadError):
        run(cfg)
    runs = tmp_path / "workspace" / "runs"
    assert not runs.exists() or not any(runs.iterdir())


# ---------------------------------------------------------------------------------------------- one step, alone

def tiny_data(n_instance=3, n_class=None, repeats=1):
    from core.trainer import TrainData

    class Sized:  # batch_indices only needs the sizes of the sets
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    return TrainData(Sized(n_instance), Sized(n_class) if n_class else None, repeats)


def test_batch_indices_are_a_pure_function_of_seed_and_position():
    from core.trainer import batch_indices

    t = Config.from_dict({"train": {"batch_size": 2, "gradient_accumulation_steps": 2, "seed": 7}}).train
    data = tiny_data(n_instance=3, n_class=5, repeats=2)
    first = batch_indices(data, t, step=4, micro=1)
    assert batch_indices(data, t, step=4, micro=1) == first  # same position, same images
    assert list(first) == ["instance", "class"] and all(len(v) == 2 for v in first.values())
    assert all(0 <= i < 3 for i in first["instance"]) and all(0 <= i < 5 for i in first["class"])
    # One epoch over the instance images shows each exactly `repeats` times, whatever the seed.
    epoch = [i for step in range(3) for micro in range(2) for i in batch_indices(data, t, step, micro)["instance"]][:6]
    assert sorted(epoch) == [0, 0, 1, 1, 2, 2]
    # Another seed draws another order; processes draw disjoint slices of the same stream.
    other = Config.from_dict({"train": {"batch_size": 2, "gradient_accumulation_steps": 2, "seed": 8}}).train
    assert [batch_indices(data, other, s, 0)["class"] for s in range(4)] != [batch_indices(data, t, s, 0)["class"]
                                                                           for s in range(4)]
    single = Config.from_dict({"train": {"batch_size": 4, "seed": 7}}).train
    two = Config.from_dict({"train": {"batch_size": 2, "seed": 7}}).train
    halves = [batch_indices(data, two, 0, 0, process=p, num_processes=2)["class"] for p in (0, 1)]
    assert halves[0] + halves[1] == batch_indices(data, single, 0, 0)["class"]
    assert "class" not in batch_indices(tiny_data(), t, 0, 0)  # no class images without prior preservation


def test_draw_batch_lays_out_instance_then_class_images():
    from core.trainer import draw_batch

    class Source:  # latent i of set k is filled with k * 100 + i and draws one number from the generator
        def __init__(self, k):
            self.k = k

        def draw(self, index, generator):
            noise = torch.rand((), generator=generator)
            return torch.full((4, 2, 2), self.k * 100.0 + index) + 0 * noise, f"set{self.k} image{index}"

    picks = {"instance": [2, 0], "class": [1, 1]}
    batch = draw_batch({"instance": Source(0), "class": Source(1)}, picks, torch.Generator().manual_seed(0))
    assert batch.latents.shape == (4, 4, 2, 2)
    assert batch.latents[:, 0, 0, 0].tolist() == [2.0, 0.0, 101.0, 101.0]
    assert batch.prompts == ["set0 image2", "set0 image0", "set1 image1", "set1 image1"]


def test_batch_loss_weights_and_splits_the_halves():
    from core.trainer import Prediction, batch_loss

    target = torch.zeros(4, 1, 1, 2)
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).sqrt().view(4, 1, 1, 1).expand(4, 1, 1, 2)  # per-image MSE 1, 2, 3, 4
    total, inst, prior = batch_loss(Prediction(pred, target), True, 0.5)
    assert inst.item() == pytest.approx(1.5) and prior.item() == pytest.approx(3.5)
    assert total.item() == pytest.approx(1.5 + 0.5 * 3.5)
    total, inst, prior = batch_loss(Prediction(pred, target, torch.tensor([2.0, 0.0, 1.0, 0.0])), True, 1.0)
    assert (inst.item(), prior.item(), total.item()) == pytest.approx((1.0, 1.5, 2.5))
    total, inst, prior = batch_loss(Prediction(pred, target), False, 0.5)
    assert prior is None and total.item() == inst.item() == pytest.approx(2.5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_predict_targets_follow_the_prediction_type(kind):
    """The target is the noise, the velocity or (prediction type "sample") the clean latents x0."""
    from core.trainer import Batch, predict

    base = build_tiny_model(prediction_type=kind)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    batch = Batch(latents, ["a photo of sks ball", "a photo of a ball"])
    t = Config.from_dict({"train": {"min_snr_gamma": 5.0}}).train
    encode = lambda prompts: torch.zeros(len(prompts), 77, 32)  # noqa: E731 - the text does not matter here
    p = predict(base, batch, torch.Generator().manual_seed(3), encode, torch.float32, t)
    # The same generator again gives the noise and timesteps predict drew (in the same order).
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (2,), generator=g)
    x0 = latents * base.vae.config.scaling_factor
    expected = {"epsilon": noise, "v_prediction": base.scheduler.get_velocity(x0, noise, timesteps), "sample": x0}[kind]
    assert torch.equal(p.target, expected)
    assert p.pred.shape == x0.shape
    assert torch.equal(p.weights, min_snr_weights(base.scheduler, timesteps, 5.0))


def test_min_snr_weight_for_x0_prediction():
    """Hang et al.: min(snr, gamma) on the x0 error (no division, unlike epsilon and v)."""
    t = torch.tensor([0, 500, 999])
    sched = build_tiny_model(prediction_type="sample").scheduler
    a = sched.alphas_cumprod[t]
    assert torch.allclose(min_snr_weights(sched, t, 5.0), torch.clamp(a / (1 - a), max=5.0))


def test_sample_prediction_trains(tmp_path, instance_dir, monkeypatch):
    """model.prediction_type: sample is accepted by the config and trained towards x0."""
    import core.families.base

    kinds = []
    target = core.families.base.training_target

    def spy(scheduler, *args):
        kinds.append(scheduler.config.prediction_type)
        return target(scheduler, *args)

    monkeypatch.setattr(core.families.base, "training_target", spy)
    cfg = tiny_config(tmp_path, instance_dir, model={"prediction_type": "sample"}, train={"min_snr_gamma": 5.0})
    run_dir, events = run(cfg)
    loss = losses(events)
    assert len(loss) == 4 and all(math.isfinite(v) for v in loss)
    assert kinds == ["sample"] * 4
    assert load_run_config(run_dir).model.prediction_type == "sample"


def test_run_started_event_names_the_run_folder_before_the_first_step(tmp_path, instance_dir):
    from core.events import Log, RunStarted

    run_dir, events = run(tiny_config(tmp_path, instance_dir, output={"name": "named"}))
    started = [i for i, e in enumerate(events) if isinstance(e, RunStarted)]
    first_step = next(i for i, e in enumerate(events) if isinstance(e, Progress))
    assert len(started) == 1 and started[0] < first_step
    assert events[started[0]].run_dir == str(run_dir) and run_dir.name == "named"
    assert any(isinstance(e, Log) and e.message == f"Run folder: {run_dir}" for e in events)  # still in the log


# ---------------------------------------------------------------------------------------------- preflight

def test_preflight_returns_the_instance_scan(tmp_path, instance_dir):
    from core.trainer import preflight

    report = preflight(Config.from_dict(tiny_config(tmp_path, instance_dir)))
    assert [item.path.name for item in report.images] == ["photo0.png", "photo1.png", "photo2.png"]


@pytest.mark.parametrize("change, error, words", [
    ({"data": {"instance_dir": ""}}, DataError, "No instance images folder"),
    ({"data": {"instance_dir": "/no/such/folder"}}, DataError, "/no/such/folder"),
    ({"data": {"instance_prompt": ""}}, DataError, "instance prompt"),
    ({"data": {"class_prompt": " "}, "train": {"prior_preservation": True}}, DataError, "needs a class prompt"),
    ({"train": {"mixed_precision": "fp16"}}, ConfigError, "NVIDIA GPU"),
    ({"train": {"optimizer": "adamw8bit"}}, ConfigError, "8-bit"),
    ({"output": {"name": "taken"}}, ConfigError, "already exists"),
], ids=["no-folder-set", "missing-folder", "no-prompt", "no-class-prompt", "fp16-cpu", "adam8bit-cpu", "name-taken"])
def test_preflight_refuses_in_plain_words(tmp_path, instance_dir, change, error, words):
    from core.trainer import preflight

    if torch.cuda.is_available() and words in ("NVIDIA GPU", "8-bit"):
        pytest.fail("this test expects a machine without CUDA")
    taken = tmp_path / "workspace" / "runs" / "taken"
    taken.mkdir(parents=True)
    (taken / "config.yaml").write_text("{}")
    with pytest.raises(error, match=words):
        preflight(Config.from_dict(tiny_config(tmp_path, instance_dir, **change)))
    if words == "already exists":  # the taken run can be resumed, once it has a checkpoint
        resume = Config.from_dict(tiny_config(tmp_path, instance_dir, **change))
        with pytest.raises(ConfigError, match="no checkpoint"):
            preflight(resume, resume_dir=taken)
        (taken / "checkpoints" / "step_000002").mkdir(parents=True)
        (taken / "checkpoints" / "step_000002" / "state.json").write_text('{"step": 2}')
        assert preflight(resume, resume_dir=taken).images


def test_preflight_refuses_an_unwritable_output_folder(tmp_path, instance_dir):
    from core.trainer import preflight

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="output"):
        preflight(Config.from_dict(tiny_config(tmp_path, instance_dir, output={"dir": str(blocker / "runs")})))


def test_train_checks_before_loading_the_model(tmp_path, instance_dir, monkeypatch):
    """A run with no images fails at once, without minutes spent loading the base model first."""
    import core.trainer

    def no_load(*args, **kwargs):
        raise AssertionError("the base model was loaded before the checks")

    monkeypatch.setattr(core.trainer, "load_base_from_config", no_load)
    with pytest.raises(DataError, match="/no/such/folder"):
        run(tiny_config(tmp_path, instance_dir, data={"instance_dir": "/no/such/folder"}))


def test_time_left_follows_the_recent_pace_with_samples_and_without_pauses():
    from core.trainer import StepClock

    clock = StepClock(window=4)
    assert clock.seconds_left(10) == 0.0  # nothing measured yet
    for seconds in (10.0, 10.0, 1.0, 1.0, 1.0, 1.0):  # slow first steps (a busy machine), then quick ones
        clock.add(seconds)
    assert clock.seconds_left(100) == pytest.approx(100.0)  # the last 4 steps: 1 s each, not the run's average
    clock.add_to_last(4.0)  # that step also made samples
    assert clock.seconds_left(100) == pytest.approx(200.0)


def test_progress_reports_time_left_from_the_runs_own_steps(tmp_path, instance_dir):
    _, events = run(tiny_config(tmp_path, instance_dir, train={"max_steps": 6}))
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6]
    assert progress[-1].eta_s == 0.0 and all(p.eta_s > 0 for p in progress[:-1])


@pytest.mark.parametrize("kind", ADAPTER_TYPES)
def test_the_same_seed_gives_the_same_adapter(tmp_path, instance_dir, kind):
    """peft draws the adapters' starting weights from torch's generator: seeded by train.seed, two runs agree
    exactly whatever the process drew before, and another seed starts elsewhere."""
    def adapter(name, seed, before):
        torch.manual_seed(before)
        torch.rand(before)  # the process's random state before the run differs
        _, events = run(tiny_config(tmp_path, instance_dir, output={"name": name}, adapter={"type": kind},
                                    train={"max_steps": 2, "seed": seed}))
        return adapters.read_adapter(next(e.adapter_path for e in events if isinstance(e, Finished))).tensors

    first, again, other = adapter("a", 7, 1), adapter("b", 7, 5), adapter("c", 8, 1)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("kind", ADAPTER_TYPES)
def test_finished_run_shows_each_prompt_with_the_adapter_off_and_on(tmp_path, one_image_dir, kind):
    """The end-of-run strip: "off" is the base model (the step-0 samples, pixel for pixel), "on" is the trained
    adapter as the playground applies its saved file at weight 1 (same seed, steps, guidance); a stopped run or
    `compare_at_end: false` makes none."""
    import numpy as np
    from PIL import Image

    from core.events import CompareReady
    from core.playground import Playground, from_file

    cfg = tiny_config(tmp_path, one_image_dir, adapter={"type": kind, "train_text_encoder": True},
                      train={"max_steps": 20, "learning_rate": 5e-3, "sample_every": 10, "sample_guidance": 4.0})
    run_dir, events = run(cfg)
    [strip] = [e for e in events if isinstance(e, CompareReady)]
    assert strip.step == 20 and len(strip.paths) == 4
    assert [c.split(" · ")[1] for c in strip.captions] == ["a photo of sks ball"] * 2 + ["a photo of a ball"] * 2
    assert [c.split(" · ")[0] for c in strip.captions] == ["adapter off", "adapter on"] * 2
    off_inst, on_inst, off_cls, on_cls = (np.asarray(Image.open(p), dtype=np.int16) for p in strip.paths)
    step0 = [np.asarray(Image.open(run_dir / "samples" / f"step_000000_{i}.png"), dtype=np.int16) for i in (0, 1)]
    assert np.array_equal(off_inst, step0[0]) and np.array_equal(off_cls, step0[1])
    assert np.abs(on_inst - off_inst).max() > 5  # the adapter changed the picture
    last = [np.asarray(Image.open(run_dir / "samples" / f"step_000020_{i}.png"), dtype=np.int16) for i in (0, 1)]
    assert np.array_equal(on_inst, last[0]) and np.array_equal(on_cls, last[1])
    finished = [e for e in events if isinstance(e, Finished)][0]
    side = off_inst.shape[0]
    [played] = Playground("cpu").generate("tiny", [from_file(finished.adapter_path)], "a photo of sks ball",
                                          seed=1234, steps=2, guidance=4.0, width=side, height=side)
    assert np.abs(np.asarray(played, dtype=np.int16) - on_inst).max() <= 1  # as the playground shows it

    commands = queue.Queue()
    commands.put(STOP)
    _, stopped = run(tiny_config(tmp_path, one_image_dir, output={"name": "stopped"}), commands=commands)
    assert [e for e in stopped if isinstance(e, Finished)][0].stopped
    assert not [e for e in stopped if isinstance(e, CompareReady)]
    _, off = run(tiny_config(tmp_path, one_image_dir, output={"name": "off"}, train={"compare_at_end": False}))
    assert not [e for e in off if isinstance(e, CompareReady)]


def test_a_failed_end_of_run_picture_leaves_the_run_finished(tmp_path, one_image_dir, monkeypatch):
    """The adapter is saved before the off / on pictures: their failure is said in the log, the run finishes."""
    from core.events import CompareReady, Log
    from core.trainer import Run

    def broken(self, prompts, seeds, adapter=True):
        raise RuntimeError("no memory left for the pictures")

    monkeypatch.setattr(Run, "images", broken)
    run_dir, events = run(tiny_config(tmp_path, one_image_dir))
    finished = [e for e in events if isinstance(e, Finished)]
    assert finished and not finished[0].stopped and (run_dir / f"{run_dir.name}.safetensors").is_file()
    assert not [e for e in events if isinstance(e, CompareReady)]
    assert any("Could not draw the adapter off / on pictures (RuntimeError" in e.message
               for e in events if isinstance(e, Log))
