"""What a quantization method produces, as data: the one description the report, the memory
accounting and the manifest read (never method names).

Every registered method implements ``describe(cfg) -> Descriptor`` for one stage; a recipe's
description combines its stages (:func:`describe_stages`). The checkpoint manifest stores it
(``qbench.json`` → ``descriptor``) and every record carries it, so tables are built from what the
methods declared: family, weight / activation / KV bits, weight group, grid and storage format.

Bit widths are normalised here whatever a method calls its arguments (``w_bits``, ``bits``,
``kv_bits``, ``w_bits_mlp``/``w_bits_attn``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError

__all__ = ["Descriptor", "FAMILIES", "BASELINE", "describe_stages", "group_label"]

#: method families, in increasing precedence: a recipe belongs to the highest family of its stages
FAMILIES = ("weight-only", "weight-activation", "KV cache")
BASELINE = "baseline"
#: the report's headline columns, in table order (``columns`` of descriptors follow ``KV``)
HEADLINE = ("W", "A", "KV")


@dataclass(frozen=True)
class Descriptor:
    """What one stage produces.

    * ``family``: the family this stage puts a recipe in (one of :data:`FAMILIES`; ``None``: the
      stage alone does not decide, e.g. a pure transform);
    * ``w_bits``: stored bits per weight code (``None``: weights not quantized by this stage); a
      string for per-module widths (``"4/8"``: MLP/attention, as the seed writes W4/8);
    * ``a_bits``: activation bits (``None`` or 16: activations untouched);
    * ``kv_bits``: KV-cache bits (K bits when K and V differ; ``None``: no KV quantization);
    * ``group``: inputs per weight group (-1 per output channel, 0 per tensor, ``None``: no weights);
    * ``grid``: the value grid (``uniform-asym``, ``uniform-sym``, ``binary-coding``, ``sdr``,
      ``codebook``, ...), ``storage``: the stored format (module or cache class and layout);
    * ``columns``: extra report columns this stage fills (``{"QS": "Q8S8"}``), shown after ``KV``;
    * ``knobs``: numbers other report sections group by (``{"alpha": 0.5}``: a migration-strength
      sweep), not shown as columns;
    * ``rescales_weights``: the stage folds a per-channel rescaling into the weights (SmoothQuant,
      AWQ), so weight statistics compare against the best diagonal rescaling of the fp weights.
    """

    family: str | None = None
    w_bits: int | str | None = None
    a_bits: int | None = None
    kv_bits: int | None = None
    group: int | None = None
    grid: str | None = None
    storage: str | None = None
    columns: dict = field(default_factory=dict)
    knobs: dict = field(default_factory=dict)
    rescales_weights: bool = False

    def __post_init__(self):
        if self.family is not None and self.family not in FAMILIES:
            raise ConfigError(f"Descriptor.family={self.family!r}: allowed values are {', '.join(FAMILIES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Descriptor":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def group_label(group: int | None):
    """``-1`` → ``channel``, ``0`` → ``tensor``, else the size."""
    return "channel" if group == -1 else ("tensor" if group == 0 else group)


def _quantizes_weights(w_bits) -> bool:
    return w_bits is not None and (not isinstance(w_bits, int) or w_bits < 16)


def describe_stages(stages: list[tuple[str, Descriptor]]) -> dict:
    """A recipe's row labels from its stages' descriptors ``[(method name, Descriptor), ...]``.

    Later stages override earlier ones (``gptq → qrazor`` shows QRazor's weights); ``family`` is
    the highest of the stages' families, raised to ``weight-activation`` by quantized activations
    and to ``KV cache`` by a quantized cache."""
    if not stages:
        return {"method": "fp (baseline)", "W": 16, "A": 16, "group": "-", "family": BASELINE}
    out: dict = {"W": 16, "A": 16, "group": "-"}
    rank = -1
    for _, d in stages:
        if _quantizes_weights(d.w_bits):
            out["W"] = d.w_bits
            out["group"] = group_label(-1 if d.group is None else d.group)
        out.update(d.columns)
        if d.a_bits is not None and d.a_bits < 16:
            out["A"] = d.a_bits
        out.update(d.knobs)
        if d.kv_bits is not None:
            out["KV"] = d.kv_bits
        if d.family is not None:
            rank = max(rank, FAMILIES.index(d.family))
    if out["A"] < 16:
        rank = max(rank, FAMILIES.index("weight-activation"))
    if "KV" in out:
        rank = max(rank, FAMILIES.index("KV cache"))
    out["method"] = " → ".join(name for name, _ in stages)
    out["family"] = FAMILIES[max(rank, 0)]
    return out
