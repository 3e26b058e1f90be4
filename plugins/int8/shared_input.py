"""One per-token quantization for int8 layers that read the same input.

In a Llama block the q, k and v projections read one normed hidden state,
and the MLP's gate and up projections read another.  Each int8 layer
quantizes its input per token (an absmax, a divide, a round and a cast over
the whole activation), so five of a block's seven quantizations repeat work
already done: on SmolLM2-135M, a 1x256 prefill spends ~10% of its time on
them (benchmarks/RESULTS.md, "Prefill: attention and glue").

Layers flagged ``share_input`` (by :func:`mark_shared_inputs`, which finds
them by running the model once on a few tokens) keep the int8 codes of the
last input they quantized in a per-thread slot; a flagged sibling called
with the *same tensor object* takes them instead of quantizing again.  The
codes are exactly those it would compute (same function, same input).  An
input modified in place between two sibling calls is caught by its version
counter; tensors made under ``torch.inference_mode`` have none, so there
code that edits a layer's input in place and calls another flagged layer
on it would get stale codes; no model forward does that.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import nn

from .tensor_identity import LastTensorMemo

__all__ = ["shared_codes", "mark_shared_inputs", "PROBE_TOKENS"]

#: Tokens of the probe forward that finds layers sharing an input.
PROBE_TOKENS = 16


class _Slot(threading.local):
    """This thread's last quantized input and its codes, keyed by shape and form."""

    def __init__(self) -> None:
        self.memo = LastTensorMemo()


_SLOT = _Slot()


def shared_codes(x: torch.Tensor, form: str, quantize: Callable[[], object]):
    """The codes of ``x`` in ``form`` (e.g. ``"int8"``).

    Reused if the last call in this thread quantized this very tensor (same
    object, same version) into the same form; else ``quantize()``, remembered.
    """
    codes = _SLOT.memo.get(x, (x.shape, form))
    if codes is None:
        codes = quantize()
        _SLOT.memo.put(x, (x.shape, form), codes)
    return codes


def clear() -> None:
    """Forget the last codes (tests; nothing needs it for correctness)."""
    _SLOT.memo.clear()


def mark_shared_inputs(model: nn.Module, layer_type: type) -> int:
    """Flag the ``layer_type`` layers that the model's forward feeds one tensor; returns how many.

    Runs the model once on :data:`PROBE_TOKENS` token ids with pre-hooks
    recording which tensor object each layer receives (kept alive meanwhile,
    so no identity is reused).  Layers alone with their input are unflagged.
    """
    layers = [module for module in model.modules() if isinstance(module, layer_type)]
    seen: dict[int, list[nn.Module]] = {}
    inputs: list[torch.Tensor] = []

    def record(module, args):
        inputs.append(args[0])
        seen.setdefault(id(args[0]), []).append(module)

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        vocab = int(getattr(model.config, "vocab_size", PROBE_TOKENS))
        ids = torch.arange(PROBE_TOKENS)[None] % vocab
        with torch.inference_mode():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
        clear()
        for layer in layers:
            # forms the probe derived (oneDNN's packed weight is opaque: no deepcopy); rebuilt on first use
            getattr(layer, "_derived", {}).clear()
    shared = {id(m) for group in seen.values() if len({id(m) for m in group}) > 1 for m in group}
    for layer in layers:
        layer.share_input = id(layer) in shared
    return len(shared)
