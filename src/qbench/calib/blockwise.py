"""Block-by-block calibration runner (GPTQ, AWQ, SpQR, ZeroQuant-LKD).

The model is never run end to end on the calibration set. Instead:

1. The inputs of decoder block 0 are captured: a forward pre-hook on ``layers[0]`` (with
   ``with_kwargs=True``) records the hidden states ``[b, seqlen, hidden]`` *and the keyword
   arguments the block receives* (``position_embeddings=(cos, sin)``, ``attention_mask`` — ``None``
   for SDPA without padding, a 4-D mask for eager attention —, ``position_ids``,
   ``cache=None``, ``use_cache=False``, whatever the family passes), then raises a
   private exception so the rest of the model never runs. Only the embedding / rotary modules
   (the base model's children other than ``layers``) are moved to ``device`` for this.
2. For each block ``i`` in order: the block is moved to ``device``, ``process_block(i, block,
   inputs)`` is called (it may hook, search, quantize and replace the block's submodules in
   place), then the runner recomputes the block's outputs *with the block as the callback left
   it* (quantized) and writes them **in place** over the inputs buffer: block ``i+1`` therefore
   sees the outputs of the already-quantized blocks ``0..i`` (the GPTQ protocol), and only one
   block's activations ``[n, seqlen, hidden]`` are held at any time. The block then goes back to
   the device it came from, so a model larger than the accelerator fits as long as one block does.

``BlockInputs`` is what the callback gets:

* ``hidden``: ``[n, seqlen, hidden]`` inputs of the block (model dtype; on ``device``, or on the
  CPU with ``offload_inputs=True``). **Do not keep references to it after the callback returns**:
  the runner overwrites it with the block's outputs.
* ``kwargs``: the block's keyword arguments for a chunk of ``batch_size`` samples
  (``kwargs_for(b)`` for a chunk of ``b`` samples: masks have a batch dimension);
* ``chunks()``: ``(start, end, kwargs)`` over the samples, ``batch_size`` at a time;
* ``run(block, keep_outputs=True, stop_after=None)``: runs ``block`` over all samples (batched, no
  grad) and returns its outputs ``[n, seqlen, hidden]`` (or ``None`` with ``keep_outputs=False``,
  for a pass that only feeds hooks). ``stop_after`` (modules) ends each chunk's forward as soon as
  all those modules have run (via a forward hook raising a private exception): statistics passes
  over the first linears of a block then skip the rest of the block.

Everything runs under ``torch.no_grad()`` with ``use_cache=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import check_finite

__all__ = ["BlockInputs", "run_blockwise", "get_decoder_layers", "capture_block0_inputs"]


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early (caught by this module only)."""


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, through the family adapter when it is available."""
    try:
        from ..models.adapters import get_layers
    except ImportError:  # pragma: no cover - adapters are part of the package
        return model.model.layers
    return get_layers(model)


def _base_model(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """The module whose child is ``layers`` (``LlamaModel`` & co.)."""
    for m in model.modules():
        if any(c is layers for c in m.children()):
            return m
    raise ValueError(f"cannot find the module holding the decoder layers of {type(model).__name__}")


def _to(obj: Any, device) -> Any:
    """Move tensors nested in tuples/lists/dicts to ``device`` (other values unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _module_device(m: nn.Module, default="cpu") -> torch.device | None:
    for t in m.parameters():
        return t.device
    for t in m.buffers():
        return t.device
    return None if default is None else torch.device(default)


def _block_output(out: Any) -> torch.Tensor:
    # transformers 5 decoder layers return a tensor; older families return (hidden, ...).
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockInputs:
    """The inputs of one decoder block for all calibration samples (see the module docstring)."""

    hidden: torch.Tensor
    kwargs_by_batch: dict[int, dict]
    batch_size: int
    device: torch.device
    index: int = 0
    extra: dict = field(default_factory=dict)  # free space for the callback (dropped with it)

    @property
    def n(self) -> int:
        return self.hidden.shape[0]

    @property
    def kwargs(self) -> dict:
        """Keyword arguments of the block for a chunk of ``batch_size`` samples."""
        return self.kwargs_for(min(self.batch_size, self.n))

    def kwargs_for(self, b: int) -> dict:
        """Block kwargs for a chunk of ``b`` samples. Sizes seen during capture are exact; others
        are derived from a captured size ``B``: batch-1 tensors broadcast as they are, tensors
        with a leading dimension ``B ≥ b`` (4-D masks) are sliced to ``b``."""
        kw = self.kwargs_by_batch.get(b)
        if kw is None:
            B = 1 if 1 in self.kwargs_by_batch else max(self.kwargs_by_batch)
            if B != 1 and b > B:
                raise ValueError(f"no block kwargs for a chunk of {b} samples (captured: "
                                 f"{sorted(self.kwargs_by_batch)}); pass batch_size={b} to run_blockwise")

            def fit(v):
                if isinstance(v, torch.Tensor) and B > 1 and v.dim() > 0 and v.shape[0] == B:
                    return v[:b]
                if isinstance(v, (tuple, list)):
                    return type(v)(fit(o) for o in v)
                return v

            kw = {k: fit(v) for k, v in self.kwargs_by_batch[B].items()}
            self.kwargs_by_batch[b] = kw
        return kw

    def chunks(self) -> Iterator[tuple[int, int, dict]]:
        for s in range(0, self.n, self.batch_size):
            e = min(s + self.batch_size, self.n)
            yield s, e, self.kwargs_for(e - s)

    def chunk(self, s: int, e: int) -> torch.Tensor:
        """Samples ``s:e`` of the inputs, on the compute device."""
        return self.hidden[s:e].to(self.device)

    @torch.no_grad()
    def run(self, block: nn.Module, keep_outputs: bool = True,
            stop_after: Iterable[nn.Module] | None = None) -> torch.Tensor | None:
        """Run ``block`` on every sample (``batch_size`` at a time); outputs ``[n, seqlen, hidden]``
        on the same device as :attr:`hidden` (``None`` when ``keep_outputs`` is false)."""
        out = torch.empty_like(self.hidden) if keep_outputs else None
        stop = list(stop_after or [])
        if stop and keep_outputs:
            raise ValueError("stop_after ends the forward early: use keep_outputs=False")
        seen: set[int] = set()
        handles = []

        def mark(mod, _inp, _out):
            seen.add(id(mod))
            if len(seen) == len(stop):
                raise _StopForward

        for m in {id(m): m for m in stop}.values():
            handles.append(m.register_forward_hook(mark))
        try:
            for s, e, kw in self.chunks():
                seen.clear()
                try:
                    y = _block_output(block(self.chunk(s, e), **kw))
                except _StopForward:
                    continue
                if out is not None:
                    out[s:e] = y.to(out.device, out.dtype)
        finally:
            for h in handles:
                h.remove()
        return out


@torch.no_grad()
def capture_block0_inputs(model: nn.Module, calib_ids: torch.Tensor, *, device="cpu",
                          batch_size: int = 1, offload_inputs: bool = False
                          ) -> tuple[torch.Tensor, dict[int, dict]]:
    """Hidden states ``[n, seqlen, hidden]`` entering block 0 and its kwargs per chunk size."""
    device = torch.device(device)
    layers = get_decoder_layers(model)
    base = _base_model(model, layers)
    # Move what runs before block 0 (embeddings, rotary, ...) to the device; not the blocks.
    moved = []
    for name, child in base.named_children():
        if child is layers:
            continue
        dev = _module_device(child, None)
        if dev is not None and dev != device:
            moved.append((child, dev))
            child.to(device)
    n = calib_ids.shape[0]
    store_dev = torch.device("cpu") if offload_inputs else device
    hidden: torch.Tensor | None = None
    kwargs_by_batch: dict[int, dict] = {}
    state = {"s": 0}

    def pre_hook(_mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        nonlocal hidden
        if hidden is None:
            hidden = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=store_dev)
        b = x.shape[0]
        hidden[state["s"]:state["s"] + b] = x.to(store_dev)
        if b not in kwargs_by_batch:
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            kw["use_cache"] = False
            if "cache" in kw:
                kw["cache"] = None
            kwargs_by_batch[b] = _to(kw, device)
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for s in range(0, n, batch_size):
            state["s"] = s
            try:
                model(input_ids=calib_ids[s:s + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - the hook always fires
                raise RuntimeError("the forward pre-hook on decoder block 0 did not fire")
    finally:
        handle.remove()
        for child, dev in moved:
            child.to(dev)
    return hidden, kwargs_by_batch


@torch.no_grad()
def run_blockwise(model: nn.Module, calib_ids: torch.LongTensor,
                  process_block: Callable[[int, nn.Module, BlockInputs], Any], *,
                  device="cpu", progress: bool = True, batch_size: int = 1,
                  offload_inputs: bool = False, desc: str = "blocks") -> torch.Tensor:
    """Calibrate ``model`` one decoder block at a time (see the module docstring).

    ``calib_ids``: LongTensor ``[n, seqlen]``. ``process_block(i, block, inputs)`` is called for
    every block in order with the block on ``device``. Returns the outputs of the last block
    (``[n, seqlen, hidden]``, before the final norm) computed through the processed blocks.
    """
    if calib_ids.dim() != 2:
        raise ValueError(f"calib_ids must be [n, seqlen], got shape {tuple(calib_ids.shape)}")
    device = torch.device(device)
    batch_size = max(1, int(batch_size))
    layers = get_decoder_layers(model)
    hidden, kwargs_by_batch = capture_block0_inputs(
        model, calib_ids, device=device, batch_size=batch_size, offload_inputs=offload_inputs)
    check_finite(hidden, "calibration activations entering decoder block 0")
    for i, block in enumerate(tqdm(layers, desc=desc, disable=not progress, leave=False)):
        home = _module_device(block)
        block.to(device)
        inputs = BlockInputs(hidden, kwargs_by_batch, batch_size, device, index=i)
        process_block(i, block, inputs)
        del inputs
        # Outputs of the (now processed) block overwrite its inputs, chunk by chunk: each sample
        # is independent, so this is exact and keeps a single activation buffer.
        for s in range(0, hidden.shape[0], batch_size):
            e = min(s + batch_size, hidden.shape[0])
            y = _block_output(block(hidden[s:e].to(device), **kwargs_by_batch[e - s]))
            hidden[s:e] = y.to(hidden.device, hidden.dtype)
        check_finite(hidden, f"calibration activations after decoder block {i} (as processed)")
        block.to(home)
    return hidden
