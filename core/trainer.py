"""The DreamBooth training loop with PEFT adapters and prior preservation.

`train(cfg)` is read top to bottom: check what can be checked before anything loads (`preflight`),
set up the run folder, load the frozen base model, make sure class images exist, inject the
adapters, cache what can be cached, then loop over optimizer steps, obeying commands (stop, pause,
resume, sample now, save now) between steps.

A step is three functions that can be tested alone: `draw_batch` (which images, as latents and
prompts), `predict` (noise, timesteps, the model's prediction and its target: the model-specific
maths) and `batch_loss` (per-image MSE, weights, the prior-preservation split).

Everything random in a step (which images, crops, flips, noise, timesteps) comes from a generator
seeded by (seed, step, micro-step, process), so a resumed run sees exactly the batches an
uninterrupted one would; the global RNG (used by adapter dropout) is saved in checkpoints.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import queue
import shutil
import tempfile
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Mapping, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list
from diffusers.optimization import get_scheduler

from . import adapters, buckets, families, quantize
from .base_model import BaseModel
from .batches import BucketBatches, epoch_index
from .buckets import Size
from .class_images import check_class_prompt, class_sets, ensure_class_images, usable_class_images
from .config import Config, TrainConfig, adapter_name, resolve_path
from .data import Geometry, ImageSet, ScanReport, caption_prompts, scan_folder
from .ema import AdapterEMA, put_back
from .errors import ConfigError, DataError, ModelLoadError, UserError
from .fileio import check_writable, disk_error_message, fsync, remove_stale_temps, write_text
from .families.base import Conditioning, min_snr_weights, training_target  # noqa: F401 (re-exported)
from .events import (PAUSE, RESUME, SAMPLE, SAVE, STOP, CheckpointSaved, CompareReady, Emit, Failed, Finished, Log, Paused,
                     Progress, Resumed, RunStarted, SampleReady, ignore)
from .models import load_base_from_config, place
from .placement import HOME, cached_encoders, latents_cached, move_parts, offloaded_parts, parts_on, text_cached
from .precision import DTYPES, frozen_dtype, resolve_precision
from .rundir import Checkpoint, RunDir
from .sampling import encoded_apart, generate, make_pipeline, save_png

LOSS_COLUMNS = ["step", "loss", "instance_loss", "prior_loss", "lr", "seconds"]


# ----------------------------------------------------------------------------------------------
# Set-up helpers
# ----------------------------------------------------------------------------------------------

def make_accelerator(cfg: Config) -> Accelerator:
    precision = resolve_precision(cfg)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, precision) and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process may run several trainings (the GUI); accelerate keeps a process-wide state that
        # refuses a new precision, so reset it between runs. Not done under `accelerate launch`.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.train.gradient_accumulation_steps)


def unused_run_name(folder: Path, name: str) -> str:
    """`name`, or `name-2`, `name-3`... when a run of that name exists (two runs started within one second)."""
    candidate, n = name, 1
    while (folder / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def run_dir_path(cfg: Config, acc: Accelerator) -> RunDir:
    """The new run's folder (all processes agree on the name; `preflight` refused a name already in use)."""
    name = [cfg.output.name or unused_run_name(Path(cfg.output.dir).expanduser(),
                                                f"{cfg.adapter.type}-{datetime.now():%Y%m%d-%H%M%S}")]
    if acc.num_processes > 1:
        broadcast_object_list(name)
    return RunDir(Path(cfg.output.dir) / name[0])


def create_run_dir(cfg: Config, acc: Accelerator, run_dir: RunDir) -> None:
    """Made only once the model and images have loaded, so a failed start leaves no empty run behind."""
    if acc.is_main_process:
        run_dir.create(cfg)
    acc.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# Before anything loads
# ----------------------------------------------------------------------------------------------

def preflight(cfg: Config, resume_dir: str | Path | None = None) -> ScanReport:
    """Refuse, in plain words, a run that cannot start, before minutes go into loading a model.

    One list of checks for every way in: `train` makes them first (so the CLI gets them), the Train
    tab makes them when Start is pressed. Raises a UserError at the first problem; returns the scan
    of the instance images (the trainer trains on what it found).
    """
    resolve_precision(cfg)
    optimizer_class(cfg)
    quantize.check(cfg.model.quantize, cfg.adapter.type)
    if resume_dir is not None and RunDir(resume_dir).latest_checkpoint() is None:
        raise ConfigError(f"{resume_dir} has no checkpoint to resume from.")
    named = RunDir(Path(cfg.output.dir) / cfg.output.name) if cfg.output.name and resume_dir is None else None
    if named is not None and named.in_use():
        raise ConfigError(f"A run called {cfg.output.name!r} already exists in {named.path.parent}: choose another "
                          "run name (output.name), or continue that run (--resume, or 'Continue an earlier run').")
    check_writable(RunDir(resume_dir).path.parent if resume_dir else Path(cfg.output.dir).expanduser())
    report = scan_instance_images(cfg)
    caption_prompts(report.images, cfg.data.instance_prompt)  # every image needs a caption or the instance prompt
    if cfg.train.prior_preservation:
        check_class_prompt(cfg)
    return report


def scan_instance_images(cfg: Config) -> ScanReport:
    d = cfg.data
    if not d.instance_dir:
        raise DataError("No instance images folder set (data.instance_dir): point it at the 3-20 photos of your subject.")
    report = scan_folder(resolve_path(d.instance_dir), min_size=d.min_image_size, caption_extension=d.caption_extension)
    if not report.images:
        raise DataError(f"No usable images in {d.instance_dir}. {report.summary()}")
    return report


# ----------------------------------------------------------------------------------------------
# Images and their latents
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainData:
    """The image sets a run draws from."""

    instance: ImageSet
    klass: ImageSet | None  # None without prior preservation
    repeats: int = 1  # each instance image is drawn this many times per epoch
    batches: BucketBatches | None = None  # batches one bucket at a time; None: the images are all of one size

    @property
    def sets(self) -> dict[str, ImageSet]:
        return {"instance": self.instance} | ({"class": self.klass} if self.klass is not None else {})


def load_data(cfg: Config, report: ScanReport, base: BaseModel, acc: Accelerator, emit: Emit, stop) -> TrainData:
    """The instance images `preflight` found, each in its bucket, and the class images of those buckets (generated
    now if prior preservation needs more)."""
    d, t = cfg.data, cfg.train
    emit(Log(f"Instance images: {report.summary()}"))
    prompts = caption_prompts(report.images, d.instance_prompt)
    sizes = [(item.width, item.height) for item in report.images]
    assigned = buckets.assign_for_settings(sizes, d)
    if d.bucketing:
        emit(Log(buckets.summary(assigned, t.batch_size, d.repeats)))
    instance = ImageSet(report.images, prompts, d.resolution, d.center_crop, d.random_flip, assigned)
    klass = load_class_images(cfg, class_sets(cfg, sizes), base, acc, emit, stop) if t.prior_preservation else None
    if t.prior_preservation and klass is None:
        return TrainData(instance, None, d.repeats)  # stopped while generating: the trainer stops, nothing to plan
    # One size: today's draws, image by image (the same batches, bit for bit).
    several = len(set(assigned)) > 1
    batches = BucketBatches(assigned, klass.buckets if klass else None, d.repeats, t.batch_size, t.seed) if several \
        else None
    return TrainData(instance, klass, d.repeats, batches)


def load_class_images(cfg: Config, sets: list[tuple[Size, int]], base: BaseModel, acc: Accelerator, emit: Emit,
                      stop) -> ImageSet | None:
    """The class images of each (size, how many) set (`class_sets`: the buckets the instance images use, in
    proportion), generated where missing; None when a stop came during generation (the trainer then stops)."""
    d = cfg.data
    wanted = dict(sets)
    # Generated on the main process only; the others wait and then read the same folders.
    if acc.is_main_process:
        for size, n in wanted.items():
            if not stop():
                ensure_class_images(cfg, base, acc.device, emit, should_stop=stop, size=size, want=n)
    acc.wait_for_everyone()
    if stop():
        return None
    items, sizes = [], []
    for size, n in wanted.items():
        found = usable_class_images(cfg, size)[:n]
        if not found:
            raise DataError("Prior preservation is on but there are no class images"
                            f"{'' if len(wanted) == 1 else ' of ' + buckets.describe(size)} "
                            "(class generation was stopped?).")
        items += found
        sizes += [size] * len(found)
    return ImageSet(items, [d.class_prompt] * len(items), d.resolution, d.center_crop, d.random_flip, sizes)


class LatentSource(Protocol):
    def draw(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, str, Geometry]:
        """A VAE latent (unscaled) of image `index`, its prompt and the geometry of the view it was encoded from;
        all randomness from `generator`. (A source may leave the geometry out: families that use none.)"""


def posterior_sample(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A latent drawn from the VAE's posterior (as `latent_dist.sample()`), from our generator."""
    return mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)


class LatentCache:
    """VAE posteriors (mean, std) of every cached image variant; a latent is drawn from them each step."""

    def __init__(self, vae, images: ImageSet, device, dtype, batch: int = 8):
        self.prompts = images.prompts
        self.entries: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self.geometries: list[list[Geometry]] = []  # of each cached variant (the centre crop, its mirror)
        for i in range(len(images)):
            views = images.cached_views(i)
            variants = torch.stack([tensor for tensor, _ in views]).to(device, dtype)
            with torch.no_grad():
                dist = vae.encode(variants).latent_dist
            self.entries.append([(m.float(), s.float()) for m, s in zip(dist.mean, dist.std)])
            self.geometries.append([geometry for _, geometry in views])

    def draw(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, str, Geometry]:
        variants = self.entries[index]
        pick = int(torch.randint(len(variants), (1,), generator=generator)) if len(variants) > 1 else 0
        return posterior_sample(*variants[pick], generator), self.prompts[index], self.geometries[index][pick]


class LatentEncoder:
    """Encodes each drawn image through the VAE: with random crops no two draws of an image are alike."""

    def __init__(self, vae, images: ImageSet, device, dtype):
        self.vae, self.images, self.device, self.dtype = vae, images, device, dtype

    def draw(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, str, Geometry]:
        pixels, prompt, geometry = self.images.sample(index, generator)  # the crop and flip come from the generator too
        with torch.no_grad():
            dist = self.vae.encode(pixels[None].to(self.device, self.dtype)).latent_dist
        return posterior_sample(dist.mean[0].float(), dist.std[0].float(), generator), prompt, geometry


def latent_sources(data: TrainData, vae, device, dtype, cache: bool) -> dict[str, LatentSource]:
    kind = LatentCache if cache else LatentEncoder
    return {key: kind(vae, images, device, dtype) for key, images in data.sets.items()}


def encode_prompts(base: BaseModel, prompts: list[str], device) -> torch.Tensor:
    """The text embeddings the UNet cross-attends to (the "hidden" entry of the family's conditioning)."""
    return families.of(base).encode_prompts(base, prompts, device)["hidden"]


def prompt_encoder(base: BaseModel, device, fixed: list[str] | None = None,
                   frozen_fixed: list[str] | None = None) -> Callable[[list[str]], Conditioning]:
    """prompts -> the family's conditioning ({"hidden": ..., and e.g. SDXL's "pooled"}, one row per prompt). Frozen
    text encoders give a prompt the same conditioning every step, so the `fixed` prompts are encoded once here and
    looked up; without them every batch goes through the encoders. `frozen_fixed`: only the part from the
    encoders that never train (Family.frozen_conditioning: FLUX's T5) is encoded once for these prompts, the
    training encoders run every step."""
    family = families.of(base)
    if frozen_fixed:
        with torch.no_grad():
            frozen = family.frozen_conditioning(base, frozen_fixed, device)
        rows = {p: {key: t[i] for key, t in frozen.items()} for i, p in enumerate(frozen_fixed)}
        return lambda prompts: family.encode_prompts(
            base, prompts, device, frozen={key: torch.stack([rows[p][key] for p in prompts]) for key in frozen})
    if not fixed:
        return lambda prompts: family.encode_prompts(base, prompts, device)
    with torch.no_grad():
        encoded = family.encode_prompts(base, fixed, device)
    table = {p: {key: rows[i] for key, rows in encoded.items()} for i, p in enumerate(fixed)}
    return lambda prompts: {key: torch.stack([table[p][key] for p in prompts]) for key in encoded}


# ----------------------------------------------------------------------------------------------
# One step: which images, what the model predicts, the loss
# ----------------------------------------------------------------------------------------------

def seeded(seed: int, make):
    """`make()` with torch's random generators seeded by `seed` (and left as they were afterwards): peft draws the
    adapters' starting weights from them, so the same seed starts every run from the same adapter."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return make()


def step_generator(seed: int, step: int, micro: int, process: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed, step, micro, process)) & 0x7FFF_FFFF_FFFF_FFFF)


def batch_indices(data: TrainData, t: TrainConfig, step: int, micro: int, process: int = 0,
                  num_processes: int = 1) -> dict[str, list[int]]:
    """Which images a micro-batch trains on: {"instance": [...], "class": [...]}, a pure function of the seed and
    the position (step, micro-step, process), so a resumed run sees exactly the batches an uninterrupted one would.

    Draws are numbered across the whole run, micro-batch after micro-batch and process after process, so no two
    micro-batches share a draw. Each set is drawn in its own endless shuffled epochs (instance images `repeats`
    times per epoch); the class image of draw k is paired with the instance image of draw k. Images in several
    buckets are drawn a batch at a time from one bucket (core/batches.py).
    """
    number = (step * t.gradient_accumulation_steps + micro) * num_processes + process
    if data.batches is not None:
        return data.batches.picks(number)
    first = number * t.batch_size
    draws = range(first, first + t.batch_size)
    n = len(data.instance)
    picks = {"instance": [epoch_index(t.seed, k, n * data.repeats, 0) % n for k in draws]}
    if data.klass is not None:
        picks["class"] = [epoch_index(t.seed, k, len(data.klass), 1) for k in draws]
    return picks


@dataclass
class Batch:
    latents: torch.Tensor  # VAE latents (unscaled) of the drawn images: instance images first, then class images
    prompts: list[str]
    geometry: list[Geometry | None] = field(default_factory=list)  # each image's view (SDXL's size conditioning)


def draw_batch(sources: Mapping[str, LatentSource], picks: Mapping[str, list[int]], generator: torch.Generator) -> Batch:
    """The latents, prompts and geometries of the picked images, laid out [instance..., class...] as `picks` lists
    them (prior preservation splits the loss on that layout; diffusers' DreamBooth example does the same)."""
    drawn = [sources[key].draw(i, generator) for key, indices in picks.items() for i in indices]
    return Batch(torch.stack([d[0] for d in drawn]), [d[1] for d in drawn], [d[2] if len(d) > 2 else None for d in drawn])


def as_conditioning(cond: Conditioning | torch.Tensor) -> Conditioning:
    """A text encoder's output as conditioning: a bare tensor is the cross-attention input ("hidden")."""
    return cond if isinstance(cond, Mapping) else {"hidden": cond}


@dataclass
class Prediction:
    """What one forward pass gives the loss."""

    pred: torch.Tensor  # the model's output
    target: torch.Tensor  # what it should have been
    weights: torch.Tensor | None = None  # per-image loss weights (min-SNR); None: all images count the same


def predict(base: BaseModel, batch: Batch, generator: torch.Generator, encode_text: Callable[[list[str]], Conditioning],
            weight_dtype: torch.dtype, t: TrainConfig) -> Prediction:
    """The maths of a step, as the model's family does it: noise the latents (DDPM timesteps, or flow matching's
    sigmas), let the denoiser predict, and say what it should have predicted. Every random draw comes from
    `generator`, in the family's fixed order."""
    family = families.of(base)
    x0 = family.scale_latents(base, batch.latents)
    noisy, timesteps, target, weights = family.noisy_and_target(base, x0, generator, t)
    cond = as_conditioning(encode_text(batch.prompts))  # through the text encoders when they train
    pred = family.unet_forward(base.unet, noisy.to(weight_dtype), timesteps, cond, batch.geometry, weight_dtype,
                               guidance=t.guidance_scale)
    return Prediction(pred, target, weights)


def batch_loss(p: Prediction, has_class: bool, prior_loss_weight: float):
    """(total, instance, prior): the per-image MSE, weighted, split into the batch's instance and class halves."""
    per_image = F.mse_loss(p.pred.float(), p.target.float(), reduction="none").mean(dim=tuple(range(1, p.pred.ndim)))
    if p.weights is not None:
        per_image = per_image * p.weights
    return prior_preservation_loss(per_image, has_class, prior_loss_weight)


def prior_preservation_loss(per_image: torch.Tensor, has_class: bool, weight: float):
    """(total, instance, prior) from per-image losses of a batch laid out [instance..., class...].

    DreamBooth: loss = instance loss + weight * class (prior) loss, both halves from one forward pass.
    """
    if not has_class:
        inst = per_image.mean()
        return inst, inst, None
    inst, prior = (half.mean() for half in torch.chunk(per_image, 2))
    return inst + weight * prior, inst, prior


class StepClock:
    """The time left, from the wall time of the last `window` steps, their samples and checkpoints included and
    pauses not: a machine that gets busier or freer shows within those steps, where an average over the whole
    run would lag (the first steps, warming up, would weigh on the estimate for the rest of the run)."""

    def __init__(self, window: int = 20):
        self.recent: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        """One more step took `seconds`."""
        self.recent.append(seconds)

    def add_to_last(self, seconds: float) -> None:
        """What the last step did after it was counted (its samples, its checkpoint)."""
        if self.recent:
            self.recent[-1] += seconds

    def seconds_left(self, steps_left: int) -> float:
        return steps_left * sum(self.recent) / len(self.recent) if self.recent else 0.0


# ----------------------------------------------------------------------------------------------
# Commands between steps
# ----------------------------------------------------------------------------------------------

class Controller:
    """Reads the command queue between steps; `pause` blocks here until `resume` or `stop`."""

    def __init__(self, commands: queue.Queue | None, acc: Accelerator, emit: Emit):
        self.commands, self.acc, self.emit = commands, acc, emit
        self.stop_requested = False
        # a session's queue carries the lock its playground holds while it draws with a paused run's model:
        # commands are carried out under it, never beside such a drawing
        self.lock = getattr(commands, "model_lock", None) or contextlib.nullcontext()

    def _read(self, block: bool) -> list[str]:
        if self.commands is None:
            return []
        got = []
        try:
            got.append(self.commands.get(timeout=0.2) if block else self.commands.get_nowait())
            while True:
                got.append(self.commands.get_nowait())
        except queue.Empty:
            pass
        return got

    def _agree(self, cmds: list[str]) -> list[str]:
        """All processes must act on the same commands at the same step (main process decides)."""
        if self.acc.num_processes > 1:
            box = [cmds]
            broadcast_object_list(box)
            cmds = box[0]
        return cmds

    def poll(self, step: int, on_sample, on_save, shown=contextlib.nullcontext) -> bool:
        """Handle pending commands; return True when training must stop. While paused, the model holds the weights
        `shown()` puts in it (the average, when the run keeps one): what the playground tests is what gets saved."""
        cmds = self._agree(self._read(block=False))
        paused = False
        with contextlib.ExitStack() as hold:
            while True:
                with self.lock if cmds else contextlib.nullcontext():
                    for c in cmds:
                        if c == STOP:
                            self.stop_requested = True
                        elif c == PAUSE and not paused:
                            paused = True
                            hold.enter_context(shown())
                            self.emit(Paused(step))
                        elif c == RESUME and paused:
                            paused = False
                            hold.close()
                            self.emit(Resumed(step))
                        elif c == SAMPLE:
                            on_sample()
                        elif c == SAVE:
                            on_save()
                if self.stop_requested or not paused:
                    return self.stop_requested
                cmds = self._agree(self._read(block=True))

    def drain(self, on_sample, on_save) -> None:
        """After the last step: carry out the sample / save commands that arrived during it (nothing to pause)."""
        cmds = self._agree(self._read(block=False))
        with self.lock if cmds else contextlib.nullcontext():
            for c in cmds:
                if c == SAMPLE:
                    on_sample()
                elif c == SAVE:
                    on_save()

    def should_stop(self) -> bool:
        """For long set-up work (class images): look for a stop without consuming other commands."""
        if self.commands is not None and not self.stop_requested:
            keep = []
            for c in self._read(block=False):
                if c == STOP:
                    self.stop_requested = True
                else:
                    keep.append(c)
            for c in keep:
                self.commands.put(c)
        return self.stop_requested


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What the loop's helpers share: the parts, the paths, the optimizer and its schedule, and where we are."""

    cfg: Config
    acc: Accelerator
    base: BaseModel
    specs: dict
    run_dir: RunDir
    weight_dtype: torch.dtype
    emit: Emit
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped by us, once per optimizer step
    step: int = 0
    loss_rows: list = field(default_factory=list)
    offloaded: tuple[str, ...] = ()  # frozen parts kept in main memory between samples (core/placement.py)
    sample_size: tuple[int, int] | None = None  # (width, height) of the samples; None: the training square
    trainable: list = field(default_factory=list)  # the adapter's parameters, in a fixed order
    ema: AdapterEMA | None = None  # the average of the adapter's weights, when train.ema_decay is on

    def averaged(self):
        """The weights a user sees (samples, files, a pause): the average when there is one, else the trained."""
        return self.ema.applied() if self.ema else contextlib.nullcontext()

    def unwrapped(self, part: str):
        return self.acc.unwrap_model(getattr(self.base, part))

    def save_adapter(self, path: Path) -> Path:
        parts = {part: self.unwrapped(part) for part in self.specs}
        info = adapters.training_metadata(self.cfg, self.step, self.base.name, self.base.family)
        with self.averaged():
            return adapters.save_adapter(path, parts, self.specs, info)

    def sample_prompts(self) -> list[str]:
        cfg = self.cfg
        return cfg.train.sample_prompts or [p for p in (cfg.data.instance_prompt, cfg.data.class_prompt) if p]

    def images(self, prompts: list[str], seeds: list[int], adapter: bool = True) -> list:
        """Images by the model as it is now (`adapter` False: as if it had none), with the sample settings."""
        cfg, device = self.cfg, self.acc.device
        parts = {part: self.unwrapped(part) for part in self.base.parts}
        width, height = self.sample_size or (cfg.data.resolution, cfg.data.resolution)
        with self.averaged() if adapter else adapters.adapters_off(parts):
            with encoded_apart(self.base, prompts, device, list(self.offloaded)) as inputs:
                pipe = make_pipeline(self.base, device, **parts)
                return generate(pipe, prompts, seeds, steps=cfg.train.sample_steps, guidance=cfg.train.sample_guidance,
                                width=width, height=height, prompt_inputs=inputs)

    def sample(self) -> None:
        if not self.acc.is_main_process:
            return
        cfg = self.cfg
        prompts = self.sample_prompts()
        if not prompts:
            return
        images = self.images(prompts, [cfg.train.sample_seed + i for i in range(len(prompts))])
        paths = [str(save_png(img, self.run_dir.sample(self.step, i),
                              {"prompt": p, "step": self.step, "seed": cfg.train.sample_seed + i}))
                 for i, (img, p) in enumerate(zip(images, prompts))]
        self.emit(SampleReady(self.step, paths, prompts))

    def compare(self) -> None:
        """What the run did, in pictures: the instance prompt and the class prompt with the adapter off and on,
        each with the seed it has among the samples (the step-0 samples are the "off" pictures of those)."""
        cfg = self.cfg
        if not self.acc.is_main_process or not cfg.train.compare_at_end:
            return
        prompts = [p for p in (cfg.data.instance_prompt, cfg.data.class_prompt) if p]
        if not prompts:
            return
        listed = self.sample_prompts()
        seeds = [cfg.train.sample_seed + (listed.index(p) if p in listed else i) for i, p in enumerate(prompts)]
        pictures = {on: self.images(prompts, seeds, adapter=on) for on in (False, True)}
        paths, captions = [], []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            for on in (False, True):
                info = {"prompt": prompt, "step": self.step, "seed": seed, "adapter": "on" if on else "off"}
                paths.append(str(save_png(pictures[on][i], self.run_dir.compare(i, on), info)))
                captions.append(f"adapter {'on' if on else 'off'} · {prompt} · seed {seed}")  # what differs first
        self.emit(CompareReady(self.step, paths, captions))

    def flush_losses(self) -> None:
        """Add the buffered loss rows to loss.csv: the whole file is rewritten atomically (it stays small)."""
        if not self.acc.is_main_process or not self.loss_rows:
            return
        path = self.run_dir.losses
        old = path.read_text(encoding="utf-8") if path.exists() else ",".join(LOSS_COLUMNS) + "\n"
        write_text(path, old + "".join(",".join(map(str, row)) + "\n" for row in self.loss_rows))
        self.loss_rows.clear()


def save_checkpoint(run: Run) -> Path | None:
    """Adapter (safetensors) + optimizer / scheduler / RNG state (torch, loaded back with weights_only)."""
    run.flush_losses()
    if not run.acc.is_main_process:
        return None
    final = run.run_dir.checkpoint(run.step)
    tmp = Checkpoint(Path(tempfile.mkdtemp(prefix=".ckpt-", dir=run.run_dir.checkpoints)))
    run.save_adapter(tmp.adapter)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {"optimizer": run.optimizer.state_dict(), "lr_scheduler": run.lr_scheduler.state_dict(), "rng": rng}
    if run.ema:  # the adapter file holds the average; the weights being trained go here
        state["ema"] = run.ema.state_dict()
    torch.save(state, tmp.state)
    tmp.info.write_text(json.dumps({"step": run.step}))
    for f in (tmp.state, tmp.info):  # on disk before the folder gets its final name (the adapter already is)
        fsync(f)
    if final.path.exists():
        shutil.rmtree(final.path)
    os.replace(tmp.path, final.path)
    # Keep only the newest few checkpoints.
    for old in run.run_dir.all_checkpoints()[: -max(run.cfg.train.keep_checkpoints, 1)]:
        shutil.rmtree(old.path, ignore_errors=True)
    run.emit(CheckpointSaved(run.step, str(final.path)))
    return final.path


def load_checkpoint(run: Run, ckpt: Checkpoint) -> None:
    adapter = adapters.read_adapter(ckpt.adapter)
    from peft.utils import set_peft_model_state_dict

    for part in run.specs:
        set_peft_model_state_dict(run.unwrapped(part), adapter.part_state(part), adapter_name="default")
    state = torch.load(ckpt.state, map_location="cpu", weights_only=True)
    if run.ema:
        run.ema.load_state_dict(state.get("ema"))
    elif "ema" in state:  # a run that averaged, resumed without: train on from its trained weights, not the average
        put_back(run.trainable, state["ema"]["live"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    run.step = ckpt.read_step()
    # Drop loss rows logged after the checkpoint: they will be logged again.
    path = run.run_dir.losses
    if run.acc.is_main_process and path.exists():
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= run.step]
        write_text(path, "".join(",".join(r) + "\n" for r in keep))


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """diffusers models and transformers text encoders (5: activation_..., before: gradient_...) name the switch
    differently: use the first spelling the module has."""
    for switch in ("enable_gradient_checkpointing", "activation_checkpointing_enable", "gradient_checkpointing_enable"):
        if hasattr(module, switch):
            getattr(module, switch)()
            return


def optimizer_class(cfg: Config) -> type[torch.optim.Optimizer]:
    """AdamW, or bitsandbytes' 8-bit AdamW (its two moments in 8 bits instead of 32) where it can run."""
    if cfg.train.optimizer != "adamw8bit":
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("8-bit AdamW needs the bitsandbytes package and an NVIDIA GPU: ./launch.sh installs the "
                          "package (or run .venv/bin/pip install bitsandbytes==0.50.2).") from None
    if not torch.cuda.is_available():
        raise ConfigError("8-bit AdamW needs an NVIDIA GPU; on the CPU use train.optimizer: adamw.")
    return bnb.optim.AdamW8bit


def make_optimizer(cfg: Config, params: dict[str, list], denoiser: str = "unet") -> torch.optim.Optimizer:
    """One parameter group per part, in the order of `params`: the denoiser's learning rate, or the text encoders'."""
    groups = [{"params": ps, "lr": cfg.train.learning_rate if part == denoiser else cfg.text_encoder_learning_rate}
              for part, ps in params.items()]
    t = cfg.train
    kw = dict(betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    return optimizer_class(cfg)(groups, **kw)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def train(cfg: Config, emit: Emit = ignore, commands: queue.Queue | None = None, resume_dir: str | Path | None = None,
          base: BaseModel | None = None) -> Path:
    """Train an adapter; return the run folder. Errors a user can fix raise UserError (after a Failed event)."""
    where: dict = {}  # filled by _train: the run folder, once it exists
    try:
        return _train(cfg, emit, commands, resume_dir, base, where)
    except UserError as e:
        emit(Failed(str(e)))
        raise
    except torch.cuda.OutOfMemoryError:
        msg = ("The GPU ran out of memory. Try the low-VRAM preset, a smaller resolution or batch size, "
               "gradient checkpointing, or close other programs using the GPU." + _kept(where))
        emit(Failed(msg, traceback.format_exc()))
        raise UserError(msg) from None
    except Exception as e:
        disk = isinstance(e, OSError) and disk_error_message(e, Path(e.filename).parent if e.filename else cfg.output.dir)
        if not disk:
            emit(Failed(f"Training failed: {type(e).__name__}: {e}", traceback.format_exc()))
            raise
        msg = disk + _kept(where)  # a full disk or an unwritable folder: plain words, and what is kept
        emit(Failed(msg, traceback.format_exc()))
        raise UserError(msg) from None


def _kept(where: dict) -> str:
    """What is left of a run that stopped on an error: its newest checkpoint, to resume from."""
    run_dir = where.get("run_dir")
    ckpt = run_dir.latest_checkpoint() if run_dir else None
    if ckpt is None:
        return ""
    return f" The checkpoint of step {ckpt.step} is kept: resume the run ({run_dir}) after the change."


def _train(cfg, emit, commands, resume_dir, base, where: dict) -> Path:
    # 0. What can be refused without loading anything (bad settings, no images, an unwritable folder), now.
    report = preflight(cfg, resume_dir)
    acc = make_accelerator(cfg)
    main_emit = emit if acc.is_main_process else ignore
    control = Controller(commands, acc, main_emit)
    t = cfg.train

    # 1. Run folder: the one we resume, or a new one (created after step 3).
    run_dir = RunDir(resume_dir) if resume_dir else run_dir_path(cfg, acc)
    if acc.is_main_process and resume_dir:  # what a killed run left half-written (never read: the names differ) goes
        for folder in (run_dir.path, run_dir.checkpoints, run_dir.samples):
            remove_stale_temps(folder)

    # 2. The frozen base model, in half precision under mixed precision (adapters stay float32), in main memory:
    # each part comes to the device when a phase needs it (steps 3, 5 and 6).
    weight_dtype = DTYPES[acc.mixed_precision]
    if base is None:
        main_emit(Log(f"Loading base model {cfg.model.base}"))
        base = load_base_from_config(cfg)
    place(base.freeze(), HOME, frozen_dtype(acc.mixed_precision))
    family = families.of(base)
    family.check_training(t)  # before minutes go into class images
    family.check_sizes(cfg.data, base.vae_scale_factor)
    if cfg.model.quantize != "none":  # quantized when they reach the device (the GPU: at once, not on the CPU)
        n = quantize.quantize(base.unet, cfg.model.quantize, weight_dtype)
        main_emit(Log(f"{n} layers of the {family.denoiser} held in {cfg.model.quantize} "
                      "(bitsandbytes); the adapter trains in float32"))

    # 3. Images; class images are generated now if prior preservation needs more.
    data = load_data(cfg, report, base, acc, main_emit, control.should_stop)
    if control.stop_requested:
        raise UserError("Stopped before training started (while generating class images).")
    if not resume_dir:
        create_run_dir(cfg, acc, run_dir)
    where["run_dir"] = run_dir
    main_emit(Log(f"Run folder: {run_dir}"))
    main_emit(RunStarted(str(run_dir)))

    # 4. Adapters on the UNet (and text encoders): the only trainable parameters.
    specs = adapters.specs_from_config(cfg, family.text_encoders, family.denoiser, family.default_targets)
    try:
        params = seeded(t.seed, lambda: adapters.inject_all(base.parts, specs))
    except ModelLoadError as e:
        if not family.default_targets:
            raise
        raise ConfigError(f"{e} {family.label} names its {family.denoiser}'s layers differently from a UNet: set the "
                          f"target modules (adapter.unet_targets) to its own, e.g. the default "
                          f"{', '.join(family.default_targets)}.") from None
    n_params = sum(p.numel() for ps in params.values() for p in ps)
    main_emit(Log(f"{adapter_name(cfg.adapter.type)} adapter: {n_params:,} trainable parameters on {', '.join(params)}"))
    if acc.is_main_process:  # the adapter, the kept checkpoints (adapter + AdamW state) and one being written
        check_writable(run_dir.path, n_params * 4 * (1 + 3 * (t.keep_checkpoints + 1)) + 20 * 2 ** 20)
    if t.gradient_checkpointing:
        for part in params:
            enable_gradient_checkpointing(getattr(base, part))

    # 5. Caches: VAE latents of the (fixed) training crops; text embeddings when the text encoders are frozen.
    # Each encoder is on the device only with what stays there: the UNet comes after the caches.
    if t.cache_latents and not cfg.data.center_crop:
        main_emit(Log("Random crops differ every step, so latents are not cached (data.center_crop is off)."))
    offloaded = offloaded_parts(cfg, family.encoders, params, family.text_encoders)
    with parts_on(base, ["vae"] if latents_cached(cfg) else [], acc.device):
        # in the VAE's own dtype: float32 for a VAE that overflows in half precision (SDXL's), see `place`
        sources = latent_sources(data, base.vae, acc.device, base.vae.dtype, latents_cached(cfg))
    fixed_prompts = sorted({p for s in data.sets.values() for p in s.prompts})
    cache_text = text_cached(cfg, family.encoders, params)
    # all encoders frozen: every prompt encoded once; else the ones that never train (FLUX's T5) encoded once
    cached = cached_encoders(cfg, family.encoders, params, family.text_encoders)
    with parts_on(base, cached, acc.device):
        encode_text = prompt_encoder(base, acc.device, fixed_prompts if cache_text else None,
                                     fixed_prompts if cached and not cache_text else None)
    if offloaded and acc.device != HOME:
        main_emit(Log(f"Kept in main memory while training (their outputs are cached): {', '.join(offloaded)}"))
    move_parts(base, [part for part in base.all_parts if part not in offloaded], acc.device)

    # 6. Optimizer and learning-rate schedule, kept on the run (checkpoints save and restore them).
    optimizer = make_optimizer(cfg, params, family.denoiser)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.max_steps)
    for part in params:  # the parts that train (the denoiser first), wrapped by accelerate
        getattr(base, part).train()
    *prepared, optimizer = acc.prepare(*(getattr(base, part) for part in params), optimizer)
    for part, module in zip(params, prepared):
        setattr(base, part, module)
    trainable = [p for ps in params.values() for p in ps]

    # Samples come out in the dataset's most common shape; the same images give the same shape on a resume.
    shape = buckets.most_common(data.instance.buckets)
    run = Run(cfg, acc, base, specs, run_dir, weight_dtype, main_emit, optimizer, lr_scheduler, offloaded=offloaded,
              sample_size=shape, trainable=trainable, ema=AdapterEMA(trainable, t.ema_decay) if t.ema_decay else None)
    if resume_dir:
        ckpt = run_dir.latest_checkpoint()  # there is one: `preflight` made sure
        load_checkpoint(run, ckpt)
        main_emit(Log(f"Resumed from {ckpt.path.name} (step {run.step})"))
    elif t.sample_every:
        run.sample()  # the step-0 baseline: what the base model makes of the sample prompts

    # 7. The loop: one iteration per optimizer step, of `gradient_accumulation_steps` micro-batches.
    start_step, train_seconds = run.step, 0.0
    clock = StepClock()
    stopped = False
    while run.step < t.max_steps:
        if control.poll(run.step, run.sample, lambda: save_checkpoint(run), run.averaged):
            stopped = True
            break
        tic = time.perf_counter()
        sums = [0.0, 0.0, 0.0]
        for micro in range(t.gradient_accumulation_steps):
            with acc.accumulate(base.unet):
                # Everything random in the micro-batch (images, crops, noise, timesteps) comes from one generator
                # seeded by its position, so a resumed run repeats an uninterrupted one exactly.
                g = step_generator(t.seed, run.step, micro, acc.process_index)
                picks = batch_indices(data, t, run.step, micro, acc.process_index, acc.num_processes)
                batch = draw_batch(sources, picks, g)  # instance images, then as many class images
                loss, inst, prior = batch_loss(predict(base, batch, g, encode_text, weight_dtype, t),
                                               data.klass is not None, t.prior_loss_weight)
                acc.backward(loss)
                if acc.sync_gradients and t.max_grad_norm > 0:
                    acc.clip_grad_norm_(trainable, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for j, v in enumerate((loss, inst, prior)):
                if v is not None:
                    sums[j] += v.detach().float() / t.gradient_accumulation_steps
        if run.ema:
            run.ema.update()
        sums = torch.stack([torch.as_tensor(v, device=acc.device, dtype=torch.float32) for v in sums])
        if acc.num_processes > 1:
            sums = acc.reduce(sums, reduction="mean")  # log the loss of the whole batch, not of one process
        sums = sums.tolist()
        lr = lr_scheduler.get_last_lr()[0]
        lr_scheduler.step()
        run.step += 1
        step_seconds = time.perf_counter() - tic
        train_seconds += step_seconds
        clock.add(step_seconds)
        if not all(math.isfinite(v) for v in sums):
            raise UserError(f"The loss became {sums[0]} at step {run.step}: training diverged. "
                            "Lower the learning rate, or use bf16 instead of fp16.")
        rate = (run.step - start_step) / max(train_seconds, 1e-9)
        prior_loss = sums[2] if data.klass is not None else None
        run.loss_rows.append([run.step, f"{sums[0]:.6g}", f"{sums[1]:.6g}", "" if prior_loss is None else f"{prior_loss:.6g}",
                              f"{lr:.6g}", f"{train_seconds:.3f}"])
        main_emit(Progress(run.step, t.max_steps, sums[0], sums[1], prior_loss, lr, rate,
                           clock.seconds_left(t.max_steps - run.step)))
        tic = time.perf_counter()
        if t.sample_every and run.step % t.sample_every == 0:
            run.sample()
        if t.checkpoint_every and run.step % t.checkpoint_every == 0 and run.step < t.max_steps:
            save_checkpoint(run)
        clock.add_to_last(time.perf_counter() - tic)
        if len(run.loss_rows) >= 50:
            run.flush_losses()

    # 8. Finish: a resumable checkpoint when stopped early, and the adapter file either way.
    if stopped:
        save_checkpoint(run)
    else:
        control.drain(run.sample, lambda: save_checkpoint(run))
    run.flush_losses()
    acc.wait_for_everyone()
    if acc.is_main_process:
        run.save_adapter(run_dir.adapter)
    acc.wait_for_everyone()
    main_emit(Log(f"Saved adapter {run_dir.adapter}"))
    if not stopped:
        try:
            run.compare()
        except Exception as e:  # noqa: BLE001 - the adapter is saved: a failed extra picture must not fail the run
            main_emit(Log(f"Could not draw the adapter off / on pictures ({type(e).__name__}: {e}); the adapter is "
                          "saved. The playground's Compare makes them."))
    main_emit(Finished(str(run_dir), str(run_dir.adapter), run.step, stopped))
    return run_dir.path
