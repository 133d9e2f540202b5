"""What the tabs share: the app context, event binding with plain-words errors, small view helpers."""
from __future__ import annotations

import functools
import html
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from core.errors import UserError
from core.playground import Playground
from core.session import ClassImagesJob, Session

from .form import BASE_CHOICES, OTHER, SETTINGS, in_field_names

log = logging.getLogger("ui")


@dataclass
class Ctx:
    """Process-wide state: the tabs read it on every event, so a reloaded page sees the same jobs."""

    workspace: Path
    session: Session
    class_job: ClassImagesJob
    playground: Playground
    allow_pickle: bool = False  # the app was started with --allow-pickle: pickled .ckpt base models may load
    api_outputs: dict[str, list] = field(default_factory=dict)  # api name -> [(output name, component)], in order
    train_view: Any = None  # the Train tab's live view (ui.train_tab.TrainView): its loss curve lives between polls
    # The dataset, preset and settings as the user last left them in any browser tab, and when: a reloaded or a
    # second tab shows them (they are process-wide, like the running job).
    draft: dict[str, Any] = field(default_factory=dict)
    draft_at: float = 0.0
    # The Train tab's form as it was when the current run was started there (None: started otherwise): a draft
    # saved after the start with these same values is no edit (a change event can arrive after the click)
    started_form: dict[str, Any] | None = None

    @property
    def runs_dir(self) -> Path:
        return self.workspace / "runs"

    @property
    def playground_dir(self) -> Path:
        return self.workspace / "playground"


def settings_problem(e: Exception) -> str:
    """A view's line for settings it cannot use yet (shown while the user edits them; Start gives the pop-up)."""
    return f"**Check the settings:** {in_field_names(str(e))}"


def guarded(fn: Callable) -> Callable:
    """UserError -> a pop-up with its message; anything else -> a short message, traceback in the log."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as e:
            raise gr.Error(in_field_names(str(e)), duration=None, print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - a bug: tell the user briefly, keep the details for a report
            log.exception("Unexpected error in %s", getattr(fn, "__name__", fn))
            raise gr.Error(f"Something went wrong ({type(e).__name__}: {e}). The details are in the terminal "
                           "where the app runs.", duration=None, print_exception=False) from None

    return wrapper


@dataclass(frozen=True)
class Handler:
    """A handler `fn(ctx, **inputs) -> {output name: value}` with the components it reads and writes, by name."""

    fn: Callable
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    api_name: str | None = None


@dataclass
class TabParts:
    """What a tab gives the app: its components by name, and the handlers the app runs for it on its own
    triggers: `polls` on the clock (once a second), `refreshes` when the page loads and when the tab is opened."""

    components: dict[str, Any]
    polls: list[Handler] = field(default_factory=list)
    refreshes: list[Handler] = field(default_factory=list)


# Inputs whose value reaches a handler the same whether Gradio preprocesses it or not (no files, no tables).
PLAIN_INPUTS = (gr.Textbox, gr.Number, gr.Dropdown, gr.Radio, gr.Checkbox, gr.Slider, gr.State)


def bind(ctx: Ctx, event: Callable, fn: Callable, inputs: dict[str, Any] | None = None,
         outputs: dict[str, Any] | None = None, api_name: str | None = None, **kwargs):
    """Register `fn(ctx, **{name: value}) -> {name: value}` on a Gradio event.

    Inputs arrive as keyword arguments named after their field; the returned dict is keyed by output name,
    and names left out keep their value. Errors become plain-words pop-ups (see `guarded`).

    Settings fields reach the handler as sent: Gradio's own checks of a field (its minimum, its choices) would
    refuse a value in words that do not name the setting, while the form and the config check the same limits
    (they come from the config field's metadata) and name its key. Events that also take files keep Gradio's
    preprocessing.
    """
    inputs, outputs = dict(inputs or {}), outputs or {}
    names = list(outputs)
    safe = guarded(fn)

    @functools.wraps(fn)
    def run(*args, **values):
        result = safe(ctx, *args, **values) or {}
        unknown = set(result) - set(outputs)
        if unknown:
            raise KeyError(f"{fn.__name__} returned values for unknown outputs {sorted(unknown)}")
        if not names:
            return None
        if not result:  # Gradio reads an empty dict as one value: say "unchanged" for each output instead
            return gr.skip() if len(names) == 1 else [gr.skip()] * len(names)
        return {outputs[k]: v for k, v in result.items()}

    # Gradio reads the handler's signature (the names it accepts, and may pass some inputs by position): fn's, less ctx.
    signature = inspect.signature(fn)
    run.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    if SETTINGS & set(inputs) and all(isinstance(c, PLAIN_INPUTS) for c in inputs.values()):
        kwargs.setdefault("preprocess", False)
    if api_name:
        ctx.api_outputs[api_name] = [(n, outputs[n]) for n in names]
    else:
        kwargs.setdefault("api_visibility", "undocumented")
    return event(run, inputs_kwargs=inputs or None, outputs=[outputs[n] for n in names],
                 api_name=api_name, **kwargs)


def bind_handler(ctx: Ctx, event: Callable, handler: Handler, **kwargs):
    return bind(ctx, event, handler.fn, handler.inputs, handler.outputs, handler.api_name, **kwargs)


def bind_table(ctx: Ctx, c: dict[str, Any], rows: list[tuple]) -> dict[str, Any]:
    """Bind a tab's table of events; returns the events by api name (to chain on them).

    A row is (trigger, handler, input names, output names[, bind options]); a trigger is "component.event"
    ("create_btn.click") or a tuple of them (one event for all); names are looked up in `c`.
    """
    events = {}
    for trigger, fn, inputs, outputs, *options in rows:
        event = (_listener(c, trigger) if isinstance(trigger, str)
                 else functools.partial(gr.on, [_listener(c, t) for t in trigger]))
        opts = options[0] if options else {}
        dep = bind(ctx, event, fn, pick(c, inputs), pick(c, outputs), **opts)
        if opts.get("api_name"):
            events[opts["api_name"]] = dep
    return events


def pick(c: dict[str, Any], names) -> dict[str, Any]:
    """The components of these names, in this order (the order of a handler's API outputs)."""
    return {n: c[n] for n in names}


def _listener(c: dict[str, Any], trigger: str) -> Callable:
    name, event = trigger.split(".")
    return getattr(c[name], event)


# --------------------------------------------------------------------------- base-model picker

def model_picker(prefix: str, label: str = "Base model", value: str = "demo", other: str = ""):
    """A dropdown (demo, tiny, other) and a text box for the other model, shown when "Other" is chosen."""
    with gr.Group():
        choice = gr.Dropdown(BASE_CHOICES, value=value, label=label, elem_id=f"{prefix}-base",
                             info="The model you teach. The demo model is tiny and fast; for real photos use an SD 1.x/2.x, "
                                  "SDXL or FLUX.1 model (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5, "
                                  "stabilityai/stable-diffusion-xl-base-1.0, an SDXL .safetensors file, or "
                                  "flux1-dev.safetensors with its text encoders and VAE beside it).")
        other_box = gr.Textbox(other, label="Other base model", visible=value == OTHER, elem_id=f"{prefix}-base-other",
                               placeholder="org/name, /path/to/diffusers-folder or /path/to/model.safetensors")
    choice.change(show_other, choice, other_box, show_progress="hidden", api_visibility="undocumented", queue=False)
    return choice, other_box


def show_other(choice: str):
    return gr.update(visible=choice == OTHER)


def link_pickers(a: tuple, b: tuple) -> None:
    """Keep two pickers (on two tabs) showing the same model: a user's change to one is copied to the other."""
    for src, dst in ((a, b), (b, a)):
        for s, d in zip(src, dst):
            s.input(same, s, d, show_progress="hidden", api_visibility="undocumented", queue=False)


def same(value):
    return value


# --------------------------------------------------------------------------- view helpers

def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


STATE_WORDS = {
    "idle": "Not started", "running": "Training", "paused": "Paused", "stopping": "Stopping",
    "finished": "Finished", "stopped": "Stopped", "failed": "Failed",
}


def progress_html(label: str, done: float, total: int, detail: str = "", state: str = "running") -> str:
    pct = 0 if not total else max(0.0, min(100.0, 100.0 * done / total))
    return (f'<div class="db-progress db-{html.escape(state)}"><div class="db-bar-outer">'
            f'<div class="db-bar" style="width:{pct:.1f}%"></div></div>'
            f'<div class="db-progress-text"><b>{html.escape(label)}</b>'
            f'{" · " + html.escape(detail) if detail else ""}</div></div>')


def error_html(message: str) -> str:
    return f'<div class="db-error"><b>Something stopped the job:</b> {html.escape(message)}</div>' if message else ""


CSS = """
.db-progress { margin: 4px 0 8px 0; }
.db-bar-outer { height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; }
.dark .db-bar-outer { background: var(--neutral-700); }
.db-bar { height: 100%; background: var(--color-accent); transition: width 0.4s ease; }
.db-paused .db-bar { background: var(--neutral-400); }
.db-failed .db-bar { background: #dc2626; }
.db-progress-text { margin-top: 4px; font-size: 0.95em; }
.db-error { border: 1px solid #dc2626; background: #fef2f2; color: #7f1d1d; border-radius: 8px; padding: 8px 12px; }
.db-note { color: var(--body-text-color-subdued); font-size: 0.92em; }
#db-header h1 { margin-bottom: 0; }
.db-bottom { align-items: flex-end !important; }
#pg-image img { min-width: min(256px, 100%); object-fit: contain; }
#db-log textarea { font-family: var(--font-mono); font-size: 0.85em; }
/* captions (sample prompts, file names) wrap instead of being cut after a few characters */
#tr-samples .caption-label, #ds-gallery .caption-label, #ds-crops .caption-label {
  white-space: normal; overflow-wrap: anywhere; max-width: calc(100% - 8px); font-size: 0.72em; line-height: 1.25; }
/* a long adapter name stops before the dropdown's arrow */
[id^="pg-adapter-"] input { padding-right: 2.2em; text-overflow: ellipsis; }
"""
