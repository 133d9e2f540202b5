"""The command line through `app.main(argv)` in this process (what a subprocess would add is proven by the slow
tier: the two-process `accelerate launch` run here, and the SIGKILL tests in test_faults.py run app.py itself)."""
from __future__ import annotations

import csv
import os
import queue
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_config
from PIL import Image
from safetensors import safe_open

from core import adapters
from core.config import Config
from core.events import STOP, Progress
from core.trainer import train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def subprocess_cli(*args, timeout=300, cmd=None):
    cmd = cmd or [sys.executable, str(ROOT / "app.py")]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def write_config(tmp_path, instance_dir, **sections) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, instance_dir, **sections)))
    return path


def test_train_then_sample(tmp_path, instance_dir, cli):
    config = write_config(tmp_path, instance_dir, train={"max_steps": 3, "sample_every": 3})
    r = cli("train", "--config", config, "--set", "adapter.type=loha", "--set", "output.name=cli-run")
    assert r.returncode == 0, r.stderr
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    assert run_dir == tmp_path / "workspace" / "runs" / "cli-run"
    adapter = run_dir / "cli-run.safetensors"
    assert adapters.read_adapter(adapter).type == "loha"  # the --set override was applied
    assert len(list(csv.DictReader(open(run_dir / "loss.csv")))) == 3

    out = tmp_path / "out" / "image.png"
    r = cli("sample", "--base", "tiny", "--adapter", f"{adapter}@0.8", "--prompt", "a photo of sks ball",
            "--seed", 3, "--steps", 2, "--size", 32, "--out", out)
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    assert img.size == (32, 32) and img.text["prompt"] == "a photo of sks ball" and "@0.8" in img.text["adapters"]
    # Same seed, no adapter: a different image (the adapter does something at weight 0.8).
    plain = tmp_path / "plain.png"
    assert cli("sample", "--base", "tiny", "--prompt", "a photo of sks ball", "--seed", 3, "--steps", 2, "--size", 32,
               "--out", plain).returncode == 0
    assert Image.open(plain).tobytes() != img.tobytes()

    # Export for A1111 / ComfyUI; a bad format or a foreign file is a plain error (exit 2), nothing written.
    kohya = tmp_path / "export" / "cli-run-kohya.safetensors"
    r = cli("export", "--adapter", adapter, "--out", kohya)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == kohya
    with safe_open(str(kohya), "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
        assert any(k.endswith(".hada_w1_a") and k.startswith("lora_unet_") for k in f.keys())
    r = cli("sample", "--base", "tiny", "--adapter", f"{kohya}@0.8", "--prompt", "a photo of sks ball", "--seed", 3,
            "--steps", 2, "--size", 32, "--out", tmp_path / "kohya.png")  # a community-format file loads too
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "kohya.png").tobytes() == img.tobytes()  # the same adapter, the same image
    r = cli("export", "--adapter", kohya, "--out", tmp_path / "again.safetensors")
    assert r.returncode == 2 and "already in the kohya" in r.stderr and not (tmp_path / "again.safetensors").exists()


def test_class_images_command(tmp_path, instance_dir, cli):
    config = write_config(tmp_path, instance_dir, data={"num_class_images": 3})
    r = cli("class-images", "--config", config)
    assert r.returncode == 0, r.stderr
    assert "3 class images" in r.stdout
    assert len(list((tmp_path / "workspace" / "class_images").rglob("class_*.png"))) == 3


def test_resume_from_cli(tmp_path, instance_dir, cli):
    commands = queue.Queue()

    def emit(e):
        if isinstance(e, Progress) and e.step == 2:
            commands.put(STOP)

    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, train={"max_steps": 5}, output={"name": "resumable"}))
    run_dir = train(cfg, emit=emit, commands=commands)
    r = cli("train", "--resume", run_dir)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip().splitlines()[-1]) == run_dir
    assert [int(row["step"]) for row in csv.DictReader(open(run_dir / "loss.csv"))] == [1, 2, 3, 4, 5]
    assert adapters.read_adapter(run_dir / "resumable.safetensors").metadata["steps"] == "5"


def test_errors_are_plain_and_exit_2(tmp_path, instance_dir, cli):
    config = write_config(tmp_path, instance_dir)
    r = cli("train", "--config", config, "--set", "train.bogus=1")
    assert r.returncode == 2 and "Unknown setting `train.bogus`" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", "--config", config, "--set", f"data.instance_dir={tmp_path / 'nowhere'}")
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr
    r = cli("sample", "--base", tmp_path / "missing-model", "--prompt", "x", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "not found" in r.stderr
    r = cli("train")
    assert r.returncode == 2 and "--config" in r.stderr
    r = cli("train", "--bogus-flag")
    assert r.returncode == 2 and "--bogus-flag" in r.stderr  # argparse's own message
    r = cli("export", "--adapter", tmp_path / "none.safetensors", "--out", tmp_path / "e.safetensors")
    assert r.returncode == 2 and "not found" in r.stderr and not (tmp_path / "e.safetensors").exists()
    r = cli("export", "--adapter", config, "--out", tmp_path / "e.safetensors")
    assert r.returncode == 2 and ".safetensors" in r.stderr and "Traceback" not in r.stderr
    r = cli("merge", "--adapter", tmp_path / "a.safetensors", "--out", tmp_path / "m.safetensors")
    assert r.returncode == 2 and "--base" in r.stderr
    (tmp_path / "empty").mkdir()
    r = cli("train", "--resume", tmp_path / "empty")
    assert r.returncode == 2 and "not a run folder" in r.stderr


@pytest.mark.slow
def test_two_process_accelerate_launch(tmp_path, instance_dir):
    """The same CLI under `accelerate launch --num_processes 2` (two CPU processes, gloo)."""
    config = write_config(tmp_path, instance_dir, train={"max_steps": 3, "sample_every": 3, "checkpoint_every": 2,
                                                         "prior_preservation": True}, output={"name": "ddp"})
    launcher = [shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate", "launch",
                "--num_processes", "2", "--num_machines", "1", "--cpu", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "29631", str(ROOT / "app.py")]
    r = subprocess_cli("train", "--config", config, cmd=launcher, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "workspace" / "runs" / "ddp"
    assert r.stdout.strip().splitlines().count(str(run_dir)) == 1  # printed by the main process only
    rows = list(csv.DictReader(open(run_dir / "loss.csv")))
    assert [int(x["step"]) for x in rows] == [1, 2, 3] and all(x["prior_loss"] for x in rows)
    assert (run_dir / "checkpoints" / "step_000002" / "state.pt").is_file()
    assert sorted(p.name for p in (run_dir / "samples").glob("step_000003_*.png")) == ["step_000003_0.png", "step_000003_1.png"]
    assert adapters.read_adapter(run_dir / "ddp.safetensors").metadata["steps"] == "3"
    assert len(list((tmp_path / "workspace" / "class_images").rglob("class_*.png"))) == 2


def test_allow_pickle_flag_reaches_the_config():
    import app

    parser = app.build_parser()
    assert app.config_from_args(parser.parse_args(["train", "--preset", "demo-lora", "--allow-pickle"])).model.allow_pickle
    assert not app.config_from_args(parser.parse_args(["train", "--preset", "demo-lora"])).model.allow_pickle
    assert parser.parse_args(["--allow-pickle"]).allow_pickle and not parser.parse_args([]).allow_pickle


def test_workspace_flag_puts_the_run_and_class_images_there(tmp_path, instance_dir, cli):
    """Before or after the command: the run goes to WORKSPACE/runs and the class images to WORKSPACE/class_images,
    over a config file's output.dir (a flag beats the file); --set still wins over the flag."""
    config = write_config(tmp_path, instance_dir, train={"max_steps": 1, "prior_preservation": True},
                          output={"name": "ws-run"})
    for i, where in enumerate(("after", "before")):
        ws = tmp_path / f"ws-{where}"
        args = ["train", "--config", config, "--workspace", ws] if where == "after" else \
            ["--workspace", ws, "train", "--config", config]
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip().splitlines()[-1]) == ws / "runs" / "ws-run"
        assert len(list((ws / "class_images").rglob("class_*.png"))) == 2
    assert not (tmp_path / "workspace" / "runs" / "ws-run").exists()  # the file's output.dir was not used
    elsewhere = tmp_path / "elsewhere"
    r = cli("train", "--config", config, "--workspace", tmp_path / "ws-set", "--set", f"output.dir={elsewhere}")
    assert r.returncode == 0 and Path(r.stdout.strip().splitlines()[-1]) == elsewhere / "ws-run"


def test_flags_a_command_does_not_use_are_refused(tmp_path, instance_dir, cli):
    config = write_config(tmp_path, instance_dir)
    for args in (["--port", "9000", "train", "--config", config], ["--listen", "class-images", "--config", config],
                 ["--workspace", tmp_path / "w", "sample", "--base", "tiny", "--prompt", "x", "--out", tmp_path / "x.png"],
                 ["--allow-pickle", "export", "--adapter", "a.safetensors", "--out", tmp_path / "e.safetensors"],
                 ["train", "--resume", tmp_path, "--set", "train.max_steps=9"]):
        r = cli(*args)
        flag = next(a for a in map(str, args) if a.startswith("--") and a not in ("--config", "--base", "--prompt",
                                                                                 "--out", "--adapter", "--resume"))
        assert r.returncode == 2 and flag in r.stderr and "does not apply" in r.stderr, (args, r.stderr)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "workspace" / "runs").exists()


def test_allow_pickle_before_the_command_still_counts():
    import app

    parser = app.build_parser()
    for argv in (["--allow-pickle", "train", "--preset", "demo-lora"], ["train", "--preset", "demo-lora", "--allow-pickle"]):
        assert app.config_from_args(parser.parse_args(argv)).model.allow_pickle, argv
    assert parser.parse_args(["--allow-pickle", "sample", "--base", "b", "--prompt", "p", "--out", "o"]).allow_pickle
