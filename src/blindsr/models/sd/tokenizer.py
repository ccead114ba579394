"""CLIP byte-level BPE tokenizer (OpenAI CLIP / OpenCLIP ``SimpleTokenizer`` behaviour), offline.

SD 2.x prompts are tokenised as ``[49406 (SOT)] + BPE(text) + [49407 (EOT)]``, cut to 77 ids with the last forced
to EOT, and **zero-padded**: the pad id matters (padded positions still pass through the text transformer).

The BPE needs the 48,894 merges of ``bpe_simple_vocab_16e6`` (MIT, OpenAI). No package usable here ships them as
a plain file without pulling torchvision, so the merges are read from, in this order:
1. ``vocab_path`` given by the caller: ``bpe_simple_vocab_16e6.txt.gz`` / ``.txt``, a diffusers ``tokenizer/``
   folder, or its ``merges.txt`` (same merges, HF format);
2. the ``BLINDSR_CLIP_VOCAB`` environment variable (same choices);
3. ``bpe_simple_vocab_16e6.txt.gz`` inside an installed ``open_clip`` or ``clip`` package (located, not imported);
4. the optional ``instant-clip-tokenizer`` package (MIT, numpy only), which embeds the vocabulary.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path

import torch

from blindsr.errors import BlindSRError

SOT, EOT, PAD = 49406, 49407, 0
CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges -> 49,408 tokens
VOCAB_ENV = "BLINDSR_CLIP_VOCAB"
_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable character map: printable Latin-1 bytes map to themselves, the others to
    ``chr(256 + n)``. The insertion order (printable bytes first) is the order of the first 256 vocabulary ids."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(rest)}


def clean_text(text: str) -> str:
    """ftfy fix (when installed), HTML unescape (twice), whitespace collapse, lower case."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def read_merges(path: str | Path) -> list[tuple[str, str]]:
    """The BPE merges from ``bpe_simple_vocab_16e6.txt(.gz)``, a HF ``merges.txt`` or a folder holding either."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in (path / "merges.txt", path / "bpe_simple_vocab_16e6.txt.gz") if p.is_file()]
        if not found:
            raise BlindSRError(f"no merges.txt or bpe_simple_vocab_16e6.txt.gz in {path}")
        path = found[0]
    if not path.is_file():
        raise BlindSRError(f"CLIP vocabulary file not found: {path}")
    raw = path.read_bytes()
    text = gzip.decompress(raw).decode("utf-8") if raw[:2] == b"\x1f\x8b" else raw.decode("utf-8")
    lines = text.split("\n")[1 : NUM_MERGES + 1]  # line 0 is a "#version" header
    merges = [tuple(line.split()) for line in lines if line.strip()]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise BlindSRError(f"{path} is not a CLIP BPE vocabulary ({len(merges)} merges, expected {NUM_MERGES})")
    return merges


def find_vocab() -> Path | None:
    """Step 2-3 of the lookup order in the module docstring."""
    if os.environ.get(VOCAB_ENV):
        return Path(os.environ[VOCAB_ENV])
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)  # finds the folder without importing the package
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
            if candidate.is_file():
                return candidate
    return None


class CLIPTokenizer:
    """``tokenizer(["a photo", ...]) -> (B, 77) int64`` with OpenCLIP's conventions (see module docstring)."""

    def __init__(self, merges: list[tuple[str, str]], context_length: int = CONTEXT_LENGTH):
        self.context_length = context_length
        self.byte_encoder = byte_to_unicode()
        chars = list(self.byte_encoder.values())
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(tokens)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        import regex

        self.pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        self._cache: dict[str, list[str]] = {}

    def bpe(self, word: str) -> list[str]:
        """Greedy BPE of one pre-token: repeatedly merge the adjacent pair with the lowest merge rank."""
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT."""
        ids = []
        for piece in self.pattern.findall(clean_text(text)):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(word))
        return ids

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        return pack_tokens([self.encode(t) for t in ([texts] if isinstance(texts, str) else texts)],
                           self.context_length)


def pack_tokens(ids: list[list[int]], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """SOT + ids + EOT, truncated to ``context_length`` with EOT last, zero-padded: (B, context_length) int64."""
    out = torch.full((len(ids), context_length), PAD, dtype=torch.long)
    for i, row in enumerate(ids):
        row = [SOT, *row, EOT]
        if len(row) > context_length:
            row = row[:context_length]
            row[-1] = EOT
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class _InstantTokenizer:
    """Backend on ``instant-clip-tokenizer`` (embedded vocabulary); same cleaning, packing and padding."""

    def __init__(self, context_length: int = CONTEXT_LENGTH):
        import instant_clip_tokenizer

        self.context_length = context_length
        self._tok = instant_clip_tokenizer.Tokenizer()

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tok.encode(clean_text(text))]

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        return pack_tokens([self.encode(t) for t in ([texts] if isinstance(texts, str) else texts)],
                           self.context_length)


def load_tokenizer(vocab_path: str | Path | None = None, context_length: int = CONTEXT_LENGTH):
    """A CLIP tokenizer from the first vocabulary source found (see the module docstring)."""
    path = vocab_path or find_vocab()
    if path is not None:
        return CLIPTokenizer(read_merges(path), context_length)
    if importlib.util.find_spec("instant_clip_tokenizer") is not None:
        return _InstantTokenizer(context_length)
    raise BlindSRError(
        "no CLIP BPE vocabulary found: pass a bpe_simple_vocab_16e6.txt.gz file or a diffusers tokenizer/ folder, "
        f"set {VOCAB_ENV}, or pip install instant-clip-tokenizer")
