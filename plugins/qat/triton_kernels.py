"""The fake-quant of :mod:`ftq_plugins.qat.fake_quant` as one Triton kernel, for CUDA tensors.

One program per row: load the row, take ``amax(|row|)``, divide by the scale
with correctly rounded division (``tl.div_rn``, as PyTorch's CPU and CUDA
kernels do; Triton's plain ``/`` is approximate and would move values across
rounding boundaries), round half to even (``rint``), clamp, rescale, and
store in the matmul's dtype: one read and one write of the tensor, one
launch.  The same kernel is registered as the custom op
``torch.ops.ftq.fake_quant_rows`` so a whole-model ``torch.compile`` calls it
as is instead of re-deriving (and approximating) the arithmetic.

Importing this module needs Triton (CUDA builds of PyTorch ship it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftq_plugins.int8.numerics import INT8_MAX, SCALE_FLOOR

try:  # Triton >= 3.0
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older Triton
    from triton.language.extra.cuda import libdevice

__all__ = ["MAX_ROW", "fake_quant_rows_cuda"]

#: Rows up to this many elements fit one program; longer rows use the torch ops.
MAX_ROW = 32768


@triton.jit
def _fake_quant_rows_kernel(
    x_ptr, out_ptr, n_cols, x_stride, out_stride, BLOCK: tl.constexpr, FLOOR: tl.constexpr, QMAX: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.div_rn(tl.maximum(amax, FLOOR), QMAX)
    q = libdevice.rint(tl.div_rn(x, scale))
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    tl.store(out_ptr + row * out_stride + cols, (q * scale).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, x2: torch.Tensor, out: torch.Tensor) -> None:
    n_rows, n_cols = x2.shape
    block = triton.next_power_of_2(n_cols)
    # the numerics' constants as compile-time values: the same rule as the CPU path, never a copy of it
    kernel[(n_rows,)](
        x2, out, n_cols, x2.stride(0), out.stride(0), BLOCK=block, FLOOR=SCALE_FLOOR, QMAX=float(INT8_MAX),
        num_warps=min(16, max(1, block // 256)),
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def fake_quant_rows_cuda(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`ftq_plugins.qat.fake_quant.fake_quant_rows` for a CUDA tensor, bit for bit, in one kernel."""
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    _launch(_fake_quant_rows_kernel, x2, out)
    return out.reshape(x.shape)


@torch.library.triton_op("ftq::fake_quant_rows", mutates_args=())
def _fake_quant_rows_op(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    _launch(torch.library.wrap_triton(_fake_quant_rows_kernel), x2, out)
    return out.reshape(x.shape)
