"""Bad settings are refused with the config key named, in the app and on the command line.

Wrong types, unknown keys and out-of-range values (rank 0, a negative learning rate, a resolution that is not a
multiple of 8...) reach the config through three doors: the app's form (Start, the step maths, Save preset), the
presets the app loads, and the command line (`--set`, `--config`). Each names the key and starts nothing.
The config's own checks are tested in test_config.py (test_wrong_types_name_the_key, test_validate_errors_name_the_key,
test_unknown_nested_key_names_the_dotted_key, test_load_config_rejects_unknown_preset_and_keys);
test_cli.py::test_errors_are_plain_and_exit_2 runs `--set train.bogus=1` through app.main.
"""
from __future__ import annotations

import os
import re

import pytest
from ui_helpers import sample_images, start_app, stop_app

from gradio_client.exceptions import AppError  # noqa: E402

BASE = dict(base_choice="tiny", resolution=32, instance_prompt="a photo of sks ball", rank=4, alpha=4,
            learning_rate=1e-3, max_steps=2, sample_every=0, checkpoint_every=0, prior_preservation=False)

# (form values that override BASE, the config key the refusal must name)
BAD_FORMS = [
    ({"rank": 0}, "adapter.rank"),
    ({"rank": -4}, "adapter.rank"),
    ({"learning_rate": -1}, "train.learning_rate"),
    ({"learning_rate": 0}, "train.learning_rate"),
    ({"resolution": 500}, "data.resolution"),
    ({"resolution": 0}, "data.resolution"),
    ({"max_steps": 0}, "train.max_steps"),
    ({"batch_size": 0}, "train.batch_size"),
    ({"dropout": 1.5}, "adapter.dropout"),
    ({"lr_warmup_steps": -1}, "train.lr_warmup_steps"),
    ({"rank": "abc"}, "adapter.rank"),  # text where a number goes
    ({"rank": 2.5}, "adapter.rank"),  # not a whole number
    ({"max_steps": True}, "train.max_steps"),
    ({"max_steps": None}, "train.max_steps"),  # an emptied field
    ({"learning_rate": "fast"}, "train.learning_rate"),
    ({"text_encoder_learning_rate": "abc"}, "train.text_encoder_learning_rate"),
    ({"text_encoder_learning_rate": -1e-4}, "train.text_encoder_learning_rate"),
    ({"text_encoder_rank": -4}, "adapter.text_encoder_rank"),
    ({"text_encoder_alpha": -1}, "adapter.text_encoder_alpha"),
    ({"alpha": [1]}, "adapter.alpha"),
    ({"adapter_type": "oft"}, "adapter.type"),
    ({"lr_scheduler": "sometimes"}, "train.lr_scheduler"),
    ({"train_text_encoder": "yes"}, "adapter.train_text_encoder"),
    ({"unet_targets": ""}, "adapter.unet_targets"),
    ({"base_choice": "sd99"}, "model.base"),
    ({"run_name": "../elsewhere"}, "output.name"),
]
BAD_PRESETS = {  # user presets in the workspace (hand-edited), and the key each one gets wrong
    "typo": ("adapter:\n  rnak: 4\n", "adapter.rnak"),
    "rank-zero": ("adapter:\n  rank: 0\n", "adapter.rank"),
    "odd-size": ("data:\n  resolution: 500\n", "data.resolution"),
    "lr-text": ("train:\n  learning_rate: fast\n", "train.learning_rate"),
    "new-section": ("optimiser:\n  lr: 1\n", "optimiser"),
}


def names_the_key(text: str, key: str) -> bool:
    return f"`{key}`" in text


def names_the_field(text: str, key: str) -> bool:
    """In the app: the field the user sees (its label), then the config key."""
    from ui.form import LABELS

    return names_the_key(text, key) and (key not in LABELS or f"{LABELS[key]} (`{key}`)" in text)


def test_app_messages_name_the_field_then_the_key():
    from ui.form import LABELS, in_field_names

    LABELS.setdefault("train.learning_rate", "Learning rate")
    assert in_field_names("`train.learning_rate` must be positive, got 0.") == \
        "Learning rate (`train.learning_rate`) must be positive, got 0."
    assert in_field_names("needs a class prompt (model.base).") == "needs a class prompt (Base model: `model.base`)."
    assert in_field_names("`no.such_key` and `a photo of a dog` stay") == "`no.such_key` and `a photo of a dog` stay"


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    ws = tmp_path_factory.mktemp("workspace")
    (ws / "presets").mkdir()
    for name, (body, _) in BAD_PRESETS.items():  # there before the app starts, so they are in the preset list
        (ws / "presets" / f"{name}.yaml").write_text(f"version: 1\n{body}")
    app = start_app(ws)
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def client(ui):
    c = ui.client()
    ui.call(c, "create_dataset", new_name="ball", resolution=32)
    out = ui.call(c, "add_folder", dataset="ball", folder=str(sample_images(ui.workspace.parent / "photos")),
                  resolution=32)
    assert out["add_msg"].startswith("Added 3 images.")
    return c


def listing(ui) -> dict[str, list[str]]:
    return {sub: sorted(p.name for p in (ui.workspace / sub).iterdir()) if (ui.workspace / sub).is_dir() else []
            for sub in ("runs", "presets")}


def test_the_base_settings_are_accepted(ui, client):
    """So that each refusal below is the bad value's doing."""
    maths = ui.call(client, "step_maths", dataset="ball", **BASE)["maths"]
    assert "3 images" in maths and "Check the settings" not in maths
    saved = ui.call(client, "save_preset", preset_name="fine", **BASE)
    assert saved["preset"]["value"] == "fine" and (ui.workspace / "presets" / "fine.yaml").is_file()


@pytest.mark.parametrize("bad, key", BAD_FORMS, ids=[f"{k}={v!r}" for k, v in (next(iter(b.items())) for b, _ in BAD_FORMS)])
def test_a_bad_form_value_is_refused_naming_the_key(ui, client, bad, key):
    before = listing(ui)
    values = dict(BASE, **bad)
    with pytest.raises(AppError) as start:
        ui.call(client, "start_training", dataset="ball", **values)
    assert names_the_field(str(start.value), key), str(start.value)
    with pytest.raises(AppError) as save:
        ui.call(client, "save_preset", preset_name="bad", **values)
    assert names_the_field(str(save.value), key), str(save.value)
    # The step maths, redrawn while the user types, says what to fix instead of the sums (no pop-up: Start gives
    # the one pop-up).
    maths = ui.call(client, "step_maths", dataset="ball", **values)["maths"]
    assert maths.startswith("**Check the settings:**") and names_the_field(maths, key), maths
    assert "Something went wrong" not in str(start.value) + str(save.value)
    assert ui.ctx.session.snapshot()["state"] == "idle"
    assert listing(ui) == before  # no run folder, no preset file


def refused_numbers():
    """(field name, value) for a 0 and a -1 in every number field of the form that the config refuses."""
    from pathlib import Path

    from core.errors import UserError
    from ui.form import FIELDS, NUMBER_KINDS, form_config

    out = []
    for f in FIELDS:
        for value in (0, -1) if f.kind in NUMBER_KINDS else ():
            try:
                form_config(dict(BASE, **{f.name: value}), Path("."))
            except UserError:
                out.append((f.name, value))
    return out


def test_a_zero_or_negative_number_gives_one_message(ui, client):
    """While typing, the views redrawn on a change (step maths, class images, dataset report) show the problem;
    only Start pops up."""
    refused = refused_numbers()
    names = {name for name, _ in refused}
    assert {"max_steps", "learning_rate", "resolution", "rank", "batch_size", "class_steps"} <= names
    assert ("max_steps", 0) in refused and ("learning_rate", 0) in refused
    assert ("text_encoder_learning_rate", -1) in refused and ("text_encoder_rank", -1) in refused
    class_fields = dict(class_prompt="a photo of a ball", num_class_images=2, class_steps=2, class_guidance=7.5,
                        class_seed=0, class_batch_size=2, class_negative_prompt="")
    for name, value in refused:
        values = dict(BASE, **{name: value})
        maths = ui.call(client, "step_maths", dataset="ball", **values)["maths"]
        assert maths.startswith("**Check the settings:**") and "steps." not in maths, (name, maths)
        if name in class_fields or name == "resolution":
            view = ui.call(client, "class_view", **{**class_fields, "base_choice": "tiny", "base_other": "",
                                                    "resolution": 32, name: value})
            assert view["class_info"].startswith("**Check the settings:**"), (name, view)
        if name == "resolution":
            report = ui.call(client, "dataset_view", dataset="ball", resolution=value)["report"]
            assert "Check the settings:** The training resolution must be a positive multiple of 8" in report
        with pytest.raises(AppError, match="must"):
            ui.call(client, "start_training", dataset="ball", **values)


def test_choosing_other_base_model_waits_for_start(ui, client):
    """Choosing "Other" (its path not typed yet) redraws the step maths and the class images view: they say what
    is missing; the pop-up comes only from Start or Generate."""
    other = dict(base_choice="other", base_other="")
    maths = ui.call(client, "step_maths", dataset="ball", **dict(BASE, **other))["maths"]
    assert maths.startswith("**Check the settings:** Enter the other base model")
    view = ui.call(client, "class_view", class_prompt="a photo of a ball", num_class_images=2, resolution=32, **other)
    assert "Enter the other base model" in view["class_info"] and view["class_gallery"] == []
    with pytest.raises(AppError, match="Enter the other base model"):
        ui.call(client, "class_generate", class_prompt="a photo of a ball", num_class_images=2, resolution=32, **other)
    with pytest.raises(AppError, match="Enter the other base model"):
        ui.call(client, "start_training", dataset="ball", **dict(BASE, **other))
    path = dict(base_choice="other", base_other=str(ui.workspace / "models" / "mine.safetensors"))
    view = ui.call(client, "class_view", class_prompt="a photo of a ball", num_class_images=2, resolution=32, **path)
    assert "**0 of 2**" in view["class_info"] and "mine" in view["class_info"]


@pytest.mark.parametrize("name", list(BAD_PRESETS))
def test_a_bad_user_preset_is_refused_naming_the_key(ui, client, name):
    key = BAD_PRESETS[name][1]
    with pytest.raises(AppError) as info:
        ui.call(client, "load_preset", preset=name)
    assert names_the_key(str(info.value), key), str(info.value)
    assert ui.call(client, "load_preset", preset="fine")["max_steps"] == BASE["max_steps"]  # a good one still loads


# --------------------------------------------------------------------------- the command line (in-process: fast)

BAD_SETS = [
    ("adapter.rank=0", "adapter.rank"),
    ("train.learning_rate=-1", "train.learning_rate"),
    ("data.resolution=500", "data.resolution"),
    ("nosuch.key=1", "nosuch"),
    ("adapter.nosuch=1", "adapter.nosuch"),
    ("adapter.rank=abc", "adapter.rank"),
    ("adapter.rank=1.5", "adapter.rank"),
    ("train.max_steps=[1, 2]", "train.max_steps"),
    ("adapter.type=oft", "adapter.type"),
    ("data.center_crop=maybe", "data.center_crop"),
    ("output.name=../elsewhere", "output.name"),
]


def run_cli(argv, capsys) -> tuple[int, str]:
    import app

    code = app.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def train_args(tmp_path, instance_dir):
    return ["train", "--preset", "demo-lora", "--set", f"data.instance_dir={instance_dir}",
            "--set", f"output.dir={tmp_path / 'runs'}"]


@pytest.mark.parametrize("setting, key", BAD_SETS, ids=[s for s, _ in BAD_SETS])
def test_cli_set_refuses_a_bad_value_naming_the_key(setting, key, train_args, tmp_path, capsys):
    code, err = run_cli([*train_args, "--set", setting], capsys)
    assert code == 2 and names_the_key(err, key), err
    assert err.startswith("Error: ") and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # no run folder


@pytest.mark.parametrize("body, key", [
    ("adapter:\n  rnak: 4\n", "adapter.rnak"),
    ("preset: demo-lora\ntrain:\n  learnig_rate: 0.001\n", "train.learnig_rate"),
    ("preset: demo-lora\ntrain:\n  learning_rate: fast\n", "train.learning_rate"),
    ("data:\n  resolution: 500\n", "data.resolution"),
    ("adapter: 4\n", "adapter"),
    ("optimiser:\n  lr: 1\n", "optimiser"),
], ids=["unknown-key", "typo-over-preset", "wrong-type", "out-of-range", "not-a-section", "unknown-section"])
def test_cli_config_file_with_a_bad_key_is_refused_naming_it(body, key, tmp_path, instance_dir, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(body)
    argv = ["--config", path, "--set", f"data.instance_dir={instance_dir}", "--set", f"output.dir={tmp_path / 'runs'}"]
    for command in ("train", "class-images"):
        code, err = run_cli([command, *argv], capsys)
        assert code == 2 and names_the_key(err, key), (command, err)
        assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "class_images").exists()


def test_cli_unknown_preset_is_refused(tmp_path, capsys):
    code, err = run_cli(["train", "--preset", "no-such-preset", "--set", f"output.dir={tmp_path / 'runs'}"], capsys)
    assert code == 2 and re.search(r"No preset named 'no-such-preset'\. Presets: .*demo-lora", err), err
    assert not (tmp_path / "runs").exists()


def test_step_maths_says_a_full_size_model_is_far_too_slow_on_the_cpu(ui, client, monkeypatch):
    """Not 'about 3 minutes' for an SD 1.5 model on a CPU: hours, and a plain word that the CPU is far too slow."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle CPU
    sd = dict(BASE, base_choice="other", base_other="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=512,
              max_steps=400)
    maths = ui.call(client, "step_maths", dataset="ball", **sd)["maths"]
    assert re.search(r"Estimated training time: \*\*about \d+ h \d\d min\*\*", maths), maths
    assert "No NVIDIA GPU was found" in maths and "far too slowly" in maths
    demo = ui.call(client, "step_maths", dataset="ball", **dict(BASE, base_choice="demo", resolution=64))["maths"]
    assert "far too slowly" not in demo and " h " not in demo.split("Estimated training time")[1].split(")")[0]


def test_the_demo_runs_first_estimate_is_near_what_it_takes(ui, client, monkeypatch):
    """Before any run, the demo-lora preset's 300 steps at batch 4 on an idle 2-core CPU: the guess is the measured
    order (about 45-70 s on 2 cores, README), not the many minutes an older guess promised."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    demo = dict(BASE, base_choice="demo", resolution=64, batch_size=4, max_steps=300)
    maths = ui.call(client, "step_maths", dataset="ball", **demo)["maths"]
    assert "(a rough guess" in maths and 30 <= estimate_seconds(maths) <= 90, maths


def estimate_seconds(maths: str) -> int:
    """The step maths' "Estimated training time: **about 1 min 05 s**" in seconds."""
    found = re.search(r"Estimated training time: \*\*about (?:(\d+) min )?(\d+) s\*\*", maths)
    assert found, maths
    return int(found.group(1) or 0) * 60 + int(found.group(2))


def test_step_maths_guess_allows_for_a_busy_cpu(ui, client, monkeypatch):
    """The first estimate on a CPU (nothing measured yet) grows with what other programs take of it, and says so."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    demo = dict(BASE, base_choice="demo", resolution=64, max_steps=300)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    idle = ui.call(client, "step_maths", dataset="ball", **demo)["maths"]
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0 * (os.cpu_count() or 1),) * 3)  # 3 programs per core
    busy = ui.call(client, "step_maths", dataset="ball", **demo)["maths"]
    assert "busy with other programs (about 75% of it in use now)" in busy and "busy" not in idle
    assert 3.5 * estimate_seconds(idle) <= estimate_seconds(busy) <= 4.5 * estimate_seconds(idle), (idle, busy)


def test_step_maths_names_the_model_family_and_a_too_low_resolution(ui, client, tmp_path):
    """A real SDXL base (here a folder with SDXL's configs) is named, and 512 px is called out as too low for it."""
    from core.families.sdxl_parts import build_tiny_sdxl, save_sdxl_folder

    folder = save_sdxl_folder(build_tiny_sdxl(), tmp_path / "my-sdxl")
    xl = dict(BASE, base_choice="other", base_other=str(folder))
    low = ui.call(client, "step_maths", dataset="ball", **dict(xl, resolution=512))["maths"]
    assert "**Base model:** Stable Diffusion XL. It was trained at 1024 px" in low
    right = ui.call(client, "step_maths", dataset="ball", **dict(xl, resolution=1024))["maths"]
    assert "**Base model:** Stable Diffusion XL." in right and "draws poorly" not in right
    demo = ui.call(client, "step_maths", dataset="ball", **dict(BASE, base_choice="demo", resolution=64))["maths"]
    assert "Base model:" not in demo  # the demo's size is its own
