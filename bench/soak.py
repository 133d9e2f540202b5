"""Soak: a long training session on the tiny model, poked at random moments, must keep memory flat and lose no events.

    .venv/bin/python -m bench.soak --steps 20000 --cycles 200 [--seed 0] [--tracemalloc]

One `Session` (the object behind the Train tab) trains the tiny model at 32 px for `--steps` steps, with samples
and checkpoints every few dozen steps (only `keep_checkpoints` = 2 are kept, so the disk does not fill). Three
threads watch it:
- the driver (main thread) sends commands at `--cycles` random steps (seeded): pause, then sample-now / save /
  a second pause / the playground's `live_adapter` while paused, then resume; sample-now or save while running;
  pause+resume back to back; a stray resume while running. It keeps a model of what each command must cause
  (the trainer handles them in order between steps) and, whenever the run is paused, checks that every event
  so far has arrived exactly;
- a poller reads the session the way the Train tab does: `snapshot()` every 50 ms, taking the losses, samples,
  checkpoints and log lines added since the last index it read;
- the events themselves are counted as the trainer emits them (a `Session` subclass), with the process RSS
  (/proc/self/status VmRSS) and Python's allocated-block count read every `steps / 200` steps.

Checks (all exact, none timing-dependent): steps 1..N arrive once each, in order, both as emitted and as the
poller saw them; every pause got one Paused, every resume that had a pause to end got one Resumed (at the same
step, with no step in between), every sample-now one SampleReady, every save one CheckpointSaved, on top of the
periodic ones; the poller saw exactly what was emitted; the run ends Finished at step N. Memory, from the end of
warm-up (10 % of the steps, after a gc) to the last step (after a gc): RSS grows less than `--max-growth-mb`; the
least-squares RSS slope over the second half stays under `--max-slope` bytes per step (when the rise it implies is
above a 4 MB noise floor); Python's allocated blocks grow less than `--max-blocks-per-step` per step.

Why those bounds: the only thing that must grow is the history the loss plot needs, two (step, value) tuples a
step in the session: 5 Python blocks, about 200 bytes, plus the soak's own 8-byte-per-step arrays, so 20,000
steps add about 5 MB. The rest should be flat, but the C allocator and torch keep freed memory in their pools, so
RSS moves by a few MB either way; 30 MB leaves room for that and still catches a leaked sample pipeline,
checkpoint or image per command (each is far bigger); 2 KB/step (ten times the history) catches a steady native
leak of a few small tensors a step once the pools have settled. Blocks are exact and not timing-dependent: the
run measures about 6 a step (the history, plus small caches that fill early), and 10 catches a Python leak of
one event object (with its floats) per step.

Prints one JSON line; exit status 1 when a check failed (the line's "failures" say which).
"""
from __future__ import annotations

import argparse
import array
import gc
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core import events as ev  # noqa: E402
from core import session as session_module  # noqa: E402
from core.config import Config  # noqa: E402
from core.session import Session  # noqa: E402

SLOPE_FLOOR_MB = 4.0  # a second-half RSS rise smaller than this is allocator noise, whatever its slope
WAIT_S = 60.0  # longest wait for one command's event (a step or a sample: under a second even on a busy CPU)
POLL_S = 0.05  # the poller's interval (the Train tab polls every second; faster is harsher)
# What a driver cycle does, with its weight.
ACTIONS = {"pause": 40, "sample": 20, "save": 15, "blip": 15, "stray_resume": 10}
# The log lines the session writes per event (the poller counts these to check the log lost nothing).
LOG_PREFIXES = {"Paused": "Paused at step ", "Resumed": "Resumed at step ", "SampleReady": "Samples at step ",
                "CheckpointSaved": "Checkpoint saved at step ", "Finished": "Finished at step "}


def rss_bytes() -> int:
    """The process's resident set size now."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not Linux: psutil comes with accelerate

    return psutil.Process().memory_info().rss


def make_images(folder: Path, n: int = 3) -> Path:
    """A few 64-px pictures of a disc, shifted a little each: something for the tiny model to learn."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (64, 64), (235, 235, 250))
        d = ImageDraw.Draw(img)
        d.ellipse((8 + 3 * i, 8, 48 + 3 * i, 48), fill=(210, 40, 40))
        img.save(folder / f"disc{i}.png")
    return folder


def soak_config(workdir: Path, steps: int, sample_every: int, checkpoint_every: int) -> Config:
    return Config.from_dict({
        "model": {"base": "tiny"},
        "data": {"instance_dir": str(make_images(workdir / "instance")), "instance_prompt": "a photo of sks disc",
                 "class_prompt": "a photo of a disc", "resolution": 32},
        "adapter": {"type": "lora", "rank": 4, "alpha": 4},
        "train": {"max_steps": steps, "batch_size": 1, "learning_rate": 1e-4, "prior_preservation": False,
                  "sample_every": sample_every, "sample_steps": 2, "checkpoint_every": checkpoint_every,
                  "keep_checkpoints": 2, "seed": 0},
        "output": {"dir": str(workdir / "runs"), "name": "soak"},
    })


class CountingSession(Session):
    """A Session that also records every event as the trainer emits it, and reads memory every few steps.

    Progress steps go into an 8-byte-per-step array, so that the soak's own bookkeeping stays small beside
    what it measures. Memory is read in the training thread, at exact steps, so the marks do not depend on timing.
    """

    def __init__(self, mark_every: int, gc_at: tuple[int, ...]):
        super().__init__()
        self.cond = threading.Condition()
        self.counts: Counter = Counter()
        self.progress = array.array("q")  # the steps of the Progress events, in arrival order
        self.others: list[tuple[str, int, int]] = []  # (event type, its step, Progress events before it)
        self.finished: ev.Finished | None = None
        self.failed: ev.Failed | None = None
        self.mark_every, self.gc_at = mark_every, gc_at
        self.marks: list[tuple[int, int, int]] = []  # (step, RSS bytes, Python allocated blocks)

    def _on_event(self, e: ev.Event) -> None:
        super()._on_event(e)
        kind = type(e).__name__
        with self.cond:
            self.counts[kind] += 1
            if isinstance(e, ev.Progress):
                self.progress.append(e.step)
                if e.step in self.gc_at:
                    gc.collect()  # compare like with like: no garbage waiting for a collection at the marks that count
                if e.step % self.mark_every == 0 or e.step in self.gc_at:
                    self.marks.append((e.step, rss_bytes(), sys.getallocatedblocks()))
            elif not isinstance(e, ev.Log):
                self.others.append((kind, getattr(e, "step", -1), len(self.progress)))
            if isinstance(e, ev.Finished):
                self.finished = e
            elif isinstance(e, ev.Failed):
                self.failed = e
            self.cond.notify_all()

    def wait_for(self, predicate, timeout: float = WAIT_S) -> bool:
        """Block until `predicate(counts)` holds (or the run ended / failed); False on timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.counts) or self.failed is not None, timeout)


class Poller(threading.Thread):
    """Reads the session like the Train tab: a snapshot, then whatever was added since the last index."""

    def __init__(self, session: Session, interval: float = POLL_S):
        super().__init__(name="soak-poller", daemon=True)
        self.session, self.interval = session, interval
        self.done = threading.Event()
        self.steps = array.array("q")  # the steps of the losses, as read
        self.sample_steps: list[int] = []
        self.checkpoint_steps: list[int] = []
        self.log_counts: Counter = Counter()
        self.seen = {"losses": 0, "lrs": 0, "samples": 0, "checkpoints": 0, "logs": 0}
        self.errors: list[str] = []
        self.polls = 0
        self.states: Counter = Counter()

    def error(self, message: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(message)

    def run(self) -> None:
        while not self.done.is_set():
            self.poll()
            self.done.wait(self.interval)
        self.poll()  # what came after the last tick

    def poll(self) -> None:
        snap = self.session.snapshot()
        self.polls += 1
        self.states[snap["state"]] += 1
        for key in ("losses", "lrs", "samples", "checkpoints"):
            if len(snap[key]) < self.seen[key]:
                self.error(f"history '{key}' shrank from {self.seen[key]} to {len(snap[key])}")
        if snap["losses"] and snap["losses"][-1][0] != snap["step"]:
            self.error(f"snapshot step {snap['step']} is not its last loss step {snap['losses'][-1][0]}")
        if len(snap["losses"]) != len(snap["lrs"]):
            self.error(f"{len(snap['losses'])} losses but {len(snap['lrs'])} learning rates in one snapshot")
        self.steps.extend(step for step, _ in snap["losses"][self.seen["losses"]:])
        self.sample_steps.extend(step for step, _, _ in snap["samples"][self.seen["samples"]:])
        self.checkpoint_steps.extend(step for step, _ in snap["checkpoints"][self.seen["checkpoints"]:])
        # The log keeps its last LOG_LIMIT lines; `log_count` says how many were ever written, so the new ones are
        # the last (log_count - seen) lines, however many were dropped from its front since the last poll.
        new = snap["log_count"] - self.seen["logs"]
        if new > len(snap["logs"]):
            self.error(f"{new - len(snap['logs'])} log lines dropped before the poller could read them")
        for line in snap["logs"][len(snap["logs"]) - min(new, len(snap["logs"])):] if new > 0 else []:
            for kind, prefix in LOG_PREFIXES.items():
                if line.startswith(prefix):
                    self.log_counts[kind] += 1
        self.seen = {"losses": len(snap["losses"]), "lrs": len(snap["lrs"]), "samples": len(snap["samples"]),
                     "checkpoints": len(snap["checkpoints"]), "logs": snap["log_count"]}


class Expected:
    """What the commands sent so far must cause: the trainer handles them in order, between steps."""

    def __init__(self):
        self.paused = False
        self.counts: Counter = Counter()
        self.sent: Counter = Counter()

    def sent_command(self, name: str) -> None:
        self.sent[name] += 1
        if name == ev.PAUSE and not self.paused:
            self.paused = True
            self.counts["Paused"] += 1
        elif name == ev.RESUME and self.paused:
            self.paused = False
            self.counts["Resumed"] += 1
        elif name == ev.SAMPLE:
            self.counts["SampleReady"] += 1
        elif name == ev.SAVE:
            self.counts["CheckpointSaved"] += 1


def periodic(step: int, steps: int, sample_every: int, checkpoint_every: int) -> Counter:
    """The samples and checkpoints the schedule itself makes up to `step` (a step-0 baseline; none at the end)."""
    return Counter({"SampleReady": 1 + step // sample_every if sample_every else 0,
                    "CheckpointSaved": min(step, steps - 1) // checkpoint_every if checkpoint_every else 0})


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def run_soak(steps: int = 20_000, cycles: int = 200, seed: int = 0, workdir: str | Path | None = None,
             sample_every: int | None = None, checkpoint_every: int | None = None, warmup: float = 0.1,
             max_growth_mb: float = 30.0, max_slope: float = 2048.0, max_blocks_per_step: float = 10.0,
             log_limit: int | None = None, trace: bool = False) -> dict:
    """Run the soak; return its results (the JSON line's fields; `failures` empty when every check passed).

    `log_limit` lowers the session's log cap for the run (a short soak then still wraps the log around).
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            return run_soak(steps, cycles, seed, tmp, sample_every, checkpoint_every, warmup, max_growth_mb,
                            max_slope, max_blocks_per_step, log_limit, trace)
    sample_every = max(steps // 40, 1) if sample_every is None else sample_every
    checkpoint_every = max(steps // 80, 1) if checkpoint_every is None else checkpoint_every
    warmup_step = max(int(steps * warmup), 1)
    cfg = soak_config(Path(workdir), steps, sample_every, checkpoint_every)
    rng = random.Random(seed)
    failures: list[str] = []

    old_limit = session_module.LOG_LIMIT
    if log_limit is not None:
        session_module.LOG_LIMIT = log_limit
    s = CountingSession(mark_every=max(steps // 200, 1), gc_at=(warmup_step, steps))
    poller = Poller(s)
    expected = Expected()
    plan = sorted(rng.sample(range(1, max(int(steps * 0.9), cycles + 1)), cycles))
    actions = [rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0] for _ in plan[:-1]] + ["pause"]
    done: Counter = Counter()
    live_copies = 0
    t0 = time.perf_counter()
    rss_before = rss_bytes()
    tracer = None
    try:
        s.start(cfg)
        poller.start()

        def send(name: str) -> None:
            if not s.command(name):
                failures.append(f"command {name!r} refused while the run was going")
            expected.sent_command(name)

        def click_twice_maybe(command: str, event: str, cycle: int) -> bool:
            """Send `command` (sometimes twice, a double click: still one `event`) and wait for its event."""
            send(command)
            if rng.random() < 0.2:
                send(command)
            if not s.wait_for(lambda c: c[event] >= expected.counts[event]):
                failures.append(f"cycle {cycle}: no {event} event")
                return False
            return True

        def settled(where: str) -> bool:
            """While paused every command sent so far has been handled: the counts must match exactly now."""
            step = s.snapshot()["step"]
            want = expected.counts + periodic(step, steps, sample_every, checkpoint_every)
            ok = s.wait_for(lambda c: all(c[k] >= n for k, n in want.items()))
            got = {k: s.counts[k] for k in want}
            if not ok or got != dict(want):
                failures.append(f"{where} at step {step}: events {got}, expected {dict(want)}")
                return False
            return True

        for i, (target, action) in enumerate(zip(plan, actions)):
            while not s.wait_for(lambda c: c["Progress"] >= target or c["Finished"] > 0, 1.0) and s.busy:
                pass
            if s.counts["Progress"] < target or not s.busy:
                failures.append(f"the run ended before cycle {i} (step {target})")
                break
            if trace and tracer is None and target >= warmup_step:
                import tracemalloc

                tracemalloc.start()
                tracer = tracemalloc.take_snapshot()
            done[action] += 1
            if action == "pause":
                if not click_twice_maybe(ev.PAUSE, "Paused", i):
                    break
                extra = [ev.SAMPLE] * rng.randint(0, 2) + [ev.SAVE] * rng.randint(0, 2)
                rng.shuffle(extra)
                for name in extra:
                    send(name)
                if rng.random() < 0.25:
                    s.live_adapter()  # the playground's "pause and test" copies the paused weights
                    live_copies += 1
                if not settled(f"cycle {i} (paused)"):
                    break
                if not click_twice_maybe(ev.RESUME, "Resumed", i):
                    break
            elif action == "sample":
                send(ev.SAMPLE)
            elif action == "save":
                send(ev.SAVE)
            elif action == "blip":
                send(ev.PAUSE)
                send(ev.RESUME)
            elif action == "stray_resume":
                send(ev.RESUME)  # nothing is paused: no event
        else:
            s.wait(max(600.0, steps * 0.5))  # the last steps (at most 10 % of them)
            if s.busy:
                failures.append("the run did not finish")
    finally:
        if s.busy:
            s.stop()
            s.wait(WAIT_S)
        poller.done.set()
        poller.join(WAIT_S)
        session_module.LOG_LIMIT = old_limit
    elapsed = time.perf_counter() - t0

    # Events as emitted.
    want = expected.counts + periodic(steps, steps, sample_every, checkpoint_every)
    counts = {k: s.counts[k] for k in ("Progress", "Paused", "Resumed", "SampleReady", "CheckpointSaved", "Finished",
                                       "Failed")}
    if s.failed is not None:
        failures.append(f"the run failed: {s.failed.message}")
    if list(s.progress) != list(range(1, steps + 1)):
        first = next((j for j, step in enumerate(s.progress) if step != j + 1), len(s.progress))
        failures.append(f"Progress steps are not 1..{steps} once each in order ({len(s.progress)} events, "
                        f"the first one out of place at position {first})")
    for k in ("Paused", "Resumed", "SampleReady", "CheckpointSaved"):
        if counts[k] != want[k]:
            failures.append(f"{counts[k]} {k} events, expected {want[k]}")
    if s.finished is None or counts["Finished"] != 1 or s.finished.step != steps or s.finished.stopped:
        failures.append(f"the run did not end with one Finished at step {steps}: {s.finished}")
    if s.snapshot()["state"] != "finished":
        failures.append(f"final state {s.snapshot()['state']!r}, not 'finished'")
    # A pause holds the steps still: Resumed comes at the step of its Paused, with no Progress between.
    pauses = [(kind, step, before) for kind, step, before in s.others if kind in ("Paused", "Resumed")]
    for (k1, st1, b1), (k2, st2, b2) in zip(pauses[::2], pauses[1::2]):
        if (k1, k2) != ("Paused", "Resumed") or not st1 == st2 == b1 == b2:
            failures.append(f"{k1} at step {st1} (after {b1} steps) then {k2} at step {st2} (after {b2} steps)")
            break
    if len(pauses) % 2:
        failures.append("the run ended paused")

    # Events as the poller saw them.
    if list(poller.steps) != list(range(1, steps + 1)):
        failures.append(f"the poller read {len(poller.steps)} loss points, not steps 1..{steps} once each in order")
    emitted_samples = [st for kind, st, _ in s.others if kind == "SampleReady"]
    prompts = len(cfg.train.sample_prompts or [cfg.data.instance_prompt, cfg.data.class_prompt])
    if poller.sample_steps != [st for st in emitted_samples for _ in range(prompts)]:
        failures.append(f"the poller read {len(poller.sample_steps)} sample images, emitted "
                        f"{len(emitted_samples)} x {prompts}")
    if poller.checkpoint_steps != [st for kind, st, _ in s.others if kind == "CheckpointSaved"]:
        failures.append(f"the poller read {len(poller.checkpoint_steps)} checkpoints, "
                        f"emitted {counts['CheckpointSaved']}")
    for kind in LOG_PREFIXES:
        if poller.log_counts[kind] != counts[kind]:
            failures.append(f"the poller read {poller.log_counts[kind]} '{LOG_PREFIXES[kind]}' log lines, "
                            f"emitted {counts[kind]} {kind}")
    failures.extend(f"poller: {e}" for e in poller.errors)

    # Memory.
    marks = {step: (rss, blocks) for step, rss, blocks in s.marks}
    warm, end = marks.get(warmup_step), marks.get(steps)
    growth = (end[0] - warm[0]) / 2**20 if warm and end else float("nan")
    second_half = [(step, rss) for step, rss, _ in s.marks if step >= steps // 2]
    rss_slope = slope(second_half)
    block_slope = slope([(step, blocks) for step, _, blocks in s.marks if step >= steps // 2])
    blocks_per_step = (end[1] - warm[1]) / (steps - warmup_step) if warm and end else float("inf")
    if not (growth < max_growth_mb):
        failures.append(f"RSS grew {growth:.1f} MB from step {warmup_step} to {steps} (bound {max_growth_mb} MB)")
    # RSS moves in pages and allocator pools, by a few MB either way: a trend is only a trend above that floor.
    if rss_slope > max_slope and rss_slope * (steps - steps // 2) > SLOPE_FLOOR_MB * 2**20:
        failures.append(f"RSS rose {rss_slope:.0f} bytes/step over the second half (bound {max_slope:.0f}; "
                        f"{rss_slope * (steps - steps // 2) / 2**20:.1f} MB in all)")
    if not blocks_per_step < max_blocks_per_step:
        failures.append(f"Python kept {blocks_per_step:.1f} more allocated blocks per step from step {warmup_step} "
                        f"to {steps} (bound {max_blocks_per_step})")
    top = []
    if tracer is not None:
        import tracemalloc

        top = [str(d) for d in tracemalloc.take_snapshot().compare_to(tracer, "lineno")[:10]]
        tracemalloc.stop()

    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    return {
        "ok": not failures, "failures": failures, "steps": steps, "cycles": len(plan), "seed": seed,
        "elapsed_s": round(elapsed, 1), "sample_every": sample_every, "checkpoint_every": checkpoint_every,
        "actions": dict(done), "commands_sent": dict(expected.sent), "live_adapter_copies": live_copies,
        "events": counts, "expected_events": dict(want), "poller": {
            "polls": poller.polls, "loss_points": len(poller.steps), "sample_images": len(poller.sample_steps),
            "checkpoints": len(poller.checkpoint_steps), "log_lines": dict(poller.log_counts),
            "states_seen": dict(poller.states)},
        "log_limit": log_limit or old_limit,
        "rss_mb": {"before_start": mb(rss_before), "warmup": mb(warm[0]) if warm else None,
                   "end": mb(end[0]) if end else None, "peak": mb(max((r for _, r, _ in s.marks), default=0)),
                   "growth": round(growth, 2) if warm and end else None},
        "warmup_step": warmup_step, "rss_slope_bytes_per_step": round(rss_slope, 1),
        "blocks": {"warmup": warm[1] if warm else None, "end": end[1] if end else None,
                   "growth_per_step": round(blocks_per_step, 2) if warm and end else None,
                   "slope_per_step": round(block_slope, 2)},
        "max_growth_mb": max_growth_mb, "max_slope": max_slope, "max_blocks_per_step": max_blocks_per_step,
        "memory_marks": len(s.marks), "tracemalloc_top": top,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--cycles", type=int, default=200, help="moments at which the driver sends commands")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=int, default=None, help="default: steps / 40")
    p.add_argument("--checkpoint-every", type=int, default=None, help="default: steps / 80")
    p.add_argument("--max-growth-mb", type=float, default=30.0)
    p.add_argument("--max-slope", type=float, default=2048.0, help="bytes per step over the second half")
    p.add_argument("--max-blocks-per-step", type=float, default=10.0, help="Python allocated blocks, warm-up to end")
    p.add_argument("--log-limit", type=int, default=None, help="the session's log cap for this run")
    p.add_argument("--workdir", default=None, help="default: a temporary folder, removed after")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the tiny model gains nothing from more)")
    p.add_argument("--tracemalloc", action="store_true", help="list the top Python allocation growth sites")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    result = run_soak(args.steps, args.cycles, args.seed, args.workdir, args.sample_every, args.checkpoint_every,
                      max_growth_mb=args.max_growth_mb, max_slope=args.max_slope,
                      max_blocks_per_step=args.max_blocks_per_step, log_limit=args.log_limit,
                      trace=args.tracemalloc)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
