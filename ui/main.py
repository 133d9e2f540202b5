"""The Gradio app: four tabs over one process-wide session.

`build_app(workspace)` lays out the tabs and wires their events; `launch(args)` serves it (127.0.0.1 unless
told otherwise, and never on the network without a password). State lives in the `Ctx` (the session, the
class-image job, the playground), not in the browser: a reloaded page re-attaches to a running job.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: no telemetry

import gradio as gr  # noqa: E402

from core.datasets import datasets_root, list_datasets  # noqa: E402
from core.playground import Playground  # noqa: E402
from core.session import ClassImagesJob, Session, leave_a_core  # noqa: E402

from . import class_tab, dataset_tab, playground_tab, train_tab  # noqa: E402
from .common import CSS, Ctx, bind, bind_handler, link_pickers, pick  # noqa: E402
from .form import form_values, initial_config  # noqa: E402

log = logging.getLogger("ui")
DEFAULT_WORKSPACE = "workspace"


def theme():
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate")


def build_app(workspace: str | Path | None = None, session: Session | None = None,
              allow_pickle: bool = False) -> gr.Blocks:
    """The app; `workspace` holds datasets/, class_images/, runs/, adapters/, presets/ and playground/."""
    workspace = Path(workspace or DEFAULT_WORKSPACE).expanduser().resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    session = session or Session()
    ctx = Ctx(workspace, session, ClassImagesJob(), Playground(allow_pickle=allow_pickle), allow_pickle=allow_pickle,
              train_view=train_tab.TrainView(session))
    start = initial_config()
    initial = form_values(start, skip_dataset_keys=True)
    initial["pg_prompt"] = start.get("data", {}).get("instance_prompt", "")  # the playground starts on the demo subject's prompt
    initial.update(instance_prompt="", class_prompt="", run_name="")

    with gr.Blocks(title="DreamBooth adapters") as app:
        gr.Markdown("# DreamBooth adapters\nTeach Stable Diffusion your subject from a few photos: "
                    "**1. Dataset → 2. Class images → 3. Train → 4. Playground.** "
                    "Everything stays on this computer; "
                    f"files go to `{workspace}`.", elem_id="db-header")
        with gr.Tabs():
            with gr.Tab("1. Dataset", id="dataset", elem_id="tab-dataset") as t_data:
                d = dataset_tab.build(ctx, initial)
            with gr.Tab("2. Class images", id="class", elem_id="tab-class") as t_class:
                k = class_tab.build(ctx, initial)
            with gr.Tab("3. Train", id="train", elem_id="tab-train") as t_train:
                t = train_tab.build(ctx, initial)
            with gr.Tab("4. Playground", id="playground", elem_id="tab-playground") as t_play:
                p = playground_tab.build(ctx, initial)

        # Each tab's events may read or write a few components of the tabs before it.
        tabs = [(t_data, dataset_tab.wire(ctx, d | {"class_prompt": k["class_prompt"]} | t)),
                (t_class, class_tab.wire(ctx, k | {name: (d | t)[name] for name in class_tab.FROM_OTHER_TABS})),
                (t_train, train_tab.wire(ctx, d | k | t)),
                (t_play, playground_tab.wire(ctx, p))]
        link_pickers((k["base_choice"], k["base_other"]), (t["base_choice"], t["base_other"]))

        # One clock: the live views poll the process-wide state once a second, outside the queue (they only read a
        # snapshot: one request each, no event stream) and with no progress overlay (it would blink on every output
        # each second). Both lighten the page's work per tick; the run history (launch_kwargs) was the most of it.
        timer = gr.Timer(1.0)
        for _, parts in tabs:
            for handler in parts.polls:
                bind_handler(ctx, timer.tick, handler, show_progress="hidden", queue=False)
        # What may have changed on disk (lists, counts) is read again when the page loads and when a tab is opened.
        for tab, parts in tabs:
            for handler in parts.refreshes:
                bind_handler(ctx, app.load, handler)
                bind_handler(ctx, tab.select, handler, show_progress="hidden")
        remembered = pick(d | k | t, DRAFT)
        bind(ctx, functools.partial(gr.on, [c.change for c in remembered.values()]), remember, remembered, {},
             api_name="remember_form", show_progress="hidden", trigger_mode="always_last")
        bind(ctx, app.load, restore, {}, remembered | pick(d, RESTORED_VIEW))

    app.ctx = ctx
    app.api_outputs = ctx.api_outputs
    return app


# What a reloaded (or a second) tab gets back: the chosen dataset and preset and every setting.
DRAFT = ("dataset", "preset") + train_tab.FORM
# What it shows of that dataset.
RESTORED_VIEW = ("gallery", "report", "crops", "captions", "identifier", "class_noun", "token_info", "selected",
                 "add_msg")


def remember(ctx: Ctx, **values) -> dict:
    """Keep the form as the user left it (any tab), so that a reload or a second tab shows the same."""
    ctx.draft, ctx.draft_at = dict(values), time.time()
    return {}


def edited_since_start(ctx: Ctx) -> bool:
    """Whether the draft differs from the form the current run was started with (a change event of the form can
    reach the server after the Start click: that is not an edit)."""
    if ctx.started_form is None:
        return True
    return any(ctx.draft.get(k) != v for k, v in ctx.started_form.items() if k in ctx.draft)


def restore(ctx: Ctx) -> dict:
    """A loaded page shows what the user last had: the form as left in any tab, or, when a run started after that,
    the settings of that run (running or ended); on a first start, the demo subject."""
    cfg, started = ctx.session.config, ctx.session.snapshot()["started_at"]
    if ctx.draft and (cfg is None or ctx.draft_at >= started and edited_since_start(ctx)):
        values = dict(ctx.draft)
        dataset = values["dataset"]
    elif cfg is not None:
        values = form_values(cfg.to_dict())
        values["preset"] = None  # the run's settings, whichever preset they came from
        folder = Path(cfg.data.instance_dir)
        own = folder.parent == datasets_root(ctx.workspace) and folder.is_dir()
        dataset = folder.name if own else None
        values.update(instance_prompt=cfg.data.instance_prompt, class_prompt=cfg.data.class_prompt)
    elif not list_datasets(ctx.workspace) and dataset_tab.DEMO_SUBJECT.is_dir():
        # First start (an empty workspace): the demo subject is set up and selected, so Start works at once.
        return dataset_tab.demo_dataset(ctx, initial_config()["data"]["resolution"])
    else:
        return {}
    values.pop("dataset", None)
    if dataset and dataset in list_datasets(ctx.workspace):
        prompts = {k: values[k] for k in ("instance_prompt", "class_prompt") if k in values}
        shape = {name: values[name] for name in dataset_tab.SHAPE_IN if name in values}
        values.update(dataset_tab.dataset_view(ctx, dataset, values.get("resolution"), **shape))
        values.update(dataset_tab.dataset_settings(ctx, dataset))
        values.update(prompts)  # as the user left them, over what the dataset remembers
        values["dataset"] = gr.update(choices=list_datasets(ctx.workspace), value=dataset)
    return values


# The Train tab's log follows its newest line, unless the reader has scrolled up to read an older one. (The
# Textbox's own autoscroll left it at the top when the poll replaced its whole value.)
FOLLOW_LOG_JS = """
() => {
  const seen = new WeakMap();  // textarea -> its scrollHeight at the last look
  setInterval(() => {
    for (const t of document.querySelectorAll('#db-log textarea')) {
      const before = seen.get(t);
      const wasAtEnd = before === undefined || t.scrollTop + t.clientHeight >= before - 4;
      if (t.scrollHeight !== before && wasAtEnd) t.scrollTop = t.scrollHeight;
      seen.set(t, t.scrollHeight);
    }
  }, 400);
}
"""


def launch_kwargs(app: gr.Blocks) -> dict:
    """What every launch passes: the theme, CSS and script (Gradio 6 takes them here), and files limited to the
    workspace. No run history: Gradio would keep every call (prompts, paths, outputs) in the browser's storage,
    rewriting its 100-call list on each of the once-a-second polls, which kept a CPU core of the browser busy
    and slowed a CPU training run beside it about three-fold."""
    return {"theme": theme(), "css": CSS, "js": FOLLOW_LOG_JS, "allowed_paths": [str(app.ctx.workspace)],
            "ssr_mode": False, "footer_links": [], "show_error": True, "run_history": False}


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like user:password (both parts non-empty).")
    return user, password


def serving_problem(args) -> str | None:
    """Why these flags must not be used as given, in plain words; None when they are fine."""
    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    public = args.share or host not in ("127.0.0.1", "localhost", "::1")
    if public and not args.auth:
        how = "--share" if args.share else ("--listen" if args.listen else f"--host {host}")
        return (f"Refusing to start: {how} makes the app reachable by other computers, and anyone who reaches it "
                "can read your images and use your GPU. Add a login with --auth user:password (or leave out "
                f"{how} to keep the app on this computer only).")
    try:
        parse_auth(args.auth)
    except ValueError as e:
        return str(e)
    return None


def launch(args) -> int:
    """Serve the app until Ctrl+C; 2 with a message for unsafe or malformed serving flags."""
    problem = serving_problem(args)
    if problem:
        print(f"Error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    print("Starting the app (loading the libraries takes a few seconds)...", flush=True)
    app = build_app(workspace=args.workspace, allow_pickle=getattr(args, "allow_pickle", False))
    leave_a_core()  # the page beside a CPU run
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=args.port, share=args.share, auth=parse_auth(args.auth),
               inbrowser=False, quiet=True, prevent_thread_lock=True, **launch_kwargs(app))
    print(f"The app is running: open {app.local_url} in your browser. Files go to {app.ctx.workspace}.")
    if host != "127.0.0.1":
        print(f"It listens on {host}:{app.server_port}; a login is required.")
    if args.share and app.share_url:
        print(f"Public link: {app.share_url}")
    print("Press Ctrl+C to stop (a running training is stopped cleanly first).", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        if app.ctx.session.busy:
            print("Stopping the training run (saving a checkpoint)...", flush=True)
            app.ctx.session.stop()
            app.ctx.session.wait()
        app.close()
    return 0
