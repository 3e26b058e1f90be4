// The kernels of ftq's exact int8 GEMM (int8_gemm.h), one per instruction set, with no torch in
// sight: the library includes them, and so does a stand-alone self-test (int8_gemm_selftest.cpp)
// that runs them under qemu for ARM.
//
//   out[m, n] = sum_k x[m, k] * w[n, k]   (int32; x and w signed int8 codes in [-127, 127])
//
// One is compiled in, by the target's instruction set:
//  * avx2    -- 32 codes a step with the sign trick llama.cpp's x86 quants use:
//               maddubs(|x|, sign(w, x)) multiplies unsigned by signed bytes into pairs of
//               int16 sums, which cannot saturate because |code| <= 127
//               (2 * 127 * 127 = 32258 < 32767); madd by ones widens them to int32.
//               Signed codes, zero point 0: nothing is taken off afterwards (AVX512-VNNI's
//               vpdpbusd wants unsigned activations, code + 128, and the decoder's own
//               kernels subtract 128 * rowsum(W); that convention stays there).
//  * neon    -- ARMv8.2 dot product: vdotq_s32 multiplies signed by signed bytes, four
//               products into each int32 lane (Graviton 2+, Ampere, Apple silicon);
//               plain ARMv8 NEON widens with vmull_s8 and adds pairs with vpadalq_s16.
//  * generic -- plain int32 loops (the compiler vectorizes what the target allows); the
//               reference every other kernel is tested against.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#define FTQ_GEMM_AVX2 1
#else
#define FTQ_GEMM_AVX2 0
#endif

#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define FTQ_GEMM_NEON 1
#else
#define FTQ_GEMM_NEON 0
#endif

namespace ftq_gemm {

inline const char* isa() {
#if FTQ_GEMM_AVX2
  return "avx2";
#elif FTQ_GEMM_NEON && defined(__ARM_FEATURE_DOTPROD)
  return "neon-dotprod";
#elif FTQ_GEMM_NEON
  return "neon";
#else
  return "generic";
#endif
}

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
#elif FTQ_GEMM_NEON
// Four int32 lanes of partial sums of 16 codes times 16 codes.
inline int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(acc, a, b);
#else
  const int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));  // |product| <= 16129: fits int16
  const int16x8_t hi = vmull_high_s8(a, b);
  return vpadalq_s16(vpadalq_s16(acc, lo), hi);
#endif
}

template <int MT, int RT>
inline void tile(const int8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k, int32_t* out, int64_t ldo) {
  int32x4_t acc[MT][RT];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) acc[m][r] = vdupq_n_s32(0);
  int64_t kk = 0;
  for (; kk + 16 <= k; kk += 16) {
    int8x16_t wv[RT];
    for (int r = 0; r < RT; ++r) wv[r] = vld1q_s8(w + r * ldw + kk);
    for (int m = 0; m < MT; ++m) {
      const int8x16_t xv = vld1q_s8(x + m * ldx + kk);
      for (int r = 0; r < RT; ++r) acc[m][r] = dot16(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r)
      out[m * ldo + r] = vaddvq_s32(acc[m][r]) + dot_generic(x + m * ldx + kk, w + r * ldw + kk, k - kk);
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

// The GEMM is cut into blocks of kBlockM code rows times kBlockN weight rows; task t of
// blocks_m * blocks_n (weight blocks fastest) computes one.
constexpr int64_t kBlockM = 64, kBlockN = 64;

inline void gemm_task(const int8_t* x, int64_t m, int64_t k, const int8_t* w, int64_t n, int32_t* out, int64_t t) {
  const int64_t blocks_n = (n + kBlockN - 1) / kBlockN;
  const int64_t bn = t % blocks_n, bm = t / blocks_n;
  block(x, k, w, n, out, bm * kBlockM, std::min(m, (bm + 1) * kBlockM), bn * kBlockN, std::min(n, (bn + 1) * kBlockN));
}

}  // namespace ftq_gemm
