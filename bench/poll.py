"""How long the Train tab's polling handler takes with a long run's history (target: under 50 ms).

    .venv/bin/python bench/poll.py [--steps 100000] [--repeats 50]

Fills a real Session with the events of a long run (losses, samples every 100 steps, a full log) through
its own event handler, then times `TrainView.poll`, the function the 1-second `gr.Timer` calls:
- reload: a page that has just (re)loaded, so everything is sent (loss curve cache warm, as in a running app);
- cold: the same on a fresh process (the loss curve built from scratch);
- steady: one new step since the last poll (what every tick does while training);
- plot_json: Gradio turning the loss frame into the JSON it sends (not part of the handler; shown for scale).
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import events as ev  # noqa: E402
from core.session import History, Session  # noqa: E402


def long_session(steps: int) -> Session:
    s = Session()
    s._h = History(state="running", total=steps * 2, started_at=time.time() - 3600)
    prompts = ["a photo of sks dog", "a photo of sks dog on the beach", "a photo of a dog", "a red car"]
    for step in range(1, steps + 1):
        s._on_event(ev.Progress(step, steps * 2, 0.1 + 0.05 * ((step * 7919) % 100) / 100, 0.1, 0.05, 1e-4, 3.0,
                                1000.0))
        if step % 100 == 0:
            s._on_event(ev.SampleReady(step, [f"/runs/x/samples/step_{step:06d}_{i}.png" for i in range(4)], prompts))
    return s


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()

    import gradio as gr

    from ui.train_tab import TrainView

    session = long_session(args.steps)
    snap = session.snapshot()
    cold = timed(lambda: TrainView(session).poll(None), 5)
    view = TrainView(session)
    view.poll(None)
    reload = timed(lambda: view.poll(None), args.repeats)

    sent = view.poll(None)[1]
    step = args.steps

    def one_step():
        nonlocal sent, step
        step += 1
        session._on_event(ev.Progress(step, args.steps * 2, 0.1, 0.1, 0.05, 1e-4, 3.0, 1000.0))
        sent = view.poll(sent)[1]

    steady = timed(one_step, args.repeats)
    frame = view.curve.frame(snap["started_at"], session.snapshot()["losses"])
    plot = gr.LinePlot(x="step", y="loss", color="curve")
    plot_json = timed(lambda: plot.postprocess(frame), 10)
    worst = max(statistics.median(reload), statistics.median(steady))
    print(json.dumps({
        "bench": "poll", "steps": args.steps, "samples": len(snap["samples"]), "log_lines": len(snap["logs"]),
        "plot_points": len(frame), "cold_ms": round(statistics.median(cold), 2),
        "reload_ms": round(statistics.median(reload), 2), "steady_ms": round(statistics.median(steady), 2),
        "steady_max_ms": round(max(steady), 2), "plot_json_ms": round(statistics.median(plot_json), 2),
        "limit_ms": 50, "ok": worst < 50,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
