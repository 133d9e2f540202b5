"""Building blocks of the FLUX family that are not its operations: the BFL layout's layer names (kohya, ComfyUI,
Forge and the BFL files use them) and the tiny T5 tokenizer of the test model."""
from __future__ import annotations

import json
from functools import lru_cache

from ..base_model import CLIP_TOKENIZER_DIR


@lru_cache(maxsize=1)
def _t5_pieces(words: int = 3000) -> tuple[tuple[str, float], ...]:
    """A small sentencepiece-style vocabulary made in code: T5's special tokens (pad 0, </s> 1, <unk> 2), the
    `words` most common whole words of the shipped CLIP vocabulary as "▁word" pieces, and single letters and
    digits, so that every word splits into known pieces (rare words into letters)."""
    vocab = json.loads((CLIP_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    common = [t[:-4] for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])
              if t.endswith("</w>") and t[:-4].isalpha() and t[:-4].isascii() and len(t) > 5][:words]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0 - i / len(common)) for i, w in enumerate(common)]
    pieces += [(c, -10.0) for c in chars] + [("▁" + c, -9.0) for c in chars] + [("▁", -8.0)]
    return tuple(dict.fromkeys(pieces))


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer (transformers' T5Tokenizer over a Unigram model) with a small vocabulary built in code, for
    the tiny FLUX test model (real FLUX folders bring their own T5 tokenizer, 32,100 pieces)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_t5_pieces()), extra_ids=0, model_max_length=model_max_length)


# The transformer's modules under the original (BFL) layout's names, which kohya, ComfyUI and Forge use for FLUX
# LoRAs (`lora_unet_double_blocks_0_img_attn_qkv`): block module -> (BFL layer, its place among the layer's
# members). A BFL layer may fuse several diffusers layers along its outputs (q, k and v; the single block's q, k, v
# and MLP input): FUSED gives each fused layer's members' output widths, in order, in units of the attention width
# (the MLP is 4 times as wide).
DOUBLE_BLOCK = {
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", 0), "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1), "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_add_out": ("txt_attn_proj", 0), "ff.net.0.proj": ("img_mlp_0", 0), "ff.net.2": ("img_mlp_2", 0),
    "ff_context.net.0.proj": ("txt_mlp_0", 0), "ff_context.net.2": ("txt_mlp_2", 0),
    "norm1.linear": ("img_mod_lin", 0), "norm1_context.linear": ("txt_mod_lin", 0),
}
SINGLE_BLOCK = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", 0), "norm.linear": ("modulation_lin", 0),
}
FUSED = {"img_attn_qkv": (1, 1, 1), "txt_attn_qkv": (1, 1, 1), "linear1": (1, 1, 1, 4)}


def bfl_name(module: str) -> tuple[str, int] | None:
    """(BFL module name, index among the fused layer's members) of a transformer module, or None (no BFL name)."""
    for prefix, table, theirs in (("transformer_blocks.", DOUBLE_BLOCK, "double_blocks"),
                                  ("single_transformer_blocks.", SINGLE_BLOCK, "single_blocks")):
        if module.startswith(prefix):
            index, _, rest = module[len(prefix):].partition(".")
            if rest in table:
                name, member = table[rest]
                return f"{theirs}.{index}.{name}", member
    return None
