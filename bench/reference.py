"""The plain reference loop the benchmark compares against (what a first DreamBooth + peft script does).

peft's `get_peft_model` on the UNet and the text encoder (r8, alpha 8, the full UNet target set and the
text encoder's q/v), frozen weights in float32 under fp16 autocast with a GradScaler on a GPU (float32 on
a CPU), the VAE encode and the text encoder run every step, plain AdamW, `loss.item()` every step; no
caching, no compile, no checkpointing. Written for the benchmark only: the app never imports it.

`reference_loop_sdxl` is the SDXL reference: what diffusers' train_dreambooth_lora_sdxl.py does per step with its
README's settings (our own code, following the script's steps).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from PIL import Image

from core.config import TEXT_ENCODER_TARGETS, UNET_TARGETS_ATTENTION, UNET_TARGETS_FULL


def peft_config(kind: str, targets: list[str], rank: int = 8):
    if kind in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, use_dora=kind == "dora")
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=rank, target_modules=targets)
    return LoKrConfig(r=rank, alpha=rank, target_modules=targets)


def load_pixels(folder: Path, size: int) -> list[torch.Tensor]:
    out = []
    for path in sorted(folder.glob("*.png")):
        img = Image.open(path).convert("RGB").resize((size, size))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return out


def optimizer_step(scaler, optimizer, loss, tic: float) -> float:
    """The end of a reference step as the examples write it: scaled backward, step, and `loss.item()` every step
    (a host sync they pay); returns the step's seconds since `tic`."""
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    loss.item()
    return time.perf_counter() - tic


def reference_loop(base, kind: str, instance_dir: Path, class_dir: Path, size: int, steps: int,
                   device: torch.device) -> list[float]:
    """Train `steps` steps of 1 instance + 1 class image; return each step's seconds."""
    fp16 = device.type == "cuda"
    unet = get_peft_model(base.unet.to(device, torch.float32), peft_config(kind, list(UNET_TARGETS_FULL)))
    text_encoder = get_peft_model(base.text_encoder.to(device, torch.float32),
                                  peft_config(kind, list(TEXT_ENCODER_TARGETS)))
    vae = base.vae.to(device, torch.float32).requires_grad_(False)
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    instance, klass = load_pixels(instance_dir, size), load_pixels(class_dir, size)
    prompts = ["a photo of sks dog", "a photo of a dog"]
    sched = base.scheduler
    unet.train()
    text_encoder.train()
    seconds = []
    for step in range(steps):
        tic = time.perf_counter()
        pixels = torch.stack([instance[step % len(instance)], klass[step % len(klass)]]).to(device)
        ids = base.tokenizer(prompts, padding="max_length", max_length=base.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            cond = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (2,), device=device)
            pred = unet(sched.add_noise(latents, noise, t), t, cond).sample
            per_image = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = per_image[0] + 1.0 * per_image[1]
        seconds.append(optimizer_step(scaler, optimizer, loss, tic))
    return seconds


def sdxl_prompt_embeddings(base, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(both encoders' penultimate hidden states side by side, the second encoder's projected pooled output)."""
    states = []
    with torch.no_grad():
        for encoder, tokenizer in ((base.text_encoder, base.tokenizer), (base.text_encoder_2, base.tokenizer_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), out[0]


def reference_loop_sdxl(base, kind: str, instance_dir: Path, class_dir: Path, size: int, steps: int,
                        device: torch.device) -> list[float]:
    """train_dreambooth_lora_sdxl.py's step on 1 instance + 1 class image: LoRA r4 on the UNet's attention (the
    README's run), frozen weights in fp16 with the adapter in fp32, text encoders frozen with the prompt embeddings
    computed once, the VAE in fp32 (SDXL's overflows in fp16) encoding every step, time ids of the square crop, fp16
    autocast and a GradScaler, plain AdamW, no checkpointing; return each step's seconds."""
    fp16 = device.type == "cuda"
    weight_dtype = torch.float16 if fp16 else torch.float32
    unet = base.unet.to(device, weight_dtype).requires_grad_(False)
    unet.add_adapter(peft_config(kind, list(UNET_TARGETS_ATTENTION), rank=4))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # the adapter trains in fp32 beside the fp16 weights
        p.data = p.data.float()
    for encoder in (base.text_encoder, base.text_encoder_2):
        encoder.to(device, weight_dtype).requires_grad_(False)
    vae = base.vae.to(device, torch.float32).requires_grad_(False)
    hidden, pooled = sdxl_prompt_embeddings(base, ["a photo of sks dog", "a photo of a dog"], device)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=weight_dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    instance, klass = load_pixels(instance_dir, size), load_pixels(class_dir, size)
    sched = base.scheduler
    unet.train()
    seconds = []
    for step in range(steps):
        tic = time.perf_counter()
        pixels = torch.stack([instance[step % len(instance)], klass[step % len(klass)]]).to(device)
        with torch.no_grad():
            latents = (vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor).to(weight_dtype)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (2,), device=device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            pred = unet(sched.add_noise(latents, noise, t), t, hidden,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            per_image = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = per_image[0] + 1.0 * per_image[1]
        seconds.append(optimizer_step(scaler, optimizer, loss, tic))
    return seconds


def reference_loop_flux(base, kind: str, instance_dir: Path, class_dir: Path, size: int, steps: int,
                        device: torch.device) -> list[float]:
    """train_dreambooth_lora_flux.py's step on 1 instance + 1 class image, with its README's memory settings: the
    frozen model in bf16 (float32 on a CPU), LoRA r16 on the script's transformer targets (the adapter in the
    weights' dtype, as the script leaves it under bf16), the text encoders frozen with the prompt embeddings
    computed once, the VAE encoding every step, sigmas drawn uniformly (its default weighting scheme "none"),
    guidance 1.0, gradient checkpointing, plain AdamW, `loss.item()` every step; return each step's seconds."""
    from core.families.flux import FluxFamily, latent_ids, pack, unpack

    family = FluxFamily()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = base.transformer.to(device, dtype).requires_grad_(False)
    transformer.add_adapter(peft_config(kind, list(family.default_targets), rank=16))
    transformer.enable_gradient_checkpointing()
    params = [p for p in transformer.parameters() if p.requires_grad]
    vae = base.vae.to(device, dtype).requires_grad_(False)
    with torch.no_grad():  # the script's compute_text_embeddings: once, then the encoders leave the GPU
        for part in (base.text_encoder, base.text_encoder_2):
            part.to(device, dtype)
        cond = family.encode_prompts(base, ["a photo of sks dog", "a photo of a dog"], device)
        for part in (base.text_encoder, base.text_encoder_2):
            part.to("cpu")
    hidden, pooled = cond["hidden"].to(dtype), cond["pooled"].to(dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    instance, klass = load_pixels(instance_dir, size), load_pixels(class_dir, size)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    transformer.train()
    seconds = []
    for step in range(steps):
        tic = time.perf_counter()
        pixels = torch.stack([instance[step % len(instance)], klass[step % len(klass)]]).to(device, dtype)
        with torch.no_grad():
            latents = (vae.encode(pixels).latent_dist.sample() - shift) * scale
        h, w = latents.shape[-2:]
        noise = torch.randn_like(latents)
        sigmas = torch.rand(2, device=device, dtype=dtype)
        noisy = (1 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise
        pred = transformer(hidden_states=pack(noisy), timestep=sigmas, guidance=torch.ones(2, device=device),
                           pooled_projections=pooled, encoder_hidden_states=hidden,
                           txt_ids=torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype),
                           img_ids=latent_ids(h, w, device, dtype)).sample
        per_image = F.mse_loss(unpack(pred, h, w).float(), (noise - latents).float(),
                               reduction="none").mean(dim=(1, 2, 3))
        loss = per_image[0] + 1.0 * per_image[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()
        seconds.append(time.perf_counter() - tic)
    return seconds
