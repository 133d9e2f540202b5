"""Building blocks of the FLUX family that are not its operations: the tiny T5 tokenizer of the test model."""
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
