"""A training run in a background thread, with its history, for the GUI (or any long-lived caller).

The session owns the thread, the command queue and everything the run has reported, so a browser
tab that reloads simply asks for a new `snapshot()` and re-attaches to the running job.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

from . import events as ev
from .config import Config
from .errors import UserError

LOG_LIMIT = 500
# Variables with which a user sets the CPU's thread count themselves (then it is left as they set it).
THREAD_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def leave_a_core(environ: Mapping[str, str] = os.environ) -> int:
    """Let torch's CPU work use one core fewer than it would, when there is no NVIDIA GPU: the app's page, the web
    server and the training share the machine, and when every core runs a torch thread the page's redraws stall the
    others at each step (measured on 2 cores, demo run with the Train tab open: 97 s with two threads, 65 s with
    one; 43 s with no page). Returns the thread count now in use."""
    import torch

    if torch.cuda.is_available() or any(environ.get(k) for k in THREAD_SETTINGS):
        return torch.get_num_threads()
    torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    return torch.get_num_threads()


@dataclass
class History:
    state: str = "idle"  # idle, running, paused, stopping, finished, stopped, failed
    step: int = 0
    total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    lrs: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[int, str, str]] = field(default_factory=list)  # (step, path, prompt)
    compare: list[tuple[str, str]] = field(default_factory=list)  # (path, caption): adapter off / on at the end
    checkpoints: list[tuple[int, str]] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    logs_dropped: int = 0  # lines cut from the front of `logs` (LOG_LIMIT), so pollers can read "lines since N"
    it_per_s: float = 0.0
    eta_s: float = 0.0
    run_dir: str = ""
    adapter_path: str = ""
    error: str = ""
    error_detail: str = ""
    started_at: float = 0.0


class Job:
    """One piece of work at a time in a daemon thread: `busy`, `wait`, `state`, and a start that cannot race.

    Subclasses keep their own record of the work under `self._lock` and say what `state` it is in.
    """

    busy_message = "This job is already running."
    thread_name = "job"

    def __init__(self):
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def state(self) -> str:
        raise NotImplementedError

    def _start(self, reset: Callable[[], None], work: Callable[[], None]) -> None:
        """`reset` the record and start `work`, both under the lock: two clicks at the same moment (two tabs)
        cannot both start, and no poll sees the new thread with the old record."""
        with self._lock:
            if self.busy:
                raise UserError(self.busy_message)
            reset()
            self._thread = threading.Thread(target=work, name=self.thread_name, daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> str:
        """Wait for the work to end (or `timeout` seconds); return the state it is in then."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state


class Session(Job):
    """At most one training run at a time; thread-safe."""

    busy_message = "A training run is already in progress. Stop it first, or wait for it to finish."
    thread_name = "training"

    def __init__(self):
        super().__init__()
        # held while the playground copies a paused run's adapter or draws with its model; the training thread
        # takes it to carry out a command while paused (sample now, save now, resume), so the two never use the
        # model at once (the queue hands it to the trainer's Controller)
        self._live_lock = threading.Lock()
        self._commands: queue.Queue = self._new_queue()
        self._h = History()
        self.config: Config | None = None  # the settings of the current (or last) run
        self._model = None  # the run's base model (with its adapter) while the run is alive

    def _new_queue(self) -> queue.Queue:
        commands: queue.Queue = queue.Queue()
        commands.model_lock = self._live_lock
        return commands

    # -- control --------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        with self._lock:
            return self._h.state

    def start(self, cfg: Config, resume_dir: str | Path | None = None, base=None) -> None:
        """Start training in a daemon thread; refuse while another run is going."""
        from .trainer import train  # heavy imports only when training

        def work():
            try:
                # The session loads the base model itself (when not given) so that it can reach the run's live
                # adapter while the run is paused (`live_adapter`, the playground's "pause and test").
                model = base
                if model is None:
                    from .models import load_base_from_config

                    self._on_event(ev.Log(f"Loading base model {cfg.model.base}"))
                    model = load_base_from_config(cfg)
                self._model = model
                train(cfg, emit=self._on_event, commands=self._commands, resume_dir=resume_dir, base=model)
            except Exception as e:  # the trainer reports its own errors as a Failed event; report the rest here
                if not self._h.error:
                    message = str(e) if isinstance(e, UserError) else f"Training failed: {type(e).__name__}: {e}"
                    self._on_event(ev.Failed(message, "" if isinstance(e, UserError) else traceback.format_exc()))
            finally:
                self._model = None
                with self._lock:
                    if self._h.state in ("running", "paused", "stopping"):
                        self._h.state = "failed" if self._h.error else "finished"

        def reset():
            self._commands = self._new_queue()
            self._h = History(state="running", total=cfg.train.max_steps, started_at=time.time())
            self._h.logs.append("Starting...")
            self.config = cfg

        self._start(reset, work)

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
        if name == ev.RESUME:
            with self._live_lock:  # never let training change the weights while they are being copied
                self._commands.put(name)
            return True
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

    def _paused(self):
        """(model, config, step, run folder) of the paused run (under `_live_lock`), or a plain UserError."""
        model, cfg = self._model, self.config
        with self._lock:
            state, step, run_dir = self._h.state, self._h.step, self._h.run_dir
        if state != "paused" or model is None or cfg is None:
            raise UserError("No training run is paused. Pause the run on the Train tab first, then test it here.")
        return model, cfg, step, run_dir

    def live_adapter(self):
        """A copy of the paused run's adapter as it is now (an in-memory `AdapterFile`), for the playground.

        Only while paused: the training thread then waits between steps, so the weights hold still.
        """
        from accelerate.utils import extract_model_from_parallel

        from . import adapters, families
        from .adapter_file import AdapterFile

        with self._live_lock:
            model, cfg, step, run_dir = self._paused()
            family = families.of(model)
            specs = adapters.specs_from_config(cfg, family.text_encoders, family.denoiser, family.default_targets)
            tensors = adapters.state_dict({part: extract_model_from_parallel(model.parts[part]) for part in specs})
        name = f"{Path(run_dir).name or 'run'} step {step} (live)"
        info = adapters.training_metadata(cfg, step, cfg.model.base, family.name)
        metadata = {k: v if isinstance(v, str) else str(v) for k, v in info.items()}
        return AdapterFile(Path(name), specs, tensors, metadata)

    def live_images(self, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int = 25,
                    guidance: float = 7.5, width: int | None = None, height: int | None = None,
                    strengths: tuple[float, ...] = (1.0,), weight: float = 1.0) -> list:
        """Images drawn by the paused run's own model (its adapter at `weight` x each strength; 0: the base alone),
        where its parts already are: no second copy of the base model (which a 16-24 GB card has no room for
        beside a FLUX.1 or SDXL run). The run goes on exactly as if it had not been drawn from."""
        from accelerate.utils import extract_model_from_parallel

        from . import adapters, families
        from .placement import device_of
        from .sampling import encoded_apart, generate, make_pipeline

        if not prompt.strip():
            raise UserError("Write a prompt first, e.g. 'a photo of sks dog on the beach'.")
        with self._live_lock:
            model = self._paused()[0]
            family = families.of(model)
            parts = {part: extract_model_from_parallel(m) for part, m in model.parts.items()}
            device = device_of(parts[family.denoiser])
            away = [p for p in model.all_parts if device_of(getattr(model, p)) != device]
            pipe = make_pipeline(model, device, **parts)
            images = []
            for s in strengths:
                with adapters.scaled(parts, "default", weight * s), \
                        encoded_apart(model, [prompt], device, away) as inputs:
                    images += generate(pipe, [prompt], [int(seed)], steps=int(steps), guidance=float(guidance),
                                       width=width or None, height=height or None, negative_prompt=negative_prompt,
                                       prompt_inputs=inputs)
        return images

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
            elif isinstance(e, ev.CompareReady):
                h.compare = list(zip(e.paths, e.captions))
                h.logs.append(f"Adapter off / on, same seeds: {', '.join(Path(p).name for p in e.paths)}")
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
            elif isinstance(e, ev.RunStarted):
                h.run_dir = e.run_dir
            elif isinstance(e, ev.Log):
                h.logs.append(e.message)
            h.logs_dropped += max(len(h.logs) - LOG_LIMIT, 0)  # so a poller reading "lines since N" loses none past the cap
            del h.logs[:-LOG_LIMIT]

    def snapshot(self) -> dict:
        """A copy of the history, safe to read while training goes on."""
        with self._lock:
            h = self._h
            return {
                "state": h.state, "step": h.step, "total": h.total, "losses": list(h.losses), "lrs": list(h.lrs),
                "samples": list(h.samples), "compare": list(h.compare), "checkpoints": list(h.checkpoints), "logs": list(h.logs),
                "log_count": h.logs_dropped + len(h.logs),
                "it_per_s": h.it_per_s, "eta_s": h.eta_s, "run_dir": h.run_dir, "adapter_path": h.adapter_path,
                "error": h.error, "error_detail": h.error_detail, "elapsed_s": time.time() - h.started_at if h.started_at else 0.0,
                "started_at": h.started_at,
            }


NO_BATCH = {"batch": 0, "step": 0, "steps": 0}  # no batch in progress: its size and denoising step


class ClassImagesJob(Job):
    """Class-image generation in a background thread (the GUI's Class images tab); stop and continue later.

    Image i always comes from seed `class_seed + i`, so a stopped job continues where it left off.
    """

    busy_message = "Class images are already being generated. Stop that first, or wait for it."
    thread_name = "class-images"

    def __init__(self):
        super().__init__()
        self._stop = threading.Event()
        self._state = {"state": "idle", "done": 0, "total": 0, "folder": "", "message": "", "error": "", **NO_BATCH}

    @property
    def state(self) -> str:
        return self.snapshot()["state"]

    def start(self, cfg: Config, sets: list[tuple[tuple[int, int], int]] | None = None, base=None) -> None:
        """Top up each (size, how many) set of class images in turn (`class_images.class_sets`: what training
        will use), with one running count over all of them; None: the resolution's square set."""
        from .class_images import class_dir_for, class_sets

        sets = sets or class_sets(cfg, [])

        def reset():
            self._stop.clear()
            folders = [str(class_dir_for(cfg, size)) for size, _ in sets]
            self._state = {"state": "running", "done": 0, "total": 0, "folder": folders[0], "folders": folders,
                           "message": f"Loading base model {cfg.model.base}...", "error": "", **NO_BATCH}

        def work():
            try:
                complete = self._generate(cfg, sets, base)
                with self._lock:
                    # A stop pressed while the last images were being made still leaves the sets complete.
                    self._state["state"] = "stopped" if self._stop.is_set() and not complete else "finished"
                    self._state.update(NO_BATCH)
            except Exception as e:
                if not isinstance(e, UserError):
                    logging.getLogger(__name__).exception("Class-image generation failed")
                with self._lock:
                    self._state["state"] = "failed"
                    self._state["error"] = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                    self._state["detail"] = traceback.format_exc()

        self._start(reset, work)

    def _generate(self, cfg: Config, sets, base) -> bool:
        """Make the missing images of every set; return whether all the sets are now complete."""
        from .class_images import check_class_prompt, ensure_class_images, usable_class_images
        from .models import load_base_from_config, place
        from .precision import default_device, frozen_dtype, resolve_precision

        check_class_prompt(cfg)
        device = default_device()
        dtype = frozen_dtype(resolve_precision(cfg))  # before the slow load: fp16 without a GPU fails at once
        # Counted first, so the progress is one count over every set ("5 / 6 new images", not per bucket).
        todo = [(size, want, max(0, want - len(usable_class_images(cfg, size)))) for size, want in sets]
        todo = [(size, want, missing) for size, want, missing in todo if missing]
        total = sum(missing for *_, missing in todo)
        with self._lock:
            self._state["total"] = total
        if not todo:
            return True  # nothing to make: the model is not even loaded
        if base is None:
            base = load_base_from_config(cfg)
        place(base, device, dtype)
        with self._lock:
            self._state["message"] = "Generating..."
        done, complete = 0, True
        for size, want, missing in todo:
            if self._stop.is_set():
                return False
            items = ensure_class_images(cfg, base, device, emit=self._counting_from(done, total),
                                        should_stop=self._stop.is_set, size=size, want=want)
            complete = complete and len(items) >= want
            done += missing
        return complete

    def _counting_from(self, before: int, total: int):
        """The listener for one set: its counts shifted by the images of the sets before it, out of `total`."""
        def emit(e) -> None:
            if isinstance(e, (ev.ClassImagesProgress, ev.ClassImagesStep)):
                e = replace(e, done=before + e.done, total=total)
            self._on_event(e)

        return emit

    def _on_event(self, e) -> None:
        with self._lock:
            if isinstance(e, ev.ClassImagesProgress):
                self._state.update(NO_BATCH, done=e.done, total=e.total)
            elif isinstance(e, ev.ClassImagesStep):
                self._state.update(done=e.done, total=e.total, batch=e.batch, step=e.step, steps=e.steps)
            elif isinstance(e, ev.Log):
                self._state["message"] = e.message

    def stop(self) -> bool:
        if not self.busy:
            return False
        self._stop.set()
        with self._lock:
            self._state["message"] = "Stopping..."
        return True

    def snapshot(self) -> dict:
        with self._lock:
            return {**self._state, "stopping": self._stop.is_set() and self._state["state"] == "running"}
