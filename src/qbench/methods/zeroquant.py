"""ZeroQuant (Yao et al., 2022): group-wise weights, token-wise dynamic activations and
layer-by-layer knowledge distillation (LKD).

* Grid (issue 16): weights and activations on the symmetric integer grid ±(2^(b-1)-1)·absmax/
  (2^(b-1)-1) (``sym_grid = restricted``, :mod:`qbench.quant.uniform`), as the issue asks for
  ZeroQuant; DeepSpeed's ``SymQuantizer`` (the seed's backend) instead uses the step
  2·absmax/2^b clamped to [-2^(b-1), 2^(b-1)-1] — a deviation from the seed's code, stated here.
* Weights: symmetric, per output row and group of ``group_size`` inputs (-1: per row, the seed's
  "number_of_groups = rows" setting), bits chosen per module kind — ``w_bits_attn`` for
  ``self_attn.*`` and ``w_bits_mlp`` for ``mlp.*`` (the seed's W4/8: ``w_bits_mlp: 4,
  w_bits_attn: 8``). Scales are fp16; the stored layer is a :class:`QuantLinear`.
* Activations: token-wise dynamic symmetric quantization of every quantized layer's input
  (``a_bits``; 16 = weight-only, the seed's "A16").
* LKD (``lkd: true``): decoder blocks are processed in order with
  :func:`qbench.calib.blockwise.run_blockwise`. For a distilled block, its inputs are the outputs
  of the already-quantized blocks before it; the fp block's outputs on those same inputs are the
  teacher targets. The block's linears are replaced by straight-through-estimator fake-quant
  layers over fp32 master weights (weights *and* activations fake-quantized, exactly the
  arithmetic of the final layers) and trained with Adam on ``MSE(student(x), teacher(x))``
  over random minibatches of ``lkd_batch_size`` calibration sequences for ``lkd_steps`` steps
  (gradient norm clipped to 1.0, as in the seed's DeepSpeed config); then the trained weights are
  quantized into :class:`QuantLinear`. The block's RMSNorm gains are trained too
  (``lkd_train_norms``; the reference trains all of the layer's parameters).
  Group scales (``lkd_scales``): ``dynamic`` — recomputed from the current weights at every step
  (DeepSpeed's quantize-weight-in-forward, pure STE); ``fixed`` — the initial absmax scales;
  ``learned`` — trainable (LSQ-style gradients through the rounding). In every mode the final
  layer uses exactly the scales the last training step used, rounded to fp16 (the training
  forward already sees fp16-rounded scales).

Differences from the seed (DeepSpeed ``init_compression`` + ``get_zeroquant.py``): the seed feeds
each student layer the *teacher's* hidden states; here the student block sees the quantized
model's own activations (the GPTQ protocol; the teacher runs on the same inputs), which corrects
the error accumulated by the earlier blocks too. Defaults follow the seed's reported LKD setting
(last layer only, lr 5e-6, batch 4, 400 steps): the seed found one learning rate for all layers
does not work because loss magnitudes differ across layers. MSE before/after LKD is recorded per
distilled block.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..calib.blockwise import BlockInputs, run_blockwise
from ..modules import set_module, target_linears
from ..modules.qlinear import ActQuantLinear
from ..quant.uniform import (WeightQuantSpec, compute_qparams, fake_quantize_activation, quantize_weight,
                             sym_grid_label)
from .base import CalibArgs, ConfigError, Descriptor, Method, QuantContext, calib_field, opt, register
from .common import A_BITS, W_BITS, divisor_hint, fp16_qparams, make_quant_linear

__all__ = ["ZeroQuant", "FakeQuantLinear", "parse_lkd_layers", "module_bits"]

FP16_TINY = 2.0 ** -24


def module_bits(name: str, cfg) -> int:
    """Weight bits of a layer: ``w_bits_attn`` for attention projections, ``w_bits_mlp`` else."""
    return cfg.w_bits_attn if re.search(r"(^|\.)(self_attn|attn|attention)\.", name) else cfg.w_bits_mlp


def parse_lkd_layers(spec, n_layers: int, key: str = "lkd_layers") -> list[int]:
    """``"all"`` | ``"none"`` | ``"last:k"`` | ``"first:k"`` | list of ints (negative = from the end)."""
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return list(range(n_layers))
        if s == "none":
            return []
        m = re.fullmatch(r"(last|first):(\d+)", s)
        if m:
            k = min(int(m.group(2)), n_layers)
            return list(range(n_layers - k, n_layers)) if m.group(1) == "last" else list(range(k))
        raise ConfigError(f"{key}={spec!r}: allowed values are 'all', 'none', 'last:K', 'first:K' "
                          "or a list of layer indices")
    out = []
    for v in spec:
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{key}={spec!r}: list entries must be integers")
        i = v + n_layers if v < 0 else v
        if not 0 <= i < n_layers:
            raise ConfigError(f"{key}={spec!r}: index {v} out of range for {n_layers} layers "
                              f"(use 0..{n_layers - 1} or negative indices)")
        out.append(i)
    return sorted(set(out))


# ----------------------------------------------------------------------------- fake-quant (LKD)
def _ste(x: torch.Tensor, fq: torch.Tensor) -> torch.Tensor:
    """Forward ``fq``, backward identity to ``x``."""
    return x + (fq - x).detach()


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class FakeQuantLinear(nn.Module):
    """A trainable linear whose forward is the quantized layer's arithmetic (STE backward).

    Master weights in fp32; symmetric group-wise weights with fp16-rounded scales (mode
    ``dynamic`` / ``fixed`` / ``learned``, see the module docstring); token-wise dynamic symmetric
    activations with ``a_bits < 16`` (STE)."""

    def __init__(self, lin: nn.Linear, bits: int, group_size: int, a_bits: int, scale_mode: str):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.bits, self.a_bits, self.scale_mode = bits, a_bits, scale_mode
        self.spec = WeightQuantSpec(bits, True, group_size, sym_grid="restricted")  # ±(2^(b-1)-1)
        self.weight = nn.Parameter(lin.weight.detach().float().clone())
        self.bias = nn.Parameter(lin.bias.detach().float().clone()) if lin.bias is not None else None
        if bits < 16:
            scale, _ = fp16_qparams(self.weight.detach(), self.spec)
            if scale_mode == "learned":
                self.scale = nn.Parameter(scale.clone())
            else:
                self.register_buffer("scale", scale.clone())

    def _groups(self) -> int:
        return self.spec.groups(self.in_features)

    def current_scale(self) -> torch.Tensor:
        """fp16-representable scales ``[out, G]`` used by this forward (and by the final layer)."""
        if self.scale_mode == "dynamic":
            s, _ = fp16_qparams(self.weight.detach(), self.spec)
            return s
        s = self.scale
        if self.scale_mode == "learned":
            s = s.abs().clamp_min(FP16_TINY)
            return s + (s.half().float() - s).detach()
        return s

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight
        if self.bits >= 16:
            return w
        maxq = 2 ** self.bits - 1
        zero = 2 ** (self.bits - 1)
        g = self._groups()
        wg = w.reshape(self.out_features, g, -1)
        s = self.current_scale().unsqueeze(-1)
        if self.scale_mode == "learned":  # LSQ: gradients to w (inside the range) and to s
            q = torch.clamp(_round_ste(wg / s) + zero, 0, maxq)
            return ((q - zero) * s).reshape_as(w)
        q = torch.clamp(torch.round(wg.detach() / s) + zero, 0, maxq)
        return _ste(w, ((q - zero) * s).reshape_as(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.float()
        if self.a_bits < 16:
            x = _ste(x, fake_quantize_activation(x.detach(), self.a_bits, "per_token", True))
        return F.linear(x, self.quantized_weight(), self.bias).to(dt)

    @torch.no_grad()
    def codes_and_scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = self.current_scale().detach().float()
        codes, scale, zero = quantize_weight(self.weight.detach(), self.spec, scale,
                                             torch.full_like(scale, 2 ** (self.bits - 1)))
        return codes, scale, zero


# ----------------------------------------------------------------------------- the method
def _block_out(y):
    return y[0] if isinstance(y, (tuple, list)) else y


@register
class ZeroQuant(Method):
    name = "zeroquant"
    kind = "weight_act"

    @dataclass
    class Config(CalibArgs):
        w_bits_attn: int = opt(8, "weight bits of attention projections (q/k/v/o)", choices=W_BITS)
        w_bits_mlp: int = opt(8, "weight bits of MLP projections (gate/up/down); seed W4/8: 4", choices=W_BITS)
        group_size: int = opt(-1, "-1 per output row, >0 inputs per group (symmetric)", range=(-1, 1 << 20))
        a_bits: int = opt(8, "token-wise dynamic activation bits (16 = weight-only)", choices=A_BITS)
        lkd: bool = opt(False, "layer-by-layer knowledge distillation after quantization")
        lkd_layers: str | list = opt("last:1", "blocks to distil: 'all', 'last:K', 'first:K' or a list "
                                               "of indices (seed: only the last layer works reliably)")
        lkd_lr: float = opt(5e-6, "Adam learning rate (seed: 5e-6 for W4/8, 1e-6 for W4A4)", range=(0.0, 1.0))
        lkd_steps: int = opt(400, "optimizer steps per distilled block", range=(0, 1 << 20))
        lkd_batch_size: int = opt(4, "calibration sequences per step", range=(1, 4096))
        lkd_scales: str = opt("dynamic", "group scales during LKD: recomputed each step (DeepSpeed), "
                                         "fixed at their initial values, or learned",
                              choices=("dynamic", "fixed", "learned"))
        lkd_train_norms: bool = opt(True, "also train the block's norm gains (the reference trains "
                                          "every parameter of the layer)")
        calib: str = calib_field("calib", doc="calibration corpus (used by LKD only)")
        nsamples: int = calib_field("nsamples", doc="calibration sequences (LKD)")
        seqlen: int = calib_field("seqlen", 512, doc="tokens per calibration sequence (LKD)")
        seed: int = calib_field("seed", doc="calibration sampling and minibatch-order seed")
        skip: list = field(default_factory=list, metadata={"doc": "regexes of layer names to leave in 16 bits"})

        def validate(self, key: str) -> None:
            if self.group_size == 0 or self.group_size < -1:
                raise ConfigError(f"{key}.group_size={self.group_size}: use -1 (per row) or a positive size")
            if isinstance(self.lkd_layers, str):
                parse_lkd_layers(self.lkd_layers, 1, f"{key}.lkd_layers")  # syntax only
            elif not all(isinstance(v, int) and not isinstance(v, bool) for v in self.lkd_layers):
                raise ConfigError(f"{key}.lkd_layers={self.lkd_layers!r}: list entries must be integers")

    def calib_requests(self, cfg: Config) -> list:
        return super().calib_requests(cfg) if cfg.lkd else []

    def describe(self, cfg: Config) -> Descriptor:
        # per-module weight bits: "MLP/attention" like the seed's W4/8
        mlp, attn = cfg.w_bits_mlp, cfg.w_bits_attn
        return Descriptor(family="weight-activation", w_bits=mlp if mlp == attn else f"{mlp}/{attn}",
                          a_bits=cfg.a_bits, group=cfg.group_size, grid=sym_grid_label(True, "restricted"),
                          storage="QuantLinear")

    def check(self, model: nn.Module, cfg: Config, key: str) -> None:
        from ..models.adapters import get_layers

        layers = target_linears(model, cfg.skip)
        if not layers:
            raise ConfigError(f"{key}: no unquantized decoder-block linear layers (skip={cfg.skip!r})")
        if cfg.group_size > 0:
            for name, lin in layers.items():
                if module_bits(name, cfg) < 16 and lin.in_features % cfg.group_size:
                    raise ConfigError(
                        f"{key}.group_size={cfg.group_size} does not divide layer {name} "
                        f"(in_features={lin.in_features}); sizes that work: -1 (per row), "
                        f"{divisor_hint(lin.in_features)}")
        if cfg.lkd:
            parse_lkd_layers(cfg.lkd_layers, len(get_layers(model)), f"{key}.lkd_layers")

    # ------------------------------------------------------------------ quantization
    def _act(self, cfg: Config) -> dict:
        return {"a_bits": cfg.a_bits, "a_granularity": "per_token", "a_sym": True, "a_sym_grid": "restricted"}

    def _quantize_dense(self, model: nn.Module, name: str, lin: nn.Linear, cfg: Config) -> bool:
        bits = module_bits(name, cfg)
        if bits >= 16:
            if cfg.a_bits < 16:
                set_module(model, name, ActQuantLinear.from_linear(lin, **self._act(cfg)))
                return True
            return False
        spec = WeightQuantSpec(bits, True, cfg.group_size, sym_grid="restricted")
        scale, zero = fp16_qparams(lin.weight.data, spec)
        codes, scale, zero = quantize_weight(lin.weight.data, spec, scale, zero)
        set_module(model, name, make_quant_linear(lin, codes, scale, zero, spec, self._act(cfg)))
        return True

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        targets = target_linears(model, cfg.skip)
        out: dict = {"w_bits_attn": cfg.w_bits_attn, "w_bits_mlp": cfg.w_bits_mlp,
                     "group_size": cfg.group_size, "a_bits": cfg.a_bits}
        if not cfg.lkd:
            n = sum(self._quantize_dense(model, name, lin, cfg) for name, lin in targets.items())
            out.update(layers=n, lkd=False)
            return out
        from ..models.adapters import get_layers

        distil = set(parse_lkd_layers(cfg.lkd_layers, len(get_layers(model))))
        ids = ctx.calib_tokens(cfg.calib_set(), "zeroquant (lkd=true)")
        bs = min(cfg.lkd_batch_size, ids.shape[0])
        names = {id(m): n for n, m in model.named_modules()}
        report: dict[str, dict] = {}
        count = {"layers": 0}

        def process(i: int, block: nn.Module, inputs: BlockInputs) -> None:
            mine = {names[id(m)]: (rel, m) for rel, m in block.named_modules()
                    if id(m) in names and names[id(m)] in targets}
            if i not in distil:
                for full, (_, lin) in mine.items():
                    count["layers"] += self._quantize_dense(model, full, lin, cfg)
                return
            t0 = time.perf_counter()
            teacher = inputs.run(block)  # fp block on the quantized model's activations
            rec = self._distil(i, block, inputs, teacher, mine, cfg, bs)
            count["layers"] += len(mine)
            rec["mse_after"] = float(F.mse_loss(inputs.run(block).float(), teacher.float()))
            rec["seconds"] = time.perf_counter() - t0
            report[str(i)] = rec
            ctx.log(f"zeroquant LKD block {i}: mse {rec['mse_before']:.4g} -> {rec['mse_after']:.4g}")

        run_blockwise(model, ids, process, device=ctx.device, progress=ctx.progress, batch_size=bs,
                      desc="zeroquant-lkd")
        out.update(layers=count["layers"], lkd=True, lkd_blocks=report,
                   lkd_config={"layers": sorted(distil), "lr": cfg.lkd_lr, "steps": cfg.lkd_steps,
                               "batch_size": bs, "scales": cfg.lkd_scales,
                               "train_norms": cfg.lkd_train_norms, "n": int(ids.shape[0]),
                               "seqlen": int(ids.shape[1])})
        return out

    def _distil(self, i: int, block: nn.Module, inputs: BlockInputs, teacher: torch.Tensor,
                mine: dict, cfg: Config, bs: int) -> dict:
        dtype = next(block.parameters()).dtype
        fq: dict[str, FakeQuantLinear] = {}
        for full, (rel, lin) in mine.items():
            m = FakeQuantLinear(lin, module_bits(full, cfg), cfg.group_size, cfg.a_bits, cfg.lkd_scales)
            set_module(block, rel, m.to(lin.weight.device))
            fq[full] = m
        block.float()
        for p in block.parameters():
            p.requires_grad_(False)
        params = []
        for m in fq.values():
            params += [p for p in m.parameters()]
        if cfg.lkd_train_norms:
            for n_, mod in block.named_modules():
                if "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None:
                    params.append(mod.weight)
        for p in params:
            p.requires_grad_(True)
        kw = inputs.kwargs_for(bs)
        n = inputs.n
        dev = inputs.device

        def student_mse() -> float:
            tot, cnt = 0.0, 0
            with torch.no_grad():
                for s, e, kws in inputs.chunks():
                    y = _block_out(block(inputs.chunk(s, e).float(), **kws)).float()
                    tot += float(F.mse_loss(y, teacher[s:e].to(dev).float(), reduction="sum"))
                    cnt += y.numel()
            return tot / cnt

        rec = {"mse_before": student_mse(), "steps": cfg.lkd_steps, "lr": cfg.lkd_lr}
        losses = []
        if cfg.lkd_steps > 0 and params:
            g = torch.Generator().manual_seed(cfg.seed * 100003 + i)
            opt_ = torch.optim.Adam(params, lr=cfg.lkd_lr)
            order = torch.randperm(n, generator=g)
            pos = 0
            with torch.enable_grad():
                for _ in range(cfg.lkd_steps):
                    if pos + bs > n:
                        order, pos = torch.randperm(n, generator=g), 0
                    idx = order[pos:pos + bs]
                    pos += bs
                    x = inputs.hidden[idx].to(dev).float()
                    y_t = teacher[idx].to(dev).float()
                    loss = F.mse_loss(_block_out(block(x, **kw)).float(), y_t)
                    opt_.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt_.step()
                    losses.append(float(loss.detach()))
        for p in block.parameters():
            p.requires_grad_(False)
        rec["loss_first"] = losses[0] if losses else None
        rec["loss_last"] = losses[-1] if losses else None
        # Finalize from the fp32 masters: the fake-quant layers become QuantLinear (the exact
        # arithmetic the last training step used), then the block goes back to the model dtype.
        act = self._act(cfg)
        for full, (rel, lin) in mine.items():
            m = fq[full]
            holder = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype,
                               device=m.weight.device)
            with torch.no_grad():
                if m.bias is not None:
                    holder.bias.copy_(m.bias)
                if m.bits >= 16:
                    holder.weight.copy_(m.weight)
                    new = ActQuantLinear.from_linear(holder, **act) if cfg.a_bits < 16 else holder
                else:
                    codes, scale, zero = m.codes_and_scales()
                    new = make_quant_linear(holder, codes, scale, zero, m.spec, act)
            set_module(block, rel, new)
        block.to(dtype)
        return rec
