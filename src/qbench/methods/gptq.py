"""GPTQ (Frantar et al., 2023): second-order weight quantization, one column at a time.

The algorithm (:func:`gptq_quantize_weight`) follows the IST-DASLab reference
(``gptq.py: GPTQ.fasterquant``) line by line; the model plumbing (:class:`GPTQ`) runs it block by
block through :func:`qbench.calib.blockwise.run_blockwise`.

* Statistics: ``H = 2 XXᵀ / n`` over the calibration tokens reaching each linear (forward hooks,
  fp32). Linears that read the *same* input tensor (q/k/v, gate/up) share one ``XXᵀ`` product
  per forward (their Hessians are equal; the matmul is done once).
* Dead inputs (``H_ii = 0``, the input channel was always zero): ``W[:, i] = 0``, ``H_ii = 1``.
* Damping ``λ = percdamp · mean(diag H)`` added to the diagonal; then ``U = chol(H⁻¹)ᵀ`` (upper).
  If a Cholesky factorisation fails, ``percdamp`` is escalated ×10 (up to 100 × mean diag); if it
  still fails (non-finite statistics) ``H = I`` is used, which reduces GPTQ to RTN. Either repair
  is reported in the stats (``repairs: [{"layer", "damp", "dead_columns", ...}]``); GPTQ never
  crashes on a degenerate Hessian.
* ``act_order``: columns processed in order of descending ``diag(H)``. Groups are formed in that
  processing order, so the stored layer carries ``g_idx`` (group of each original column) and
  its codes in the original column order; ``static_groups`` computes every group's parameters on
  the original contiguous groups *before* permuting (no ``g_idx`` needed).
* Lazy batch updates over ``blocksize`` columns; group parameters are (re)computed when
  processing reaches a group boundary, from the weights *as updated so far*. (The reference reads
  them from ``W``, which inside a lazy block misses the updates from that block's earlier columns
  when ``group_size < blocksize``; we use the fully updated values, which is what the paper
  describes. For ``group_size`` a multiple of ``blocksize`` both are identical.)
* Scales are rounded to fp16 when chosen and the codes computed with the rounded scale, so the
  packed :class:`QuantLinear` dequantizes to exactly the matrix GPTQ optimised.
* ``mse``: optional grid search of a shrink factor of the range per group (the reference's
  ``Quantizer(mse=True)``: grid 100, max shrink 0.8, norm 2.4).
* ``true_sequential``: within a block, quantize ``[q,k,v] → o → [gate,up] → down``, re-capturing
  the inputs after each group so later groups see the already-quantized earlier ones. Otherwise
  all linears of a block are quantized from one pass over the fp block (the reference default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..calib.hessian import HessianCollector, sequential_groups  # noqa: F401 - re-exported
from ..modules import target_linears
from ..quant.gptq import RazorSpec, damped_inverse_cholesky, gptq_quantize_weight, group_qparams  # noqa: F401
from ..quant.sdr import TIES
from .base import ConfigError, Method, QuantContext, opt, register
from .common import GPTQArgs, check_group_size, finalize_act_only, gptq_model, weight_act_descriptor

__all__ = ["gptq_quantize_weight", "group_qparams", "damped_inverse_cholesky", "HessianCollector",
           "GPTQ", "gptq_model", "sequential_groups"]


@register
class GPTQ(Method):
    name = "gptq"
    blockwise = True  # everything happens inside run_blockwise (one block on the device at a time)
    kind = "weight"

    @dataclass
    class Config(GPTQArgs):
        """GPTQ's arguments (:class:`qbench.methods.common.GPTQArgs`, shared with mixed precision)
        and QRazor razoring inside the column loop (``razor_bits`` < 16, issue 16)."""

        razor_bits: int = opt(16, "razor the base integers to sign + (razor_bits-1) bits inside the "
                              "column loop, so GPTQ compensates the razoring error (QRazor after "
                              "GPTQ; 16 = off)", choices=(2, 3, 4, 5, 6, 7, 16))
        razor_group_size: int = opt(8, "input columns per razoring group (one shift each)",
                                    range=(1, 1 << 16))
        razor_ties: str = opt("even", "razoring ties: half to even (the seed) or half up",
                              choices=TIES)

        def validate(self, key: str) -> None:
            super().validate(key)
            if self.razor_bits < 16 and not (self.sym and self.group_size == -1 and self.w_bits == 8
                                             and self.sym_grid == "restricted"):
                raise ConfigError(f"{key}.razor_bits={self.razor_bits}: razoring inside GPTQ needs "
                                  "QRazor's base: w_bits: 8, sym: true, sym_grid: restricted, "
                                  "group_size: -1")

        def razor_spec(self) -> RazorSpec | None:
            if self.razor_bits >= 16:
                return None
            return RazorSpec(self.razor_bits, self.razor_group_size, self.razor_ties)

    def check(self, model, cfg, key):
        check_group_size(model, cfg, key)
        if cfg.razor_bits < 16:
            for name, lin in target_linears(model, cfg.skip).items():
                if lin.in_features % cfg.razor_group_size:
                    raise ConfigError(f"{key}.razor_group_size={cfg.razor_group_size} does not divide "
                                      f"layer {name} (in_features={lin.in_features})")

    def describe(self, cfg: Config):
        d = weight_act_descriptor(cfg)
        if cfg.razor_bits < 16:
            d = dataclasses.replace(d, grid=f"{d.grid}, razored to {cfg.razor_bits} bits "
                                           f"g{cfg.razor_group_size} inside GPTQ")
        return d

    def apply(self, model: nn.Module, cfg: Config, ctx: QuantContext) -> dict:
        if cfg.w_bits >= 16:
            return {"layers": finalize_act_only(model, cfg)}
        return gptq_model(model, cfg, ctx, desc=self.name)
