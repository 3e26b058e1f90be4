"""GPTQ: int8 weight codes chosen against the calibration inputs instead of rounded to nearest.

Round-to-nearest rounds each weight on its own.  GPTQ (Frantar et al., 2022)
rounds a layer's input columns one after another and, after each, moves the
rounding error onto the columns not yet rounded, in the direction that keeps
the layer's output on the calibration inputs closest to float: it minimises
``||X W^T - X Q^T||`` with the Hessian ``H = X^T X`` of the inputs ``X`` the
int8 layer will multiply (after its online rotation, if it has one).

ftq keeps its int8 format: symmetric per-output-channel codes in ``[-127, 127]``
with the scale ``absmax / 127`` of the float row
(:mod:`ftq_plugins.int8.numerics`), so a GPTQ layer is an ordinary int8
layer with better codes.  The Hessians are collected in one calibration pass
over the float model (every layer's from the float inputs, not from the
partly quantized model as the sequential variant does); layers reading the
same input (q/k/v, gate/up) share one.  Columns are rounded in order of decreasing ``H`` diagonal ("act order"), in
blocks of 128 with the lazy batch update of the reference implementation.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["HessianCollector", "gptq_codes", "gptq_layer_codes", "GPTQ_SCHEME", "mark_gptq_layers"]


class HessianCollector:
    """``H = sum x^T x`` over the calibration inputs of named layers, with forward pre-hooks.

    ``transforms`` maps a layer name to what the int8 layer does to its input
    before the GEMM (its online Hadamard rotation); the Hessian is of that.
    Layers called one after another on the very same input tensor without a
    transform (q/k/v, gate/up) share one Hessian: ``hessians`` then holds the
    same tensor under each name.
    """

    def __init__(self, layers: dict, transforms: dict[str, Callable] | None = None):
        from ftq_plugins.int8.tensor_identity import LastTensorMemo

        self.layers = layers
        self.transforms = transforms or {}
        self.hessians: dict = {}
        self._last_input = LastTensorMemo()  # the input just summed, and the name whose Hessian holds it

    def __enter__(self) -> "HessianCollector":
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, name: str):
        transform = self.transforms.get(name)

        def hook(module, args):
            raw = args[0]
            if transform is None:
                owner = self._last_input.get(raw)
                if owner is not None and owner != name:  # a sibling summed this very tensor: share its Hessian
                    self.hessians[name] = self.hessians[owner]
                    return
            x = raw.detach().float()
            x = x.reshape(-1, x.shape[-1])
            if transform is not None:
                x = transform(x)
            xtx = x.t() @ x
            previous = self.hessians.get(name)
            self.hessians[name] = xtx if previous is None else previous.add_(xtx)
            if transform is None:
                self._last_input.put(raw, None, name)

        return hook


def gptq_codes(weight, hessian, *, block: int = 128, damping: float = 0.01):
    """``(int8 codes [out, in], float32 scale [out])`` of ``weight [out, in]`` by GPTQ against ``hessian [in, in]``.

    The scales are those of round-to-nearest (``absmax / 127`` per row);
    ``damping`` adds that fraction of the mean diagonal to ``H`` (its inverse
    must exist).  Input channels that never saw a nonzero value get code 0.
    """
    import torch

    from ftq_plugins.int8.numerics import round_to_codes, scale_from_absmax

    w = weight.detach().double().clone()
    scale = scale_from_absmax(weight.detach().float().abs().amax(dim=1, keepdim=True))
    scale64 = scale.double()
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True)  # act order: the most-used inputs first
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damping * torch.diag(h).mean())
    # the upper Cholesky factor of H^-1: row i holds how column i's error spreads over the columns after it
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    columns = w.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            column = w_block[:, i]
            q = round_to_codes(column, scale[:, 0]).double()
            codes[:, start + i] = q
            error = (column - q * scale64[:, 0]) / hinv_block[i, i]
            w_block[:, i:] -= error.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    return codes[:, torch.argsort(order)].to(torch.int8), scale.reshape(-1)


def gptq_layer_codes(model, layers: dict, batches, *, input_transforms: dict | None = None,
                     weight_transforms: dict | None = None, run=None) -> dict:
    """``{name: (int8 codes, scale)}`` for each of ``layers`` (float Linear/Conv1D modules of ``model``).

    One calibration pass of ``batches`` (input ids) collects every layer's
    Hessian; ``input_transforms[name]`` is what the int8 layer does to its
    input first (rotation, smoothing) and ``weight_transforms[name]`` the
    matching change of its ``[out, in]`` weight, so codes and Hessian are in
    the basis the int8 GEMM multiplies.  ``run``: what replays the calibration
    inputs instead of ``batches`` through ``model`` (one decoder layer's, when
    the model is converted layer by layer).
    """
    from tqdm.auto import tqdm

    from ftq_core.layers import linear_weight

    from .calibration import run_batches

    weight_transforms = weight_transforms or {}
    with HessianCollector(layers, input_transforms) as collector:
        run() if run is not None else run_batches(model, batches)
    codes = {}
    for name in tqdm(list(layers), desc="gptq", unit="layer", leave=False):
        weight = linear_weight(layers[name]).detach().float()
        transform = weight_transforms.get(name)
        codes[name] = gptq_codes(transform(weight) if transform else weight, collector.hessians.pop(name))
    return codes


#: What a layer whose int8 codes came from GPTQ adds to its report's scheme.
GPTQ_SCHEME = ", GPTQ weight codes"


def mark_gptq_layers(reports: list, codes: dict) -> list:
    """``reports`` with :data:`GPTQ_SCHEME` added to the quantized layers whose codes are in ``codes``."""
    from dataclasses import replace

    return [replace(r, scheme=r.scheme + GPTQ_SCHEME) if r.quantized and r.name in codes else r for r in reports]
