"""Fault injection: a killed process, a full disk, an unwritable folder, the GPU out of memory.

Each test breaks a run the way the world does and checks the promise: the run folder is never corrupt,
what was saved stays loadable, the message says what to do, and resuming reaches the same result.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, tiny_config
from PIL import Image
from test_cli import ENV

from core import adapters, fileio
from core.config import Config
from core.errors import UserError
from core.events import CheckpointSaved, Failed
from core.models import build_tiny_model
from core.session import Session
from core.rundir import RunDir, load_run_config
from core.trainer import train

STEPS = 40  # long enough that every kill below lands before the end


def write_config(tmp_path: Path, instance_dir: Path, name: str) -> Path:
    cfg = tiny_config(tmp_path, instance_dir, output={"name": name},
                      train={"max_steps": STEPS, "checkpoint_every": 3, "keep_checkpoints": 2, "sample_every": 4})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "app.py"), *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "loss.csv"
    return [int(r["step"]) for r in csv.DictReader(path.read_text().splitlines())] if path.exists() else []


def assert_intact(run_dir: Path) -> int:
    """Every file a reader would open is whole; returns the newest checkpoint's step (0 if none)."""
    load_run_config(run_dir)  # config.yaml parses and validates
    steps = logged_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1)), steps  # no torn or duplicated loss rows
    for sample in (run_dir / "samples").glob("*.png"):
        with Image.open(sample) as img:
            img.load()
    for ckpt in (run_dir / "checkpoints").glob("step_*"):
        assert json.loads((ckpt / "state.json").read_text())["step"] == int(ckpt.name[5:])
        adapters.read_adapter(ckpt / "adapter.safetensors")
        torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    final = run_dir / f"{run_dir.name}.safetensors"
    if final.exists():
        adapters.read_adapter(final)
    newest = RunDir(run_dir).latest_checkpoint()
    return newest.step if newest else 0


def kill_when(proc: subprocess.Popen, run_dir: Path, at_step: int, timeout: float = 120) -> None:
    """SIGKILL `proc` once the run has logged `at_step` (loss rows are written at checkpoints) or has ended."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if max(logged_steps(run_dir) or [0]) >= at_step or (run_dir / f"{run_dir.name}.safetensors").exists():
            break
        time.sleep(0.01)
    time.sleep(random.random() * 0.3)  # land anywhere: in a step, a sample, a checkpoint being written
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_reaches_the_uninterrupted_result(tmp_path, instance_dir):
    random.seed(int(os.environ.get("FAULT_SEED", "7")))
    straight = start("train", "--config", write_config(tmp_path, instance_dir, "straight"))
    killed_dir = tmp_path / "workspace" / "runs" / "killed"
    proc = start("train", "--config", write_config(tmp_path, instance_dir, "killed"))
    kill_when(proc, killed_dir, random.randint(3, 8))
    kills = 1
    while not (killed_dir / "killed.safetensors").exists():
        assert kills < 8, "the run never finished"
        resumed_from = assert_intact(killed_dir)
        proc = start("train", "--resume", killed_dir)
        if kills < 3:
            kill_when(proc, killed_dir, min(STEPS, resumed_from + random.randint(1, 6)))
            kills += 1
        else:
            assert proc.wait(300) == 0, proc.stderr.read()
    assert straight.wait(300) == 0, straight.stderr.read()
    assert kills == 3  # three SIGKILLs at random moments, each followed by a resume
    assert_intact(killed_dir)
    assert logged_steps(killed_dir) == list(range(1, STEPS + 1))
    assert not list(killed_dir.rglob("*.tmp")) and not list(killed_dir.rglob(".ckpt-*"))  # leftovers cleaned
    a = adapters.read_adapter(tmp_path / "workspace" / "runs" / "straight" / "straight.safetensors")
    b = adapters.read_adapter(killed_dir / "killed.safetensors")
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        torch.testing.assert_close(a.tensors[key], b.tensors[key], atol=1e-6, rtol=1e-5)


def fail_writes_after(monkeypatch, n_ok: int, err: int = errno.ENOSPC) -> None:
    """Let `n_ok` atomic writes through, then fail every write like a full disk does."""
    real = fileio.atomic_path.__wrapped__
    count = {"n": 0}

    def atomic_path(path):
        count["n"] += 1
        if count["n"] > n_ok:
            raise OSError(err, os.strerror(err), str(path))
        return real(path)

    import contextlib

    monkeypatch.setattr(fileio, "atomic_path", contextlib.contextmanager(atomic_path))


def test_disk_full_during_the_run_keeps_earlier_checkpoints(tmp_path, instance_dir, monkeypatch):
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, output={"name": "full"},
                                       train={"max_steps": 40, "checkpoint_every": 5, "keep_checkpoints": 5}))
    events = []

    def emit(e):
        events.append(e)
        if isinstance(e, CheckpointSaved) and e.step == 10:
            fail_writes_after(monkeypatch, 0)  # the disk fills up after the second checkpoint

    with pytest.raises(UserError, match="disk is full") as err:
        train(cfg, emit=emit)
    assert "checkpoint of step 10 is kept" in str(err.value) and "resume" in str(err.value)
    assert isinstance(events[-1], Failed) and "disk is full" in events[-1].message
    run_dir = tmp_path / "workspace" / "runs" / "full"
    assert assert_intact(run_dir) == 10
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000005", "step_000010"]
    monkeypatch.undo()  # space freed: the run resumes from step 10 and finishes
    train(cfg, resume_dir=run_dir)
    assert logged_steps(run_dir) == list(range(1, 41))


def test_unwritable_or_full_output_folder_is_refused_before_the_run(tmp_path, instance_dir, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, output={"dir": str(blocker / "runs")}))
    events = []
    with pytest.raises(UserError, match="Cannot write in"):
        train(cfg, emit=events.append)
    assert not any(isinstance(e, CheckpointSaved) for e in events)
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, output={"dir": "/proc/no-such-folder/runs"}))
    with pytest.raises(UserError, match="Cannot use the output folder /proc/no-such-folder/runs"):
        train(cfg)
    # nearly no space left: refused with the numbers, before any step
    usage = type("Usage", (), {"free": 5 * 2 ** 20, "total": 2 ** 30, "used": 0})
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: usage)
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, output={"name": "tight"}))
    with pytest.raises(UserError, match="disk is full") as err:
        train(cfg, emit=events.append)
    assert "5 MiB free, about" in str(err.value) and "MiB needed" in str(err.value)
    assert "Progress" not in {type(e).__name__ for e in events}


def test_out_of_memory_stops_cleanly_keeps_the_checkpoint_and_the_app_goes_on(tmp_path, instance_dir):
    base = build_tiny_model()
    forward = base.unet.forward
    calls = {"n": 0}

    def sometimes_oom(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    base.unet.forward = sometimes_oom
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, output={"name": "oom"},
                                       train={"max_steps": 20, "checkpoint_every": 5}))
    session = Session()
    session.start(cfg, base=base)
    assert session.wait(120) == "failed"
    message = session.snapshot()["error"]
    assert "ran out of memory" in message and "low-VRAM preset" in message and "batch size" in message
    assert "checkpoint of step 5 is kept" in message
    run_dir = tmp_path / "workspace" / "runs" / "oom"
    assert assert_intact(run_dir) == 5
    # the app is still usable: the same session starts the next run and finishes it
    cfg2 = Config.from_dict(tiny_config(tmp_path, instance_dir, output={"name": "after"}))
    session.start(cfg2)
    assert session.wait(120) == "finished"
    assert Path(session.snapshot()["adapter_path"]).is_file()


@pytest.mark.slow
def test_the_apps_resume_continues_a_killed_run(tmp_path, instance_dir):
    """A run killed with the process (the app or the command line) shows up in the Train tab's stopped runs;
    Continue resumes it from its last checkpoint to the end."""
    from ui_helpers import start_app, stop_app

    cfg = tiny_config(tmp_path, instance_dir, output={"dir": str(tmp_path / "ws" / "runs"), "name": "crashed"},
                      train={"max_steps": STEPS, "checkpoint_every": 3})
    path = tmp_path / "crashed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "ws" / "runs" / "crashed"
    kill_when(start("train", "--config", path), run_dir, 7)
    resumed_from = assert_intact(run_dir)
    assert 0 < resumed_from < STEPS
    app = start_app(tmp_path / "ws")
    try:
        client = app.client()
        from ui.train_tab import resumable_runs

        assert resumable_runs(app.ctx) == ["crashed"]  # what the Train tab offers under "Stopped run"
        app.call(client, "continue_run", resume_run="crashed")
        assert app.ctx.session.wait(120) == "finished"
    finally:
        stop_app(app)
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    assert adapters.read_adapter(run_dir / "crashed.safetensors").metadata["steps"] == str(STEPS)
