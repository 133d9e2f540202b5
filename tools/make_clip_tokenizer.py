"""Build the CLIP tokenizer files (vocab.json, merges.txt) shipped in core/assets/clip_tokenizer.

The source is OpenAI's MIT-licensed CLIP BPE table `bpe_simple_vocab_16e6.txt.gz`, which ships inside
the `open-clip-torch` wheel on PyPI. Reproduce with:

    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python tools/make_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

The result gives the same token ids as the tokenizer of every Stable Diffusion 1.x model (49,408 tokens).
"""
import gzip
import json
import sys
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # the table holds more merges than CLIP uses


def byte_alphabet() -> list[str]:
    """The 256 characters that stand for byte values, in CLIP's token order (GPT-2 convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # CLIP orders its first 256 tokens as: printable bytes, then the others mapped above U+0100.
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def main(src: str, dest: str = "core/assets/clip_tokenizer") -> None:
    lines = gzip.open(src, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 1 + N_MERGES]
    chars = byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"{len(tokens)} tokens, {len(merges)} merges -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
