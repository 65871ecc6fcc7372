"""Shared calibration statistics: per-input-channel activation ranges of every block linear.

One forward pass over the calibration set with forward-pre-hooks on every decoder-block linear
(:func:`qbench.modules.target_linears`, quantized replacements included) records, per layer:

* ``absmax``  ``[in_features]`` float32 — max |x_j| over all calibration tokens (SmoothQuant's
  ``act_scales``, LLM.int8()'s outlier features, QRazor's ranges);
* ``mean_abs`` ``[in_features]`` float32 — mean |x_j| (AWQ-style activation salience);
* ``mean_sq``  ``[in_features]`` float32 — mean x_j² (diagonal of the Hessian 2XXᵀ / tokens);
* ``count``    ``[]`` int64 — number of tokens seen by the layer.

The Snakemake ``calib_stats`` rule stores them in
``results/{model}/calib/{corpus}-{n}x{seqlen}-s{seed}/stats.safetensors`` (keys flattened to
``"<layer>|<stat>"``) with a JSON sidecar ``stats.json`` (calibration hash, n, seqlen, seed, the
sha256 of the tensors file and a fingerprint of the model the statistics were taken on). Methods
read them through :func:`get_act_stats`, which re-computes them when the model has been changed by
an earlier recipe stage (activation ranges of a smoothed / quantized model differ from the fp
model's).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..fsutil import canonical_safetensors_header
from ..errors import ConfigError, QbenchError, check_finite
from .spec import CalibSet
from ..modules import target_linears

__all__ = [
    "ActStats", "STATS", "collect_act_stats", "save_stats", "load_stats", "load_stats_meta", "stats_meta",
    "calib_hash", "model_fingerprint", "get_act_stats", "StatsError",
]

STATS = ("absmax", "mean_abs", "mean_sq", "count")
SEP = "|"
FORMAT = "qbench-act-stats"
FORMAT_VERSION = 1


class StatsError(QbenchError, RuntimeError):
    """A statistics file that is incomplete, corrupted or of an unknown format."""


class ActStats(dict):
    """``{layer: {stat: Tensor}}`` plus ``.meta`` (the sidecar: calibration hash, n, seqlen, seed,
    the fingerprint of the model the statistics were taken on)."""

    def __init__(self, *args, meta: dict | None = None, **kw):
        super().__init__(*args, **kw)
        self.meta = dict(meta or {})


# ----------------------------------------------------------------------------- identity
def calib_hash(calib_ids: torch.Tensor) -> str:
    """sha256 of the calibration token matrix (shape + int64 values)."""
    ids = calib_ids.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256()
    h.update(str(tuple(ids.shape)).encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """A cheap, device-independent-enough fingerprint of the model's tensors.

    For every floating tensor of the state dict: name, shape, sum, sum of squares and a
    position-weighted sum (all in float64, rounded to 7 significant digits), hashed together.
    Any edit a quantization stage makes (smoothing, rounding, LKD updates) changes it; identical
    models give identical fingerprints. A spurious mismatch (e.g. different reduction order on
    another device) only causes a re-computation, never wrong statistics.
    """
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        if not t.is_floating_point() and t.dtype not in (torch.int8, torch.uint8, torch.int32):
            continue
        key = (t.data_ptr(), t.numel())
        if t.numel() and key in seen:  # tied weights: count once
            continue
        seen.add(key)
        x = t.double().reshape(-1)
        ramp = torch.linspace(-1.0, 1.0, x.numel(), dtype=torch.float64, device=x.device) if x.numel() > 1 \
            else torch.ones_like(x)
        vals = (x.sum().item(), (x * x).sum().item(), (x * ramp).sum().item())
        h.update(f"{name}:{tuple(t.shape)}:".encode())
        h.update(",".join(f"{v:.7g}" for v in vals).encode())
    return h.hexdigest()


def stats_meta(calib_ids: torch.Tensor | None = None, *, seed: int | None = None,
               corpus: str | None = None, model: nn.Module | None = None, **extra) -> dict:
    """The JSON sidecar content for a statistics file."""
    meta: dict = {"format": FORMAT, "format_version": FORMAT_VERSION}
    if calib_ids is not None:
        meta.update(calib_hash=calib_hash(calib_ids), n=int(calib_ids.shape[0]),
                    seqlen=int(calib_ids.shape[1]))
    if seed is not None:
        meta["seed"] = int(seed)
    if corpus is not None:
        meta["corpus"] = corpus
    if model is not None:
        meta["model_fingerprint"] = model_fingerprint(model)
    meta.update(extra)
    return meta


# ----------------------------------------------------------------------------- collection
def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers())
    return p.device


@torch.no_grad()
def collect_act_stats(model: nn.Module, calib_ids: torch.Tensor, *, device: str | torch.device = "cpu",
                      progress: bool = True, batch_size: int = 1, skip: list | tuple = ()
                      ) -> ActStats:
    """Per-input-channel activation statistics of every decoder-block linear.

    ``calib_ids``: LongTensor ``[n, seqlen]``. The model runs on ``device`` (moved there for the
    pass and back afterwards if it lives elsewhere), ``use_cache=False``, in batches of
    ``batch_size`` sequences. Sums are accumulated in float64 so the means do not depend on the
    batch size beyond float rounding; the returned tensors are float32 on the CPU. ``.meta`` of
    the result holds :func:`stats_meta` (calibration hash, n, seqlen, model fingerprint).
    """
    if calib_ids.dim() != 2:
        raise ValueError(f"calib_ids must be [n, seqlen], got shape {tuple(calib_ids.shape)}")
    layers = target_linears(model, skip, include_quantized=True)
    if not layers:
        raise ValueError("no decoder-block linear layers found (is this a llama-like causal LM?)")
    meta = stats_meta(calib_ids, model=model, batch_size=int(batch_size))
    device = torch.device(device)
    home = _model_device(model)
    moved = home != device
    if moved:
        model.to(device)
    acc: dict[str, dict] = {}

    def make_hook(name: str):
        def hook(mod, args, kwargs=None):
            x = args[0] if args else kwargs["input"]
            x = x.detach().reshape(-1, x.shape[-1]).float()
            a = x.abs()
            st = acc.get(name)
            amax = a.amax(dim=0)
            sabs = a.sum(dim=0, dtype=torch.float64)
            ssq = (x * x).sum(dim=0, dtype=torch.float64)
            if st is None:
                acc[name] = {"absmax": amax, "sum_abs": sabs, "sum_sq": ssq, "count": x.shape[0]}
            else:
                torch.maximum(st["absmax"], amax, out=st["absmax"])
                st["sum_abs"] += sabs
                st["sum_sq"] += ssq
                st["count"] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        n = calib_ids.shape[0]
        for i in tqdm(range(0, n, batch_size), desc="calib stats", disable=not progress, leave=False):
            batch = calib_ids[i:i + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if moved:
            model.to(home)
    out = ActStats(meta=meta)
    for name in layers:
        st = acc.get(name)
        if st is None:  # layer never ran (e.g. skipped by the architecture): leave it out
            continue
        c = st["count"]
        check_finite(st["sum_sq"], f"calibration activations at the input of {name}")
        out[name] = {
            "absmax": st["absmax"].float().cpu(),
            "mean_abs": (st["sum_abs"] / c).float().cpu(),
            "mean_sq": (st["sum_sq"] / c).float().cpu(),
            "count": torch.tensor(c, dtype=torch.int64),
        }
    return out


# ----------------------------------------------------------------------------- storage
def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_stats(stats: dict[str, dict[str, torch.Tensor]], path: str | Path, meta: dict | None = None
               ) -> dict:
    """Write ``stats`` to ``path`` (safetensors, keys ``"layer|stat"``) and the JSON sidecar
    ``path.with_suffix('.json')`` (``stats.meta`` if any, updated with ``meta``, + the tensors'
    sha256 + layer count).

    Both files are written to temporary names and renamed; the sidecar goes last, so a statistics
    file without a matching sidecar is never read as valid (:func:`load_stats` checks the hash).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {}
    for layer, d in stats.items():
        if SEP in layer:
            raise ValueError(f"layer name {layer!r} contains {SEP!r}")
        for k, t in d.items():
            flat[f"{layer}{SEP}{k}"] = t.detach().cpu().contiguous()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata={"format": FORMAT, "producer": "qbench"})
        canonical_safetensors_header(tmp)  # a stable sha256 for the same statistics
        digest = _sha256(Path(tmp))
        side = {**getattr(stats, "meta", {}), **(meta or {}), "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "layers": len(stats), "stats": list(STATS), "sha256": digest}
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.json.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(side, f, indent=2, sort_keys=True)
    os.replace(tmp, _sidecar(path))
    return side


def load_stats_meta(path: str | Path) -> dict:
    path = Path(path)
    side = _sidecar(path)
    if not side.exists():
        raise StatsError(f"{path}: no sidecar {side.name}; the statistics are incomplete, re-run "
                         "the calib_stats step")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise StatsError(f"{side}: corrupted sidecar ({e})") from e
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise StatsError(f"{side}: unknown format {meta.get('format')!r} v{meta.get('format_version')!r}")
    return meta


def load_stats(path: str | Path, verify: bool = True) -> ActStats:
    """Read statistics written by :func:`save_stats` (checks the sidecar's sha256); the sidecar
    is the result's ``.meta``."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = load_stats_meta(path)
    if not path.exists():
        raise StatsError(f"{path}: missing; re-run the calib_stats step")
    if verify and _sha256(path) != meta.get("sha256"):
        raise StatsError(f"{path}: does not match the sha256 in {_sidecar(path).name}; delete it and "
                         "re-run the calib_stats step")
    out = ActStats(meta=meta)
    for key, t in load_file(str(path)).items():
        layer, _, stat = key.rpartition(SEP)
        out.setdefault(layer, {})[stat] = t
    return out


# ----------------------------------------------------------------------------- for methods
def get_act_stats(model: nn.Module, ctx, cfg, *, log=None) -> ActStats:
    """Activation statistics for ``model`` *as it is now*, on the calibration set ``cfg`` (a
    :class:`CalibSet`, or a method config with ``calib_set()``).

    Uses the shared statistics ``ctx.calib_stats(*cfg.calib_set())`` (a dict as returned by
    :func:`load_stats`, or a path to a statistics file) when they were taken on this very model —
    their ``.meta["model_fingerprint"]`` matches :func:`model_fingerprint` — and cover every
    layer. Otherwise (no provider; the model was changed by an earlier recipe stage, e.g.
    SmoothQuant after another transform; layers missing) they are collected from
    ``ctx.calibration(...)`` on the current model. Statistics without a fingerprint are trusted.
    """
    log = log or getattr(ctx, "log", None) or (lambda s: None)
    spec = cfg if isinstance(cfg, CalibSet) else cfg.calib_set()
    want = set(target_linears(model, include_quantized=True))
    provider = getattr(ctx, "calib_stats", None)
    if provider is not None:
        got = provider(spec.corpus, spec.n, spec.seqlen, spec.seed)
        if isinstance(got, (str, Path)):
            got = load_stats(got)
        meta = dict(getattr(got, "meta", None) or {})
        fp = meta.get("model_fingerprint")
        if fp is not None and fp != model_fingerprint(model):
            log("calib stats: the model was changed by an earlier stage; re-collecting activation "
                "statistics on the current model")
        elif not want <= set(got):
            log("calib stats: the shared statistics lack some layers; re-collecting")
        else:
            return got if isinstance(got, ActStats) else ActStats(got, meta=meta)
    if getattr(ctx, "calibration", None) is None:
        raise ConfigError("activation statistics need calibration data: the context has neither "
                          "calib_stats nor calibration")
    ids = ctx.calib_tokens(spec, "activation statistics")
    stats = collect_act_stats(model, ids, device=getattr(ctx, "device", "cpu"),
                              progress=getattr(ctx, "progress", True))
    stats.meta.update(seed=int(spec.seed), corpus=spec.corpus)
    return stats
