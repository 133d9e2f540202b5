"""A training run in a background thread, with its history, for the GUI (or any long-lived caller).

The session owns the thread, the command queue and everything the run has reported, so a browser
tab that reloads simply asks for a new `snapshot()` and re-attaches to the running job.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import events as ev
from .config import Config
from .errors import UserError

LOG_LIMIT = 500


@dataclass
class History:
    state: str = "idle"  # idle, running, paused, stopping, finished, stopped, failed
    step: int = 0
    total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    lrs: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[int, str, str]] = field(default_factory=list)  # (step, path, prompt)
    checkpoints: list[tuple[int, str]] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    it_per_s: float = 0.0
    eta_s: float = 0.0
    run_dir: str = ""
    adapter_path: str = ""
    error: str = ""
    error_detail: str = ""
    started_at: float = 0.0


class Session:
    """At most one training run at a time; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._commands: queue.Queue = queue.Queue()
        self._h = History()

    # -- control --------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, cfg: Config, resume_dir: str | Path | None = None, base=None) -> None:
        """Start training in a daemon thread; refuse while another run is going."""
        from .trainer import train  # heavy imports only when training

        with self._lock:
            if self.busy:
                raise UserError("A training run is already in progress. Stop it first, or wait for it to finish.")
            self._commands = queue.Queue()
            self._h = History(state="running", total=cfg.train.max_steps, started_at=time.time())
            self._h.logs.append("Starting...")

        def work():
            try:
                train(cfg, emit=self._on_event, commands=self._commands, resume_dir=resume_dir, base=base)
            except Exception:  # already reported as a Failed event by the trainer
                pass
            finally:
                with self._lock:
                    if self._h.state in ("running", "paused", "stopping"):
                        self._h.state = "failed" if self._h.error else "finished"

        self._thread = threading.Thread(target=work, name="training", daemon=True)
        self._thread.start()

    def command(self, name: str) -> bool:
        """Queue stop / pause / resume / sample / save; False when nothing is running."""
        if name not in ev.COMMANDS:
            raise ValueError(f"unknown command {name!r}")
        if not self.busy:
            return False
        if name == ev.STOP:
            with self._lock:
                self._h.state = "stopping"
                self._h.logs.append("Stopping: saving a checkpoint...")
        self._commands.put(name)
        return True

    def stop(self) -> bool:
        return self.command(ev.STOP)

    def pause(self) -> bool:
        return self.command(ev.PAUSE)

    def resume(self) -> bool:
        return self.command(ev.RESUME)

    def sample_now(self) -> bool:
        return self.command(ev.SAMPLE)

    def save_now(self) -> bool:
        return self.command(ev.SAVE)

    def wait(self, timeout: float | None = None) -> str:
        if self._thread is not None:
            self._thread.join(timeout)
        return self._h.state

    # -- what the run reported -----------------------------------------------------------------
    def _on_event(self, e: ev.Event) -> None:
        with self._lock:
            h = self._h
            if isinstance(e, ev.Progress):
                h.step, h.total, h.it_per_s, h.eta_s = e.step, e.total, e.it_per_s, e.eta_s
                h.losses.append((e.step, e.loss))
                h.lrs.append((e.step, e.lr))
            elif isinstance(e, ev.SampleReady):
                h.samples.extend((e.step, p, prompt) for p, prompt in zip(e.paths, e.prompts))
                h.logs.append(f"Samples at step {e.step}")
            elif isinstance(e, ev.CheckpointSaved):
                h.checkpoints.append((e.step, e.path))
                h.logs.append(f"Checkpoint saved at step {e.step}: {e.path}")
            elif isinstance(e, ev.Paused):
                h.state = "paused"
                h.logs.append(f"Paused at step {e.step}")
            elif isinstance(e, ev.Resumed):
                h.state = "running"
                h.logs.append(f"Resumed at step {e.step}")
            elif isinstance(e, ev.Finished):
                h.state = "stopped" if e.stopped else "finished"
                h.run_dir, h.adapter_path, h.step = e.run_dir, e.adapter_path, e.step
                h.logs.append(f"{'Stopped' if e.stopped else 'Finished'} at step {e.step}. Adapter: {e.adapter_path}")
            elif isinstance(e, ev.Failed):
                h.state, h.error, h.error_detail = "failed", e.message, e.traceback
                h.logs.append(f"Error: {e.message}")
            elif isinstance(e, ev.ClassImagesProgress):
                h.logs.append(f"Class images: {e.done}/{e.total}")
            elif isinstance(e, ev.Log):
                if e.message.startswith("Run folder: "):
                    h.run_dir = e.message.removeprefix("Run folder: ")
                h.logs.append(e.message)
            del h.logs[:-LOG_LIMIT]

    def snapshot(self) -> dict:
        """A copy of the history, safe to read while training goes on."""
        with self._lock:
            h = self._h
            return {
                "state": h.state, "step": h.step, "total": h.total, "losses": list(h.losses), "lrs": list(h.lrs),
                "samples": list(h.samples), "checkpoints": list(h.checkpoints), "logs": list(h.logs),
                "it_per_s": h.it_per_s, "eta_s": h.eta_s, "run_dir": h.run_dir, "adapter_path": h.adapter_path,
                "error": h.error, "error_detail": h.error_detail, "elapsed_s": time.time() - h.started_at if h.started_at else 0.0,
            }
