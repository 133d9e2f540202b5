"""The run-folder layout in one place: paths, checkpoints, the list of runs, the saved config."""
from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from core.config import Config
from core.errors import ConfigError
from core.rundir import RunDir, list_runs, load_run_config


def test_layout_paths(tmp_path):
    run = RunDir(tmp_path / "rex-v1")
    assert run.config == tmp_path / "rex-v1" / "config.yaml" and run.losses.name == "loss.csv"
    assert run.adapter == tmp_path / "rex-v1" / "rex-v1.safetensors"
    assert run.sample(12, 1) == tmp_path / "rex-v1" / "samples" / "step_000012_1.png"
    ckpt = run.checkpoint(40)
    assert ckpt.path == tmp_path / "rex-v1" / "checkpoints" / "step_000040" and ckpt.step == 40
    assert (ckpt.adapter.name, ckpt.state.name, ckpt.info.name) == ("adapter.safetensors", "state.pt", "state.json")
    assert RunDir(str(tmp_path / "rex-v1")) == run and str(run) == str(tmp_path / "rex-v1")


def test_create_read_config_and_list_runs(tmp_path, instance_dir):
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir))
    run = RunDir(tmp_path / "runs" / "b")
    assert not run.is_run() and not run.in_use()
    run.create(cfg)
    assert run.is_run() and run.in_use() and run.samples.is_dir() and run.checkpoints.is_dir()
    assert run.read_config() == cfg and load_run_config(run.path) == cfg
    (tmp_path / "runs" / "a").mkdir()  # no config.yaml: not a run
    RunDir(tmp_path / "runs" / "c").create(cfg)
    assert [r.name for r in list_runs(tmp_path / "runs")] == ["b", "c"]
    assert list_runs(tmp_path / "nothing-here") == []
    with pytest.raises(ConfigError, match="no config.yaml"):
        RunDir(tmp_path / "runs" / "a").read_config()


def test_latest_checkpoint_skips_half_written_ones(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.latest_checkpoint() is None  # no checkpoints folder yet
    for step, complete in ((5, True), (10, True), (15, False)):
        ckpt = run.checkpoint(step)
        ckpt.path.mkdir(parents=True)
        if complete:
            ckpt.info.write_text(json.dumps({"step": step}))
    (run.checkpoints / ".ckpt-partial").mkdir()  # a temp folder being written
    assert [c.step for c in run.all_checkpoints()] == [5, 10, 15]
    latest = run.latest_checkpoint()
    assert latest.step == 10 and latest.read_step() == 10
