"""Shared fixtures: small generated image folders and configs for the tiny in-code model."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

ADAPTER_TYPES = ["lora", "dora", "loha", "lokr"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine competing thread pools cost seconds per op."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def draw_subject(path: Path, i: int, size: int = 64) -> Path:
    """A red disc with a yellow bar, shifted a little per image: a 'subject' the tiny model can memorize."""
    img = Image.new("RGB", (size, size), (240, 240, 255))
    d = ImageDraw.Draw(img)
    o = 2 * i
    d.ellipse((8 + o, 8, 48 + o, 48), fill=(200, 30, 30))
    d.rectangle((20 + o, 24, 36 + o, 30), fill=(250, 220, 0))
    img.save(path)
    return path


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    folder = tmp_path / "instance"
    folder.mkdir()
    for i in range(3):
        draw_subject(folder / f"photo{i}.png", i)
    return folder


@pytest.fixture
def one_image_dir(tmp_path) -> Path:
    folder = tmp_path / "one"
    folder.mkdir()
    draw_subject(folder / "photo.png", 0)
    return folder


def tiny_config(tmp_path: Path, instance_dir: Path, **sections) -> dict:
    """A config dict for fast runs on the tiny model; `sections` are merged per section."""
    cfg = {
        "model": {"base": "tiny"},
        "data": {"instance_dir": str(instance_dir), "instance_prompt": "a photo of sks ball",
                 "class_prompt": "a photo of a ball", "num_class_images": 2, "resolution": 32, "class_steps": 2,
                 "class_batch_size": 2},
        "adapter": {"type": "lora", "rank": 4, "alpha": 4},
        "train": {"max_steps": 4, "batch_size": 1, "learning_rate": 1e-3, "sample_every": 0, "checkpoint_every": 0,
                  "sample_steps": 2, "prior_preservation": False},
        "output": {"dir": str(tmp_path / "workspace" / "runs")},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """Run `app.py ARGS` in this process: exit code (argparse's SystemExit included), stdout, stderr."""
    import app

    def run(*args) -> Result:
        capsys.readouterr()
        try:
            code = app.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need an NVIDIA GPU: without one they are left out (deselected), not skipped."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def frozen_weights(base, parts) -> dict:
    """Every weight of the base model's `parts` by its name before adapters were injected (adapter weights left
    out, peft's `.base_layer.` level removed), copied: to check that training changed none of them."""
    out = {}
    for part in parts:
        for name, t in getattr(base, part).state_dict().items():
            if not any(tag in name for tag in ("lora_", "hada_", "lokr_")):
                out[f"{part}.{name.replace('.base_layer.', '.')}"] = t.detach().clone()
    return out


def hub_cache_copy(folder, repo_id: str, hub, files) -> None:
    """Put `files` of a model `folder` into a Hugging Face cache at `hub` as repo `repo_id` (one snapshot that
    refs/main points at), the way a download would have left them."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(hub) / ("models--" + repo_id.replace("/", "--"))
    for name in files:
        (repo / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / name).write_bytes((Path(folder) / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@dataclass
class Resumed:
    """An uninterrupted run and the same run stopped part-way and resumed (see `stop_and_resume`)."""

    full: dict  # the uninterrupted run's adapter tensors
    resumed: dict  # the stopped-and-resumed run's adapter tensors
    stopped_events: list  # what the stopped run reported
    resumed_events: list  # what the resumed run reported
    run_dir: Path  # the stopped run's folder, which the resume continued
    full_dir: Path  # the uninterrupted run's folder


def stop_and_resume(make_config, stop_at: int) -> Resumed:
    """Train `make_config("full")` to its end; train `make_config("interrupted")`, send STOP when step `stop_at`
    is reported, and resume that run from its folder."""
    import queue

    from core import adapters
    from core.config import Config
    from core.events import STOP, Progress
    from core.rundir import load_run_config
    from core.trainer import train

    full_dir = train(Config.from_dict(make_config("full")))
    commands, stopped = queue.Queue(), []

    def emit(e):
        stopped.append(e)
        if isinstance(e, Progress) and e.step == stop_at:
            commands.put(STOP)

    part_dir = train(Config.from_dict(make_config("interrupted")), emit=emit, commands=commands)
    resumed_events: list = []
    resumed_dir = train(load_run_config(part_dir), emit=resumed_events.append, resume_dir=part_dir)
    assert resumed_dir == part_dir
    return Resumed(adapters.read_adapter(full_dir / "full.safetensors").tensors,
                   adapters.read_adapter(part_dir / "interrupted.safetensors").tensors, stopped, resumed_events,
                   part_dir, full_dir)
