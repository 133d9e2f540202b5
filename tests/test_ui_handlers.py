"""Each tab's main actions through `gradio_client`, against the app launched in-process on the tiny model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ui_helpers import launched_app, sample_images, wait_until

from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from safetensors import safe_open  # noqa: E402

from core import families  # noqa: E402
from ui import playground_tab  # noqa: E402

TINY = dict(base_choice="tiny", resolution=32)
CLASS = dict(class_prompt="a photo of a ball", num_class_images=2, class_steps=2, class_batch_size=2)
TRAIN = dict(TINY, **CLASS, instance_prompt="a photo of sks ball", rank=4, alpha=4, learning_rate=1e-3,
             sample_steps=2, sample_prompts="a photo of sks ball", checkpoint_every=0, prior_preservation=False)


ui = pytest.fixture(scope="module", name="ui")(launched_app)


@pytest.fixture(scope="module")
def client(ui):
    return ui.client()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return sample_images(tmp_path_factory.mktemp("photos"))


def make_dataset(ui, client, name, photos) -> dict:
    ui.call(client, "create_dataset", new_name=name, resolution=32)
    return ui.call(client, "add_folder", dataset=name, folder=str(photos), resolution=32)


# --------------------------------------------------------------------------- Dataset tab

def test_dataset_tab(ui, client, photos):
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    out = ui.call(client, "create_dataset", new_name="ball", resolution=32)
    assert out["dataset"]["value"] == "ball" and "Created dataset" in out["add_msg"]
    assert out["class_noun"] == "" and out["instance_prompt"] == "" and out["identifier"] == "sks"  # a new subject
    with pytest.raises(AppError, match="already exists"):
        ui.call(client, "create_dataset", new_name="ball", resolution=32)

    out = ui.call(client, "add_folder", dataset="ball", folder=str(photos), resolution=32)
    assert out["add_msg"].startswith("Added 3 images.")
    for name, why in (("notes.pdf", "not an image"), ("broken.jpg", "corrupt"), ("tiny.png", "too small")):
        assert f"{name}: {why}" in out["add_msg"]
    assert "3 usable images" in out["report"]
    assert [g["caption"] for g in out["gallery"]["value"]] == ["photo0.png", "photo1.png", "photo2.png"]
    assert len(out["crops"]) == 3  # the training crops, previewed
    assert out["captions"]["data"][1] == ["photo1.png", "a photo of sks ball on a table"]
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before  # originals untouched

    # Upload: a wide picture is reported as cropped at the chosen resolution.
    from PIL import Image

    wide = photos.parent / "upload" / "wide.png"
    wide.parent.mkdir(exist_ok=True)
    Image.new("RGB", (128, 64), (0, 90, 200)).save(wide)
    out = ui.call(client, "add_upload", dataset="ball", upload=[handle_file(str(wide))], resolution=32)
    assert out["add_msg"] == "Added 1 image."
    assert "`wide.png` 128x64: the centre 64x64 square, scaled down to 32x32" in out["report"]

    out = ui.call(client, "build_prompt", dataset="ball", identifier="sks", class_noun="ball")
    assert out["instance_prompt"] == "a photo of sks ball" and out["class_prompt"] == "a photo of a ball"
    assert "single token" in out["token_info"]
    out = ui.call(client, "build_prompt", dataset="ball", identifier="mydog", class_noun="dog")
    assert "splits `mydog` into 2 pieces" in out["token_info"]
    words = ui.call(client, "suggest_identifiers")["suggestions"]["choices"]
    assert [w for w, _ in words][:2] == ["sks", "ohwx"]

    table = {"headers": ["file", "caption"],
             "data": [["photo0.png", "a photo of sks ball, red"], ["photo1.png", ""], ["photo2.png", ""],
                      ["wide.png", ""]]}
    out = ui.call(client, "save_captions", dataset="ball", captions=table, resolution=32)
    assert "2 caption files changed" in out["caption_msg"]
    assert "(1 with their own caption, 3 without one: those train on the instance prompt below)" in out["report"]  # the report follows the save
    folder = ui.workspace / "datasets" / "ball"
    assert (folder / "photo0.txt").read_text() == "a photo of sks ball, red\n" and not (folder / "photo1.txt").exists()

    view = ui.call(client, "dataset_view", dataset="ball", resolution=32)
    assert view["identifier"] == "mydog" and view["class_noun"] == "dog"  # settings remembered per dataset
    out = ui.call(client, "remove_images", dataset="ball", selected="wide.png", resolution=32)
    assert "Removed 1 image" in out["add_msg"] and "4 usable" not in out["report"]


def test_demo_subject_dataset(ui, client):
    out = ui.call(client, "demo_dataset", resolution=64)
    assert out["dataset"]["value"] == "demo-star" and out["instance_prompt"] == "a photo of tms star"
    assert "5 usable images" in out["report"] and out["class_prompt"] == "a photo of a star"


# --------------------------------------------------------------------------- Class images tab

def test_class_images_tab(ui, client):
    job = ui.ctx.class_job
    with pytest.raises(AppError, match="class prompt"):
        ui.call(client, "class_generate", **TINY, class_prompt=" ")
    out = ui.call(client, "class_generate", **TINY, **dict(CLASS, num_class_images=3))
    assert "Generating" in out["class_progress"]
    assert job.wait(60) == "finished"
    view = ui.call(client, "class_view", **TINY, **dict(CLASS, num_class_images=3))
    assert "**3 of 3**" in view["class_info"] and len(view["class_gallery"]) == 3
    folder = Path(job.snapshot()["folder"])
    out = ui.call(client, "class_reject", class_selected="class_00001.png", **TINY, **dict(CLASS, num_class_images=3))
    assert out["class_selected"] == ""
    assert job.wait(60) == "finished"
    names = sorted(p.name for p in folder.glob("class_*.png"))
    assert names == ["class_00000.png", "class_00002.png", "class_00003.png"]  # topped up with a new seed
    assert (folder / "rejected" / "class_00001.png").is_file()
    # Cached per base model and prompt: another prompt is another (empty) set.
    other = ui.call(client, "class_view", **TINY, **dict(CLASS, class_prompt="a photo of a cube"))
    assert "**0 of 2**" in other["class_info"]


def test_a_rejected_caption_names_its_set():
    from ui.class_tab import selected_by_size

    sets = [((48, 80), 3), ((80, 48), 2)]
    picked = selected_by_size(["48x80 · class_00001.png", "80x48 · class_00000.png", "64x64 · class_00000.png",
                               "class_00002.png", "../48x80 · x.png"], sets)
    assert picked == {(48, 80): ["class_00001.png"], (80, 48): ["class_00000.png"]}  # no set of that size, no guess
    assert selected_by_size(["class_00002.png"], sets[:1]) == {(48, 80): ["class_00002.png"]}  # the only set


def mixed_photos(folder: Path) -> Path:
    """Three portraits, two landscapes and a square photo: at 64 px and bucket step 16, buckets 48x80 (3),
    80x48 (2) and 64x64 (1)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate([(96, 160), (100, 170), (90, 150), (160, 96), (170, 100), (96, 96)]):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"m{i}.png")
    return folder


def test_class_images_tab_makes_the_sets_training_uses(ui, client, tmp_path):
    """With a mixed dataset the tab makes class images per bucket, in proportion; training then generates none;
    rejecting one image of one bucket tops up that bucket alone."""
    job, s = ui.ctx.class_job, ui.ctx.session
    shape = dict(TINY, resolution=64, bucket_step=16)
    ui.call(client, "create_dataset", new_name="mixed-set", resolution=64, bucket_step=16)
    ui.call(client, "add_folder", dataset="mixed-set", folder=str(mixed_photos(tmp_path / "mixed")),
            resolution=64, bucket_step=16)
    klass = dict(CLASS, class_prompt="a photo of a mixed ball", num_class_images=6)
    ui.call(client, "class_generate", dataset="mixed-set", **shape, **klass)
    assert job.wait(120) == "finished" and (job.snapshot()["done"], job.snapshot()["total"]) == (6, 6)
    view = ui.call(client, "class_view", dataset="mixed-set", **shape, **klass)
    assert "**6 of 6**" in view["class_info"] and "48x80: 3 of 3, 80x48: 2 of 2, 64x64: 1 of 1" in view["class_info"]
    captions = sorted(g["caption"] for g in view["class_gallery"])
    assert captions == ["48x80 · class_00000.png", "48x80 · class_00001.png", "48x80 · class_00002.png",
                        "64x64 · class_00000.png", "80x48 · class_00000.png", "80x48 · class_00001.png"]
    folders = [Path(f) for f in job.snapshot()["folders"]]
    for folder, (w, h), n in zip(folders, [(48, 80), (80, 48), (64, 64)], [3, 2, 1]):
        images = [Image.open(p) for p in sorted(folder.glob("class_*.png"))]
        assert len(images) == n and all(im.size == (w, h) for im in images)

    # Start finds every set it needs: nothing more is generated.
    ui.call(client, "start_training", dataset="mixed-set", **dict(TRAIN, **shape, **klass, prior_preservation=True),
            max_steps=2, sample_every=0, run_name="mixed-run")
    assert s.wait(120) == "finished"
    logs = "\n".join(s.snapshot()["logs"])
    assert "Buckets: 48x80: 3 images" in logs and "Generating" not in logs

    before = {f: sorted(p.name for p in f.glob("class_*.png")) for f in folders}
    ui.call(client, "class_reject", class_selected="80x48 · class_00001.png", dataset="mixed-set", **shape,
            **klass)
    assert job.wait(120) == "finished" and job.snapshot()["total"] == 1  # that bucket's one image only
    after = {f: sorted(p.name for p in f.glob("class_*.png")) for f in folders}
    assert after[folders[1]] == ["class_00000.png", "class_00002.png"]
    assert (folders[1] / "rejected" / "class_00001.png").is_file()
    assert after[folders[0]] == before[folders[0]] and after[folders[2]] == before[folders[2]]


# --------------------------------------------------------------------------- Train tab + playground ("pause and test")

def test_train_tab_live_run_pause_test_resume_stop(ui, client, photos):
    make_dataset(ui, client, "train-set", photos)
    maths = ui.call(client, "step_maths", dataset="train-set", **TRAIN, max_steps=30, batch_size=1, repeats=2)
    assert "3 images × 2 repeats × 5.0 epochs ÷ batch 1 = 30 steps" in maths["maths"]
    assert "Estimated training time" in maths["maths"]
    assert "Expected GPU memory: about" in maths["maths"] and "No NVIDIA GPU found" in maths["maths"]

    with pytest.raises(AppError, match="No dataset chosen"):
        ui.call(client, "start_training", dataset=None, **TRAIN)
    out = ui.call(client, "start_training", dataset="train-set", **TRAIN, max_steps=100000, sample_every=5)
    assert "Training" in out["train_status"]
    with pytest.raises(AppError, match="already in progress"):
        ui.call(client, "start_training", dataset="train-set", **TRAIN)

    s = ui.ctx.session
    wait_until(lambda: s.snapshot()["step"] >= 6 and len(s.snapshot()["samples"]) >= 2, what="steps and samples")
    poll = ui.call(client, "train_poll")
    assert len(poll["loss_plot"]["data"]) >= 12  # raw and smoothed points
    assert {row[2] for row in poll["loss_plot"]["data"]} == {"loss", "smoothed"}
    steps = [int(g["caption"].split(":")[0].removeprefix("step ")) for g in poll["samples"]]
    assert steps == sorted(steps, reverse=True) and steps[0] > 0 == steps[-1]  # newest first, the baseline last
    assert "step " in poll["train_status"] and "it/s" in poll["train_status"] or "s/step" in poll["train_status"]

    ui.call(client, "pause")
    wait_until(lambda: s.snapshot()["state"] == "paused", what="pause")
    paused_step = s.snapshot()["step"]
    n_samples = len(s.snapshot()["samples"])
    ui.call(client, "sample_now")
    wait_until(lambda: len(s.snapshot()["samples"]) > n_samples, what="sample now")

    offered = {value: label for label, value in ui.call(client, "playground_adapters")["adapter_1"]["choices"]}
    assert offered["live"] == "Live: the paused training run"  # offered while paused
    with pytest.raises(AppError, match="Choose a saved adapter"):  # ...for generating, not for files
        ui.call(client, "export_adapter", adapter_1="live")
    with pytest.raises(AppError, match="live run cannot be merged"):
        ui.call(client, "merge_adapters", merge_into="lora", merge_name="x", merge_rank=0, pg_base_choice="tiny",
                adapter_1="live", weight_1=1.0)
    assert ui.call(client, "adapter_info", adapter_1="live")["adapter_info"] == ""  # nothing to describe yet
    polled = playground_tab.note(ui.ctx, ("running", 0))  # an open tab learns it from its poll
    assert "paused at step" in polled["live_note"]
    assert all(("Live: the paused training run", "live") in polled[slot]["choices"] for slot in playground_tab.SLOT_NAMES)
    pg = dict(pg_base_choice="tiny", pg_prompt="a photo of sks ball", pg_steps=2, pg_seed=5)
    out = ui.call(client, "playground_generate", **pg, adapter_1="live", weight_1=1.0)
    assert Path(out["pg_image"]).is_file() and "live run ×1" in out["pg_info"]
    compared = ui.call(client, "playground_compare", **pg, adapter_1="live", weight_1=0.8)
    assert "pg_info" not in compared and "live run ×0.8" in compared["pg_grid_info"]  # the Result's caption stays
    grid = compared["pg_grid"]
    assert [g["caption"] for g in grid] == ["adapters off", "strength ×0.25", "strength ×0.5", "strength ×0.75",
                                            "strength ×1 (as set)", "strength ×1.25"]
    assert s.snapshot()["step"] == paused_step  # testing did not move training on
    with pytest.raises(AppError, match="trains on the base model 'tiny'"):
        ui.call(client, "playground_generate", **dict(pg, pg_base_choice="other", pg_base_other="/nowhere/x"),
                adapter_1="live")

    # A new client (a reloaded browser tab) re-attaches with the whole history.
    fresh = ui.call(ui.client(), "train_poll")
    assert len(fresh["loss_plot"]["data"]) == 2 * paused_step and "Paused" in fresh["train_status"]

    ui.call(client, "resume")
    wait_until(lambda: s.snapshot()["step"] > paused_step + 2, what="training to go on")
    polled = playground_tab.note(ui.ctx, ("paused", paused_step), adapter_1="live", adapter_2="")
    assert all(value != "live" for _, value in polled["adapter_1"]["choices"])  # withdrawn once it runs again
    assert polled["adapter_1"]["value"] == "" and "value" not in polled["adapter_2"]  # the slot holding it emptied
    ui.call(client, "save_now")
    wait_until(lambda: s.snapshot()["checkpoints"], what="save now")
    ui.call(client, "stop")
    assert s.wait(60) == "stopped"
    final = ui.call(client, "train_poll")
    assert "Stopped" in final["train_status"] and Path(s.snapshot()["adapter_path"]).is_file()
    with pytest.raises(AppError, match="No training run is paused"):
        ui.call(client, "playground_generate", **pg, adapter_1="live")


def test_training_errors_show_in_plain_words(ui, client, photos):
    s = ui.ctx.session
    ui.call(client, "start_training", dataset="train-set", **dict(TRAIN, base_choice="other",
                                                                    base_other="/no/such/model.safetensors"))
    assert s.wait(60) == "failed"
    poll = ui.call(ui.client(), "train_poll")  # a fresh page: everything is sent
    assert "Base model file or folder not found: /no/such/model.safetensors" in poll["train_error"]
    with pytest.raises(AppError, match="Prior preservation needs a class prompt"):
        ui.call(client, "start_training", dataset="train-set", **dict(TRAIN, prior_preservation=True, class_prompt=""))
    import torch

    if not torch.cuda.is_available():  # the trainer's precision check, made at Start (preflight)
        with pytest.raises(AppError, match="fp16 needs an NVIDIA GPU"):
            ui.call(client, "start_training", dataset="train-set", **dict(TRAIN, mixed_precision="fp16"))
        assert s.snapshot()["state"] == "failed"  # no run was started: the last one's record stays


def test_presets(ui, client):
    out = ui.call(client, "load_preset", preset="sd15-loha")
    assert out["adapter_type"] == "loha" and out["resolution"] == 512 and out["base_choice"] == "other"
    assert out["base_other"] == "stable-diffusion-v1-5/stable-diffusion-v1-5" and out["train_text_encoder"] is True
    assert "Loaded preset **sd15-loha**: LoHa r8 on SD 1.5" in out["preset_msg"]  # the preset's own description
    saved = ui.call(client, "save_preset", preset_name="quick", **dict(TRAIN, max_steps=77, adapter_type="lokr"))
    assert saved["preset"]["value"] == "quick" and (ui.workspace / "presets" / "quick.yaml").is_file()
    back = ui.call(client, "load_preset", preset="quick")
    assert back["max_steps"] == 77 and back["adapter_type"] == "lokr" and back["base_choice"] == "tiny"
    assert "Loaded preset **quick**. Dataset" in back["preset_msg"]  # a saved preset has no description
    with pytest.raises(AppError, match="built-in preset"):
        ui.call(client, "save_preset", preset_name="sd15-lora")


# --------------------------------------------------------------------------- Playground tab

def test_playground_mixes_run_adapters(ui, client, photos):
    s = ui.ctx.session
    paths = []
    for kind in ("loha", "lora"):
        ui.call(client, "start_training", dataset="train-set", **dict(TRAIN, adapter_type=kind, max_steps=2,
                                                                        sample_every=0, run_name=f"mix-{kind}"))
        assert s.wait(60) == "finished"
        paths.append(s.snapshot()["adapter_path"])
        # the Train tab shows the run's end: instance and class prompt, adapter off / on
        strip = ui.call(ui.client(), "train_poll")["compare"]
        assert [g["caption"].rsplit("adapter ", 1)[1].split(" ")[0] for g in strip] == ["off", "on"] * 2
        assert all(Path(g["image"]).is_file() for g in strip)
    choices = ui.call(client, "playground_adapters")["adapter_1"]["choices"]
    offered = {value: label for label, value in choices}
    assert all(p in offered for p in paths) and "LoHa" in offered[paths[0]]
    assert "live" not in offered  # nothing is paused: the live adapter is not offered
    pg = dict(pg_base_choice="tiny", pg_prompt="a photo of sks ball", pg_steps=2)
    ui.call(client, "playground_generate", **pg, adapter_1=paths[0], weight_1=0.5)
    out = ui.call(client, "playground_generate", **pg, adapter_1=paths[0], weight_1=0.5, adapter_2=paths[1],
                  weight_2=1.2)  # a LoRA joining a LoHa: reloaded in the right order, the base model kept
    assert "mix-loha ×0.5, mix-lora ×1.2" in out["pg_info"]
    assert ui.ctx.playground.base_loads == 1
    with pytest.raises(AppError, match="chosen in two slots"):
        ui.call(client, "playground_generate", **pg, adapter_1=paths[0], adapter_2=paths[0])
    with pytest.raises(AppError, match="Choose at least one adapter"):
        ui.call(client, "playground_compare", **pg)

    out = ui.call(client, "import_adapter", import_file=handle_file(paths[1]))
    assert "Imported" in out["import_msg"]
    labels = [label for label, _ in out["adapter_1"]["choices"]]
    assert any(label.startswith("imported: mix-lora") for label in labels)
    with pytest.raises(AppError, match="already exists"):
        ui.call(client, "import_adapter", import_file=handle_file(paths[1]))

    # Export slot 1 for A1111 / ComfyUI: a downloadable file in the workspace's exports folder.
    out = ui.call(client, "export_adapter", adapter_1=paths[0])
    exported = ui.workspace / "exports" / "mix-loha-kohya.safetensors"
    assert exported.is_file() and "Exported" in out["import_msg"]
    with safe_open(str(exported), "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
    with pytest.raises(AppError, match="not in the list of choices"):  # not offered while nothing is paused
        ui.call(client, "export_adapter", adapter_1="live")

    # A community-format file (the export) imports too; the playground says what each chosen adapter is.
    out = ui.call(client, "import_adapter", import_file=handle_file(str(exported)))
    community = ui.workspace / "adapters" / "mix-loha-kohya.safetensors"
    assert "Imported" in out["import_msg"] and community.is_file()
    out = ui.call(client, "adapter_info", adapter_1=paths[0], adapter_2=str(community))
    lines = out["adapter_info"].splitlines()
    assert len(lines) == 2 and "LoHa rank" in lines[0] and "mix-loha-kohya.safetensors" in lines[1]
    assert "LoHa" in lines[1] and "steps" in lines[0]

    # Merge: the LoRA alone into one LoRA file (listed at once); LoHa + LoRA into a new model file.
    pg_base = dict(pg_base_choice="tiny", pg_base_other="")
    out = ui.call(client, "merge_adapters", merge_into="lora", merge_name="my mix", merge_rank=0, **pg_base,
                  adapter_1=paths[1], weight_1=0.6)
    merged_lora = ui.workspace / "adapters" / "my mix.safetensors"
    assert merged_lora.is_file() and "Saved" in out["merge_msg"]
    assert str(merged_lora) in {value for _, value in ui.call(client, "playground_adapters")["adapter_1"]["choices"]}
    with pytest.raises(AppError, match="only LoRAs merge"):
        ui.call(client, "merge_adapters", merge_into="lora", merge_name="bad", merge_rank=0, **pg_base,
                adapter_1=paths[0], weight_1=1.0)
    with pytest.raises(AppError, match="already exists"):
        ui.call(client, "merge_adapters", merge_into="lora", merge_name="my mix", merge_rank=0, **pg_base,
                adapter_1=paths[1], weight_1=1.0)
    with pytest.raises(AppError, match="cannot be a merged file name"):
        ui.call(client, "merge_adapters", merge_into="lora", merge_name="../up", merge_rank=0, **pg_base,
                adapter_1=paths[1], weight_1=1.0)
    out = ui.call(client, "merge_adapters", merge_into="single", merge_name="tiny-mix", merge_rank=0, **pg_base,
                  adapter_1=paths[0], weight_1=0.5, adapter_2=paths[1], weight_2=1.0)
    model_file = ui.workspace / "models" / "tiny-mix.safetensors"
    assert model_file.is_file() and str(model_file) in out["merge_msg"]
    out = ui.call(client, "playground_generate", **dict(pg, pg_base_choice="other", pg_base_other=str(model_file)))
    assert Path(out["pg_image"]).is_file()  # the merged model works as a base model


# --------------------------------------------------------------------------- SDXL through the same tabs

# what the kohya export of each family's adapter must hold: its ss_base_model_version, key prefixes it must have and
# ones it must not (SDXL: SGM UNet names, te1 / te2; FLUX: BFL names with fused qkv, te1 = CLIP-L)
EXPORTS = {"tiny-sdxl": ("sdxl_base_v1-0", ("lora_unet_input_blocks_", "lora_te1_", "lora_te2_"), ("down_blocks",)),
           "tiny-flux": ("flux1", ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1",
                                   "lora_te1_"), ("to_q", "lora_te2_"))}


@pytest.mark.parametrize("base", EXPORTS)
def test_sdxl_and_flux_bases_through_the_tabs(ui, client, photos, base):
    """An SDXL or FLUX base in the app: class images, training with prior preservation and samples, pause and test
    in the playground, export in the layout that family's adapters use elsewhere."""
    s = ui.ctx.session
    # the form starts from the demo preset, whose targets are a UNet's: FLUX's transformer needs its own
    targets = {"unet_targets": ", ".join(families.get("flux").default_targets)} if base == "tiny-flux" else {}
    xl = dict(TRAIN, base_choice=base, prior_preservation=True, train_text_encoder=True, **targets)
    make_dataset(ui, client, f"{base}-set", photos)
    ui.call(client, "class_generate", base_choice=base, resolution=32,
            **dict(CLASS, class_prompt="a photo of an xl ball"))
    assert ui.ctx.class_job.wait(120) == "finished"
    ui.call(client, "start_training", dataset=f"{base}-set", **dict(xl, class_prompt="a photo of an xl ball"),
            max_steps=100000, sample_every=3, run_name=f"{base}-run")
    wait_until(lambda: s.snapshot()["step"] >= 4 and len(s.snapshot()["samples"]) >= 2, what=f"{base} training")
    ui.call(client, "pause")
    wait_until(lambda: s.snapshot()["state"] == "paused", what="pause")
    offered = {value for _, value in ui.call(client, "playground_adapters")["adapter_1"]["choices"]}
    assert "live" in offered
    pg = dict(pg_base_choice=base, pg_prompt="a photo of sks ball", pg_steps=2, pg_seed=3)
    out = ui.call(client, "playground_generate", **pg, adapter_1="live", weight_1=1.0)
    assert Path(out["pg_image"]).is_file() and "live run ×1" in out["pg_info"]
    ui.call(client, "stop")
    assert s.wait(120) == "stopped"
    adapter = s.snapshot()["adapter_path"]
    ui.call(client, "playground_adapters")  # the lists, as opening the tab reads them
    ui.call(client, "export_adapter", adapter_1=adapter)
    exported = ui.workspace / "exports" / f"{Path(adapter).stem}-kohya.safetensors"
    with safe_open(str(exported), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    version, wanted, unwanted = EXPORTS[base]
    assert meta["ss_base_model_version"] == version
    assert all(any(k.startswith(w) for k in keys) for w in wanted)
    assert not any(u in k for k in keys for u in unwanted)
