"""Train the embedded demo base model from scratch on procedurally drawn, captioned shapes.

    .venv/bin/python tools/train_demo_model.py --preset gpu --eval-every 2000   # about 7 min on one H200
    .venv/bin/python tools/train_demo_model.py --preset cpu      # a much shorter schedule for a 2-core CPU (about 1 h)

The shipped core/assets/demo_model was made with the gpu preset on an NVIDIA H200 (its training.json
records the commands, times and the accuracy curve): shape 99.5%, colour 100% on 216 held-out
prompt/seed pairs (tools/eval_demo_model.py). The cpu preset sees 15 times fewer samples and reached
only about 36% shape accuracy in an earlier version; the gpu preset on this 2-core CPU would take
about 10 hours (0.6 s per 32 samples).

The result is an ordinary Stable Diffusion model in the diffusers layout (CLIPTokenizer with the
real CLIP vocabulary, CLIPTextModel, AutoencoderKL, UNet2DConditionModel, DDPMScheduler), only
small: 64x64 images, 16x16x4 latents. Repeatable for a given seed, device and thread count (up to the
GPU's floating-point non-determinism).

Phases: 0. a fixed pool of captioned scenes is drawn (in parallel processes); 1. the VAE learns to
reconstruct them (MSE + L1, a KL weight of 1e-6 as in SD); 2. the pool is encoded once; 3. the
UNet and the text encoder learn together to denoise those latents given the caption (10% empty
captions for classifier-free guidance), with an EMA of the weights; optional evaluations on the
way (--eval-every) record how shape and colour accuracy grow; 4. EMA weights are saved in fp16.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from core import demo  # noqa: E402
from core.base_model import BaseModel, clip_tokenizer  # noqa: E402
from core.models import save_model_folder  # noqa: E402

# UNet variants: channels per level and which levels have cross-attention (16x16, 8x8, 4x4).
ARCHS = {
    "small": ((48, 96, 96), (False, True, True)),
    "small-attn16": ((48, 96, 96), (True, True, True)),
    "wide": ((64, 128, 128), (True, True, True)),
}
PRESETS = {  # schedules; any flag given on the command line wins
    "cpu": dict(images=40000, vae_steps=1200, vae_batch=24, unet_steps=4000, unet_batch=32, unet_lr=4e-4, ema=0.999),
    "gpu": dict(images=100000, vae_steps=3000, vae_batch=64, unet_steps=3800, unet_batch=512, unet_lr=8e-4, ema=0.9995),
}


def build_parts(seed: int, arch: str = "small"):
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=64,
    )
    channels, attn = ARCHS[arch]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
        down_block_types=down, up_block_types=up, cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                              steps_offset=1)
    return text_encoder, vae, unet, scheduler


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _draw_chunk(job):
    """Scenes, images (uint8) and captions for one chunk; a pure function of (seed, chunk index, n)."""
    seed, index, n = job
    rng = random.Random(seed * 1_000_003 + index)
    scenes = [demo.random_scene(rng) for _ in range(n)]
    images = np.stack([np.asarray(demo.render(s)) for s in scenes])
    captions = [demo.caption(s, rng) if rng.random() > 0.1 else "" for s in scenes]
    return images, captions


def draw_pool(n: int, seed: int, workers: int):
    """n captioned scenes drawn in parallel: uint8 images (n, 3, 64, 64) and their captions (10% empty)."""
    jobs = [(seed, i, min(1000, n - start)) for i, start in enumerate(range(0, n, 1000))]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_draw_chunk, jobs)
    else:
        parts = [_draw_chunk(j) for j in jobs]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])).permute(0, 3, 1, 2).contiguous()
    return images, [c for p in parts for c in p[1]]


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def log(msg: str, t0: float) -> None:
    print(f"[{(time.time() - t0) / 60:5.1f} min] {msg}", flush=True)


def warmup_cosine(opt, steps: int, warm: int):
    """Linear warm-up, then a cosine decay to 10% of the peak learning rate."""
    def factor(s):
        return min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimiser(params: list, lr: float, steps: int, warm: int, weight_decay: float = 0.0, clip: float | None = None):
    """AdamW with warm-up + cosine; returns step(loss) -> the learning rate used."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = warmup_cosine(opt, steps, warm)

    def step(loss: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        return sched.get_last_lr()[0]
    return step


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, seed: int, t0: float) -> None:
    step_with = optimiser(list(vae.parameters()), 1e-3, steps, warm=50)
    g = torch.Generator(images.device).manual_seed(seed + 1)
    vae.train()
    for step in range(1, steps + 1):
        x = as_float(images[torch.randint(len(images), (batch,), generator=g, device=images.device)])
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=g)).sample
        loss = F.mse_loss(recon, x) + 0.1 * F.l1_loss(recon, x) + 1e-6 * dist.kl().mean()
        step_with(loss)
        if step % 500 == 0 or step == steps:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}", t0)
    vae.eval()


def _broad_scene_image(rng: random.Random):
    """A scene outside the palette: any colour, a two-colour split, or a hole; the VAE must draw them all."""
    scene = demo.random_scene(rng)
    colours = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
    kind = rng.random()
    if kind < 0.35:
        return demo.render(scene, pattern=(colours[0], colours[0]))
    if kind < 0.8:
        return demo.render(scene, pattern=tuple(colours))
    pick = rng.choice(list(demo.COLOURS.values()))
    return demo.render(scene, pattern=(pick, colours[1]) if kind < 0.9 else (colours[0], pick))


def broaden_vae(vae, steps: int, batch: int, seed: int, t0: float, anchor_weight: float = 10.0) -> None:
    """Teach the VAE colours and two-colour patterns it never saw, without moving the latents of the scenes
    the UNet was trained on: half of each batch is palette scenes, whose encoder means are pulled towards
    those of the frozen original (so the UNet stays valid); the other half is broad scenes."""
    frozen = copy.deepcopy(vae).eval().requires_grad_(False)
    vae.train().requires_grad_(True)
    step_with = optimiser(list(vae.parameters()), 3e-4, steps, warm=50)
    rng = random.Random(seed + 2)
    g = torch.Generator().manual_seed(seed + 2)
    half = batch // 2
    for step in range(1, steps + 1):
        palette = [demo.render(demo.random_scene(rng)) for _ in range(half)]
        broad = [_broad_scene_image(rng) for _ in range(batch - half)]
        x = to_tensor(palette + broad)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)).sample
        with torch.no_grad():
            target = frozen.encode(x[:half]).latent_dist.mean
        anchor = F.mse_loss(dist.mean[:half], target)
        loss = F.mse_loss(recon, x) + 0.1 * F.l1_loss(recon, x) + 1e-6 * dist.kl().mean() + anchor_weight * anchor
        step_with(loss)
        if step % 50 == 0 or step == steps:
            log(f"broaden vae step {step}/{steps} loss {loss.item():.4f} anchor {anchor.item():.5f}", t0)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(vae, tokenizer, images: torch.Tensor, captions: list[str], t0: float):
    """The pool -> VAE posterior (mean, std), token ids, and the latent scale factor."""
    means, stds = [], []
    for start in range(0, len(images), 512):
        dist = vae.encode(as_float(images[start:start + 512])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    mean, std = torch.cat(means), torch.cat(stds)
    scale = 1.0 / mean.std().item()
    log(f"encoded {len(images)} images; latent std {mean.std().item():.3f} -> scaling_factor {scale:.4f}", t0)
    return mean, std, ids.to(mean.device), scale


def train_denoiser(unet, text_encoder, scheduler, data, steps: int, batch: int, seed: int, t0: float, lr: float,
                   ema_decay: float, stop_after: int | None = None, every: int = 0, on_snapshot=None):
    mean, std, ids, scale = data
    device = mean.device
    params = list(unet.parameters()) + list(text_encoder.parameters())
    step_with = optimiser(params, lr, steps, warm=min(300, steps // 10 + 1), weight_decay=1e-2, clip=1.0)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    alphas = scheduler.alphas_cumprod.to(device)
    g = torch.Generator(device).manual_seed(seed)
    unet.train()
    text_encoder.train()
    losses = []
    for step in range(1, min(steps, stop_after or steps) + 1):
        idx = torch.randint(len(mean), (batch,), generator=g, device=device)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g, device=device)) * scale
        noise = torch.randn(x0.shape, generator=g, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, text_encoder(ids[idx])[0]).sample
        loss = F.mse_loss(pred, noise)
        lr_now = step_with(loss)
        decay = min(ema_decay, (1 + step) / (10 + step))  # EMA with warm-up
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        losses.append(loss.detach())
        if step % 200 == 0 or step == steps:
            recent = torch.stack(losses[-200:]).mean().item()  # one host sync per 200 steps
            log(f"unet step {step}/{steps} loss {recent:.4f} lr {lr_now:.2e}", t0)
            losses = []
        if on_snapshot and every and step % every == 0 and step < steps:
            on_snapshot(step, ema_unet, ema_te)
            unet.train()
            text_encoder.train()
    return ema_unet, ema_te


def fp16_model(tokenizer, te, vae, unet, scheduler) -> BaseModel:
    half = lambda m: copy.deepcopy(m).cpu().half()  # noqa: E731
    return BaseModel("demo", tokenizer, half(te), half(vae), half(unet), scheduler)


def broaden_main(args, t0: float) -> None:
    """Phase 3 of the shipped model: its VAE learns colours the shape world lacks (CPU, about 20 min)."""
    from core.models import load_model_folder

    model = load_model_folder(args.broaden)
    vae = model.vae.float()
    broaden_vae(vae, args.broaden_steps, 32, args.seed, t0)
    history = json.loads((Path(args.broaden) / "training.json").read_text())
    model.vae = copy.deepcopy(vae).half()
    save_model_folder(model, args.out)
    record = {"phase": len(history) + 1, "command": "python tools/train_demo_model.py " + " ".join(sys.argv[1:]),
              "device_name": "cpu", "threads": args.threads, "broaden_steps": args.broaden_steps,
              "minutes": round((time.time() - t0) / 60, 1)}
    (Path(args.out) / "training.json").write_text(json.dumps(history + [record], indent=1))
    log(f"saved {args.out}", t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "core" / "assets" / "demo_model"))
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--arch", choices=sorted(ARCHS), default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes drawing the image pool")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in ("images", "vae_steps", "vae_batch", "unet_steps", "unet_batch"):
        p.add_argument("--" + name.replace("_", "-"), type=int)
    p.add_argument("--unet-lr", type=float)
    p.add_argument("--ema", type=float, help="EMA decay of the saved weights")
    p.add_argument("--stop-after", type=int, help="end the denoiser phase after this many steps (schedule unchanged)")
    p.add_argument("--vae-from", help="take the VAE from this saved demo model folder instead of training one")
    p.add_argument("--broaden", metavar="MODEL_DIR", help="only teach this saved model's VAE colours and two-colour "
                   "patterns outside the palette (keeping its latents; see broaden_vae), saving to --out")
    p.add_argument("--broaden-steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=0, help="measure shape/colour accuracy every N denoiser steps")
    p.add_argument("--report", help="also write the training record (with the accuracy curve) to this JSON file")
    args = p.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    # Tiny gradients and optimizer moments become denormal floats as training goes on, and x86 CPUs
    # handle those up to 10x slower (seen here: 0.6 s/step at the start, 6 s/step after 1,600 steps).
    torch.set_flush_denormal(True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    t0 = time.time()
    if args.broaden:
        return broaden_main(args, t0)
    tokenizer = clip_tokenizer()
    text_encoder, vae, unet, scheduler = build_parts(args.seed, args.arch)

    images, captions = draw_pool(args.images, args.seed, args.workers)
    images = images.to(device)
    log(f"drew {len(captions)} captioned scenes", t0)
    vae.to(device)
    if args.vae_from:
        from core.models import load_model_folder

        vae.load_state_dict(load_model_folder(args.vae_from).vae.float().state_dict())
        log(f"VAE taken from {args.vae_from}", t0)
    else:
        train_vae(vae, images, args.vae_steps, args.vae_batch, args.seed, t0)
    vae.eval().requires_grad_(False)
    data = encode_pool(vae, tokenizer, images, captions, t0)
    del images
    vae.register_to_config(scaling_factor=data[3])
    unet.to(device)
    text_encoder.to(device)

    argv = sys.argv[1:]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "report")}
    info = {"command": "python tools/train_demo_model.py " + " ".join(argv), **settings,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "curve": []}

    def save(ema_unet, ema_te):
        save_model_folder(fp16_model(tokenizer, ema_te, vae, ema_unet, scheduler), args.out)
        (Path(args.out) / "training.json").write_text(json.dumps(info, indent=1))
        if args.report:
            Path(args.report).write_text(json.dumps(info, indent=1))

    def measure(step, ema_unet, ema_te, seeds=1):
        from tools.eval_demo_model import evaluate

        model = BaseModel("demo", tokenizer, ema_te.eval(), vae, ema_unet.eval(), scheduler)
        report, _ = evaluate(model, seeds)
        point = {"step": step, "minutes": round((time.time() - t0) / 60, 2), "images": report["images"],
                 "shape_accuracy": report["shape_accuracy"], "colour_accuracy": report["colour_accuracy"]}
        info["curve"].append(point)
        log(f"eval at step {step}: shape {point['shape_accuracy']:.3f} colour {point['colour_accuracy']:.3f}", t0)
        save(ema_unet, ema_te)  # a usable model even if the run is cut short
        return report

    ema_unet, ema_te = train_denoiser(unet, text_encoder, scheduler, data, args.unet_steps, args.unet_batch, args.seed,
                                      t0, lr=args.unet_lr, ema_decay=args.ema, stop_after=args.stop_after,
                                      every=args.eval_every, on_snapshot=measure if args.eval_every else None)
    info["train_minutes"] = round((time.time() - t0) / 60, 2)
    if args.eval_every:
        info["final"] = measure(args.stop_after or args.unet_steps, ema_unet, ema_te, seeds=2)
    save(ema_unet, ema_te)
    log(f"saved {args.out}", t0)


if __name__ == "__main__":
    main()
