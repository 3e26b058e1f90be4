"""Fake-quantized Linear for quantization-aware training that matches :class:`Int8DynamicLinear`.

The numerics are those of the CPU int8 kernel the model converts to
(:mod:`ftq_plugins.int8.dynamic_linear`): each activation row (token) and each weight
output channel gets a symmetric scale ``amax(|row|) / 127`` computed in
float32, values are rounded half-to-even (``torch.round``) and clamped to
``[-127, 127]``.  Training sees ``round(v / s) * s`` in place of ``v``; the
gradient passes straight through (the straight-through estimator), so the
backward pass costs nothing beyond the ordinary Linear's.

Why this is fast and bf16-safe where ``torch.ao`` eager QAT is not:

* in float32 the layer computes exactly the int8 kernel's arithmetic (integer
  codes multiply exactly in float32), so the converted model's logits equal
  the trained model's bit for bit;
* under bf16 autocast, one autograd node per layer (the straight-through
  gradients are those of a Linear on the fake-quantized tensors) instead of a
  chain of differentiable ops;
* the fake-quantized tensors are produced directly in the matmul's dtype
  (bf16 under autocast), so autocast has nothing left to cast; a weight's is
  kept until the optimizer changes the weight, and layers reading the same
  activation (q/k/v, gate/up) share one -- in eager mode they also run as one
  GEMM on their stacked weights (:mod:`ftq_plugins.qat.sibling_groups`);
* on CUDA, each fake-quant (row max, divide, round, clamp, rescale, cast) is
  one Triton kernel (:mod:`ftq_plugins.qat.triton_kernels`), also inside a
  whole-model ``torch.compile`` where it is a custom op;
* no observers: activation scales are per token and dynamic, weight scales
  come from the weights themselves, so nothing is synchronised with the host
  and data-parallel ranks agree by construction.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ftq_plugins.int8.hadamard import block_hadamard, check_rotation_block, describe_rotation, to_rotated_basis
from ftq_plugins.int8.numerics import symmetric_codes
from ftq_plugins.int8.tensor_identity import LastTensorMemo, parameter_state

__all__ = [
    "fake_quant_rows",
    "fake_quant_rows_fast",
    "fake_quant_rows_ste",
    "shared_fake_quant",
    "QATLinearFunction",
    "Int8QATLinear",
]


def fake_quant_rows(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` of :func:`~ftq_plugins.int8.numerics.symmetric_codes`, returned in ``out_dtype``."""
    codes, scale = symmetric_codes(x)
    return (codes * scale).to(out_dtype)


#: :mod:`ftq_plugins.qat.triton_kernels` once loaded (CUDA PyTorch ships Triton), else None.
_TRITON = None


@functools.cache
def load_fused_kernel() -> bool:
    """Import the Triton kernel if this PyTorch has Triton and a GPU; whether it is available."""
    global _TRITON
    if not torch.cuda.is_available():
        return False
    try:
        from . import triton_kernels
    except ImportError:
        return False
    _TRITON = triton_kernels
    return True


def fake_quant_rows_fast(x: torch.Tensor, out_dtype: torch.dtype, fused: bool) -> torch.Tensor:
    """:func:`fake_quant_rows`, as one Triton kernel where it can run (``fused``, CUDA, rows that fit), else torch ops."""
    kernel = _TRITON
    if fused and kernel is not None and x.is_cuda and x.shape[-1] <= kernel.MAX_ROW:
        if torch.compiler.is_compiling():
            # an opaque custom op keeps the exact arithmetic inside compiled graphs
            return torch.ops.ftq.fake_quant_rows(x, out_dtype)
        return kernel.fake_quant_rows_cuda(x, out_dtype)
    return fake_quant_rows(x, out_dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Fake-quant forward, identity backward (straight-through estimator).

    The scale is ``amax / 127``, so ``|x / s| <= 127`` and the clamp never
    cuts a value: the straight-through gradient needs no mask.
    """

    @staticmethod
    def forward(ctx, x, out_dtype, fused):
        ctx.input_dtype = x.dtype
        return fake_quant_rows_fast(x, out_dtype, fused)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.input_dtype), None, None


class QATLinearFunction(torch.autograd.Function):
    """``linear(x_fq, w_fq, b)`` in the compute dtype, with straight-through gradients to ``x`` and each weight and bias.

    ``x_fq`` and ``w_fq`` are the fake-quantized tensors, computed outside
    (and shared or cached there) without autograd.  ``w_fq`` stacks, by output
    rows (``sizes``), the weights of one layer or of sibling layers that read
    the same input (:mod:`ftq_plugins.qat.sibling_groups`); ``params`` are
    their ``weights`` then their ``biases`` (``None`` where a layer has none).
    One node carries the gradients: ``dx = g @ w_fq``, ``dW = g.T @ x_fq``,
    ``db = sum(g)``, split back by layer, each returned in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, x_fq, w_fq, sizes, *params):
        count = len(sizes)
        weights, biases = params[:count], params[count:]
        ctx.save_for_backward(x_fq, w_fq)
        ctx.sizes = sizes
        ctx.x_dtype = x.dtype
        ctx.weight_dtypes = [w.dtype for w in weights]
        ctx.bias_dtypes = [None if b is None else b.dtype for b in biases]
        return nn.functional.linear(x_fq, w_fq, _stacked_bias(biases, sizes, w_fq))

    @staticmethod
    def backward(ctx, grad):
        x_fq, w_fq = ctx.saved_tensors
        grad = grad.to(w_fq.dtype)
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = (grad @ w_fq).to(ctx.x_dtype)
        grad_w = rows.t() @ x_fq.reshape(-1, x_fq.shape[-1])
        grad_weights = [g.to(dtype) for g, dtype in zip(grad_w.split(ctx.sizes, 0), ctx.weight_dtypes)]
        grad_biases: list = [None] * len(ctx.sizes)
        if any(dtype is not None for dtype in ctx.bias_dtypes):
            sums = rows.sum(0, dtype=torch.float32).split(ctx.sizes)
            grad_biases = [None if dtype is None else s.to(dtype) for s, dtype in zip(sums, ctx.bias_dtypes)]
        return (grad_x, None, None, None, *grad_weights, *grad_biases)


def _stacked_bias(biases, sizes, like: torch.Tensor) -> torch.Tensor | None:
    """The layers' biases one after another in ``like``'s dtype (zeros for a layer without); ``None`` if none has one."""
    if all(b is None for b in biases):
        return None
    if len(biases) == 1:
        return biases[0].to(like.dtype)
    return torch.cat([
        torch.zeros(size, dtype=like.dtype, device=like.device) if b is None else b.to(like.dtype)
        for b, size in zip(biases, sizes)
    ])


#: The last activation fake-quantized: layers reading the same tensor (q/k/v
#: projections, gate/up) reuse the result.
_LAST_ACTIVATION = LastTensorMemo()


def shared_fake_quant(x: torch.Tensor, dtype: torch.dtype, fused: bool) -> torch.Tensor:
    """The fake-quant of activation ``x`` without autograd, reused while the same unchanged ``x`` comes back."""
    if torch.compiler.is_compiling():  # the compiled graph dedupes identical calls itself
        with torch.no_grad():
            return fake_quant_rows_fast(x.detach(), dtype, fused)
    result = _LAST_ACTIVATION.get(x, (dtype, fused))
    if result is None:
        with torch.no_grad():
            result = fake_quant_rows_fast(x.detach(), dtype, fused)
        _LAST_ACTIVATION.put(x, (dtype, fused), result)
    return result


def fake_quant_rows_ste(x: torch.Tensor, out_dtype: torch.dtype | None = None, *, fused: bool = True) -> torch.Tensor:
    """Differentiable :func:`fake_quant_rows` with a straight-through gradient."""
    return _FakeQuantSTE.apply(x, out_dtype or x.dtype, fused)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmul will run in: autocast's for this device if enabled, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _Int8LinearExactSTE(torch.autograd.Function):
    """The float32 path: ``(codes_x @ codes_w.T) * s_x * s_w + b``, the int8 kernel's own arithmetic.

    Integer codes are exact in float32 and so are their dot products (below
    2**24), so the forward pass is bit for bit :class:`Int8DynamicLinear`'s
    (same multiplications in the same order).  The backward pass is the
    straight-through one: that of a Linear on the dequantized tensors.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        codes_x, scale_x = symmetric_codes(x2)
        codes_w, scale_w = symmetric_codes(weight)
        y = (codes_x @ codes_w.t()).mul_(scale_x).mul_(scale_w.reshape(-1))
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(codes_x, scale_x, codes_w, scale_w)
        ctx.shape, ctx.has_bias = x.shape, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        codes_x, scale_x, codes_w, scale_w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = (g @ (codes_w * scale_w)).reshape(ctx.shape)
        grad_w = g.t() @ (codes_x * scale_x)
        grad_b = g.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


class Int8QATLinear(nn.Module):
    """A Linear (or GPT-2 ``Conv1D``) trained through int8 per-token × per-channel fake-quant.

    It keeps the original ``weight`` and ``bias`` parameters (same objects, so
    tied weights stay tied and checkpoints keep their shapes); ``transposed``
    marks a ``Conv1D`` weight stored ``[in, out]``.  :meth:`to_int8` gives the
    :class:`Int8DynamicLinear` that computes what this module trained on.
    With ``input_rotation_block`` the input is rotated by block Hadamard
    matrices first and ``weight`` holds ``W H`` (a rotated model's ``down_proj``;
    :mod:`ftq_plugins.int8.hadamard`): training and the int8 layer round the same tensors.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, *, transposed: bool = False, fused: bool = True,
                 input_rotation_block: int = 0):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.transposed = transposed
        self.fused = fused
        if input_rotation_block and transposed:
            raise ValueError("an online input rotation is for Linear layers, not GPT-2's Conv1D")
        self.input_rotation_block = check_rotation_block(input_rotation_block, weight.shape[-1])
        self.out_features, self.in_features = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        # The weight's fake-quant changes only when the optimizer (or a load)
        # writes the weight: it is kept here, keyed by the weight's state
        # (:func:`~ftq_plugins.int8.tensor_identity.parameter_state`) and the compute dtype, and reused until then.
        self._weight_fq: torch.Tensor | None = None
        self._weight_fq_key: tuple | None = None
        # (SiblingGroup, index) when layers reading the same input train as one GEMM
        # (:mod:`ftq_plugins.qat.sibling_groups`); None for a layer on its own
        self._group: tuple | None = None
        if fused:
            load_fused_kernel()

    @classmethod
    def from_float(cls, module: nn.Module, *, fused: bool = True, input_rotation_block: int = 0) -> "Int8QATLinear":
        """Wrap an ``nn.Linear`` or ``Conv1D`` (its parameters are shared, not copied).

        With ``input_rotation_block`` the Linear's weight is turned into ``W H`` in place first.
        """
        if input_rotation_block:
            with torch.no_grad():
                weight = module.weight
                weight.copy_(to_rotated_basis(weight.float(), input_rotation_block).to(weight.dtype))
        return cls(module.weight, module.bias, transposed=not isinstance(module, nn.Linear), fused=fused,
                   input_rotation_block=input_rotation_block)

    def weight_out_in(self) -> torch.Tensor:
        """The float weight as ``[out_features, in_features]`` (a view for ``Conv1D``)."""
        return self.weight.t() if self.transposed else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation_block:
            # in float32 whatever autocast says: the rotation mixes a block's largest inputs into every
            # channel, and in bf16 its rounding would land on the small ones the int8 grid must keep
            autocast_on, x_dtype = torch.is_autocast_enabled(x.device.type), x.dtype
            with torch.autocast(x.device.type, enabled=False):
                x = block_hadamard(x.float(), self.input_rotation_block)
            if not autocast_on:  # a model held in bf16 keeps computing in bf16
                x = x.to(x_dtype)
        dtype = _compute_dtype(x)
        if dtype is torch.float32 and x.dtype is torch.float32 and self.weight.dtype is torch.float32:
            return _Int8LinearExactSTE.apply(x, self.weight_out_in(), self.bias)
        # bf16 (autocast): the matmul sees the dequantized tensors in bf16,
        # produced directly by the fused fake-quant
        if self._group is not None and not torch.compiler.is_compiling():
            group, index = self._group
            return group.forward(index, x, dtype)
        w_fq = self._fake_quant_weight(dtype)
        x_fq = shared_fake_quant(x, dtype, self.fused)
        return QATLinearFunction.apply(x, x_fq, w_fq, (self.out_features,), self.weight_out_in(), self.bias)

    def _fake_quant_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight's fake-quant without autograd, recomputed only after the weight changed."""
        if torch.compiler.is_compiling():  # the compiled graph recomputes it every step
            with torch.no_grad():
                return fake_quant_rows_fast(self.weight_out_in().detach(), dtype, self.fused)
        key = (parameter_state(self.weight), dtype)
        if key != self._weight_fq_key:
            with torch.no_grad():
                self._weight_fq = fake_quant_rows_fast(self.weight_out_in().detach(), dtype, self.fused)
            self._weight_fq_key = key
        return self._weight_fq

    def to_int8(self, kernel: str = "int-mm") -> nn.Module:
        """The :class:`Int8DynamicLinear` with this layer's int8 weight, on the CPU.

        ``int-mm`` by default: it applies the scales in float32 exactly as the
        fake-quant does, so the converted model's outputs equal the trained
        model's bit for bit.  ``auto``/``onednn`` are faster and differ only in
        float rounding of the rescale.
        """
        from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear

        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight = nn.Parameter(self.weight_out_in().detach().float().cpu().contiguous())
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias.detach().float().cpu())
        return Int8DynamicLinear.from_float(linear, kernel=kernel, input_rotation_block=self.input_rotation_block,
                                            weight_rotated=True)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fake-quant: int8 per-token activation, int8 per-channel weight, fused={self.fused}"
            + describe_rotation(self.input_rotation_block)
        )
