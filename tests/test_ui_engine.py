"""The engine support the app relies on, tested without a browser or a server: dataset folders, class-image
rejection, the playground's adapter swaps, a paused run's live adapter, the loss curve, presets, serving flags."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import draw_subject, tiny_config
from PIL import Image

from core import adapters, events as ev
from core import datasets as ds
from core.adapter_file import AdapterSpec
from core.class_images import ensure_class_images, missing_indices, reject_class_images
from core.config import Config
from core.errors import DataError, ModelLoadError
from core.models import build_tiny_model
from core.playground import Playground, from_file
from core.session import ClassImagesJob, Session
from core.trainer import train


# --------------------------------------------------------------------------- datasets

def make_sources(folder: Path) -> Path:
    folder.mkdir()
    for i in range(3):
        draw_subject(folder / f"photo{i}.png", i)
    (folder / "photo1.txt").write_text("a photo of sks ball on a table\n")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.new("RGB", (20, 20)).save(folder / "small.png")
    Image.new("RGB", (96, 64), (0, 120, 0)).save(folder / "wide.png")
    return folder


def test_dataset_copies_valid_images_and_never_touches_originals(tmp_path):
    src = make_sources(tmp_path / "src")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()}
    folder = ds.create_dataset(tmp_path / "ws", "rex")
    report = ds.add_folder(folder, src)
    assert sorted(report.added) == ["photo0.png", "photo1.png", "photo2.png", "wide.png"]
    reasons = dict(report.skipped)
    assert "not an image" in reasons["notes.pdf"]
    assert "corrupt" in reasons["broken.png"]
    assert "too small" in reasons["small.png"] and "20x20" in reasons["small.png"]
    assert (folder / "photo1.txt").read_text().strip() == "a photo of sks ball on a table"  # caption came along
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()} == before
    assert not list(folder.glob(".*.tmp"))  # atomic copies leave no temp files
    # Adding again: identical bytes are recognised; a different file with a taken name gets a suffix.
    again = ds.add_folder(folder, src)
    assert again.added == [] and dict(again.skipped)["photo0.png"] == "already in the dataset"
    other = tmp_path / "other"
    other.mkdir()
    draw_subject(other / "photo0.png", 5)
    assert ds.add_images(folder, [other / "photo0.png"]).added == ["photo0-1.png"]
    assert ds.read_manifest(folder)["sources"]["photo0-1.png"] == str(other / "photo0.png")


def test_dataset_names_captions_and_removal(tmp_path):
    ws = tmp_path / "ws"
    folder = ds.create_dataset(ws, "my dog")
    assert ds.list_datasets(ws) == ["my dog"]
    with pytest.raises(DataError, match="already exists"):
        ds.create_dataset(ws, "my dog")
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(DataError, match="cannot be a dataset name"):
            ds.create_dataset(ws, bad)
    with pytest.raises(DataError, match="No dataset chosen"):
        ds.dataset_dir(ws, "")
    draw_subject(folder / "a.png", 0)
    draw_subject(folder / "b.png", 1)
    assert ds.write_captions(folder, {"a.png": "a photo of sks dog\non grass", "b.png": ""}) == 1
    assert (folder / "a.txt").read_text() == "a photo of sks dog on grass\n"
    assert ds.read_captions(folder) == [("a.png", "a photo of sks dog on grass"), ("b.png", "")]
    assert ds.write_captions(folder, {"a.png": ""}) == 1 and not (folder / "a.txt").exists()
    with pytest.raises(DataError, match="not an image of this dataset"):
        ds.write_captions(folder, {"zzz.png": "x"})
    assert ds.remove_images(folder, ["a.png", "missing.png"]) == ["a.png"]
    assert (folder / ds.REMOVED_DIR / "a.png").is_file() and not (folder / "a.png").exists()


def test_identifier_suggestions_are_single_rare_tokens():
    from core.base_model import clip_tokenizer

    tok = clip_tokenizer()
    first = ds.suggest_identifiers(6, seed=0, tokenizer=tok)
    assert first[0] == "sks" and len(first) == 6
    more = ds.suggest_identifiers(6, seed=3, tokenizer=tok)
    assert set(more).isdisjoint(first) or more != first
    for word in first + more:
        assert len(ds.token_pieces(word, tok)) == 1, word
    assert ds.token_pieces("mydog", tok) == ["my", "dog"]
    assert ds.instance_prompt("sks", "dog") == "a photo of sks dog"
    assert ds.class_prompt("owl") == "a photo of an owl"


def test_crop_notes_say_what_training_does():
    item = ds.ImageItem(Path("x.jpg"), None, 800, 600)
    assert ds.crop_note(item, 512) == "800x600: the centre 600x600 square, scaled down to 512x512"
    small = ds.ImageItem(Path("y.jpg"), None, 300, 300)
    assert "scaled UP" in ds.crop_note(small, 512)


# --------------------------------------------------------------------------- class images

def test_rejected_class_images_are_not_made_again(tmp_path, instance_dir):
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, data={"num_class_images": 3}))
    base = build_tiny_model()
    first = ensure_class_images(cfg, base)
    folder = first[0].path.parent
    assert [i.path.name for i in first] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert reject_class_images(folder, ["class_00001.png", "manifest.json", "nope.png"]) == ["class_00001.png"]
    assert missing_indices(folder, 2, 3) == [3]  # seed 1 would give the rejected picture again
    topped = ensure_class_images(cfg, base)
    assert [i.path.name for i in topped] == ["class_00000.png", "class_00002.png", "class_00003.png"]
    assert (folder / "rejected" / "class_00001.png").is_file()


def test_class_images_job_stops_and_continues(tmp_path, instance_dir):
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, data={"num_class_images": 6, "class_batch_size": 1}))
    job = ClassImagesJob()
    job.start(cfg, base=build_tiny_model())
    with pytest.raises(Exception, match="already being generated"):
        job.start(cfg)
    job.stop()
    assert job.wait(60) == "stopped"
    done = job.snapshot()["done"]
    assert done < 6
    job.start(cfg, base=build_tiny_model())
    assert job.wait(60) == "finished"
    snap = job.snapshot()
    assert snap["total"] == 6 - done and snap["done"] == snap["total"]
    assert len(list(Path(snap["folder"]).glob("class_*.png"))) == 6


def test_class_images_job_stopped_during_its_last_step_is_finished(tmp_path, instance_dir):
    """Stop pressed while the last batch is in its final step: every image is made, so the job is done."""
    from ui import class_tab

    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, data={"num_class_images": 2, "class_batch_size": 2}))
    job = ClassImagesJob()
    on_event = job._on_event

    def stop_in_last_step(e):
        on_event(e)
        if isinstance(e, ev.ClassImagesStep) and e.step == e.steps:
            job.stop()

    job._on_event = stop_in_last_step
    job.start(cfg, base=build_tiny_model())
    assert job.wait(60) == "finished"
    snap = job.snapshot()
    assert snap["done"] == snap["total"] == 2 and not snap["stopping"]
    view = class_tab.job_view(SimpleNamespace(class_job=job))["class_progress"]
    assert "Done" in view and "2 / 2 new images" in view and "press Generate" not in view


def test_class_images_progress_moves_within_a_batch():
    """A batch of 25 takes minutes: the bar and the text follow its denoising steps, and a stop shows at once."""
    from ui import class_tab

    snap = {"state": "running", "done": 0, "total": 20, "folder": "", "message": "Generating...", "error": "",
            "batch": 20, "step": 15, "steps": 30, "stopping": False}
    job = SimpleNamespace(snapshot=lambda: dict(snap), busy=True)
    view = class_tab.job_view(SimpleNamespace(class_job=job))["class_progress"]
    assert "width:50.0%" in view and "0 / 20 new images; making the next 20 images: step 15 / 30" in view
    snap["stopping"] = True
    assert "Stopping" in class_tab.job_view(SimpleNamespace(class_job=job))["class_progress"]


# --------------------------------------------------------------------------- playground

@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    """One adapter file per type, with random (non-zero) weights on the tiny model."""
    folder = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, kind in enumerate(["lora", "loha", "lokr"]):
        model = build_tiny_model()
        specs = {"unet": AdapterSpec(kind, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "conv1"]),
                 "text_encoder": AdapterSpec(kind, 4, 4, ["q_proj", "v_proj"])}
        torch.manual_seed(i)
        for ps in adapters.inject_all(model.parts, specs).values():
            for p in ps:
                torch.nn.init.normal_(p, std=0.1)
        out[kind] = adapters.save_adapter(folder / f"{kind}.safetensors", model.parts, specs, {"base_model": "tiny"})
    return out


def pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def test_playground_mixes_types_and_swaps_without_reloading(adapter_files):
    pg = Playground("cpu")
    gen = dict(prompt="a photo of sks ball", seed=3, steps=2)
    plain = pixels(pg.generate("tiny", [], **gen)[0])
    # LoHa first, then a LoRA joins: the layers are rebuilt LoRA-first, the base model is not reloaded.
    pg.generate("tiny", [from_file(adapter_files["loha"])], **gen)
    mixed = pixels(pg.generate("tiny", [from_file(adapter_files[k], 0.7) for k in ("loha", "lokr", "lora")],
                               **gen)[0])
    assert pg.base_loads == 1 and len(pg.loaded_names()) == 3
    assert np.abs(mixed - plain).max() > 5
    fresh = Playground("cpu")
    same = pixels(fresh.generate("tiny", [from_file(adapter_files[k], 0.7) for k in ("lora", "loha", "lokr")],
                                 **gen)[0])
    assert np.array_equal(mixed, same)  # the swap history does not change the result
    # Weight 0 and "no adapters" are the base model exactly; removing them all restores it too.
    off, on = pg.generate("tiny", [from_file(adapter_files["lora"])], strengths=(0.0, 1.0), **gen)
    assert np.array_equal(pixels(off), plain) and not np.array_equal(pixels(on), plain)
    assert np.array_equal(pixels(pg.generate("tiny", [], **gen)[0]), plain)
    assert pg.base_loads == 1
    adapters.remove_all(pg.base.parts)
    assert adapters.tuner_layers(pg.base.unet) == []


def test_playground_errors_are_plain(adapter_files, tmp_path):
    pg = Playground("cpu")
    with pytest.raises(ModelLoadError, match="not found"):
        from_file(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="damaged or not a safetensors"):
        pg.generate("tiny", [from_file(bad)], "x", steps=1)
    with pytest.raises(Exception, match="Write a prompt"):
        pg.generate("tiny", [], "  ", steps=1)


# --------------------------------------------------------------------------- session: live adapter of a paused run

def test_playground_results_change_with_their_captions():
    """An event that writes a result's image writes its caption too, and only its own: Compare leaves the caption
    under the single Result alone (it described that image), and the grid gets its own."""
    from ui import playground_tab

    pairs = {"pg_image": "pg_info", "pg_grid": "pg_grid_info"}
    for trigger, _, _, outputs, *_ in playground_tab.EVENTS:
        for image, caption in pairs.items():
            assert (image in outputs) == (caption in outputs), (trigger, outputs)
    compare = next(row for row in playground_tab.EVENTS if row[0] == "compare_btn.click")
    assert compare[3] == ("pg_grid", "pg_grid_info")


def test_live_adapter_of_a_paused_run(tmp_path, instance_dir):
    import time

    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, train={"max_steps": 100000}))
    s = Session()
    with pytest.raises(Exception, match="No training run is paused"):
        s.live_adapter()
    s.start(cfg)
    deadline = time.time() + 60
    while s.snapshot()["step"] < 3 and time.time() < deadline:
        time.sleep(0.05)
    s.pause()
    while s.snapshot()["state"] != "paused" and time.time() < deadline:
        time.sleep(0.05)
    live = s.live_adapter()
    assert live.type == "lora" and live.metadata["steps"] == str(s.snapshot()["step"])
    s.save_now()
    while not s.snapshot()["checkpoints"] and time.time() < deadline:
        time.sleep(0.05)
    saved = adapters.read_adapter(Path(s.snapshot()["checkpoints"][-1][1]) / "adapter.safetensors")
    assert saved.tensors.keys() == live.tensors.keys()
    assert all(torch.equal(saved.tensors[k], live.tensors[k]) for k in live.tensors)
    pg = Playground("cpu")
    pg.generate("tiny", [from_file_like(live)], "a photo of sks ball", steps=1)
    s.resume()
    s.stop()
    assert s.wait(60) == "stopped"
    with pytest.raises(Exception, match="No training run is paused"):
        s.live_adapter()


def from_file_like(adapter):
    from core.playground import Wanted

    return Wanted("live", lambda: adapter, 1.0)


def test_session_reports_a_base_model_that_cannot_load(tmp_path, instance_dir):
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, model={"base": str(tmp_path / "nope.safetensors")}))
    s = Session()
    s.start(cfg)
    assert s.wait(60) == "failed"
    assert "not found" in s.snapshot()["error"]


# --------------------------------------------------------------------------- UI helpers (plain functions)

def test_loss_curve_matches_pandas_and_stays_small():
    from ui.train_tab import MAX_POINTS, LossCurve

    rng = np.random.default_rng(0)
    losses = [(i + 1, float(v)) for i, v in enumerate(rng.random(5000))]
    curve = LossCurve()
    for end in (1, 7, 600, 5000):  # grown in pieces, as polls see it
        df = curve.frame("run", losses[:end])
    expected = pd.Series([v for _, v in losses]).ewm(alpha=0.05, adjust=True).mean().to_numpy()
    assert np.allclose(curve.ema, expected)
    assert len(df) == 2 * MAX_POINTS and set(df["curve"]) == {"loss", "smoothed"}
    small = curve.frame("other run", losses[:10])
    assert list(small["step"][:10]) == list(range(1, 11))  # a new run starts a new curve


def test_form_and_presets_round_trip(tmp_path):
    from ui import form

    ws = tmp_path / "ws"
    cfg = form.form_config({"base_choice": "tiny", "max_steps": 12.0, "learning_rate": 2e-4, "adapter_type": "lokr",
                            "sample_prompts": "a\n\nb ", "unet_targets": "to_q, to_v", "min_snr_gamma": 0,
                            "text_encoder_rank": 0, "instance_prompt": "a photo of sks dog"}, ws)
    assert cfg.model.base == "tiny" and cfg.train.max_steps == 12 and cfg.adapter.type == "lokr"
    assert cfg.train.sample_prompts == ["a", "b"] and cfg.adapter.unet_targets == ["to_q", "to_v"]
    assert cfg.train.min_snr_gamma is None and cfg.adapter.text_encoder_rank is None
    assert cfg.output.dir == str(ws / "runs")
    with pytest.raises(Exception, match="whole number"):
        form.form_config({"max_steps": 1.5}, ws)
    with pytest.raises(Exception, match="Enter the other base model"):
        form.form_config({"base_choice": form.OTHER, "base_other": " "}, ws)
    path = form.save_preset(ws, "mine", cfg)
    text = path.read_text()
    assert "sks" not in text and "max_steps: 12" in text  # prompts and dataset are not part of a preset
    assert "mine" in form.preset_names(ws)
    loaded = form.preset_config(ws, "mine")
    assert loaded["train"]["max_steps"] == 12 and loaded["adapter"]["type"] == "lokr"
    assert loaded["model"]["base"] == "tiny"
    with pytest.raises(Exception, match="built-in preset"):
        form.save_preset(ws, "sd15-lora", cfg)
    # A saved preset is also a valid config file for the command line.
    from core.config import load_config

    assert load_config(path).train.max_steps == 12


def test_form_widgets_and_the_config_share_one_range_per_field():
    """A number box offers exactly the range the config enforces: its limits come from the field's metadata."""
    import gradio as gr

    from core.errors import ConfigError
    from ui import form

    initial = form.form_values(Config().to_dict())
    limited = 0
    with gr.Blocks():
        for f in form.FIELDS:
            box = form.widget(f.name, initial)
            _, meta = form.config_field(f.key)
            if f.kind not in form.NUMBER_KINDS:
                continue
            assert isinstance(box, gr.Number) and (box.precision == 0) == f.kind.endswith("int"), f.name
            low, high = meta.get("min", meta.get("above")), meta.get("max")
            assert (box.minimum, box.maximum) == (low, high), f.name
            section, name = f.key.split(".")
            for bad in [v for v in (low if "above" in meta else None, None if low is None else low - 1,
                                    None if high is None else high + 0.5) if v is not None]:
                with pytest.raises(ConfigError, match=f"`{f.key}` must"):
                    Config.from_dict({section: {name: bad}})
            for edge in (None if "above" in meta else low, high):  # the edges themselves are allowed
                if edge is not None:
                    assert getattr(getattr(Config.from_dict({section: {name: edge}}), section), name) == edge
            limited += low is not None or high is not None
    assert limited >= 20


def test_form_widgets_show_the_config_fields_help_and_choices():
    import gradio as gr

    from ui import form

    initial = form.form_values(Config().to_dict())
    with gr.Blocks():
        rank, te_rank, gamma, sched = (form.widget(n, initial) for n in
                                       ("rank", "text_encoder_rank", "min_snr_gamma", "lr_scheduler"))
        typed = form.widget("adapter_type", initial, gr.Radio, choices=[("LoRA", "lora")], info="mine")
    assert rank.info == "Size of the adapter; 4-32." and te_rank.info == "0: same as rank."
    assert gamma.info == "0: off; 5 is usual."
    assert [v for _, v in sched.choices] == ["constant", "constant_with_warmup", "linear", "cosine"]
    assert isinstance(typed, gr.Radio) and typed.choices == [("LoRA", "lora")] and typed.info == "mine"


def test_the_app_wires_module_level_handlers_and_leaves_gradio_unpatched(tmp_path):
    import inspect

    from ui.main import build_app

    app = build_app(tmp_path / "ws")
    handlers = [inspect.unwrap(block_fn.fn) for block_fn in app.fns.values() if block_fn.fn]
    assert len(handlers) > 40
    assert [h.__qualname__ for h in handlers if "<locals>" in h.__qualname__ or h.__name__ == "<lambda>"] == []
    assert [b for b in app.blocks.values() if "preprocess" in vars(b)] == []  # no instance's preprocessing replaced
    by_api = {block_fn.api_name: block_fn for block_fn in app.fns.values()}
    # Settings reach their handler as sent (the form and the config name the key of a bad one); files are prepared.
    assert not by_api["start_training"].preprocess and not by_api["class_generate"].preprocess
    assert by_api["add_upload"].preprocess and by_api["playground_generate"].preprocess


# --------------------------------------------------------------------------- serving flags

@pytest.mark.parametrize("argv", [["--listen"], ["--share"], ["--host", "0.0.0.0"], ["--listen", "--auth", "nopass"]])
def test_public_serving_needs_a_password(argv, capsys):
    import app

    assert app.main(argv) == 2
    err = capsys.readouterr().err
    assert "--auth user:password" in err or "user:password" in err


def test_serving_defaults_to_this_computer():
    import app
    from ui.main import serving_problem

    args = app.build_parser().parse_args([])
    assert args.host is None and not args.listen and not args.share and args.port == 7860
    assert serving_problem(args) is None
    assert serving_problem(app.build_parser().parse_args(["--listen", "--auth", "me:secret"])) is None


def test_train_alone_still_works_with_the_session_loading_the_model(tmp_path, instance_dir):
    # The session now loads the base model itself; the trainer called directly must behave as before.
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, train={"max_steps": 2}))
    run_dir = train(cfg)
    assert (run_dir / f"{run_dir.name}.safetensors").is_file()
    assert os.path.isfile(run_dir / "loss.csv")


def test_a_loaded_page_gets_the_form_as_left_in_any_tab_or_a_later_runs_settings(tmp_path, instance_dir):
    """What a reload or a second tab shows: the dataset, preset and settings last left in any tab; once a run starts
    after that, the run's settings (and no preset name claiming them)."""
    from ui import main
    from ui.form import form_values

    app = main.build_app(workspace=tmp_path / "ws")
    ctx = app.ctx
    folder = ds.create_dataset(ctx.workspace, "rex")
    ds.add_images(folder, sorted(instance_dir.glob("*.png")))
    ds.create_dataset(ctx.workspace, "other")
    first = main.restore(ctx)  # nothing left yet and a workspace with datasets: the page's own start values
    assert first == {}

    left = {**{n: None for n in main.DRAFT}, "dataset": "rex", "preset": "sd15-loha", "max_steps": 123,
            "resolution": 64, "instance_prompt": "a photo of zxq dog", "class_prompt": "a photo of a dog"}
    main.remember(ctx, **left)
    again = main.restore(ctx)
    assert again["dataset"]["value"] == "rex" and again["preset"] == "sd15-loha" and again["max_steps"] == 123
    assert again["instance_prompt"] == "a photo of zxq dog"  # as typed, over what the dataset remembers
    assert "3 usable images" in again["report"]

    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, train={"max_steps": 2}))
    ctx.session.start(cfg)
    assert ctx.session.wait(120) == "finished"
    after_run = main.restore(ctx)
    assert after_run["preset"] is None and after_run["max_steps"] == form_values(cfg.to_dict())["max_steps"] == 2
    assert "dataset" not in after_run  # the run's images are not one of the workspace's datasets

    main.remember(ctx, **{**left, "dataset": "other"})  # edited after the run: the form wins again
    assert main.restore(ctx)["dataset"]["value"] == "other"


def test_a_form_event_that_arrives_after_start_is_no_edit(tmp_path, instance_dir):
    """The Start click and the last field's change event race: a draft saved after the start with the values the
    run was started with still gives the run's settings on reload; a real edit after the start gives the form."""
    from ui import main

    app = main.build_app(workspace=tmp_path / "ws")
    ctx = app.ctx
    left = {**{n: None for n in main.DRAFT}, "preset": "demo-lora", "max_steps": 100000, "resolution": 64}
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, train={"max_steps": 2}))
    ctx.session.start(cfg)
    ctx.started_form = {k: v for k, v in left.items() if k != "preset"}  # what train_tab.start keeps
    assert ctx.session.wait(120) == "finished"
    main.remember(ctx, **left)  # the late change event: the same values
    assert main.restore(ctx)["preset"] is None
    main.remember(ctx, **{**left, "max_steps": 7})  # an edit after the start
    restored = main.restore(ctx)
    assert restored["preset"] == "demo-lora" and restored["max_steps"] == 7


def test_samples_show_newest_first_then_the_baseline():
    from ui.train_tab import SAMPLES_SHOWN, samples_value

    samples = [(step, f"s{step}_{i}.png", p) for step in range(0, 50 * (SAMPLES_SHOWN + 2), 50)
               for i, p in enumerate(("a photo of sks dog", "a photo of a dog"))]
    shown = samples_value(samples)
    captions = [caption for _, caption in shown]
    newest = max(step for step, _, _ in samples)
    assert captions[:2] == [f"step {newest}: a photo of sks dog", f"step {newest}: a photo of a dog"]
    assert captions[-2:] == ["step 0: a photo of sks dog", "step 0: a photo of a dog"]
    assert len(shown) == SAMPLES_SHOWN + 2


def test_a_pasted_word_makes_the_instance_prompt_but_a_written_prompt_stays(tmp_path):
    """Leaving the identifier / class-noun box (a paste fires no input event) makes the prompt from the words when
    it is empty or still made from the earlier words; a prompt the user wrote is kept."""
    from ui import dataset_tab, main

    ctx = main.build_app(workspace=tmp_path / "ws").ctx
    ds.create_dataset(ctx.workspace, "rex")
    out = dataset_tab.follow_words(ctx, "rex", "sks", "dog", "")
    assert out["instance_prompt"] == "a photo of sks dog" and out["class_prompt"] == "a photo of a dog"
    assert dataset_tab.follow_words(ctx, "rex", "sks", "dog", "a photo of sks dog") == {}  # nothing changed
    out = dataset_tab.follow_words(ctx, "rex", "sks", "cat", "a photo of sks dog")  # the noun replaced by a paste
    assert out["instance_prompt"] == "a photo of sks cat"
    assert dataset_tab.follow_words(ctx, "rex", "sks", "bird", "sks cat wearing a hat, studio light") == {}
    assert ds.read_manifest(ds.dataset_dir(ctx.workspace, "rex"))["class_noun"] == "cat"
