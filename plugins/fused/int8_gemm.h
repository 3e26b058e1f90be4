// ftq's exact int8 GEMM for CPUs whose int8 products torch runs slowly.
//
//   out[m, n] = sum_k x[m, k] * w[n, k]   (int32; x and w signed int8 codes in [-127, 127])
//
// Both operands are read row-major along k, as the model stores its int8 weights [n, k] and
// per-token codes [m, k]: no packed copy of the weight exists.  The sums are exact integers,
// so the result equals torch._int_mm's bit for bit whichever kernel below computes it.
//
// Why it exists: on CPUs without AVX512-VNNI (AVX2 only: AMD Zen 1-3, Intel client cores
// before AVX512), torch 2.13's _int_mm runs oneDNN's reference code for more than one row
// (52x slower than the float product of the same shape on a Zen 3 EPYC).
//
// Kernels, chosen when the library is compiled (ftq_plugins.fused.build: FTQ_FUSED_ISA):
//  * avx2    -- 32 codes a step with the sign trick llama.cpp's x86 quants use:
//               maddubs(|x|, sign(w, x)) multiplies unsigned by signed bytes into pairs of
//               int16 sums, which cannot saturate because |code| <= 127
//               (2 * 127 * 127 = 32258 < 32767); madd by ones widens them to int32.
//               The zero point stays 0: nothing is taken off afterwards.
//  * generic -- plain int32 loops (the compiler vectorizes what the target allows); the
//               reference every other kernel is tested against.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#define FTQ_GEMM_AVX2 1
#else
#define FTQ_GEMM_AVX2 0
#endif

namespace ftq_gemm {

inline const char* isa() { return FTQ_GEMM_AVX2 ? "avx2" : "generic"; }

inline int32_t dot_generic(const int8_t* x, const int8_t* w, int64_t k) {
  int32_t acc = 0;
  for (int64_t i = 0; i < k; ++i) acc += static_cast<int32_t>(x[i]) * static_cast<int32_t>(w[i]);
  return acc;
}

#if FTQ_GEMM_AVX2
inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// A tile of MT code rows against RT weight rows: MT * RT int32 dot products over k.
template <int MT, int RT>
inline void tile(const int8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k, int32_t* out, int64_t ldo) {
  __m256i acc[MT][RT];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) acc[m][r] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t kk = 0;
  for (; kk + 32 <= k; kk += 32) {
    __m256i wv[RT];
    for (int r = 0; r < RT; ++r) wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + kk));
    for (int m = 0; m < MT; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * ldx + kk));
      const __m256i ax = _mm256_sign_epi8(xv, xv);  // |x|: codes are never -128
      for (int r = 0; r < RT; ++r) {
        const __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[r], xv));
        acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r)
      out[m * ldo + r] = hsum(acc[m][r]) + dot_generic(x + m * ldx + kk, w + r * ldw + kk, k - kk);
}
#else
template <int MT, int RT>
inline void tile(const int8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k, int32_t* out, int64_t ldo) {
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) out[m * ldo + r] = dot_generic(x + m * ldx, w + r * ldw, k);
}
#endif

// Code rows [m0, m1) against weight rows [n0, n1).  Four code rows (a few KB) stay in L1 while
// the block's weight rows stream from L2.
inline void block(const int8_t* x, int64_t k, const int8_t* w, int64_t n, int32_t* out, int64_t m0, int64_t m1,
                  int64_t n0, int64_t n1) {
  constexpr int MT = 4, RT = 2;
  int64_t m = m0;
  for (; m + MT <= m1; m += MT) {
    int64_t r = n0;
    for (; r + RT <= n1; r += RT) tile<MT, RT>(x + m * k, k, w + r * k, k, k, out + m * n + r, n);
    for (; r < n1; ++r) tile<MT, 1>(x + m * k, k, w + r * k, k, k, out + m * n + r, n);
  }
  for (; m < m1; ++m) {
    int64_t r = n0;
    for (; r + RT <= n1; r += RT) tile<1, RT>(x + m * k, k, w + r * k, k, k, out + m * n + r, n);
    for (; r < n1; ++r) tile<1, 1>(x + m * k, k, w + r * k, k, k, out + m * n + r, n);
  }
}

// out [m, n] = x [m, k] @ w [n, k]^T, all row-major, over ATen's thread pool: tasks are blocks
// of code rows times blocks of weight rows, so a narrow layer (few weight rows) still spreads.
inline void gemm(const int8_t* x, int64_t m, int64_t k, const int8_t* w, int64_t n, int32_t* out) {
  constexpr int64_t kBlockM = 64, kBlockN = 64;
  const int64_t blocks_m = (m + kBlockM - 1) / kBlockM, blocks_n = (n + kBlockN - 1) / kBlockN;
  at::parallel_for(0, blocks_m * blocks_n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bn = t % blocks_n, bm = t / blocks_n;
      block(x, k, w, n, out, bm * kBlockM, std::min(m, (bm + 1) * kBlockM), bn * kBlockN,
            std::min(n, (bn + 1) * kBlockN));
    }
  });
}

}  // namespace ftq_gemm
