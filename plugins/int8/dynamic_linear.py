"""Int8 Linear with per-token activation scales and per-channel weight scales.

This is the numerics modern LLM int8 uses (LLM.int8's vector-wise scheme,
SmoothQuant's W8A8 with per-token activations): each row of the input gets its
own symmetric int8 scale, computed on the fly, and each output channel of the
weight gets its own.  The product runs as a real int8 GEMM with int32
accumulation, and the result is rescaled by the two scale vectors.

Which int8 kernel runs is the layer's ``kernel`` (see
:mod:`ftq_plugins.int8.kernels`): ``onednn`` (prepacked oneDNN int8 GEMM),
``int-mm`` (``torch._int_mm``), ``weight-only`` (int8 weights x bf16
activations) or ``auto`` (the fastest for decode and for prefill, measured
per layer shape when the model is quantized).  The choice is saved with
the layer; a kernel this machine cannot run falls back to ``int-mm``, whose
numerics match.

Why not torch's eager dynamic quantization: it uses one activation scale per
tensor (and 7-bit on x86/fbgemm), and a handful of outlier channels in LLM
activations then crush every other value.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ftq_core.layers import linear_weight

from . import kernels
from .autograd import differentiable_input, input_gradient
from .hadamard import block_hadamard, check_rotation_block, describe_rotation, to_rotated_basis
from .kernels import DECODE_MAX_TOKENS, KERNELS
from .numerics import quantize_per_channel_symmetric
from .shared_input import shared_codes
from .tensor_identity import tensor_version

__all__ = [
    "Int8DynamicLinear",
    "tune_kernels",
]


@functools.lru_cache(maxsize=None)
def _resolved(kernel: str, in_features: int) -> str:
    return kernels.resolve_kernel(kernel, in_features)


def _holds_opaque(value) -> bool:
    """Whether a derived weight form is, or holds, a tensor without storage (oneDNN's packed layout)."""
    values = value if isinstance(value, tuple) else (value,)
    return any(isinstance(v, torch.Tensor) and v.is_mkldnn for v in values)


class Int8DynamicLinear(nn.Module):
    """``y = (q(x) @ q(W).T) * s_x * s_w + b`` with an int8 GEMM (or int8 W x bf16 x for ``weight-only``).

    Buffers: ``weight_int8 [out, in]`` int8, ``weight_scale [out]`` float32,
    ``bias [out]`` float32 or absent.  Inputs of any float dtype; the output has
    the input's dtype.  Kernel-specific forms of the weight (oneDNN's packed
    layout, bf16 scales) are derived on first use and never saved.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        kernel: str = "auto",
        decode_kernel: str = "onednn",
        prefill_kernel: str = "onednn",
        decode_max_tokens: int = DECODE_MAX_TOKENS,
        share_input: bool = False,
        input_rotation_block: int = 0,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # > 0: the input is rotated by a block Hadamard matrix first and the codes hold W H
        # (see ftq_plugins.int8.hadamard); 0: no rotation
        self.input_rotation_block = check_rotation_block(input_rotation_block, in_features)
        self.set_kernel(kernel, decode_kernel=decode_kernel, prefill_kernel=prefill_kernel, decode_max_tokens=decode_max_tokens)
        # Siblings fed the same tensor (q/k/v, gate/up) quantize it once: see ftq_plugins.int8.shared_input.
        self.share_input = bool(share_input)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None
        self._derived: dict[str, tuple[tuple, object]] = {}

    # -- kernel choice -------------------------------------------------------
    def set_kernel(
        self,
        kernel: str,
        *,
        decode_kernel: str = "onednn",
        prefill_kernel: str = "onednn",
        decode_max_tokens: int = DECODE_MAX_TOKENS,
    ) -> None:
        """Choose the kernel; ``auto`` runs ``decode_kernel`` up to ``decode_max_tokens`` rows, ``prefill_kernel`` above."""
        for name, value in (("kernel", kernel), ("decode_kernel", decode_kernel), ("prefill_kernel", prefill_kernel)):
            if value not in KERNELS or (name != "kernel" and value == "auto") or (name == "prefill_kernel" and value == "fbgemm"):
                raise ValueError(f"unknown int8 {name} {value!r}; choose one of {', '.join(KERNELS)}")
        self.kernel = kernel
        self.decode_kernel = decode_kernel
        self.prefill_kernel = prefill_kernel
        self.decode_max_tokens = int(decode_max_tokens)

    def kernel_meta(self) -> dict:
        """The kernel choice as saved in the artifact (see :meth:`set_kernel`)."""
        return {
            "kernel": self.kernel,
            "decode_kernel": self.decode_kernel,
            "prefill_kernel": self.prefill_kernel,
            "decode_max_tokens": self.decode_max_tokens,
            "share_input": self.share_input,
            **({"input_rotation_block": self.input_rotation_block} if self.input_rotation_block else {}),
        }

    def kernel_for(self, tokens: int) -> str:
        """The concrete kernel a forward over ``tokens`` rows runs on this machine."""
        kernel = self.kernel
        if kernel == "auto":
            kernel = self.decode_kernel if tokens <= self.decode_max_tokens else self.prefill_kernel
        if kernel == "fbgemm" and tokens != 1:  # per-tensor activation scale = per-token only for one row
            kernel = self.prefill_kernel if self.prefill_kernel != "fbgemm" else "onednn"
        return _resolved(kernel, self.in_features)

    # -- construction ----------------------------------------------------------
    @classmethod
    def from_float(cls, module: nn.Module, *, kernel: str = "auto", input_rotation_block: int = 0,
                   weight_rotated: bool = False, codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> "Int8DynamicLinear":
        """Quantize an ``nn.Linear`` or GPT-2 ``Conv1D`` (with ``input_rotation_block``, as ``W H``: same function).

        ``weight_rotated``: the module's weight already is ``W H`` (a QAT layer trained on the rotated input),
        and is rounded as it is.  ``codes``: the ``(int8 [out, in], float32 scale [out])`` weight to hold
        instead of the nearest codes (in the rotated basis where the layer has one; GPTQ's).
        """
        weight = linear_weight(module)
        out_features, in_features = weight.shape
        qmodule = cls(in_features, out_features, bias=module.bias is not None, kernel=kernel,
                      input_rotation_block=input_rotation_block)
        weight = weight.detach().float()
        if codes is not None:
            q, scale = codes
        else:
            q, scale = quantize_per_channel_symmetric(weight if weight_rotated else qmodule._to_rotated_basis(weight))
        qmodule.weight_int8.copy_(q)
        qmodule.weight_scale.copy_(scale)
        if module.bias is not None:
            qmodule.bias.copy_(module.bias.detach().float())
        return qmodule.to(weight.device)

    @classmethod
    def from_tensors(cls, tensors, meta: dict) -> "Int8DynamicLinear":
        """Rebuild a saved layer from its tensors and codec meta.

        The loaded tensors are taken as they are (after a shape/dtype check),
        not copied: a weight tied to an int8 embedding stays one tensor in memory.
        Layers saved before kernel choices existed ran ``torch._int_mm``.
        """
        from ftq_core.tensor_io import adopt_saved_tensors

        module = cls(
            meta["in_features"],
            meta["out_features"],
            bias="bias" in tensors,
            kernel=meta.get("kernel", "int-mm"),
            decode_kernel=meta.get("decode_kernel", "onednn"),
            prefill_kernel=meta.get("prefill_kernel", "onednn"),
            decode_max_tokens=meta.get("decode_max_tokens", DECODE_MAX_TOKENS),
            share_input=meta.get("share_input", False),
            input_rotation_block=int(meta.get("input_rotation_block", 0)),
        )
        return adopt_saved_tensors(module, tensors, ("weight_int8", "weight_scale", "bias"), what="int8 layer")

    def _to_rotated_basis(self, weight: torch.Tensor) -> torch.Tensor:
        """``W -> W H`` (and back: ``H`` is its own inverse) for a rotated input; else ``W``."""
        return to_rotated_basis(weight, self.input_rotation_block)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with, in its input's own basis (un-rotated)."""
        # one float copy, scaled in place (the same products): a [128k, 4096] head is 2 GB a copy
        return self._to_rotated_basis(self.weight_int8.float().mul_(self.weight_scale[:, None]))

    def requantize(self, weight: torch.Tensor) -> None:
        """Round a new float ``weight [out, in]`` (input's own basis) into this layer's int8 codes and scales, in place.

        What merging an adapter into the layer does; kernel-specific forms of
        the old weight are rebuilt on next use.
        """
        q, scale = quantize_per_channel_symmetric(self._to_rotated_basis(weight.float()))
        self.weight_int8.copy_(q)
        self.weight_scale.copy_(scale)
        self._derived.clear()

    def __getstate__(self) -> dict:
        """The module's state without oneDNN's packed weights: an opaque (mkldnn) tensor, which
        ``copy.deepcopy`` cannot copy; a copy rebuilds it on first use, as after a load."""
        state = self.__dict__.copy()
        state["_derived"] = {name: cached for name, cached in self._derived.items() if not _holds_opaque(cached[1])}
        return state

    # -- forward -----------------------------------------------------------------
    def _derive(self, name: str, source: torch.Tensor, make):
        """A cached form of ``source`` (packed weight, bf16 scales), rebuilt if the buffer changed."""
        key = (source.data_ptr(), tensor_version(source), source.device)
        cached = self._derived.get(name)
        if cached is None or cached[0] != key:
            cached = (key, make(source))
            self._derived[name] = cached
        return cached[1]

    def _onednn_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        packed = self._derive("onednn", self.weight_int8, kernels.onednn_pack)
        zeros = self._derive("zeros", self.weight_scale, lambda s: torch.zeros(s.shape, dtype=torch.long))
        return packed, zeros

    def run_kernel(self, kernel: str, x2: torch.Tensor) -> torch.Tensor:
        """``x2 [M, in]`` through one concrete kernel, without bias (float32, or bf16 for weight-only)."""
        if kernel == "onednn":
            packed, zeros = self._onednn_weight()
            return kernels.onednn_int8(x2, packed, self.weight_scale, zeros)
        if kernel == "fbgemm":
            packed = self._derive("fbgemm", self.weight_int8, lambda w: kernels.fbgemm_pack(w, self.weight_scale))
            return kernels.fbgemm_int8(x2, packed)
        if kernel == "weight-only":
            scale = self._derive("scale_bf16", self.weight_scale, lambda s: s.to(torch.bfloat16))
            return kernels.weight_only_int8(x2, self.weight_int8, scale)
        return kernels.int_mm_int8(x2, self.weight_int8, self.weight_scale)

    def _run_shared(self, kernel: str, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """``run_kernel`` for ``onednn``/``int-mm`` with the input's codes shared among siblings."""
        if kernel == "onednn":
            uint8 = x2.shape[0] <= kernels.ONEDNN_UINT8_MAX_ROWS
            codes = shared_codes(x, "uint8" if uint8 else "int8", lambda: kernels.onednn_codes(x2))
            packed, zeros = self._onednn_weight()
            return kernels.onednn_int8_codes(codes, packed, self.weight_scale, zeros)
        # int-mm's codes equal onednn's signed ones (same function of the input)
        codes = shared_codes(x, "int8", lambda: kernels.signed_codes(x2))
        return kernels.int_mm_codes(codes, self.weight_int8, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # adapters below this layer learn through it: see ftq_plugins.int8.autograd
        return differentiable_input(x, self._forward, self._input_gradient)

    def _input_gradient(self, grad_out: torch.Tensor) -> torch.Tensor:
        grad = input_gradient(grad_out, self.weight_int8, self.weight_scale)
        return self._to_rotated_basis(grad)  # d/dx of (x H) is grad H

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation_block:
            x = block_hadamard(x, self.input_rotation_block)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        # oneDNN, FBGEMM and the weight-only kernel are CPU kernels; elsewhere (CUDA) torch._int_mm, same numerics
        kernel = self.kernel_for(x2.shape[0]) if x2.device.type == "cpu" else "int-mm"
        if self.share_input and kernel in ("onednn", "int-mm"):
            y = self._run_shared(kernel, x, x2)
        else:
            y = self.run_kernel(kernel, x2)
        y = y.to(x.dtype)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = self.kernel
        if kernel == "auto":
            kernel = f"auto (decode: {self.decode_kernel}, prefill: {self.prefill_kernel})"
        shared = ", input codes shared with siblings" if self.share_input else ""
        shared += describe_rotation(self.input_rotation_block)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=int8 per-channel, kernel={kernel}{shared}"
        )


def tune_kernels(model: nn.Module) -> dict[tuple[int, int], dict]:
    """Measure, once per layer shape, the fastest decode and prefill kernels of every ``auto`` layer.

    Records them on the layers (saved with the artifact) and returns
    ``{(in_features, out_features): {"decode_kernel": ..., "prefill_kernel": ..., "prefill_vs_float": ...}}``;
    prints one line when int8 prompt products lose to float on this CPU for most of the weights.
    Decode kernels are timed over several layers of the shape in turn, from
    cold caches, as a model runs them
    (:func:`ftq_plugins.int8.kernels.measure_kernels`, a fraction of a second
    per shape).  Choices are remembered in :mod:`ftq_plugins.int8.kernel_choices`
    (per CPU, thread count, torch version and shape), so quantizing the same
    shapes again on this machine measures nothing.
    """
    from tqdm.auto import tqdm

    from .kernel_choices import KernelChoices

    groups: dict[tuple[int, int], list[Int8DynamicLinear]] = {}
    for module in model.modules():
        if isinstance(module, Int8DynamicLinear) and module.kernel == "auto":
            groups.setdefault((module.in_features, module.out_features), []).append(module)
    remembered = KernelChoices.load()
    chosen: dict[tuple[int, int], dict] = {}
    for shape, modules in tqdm(groups.items(), desc="tune int8 kernels", unit="shape", leave=False,
                               disable=len(groups) < 2):
        chosen[shape] = remembered.get(shape, len(modules))
        if chosen[shape] is None:
            chosen[shape] = kernels.measure_kernels(modules[0], peers=modules)
            remembered.put(shape, len(modules), chosen[shape])
        kernels_of_shape = {k: chosen[shape][k] for k in ("decode_kernel", "prefill_kernel")}
        for module in modules:
            module.set_kernel("auto", decode_max_tokens=module.decode_max_tokens, **kernels_of_shape)
            module._derived.clear()  # packed forms of the kernels not chosen: rebuilt on use if ever needed
    remembered.save()
    _say_if_float_is_faster(chosen, groups)
    return chosen


def _say_if_float_is_faster(chosen: dict, groups: dict) -> None:
    """One line on stderr when this CPU's int8 prompt products, over the model's weights, lose to float's."""
    import sys

    # the model's whole prompt: float time over int8 time, each shape weighted by its weights' size
    weights = {shape: shape[0] * shape[1] * len(groups[shape]) for shape, c in chosen.items() if "prefill_vs_float" in c}
    int8_time = sum(w / chosen[shape]["prefill_vs_float"] for shape, w in weights.items())
    if weights and int8_time > sum(weights.values()):
        print(f"ftq: note: on this CPU the int8 layers' prompt products run at {sum(weights.values()) / int8_time:.2f}x "
              f"the float product's speed (int8 still shrinks the model 4x and decodes faster); see "
              f"benchmarks/RESULTS.md for the CPU classes where int8 prefill wins", file=sys.stderr)
