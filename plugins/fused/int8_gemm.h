// ftq's exact int8 GEMM for CPUs whose int8 products torch runs slowly.
//
//   out[m, n] = sum_k x[m, k] * w[n, k]   (int32; x and w signed int8 codes in [-127, 127])
//
// Both operands are read row-major along k, as the model stores its int8 weights [n, k] and
// per-token codes [m, k]: no packed copy of the weight exists.  The sums are exact integers,
// so the result equals torch._int_mm's bit for bit whichever kernel computes it.
//
// Why it exists: on CPUs without AVX512-VNNI (AVX2 only: AMD Zen 1-3, Intel client cores
// before AVX512), torch 2.13's _int_mm runs oneDNN's reference code for more than one row
// (52x slower than the float product of the same shape on a Zen 3 EPYC).
//
// The kernels, one per instruction set, live in int8_gemm_kernels.h (no torch there, so a
// self-test can run them alone, under qemu for ARM); this file spreads them over ATen's threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "int8_gemm_kernels.h"

namespace ftq_gemm {

// out [m, n] = x [m, k] @ w [n, k]^T, all row-major, over ATen's thread pool: tasks are blocks
// of code rows times blocks of weight rows, so a narrow layer (few weight rows) still spreads.
inline void gemm(const int8_t* x, int64_t m, int64_t k, const int8_t* w, int64_t n, int32_t* out) {
  const int64_t blocks_m = (m + kBlockM - 1) / kBlockM, blocks_n = (n + kBlockN - 1) / kBlockN;
  at::parallel_for(0, blocks_m * blocks_n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) gemm_task(x, m, k, w, n, out, t);
  });
}

}  // namespace ftq_gemm
