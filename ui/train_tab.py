"""Train tab: the settings form, presets, the step maths, the controls and the live view of the run."""
from __future__ import annotations

import functools
import logging
import threading

import gradio as gr
import numpy as np
import pandas as pd

from core import vram
from core.config import TEXT_ENCODER_TARGETS_ALL, UNET_TARGETS_ATTENTION, UNET_TARGETS_FULL
from core.data import scan_folder
from core.datasets import dataset_dir
from core.errors import UserError
from core.runs import measured_seconds_per_step
from core.rundir import RunDir, list_runs
from core.trainer import preflight

from .common import STATE_WORDS, Ctx, bind, error_html, fmt_duration, model_picker, progress_html
from .dataset_tab import MIN_SIZE
from .form import (DEFAULT_PRESET, form_config, form_values, preset_config, preset_names, save_preset)

MAX_POINTS = 500  # the loss plot shows at most this many points per curve (bucket means beyond that)
EMA_ALPHA = 0.05  # smoothing of the "smoothed" curve (about a 40-step window)
LOG_TAIL = 40
SAMPLES_SHOWN = 40  # besides the step-0 baseline
BUTTONS = {  # which controls make sense in each state
    "start_btn": ("idle", "finished", "stopped", "failed"),
    "pause_btn": ("running",),
    "resume_btn": ("paused",),
    "stop_btn": ("running", "paused"),
    "sample_btn": ("running", "paused"),
    "save_btn": ("running", "paused"),
}
ADAPTER_TYPES = [("LoRA", "lora"), ("LoHa", "loha"), ("LoKr", "lokr")]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- live view (the polling handler)

class LossCurve:
    """The loss history as numpy arrays, extended by the new points of each poll (not rebuilt every second)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.run_id = None
        self.steps = np.empty(0)
        self.loss = np.empty(0)
        self.ema = np.empty(0)
        self._num = self._den = 0.0  # bias-corrected EMA state (as pandas' ewm(adjust=True))

    def update(self, run_id, losses: list[tuple[int, float]]) -> None:
        if run_id != self.run_id or len(losses) < len(self.loss):
            self.run_id, self.steps, self.loss, self.ema = run_id, np.empty(0), np.empty(0), np.empty(0)
            self._num = self._den = 0.0
        new = losses[len(self.loss):]
        if not new:
            return
        arr = np.asarray(new, dtype=np.float64).reshape(-1, 2)
        decay = 1.0 - EMA_ALPHA
        # EMA of the new points continuing from the stored state, vectorised: with w_k = decay^(n-1-k),
        # num_n = decay^n * num_0 + sum_k w_k x_k and den_n likewise (chunks keep the powers in range).
        ema_parts = []
        for chunk in np.array_split(arr[:, 1], max(1, len(arr) // 256)):
            n = len(chunk)
            powers = decay ** np.arange(1, n + 1)
            cum = np.cumsum(chunk / powers) * powers
            num = decay ** np.arange(1, n + 1) * self._num + cum
            den = decay ** np.arange(1, n + 1) * self._den + np.cumsum(1 / powers) * powers
            ema_parts.append(num / den)
            self._num, self._den = num[-1], den[-1]
        self.steps = np.concatenate([self.steps, arr[:, 0]])
        self.loss = np.concatenate([self.loss, arr[:, 1]])
        self.ema = np.concatenate([self.ema, *ema_parts])

    def frame(self, run_id, losses) -> pd.DataFrame:
        with self._lock:
            self.update(run_id, losses)
            n = len(self.loss)
            if n > MAX_POINTS:  # bucket means for the raw curve, the EMA at each bucket's end
                edges = np.linspace(0, n, MAX_POINTS + 1).astype(int)
                counts = np.diff(edges)
                steps = self.steps[edges[1:] - 1]
                raw = np.add.reduceat(self.loss, edges[:-1]) / counts
                smooth = self.ema[edges[1:] - 1]
            else:
                steps, raw, smooth = self.steps, self.loss, self.ema
        m = len(steps)
        # A categorical "curve" column: even an empty frame must say it is a name, not a number (the plot
        # keeps the column types of the first data it gets).
        curve = pd.Categorical(["loss"] * m + ["smoothed"] * m, categories=["loss", "smoothed"])
        return pd.DataFrame({"step": np.concatenate([steps, steps]).astype(int), "loss": np.concatenate([raw, smooth]),
                             "curve": curve})


def status_html(snap: dict) -> str:
    state, step, total = snap["state"], snap["step"], snap["total"]
    if state == "idle":
        return progress_html("Not started", 0, 1, "set up the form above and press Start", "idle")
    parts = [f"step {step} / {total}"]
    if state == "running" and not snap["losses"]:
        last = snap["logs"][-1] if snap["logs"] else ""
        parts = [f"preparing: {last}" if last else "preparing"]
    elif state in ("running", "paused", "stopping") and snap["it_per_s"]:
        rate = snap["it_per_s"]
        parts.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/step")
        if state == "running":
            parts.append(f"about {fmt_duration(snap['eta_s'])} left")
    if snap["elapsed_s"] and state in ("running", "paused", "stopping"):
        parts.append(f"{fmt_duration(snap['elapsed_s'])} since start")
    if state in ("finished", "stopped") and snap["adapter_path"]:
        parts.append(f"adapter: {snap['adapter_path']}")
    elif snap["run_dir"]:
        parts.append(f"run folder: {snap['run_dir']}")
    return progress_html(STATE_WORDS.get(state, state), step, total or 1, " · ".join(parts), state)


def samples_value(samples: list[tuple[int, str, str]]) -> list[tuple[str, str]]:
    """Step-0 baseline first, then the newest samples, oldest to newest, each labelled with its step."""
    baseline = [s for s in samples if s[0] == 0]
    later = [s for s in samples if s[0] != 0][-SAMPLES_SHOWN:]
    return [(path, f"step {step}: {prompt}") for step, path, prompt in baseline + later]


class TrainView:
    """Turns the session's snapshot into the Train tab's live outputs, sending only what changed."""

    def __init__(self, session):
        self.session = session
        self.curve = LossCurve()

    def poll(self, sent: dict | None) -> tuple[dict, dict]:
        """({output name: value} for the outputs that changed, the new record of what was sent)."""
        snap = self.session.snapshot()
        sent = dict(sent or {})
        out: dict = {}
        run = snap["started_at"]
        state = snap["state"]

        def put(name, signature, make):
            if sent.get(name) != signature:
                out[name] = make()
                sent[name] = signature

        moving = state in ("running", "stopping")
        put("train_status", (run, state, snap["step"], snap["run_dir"], snap["adapter_path"], len(snap["logs"]),
                             int(snap["elapsed_s"]) if moving else 0), lambda: status_html(snap))
        # No frame without points: the plot takes its legend (the curve names) from the first data it gets.
        put("loss_plot", (run, len(snap["losses"])),
            lambda: self.curve.frame(run, snap["losses"]) if snap["losses"] else None)
        put("samples", (run, len(snap["samples"])), lambda: samples_value(snap["samples"]))
        put("log", (run, len(snap["logs"]), snap["logs"][-1] if snap["logs"] else ""),
            lambda: "\n".join(snap["logs"][-LOG_TAIL:]))
        put("train_error", (run, snap["error"]), lambda: error_html(snap["error"]))
        put("error_detail", (run, snap["error_detail"]),
            lambda: gr.update(value=snap["error_detail"], visible=bool(snap["error_detail"])))
        for name, states in BUTTONS.items():
            put(name, state in states, lambda states=states: gr.update(interactive=state in states))
        return out, sent


# --------------------------------------------------------------------------- step maths

def rough_seconds_per_step(base: str, resolution: int, batch: int, cuda: bool) -> float:
    """A first guess before any run was measured: SD at 512 px is about 0.5 s per step on a consumer GPU."""
    pixels = (resolution / 512) ** 2 * batch
    if base == "tiny":
        return 0.05
    if base == "demo":
        return (0.05 if cuda else 0.4) * max(pixels * 64, 1)
    return (0.5 if cuda else 30.0) * pixels


def step_maths(ctx: Ctx, dataset: str, values: dict) -> str:
    """images x repeats x epochs / batch = steps, in words, and an estimated time."""
    import torch

    try:
        cfg = form_config(values, ctx.workspace, allow_pickle=ctx.allow_pickle)
    except UserError as e:
        return f"**Check the settings:** {e}"
    t, d = cfg.train, cfg.data
    try:
        images = len(scan_folder(dataset_dir(ctx.workspace, dataset), min_size=MIN_SIZE).images) if dataset else 0
    except UserError:
        images = 0
    batch = t.batch_size * t.gradient_accumulation_steps
    lines = []
    if images:
        per_epoch = images * d.repeats
        epochs = t.max_steps * batch / per_epoch
        shown = f"{epochs:.0f}" if epochs >= 10 else f"{epochs:.1f}"
        lines.append(f"**{images} images × {d.repeats} repeat{'s' if d.repeats != 1 else ''} × {shown} epochs "
                     f"÷ batch {batch} = {t.max_steps} steps.** Each image is seen about "
                     f"{t.max_steps * batch / images:.0f} times.")
    else:
        lines.append(f"**{t.max_steps} steps** at batch {batch}. Pick a dataset with images on the Dataset tab.")
    if t.prior_preservation:
        lines.append(f"Prior preservation: each step also trains on {t.batch_size} class image"
                     f"{'s' if t.batch_size != 1 else ''} (*{d.class_prompt or 'no class prompt yet'}*); "
                     f"{d.num_class_images} are needed.")
    cuda = torch.cuda.is_available()
    measured = measured_seconds_per_step(ctx.runs_dir, cfg.model.base, d.resolution, t.batch_size)
    per_step = measured or rough_seconds_per_step(cfg.model.base, d.resolution, batch, cuda)
    how = "measured on your last run with this model, size and batch" if measured else "a rough guess"
    extra = f"; plus the samples every {t.sample_every} steps" if t.sample_every else ""
    lines.append(f"Estimated training time: **about {fmt_duration(t.max_steps * per_step)}** ({how}{extra}).")
    try:
        lines.append(vram.advice(cfg, vram.free_gpu_memory()))
    except Exception as e:  # noqa: BLE001 - a model the planner cannot read: the run itself will say why
        log.info("VRAM planner: %s", e)
    return "\n\n".join(lines)


# --------------------------------------------------------------------------- layout

def build(ctx: Ctx, initial: dict) -> dict:
    c: dict = {}
    with gr.Row(elem_classes="db-bottom"):
        c["preset"] = gr.Dropdown(preset_names(ctx.workspace), value=DEFAULT_PRESET if DEFAULT_PRESET in
                                  preset_names(ctx.workspace) else None, label="Preset", scale=3, elem_id="tr-preset",
                                  info="A starting point: loading one fills in the settings below.")
        c["load_preset_btn"] = gr.Button("Load preset", scale=0, min_width=150, elem_id="tr-load-preset")
        c["preset_name"] = gr.Textbox("", label="Save these settings as a preset", placeholder="my-preset", scale=2,
                                      elem_id="tr-preset-name", info="Everything except dataset, prompts, run name.")
        c["save_preset_btn"] = gr.Button("Save preset", scale=0, min_width=150, elem_id="tr-save-preset")
    c["preset_msg"] = gr.Markdown(elem_id="tr-preset-msg")
    c["base_choice"], c["base_other"] = model_picker("tr", value=initial["base_choice"], other=initial["base_other"])
    with gr.Row():
        c["adapter_type"] = gr.Radio(ADAPTER_TYPES, value=initial["adapter_type"], label="Adapter", elem_id="tr-type",
                                     info="LoRA: the standard. LoHa / LoKr: more expressive per parameter.")
        c["rank"] = gr.Number(initial["rank"], label="Rank", precision=0, minimum=1, elem_id="tr-rank",
                              info="Size of the adapter; 4-32.")
        c["alpha"] = gr.Number(initial["alpha"], label="Alpha", minimum=0, elem_id="tr-alpha",
                               info="Strength scale; usually = rank.")
        c["train_text_encoder"] = gr.Checkbox(initial["train_text_encoder"], label="Train the text encoder too",
                                              elem_id="tr-te", info="Better likeness, larger file.")
    with gr.Row():
        c["max_steps"] = gr.Number(initial["max_steps"], label="Steps", precision=0, minimum=1, elem_id="tr-steps")
        c["learning_rate"] = gr.Number(initial["learning_rate"], label="Learning rate", minimum=0, step=1e-5,
                                       elem_id="tr-lr")
        c["batch_size"] = gr.Number(initial["batch_size"], label="Batch size", precision=0, minimum=1,
                                    elem_id="tr-batch")
        c["prior_preservation"] = gr.Checkbox(initial["prior_preservation"], label="Prior preservation",
                                              elem_id="tr-prior", info="Uses the class images (Class images tab).")
        c["prior_loss_weight"] = gr.Number(initial["prior_loss_weight"], label="Prior weight", minimum=0, step=0.1,
                                           elem_id="tr-prior-weight")
    c["run_name"] = gr.Textbox("", label="Run name (optional)", placeholder="e.g. rex-v1; empty: type and date",
                               elem_id="tr-run-name")
    with gr.Accordion("Advanced options", open=False, elem_id="tr-advanced"):
        with gr.Row():
            c["repeats"] = gr.Number(initial["repeats"], label="Repeats per epoch", precision=0, minimum=1)
            c["lr_scheduler"] = gr.Dropdown(["constant", "constant_with_warmup", "linear", "cosine"],
                                            value=initial["lr_scheduler"], label="Learning-rate schedule")
            c["lr_warmup_steps"] = gr.Number(initial["lr_warmup_steps"], label="Warm-up steps", precision=0, minimum=0)
            c["seed"] = gr.Number(initial["seed"], label="Seed", precision=0)
        with gr.Row():
            c["text_encoder_learning_rate"] = gr.Number(initial["text_encoder_learning_rate"],
                                                        label="Text encoder learning rate", info="0: same as the UNet.")
            c["text_encoder_rank"] = gr.Number(initial["text_encoder_rank"], label="Text encoder rank", precision=0,
                                               info="0: same as rank.")
            c["text_encoder_alpha"] = gr.Number(initial["text_encoder_alpha"], label="Text encoder alpha",
                                                info="0: same as alpha.")
            c["dropout"] = gr.Number(initial["dropout"], label="Dropout", minimum=0, maximum=0.99, step=0.05)
            c["module_dropout"] = gr.Number(initial["module_dropout"], label="Module dropout (LoHa/LoKr)",
                                            minimum=0, maximum=0.99, step=0.05)
        with gr.Row():
            c["mixed_precision"] = gr.Dropdown(["auto", "no", "fp16", "bf16"], value=initial["mixed_precision"],
                                               label="Mixed precision", info="auto: fp16 on an NVIDIA GPU.")
            c["optimizer"] = gr.Dropdown(["adamw", "adamw8bit"], value=initial["optimizer"], label="Optimizer")
            c["gradient_accumulation_steps"] = gr.Number(initial["gradient_accumulation_steps"], precision=0,
                                                         minimum=1, label="Gradient accumulation")
            c["max_grad_norm"] = gr.Number(initial["max_grad_norm"], label="Gradient clipping", minimum=0)
            c["min_snr_gamma"] = gr.Number(initial["min_snr_gamma"], label="Min-SNR gamma", minimum=0,
                                           info="0: off; 5 is usual.")
            c["noise_offset"] = gr.Number(initial["noise_offset"], label="Noise offset", minimum=0, step=0.01)
        with gr.Row():
            c["gradient_checkpointing"] = gr.Checkbox(initial["gradient_checkpointing"],
                                                      label="Gradient checkpointing (less memory, slower)")
            c["cache_latents"] = gr.Checkbox(initial["cache_latents"], label="Cache latents")
            c["center_crop"] = gr.Checkbox(initial["center_crop"], label="Centre crop (off: random crops)")
            c["random_flip"] = gr.Checkbox(initial["random_flip"], label="Random flips")
        with gr.Row():
            c["sample_every"] = gr.Number(initial["sample_every"], label="Sample every (steps)", precision=0,
                                          minimum=0, info="0: no samples.", elem_id="tr-sample-every")
            c["sample_steps"] = gr.Number(initial["sample_steps"], label="Sample steps", precision=0, minimum=1,
                                          elem_id="tr-sample-steps")
            c["sample_guidance"] = gr.Number(initial["sample_guidance"], label="Sample guidance", minimum=0)
            c["checkpoint_every"] = gr.Number(initial["checkpoint_every"], label="Checkpoint every (steps)",
                                              precision=0, minimum=0, info="0: only at the end and on stop.")
        c["sample_prompts"] = gr.Textbox(initial["sample_prompts"], label="Sample prompts (one per line)", lines=3,
                                         info="Empty: the instance prompt and the class prompt.")
        with gr.Row():
            c["unet_targets"] = gr.Textbox(initial["unet_targets"], label="UNet target modules", scale=3,
                                           info=f"Attention only: {', '.join(UNET_TARGETS_ATTENTION)}. "
                                                f"Full set: {', '.join(UNET_TARGETS_FULL)}.")
            c["text_encoder_targets"] = gr.Textbox(initial["text_encoder_targets"], label="Text encoder targets",
                                                   scale=2, info=f"Choices: {', '.join(TEXT_ENCODER_TARGETS_ALL)}.")
        with gr.Row():
            c["decompose_both"] = gr.Checkbox(initial["decompose_both"], label="LoKr: decompose both factors")
            c["decompose_factor"] = gr.Number(initial["decompose_factor"], label="LoKr: factor", precision=0,
                                              info="-1: as square as possible.")
            c["use_effective_conv2d"] = gr.Checkbox(initial["use_effective_conv2d"],
                                                    label="LoHa/LoKr: effective conv2d")
    c["maths"] = gr.Markdown(elem_id="tr-maths")
    with gr.Row():
        c["start_btn"] = gr.Button("Start training", variant="primary", elem_id="tr-start")
        c["pause_btn"] = gr.Button("Pause", interactive=False, elem_id="tr-pause")
        c["resume_btn"] = gr.Button("Resume", interactive=False, elem_id="tr-resume")
        c["stop_btn"] = gr.Button("Stop", variant="stop", interactive=False, elem_id="tr-stop")
        c["sample_btn"] = gr.Button("Sample now", interactive=False, elem_id="tr-sample")
        c["save_btn"] = gr.Button("Save now", interactive=False, elem_id="tr-save")
    c["train_status"] = gr.HTML(elem_id="tr-status")
    c["train_error"] = gr.HTML(elem_id="tr-error")
    c["error_detail"] = gr.Textbox("", label="Technical details (for a bug report)", lines=6, max_lines=12,
                                   visible=False, elem_id="tr-error-detail")
    with gr.Row(equal_height=True):
        c["loss_plot"] = gr.LinePlot(None, x="step", y="loss",
                                     color="curve", title="Loss", height=320, elem_id="tr-loss",
                                     color_map={"loss": "#a5b4fc", "smoothed": "#4338ca"},
                                     colors_in_legend=["loss", "smoothed"], scale=1)
        c["samples"] = gr.Gallery(label="Samples (step 0 = before training)", columns=4, height=320,
                                  object_fit="contain", elem_id="tr-samples", scale=1)
    c["log"] = gr.Textbox("", label="Log", lines=8, max_lines=8, autoscroll=True, elem_id="db-log")
    with gr.Accordion("Continue an earlier run", open=False):
        with gr.Row(elem_classes="db-bottom"):
            c["resume_run"] = gr.Dropdown(resumable_runs(ctx), label="Stopped run (continues from its last checkpoint)", scale=3,
                                          elem_id="tr-resume-run")
            c["continue_btn"] = gr.Button("Continue run", scale=0, min_width=160, elem_id="tr-continue")
    c["train_sent"] = gr.State(None)
    return c


def resumable_runs(ctx: Ctx) -> list[str]:
    return sorted((run.name for run in list_runs(ctx.runs_dir) if run.latest_checkpoint() is not None), key=str.lower)


def wire(ctx: Ctx, c: dict, form: dict, dataset) -> None:
    """`form`: every settings field of every tab by name (see ui/form.py); `dataset`: the Dataset tab's dropdown."""
    view = TrainView(ctx.session)
    live_out = {k: c[k] for k in ("train_status", "loss_plot", "samples", "log", "train_error", "error_detail",
                                  *BUTTONS)}

    def live(train_sent=None):
        out, sent = view.poll(train_sent)
        return {**out, "train_sent": sent}

    poll_out = live_out | {"train_sent": c["train_sent"]}
    c["poll"], c["poll_inputs"], c["poll_outputs"] = live, {"train_sent": c["train_sent"]}, poll_out

    # Step maths: redrawn when anything it depends on changes.
    maths_names = ("max_steps", "batch_size", "repeats", "gradient_accumulation_steps", "prior_preservation",
                   "num_class_images", "class_prompt", "resolution", "base_choice", "base_other", "sample_every",
                   "adapter_type", "rank", "train_text_encoder", "text_encoder_rank", "mixed_precision", "optimizer",
                   "gradient_checkpointing", "unet_targets", "text_encoder_targets")

    def maths(dataset, **values):
        return {"maths": step_maths(ctx, dataset, values)}

    maths_in = {"dataset": dataset} | form
    triggers = [form[n].change for n in maths_names] + [dataset.change]
    bind(ctx, functools.partial(gr.on, triggers), maths, maths_in, {"maths": c["maths"]}, api_name="step_maths",
         show_progress="hidden", trigger_mode="always_last")
    c["maths_fn"], c["maths_in"] = maths, maths_in

    def start(dataset, **values):
        if ctx.class_job.busy:
            raise UserError("Class images are being generated (Class images tab). Wait for them, or stop that first.")
        cfg = form_config(values, ctx.workspace, dataset or "", ctx.allow_pickle)  # "": a plain "No dataset chosen" error
        preflight(cfg)  # the trainer's own checks, now rather than after the model has loaded
        ctx.session.start(cfg)
        return live()

    bind(ctx, c["start_btn"].click, start, {"dataset": dataset} | form, poll_out, api_name="start_training")

    def command(name):
        def run():
            if not getattr(ctx.session, name)():
                raise UserError("No training run is going.")
            return live()
        run.__name__ = name
        return run

    for btn, name in (("pause_btn", "pause"), ("resume_btn", "resume"), ("stop_btn", "stop"),
                      ("sample_btn", "sample_now"), ("save_btn", "save_now")):
        bind(ctx, c[btn].click, command(name), {}, poll_out, api_name=name)

    def continue_run(resume_run):
        if not resume_run:
            raise UserError("Choose a stopped run to continue.")
        run_dir = RunDir(ctx.runs_dir / resume_run)
        ctx.session.start(run_dir.read_config(), resume_dir=run_dir.path)
        return live()

    bind(ctx, c["continue_btn"].click, continue_run, {"resume_run": c["resume_run"]}, poll_out,
         api_name="continue_run")

    # Presets
    preset_fields = {k: v for k, v in form.items()}

    def load(preset):
        cfg = preset_config(ctx.workspace, preset)
        values = form_values(cfg, names=set(preset_fields), skip_dataset_keys=True)
        return {**values, "preset_msg": f"Loaded preset **{preset}**. Dataset, prompts and run name are unchanged "
                                        "(they come from the Dataset and Class images tabs)."}

    load_out = {k: v for k, v in preset_fields.items() if k not in ("instance_prompt", "class_prompt", "run_name")}
    bind(ctx, c["load_preset_btn"].click, load, {"preset": c["preset"]}, load_out | {"preset_msg": c["preset_msg"]},
         api_name="load_preset")

    def save(preset_name, **values):
        cfg = form_config(values, ctx.workspace, allow_pickle=ctx.allow_pickle)
        path = save_preset(ctx.workspace, preset_name, cfg)
        return {"preset": gr.update(choices=_preset_names(ctx), value=path.stem), "preset_name": "",
                "preset_msg": f"Saved preset **{path.stem}** to `{path}`."}

    bind(ctx, c["save_preset_btn"].click, save, {"preset_name": c["preset_name"]} | form,
         {k: c[k] for k in ("preset", "preset_name", "preset_msg")}, api_name="save_preset")


def _preset_names(ctx: Ctx) -> list[str]:
    return preset_names(ctx.workspace)


def refresh(ctx: Ctx) -> dict:
    return {"resume_run": gr.update(choices=resumable_runs(ctx)), "preset": gr.update(choices=_preset_names(ctx))}
