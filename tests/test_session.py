"""The background-thread session: commands between steps, one run at a time, errors reported."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import tiny_config

from core import adapters
from core.config import Config
from core.errors import UserError
from core.session import Session


def wait_for(predicate, session, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        snap = session.snapshot()
        if predicate(snap):
            return snap
        time.sleep(0.05)
    raise AssertionError(f"timed out; last snapshot state={snap['state']} step={snap['step']} logs={snap['logs'][-3:]}")


def test_pause_sample_save_resume_stop(tmp_path, instance_dir):
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, train={"max_steps": 100000, "sample_every": 0}))
    s = Session()
    s.start(cfg)
    wait_for(lambda h: h["step"] >= 2, s)

    with pytest.raises(UserError, match="already in progress"):
        s.start(cfg)

    assert s.pause()
    paused = wait_for(lambda h: h["state"] == "paused", s)
    time.sleep(0.5)
    assert s.snapshot()["step"] == paused["step"], "steps went on while paused"

    assert s.sample_now() and s.save_now()
    snap = wait_for(lambda h: h["samples"] and h["checkpoints"], s)
    assert {step for step, _, _ in snap["samples"]} == {paused["step"]}
    assert all(Path(p).is_file() for _, p, _ in snap["samples"])
    assert snap["checkpoints"][0][0] == paused["step"] and Path(snap["checkpoints"][0][1]).is_dir()
    assert snap["state"] == "paused" and snap["step"] == paused["step"]

    assert s.resume()
    wait_for(lambda h: h["state"] == "running" and h["step"] >= paused["step"] + 2, s)
    assert s.stop()
    s.wait(60)
    final = s.snapshot()
    assert final["state"] == "stopped"
    assert final["checkpoints"][-1][0] == final["step"]  # stop saves a checkpoint
    assert Path(final["adapter_path"]).is_file()
    assert adapters.read_adapter(final["adapter_path"]).metadata["steps"] == str(final["step"])
    assert final["run_dir"] and Path(final["run_dir"], "loss.csv").is_file()
    assert len(final["losses"]) == final["step"]
    assert not s.busy and not s.stop()  # nothing to stop any more


def test_commands_while_paused_wait_for_a_drawing_with_the_runs_model(tmp_path, instance_dir):
    """The playground draws with a paused run's model under the session's lock; "sample now" (or save, resume)
    pressed meanwhile is carried out after it, never in the training thread at the same time."""
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, train={"max_steps": 100000, "sample_every": 0}))
    s = Session()
    s.start(cfg)
    wait_for(lambda h: h["step"] >= 1, s)
    assert s.pause()
    paused = wait_for(lambda h: h["state"] == "paused", s)
    with s._live_lock:  # as Session.live_images holds it while drawing
        assert s.sample_now()
        time.sleep(1.5)
        assert not s.snapshot()["samples"], "the training thread sampled while the model was being drawn with"
    snap = wait_for(lambda h: h["samples"], s)
    assert {step for step, _, _ in snap["samples"]} == {paused["step"]}
    assert s.stop()
    assert s.wait(60) == "stopped"


def test_finished_run_and_history(tmp_path, instance_dir):
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, train={"max_steps": 3, "sample_every": 3}))
    s = Session()
    s.start(cfg)
    assert s.wait(120) == "finished"
    snap = s.snapshot()
    assert snap["step"] == 3 and [st for st, _ in snap["losses"]] == [1, 2, 3]
    assert sorted({st for st, _, _ in snap["samples"]}) == [0, 3]
    assert snap["eta_s"] == 0 and snap["it_per_s"] > 0
    assert any("Finished" in line for line in snap["logs"])
    # A second run may start once the first is done.
    s.start(Config.from_dict(tiny_config(tmp_path, instance_dir, train={"max_steps": 1})))
    assert s.wait(120) == "finished"


def test_failure_is_reported_in_plain_words(tmp_path, instance_dir):
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, data={"instance_dir": str(tmp_path / "missing")}))
    s = Session()
    s.start(cfg)
    assert s.wait(60) == "failed"
    snap = s.snapshot()
    assert "missing" in snap["error"] and "Traceback" not in snap["error"]
    assert snap["logs"][-1].startswith("Error:")


def test_two_starts_at_the_same_moment_start_one_run(tmp_path, instance_dir):
    """Two Start clicks (two tabs) at once: exactly one run starts, the other is refused."""
    import threading

    for attempt in range(10):
        s = Session()
        cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, train={"max_steps": 2},
                                           output={"name": f"race{attempt}"}))
        barrier, outcomes = threading.Barrier(2), []

        def click():
            barrier.wait()
            try:
                s.start(cfg)
                outcomes.append("started")
            except UserError:
                outcomes.append("refused")

        clickers = [threading.Thread(target=click) for _ in range(2)]
        for t in clickers:
            t.start()
        for t in clickers:
            t.join()
        assert sorted(outcomes) == ["refused", "started"]
        assert s.wait(60) == "finished"


def test_a_sample_asked_for_during_the_last_step_is_made(tmp_path, instance_dir):
    import queue

    from core.events import SAMPLE, Progress, SampleReady
    from core.trainer import train

    commands, events = queue.Queue(), []

    def emit(e):
        events.append(e)
        if isinstance(e, Progress) and e.step == 3:
            commands.put(SAMPLE)  # the user clicks "Sample now" just as the last step ends

    train(Config.from_dict(tiny_config(tmp_path, instance_dir, train={"max_steps": 3})), emit=emit, commands=commands)
    assert [e.step for e in events if isinstance(e, SampleReady)] == [3]


def test_the_run_folder_comes_from_the_run_started_event():
    from core.events import Log, RunStarted

    s = Session()
    s._on_event(Log("Run folder: /not/this/one"))  # a log line is only a log line
    assert s.snapshot()["run_dir"] == "" and s.snapshot()["logs"] == ["Run folder: /not/this/one"]
    s._on_event(RunStarted("/runs/rex"))
    assert s.snapshot()["run_dir"] == "/runs/rex"


def test_session_knows_its_run_folder_while_running(tmp_path, instance_dir):
    cfg = Config.from_dict(tiny_config(tmp_path, instance_dir, train={"max_steps": 100000, "sample_every": 0},
                                       output={"name": "live"}))
    s = Session()
    s.start(cfg)
    snap = wait_for(lambda h: h["step"] >= 1, s)
    assert snap["run_dir"] == str(tmp_path / "workspace" / "runs" / "live")
    assert s.stop() and s.wait(60) == "stopped"


def test_job_base_one_at_a_time():
    """The shared job base: busy while the work runs, a second start refused in the job's words, wait -> state."""
    import threading

    from core.session import Job

    class Demo(Job):
        busy_message = "Demo is busy."

        def __init__(self):
            super().__init__()
            self.record = "idle"

        @property
        def state(self):
            return self.record

        def start(self, gate):
            def work():
                gate.wait(10)
                self.record = "finished"

            self._start(lambda: setattr(self, "record", "running"), work)

    job, gate = Demo(), threading.Event()
    assert not job.busy and job.wait() == "idle"
    job.start(gate)
    assert job.busy and job.state == "running"
    with pytest.raises(UserError, match="Demo is busy"):
        job.start(gate)
    assert job.wait(0.05) == "running"
    gate.set()
    assert job.wait(10) == "finished" and not job.busy


@pytest.mark.parametrize("base, kind", [("tiny", "lora"), ("tiny", "dora"), ("tiny-flux", "lora")])
def test_pause_and_test_draws_with_the_runs_own_model(tmp_path, instance_dir, base, kind):
    """While paused, the run's own model draws the test images (no second copy of the base model): at strength 0
    the base model's own image (a DoRA's too), at 1 another; after resume the run ends exactly as an uninterrupted
    one."""
    from core.models import load_base_model
    from core.sampling import generate, make_pipeline
    from core.trainer import train

    def config(name, steps=6):
        d = tiny_config(tmp_path, instance_dir, output={"name": name}, adapter={"type": kind},
                        train={"max_steps": steps, "learning_rate": 5e-2, "sample_every": 0})
        d["model"] = {"base": base}
        return Config.from_dict(d)

    train(config("plain"))
    s = Session()
    with pytest.raises(UserError, match="No training run is paused"):
        s.live_images("a photo of sks ball")
    s.start(config("paused"))
    wait_for(lambda h: h["step"] >= 2, s)
    assert s.pause()
    wait_for(lambda h: h["state"] == "paused", s)
    off, on = s.live_images("a photo of sks ball", seed=3, steps=2, guidance=3.5, strengths=(0.0, 1.0))
    fresh = load_base_model(base)
    alone = generate(make_pipeline(fresh), ["a photo of sks ball"], [3], steps=2, guidance=3.5, size=off.size[0])[0]
    assert list(off.getdata()) == list(alone.getdata())
    assert list(on.getdata()) != list(off.getdata())
    assert s.resume()
    s.wait(120)
    assert s.snapshot()["state"] == "finished"
    a = adapters.read_adapter(Path(tmp_path / "workspace" / "runs" / "plain" / "plain.safetensors")).tensors
    b = adapters.read_adapter(Path(s.snapshot()["adapter_path"])).tensors
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "drawing while paused changed the run"


def test_the_app_leaves_a_core_to_the_page_on_a_cpu(monkeypatch):
    """Without an NVIDIA GPU the app's torch threads leave one core free (never fewer than one thread), unless the
    user set the thread count themselves."""
    import torch

    from core.session import leave_a_core

    before = torch.get_num_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        torch.set_num_threads(4)
        assert leave_a_core({}) == 3 == torch.get_num_threads()
        torch.set_num_threads(1)
        assert leave_a_core({}) == 1
        torch.set_num_threads(4)
        assert leave_a_core({"OMP_NUM_THREADS": "4"}) == 4
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert leave_a_core({}) == 4  # a GPU does the work: the CPU threads stay
    finally:
        torch.set_num_threads(before)
