"""The int8 matrix-multiply paths ftq's int8 layers run on, and how ``auto`` picks one.

Three real int8 kernels torch ships for CPUs (measured on an Emerald
Rapids-class CPU with AMX, torch 2.13; see ``benchmarks/``):

* ``onednn`` -- activations quantized per token to int8 on the fly, then
  oneDNN's int8 GEMM on a weight packed once for it
  (``torch.ops.onednn.qlinear_prepack`` / ``qlinear_pointwise``, the kernels
  Inductor's x86 int8 path uses), which also applies the per-channel weight
  scales.  Usually the fastest path: packing once saves the weight reorder
  ``torch._int_mm`` does on every call.
* ``int-mm`` -- the same numerics through ``torch._int_mm`` (int32 out, then
  rescaled), or where that is slow (AVX2-only CPUs) an exact equal of it
  (:mod:`.exact_matmul`: ftq's native GEMM, or the float GEMM on the codes).
  Portable (also CUDA); the fallback where oneDNN is missing.
* ``fbgemm`` -- one row only: FBGEMM's dynamic int8 linear
  (``torch.ops.quantized.linear_dynamic`` on a weight packed once), whose
  activation scale is per tensor, which for one row is per token (asymmetric
  uint8, full 8-bit range).  Often the fastest for one token; with more rows
  the layer runs its prefill kernel instead.
* ``weight-only`` -- int8 weights times bf16 activations
  (``torch.ops.aten._weight_int8pack_mm``), dequantizing inside the kernel;
  nothing is quantized at run time.  Competitive for one token on narrow
  layers, far slower with many tokens (a GEMV-style kernel).  More accurate
  than per-token (only the weights are rounded).

``auto`` runs, for decode (up to ``decode_max_tokens`` rows) and for prefill
(more), the kernel of ftq's W8A8 numerics (:data:`AUTO_KERNELS`) a short
measurement at quantization time found fastest for that layer's shape
(:func:`measure_kernels`); the choices are stored with the layer.
All paths read the same int8 weight and per-channel scales.
"""

from __future__ import annotations

import contextlib
import time
from typing import NamedTuple

import torch

from ftq_core.cpu_features import cpu_has_amx

from .exact_matmul import int8_matmul
from .numerics import quantize_rows_symmetric, scale_from_absmax

__all__ = [
    "KERNELS",
    "DECODE_MAX_TOKENS",
    "cpu_has_amx",
    "onednn_available",
    "weight_only_supported",
    "resolve_kernel",
    "int_mm_int8",
    "int_mm_codes",
    "signed_codes",
    "ActivationCodes",
    "onednn_pack",
    "onednn_codes",
    "onednn_int8",
    "onednn_int8_codes",
    "weight_only_int8",
    "AUTO_KERNELS",
    "measure_kernels",
    "DECODE_PROBE_BYTES",
    "DECODE_PROBE_LAYERS",
    "DECODE_EVICT_BYTES",
]

#: Kernel choices an int8 layer accepts.
KERNELS = ("auto", "onednn", "int-mm", "fbgemm", "weight-only")

#: ``auto`` treats this many rows or fewer as decode (one token per sequence,
#: small batches) and more as prefill.
DECODE_MAX_TOKENS = 8


def onednn_available() -> bool:
    """Whether this torch has oneDNN's int8 linear ops and they run a real kernel on this CPU.

    On CPUs without AMX (AVX512-VNNI only, e.g. AMD EPYC), torch 2.13's
    ``qlinear_pointwise`` with per-token activation scales falls to oneDNN's
    reference implementation (``ONEDNN_VERBOSE`` shows ``ref_int8``): about a
    second for a 256x576x576 layer that ``int-mm`` does in a millisecond.
    There ``onednn`` is never chosen, and layers recorded with it run ``int-mm``
    (same numerics).
    """
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack") and cpu_has_amx()


def fbgemm_engine() -> str | None:
    """The quantized engine whose packed weights run FBGEMM kernels, if this torch has one."""
    supported = torch.backends.quantized.supported_engines
    return next((engine for engine in ("x86", "fbgemm") if engine in supported), None)


@contextlib.contextmanager
def quantized_engine(engine: str | None):
    """Run the block with torch's global quantized engine set to ``engine`` (``None``: left as it is), then restore it.

    torch.ao packs weights and picks kernels by that global setting.
    """
    before = torch.backends.quantized.engine
    if engine is not None:
        torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def weight_only_supported(in_features: int) -> bool:
    """Whether ``_weight_int8pack_mm`` handles this input width.

    torch 2.13's CPU kernel crashes the process (not an exception) when the
    reduction width is not a multiple of 8, so such layers never take that path.
    """
    return in_features % 8 == 0


def resolve_kernel(kernel: str, in_features: int) -> str:
    """A concrete kernel this process can run: unsupported choices fall back to ``int-mm`` (same numerics)."""
    if kernel == "onednn" and not onednn_available():
        return "int-mm"
    if kernel == "weight-only" and not weight_only_supported(in_features):
        return "int-mm"
    if kernel == "fbgemm" and fbgemm_engine() is None:
        return "int-mm"
    return kernel


#: ``torch._int_mm`` on CUDA needs more than this many rows.
CUDA_INT_MM_MIN_ROWS = 16


def int_mm_int8(x2: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``x2 [M, K]`` float × ``weight_int8 [N, K]`` → float32 ``[M, N]`` via ``torch._int_mm``."""
    return int_mm_codes(signed_codes(x2), weight_int8, weight_scale)


def signed_codes(x2: torch.Tensor) -> "ActivationCodes":
    """``x2 [M, K]`` quantized per token as :func:`int_mm_codes` takes it (signed int8, zero point 0)."""
    return ActivationCodes(*quantize_rows_symmetric(x2), 0)


def int_mm_codes(codes: "ActivationCodes", weight_int8: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """:func:`int_mm_int8` on activations already quantized (signed int8 codes, zero point 0)."""
    values = codes.values
    rows = values.shape[0]
    if values.is_cuda and rows <= CUDA_INT_MM_MIN_ROWS:  # CUDA's int8 GEMM takes more rows: pad with zero rows
        values = torch.nn.functional.pad(values, (0, 0, 0, CUDA_INT_MM_MIN_ROWS + 1 - rows))
    # torch._int_mm or, where that is slow (AVX2-only CPUs), an exact equal of it: see exact_matmul
    acc = int8_matmul(values, weight_int8)[:rows]
    return acc.float().mul_(codes.scale).mul_(weight_scale)


def onednn_pack(weight_int8: torch.Tensor) -> torch.Tensor:
    """``weight_int8 [N, K]`` packed into oneDNN's blocked layout (an opaque tensor, never saved)."""
    return torch.ops.onednn.qlinear_prepack(weight_int8, None)


#: For a few rows oneDNN gets the per-token int8 values shifted to uint8 (zero
#: point 128): the same numerics, and in torch 2.13 signed int8 activations hit
#: a slow path for one row through layers of <= 256 outputs (3.7 ms instead of
#: 0.04 ms for 576->192).  Many rows stay int8: the shift is one more pass.
ONEDNN_ZERO_POINT = 128
ONEDNN_UINT8_MAX_ROWS = 8


class ActivationCodes(NamedTuple):
    """Per-token quantized activations: ``x ≈ (values - zero_point) * scale``.

    ``values [M, K]`` int8 (``zero_point`` 0) or uint8 (``zero_point``
    :data:`ONEDNN_ZERO_POINT`), ``scale [M, 1]`` float32.
    """

    values: torch.Tensor
    scale: torch.Tensor
    zero_point: int


def onednn_codes(x2: torch.Tensor) -> ActivationCodes:
    """``x2 [M, K]`` float quantized per token in the form :func:`onednn_int8` feeds oneDNN.

    Signed int8 above :data:`ONEDNN_UINT8_MAX_ROWS` rows (then equal to what
    ``int-mm`` uses), shifted to uint8 for fewer rows.
    """
    x = x2.float()
    scale = scale_from_absmax(x.abs().amax(dim=-1, keepdim=True))
    scaled = torch.div(x, scale)  # |x / scale| <= 127 up to rounding
    if x.shape[0] <= ONEDNN_UINT8_MAX_ROWS:
        return ActivationCodes(scaled.add_(ONEDNN_ZERO_POINT).round_().to(torch.uint8), scale, ONEDNN_ZERO_POINT)
    return ActivationCodes(scaled.round_().to(torch.int8), scale, 0)


def onednn_int8(x2: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor) -> torch.Tensor:
    """``x2 [M, K]`` float × packed int8 weight → float32 ``[M, N]``.

    oneDNN applies the per-channel weight scales inside the GEMM; the
    per-token activation scales (which it cannot take) are one pass after.
    """
    return onednn_int8_codes(onednn_codes(x2), packed, weight_scale, weight_zero)


def onednn_int8_codes(
    codes: ActivationCodes, packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor
) -> torch.Tensor:
    """:func:`onednn_int8` on activations already quantized by :func:`onednn_codes`."""
    out = torch.ops.onednn.qlinear_pointwise(
        codes.values, 1.0, codes.zero_point, packed, weight_scale, weight_zero,
        None, 1.0, 0, torch.float32, "none", [], "",
    )
    return out.mul_(codes.scale)


def fbgemm_pack(weight_int8: torch.Tensor, weight_scale: torch.Tensor):
    """FBGEMM's packed form of the per-channel int8 weight (an opaque object, never saved)."""
    import warnings

    zero = torch.zeros(weight_scale.shape, dtype=torch.long)
    with warnings.catch_warnings():  # torch warns that quantized tensors are deprecated; FBGEMM's packer takes one
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(weight_int8, weight_scale.double(), zero, 0)
    with quantized_engine(fbgemm_engine()):  # packing follows the global engine
        return torch.ops.quantized.linear_prepack(qweight, None)


def fbgemm_int8(x2: torch.Tensor, packed) -> torch.Tensor:
    """One row ``x2 [1, K]`` float × FBGEMM-packed int8 weight → float32 ``[1, N]`` (full-range uint8 activation)."""
    return torch.ops.quantized.linear_dynamic(x2.float(), packed, False)


def weight_only_int8(x2: torch.Tensor, weight_int8: torch.Tensor, scale_bf16: torch.Tensor) -> torch.Tensor:
    """``x2 [M, K]`` float × ``weight_int8 [N, K]`` → bf16 ``[M, N]``, dequantizing in the kernel."""
    return torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), weight_int8, scale_bf16)


def _interleaved_min_seconds(fns: dict, repeats: int, budget_s: float = 0.3, before=None) -> dict:
    """Best time of each callable over up to ``repeats`` turns (at least 3; fewer once
    ``budget_s`` is spent), run in turns so that load from other processes hits every
    candidate alike (minimums resist such noise best).  ``before`` runs, untimed,
    before each timed call (its time counts against ``budget_s``)."""
    for fn in fns.values():
        fn()  # warm-up: packing, first-call allocations
    best = {name: float("inf") for name in fns}
    spent = 0.0
    for turn in range(repeats):
        for name, fn in fns.items():
            ready = time.perf_counter()
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            best[name] = min(best[name], elapsed)
            spent += elapsed + (start - ready)
        if turn >= 2 and spent > budget_s:
            break
    return best


#: Another kernel must beat ``onednn`` by this factor to be chosen: measurements
#: on a busy machine are noisy, and ``onednn`` otherwise wins or ties.
MARGIN = 0.9

#: Rows ``auto`` measures prefill with.
PREFILL_PROBE_TOKENS = 64


#: Bytes (and count) of same-shape int8 layers :func:`measure_kernels` runs in
#: turn for one decode timing, and at most how much other data it reads first
#: to push them out of the caches.  A model streams its weights from memory
#: while decoding (each layer's weight was evicted by the others since its last
#: use); a layer timed again and again sits in cache and flatters kernels that
#: do little work per byte: on SmolLM2 ``weight-only`` timed 30% faster than
#: ``fbgemm`` on 8 warm layers and 45% slower on all 60 of the shape (and in
#: the model).
DECODE_PROBE_BYTES = 16 * 2**20
DECODE_PROBE_LAYERS = 8
DECODE_EVICT_BYTES = 64 * 2**20


#: Kernels ``auto`` chooses among: those computing ftq's W8A8 numerics (per-token symmetric int8
#: activations, exact int32 sums).  ``fbgemm`` (asymmetric uint8 activations) and ``weight-only``
#: (bf16 activations) round differently: a model choosing them by machine would give other greedy
#: tokens on another CPU and in the fused decoder, so they run only when asked for by name.
AUTO_KERNELS = ("onednn", "int-mm")


def measure_kernels(layer, *, repeats: int = 15, peers=None) -> dict:
    """``{"decode_kernel": ..., "prefill_kernel": ..., "prefill_vs_float": ...}`` measured for ``layer`` (an Int8DynamicLinear).

    Decode (1 row) and prefill (:data:`PREFILL_PROBE_TOKENS` rows) each pick
    the fastest of :data:`AUTO_KERNELS` this machine runs.  ``peers``
    (same-shape layers of the model, ``layer`` included) are run in turn for
    each decode timing, from cold caches, as decoding does (see
    :data:`DECODE_PROBE_BYTES`).  ``prefill_vs_float`` is the float32 product
    of the same shape's time over the chosen prefill kernel's (above 1: int8
    is faster), measured in the same turns.  Runs at torch's current thread
    count, the one inference should use.  Takes milliseconds to a fraction of
    a second per layer shape; callers cache per shape.
    """
    peers = list(peers or [layer])
    per_layer = layer.in_features * layer.out_features
    decode_layers = peers[: max(1, min(DECODE_PROBE_LAYERS, DECODE_PROBE_BYTES // per_layer))]
    # Reading other data pushes the layers' weights out of the caches: a few
    # times what the model has of this shape (so tiny models stay quick).
    scratch = torch.ones(min(DECODE_EVICT_BYTES, 4 * per_layer * len(peers)) // 4 + 1)
    evict = scratch.sum
    float_weight = torch.randn(layer.out_features, layer.in_features)
    result = {}
    for phase, tokens, layers, before in (
        ("decode_kernel", 1, decode_layers, evict),
        ("prefill_kernel", PREFILL_PROBE_TOKENS, [layer], None),
    ):
        candidates = [k for k in AUTO_KERNELS if resolve_kernel(k, layer.in_features) == k]
        x = torch.randn(tokens, layer.in_features)

        def run(kernel, layers=layers):
            for each in layers:
                each.run_kernel(kernel, x)

        timed = {k: (lambda k=k: run(k)) for k in candidates}
        if phase == "prefill_kernel":
            timed["float"] = lambda: x @ float_weight.t()
        with torch.inference_mode():
            best = _interleaved_min_seconds(timed, repeats, before=before)
        float_seconds = best.pop("float", None)
        fastest = min(best, key=best.get)
        keep_default = "onednn" in best and best[fastest] >= MARGIN * best["onednn"]
        result[phase] = "onednn" if keep_default else fastest
        if float_seconds is not None:
            result["prefill_vs_float"] = round(float_seconds / best[result[phase]], 3)
    return result
