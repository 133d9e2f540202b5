"""Soak: a long session with pause / resume / sample-now / save at random moments loses no event and
keeps memory flat. The same code as `python -m bench.soak`, at a size for the test suite (about a minute)."""
from __future__ import annotations

import pytest

from bench.soak import LOG_PREFIXES, run_soak

STEPS = 600


@pytest.mark.slow
def test_soak_loses_no_events_and_keeps_memory_flat(tmp_path):
    # Samples every 50 steps and checkpoints every 25 on top of the commands; a 20-line log cap, so the log
    # wraps around many times and the poller must still read every line once.
    r = run_soak(steps=STEPS, cycles=24, seed=7, workdir=tmp_path, sample_every=50, checkpoint_every=25,
                 log_limit=20)
    assert r["failures"] == [], r

    # Every command kind was exercised, several times, and the log really wrapped around.
    assert all(r["commands_sent"].get(c, 0) >= 3 for c in ("pause", "resume", "sample", "save")), r["commands_sent"]
    assert r["actions"].get("pause", 0) >= 5 and r["live_adapter_copies"] >= 1, r["actions"]
    assert sum(r["poller"]["log_lines"].values()) > 3 * r["log_limit"]

    # Exact accounting: what was emitted is what the commands and the schedule call for, and what the poller read.
    events, want = r["events"], r["expected_events"]
    assert events["Progress"] == STEPS == r["poller"]["loss_points"]
    assert events["Finished"] == 1 and events["Failed"] == 0
    assert events["Paused"] == events["Resumed"] == want["Paused"] == want["Resumed"] >= 5
    assert events["SampleReady"] == want["SampleReady"] > 1 + STEPS // 50  # more than the schedule alone makes
    assert events["CheckpointSaved"] == want["CheckpointSaved"] > (STEPS - 1) // 25
    assert r["poller"]["sample_images"] == 2 * events["SampleReady"]  # two sample prompts
    assert r["poller"]["checkpoints"] == events["CheckpointSaved"]
    assert r["poller"]["log_lines"] == {kind: events[kind] for kind in LOG_PREFIXES}

    # Memory: bounded growth after warm-up, in RSS and in Python objects (see bench/soak.py for the bounds).
    assert r["rss_mb"]["growth"] < 30
    assert r["blocks"]["growth_per_step"] < r["max_blocks_per_step"]
