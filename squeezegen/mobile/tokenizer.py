"""A small CLIP-style BPE tokenizer built offline (no hub): byte symbols plus whole-word merges.

Real SD tokenizers (49408 tokens) cannot be downloaded here; this one has the same format
(vocab.json + merges.txt, `<|startoftext|>` / `<|endoftext|>`, `</w>` word ends), so a local SD
folder with its own tokenizer works the same way through `CLIPTokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WORDS = [
    "a", "an", "the", "of", "photo", "handwritten", "digit", "number", "picture", "drawing", "cat", "dog",
    "astronaut", "riding", "horse", "on", "mars", "painting", "in", "style", "with", "and",
    *DIGIT_NAMES,
]  # fmt: skip


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = 0
    out = {}
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def write_tokenizer(folder: str | Path, max_length: int = 77, words: list[str] | None = None) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs that `CLIPTokenizer` reads into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    merges: list[str] = []
    for word in words or WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = f"{left} {right}"
            left = left + right
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(left, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2)
    )
    return folder


def vocab_size(folder: str | Path) -> int:
    return len(json.loads((Path(folder) / "vocab.json").read_text()))
