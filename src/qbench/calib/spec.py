"""Calibration identity: one typed value, built in one place.

A calibration set is named by its corpus, the number of sequences, their length and the sampling
seed. :class:`CalibSet` is that name; its :attr:`CalibSet.key` (``wiki-128x2048-s0``) is the one
string form (directory names under ``results/{model}/calib/``, the keys of a checkpoint's
``inputs.calibration`` hashes), and :data:`KEY_PATTERN` is the same form as a Snakemake wildcard
pattern. Nothing else formats or parses it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

__all__ = ["CalibSet", "KEY_PATTERN"]

#: the key as a Snakemake wildcard pattern (the ``calib_stats`` rule's output directory)
KEY_PATTERN = "{corpus}-{n}x{seqlen}-s{seed}"
_KEY_RE = re.compile(r"(?P<corpus>.+)-(?P<n>\d+)x(?P<seqlen>\d+)-s(?P<seed>\d+)")


@dataclass(frozen=True, order=True)
class CalibSet:
    corpus: str
    n: int
    seqlen: int
    seed: int

    @property
    def key(self) -> str:
        return KEY_PATTERN.format(**asdict(self))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wildcards(cls, w) -> "CalibSet":
        """From the ``corpus``, ``n``, ``seqlen``, ``seed`` wildcards of :data:`KEY_PATTERN`."""
        return cls(str(w.corpus), int(w.n), int(w.seqlen), int(w.seed))

    @classmethod
    def from_key(cls, key: str) -> "CalibSet":
        m = _KEY_RE.fullmatch(key)
        if m is None:
            raise ValueError(f"{key!r} is not a calibration key like 'wiki-128x2048-s0'")
        return cls(m["corpus"], int(m["n"]), int(m["seqlen"]), int(m["seed"]))
