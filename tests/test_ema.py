"""The average of the adapter's weights (train.ema_decay, core/ema.py): its arithmetic, and that every file, sample
and pause of a run shows the average while the optimizer trains the weights themselves."""
from __future__ import annotations

import queue

import pytest
import torch
from conftest import stop_and_resume, tiny_config

from core import adapters
from core.config import Config
from core.ema import AdapterEMA, ema_rate
from core.errors import ConfigError
from core.events import PAUSE, RESUME, STOP, Paused, Progress
from core.models import build_tiny_model
from core.trainer import train


def test_average_by_hand():
    """shadow <- r * shadow + (1 - r) * weight with the warmed-up rate r; `applied` swaps the average in and back."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = AdapterEMA([p], decay=0.9)
    expected = p.detach().clone()
    for n, value in enumerate(([3.0, 0.0], [5.0, 4.0], [-1.0, 2.0]), start=1):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        ema.update()
        r = min(0.9, (1 + n) / (10 + n))
        expected = r * expected + (1 - r) * torch.tensor(value)
        assert torch.allclose(ema.shadow[0], expected)
    assert ema_rate(0.9, 1) == pytest.approx(2 / 11) and ema_rate(0.9, 1000) == 0.9
    with ema.applied():
        assert torch.allclose(p, expected)
        assert torch.equal(ema.state_dict()["live"][0], torch.tensor([-1.0, 2.0]))  # the trained weights, not the average
        with ema.applied():  # nested (a sample during a pause): still the average, then still the average
            assert torch.allclose(p, expected)
        assert torch.allclose(p, expected)
    assert torch.equal(p.detach(), torch.tensor([-1.0, 2.0]))


def test_setting_is_checked():
    with pytest.raises(ConfigError, match="ema_decay"):
        Config.from_dict({"train": {"ema_decay": 1.0}})
    assert Config.from_dict({"train": {"ema_decay": 0.98}}).train.ema_decay == 0.98


def test_files_hold_the_average_of_the_trained_weights(tmp_path, instance_dir):
    """Each checkpoint's adapter is the previous one moved towards that step's trained weights by the rate; the final
    file is the average, not the weights the model was left with."""
    steps = 5
    cfg = tiny_config(tmp_path, instance_dir, adapter={"train_text_encoder": True},
                      train={"max_steps": steps, "learning_rate": 1e-2, "ema_decay": 0.9, "checkpoint_every": 1,
                             "keep_checkpoints": 10})
    base = build_tiny_model()
    run_dir = train(Config.from_dict(cfg), base=base)
    files, trained = {}, {}
    for k in range(1, steps):
        ckpt = run_dir / "checkpoints" / f"step_{k:06d}"
        files[k] = adapters.read_adapter(ckpt / "adapter.safetensors").tensors
        trained[k] = torch.load(ckpt / "state.pt", weights_only=True)["ema"]
        assert trained[k]["updates"] == k
    # the trained weights are kept in the order the adapter's parameters have in the model; the files use peft's
    # names (without the adapter's name)
    names = [f"{part}.{n}".replace(".default", "") for part in ("unet", "text_encoder")
             for n, p in base.parts[part].named_parameters() if ".default" in n]
    assert sorted(names) == sorted(files[1]) and len(names) == len(trained[1]["live"])
    for k in range(2, steps):
        r = ema_rate(0.9, k)
        for i, n in enumerate(names):
            assert torch.allclose(files[k][n], r * files[k - 1][n] + (1 - r) * trained[k]["live"][i], atol=1e-6), n
    moved = [n for i, n in enumerate(names) if not torch.allclose(files[4][n], trained[4]["live"][i], atol=1e-5)]
    assert len(moved) > len(names) // 2, "the files hold the trained weights, not their average"
    final = adapters.read_adapter(run_dir / f"{run_dir.name}.safetensors").tensors
    live = adapters.state_dict({part: base.parts[part] for part in ("unet", "text_encoder")})
    assert final.keys() == live.keys()
    assert any(not torch.allclose(final[n], live[n], atol=1e-5) for n in final)


def test_resume_with_average_matches_uninterrupted_run(tmp_path, instance_dir):
    common = dict(adapter={"type": "loha"}, train={"max_steps": 6, "checkpoint_every": 2, "ema_decay": 0.8,
                                                   "learning_rate": 1e-2})
    res = stop_and_resume(lambda name: tiny_config(tmp_path, instance_dir, output={"name": name}, **common), 3)
    assert [e.step for e in res.resumed_events if isinstance(e, Progress)] == [4, 5, 6]
    assert res.full.keys() == res.resumed.keys()
    assert all(torch.equal(res.full[k], res.resumed[k]) for k in res.full), "the resumed average diverged"


def test_pause_shows_the_average_and_training_continues_from_the_trained_weights(tmp_path, instance_dir):
    """While paused the model holds the average (what the playground tests); a checkpoint saved while paused still
    keeps the trained weights to go on from; after resume the run ends as an unpaused one."""
    common = dict(train={"max_steps": 4, "ema_decay": 0.9, "learning_rate": 1e-2})
    plain = train(Config.from_dict(tiny_config(tmp_path, instance_dir, output={"name": "plain"}, **common)))
    base = build_tiny_model()
    commands: queue.Queue = queue.Queue()
    seen = {}

    def emit(e):
        if isinstance(e, Progress) and e.step == 2:
            seen["trained"] = adapters.state_dict({"unet": base.unet})
            commands.put(PAUSE)
        if isinstance(e, Paused):
            seen["paused"] = adapters.state_dict({"unet": base.unet})
            commands.put(RESUME)

    paused = train(Config.from_dict(tiny_config(tmp_path, instance_dir, output={"name": "paused"}, **common)),
                   emit=emit, commands=commands, base=base)
    a = adapters.read_adapter(plain / "plain.safetensors").tensors
    b = adapters.read_adapter(paused / "paused.safetensors").tensors
    assert all(torch.equal(a[k], b[k]) for k in a), "pausing changed the run"
    trained, shown = seen["trained"], seen["paused"]
    assert any(not torch.allclose(shown[k], trained[k], atol=1e-6) for k in trained), "the pause shows the trained weights"


def test_stop_while_paused_keeps_trained_weights(tmp_path, instance_dir):
    """STOP during a pause: the resumable checkpoint holds the average as its adapter and the trained weights in its
    state, as one saved while running."""
    cfg = tiny_config(tmp_path, instance_dir, train={"max_steps": 6, "ema_decay": 0.9, "learning_rate": 1e-2})
    base = build_tiny_model()
    commands: queue.Queue = queue.Queue()
    live = {}

    def emit(e):
        if isinstance(e, Progress) and e.step == 3:
            live["trained"] = [p.detach().clone() for p in base.unet.parameters() if p.requires_grad]
            commands.put(PAUSE)
        if isinstance(e, Paused):
            commands.put(STOP)

    run_dir = train(Config.from_dict(cfg), emit=emit, commands=commands, base=base)
    state = torch.load(run_dir / "checkpoints" / "step_000003" / "state.pt", weights_only=True)
    assert len(state["ema"]["live"]) == len(live["trained"])
    assert all(torch.equal(a, b) for a, b in zip(state["ema"]["live"], live["trained"]))
