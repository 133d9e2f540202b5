"""FLUX.1 (dev and schnell): a flow-matching transformer over 2x2-packed 16-channel latents, conditioned on T5-XXL's
token embeddings and CLIP-L's pooled embedding.

What differs from the UNet families, as the diffusers FLUX DreamBooth LoRA script and FluxPipeline do it:
- flow matching instead of noise prediction: x_t = (1 - sigma) x0 + sigma noise, and the transformer predicts the
  velocity noise - x0; sigma is drawn uniformly, logit-normally or by the "mode" density (SD3's schemes), optionally
  shifted towards noise (by a fixed factor, or by the image's token count as FLUX.1-dev's sampler shifts it), and the
  loss may be weighted per sigma (SD3's `sigma_sqrt` and `cosmap`);
- latents are shifted and scaled by the VAE's shift_factor / scaling_factor, then packed into 2x2 patches (one token
  per patch) with position ids (row, column) per token; the timestep goes in as sigma (0-1);
- T5 gives `encoder_hidden_states` (its token ids count 0), CLIP-L's pooled output `pooled_projections`;
- dev has a guidance embedding (the distilled guidance scale: `train.guidance_scale`, 1.0 while training as kohya
  advises, the sample guidance when sampling), schnell has none;
- adapters go on the transformer (and optionally CLIP-L); T5 is never trained: it is the second, frozen encoder.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ..base_model import BaseModel, clip_tokenizer
from ..errors import ConfigError, ModelLoadError
from .base import Conditioning, Family
from .flux_files import held_dtype, is_flux_transformer, load_flux_file
from .flux_parts import DOUBLE_BLOCK, FUSED, SINGLE_BLOCK, bfl_name, tiny_t5_tokenizer  # noqa: F401 (re-exported)
from .sd import plain_config

# FLUX.1's sampler: the shift grows with the image's token count, from base_shift at 256 tokens (512 px) to
# max_shift at 4096 (1024 px) (the scheduler config's values; calculate_shift in diffusers' pipeline_flux.py)
BASE_SEQ, MAX_SEQ, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


# what a diffusers FLUX.1 folder holds (model_index.json)
FOLDER_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) latents -> (b, h/2 * w/2, 4c) tokens, one per 2x2 patch (rows first), as FLUX reads them."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of `height` x `width`."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def latent_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of the packed tokens: (0, row, column), as FluxPipeline gives them."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def resolution_shift(tokens: int) -> float:
    """exp(mu) of FLUX.1's sampler for an image of `tokens` packed tokens (linear in the token count)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ - BASE_SEQ)
    return math.exp(BASE_SHIFT + slope * (tokens - BASE_SEQ))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Move sigmas towards noise by `shift` (1: unchanged): shift * s / (1 + (shift - 1) * s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def draw_sigmas(n: int, t, generator: torch.Generator) -> torch.Tensor:
    """`n` sigmas in (0, 1) by `train.timestep_sampling` (SD3's densities, with the reference script's defaults)."""
    scheme = t.timestep_sampling
    if scheme == "logit_normal":
        return torch.sigmoid(t.logit_mean + t.logit_std * torch.randn(n, generator=generator))
    u = torch.rand(n, generator=generator)
    if scheme == "mode":
        return 1 - u - t.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheme == "uniform":
        return u
    raise ConfigError(f"`train.timestep_sampling` must be uniform, logit_normal or mode, got {scheme!r}.")


def loss_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor | None:
    """Per-image loss weights by `train.flow_loss_weighting` (SD3's): none, sigma_sqrt or cosmap."""
    if scheme == "none":
        return None
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    raise ConfigError(f"`train.flow_loss_weighting` must be none, sigma_sqrt or cosmap, got {scheme!r}.")


class FluxFamily(Family):
    name = "flux"
    label = "FLUX.1"
    denoiser = "transformer"
    text_encoders = ("text_encoder",)  # CLIP-L, which may train; T5 (text_encoder_2) never does
    prompt_encoders = ("text_encoder", "text_encoder_2")
    kohya_prefixes = {"transformer": "lora_unet_", "text_encoder": "lora_te1_"}
    default_resolution = 1024
    pipeline = "FluxPipeline"
    # the diffusers FLUX DreamBooth script's targets: attention and feed-forward projections of the double blocks
    # (image and text streams), and the attention projections of the single blocks (their to_q/k/v)
    default_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2")
    adapter_metadata = {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"}
    t5_max_length = 512  # dev's; schnell was trained with 256
    half_precision = "bf16"  # as BFL and diffusers run it: T5's and the transformer's activations overflow fp16
    hub_files = ("model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*", "transformer/config.json",
                 "transformer/diffusion_pytorch_model*.safetensors*", "vae/config.json",
                 "vae/diffusion_pytorch_model*.safetensors*", "text_encoder/config.json",
                 "text_encoder/model*.safetensors*", "text_encoder_2/config.json", "text_encoder_2/model*.safetensors*")
    hub_ids = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")

    # --- recognising and loading ----------------------------------------------------------------------------------

    def matches_folder(self, index, unet_config) -> bool:
        """Any FLUX.1 pipeline folder (text-to-image, Fill, Kontext ...): check_folder refuses the ones that are not
        plain text-to-image."""
        named = str(index.get("_class_name", "")).startswith("Flux")
        return named or ("transformer" in index and "text_encoder_2" in index)

    def check_folder(self, folder, index, unet_config) -> None:
        kind = index.get("_class_name", "")
        if kind and kind != "FluxPipeline":
            raise ModelLoadError(f"{folder} holds a {kind} model (image editing or control); this app trains plain "
                                 "FLUX.1 text-to-image models (FLUX.1-dev, FLUX.1-schnell and their fine-tunes).")
        missing = [p for p in FOLDER_PARTS if p not in index]
        if missing:
            raise ModelLoadError(f"{folder} is not a complete FLUX.1 model: it has no {', '.join(missing)}.")

    def matches_checkpoint(self, shapes) -> bool:
        return is_flux_transformer(shapes)

    def load_file(self, path, prediction_type="auto", allow_pickle=False, name=None, companions=None) -> BaseModel:
        """A BFL-layout transformer file with its CLIP-L, T5-XXL and VAE (core/families/flux_files.py)."""
        return load_flux_file(path, name, companions)

    def held_dtype(self, model: BaseModel) -> torch.dtype:
        return held_dtype(model.transformer.config)

    def load_folder(self, folder, name=None, **kwargs) -> BaseModel:
        """The parts of a diffusers FLUX.1 folder (local, or a hub id with `local_files_only`) on the CPU, in
        `held_dtype` (bf16 for the real model)."""
        from transformers import CLIPTokenizer, T5TokenizerFast

        folder = str(folder)
        config = FluxTransformer2DModel.load_config(folder, subfolder="transformer", **kwargs)
        weights = {"use_safetensors": True, "torch_dtype": held_dtype(config), **kwargs}
        return BaseModel(
            name or folder, CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kwargs),
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **weights),
            AutoencoderKL.from_pretrained(folder, subfolder="vae", **weights),
            FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", **weights),
            FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", **kwargs),
            text_encoder_2=T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", **weights),
            tokenizer_2=T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2", **kwargs),
            family_name=self.name)

    # --- building ---------------------------------------------------------------------------------------------------

    def build_tiny(self, seed: int = 0, prediction_type: str = "flow", guidance: bool = True) -> BaseModel:
        """A tiny random FLUX-architecture model (one double and one single block, as diffusers' own FLUX tests
        build it), tiny CLIP and T5 encoders with tokenizers made in code, a tiny VAE; dev-like (guidance
        embedding) unless `guidance` is False (schnell-like). Deterministic per seed."""
        torch.manual_seed(seed)
        tokenizer = clip_tokenizer()
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
        tokenizer_2 = tiny_t5_tokenizer()
        t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                     num_heads=4, relative_attention_num_buckets=8, is_encoder_decoder=False,
                                     use_cache=False, feed_forward_proj="gated-gelu", pad_token_id=0,
                                     eos_token_id=1))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=32,
                            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                            scaling_factor=1.5035)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                             guidance_embeds=guidance)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=BASE_SHIFT,
                                                    max_shift=MAX_SHIFT, base_image_seq_len=BASE_SEQ,
                                                    max_image_seq_len=MAX_SEQ)
        return BaseModel("tiny-flux", tokenizer, clip, vae, transformer, scheduler, text_encoder_2=t5,
                         tokenizer_2=tokenizer_2, family_name=self.name)

    def has_guidance(self, transformer) -> bool:
        """dev (and its fine-tunes) embed the guidance scale; schnell does not."""
        return bool(getattr(transformer, "config", {}).get("guidance_embeds", False))

    # --- training ---------------------------------------------------------------------------------------------------

    def encode_prompts(self, base: BaseModel, prompts: Sequence[str], device,
                       frozen: Conditioning | None = None) -> Conditioning:
        """T5's last hidden state (`hidden`) and CLIP-L's pooled output (`pooled`), as FluxPipeline.encode_prompt;
        `frozen`: T5's part already encoded (`frozen_conditioning`), so that only CLIP-L runs."""
        clip_ids = self.tokenize(base.tokenizer, prompts, device)
        pooled = base.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        return {**(frozen or self.frozen_conditioning(base, prompts, device)), "pooled": pooled}

    def frozen_conditioning(self, base: BaseModel, prompts: Sequence[str], device) -> Conditioning:
        """T5's part: it never trains, so while CLIP-L trains its outputs are still computed once."""
        t5_ids = base.tokenizer_2(list(prompts), padding="max_length", max_length=self.t5_length(base.tokenizer_2),
                                  truncation=True, return_tensors="pt").input_ids.to(device)
        return {"hidden": base.text_encoder_2(t5_ids, output_hidden_states=False)[0]}

    def t5_length(self, tokenizer) -> int:
        """T5's prompt length: dev's 512, or less where the tokenizer says so."""
        return min(self.t5_max_length, tokenizer.model_max_length)

    def scale_latents(self, base: BaseModel, latents: torch.Tensor) -> torch.Tensor:
        return (latents - base.vae.config.shift_factor) * base.vae.config.scaling_factor

    def noisy_and_target(self, base: BaseModel, x0: torch.Tensor, generator: torch.Generator, t):
        """Flow matching: sigma per image, x_t = (1 - sigma) x0 + sigma noise, target noise - x0. The draws: noise,
        then the sigmas (the UNet families' order: noise, offset noise, timesteps)."""
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        sigmas = draw_sigmas(x0.shape[0], t, generator)
        if t.flow_shift == "resolution":
            sigmas = shift_sigmas(sigmas, resolution_shift(x0.shape[2] * x0.shape[3] // 4))
        elif t.flow_shift == "fixed":
            sigmas = shift_sigmas(sigmas, t.flow_shift_value)
        sigmas = sigmas.to(x0.device)
        s = sigmas.view(-1, 1, 1, 1).to(x0.dtype)
        noisy = (1 - s) * x0 + s * noise
        return noisy, sigmas * 1000, noise - x0, loss_weights(sigmas, t.flow_loss_weighting)

    def unet_forward(self, unet, noisy, timesteps, cond, geometry, dtype, guidance: float = 1.0) -> torch.Tensor:
        """The transformer's velocity for (b, c, h, w) latents: packed in, unpacked out."""
        b, _, h, w = noisy.shape
        device = noisy.device
        extra = {}
        if self.has_guidance(unet):
            extra["guidance"] = torch.full((b,), float(guidance), device=device, dtype=torch.float32)
        hidden = cond["hidden"].to(dtype)
        out = unet(hidden_states=pack(noisy), timestep=(timesteps / 1000).to(dtype),
                   pooled_projections=cond["pooled"].to(dtype), encoder_hidden_states=hidden,
                   txt_ids=torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype),
                   img_ids=latent_ids(h, w, device, dtype), return_dict=False, **extra)[0]
        return unpack(out, h, w)

    def trace_inputs(self, configs, images, latent, dtype, device="meta") -> tuple[tuple, dict]:
        h, w = latent
        cfg = configs[self.denoiser]
        tokens = torch.empty((images, h * w // 4, cfg["in_channels"]), device=device, dtype=dtype)
        kwargs = dict(hidden_states=tokens, timestep=torch.empty(images, device=device, dtype=dtype),
                      pooled_projections=torch.empty((images, cfg["pooled_projection_dim"]), device=device,
                                                     dtype=dtype),
                      encoder_hidden_states=torch.empty((images, self.t5_max_length, cfg["joint_attention_dim"]),
                                                        device=device, dtype=dtype),
                      txt_ids=torch.empty((self.t5_max_length, 3), device=device, dtype=dtype),
                      img_ids=torch.empty((h * w // 4, 3), device=device, dtype=dtype))
        if cfg.get("guidance_embeds"):
            kwargs["guidance"] = torch.empty(images, device=device, dtype=torch.float32)
        return (), kwargs

    # --- names other tools use --------------------------------------------------------------------------------------

    def export_groups(self, part, modules, unet_config=None) -> dict[str, list[tuple[str | None, int]]]:
        """kohya name -> the fused layer's members in order, (module or None where it did not train, its width in
        attention widths): q, k and v become one `..._attn_qkv` layer (and with the MLP input one single-block
        `linear1`), as BFL's layout and the FLUX LoRAs of kohya, ComfyUI and Forge have them."""
        if part != self.denoiser:
            return {self.kohya_name(part, m): [(m, 1)] for m in modules}
        groups: dict[str, list[tuple[str | None, int]]] = {}
        missing = []
        for module in modules:
            found = bfl_name(module)
            if found is None:
                missing.append(module)
                continue
            name, member = found
            key = self.kohya_prefixes[part] + name.replace(".", "_")
            widths = FUSED.get(name.rsplit(".", 1)[-1], (1,))
            slots = groups.setdefault(key, [(None, w) for w in widths])
            slots[member] = (module, widths[member])
        if missing:
            raise ModelLoadError(f"The transformer layers {', '.join(missing[:3])} have no name in the original FLUX "
                                 "layout, so other tools could not load them: export this adapter with --format "
                                 "diffusers.")
        return groups

    def extra_unet_names(self, unet, modules: list[str]) -> dict[str, str]:
        """The BFL names of the transformer layers that have one of their own (not fused with others)."""
        out = {}
        for module in modules:
            found = bfl_name(module)
            if found and found[0].rsplit(".", 1)[-1] not in FUSED:
                out[module] = found[0]
        return out

    def split_kohya(self, groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """A kohya file's fused BFL layers (`..._img_attn_qkv`, `..._linear1`) as one module per diffusers layer:
        a LoRA's up and a LoHa's outer factors split by rows, the rest shared, which gives each layer exactly its
        rows of the fused change (members whose rows are all zero are left out). A fused LoKr or full change has
        no such split."""
        out = {}
        prefix = self.kohya_prefixes[self.denoiser]
        for name, tensors in groups.items():
            fused = self._fused_members(name[len(prefix):]) if name.startswith(prefix) else None
            if fused is None:
                out[name] = tensors
                continue
            rows = "lora_up.weight" if "lora_up.weight" in tensors else "hada_w1_a" if "hada_w1_a" in tensors else None
            if rows is None:
                raise ModelLoadError(f"The layer {name} fuses q, k and v as a LoKr or a full weight change, which "
                                     "cannot be split into the separate layers this app loads; load the diffusers "
                                     "form of that adapter instead.")
            total = tensors[rows].shape[0]
            # a DoRA's lengths are per output row too (a row's length per input column spans the fused members)
            dora = [k for k in ("dora_scale", "lora_magnitude_vector") if k in tensors]
            if any(tensors[k].numel() != total for k in dora):
                raise ModelLoadError(f"The DoRA layer {name} keeps its lengths per input column of the fused q, k "
                                     "and v, which cannot be split into the separate layers this app loads.")
            split_keys = [k for k in ("lora_up.weight", "hada_w1_a", "hada_w2_a") if k in tensors]
            unit = total // sum(w for _, w in fused)
            start = 0
            for module, width in fused:
                part = {k: tensors[k][start:start + width * unit] for k in split_keys + dora}
                start += width * unit
                if not dora and all(t.abs().max() == 0 for t in part.values()):
                    continue
                out[self.kohya_name(self.denoiser, module)] = {**tensors, **part}
        return out

    def fused_members(self, part: str, module: str) -> list[str]:
        found = bfl_name(module) if part == self.denoiser else None
        members = self._fused_members(found[0].replace(".", "_")) if found else None
        return [m for m, _ in members] if members else [module]

    @staticmethod
    def _fused_members(flat: str) -> list[tuple[str, int]] | None:
        """`double_blocks_0_img_attn_qkv` -> [(transformer module of each member, its relative width)], or None
        for a name that is not a fused BFL layer."""
        for theirs, ours, table in (("double_blocks_", "transformer_blocks.", DOUBLE_BLOCK),
                                    ("single_blocks_", "single_transformer_blocks.", SINGLE_BLOCK)):
            if flat.startswith(theirs):
                index, _, layer = flat[len(theirs):].partition("_")
                if layer in FUSED:
                    members = sorted((member, module) for module, (name, member) in table.items() if name == layer)
                    return [(f"{ours}{index}.{module}", FUSED[layer][m]) for m, module in members]
        return None

    # --- pipelines --------------------------------------------------------------------------------------------------

    def sampling_scheduler(self, base: BaseModel):
        """FLUX samples with its own flow-matching Euler scheduler (the resolution shift included)."""
        return FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config)

    def pipeline_components(self, base: BaseModel, scheduler=None, **parts) -> dict[str, Any]:
        chosen = {**base.parts, **{k: v for k, v in parts.items() if v is not None}}
        return dict(vae=base.vae, text_encoder=chosen["text_encoder"], tokenizer=base.tokenizer,
                    text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                    transformer=chosen[self.denoiser], scheduler=scheduler or base.scheduler)

    def native_size(self, pipe) -> int:
        """The transformer has no size of its own; FLUX's VAE config says 1024 (a tiny test VAE: its own small
        size)."""
        return int(pipe.vae.config.get("sample_size") or self.default_resolution)

    @staticmethod
    def latent_side(pipe, pixels: int) -> int:
        """A latent side for an image side, even (whole 2x2 patches), as FluxPipeline rounds it."""
        return 2 * (pixels // (pipe.vae_scale_factor * 2))

    def start_latents(self, pipe, generators, height: int, width: int, device) -> torch.Tensor:
        """Per-seed noise in the (c, h, w) latent shape, drawn on the CPU, packed as the pipeline wants it."""
        shape = (pipe.transformer.config.in_channels // 4, self.latent_side(pipe, height),
                 self.latent_side(pipe, width))
        return pack(torch.stack([torch.randn(shape, generator=g) for g in generators])).to(device)

    encode_apart = True

    @torch.no_grad()
    def prompt_inputs(self, base: BaseModel, prompts: Sequence[str], device) -> dict:
        """FluxPipeline's `prompt_embeds` (T5) and `pooled_prompt_embeds` (CLIP-L), as its encode_prompt makes them."""
        cond = self.encode_prompts(base, prompts, device)
        return {"prompt_embeds": cond["hidden"], "pooled_prompt_embeds": cond["pooled"]}

    def call_options(self, pipe, negative_prompt: str, n: int, guidance: float) -> dict:
        """FLUX's guidance is the distilled scale (dev; schnell ignores it); no negative prompt (FLUX.1 has no
        classifier-free guidance)."""
        return {"guidance_scale": guidance, "max_sequence_length": self.t5_length(pipe.tokenizer_2)}

    def decode(self, pipe, latents: torch.Tensor, height: int, width: int) -> list:
        vae = pipe.vae
        x = unpack(latents, self.latent_side(pipe, height), self.latent_side(pipe, width)).to(vae.dtype)
        x = x / vae.config.scaling_factor + vae.config.shift_factor
        return pipe.image_processor.postprocess(vae.decode(x).sample, output_type="pil")

    def check_sizes(self, data, vae_scale_factor: int) -> None:
        """Latents are packed in 2x2 patches: every training image side must be a multiple of twice the VAE's
        factor (16 px for FLUX.1)."""
        unit = 2 * vae_scale_factor
        key, side = ("data.bucket_step", data.bucket_step) if data.bucketing else ("data.resolution", data.resolution)
        if side % unit:
            raise ConfigError(f"`{key}` must be a multiple of {unit} px for FLUX.1 (its latents are packed in 2x2 "
                              f"patches), got {side}.")

    def check_training(self, t) -> None:
        if t.min_snr_gamma:
            raise ConfigError("`train.min_snr_gamma` is for noise-predicting models; FLUX trains by flow matching: "
                              "use `train.flow_loss_weighting` instead.")

    def parts_from_configs(self, configs: Mapping[str, dict]) -> dict[str, torch.nn.Module]:
        return {"transformer": FluxTransformer2DModel.from_config(plain_config(configs["transformer"])),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**plain_config(configs["text_encoder"]))),
                "text_encoder_2": T5EncoderModel(T5Config(**plain_config(configs["text_encoder_2"]))),
                "vae": AutoencoderKL.from_config(plain_config(configs["vae"]))}
