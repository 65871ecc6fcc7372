"""Reading a built corpus directory: its metadata, the token ids of a split, and calibration
samples (``n`` windows of ``seqlen`` tokens drawn with a seed) with their hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError

SPLITS = ("calib", "test")

__all__ = ["read_corpus_meta", "load_tokens", "sample_calibration", "calibration_hash", "SPLITS"]


def read_corpus_meta(corpus_dir: str | Path) -> dict:
    p = Path(corpus_dir) / "corpus.json"
    if not p.is_file():
        raise FileNotFoundError(f"{corpus_dir} is not a built corpus (no corpus.json)")
    return json.loads(p.read_text(encoding="utf-8"))


def load_tokens(corpus_dir: str | Path, split: str):
    """The token ids of a split as a 1-D ``torch.LongTensor``."""
    import torch

    if split not in SPLITS:
        raise ConfigError(f"split={split!r}; allowed values: {', '.join(SPLITS)}")
    p = Path(corpus_dir) / f"{split}.npy"
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (build the corpus first)")
    return torch.from_numpy(np.load(p).astype(np.int64))


def sample_calibration(corpus_dir: str | Path, n: int, seqlen: int, seed: int):
    """``n`` random windows of ``seqlen`` calibration tokens, ``LongTensor [n, seqlen]``.

    GPTQ's sampler: uniformly random start offsets in ``[0, len - seqlen - 1]`` drawn from a
    ``torch.Generator`` seeded with ``seed`` (deterministic; windows may overlap)."""
    import torch

    if n < 1 or seqlen < 1:
        raise ConfigError(f"n={n} and seqlen={seqlen} must be positive")
    tokens = load_tokens(corpus_dir, "calib")
    if tokens.numel() < seqlen + 1:
        raise ConfigError(f"calibration split of {corpus_dir} has {tokens.numel()} tokens, fewer than "
                         f"seqlen + 1 = {seqlen + 1}; use a shorter seqlen or a larger corpus")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, tokens.numel() - seqlen, (n,), generator=g)
    idx = starts[:, None] + torch.arange(seqlen)[None, :]
    return tokens[idx]


def calibration_hash(corpus_dir: str | Path, n: int, seqlen: int, seed: int) -> str:
    """16-hex id of a calibration sample: sha256 over the calib tokens' hash, n, seqlen, seed."""
    meta = read_corpus_meta(corpus_dir)
    key = f"{meta['files']['calib.npy']}:{int(n)}:{int(seqlen)}:{int(seed)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]
