"""Per-layer input Hessians ``H = 2XXᵀ`` collected by forward hooks, and the true-sequential layer
groups of a decoder block (GPTQ, SpQR, mixed precision)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HessianCollector", "collect_hessians", "sequential_groups"]


# ============================================================================ statistics
class HessianCollector:
    """Forward hooks accumulating ``Σ xxᵀ`` (fp32) of each module's input.

    Consecutive calls with the very same input tensor (q/k/v, gate/up) reuse one product: we hold
    a reference to the last input, so identity (``is``) cannot be confused by memory reuse."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.S: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(_mod, inp, _out):
            x = inp[0]
            if self._last is not None and self._last[0] is x:
                G = self._last[1]
            else:
                xf = x.detach().reshape(-1, x.shape[-1]).float()
                G = xf.t().matmul(xf)
                self._last = (x, G)
            if name in self.S:
                self.S[name] += G
            else:
                self.S[name] = G.clone()
            self.count[name] = self.count.get(name, 0) + x.numel() // x.shape[-1]
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None

    def hessian(self, name: str, in_features: int, device=None) -> torch.Tensor:
        """``H = 2 XXᵀ / n_tokens`` (zeros if the module never ran)."""
        if name not in self.S:
            return torch.zeros(in_features, in_features, device=device)
        return self.S.pop(name).mul_(2.0 / max(self.count[name], 1))


def collect_hessians(block: nn.Module, inputs, modules: dict[str, nn.Module]) -> HessianCollector:
    """Run ``block`` over its calibration ``inputs`` (a :class:`~qbench.calib.blockwise.BlockInputs`)
    just far enough to see every one of ``modules``, with hooks collecting their input Hessians;
    the hooks are removed again before returning."""
    hc = HessianCollector(modules)
    try:
        inputs.run(block, keep_outputs=False, stop_after=list(modules.values()))
    finally:
        hc.remove()
    return hc


def sequential_groups(names: list[str]) -> list[list[str]]:
    """Split a block's linear names (relative to the block) into the true-sequential order
    ``[q,k,v] → o → [gate,up] → down``; names outside it form a last group."""
    groups, done = [], set()
    for pattern in _SEQUENTIAL:
        g = [n for n in names if n in pattern]
        if g:
            groups.append(g)
            done.update(g)
    rest = [n for n in names if n not in done]
    if rest:
        groups.append(rest)
    return groups


# ============================================================================ model plumbing
_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj"),
    ("mlp.down_proj",),
)
