"""Train tab: the settings form, presets, the step maths, the controls and the live view of the run."""
from __future__ import annotations

import logging
import os
import threading

import gradio as gr
import numpy as np
import pandas as pd

from core import families, vram
from core.config import ADAPTER_NAMES, preset_description
from core.data import scan_folder
from core.datasets import dataset_dir
from core.errors import UserError
from core.models import TINY
from core.rundir import RunDir, list_runs
from core.runs import measured_seconds_per_step
from core.trainer import preflight
from core.words import count

from .common import (STATE_WORDS, Ctx, Handler, TabParts, bind_table, error_html, fmt_duration, model_picker, pick,
                     progress_html, settings_problem)
from .dataset_tab import MIN_SIZE
from .form import (DEFAULT_PRESET, FIELDS, form_config, form_values, preset_config, preset_names, save_preset,
                   widget)

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
ADAPTER_TYPES = [(name, kind) for kind, name in ADAPTER_NAMES.items()]

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
    """The newest samples first (the prompts of one step in their order), then the step-0 baseline to compare
    with; each labelled with its step and prompt."""
    baseline = [s for s in samples if s[0] == 0]
    later = sorted([s for s in samples if s[0] != 0][-SAMPLES_SHOWN:], key=lambda s: -s[0])  # stable within a step
    return [(path, f"step {step}: {prompt}") for step, path, prompt in later + baseline]


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
        # Sent with points only: a LinePlot emptied (None) while its chart is drawn throws in the browser (its resize
        # observer reads the removed chart's offsetWidth), so a new run's plot keeps the last run's curve until the
        # new run's first step. The page starts with an empty plot.
        if snap["losses"]:
            put("loss_plot", (run, len(snap["losses"])), lambda: self.curve.frame(run, snap["losses"]))
        put("samples", (run, len(snap["samples"])), lambda: samples_value(snap["samples"]))
        put("compare", (run, len(snap["compare"])), lambda: snap["compare"] or None)
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
    """A first guess before any run was measured: SD at 512 px is about 0.5 s per step on a consumer GPU; on a
    CPU an SD 1.5-sized model took about 24 s per step at 128 px (README, Speed: 2 cores), growing with the pixels;
    the demo model on 2 CPU cores about 0.07 s a step plus 0.025 s per image of the batch at 64 px (README's
    benchmark: batch 1 0.09 s, batch 8 0.25 s; the 300-step demo-lora run at batch 4 about 60 s)."""
    pixels = (resolution / 512) ** 2 * batch
    if base in TINY:
        return 0.05
    if base == "demo":
        return 0.05 * max(pixels * 64, 1) if cuda else 0.07 + 0.025 * pixels * 64
    return 0.5 * pixels if cuda else 24.0 * pixels * 16


def cpu_share() -> float:
    """The share of the CPU a run would get now (1.0 when idle): other programs' load slows a CPU run down."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return 1.0
    cores = os.cpu_count() or 1
    return min(1.0, cores / (cores + load))


def family_notes(spec: str, resolution: int) -> list[str]:
    """Which kind of model the base is (read from its configs, not loaded), and a word when the resolution is far
    below the one it was trained at."""
    try:
        configs, assumed = vram.model_configs(spec)
    except Exception as e:  # noqa: BLE001 - a model that cannot be read: Start says why
        log.info("model family: %s", e)
        return []
    family = families.of_configs(dict.fromkeys(configs, []), configs.get("unet", {}))
    if family is None or assumed or spec == "demo" or spec in TINY:
        return []
    notes = [f"**Base model:** {family.label}."]
    if resolution < 0.75 * family.default_resolution:
        notes[0] += (f" It was trained at {family.default_resolution} px: at {resolution} px it draws poorly, so "
                     f"set the training resolution on the Dataset tab to {family.default_resolution}.")
    return notes


def trains_on(dataset: str | None, instance_prompt: str, class_prompt: str | None) -> str:
    """What Start will train on, said beside it: the dataset and the prompts (from the Dataset and Class tabs)."""
    if not dataset:
        return "**Dataset:** none chosen yet (Dataset tab)."
    text = f"**Dataset:** {dataset} · **instance prompt:** *{instance_prompt or 'none yet'}*"
    if class_prompt is not None:
        text += f" · **class prompt:** *{class_prompt or 'none yet'}*"
    return text


def step_maths(ctx: Ctx, dataset: str, values: dict) -> str:
    """images x repeats x epochs / batch = steps, in words, and an estimated time."""
    import torch

    try:
        cfg = form_config(values, ctx.workspace, allow_pickle=ctx.allow_pickle)
    except UserError as e:
        return settings_problem(e)
    t, d = cfg.train, cfg.data
    try:
        images = len(scan_folder(dataset_dir(ctx.workspace, dataset), min_size=MIN_SIZE).images) if dataset else 0
    except UserError:
        images = 0
    batch = t.batch_size * t.gradient_accumulation_steps
    lines = [trains_on(dataset, d.instance_prompt, d.class_prompt if t.prior_preservation else None)]
    lines += family_notes(cfg.model.base, d.resolution)
    if images:
        per_epoch = images * d.repeats
        epochs = t.max_steps * batch / per_epoch
        shown = f"{epochs:.0f}" if epochs >= 10 else f"{epochs:.1f}"
        lines.append(f"**{count(images, 'image')} × {count(d.repeats, 'repeat')} × {shown} epochs "
                     f"÷ batch {batch} = {t.max_steps} steps.** Each image is seen about "
                     f"{t.max_steps * batch / images:.0f} times.")
    else:
        lines.append(f"**{t.max_steps} steps** at batch {batch}. Pick a dataset with images on the Dataset tab.")
    if t.prior_preservation:
        lines.append(f"Prior preservation: each step also trains on {count(t.batch_size, 'class image')} "
                     f"(*{d.class_prompt or 'no class prompt yet'}*); "
                     f"{d.num_class_images} are needed.")
    cuda = torch.cuda.is_available()
    measured = measured_seconds_per_step(ctx.runs_dir, cfg.model.base, d.resolution, t.batch_size)
    per_step = measured or rough_seconds_per_step(cfg.model.base, d.resolution, batch, cuda)
    how = "measured on your last run with this model, size and batch" if measured else "a rough guess"
    share = 1.0 if cuda or measured else cpu_share()
    if share < 0.75:  # a guess for an idle CPU would promise far too little on a busy one
        per_step /= share
        how += f", for a CPU busy with other programs (about {1 - share:.0%} of it in use now)"
    extra = f"; plus the samples every {t.sample_every} steps" if t.sample_every else ""
    lines.append(f"Estimated training time: **about {fmt_duration(t.max_steps * per_step)}** ({how}{extra}).")
    if not cuda and cfg.model.base != "demo" and cfg.model.base not in TINY:
        lines.append("No NVIDIA GPU was found: a full-size Stable Diffusion model trains on the CPU far too slowly "
                     "for real use. Train it on a computer with an NVIDIA GPU, or try the demo model here.")
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
        c["adapter_type"] = widget("adapter_type", initial, gr.Radio, choices=ADAPTER_TYPES, label="Adapter",
                                   elem_id="tr-type")
        c["rank"] = widget("rank", initial, label="Rank", elem_id="tr-rank")
        c["alpha"] = widget("alpha", initial, label="Alpha", elem_id="tr-alpha")
        c["train_text_encoder"] = widget("train_text_encoder", initial, label="Train the text encoder too",
                                         elem_id="tr-te")
    with gr.Row():
        c["max_steps"] = widget("max_steps", initial, label="Steps", elem_id="tr-steps")
        c["learning_rate"] = widget("learning_rate", initial, label="Learning rate", elem_id="tr-lr")
        c["batch_size"] = widget("batch_size", initial, label="Batch size", elem_id="tr-batch")
        c["prior_preservation"] = widget("prior_preservation", initial, label="Prior preservation",
                                         elem_id="tr-prior", info="Uses the class images (Class images tab).")
        c["prior_loss_weight"] = widget("prior_loss_weight", initial, label="Prior weight", elem_id="tr-prior-weight")
    c["run_name"] = widget("run_name", initial, label="Run name (optional)",
                           placeholder="e.g. rex-v1; empty: type and date", elem_id="tr-run-name")
    with gr.Accordion("Advanced options", open=False, elem_id="tr-advanced"):
        with gr.Row():
            c["repeats"] = widget("repeats", initial, label="Repeats per epoch")
            c["lr_scheduler"] = widget("lr_scheduler", initial, label="Learning-rate schedule")
            c["lr_warmup_steps"] = widget("lr_warmup_steps", initial, label="Warm-up steps")
            c["ema_decay"] = widget("ema_decay", initial, label="Average of the weights (EMA decay)")
            c["seed"] = widget("seed", initial, label="Seed")
        with gr.Row():
            c["text_encoder_learning_rate"] = widget("text_encoder_learning_rate", initial,
                                                     label="Text encoder learning rate")
            c["text_encoder_rank"] = widget("text_encoder_rank", initial, label="Text encoder rank")
            c["text_encoder_alpha"] = widget("text_encoder_alpha", initial, label="Text encoder alpha")
            c["dropout"] = widget("dropout", initial, label="Dropout")
            c["module_dropout"] = widget("module_dropout", initial, label="Module dropout (LoHa/LoKr)")
        with gr.Row():
            c["mixed_precision"] = widget("mixed_precision", initial, label="Mixed precision")
            c["optimizer"] = widget("optimizer", initial, label="Optimizer")
            c["gradient_accumulation_steps"] = widget("gradient_accumulation_steps", initial,
                                                      label="Gradient accumulation")
            c["max_grad_norm"] = widget("max_grad_norm", initial, label="Gradient clipping")
            c["min_snr_gamma"] = widget("min_snr_gamma", initial, label="Min-SNR gamma")
            c["noise_offset"] = widget("noise_offset", initial, label="Noise offset")
        with gr.Row():
            c["prediction_type"] = widget("prediction_type", initial, label="Prediction type",
                                          info="auto: as the model says; v_prediction for SD 2.x 768 and v-pred SDXL "
                                               "files that do not say.")
            c["zero_terminal_snr"] = widget("zero_terminal_snr", initial, label="Zero terminal SNR")
            c["vae"] = widget("vae", initial, label="VAE (optional)", placeholder="e.g. madebyollin/sdxl-vae-fp16-fix")
        with gr.Row():
            c["text_encoder"] = widget("text_encoder", initial, label="CLIP-L text encoder (FLUX.1 file only)",
                                       placeholder="e.g. models/clip/clip_l.safetensors")
            c["text_encoder_2"] = widget("text_encoder_2", initial, label="T5-XXL text encoder (FLUX.1 file only)",
                                         placeholder="e.g. models/clip/t5xxl_fp16.safetensors")
            c["quantize"] = widget("quantize", initial, label="Quantized frozen weights")
        with gr.Row():
            c["gradient_checkpointing"] = widget("gradient_checkpointing", initial,
                                                 label="Gradient checkpointing (less memory, slower)")
            c["cache_latents"] = widget("cache_latents", initial, label="Cache latents")
            c["offload_frozen"] = widget("offload_frozen", initial, label="Frozen parts in main memory")
            c["center_crop"] = widget("center_crop", initial, label="Centre crop (off: random crops)")
            c["random_flip"] = widget("random_flip", initial, label="Random flips")
        with gr.Row():  # the buckets' shapes; bucketing itself is switched on the Dataset tab, beside the resolution
            c["bucket_step"] = widget("bucket_step", initial, label="Bucket step (px)")
            c["bucket_min_side"] = widget("bucket_min_side", initial, label="Bucket shortest side (px)")
            c["bucket_max_side"] = widget("bucket_max_side", initial, label="Bucket longest side (px)")
            c["bucket_no_upscale"] = widget("bucket_no_upscale", initial, label="Never enlarge small images")
        with gr.Row():
            c["sample_every"] = widget("sample_every", initial, label="Sample every (steps)", elem_id="tr-sample-every")
            c["sample_steps"] = widget("sample_steps", initial, label="Sample steps", elem_id="tr-sample-steps")
            c["sample_guidance"] = widget("sample_guidance", initial, label="Sample guidance")
            c["checkpoint_every"] = widget("checkpoint_every", initial, label="Checkpoint every (steps)")
            c["compare_at_end"] = widget("compare_at_end", initial, label="At the end: adapter off / on")
        c["sample_prompts"] = widget("sample_prompts", initial, label="Sample prompts (one per line)", lines=3)
        with gr.Row():
            c["unet_targets"] = widget("unet_targets", initial, label="UNet target modules", scale=3)
            c["text_encoder_targets"] = widget("text_encoder_targets", initial, label="Text encoder targets", scale=2)
        with gr.Row():  # what only flow-matching models (FLUX.1) use
            c["timestep_sampling"] = widget("timestep_sampling", initial, label="FLUX: noise-level sampling")
            c["logit_mean"] = widget("logit_mean", initial, label="FLUX: logit mean")
            c["logit_std"] = widget("logit_std", initial, label="FLUX: logit std")
            c["mode_scale"] = widget("mode_scale", initial, label="FLUX: mode scale")
        with gr.Row():
            c["flow_shift"] = widget("flow_shift", initial, label="FLUX: shift towards noise")
            c["flow_shift_value"] = widget("flow_shift_value", initial, label="FLUX: fixed shift")
            c["flow_loss_weighting"] = widget("flow_loss_weighting", initial, label="FLUX: loss weighting")
            c["guidance_scale"] = widget("guidance_scale", initial, label="FLUX.1-dev: training guidance")
            c["blocks"] = widget("blocks", initial, label="FLUX: blocks with adapters")
        with gr.Row():
            c["decompose_both"] = widget("decompose_both", initial, label="LoKr: decompose both factors")
            c["decompose_factor"] = widget("decompose_factor", initial, label="LoKr: factor")
            c["use_effective_conv2d"] = widget("use_effective_conv2d", initial, label="LoHa/LoKr: effective conv2d")
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
        c["samples"] = gr.Gallery(label="Samples, newest first (step 0 = before training)", columns=4, height=320,
                                  object_fit="contain", elem_id="tr-samples", scale=1)
    # Always shown (a Gallery made visible and filled in one update throws in the browser): empty until a run ends.
    c["compare"] = gr.Gallery(label="When a run finishes: each prompt with the adapter off, then on (same seed)",
                              columns=4, height="auto", object_fit="contain", elem_id="tr-compare")
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


# --------------------------------------------------------------------------- handlers

def live(ctx: Ctx, train_sent=None) -> dict:
    out, sent = ctx.train_view.poll(train_sent)
    return {**out, "train_sent": sent}


def maths(ctx: Ctx, dataset, **values) -> dict:
    return {"maths": step_maths(ctx, dataset, values)}


def start(ctx: Ctx, dataset, **values) -> dict:
    if ctx.class_job.busy:
        raise UserError("Class images are being generated (Class images tab). Wait for them, or stop that first.")
    cfg = form_config(values, ctx.workspace, dataset or "", ctx.allow_pickle)  # "": a plain "No dataset chosen" error
    preflight(cfg)  # the trainer's own checks, now rather than after the model has loaded
    ctx.session.start(cfg)
    ctx.started_form = dict(values)
    return live(ctx)


def command(ctx: Ctx, name: str) -> dict:
    """A control of the running session (pause, resume, stop, sample now, save now)."""
    if not getattr(ctx.session, name)():
        raise UserError("No training run is going.")
    return live(ctx)


def pause(ctx: Ctx) -> dict:
    return command(ctx, "pause")


def resume(ctx: Ctx) -> dict:
    return command(ctx, "resume")


def stop(ctx: Ctx) -> dict:
    return command(ctx, "stop")


def sample_now(ctx: Ctx) -> dict:
    return command(ctx, "sample_now")


def save_now(ctx: Ctx) -> dict:
    return command(ctx, "save_now")


def continue_run(ctx: Ctx, resume_run) -> dict:
    if not resume_run:
        raise UserError("Choose a stopped run to continue.")
    run_dir = RunDir(ctx.runs_dir / resume_run)
    ctx.session.start(run_dir.read_config(), resume_dir=run_dir.path)
    ctx.started_form = None
    return live(ctx)


def load_preset(ctx: Ctx, preset) -> dict:
    values = form_values(preset_config(ctx.workspace, preset), skip_dataset_keys=True)
    about = preset_description(preset, ctx.workspace)
    return {**values, "preset_msg": f"Loaded preset **{preset}**{f': {about}' if about else ''}. Dataset, prompts "
                                    "and run name are unchanged (they come from the Dataset and Class images tabs)."}


def save(ctx: Ctx, preset_name, **values) -> dict:
    cfg = form_config(values, ctx.workspace, allow_pickle=ctx.allow_pickle)
    path = save_preset(ctx.workspace, preset_name, cfg)
    return {"preset": gr.update(choices=preset_names(ctx.workspace), value=path.stem), "preset_name": "",
            "preset_msg": f"Saved preset **{path.stem}** to `{path}`."}


def lists(ctx: Ctx) -> dict:
    return {"resume_run": gr.update(choices=resumable_runs(ctx)), "preset": gr.update(choices=preset_names(ctx.workspace))}


# --------------------------------------------------------------------------- events

# Every settings field of every tab (see ui/form.py): Start, the step maths and presets read them all.
FORM = tuple(f.name for f in FIELDS) + ("base_choice", "base_other")
LIVE_OUT = ("train_status", "loss_plot", "samples", "compare", "log", "train_error", "error_detail", *BUTTONS, "train_sent")
# The step maths is redrawn when anything it depends on changes.
MATHS_NAMES = ("max_steps", "batch_size", "repeats", "gradient_accumulation_steps", "prior_preservation",
               "num_class_images", "class_prompt", "instance_prompt", "resolution", "base_choice", "base_other",
               "sample_every", "adapter_type", "rank", "train_text_encoder", "text_encoder_rank", "mixed_precision", "optimizer",
               "gradient_checkpointing", "unet_targets", "text_encoder_targets", "dataset")
# A preset sets everything except what belongs to a dataset.
PRESET_OUT = tuple(n for n in FORM if n not in ("instance_prompt", "class_prompt", "run_name")) + ("preset_msg",)

EVENTS = [  # (trigger, handler, inputs, outputs[, options])
    (tuple(f"{n}.change" for n in MATHS_NAMES), maths, ("dataset",) + FORM, ("maths",),
     {"api_name": "step_maths", "show_progress": "hidden", "trigger_mode": "always_last"}),
    ("start_btn.click", start, ("dataset",) + FORM, LIVE_OUT, {"api_name": "start_training"}),
    *[(f"{name}_btn.click", fn, (), LIVE_OUT, {"api_name": fn.__name__})
      for name, fn in (("pause", pause), ("resume", resume), ("stop", stop), ("sample", sample_now),
                       ("save", save_now))],
    ("continue_btn.click", continue_run, ("resume_run",), LIVE_OUT, {"api_name": "continue_run"}),
    ("load_preset_btn.click", load_preset, ("preset",), PRESET_OUT, {"api_name": "load_preset"}),
    ("save_preset_btn.click", save, ("preset_name",) + FORM, ("preset", "preset_name", "preset_msg"),
     {"api_name": "save_preset"}),
]


def wire(ctx: Ctx, c: dict) -> TabParts:
    """Bind the tab's events; `c` also holds every settings field of the other tabs and the Dataset tab's dataset."""
    bind_table(ctx, c, EVENTS)
    return TabParts(c, polls=[Handler(live, pick(c, ("train_sent",)), pick(c, LIVE_OUT), api_name="train_poll")],
                    refreshes=[Handler(lists, {}, pick(c, ("resume_run", "preset"))),
                               Handler(maths, pick(c, ("dataset",) + FORM), pick(c, ("maths",)))])
