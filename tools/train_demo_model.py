"""Train the embedded demo base model from scratch on procedurally drawn, captioned shapes.

    .venv/bin/python tools/train_demo_model.py            # writes core/assets/demo_model (about 40 min, 2 CPU cores)

The result is an ordinary Stable Diffusion model in the diffusers layout (CLIPTokenizer with the
real CLIP vocabulary, CLIPTextModel, AutoencoderKL, UNet2DConditionModel, DDPMScheduler), only
small: 64x64 images, 16x16x4 latents. Deterministic for a given seed and thread count.

Phases: 1. the VAE learns to reconstruct shape images (MSE + L1, a KL weight of 1e-6 as in SD);
2. a fixed set of captioned images is encoded once; 3. the UNet and the text encoder learn
together to denoise those latents given the caption (10% empty captions for classifier-free
guidance), with an EMA of the weights; 4. EMA weights are saved in fp16 safetensors.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
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
from core.models import BaseModel, clip_tokenizer, save_model_folder  # noqa: E402


def build_parts(seed: int):
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
    # Cross-attention at 8x8 and 4x4 only: at 16x16 it would double the cost for little gain.
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                              steps_offset=1)
    return text_encoder, vae, unet, scheduler


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def random_batch(rng: random.Random, n: int):
    scenes = [demo.random_scene(rng) for _ in range(n)]
    return scenes, to_tensor([demo.render(s) for s in scenes])


def log(msg: str, t0: float) -> None:
    print(f"[{(time.time() - t0) / 60:5.1f} min] {msg}", flush=True)


def warmup_cosine(opt, steps: int, warm: int):
    """Linear warm-up, then a cosine decay to 10% of the peak learning rate."""
    def factor(s):
        return min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_vae(vae, steps: int, batch: int, rng: random.Random, t0: float) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps, warm=50)
    vae.train()
    for step in range(1, steps + 1):
        _, x = random_batch(rng, batch)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = F.mse_loss(recon, x) + 0.1 * F.l1_loss(recon, x) + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}", t0)
    vae.eval()


@torch.no_grad()
def encode_dataset(vae, tokenizer, n: int, rng: random.Random, t0: float):
    """n random captioned scenes -> VAE posterior (mean, std) and token ids; also the latent scale factor."""
    means, stds, ids = [], [], []
    for start in range(0, n, 256):
        scenes, x = random_batch(rng, min(256, n - start))
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        captions = [demo.caption(s, rng) if rng.random() > 0.1 else "" for s in scenes]
        ids.append(tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids)
    mean, std, ids = torch.cat(means), torch.cat(stds), torch.cat(ids)
    scale = 1.0 / mean.std().item()
    log(f"encoded {n} images; latent std {mean.std().item():.3f} -> scaling_factor {scale:.4f}", t0)
    return mean, std, ids, scale


def train_denoiser(unet, text_encoder, scheduler, data, steps: int, batch: int, seed: int, t0: float, snapshot=None,
                   lr: float = 4e-4, stop_after: int | None = None):
    mean, std, ids, scale = data
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    lr_sched = warmup_cosine(opt, steps, warm=200)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    g = torch.Generator().manual_seed(seed)
    unet.train()
    text_encoder.train()
    running = None
    for step in range(1, min(steps, stop_after or steps) + 1):
        idx = torch.randint(len(mean), (batch,), generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        pred = unet(scheduler.add_noise(x0, noise, t), t, text_encoder(ids[idx])[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        decay = min(0.999, (1 + step) / (10 + step))  # EMA with warm-up
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_te, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps:
            log(f"unet step {step}/{steps} loss {running:.4f} lr {lr_sched.get_last_lr()[0]:.2e}", t0)
        if snapshot and step % 1000 == 0 and step < steps:
            snapshot(ema_unet, ema_te)  # a usable model even if the run is cut short
    return ema_unet, ema_te


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "core" / "assets" / "demo_model"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=24)
    p.add_argument("--images", type=int, default=40000)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=4e-4)
    p.add_argument("--stop-after", type=int, help="end the denoiser phase after this many steps (schedule unchanged)")
    p.add_argument("--continue-from", help="a saved demo model folder: skip the VAE phase and train its UNet further")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # Tiny gradients and optimizer moments become denormal floats as training goes on, and x86 CPUs
    # handle those up to 10x slower (seen here: 0.6 s/step at the start, 6 s/step after 1,600 steps).
    torch.set_flush_denormal(True)
    t0 = time.time()
    rng = random.Random(args.seed)
    tokenizer = clip_tokenizer()
    text_encoder, vae, unet, scheduler = build_parts(args.seed)

    work = Path(args.out).with_name(".demo_model_vae.pt")
    if args.continue_from:  # more denoiser training on top of a saved model (its VAE is kept as it is)
        from core.models import load_model_folder

        saved = load_model_folder(args.continue_from)
        text_encoder.load_state_dict(saved.text_encoder.float().state_dict())
        unet.load_state_dict(saved.unet.float().state_dict())
        vae.load_state_dict(saved.vae.float().state_dict())
        log(f"continuing from {args.continue_from}", t0)
    elif work.is_file():  # a finished phase 1 from an interrupted run
        vae.load_state_dict(torch.load(work, weights_only=True))
        log(f"VAE loaded from {work}", t0)
    else:
        train_vae(vae, args.vae_steps, args.vae_batch, rng, t0)
        torch.save(vae.state_dict(), work)
    vae.eval().requires_grad_(False)
    data = encode_dataset(vae, tokenizer, args.images, rng, t0)
    if args.continue_from:  # keep the scale the model was trained with
        data = (*data[:3], vae.config.scaling_factor)
    vae.register_to_config(scaling_factor=data[3])

    def save(u, te):
        half = lambda m: copy.deepcopy(m).half()  # noqa: E731
        save_model_folder(BaseModel("demo", tokenizer, half(te), half(vae), half(u), scheduler), args.out)

    ema_unet, ema_te = train_denoiser(unet, text_encoder, scheduler, data, args.unet_steps, args.unet_batch, args.seed,
                                      t0, snapshot=save, lr=args.unet_lr, stop_after=args.stop_after)
    save(ema_unet, ema_te)
    info = {"seed": args.seed, "threads": args.threads, "minutes": round((time.time() - t0) / 60, 1),
            "command": "python tools/train_demo_model.py " + " ".join(sys.argv[1:]), **{k: v for k, v in vars(args).items() if k != "out"}}
    record = Path(args.out) / "training.json"  # one entry per training phase, oldest first
    history = json.loads(record.read_text()) if args.continue_from and record.is_file() else []
    history = history if isinstance(history, list) else [history]
    record.write_text(json.dumps(history + [info], indent=1))
    work.unlink(missing_ok=True)
    log(f"saved {args.out}", t0)


if __name__ == "__main__":
    main()
