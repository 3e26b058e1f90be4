// ftq's fused int8 decoder for Llama-family models: one native call per step.
//
// Eager PyTorch runs a decode token of a small int8 Llama as ~700 small ops
// (norms, per-token quantize, rescale, rope, cache writes, SiLU * up, residual
// adds), each with dispatch and a thread fork/join; at batch 1 that overhead
// outweighs the int8 GEMMs.  Here one call runs every layer: the glue is plain
// loops over a few thousand floats, and the int8 products read the layers' own
// row-major int8 weights (no packed copy is kept: the weights are the model's
// memory): an AVX512-VNNI GEMV for a token, AMX tiles (or oneDNN) for a prompt.
// A token's stages run on one thread team that meets at spin barriers.
//
// Numerics are those of ftq_plugins.int8.numerics and Int8DynamicLinear:
// per-token symmetric int8 activations (scale = max(absmax, 1e-12) / 127,
// codes = round-half-even(x / scale)), per-channel int8 weights, int32
// accumulation, y = float(acc) * s_x * s_w (+ bias), in that order.  The
// int32 products are exact, so the projections equal torch._int_mm's given
// the same input; norms, softmax and SiLU may differ from ATen's in the last
// bit (another summation order), which can move an int8 code by one.
//
// Built by ftq_plugins.fused.build with -O3 -march=native -ffp-contract=off
// (no fused multiply-adds: rope and the rescale round as ATen does; AMX where the
// build machine has it, so the cache key holds the CPU's flags).

// The narrowest headers that declare what is used: torch/extension.h (all of libtorch's C++ API)
// takes twice as long to compile.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/utils/pybind.h>

#include <omp.h>

#include "int8_gemm.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define FTQ_VNNI 1
#else
#define FTQ_VNNI 0
#endif

#if FTQ_VNNI && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define FTQ_AMX 1
#else
#define FTQ_AMX 0
#endif

namespace {

constexpr float kInt8Max = 127.0f;
constexpr float kScaleFloor = 1e-12f;
// VNNI multiplies unsigned by signed bytes: activations are stored as code + 128
// and the 128 * rowsum(W) this adds is taken off afterwards (exact, integers).
constexpr int32_t kZeroPoint = 128;

bool amx_usable();

std::string isa_name() {
  if (FTQ_AMX && amx_usable()) return "avx512-vnni+amx-int8";
  return FTQ_VNNI ? "avx512-vnni" : ftq_gemm::isa();
}

// -- per-token quantization ------------------------------------------------------
// Codes are stored as code + zero_point in a byte (int8 when zero_point is 0).
// x / scale is divided, not multiplied by a reciprocal, and rounded half to even: torch.div
// then round, as ftq_plugins.int8.numerics does.
#if FTQ_VNNI
// The float lanes of elements [i, min(i + 16, n)): all 16 but at a row's tail.
inline __mmask16 lanes_left(int64_t n, int64_t i) {
  return n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
}

inline float quantize_row(const float* x, int64_t k, uint8_t* codes, int32_t zero_point) {
  __m512 amax_v = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mask = lanes_left(k, i);
    amax_v = _mm512_max_ps(amax_v, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, x + i)));
  }
  const float scale = std::max(_mm512_reduce_max_ps(amax_v), kScaleFloor) / kInt8Max;
  const __m512 scale_v = _mm512_set1_ps(scale);
  const __m512i zero_v = _mm512_set1_epi32(zero_point);
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mask = lanes_left(k, i);
    const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(mask, x + i), scale_v),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // code + zero point fits a byte (int8 two's complement when the zero point is 0): keep the low byte
    _mm_mask_storeu_epi8(codes + i, mask, _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(q), zero_v)));
  }
  return scale;
}
#else
inline float quantize_row(const float* x, int64_t k, uint8_t* codes, int32_t zero_point) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = std::max(amax, kScaleFloor) / kInt8Max;
  for (int64_t i = 0; i < k; ++i) {
    codes[i] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(x[i] / scale)) + zero_point);
  }
  return scale;
}
#endif

// float dot product and y += p * x (attention, norms)
#if FTQ_VNNI
inline float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float sum = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}
inline void axpy(float p, const float* x, float* y, int64_t n) {  // y += p * x
  const __m512 pv = _mm512_set1_ps(p);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += p * x[i];
}
#else
inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}
inline void axpy(float p, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += p * x[i];
}
#endif

// out = silu(g) * u.  ATen's float SiLU is x / (1 + exp(-x)) with SLEEF's exp (1 ulp) on
// whole vectors; the same vector code here gives the same floats, and scalar std::exp
// (errno rules keep the compiler from vectorizing it) cost a quarter of a prompt's time.
#if FTQ_VNNI
extern "C" __m512 Sleef_expf16_u10(__m512);  // exported by libtorch_cpu

inline void silu_times(const float* g, const float* u, int64_t n, float* out) {
  const __m512 one = _mm512_set1_ps(1.0f), sign = _mm512_set1_ps(-0.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = lanes_left(n, i);
    const __m512 x = _mm512_maskz_loadu_ps(mask, g + i);
    const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(one, Sleef_expf16_u10(_mm512_xor_ps(x, sign))));
    _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(mask, u + i)));
  }
}
#else
inline void silu_times(const float* g, const float* u, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}
#endif

// HF's LlamaRMSNorm in float32: x * rsqrt(mean(x^2) + eps) * w.
inline void rms_norm(const float* x, const float* w, int64_t k, float eps, float* out) {
  const float sum = dot(x, x, k);
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(k) + eps);
  for (int64_t i = 0; i < k; ++i) out[i] = w[i] * (x[i] * inv);
}

inline float round_bf16(float v) { return c10::BFloat16(v); }

// -- the int8 GEMM ------------------------------------------------------------------
// One projection of a group: weight [n, k] int8 row-major, its per-row scale,
// row sums (for the zero point) and optional bias; writes out[m * ld + col0 + n].
struct Projection {
  const int8_t* weight;
  const float* scale;
  const int32_t* rowsum;
  const float* bias;
  int64_t n;
  float* out;
  int64_t ld;
};

// y = float(acc) * s_x * s_w (+ bias), the rescale of every path
inline float rescale(int32_t acc, float sx, const Projection& p, int64_t n) {
  float y = static_cast<float>(acc) * sx;
  y = y * p.scale[n];
  if (p.bias) y = y + p.bias[n];
  return y;
}

#if FTQ_VNNI
constexpr int kPrefetchTiles = 3;

template <int MT, int RT>
inline void dot_tile(const uint8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k, int32_t* acc_out) {
  __m512i acc[MT][RT];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) acc[m][r] = _mm512_setzero_si512();
  // Later tiles' rows follow this one's in memory: fetch the one kPrefetchTiles ahead into L2,
  // a few lines per step (the hardware prefetchers see RT short streams, not one long one).
  // Three tiles ahead measured best on a 2-core EPYC (7.0 vs 9.0 ms a SmolLM2 token for one).
  const char* next = reinterpret_cast<const char*>(w + kPrefetchTiles * RT * ldw);
  int64_t kk = 0;
  for (; kk + 64 <= k; kk += 64) {
    __m512i wv[RT];
    for (int r = 0; r < RT; ++r) _mm_prefetch(next + (kk / 64) * RT * 64 + r * 64, _MM_HINT_T1);
    for (int r = 0; r < RT; ++r) wv[r] = _mm512_loadu_si512(w + r * ldw + kk);
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * ldx + kk);
      for (int r = 0; r < RT; ++r) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], xv, wv[r]);
    }
  }
  if (kk < k) {
    const __mmask64 mask = (k - kk) >= 64 ? ~0ULL : ((1ULL << (k - kk)) - 1);
    __m512i wv[RT];
    for (int r = 0; r < RT; ++r) wv[r] = _mm512_maskz_loadu_epi8(mask, w + r * ldw + kk);
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi8(mask, x + m * ldx + kk);
      for (int r = 0; r < RT; ++r) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) acc_out[m * RT + r] = _mm512_reduce_add_epi32(acc[m][r]);
}
#else
template <int MT, int RT>
inline void dot_tile(const uint8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k, int32_t* acc_out) {
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) {
      int32_t acc = 0;
      const uint8_t* xr = x + m * ldx;
      const int8_t* wr = w + r * ldw;
      for (int64_t i = 0; i < k; ++i) acc += static_cast<int32_t>(xr[i]) * static_cast<int32_t>(wr[i]);
      acc_out[m * RT + r] = acc;
    }
}
#endif

template <int MT, int RT>
inline void store_tile(const Projection& p, int64_t row, int64_t m0, const float* sx, const int32_t* acc) {
  for (int m = 0; m < MT; ++m) {
    float* out = p.out + (m0 + m) * p.ld;
    for (int r = 0; r < RT; ++r) {
      const int64_t n = row + r;
      out[n] = rescale(acc[m * RT + r] - kZeroPoint * p.rowsum[n], sx[m0 + m], p, n);
    }
  }
}

// Rows [row0, row1) of one projection against every token row.
template <int MT, int RT>
void project_rows(const Projection& p, const uint8_t* codes, const float* sx, int64_t m_rows, int64_t k, int64_t row0,
                  int64_t row1) {
  int32_t acc[MT * RT];
  int32_t acc1[MT];
  int64_t m0 = 0;
  for (; m0 + MT <= m_rows; m0 += MT) {
    int64_t row = row0;
    for (; row + RT <= row1; row += RT) {
      dot_tile<MT, RT>(codes + m0 * k, k, p.weight + row * k, k, k, acc);
      store_tile<MT, RT>(p, row, m0, sx, acc);
    }
    for (; row < row1; ++row) {
      dot_tile<MT, 1>(codes + m0 * k, k, p.weight + row * k, k, k, acc1);
      store_tile<MT, 1>(p, row, m0, sx, acc1);
    }
  }
  for (; m0 < m_rows; ++m0) {  // leftover token rows, one at a time
    int64_t row = row0;
    for (; row + 8 <= row1; row += 8) {
      int32_t a8[8];
      dot_tile<1, 8>(codes + m0 * k, k, p.weight + row * k, k, k, a8);
      store_tile<1, 8>(p, row, m0, sx, a8);
    }
    for (; row < row1; ++row) {
      int32_t a1[1];
      dot_tile<1, 1>(codes + m0 * k, k, p.weight + row * k, k, k, a1);
      store_tile<1, 1>(p, row, m0, sx, a1);
    }
  }
}

// -- many token rows (a prompt): a real GEMM --------------------------------------------------
// With many rows the products are compute-bound and the row-major kernel above, which
// must reduce every dot product across a vector, loses to a real GEMM: AMX tiles (below)
// where the CPU has them, else oneDNN's s8 x s8 GEMM behind torch._int_mm.  Activations
// are then quantized to signed codes (zero point 0), as Int8DynamicLinear's int-mm
// kernel does.
constexpr int64_t kGemmMinRows = 16;

int32_t zero_point_for(int64_t m_rows) { return m_rows >= kGemmMinRows ? 0 : kZeroPoint; }

// x [m, k] int8 codes @ w [n, k]^T int8 -> int32 [m, n] through ftq's own GEMM (int8_gemm.h), whatever the CPU;
// the eager int8 layers call it where torch's _int_mm is slow.
at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dtype() == at::kChar && w.dtype() == at::kChar && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "int8 x [m, k] and int8 w [n, k] expected");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor out = at::empty({xc.size(0), wc.size(0)}, xc.options().dtype(at::kInt));
  ftq_gemm::gemm(xc.data_ptr<int8_t>(), xc.size(0), xc.size(1), wc.data_ptr<int8_t>(), wc.size(0), out.data_ptr<int32_t>());
  return out;
}

// Without AVX512-VNNI, torch's _int_mm is oneDNN's reference code: ftq's own GEMM runs instead.
at::Tensor exact_int_mm(const at::Tensor& x, const at::Tensor& w) {
  return FTQ_VNNI ? at::_int_mm(x, w.t()) : int8_gemm(x, w);
}

void project_int_mm(const std::vector<Projection>& group, const uint8_t* codes, const float* sx, int64_t m_rows,
                    int64_t k) {
  const at::Tensor x = at::from_blob(const_cast<uint8_t*>(codes), {m_rows, k}, at::TensorOptions().dtype(at::kChar));
  for (const Projection& p : group) {
    const at::Tensor w = at::from_blob(const_cast<int8_t*>(p.weight), {p.n, k}, at::TensorOptions().dtype(at::kChar));
    const at::Tensor acc = exact_int_mm(x, w);
    const int32_t* a = acc.data_ptr<int32_t>();
    at::parallel_for(0, m_rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t m = r0; m < r1; ++m) {
        float* out = p.out + m * p.ld;
        for (int64_t n = 0; n < p.n; ++n) out[n] = rescale(a[m * p.n + n], sx[m], p, n);
      }
    });
  }
}

#if FTQ_AMX
// -- many token rows on AMX: tiles straight from the row-major weights -----------------------
// A tile product C += A B reads A row-major and B in groups of four bytes along k (VNNI
// order).  With A = 16 rows of a weight, as the model stores them, and B = the token
// rows' codes rearranged into that order (the only copy made: a few hundred KB), C holds
// 16 x 16 outputs transposed.  No packed copy of the weights is kept, torch._int_mm's
// per-call weight reorder is gone, and the int32 sums are exact, as _int_mm's are.
constexpr int64_t kTileRows = 16;   // rows of a tile: weight rows of A, token rows of B
constexpr int64_t kTileBytes = 64;  // bytes of a tile row: 64 k of A, 16 token rows x 4 k of B

bool amx_usable() {
  // Linux gives a process the 8 KB tile state only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM
  // for XFEATURE_XTILEDATA); a kernel that refuses leaves the _int_mm path.
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3 accumulate a 32-row x 32-token block, 4-5 hold weight rows, 6-7 token codes.
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTileRows;
    config.colsb[t] = kTileBytes;
  }
  _tile_loadconfig(&config);
}

// What the AMX path needs of a projection: whole 64-byte k steps and 32-row weight blocks.
bool amx_fits(const Projection& p, int64_t k) { return k % kTileBytes == 0 && p.n % (2 * kTileRows) == 0; }

// codes [m_rows, k] -> packed[token block][k block][k / 4 within the block][16 tokens][4 bytes],
// token blocks rounded up to an even count, rows past m_rows zero.
void pack_codes_vnni(const uint8_t* codes, int64_t m_rows, int64_t k, int64_t token_blocks, uint8_t* packed) {
  const int64_t k_blocks = k / kTileBytes;
  at::parallel_for(0, token_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t tb = b0; tb < b1; ++tb)
      for (int64_t kb = 0; kb < k_blocks; ++kb) {
        uint8_t* tile = packed + (tb * k_blocks + kb) * kTileRows * kTileBytes;
        for (int64_t j = 0; j < kTileRows; ++j) {
          const int64_t m = tb * kTileRows + j;
          for (int64_t g = 0; g < kTileBytes / 4; ++g) {
            uint8_t* dst = tile + g * kTileBytes + j * 4;
            if (m < m_rows)
              std::memcpy(dst, codes + m * k + kb * kTileBytes + g * 4, 4);
            else
              std::memset(dst, 0, 4);
          }
        }
      }
  });
}

// rows[i][j] -> rows[j][i] for a 16 x 16 int32 block: four rounds that each swap the
// off-diagonal b x b blocks of every 2b x 2b block (b = 8, 4, 2, 1).
inline void transpose_16x16(__m512i* rows) {
  for (int b = 8; b >= 1; b /= 2) {
    alignas(64) int32_t low_idx[16], high_idx[16];
    for (int c = 0; c < 16; ++c) {
      low_idx[c] = (c & b) ? 16 + c - b : c;   // row i keeps its columns without bit b, takes i + b's
      high_idx[c] = (c & b) ? 16 + c : c + b;  // row i + b takes i's columns with bit b, keeps its own
    }
    const __m512i lo = _mm512_load_si512(low_idx), hi = _mm512_load_si512(high_idx);
    for (int i = 0; i < 16; ++i) {
      if (i & b) continue;
      const __m512i a = rows[i], c = rows[i + b];
      rows[i] = _mm512_permutex2var_epi32(a, lo, c);
      rows[i + b] = _mm512_permutex2var_epi32(a, hi, c);
    }
  }
}

// Weight rows [n0, n0 + 32) against token blocks tb, tb + 1.
void amx_block(const Projection& p, const uint8_t* packed, const float* sx, int64_t m_rows, int64_t k, int64_t n0,
               int64_t tb) {
  const int64_t k_blocks = k / kTileBytes, tile_size = kTileRows * kTileBytes;
  const int8_t* w0 = p.weight + n0 * k;
  const int8_t* w1 = w0 + kTileRows * k;
  const uint8_t* x0 = packed + tb * k_blocks * tile_size;
  const uint8_t* x1 = x0 + k_blocks * tile_size;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    _tile_loadd(4, w0 + kb * kTileBytes, k);
    _tile_loadd(5, w1 + kb * kTileBytes, k);
    _tile_loadd(6, x0 + kb * tile_size, kTileBytes);
    _tile_loadd(7, x1 + kb * tile_size, kTileBytes);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  alignas(64) int32_t acc[4][kTileRows][kTileRows];  // [weight half * 2 + token half][weight row][token]
  _tile_stored(0, acc[0], kTileBytes);
  _tile_stored(1, acc[1], kTileBytes);
  _tile_stored(2, acc[2], kTileBytes);
  _tile_stored(3, acc[3], kTileBytes);
  for (int wh = 0; wh < 2; ++wh) {
    const int64_t n = n0 + wh * kTileRows;
    const __m512 scale = _mm512_loadu_ps(p.scale + n);
    const __m512 bias = p.bias ? _mm512_loadu_ps(p.bias + n) : _mm512_setzero_ps();
    for (int th = 0; th < 2; ++th) {
      __m512i rows[kTileRows];
      for (int i = 0; i < kTileRows; ++i) rows[i] = _mm512_load_si512(acc[wh * 2 + th][i]);
      transpose_16x16(rows);  // rows[j]: token j's 16 outputs
      for (int64_t j = 0; j < kTileRows; ++j) {
        const int64_t m = (tb + th) * kTileRows + j;
        if (m >= m_rows) break;
        // float(acc) * s_x, then * s_w, then + bias: the order of rescale()
        __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(rows[j]), _mm512_set1_ps(sx[m]));
        y = _mm512_mul_ps(y, scale);
        if (p.bias) y = _mm512_add_ps(y, bias);
        _mm512_storeu_ps(p.out + m * p.ld + n, y);
      }
    }
  }
}

void project_amx(const std::vector<Projection>& group, const uint8_t* codes, const float* sx, int64_t m_rows,
                 int64_t k) {
  int64_t token_blocks = (m_rows + kTileRows - 1) / kTileRows;
  token_blocks += token_blocks % 2;
  std::vector<uint8_t> packed(token_blocks * kTileRows * k);
  pack_codes_vnni(codes, m_rows, k, token_blocks, packed.data());
  // Tasks: (projection, 32 weight rows, 32 tokens), weight-major so that a thread's run of
  // tasks keeps reusing the same weight rows from its cache.
  const int64_t token_pairs = token_blocks / 2;
  std::vector<int64_t> starts;
  int64_t tasks = 0;
  for (const auto& p : group) {
    starts.push_back(tasks);
    tasks += p.n / (2 * kTileRows) * token_pairs;
  }
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    configure_tiles();
    for (int64_t t = t0; t < t1; ++t) {
      const size_t j = std::upper_bound(starts.begin(), starts.end(), t) - starts.begin() - 1;
      const int64_t local = t - starts[j];
      amx_block(group[j], packed.data(), sx, m_rows, k, local / token_pairs * 2 * kTileRows,
                local % token_pairs * 2);
    }
    _tile_release();
  });
}
#else
bool amx_usable() { return false; }
#endif

void project_gemm(const std::vector<Projection>& group, const uint8_t* codes, const float* sx, int64_t m_rows,
                  int64_t k) {
#if FTQ_AMX
  if (amx_usable() && std::all_of(group.begin(), group.end(), [&](const Projection& p) { return amx_fits(p, k); }))
    return project_amx(group, codes, sx, m_rows, k);
#endif
  project_int_mm(group, codes, sx, m_rows, k);
}

// Decode streams every weight once per step: each thread takes an equal share of the
// group's rows, in runs of kRowUnit (the widest weight tile), so no thread waits on
// another's second helping (with 32-row tasks, 576 rows on 16 threads took two rounds).
constexpr int64_t kRowUnit = 8;

// Share `share` of `shares` of a group's rows (equal runs of kRowUnit rows), fewer than
// kGemmMinRows token rows.
void project_share(const std::vector<Projection>& group, const uint8_t* codes, const float* sx, int64_t m_rows,
                   int64_t k, int64_t share, int64_t shares) {
  int64_t units = 0;
  for (const auto& p : group) units += (p.n + kRowUnit - 1) / kRowUnit;
  const int64_t u0 = units * share / shares, u1 = units * (share + 1) / shares;
  int64_t start = 0;  // unit index where projection j starts
  for (const Projection& p : group) {
    const int64_t count = (p.n + kRowUnit - 1) / kRowUnit;
    const int64_t first = std::max(u0, start) - start, last = std::min(u1, start + count) - start;
    start += count;
    if (first >= last) continue;
    const int64_t row0 = first * kRowUnit, row1 = std::min(p.n, last * kRowUnit);
    if (m_rows <= 3) {  // one token row at a time against 8 weight rows
      project_rows<1, 8>(p, codes, sx, m_rows, k, row0, row1);
    } else {
      project_rows<4, 4>(p, codes, sx, m_rows, k, row0, row1);
    }
  }
}

// All projections of a group (q/k/v, or gate/up) against one quantized input, in one parallel region.
void project(const std::vector<Projection>& group, const uint8_t* codes, const float* sx, int64_t m_rows, int64_t k) {
  if (m_rows >= kGemmMinRows) return project_gemm(group, codes, sx, m_rows, k);
  const int64_t shares = at::get_num_threads();
  at::parallel_for(0, shares, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t share = s0; share < s1; ++share) project_share(group, codes, sx, m_rows, k, share, shares);
  });
}

// -- how a step's stages spread over the threads ---------------------------------------------
// A prompt runs each stage as its own parallel region (ATen's and oneDNN's kernels fork
// their own).  A decode token is ~10 short stages a layer: as parallel regions, their
// fork/joins cost more than the work at many threads (a 30-layer model of tiny width took
// 1.18 ms a token on 16 threads, 0.44 ms on one).  So a token keeps one team for the whole
// step, and its members meet at a spin barrier between stages.
class SpinBarrier {
 public:
  void reset(int members) {
    members_ = members;
    arrived_.store(0);
  }
  void wait() {
    const int phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == members_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
      return;
    }
    // Spin while the wait is short; yield once it is not (more threads than free cores).
    for (int spins = 0; phase_.load(std::memory_order_acquire) == phase; ++spins) {
      if (spins < (1 << 14)) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  int members_ = 1;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> phase_{0};
};

// What a step's time is spent on, for FusedLlama's optional stage clock.
enum Stage { kNorm, kQKV, kRope, kAttention, kQuantize, kOutProj, kGateUp, kSiluQuantize, kDownProj, kHead, kStages };
const char* const kStageNames[kStages] = {"residual+norm+quantize", "q|k|v proj", "rope+cache", "attention",
                                          "quantize", "o_proj", "gate|up proj", "silu*up+quantize", "down_proj",
                                          "final norm+head"};

// Each stage its own parallel region (a prompt's rows).
struct RegionPerStage {
  bool clocks() const { return true; }
  template <class F>
  void serial(F&& f) { f(); }  // f's loops may fork themselves
  void project(const std::vector<Projection>& group, const uint8_t* codes, const float* sx, int64_t m_rows, int64_t k) {
    ::project(group, codes, sx, m_rows, k);
  }
  template <class F>
  void tasks(int64_t n, F&& f) {
    at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) f(t);
    });
  }
};

// One member of a team that runs a whole decode step (inside an OpenMP parallel region,
// where ATen's parallel_for runs inline).
struct StepTeam {
  int64_t member, size;
  SpinBarrier& barrier;
  bool clocks() const { return member == 0; }  // every stage ends at a barrier: member 0's clock is the team's
  template <class F>
  void serial(F&& f) {
    if (member == 0) f();
    barrier.wait();
  }
  void project(const std::vector<Projection>& group, const uint8_t* codes, const float* sx, int64_t m_rows, int64_t k) {
    project_share(group, codes, sx, m_rows, k, member, size);
    barrier.wait();
  }
  template <class F>
  void tasks(int64_t n, F&& f) {
    for (int64_t t = member; t < n; t += size) f(t);
    barrier.wait();
  }
};

struct Linear8 {
  at::Tensor weight, scale, rowsum, bias;  // int8 [n, k], float [n], int32 [n], float [n] or undefined
  int64_t n = 0, k = 0;
};

// Each row's sum of codes (the zero-point correction of u8 x s8 products), summed in place: an
// int32 sum over the whole weight would first make an int32 copy of it (2 GB for an 8B model's head).
at::Tensor row_sums(const at::Tensor& weight) {
  const int64_t n = weight.size(0), k = weight.size(1);
  at::Tensor sums = at::empty({n}, weight.options().dtype(at::kInt));
  const int8_t* w = weight.data_ptr<int8_t>();
  int32_t* out = sums.data_ptr<int32_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int32_t total = 0;
      for (int64_t j = 0; j < k; ++j) total += w[i * k + j];
      out[i] = total;
    }
  });
  return sums;
}

Linear8 make_linear(const at::Tensor& weight, const at::Tensor& scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dtype() == at::kChar && weight.dim() == 2 && weight.is_contiguous(), "int8 weight [n, k] expected");
  TORCH_CHECK(scale.dtype() == at::kFloat && scale.numel() == weight.size(0), "float32 scale [n] expected");
  Linear8 l;
  l.weight = weight;
  l.scale = scale.contiguous();
  l.rowsum = row_sums(weight);
  if (bias.has_value() && bias->defined()) l.bias = bias->to(at::kFloat).contiguous();
  l.n = weight.size(0);
  l.k = weight.size(1);
  return l;
}

Projection as_projection(const Linear8& l, float* out, int64_t ld) {
  return Projection{l.weight.data_ptr<int8_t>(), l.scale.data_ptr<float>(), l.rowsum.data_ptr<int32_t>(),
                    l.bias.defined() ? l.bias.data_ptr<float>() : nullptr, l.n, out, ld};
}

struct Layer {
  at::Tensor norm1, norm2;  // float [hidden]
  at::Tensor q_norm, k_norm;  // float [head_dim] per-head RMSNorms of q and k before rope (Qwen3), or undefined
  Linear8 q, k, v, o, gate, up, down;
  int64_t down_rotation = 0;  // > 0: down_proj's input is rotated by Hadamard blocks of this size first
};

// x <- x H for the orthogonal block-diagonal Sylvester Hadamard matrix of
// ftq_plugins.int8.hadamard.block_hadamard (which the eager layers compute as two Kronecker
// factor products; equal up to float rounding): a fast Walsh-Hadamard butterfly, then the scale.
// Every vector butterfly is the same two IEEE operations as the scalar loop (low + high,
// low - high), so both forms here give the same floats.
void block_hadamard(float* x, int64_t width, int64_t block) {
  // 1 / sqrt(block) in double, rounded once to float
  const float scale = static_cast<float>(std::pow(static_cast<double>(block), -0.5));
  for (int64_t b0 = 0; b0 < width; b0 += block) {
    float* v = x + b0;
    int64_t half = 1;
#if FTQ_VNNI
    if (block % 16 == 0) {
      // pairs 1, 2, 4 and 8 apart sit in one 16-float vector: swap lanes i and i ^ half, then
      // lanes whose bit `half` is clear keep low + high and the others low - high
      const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
      for (int64_t i = 0; i < block; i += 16) {
        __m512 x16 = _mm512_loadu_ps(v + i);
        for (int h = 1; h < 16; h *= 2) {
          const __m512 partner = _mm512_permutexvar_ps(_mm512_xor_si512(lane, _mm512_set1_epi32(h)), x16);
          const __mmask16 high = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(h));
          x16 = _mm512_mask_sub_ps(_mm512_add_ps(x16, partner), high, partner, x16);
        }
        _mm512_storeu_ps(v + i, x16);
      }
      for (half = 16; half < block; half *= 2)
        for (int64_t i = 0; i < block; i += 2 * half)
          for (int64_t j = i; j < i + half; j += 16) {
            const __m512 low = _mm512_loadu_ps(v + j), high = _mm512_loadu_ps(v + j + half);
            _mm512_storeu_ps(v + j, _mm512_add_ps(low, high));
            _mm512_storeu_ps(v + j + half, _mm512_sub_ps(low, high));
          }
    }
#endif
    for (; half < block; half *= 2)
      for (int64_t i = 0; i < block; i += 2 * half)
        for (int64_t j = i; j < i + half; ++j) {
          const float low = v[j], high = v[j + half];
          v[j] = low + high;
          v[j + half] = low - high;
        }
    for (int64_t i = 0; i < block; ++i) v[i] = v[i] * scale;
  }
}

// out = x M for a row x [d] and a row-major M [d, d]: a rotated model's final-norm matrix
// (ftq_plugins.transforms.rotated_norm), once per sequence and step.
void row_times_matrix(const float* __restrict x, const float* __restrict m, int64_t d, float* __restrict out) {
  std::fill(out, out + d, 0.0f);
  for (int64_t i = 0; i < d; ++i) {
    const float xi = x[i];
    const float* __restrict mi = m + i * d;
    for (int64_t j = 0; j < d; ++j) out[j] += xi * mi[j];
  }
}

// One int8 projection of float rows x [m, k] through the decoder's own path (per-token
// quantization, then the GEMV, AMX or _int_mm kernel that m rows take); for tests.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.size(1) == weight.size(1), "float32 rows [m, k] expected");
  at::NoGradGuard no_grad;
  const Linear8 l = make_linear(weight, scale, bias);
  const at::Tensor rows = x.contiguous();
  const int64_t m = rows.size(0), k = l.k;
  std::vector<uint8_t> codes(m * k);
  std::vector<float> sx(m);
  for (int64_t r = 0; r < m; ++r)
    sx[r] = quantize_row(rows.data_ptr<float>() + r * k, k, codes.data() + r * k, zero_point_for(m));
  at::Tensor out = at::empty({m, l.n}, rows.options());
  project({as_projection(l, out.data_ptr<float>(), l.n)}, codes.data(), sx.data(), m, k);
  return out;
}

// Rows x [m, width] through block_hadamard, as a new tensor; for tests.
at::Tensor block_hadamard_rows(const at::Tensor& x, int64_t block) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && block > 0 && x.size(1) % block == 0,
              "float32 rows [m, width] with width a multiple of block expected");
  at::Tensor out = x.contiguous().clone();
  for (int64_t r = 0; r < out.size(0); ++r) block_hadamard(out.data_ptr<float>() + r * out.size(1), out.size(1), block);
  return out;
}

class FusedLlama {
 public:
  FusedLlama(std::vector<std::vector<at::Tensor>> layers, std::vector<c10::optional<at::Tensor>> biases,
             at::Tensor final_norm, c10::optional<at::Tensor> head_weight, c10::optional<at::Tensor> head_scale,
             at::Tensor cos, at::Tensor sin, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
             double attention_scale, bool bf16_attention, int64_t batch, int64_t max_length,
             std::vector<int64_t> down_rotation, c10::optional<at::Tensor> final_matrix,
             std::vector<c10::optional<at::Tensor>> qk_norms)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), eps_(static_cast<float>(eps)),
        attention_scale_(static_cast<float>(attention_scale)), bf16_(bf16_attention), batch_(batch),
        max_length_(max_length) {
    // layers[i] = {norm1, norm2, q_w, q_s, k_w, k_s, v_w, v_s, o_w, o_s, gate_w, gate_s, up_w, up_s, down_w, down_s}
    // biases[3 * i + {0, 1, 2}] = q/k/v biases (Qwen2) or None
    TORCH_CHECK(biases.size() == 3 * layers.size(), "three biases per layer expected");
    // qk_norms[2 * i + {0, 1}] = layer i's q and k norm weights [head_dim] (Qwen3), or empty for none
    TORCH_CHECK(qk_norms.empty() || qk_norms.size() == 2 * layers.size(), "two q/k norms per layer expected");
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& t = layers[i];
      TORCH_CHECK(t.size() == 16, "16 tensors per layer expected");
      Layer l;
      l.norm1 = t[0].to(at::kFloat).contiguous();
      l.norm2 = t[1].to(at::kFloat).contiguous();
      l.q = make_linear(t[2], t[3], biases[3 * i]);
      l.k = make_linear(t[4], t[5], biases[3 * i + 1]);
      l.v = make_linear(t[6], t[7], biases[3 * i + 2]);
      l.o = make_linear(t[8], t[9], c10::nullopt);
      l.gate = make_linear(t[10], t[11], c10::nullopt);
      l.up = make_linear(t[12], t[13], c10::nullopt);
      l.down = make_linear(t[14], t[15], c10::nullopt);
      if (!qk_norms.empty() && qk_norms[2 * i].has_value()) {
        l.q_norm = qk_norms[2 * i]->to(at::kFloat).contiguous();
        l.k_norm = qk_norms[2 * i + 1]->to(at::kFloat).contiguous();
        TORCH_CHECK(l.q_norm.numel() == head_dim && l.k_norm.numel() == head_dim, "q/k norms of [head_dim] expected");
      }
      l.down_rotation = i < down_rotation.size() ? down_rotation[i] : 0;
      TORCH_CHECK(l.down_rotation == 0 || l.down.k % l.down_rotation == 0, "rotation block must divide down_proj's input");
      layers_.push_back(std::move(l));
    }
    final_norm_ = final_norm.to(at::kFloat).contiguous();
    hidden_ = final_norm_.numel();
    if (final_matrix.has_value()) {
      final_matrix_ = final_matrix->to(at::kFloat).contiguous();
      TORCH_CHECK(final_matrix_.dim() == 2 && final_matrix_.size(0) == hidden_ && final_matrix_.size(1) == hidden_,
                  "the final-norm matrix must be [hidden, hidden]");
      has_final_matrix_ = true;
    }
    if (head_weight.has_value()) {
      head_ = make_linear(*head_weight, *head_scale, c10::nullopt);
      has_head_ = true;
    }
    cos_ = cos.to(at::kFloat).contiguous();
    sin_ = sin.to(at::kFloat).contiguous();
    TORCH_CHECK(cos_.size(0) >= max_length && cos_.size(1) == head_dim, "rope tables [max_length, head_dim] expected");
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    keys_ = at::zeros({static_cast<int64_t>(layers_.size()), batch, kv_heads, max_length, head_dim}, opts);
    values_ = at::zeros_like(keys_);
  }

  std::string isa() const { return isa_name(); }
  int64_t position() const { return position_; }
  void reset() { position_ = 0; }

  // The stage clock: wall seconds per stage, summed over the steps run since profiling was turned on.
  void set_profiling(bool on) {
    profiling_ = on;
    stage_seconds_.fill(0.0);
  }
  std::map<std::string, double> stage_seconds() const {
    std::map<std::string, double> out;
    for (int s = 0; s < kStages; ++s) out[kStageNames[s]] = stage_seconds_[s];
    return out;
  }

  // hidden [batch * tokens, hidden] float32 (the embeddings of the new tokens, row b * tokens + t);
  // returns the last position's logits [batch, vocab], or its final-normed hidden state when
  // the model's head is not int8 (the caller runs it).
  at::Tensor forward(at::Tensor hidden_in, int64_t tokens) {
    TORCH_CHECK(hidden_in.dtype() == at::kFloat && hidden_in.dim() == 2 && hidden_in.size(1) == hidden_,
                "float32 hidden states [rows, hidden] expected");
    const int64_t rows = hidden_in.size(0);
    TORCH_CHECK(rows == batch_ * tokens, "rows must be batch * tokens");
    TORCH_CHECK(position_ + tokens <= max_length_, "the sequence outgrew max_length");
    TORCH_CHECK(tokens == 1 || position_ == 0, "several tokens only as the prompt");
    at::NoGradGuard no_grad;
    at::Tensor hidden = hidden_in.contiguous().clone();
    float* h = hidden.data_ptr<float>();
    const int64_t d = hidden_;
    const int64_t qd = heads_ * head_dim_, kvd = kv_heads_ * head_dim_;
    const int64_t inter = layers_.empty() ? 0 : layers_[0].gate.n;
    ensure_scratch(rows, std::max({d, qd + 2 * kvd, 2 * inter}));
    float* normed = normed_.data_ptr<float>();
    uint8_t* codes = codes_.data_ptr<uint8_t>();
    float* sx = sx_.data_ptr<float>();
    float* wide = wide_.data_ptr<float>();  // q|k|v, or gate|up, per row
    float* attn = attn_.data_ptr<float>();
    float* act = act_.data_ptr<float>();
    const int64_t wide_ld = wide_.size(1);

    at::Tensor out = at::empty({batch_, has_head_ ? head_.n : d}, hidden.options());
    const Buffers buffers{h, normed, codes, sx, wide, attn, act, wide_ld, out.data_ptr<float>()};
    if (tokens == 1 && rows < kGemmMinRows) {
      SpinBarrier barrier;
#pragma omp parallel num_threads(at::get_num_threads())
      {
#pragma omp single
        barrier.reset(omp_get_num_threads());
        StepTeam team{omp_get_thread_num(), omp_get_num_threads(), barrier};
        run_step(team, buffers, rows, tokens);
      }
    } else {
      RegionPerStage stages;
      run_step(stages, buffers, rows, tokens);
    }
    position_ += tokens;
    return out;
  }

 private:
  struct Buffers {
    float *h, *normed;
    uint8_t* codes;
    float *sx, *wide, *attn, *act;
    int64_t wide_ld;
    float* out;  // [batch, vocab] logits, or [batch, hidden] final-normed states without an int8 head
  };

  // Every layer, then the last position's final norm and head, stage by stage.
  template <class Team>
  void run_step(Team& team, const Buffers& B, int64_t rows, int64_t tokens) {
    const int64_t d = hidden_, qd = heads_ * head_dim_, kvd = kv_heads_ * head_dim_;
    const int64_t inter = layers_.empty() ? 0 : layers_[0].gate.n, ld = B.wide_ld;
    auto serial = [&](Stage s, auto&& f) { timed(team, s, [&] { team.serial(f); }); };
    auto project = [&](Stage s, const std::vector<Projection>& group, int64_t k) {
      timed(team, s, [&] { team.project(group, B.codes, B.sx, rows, k); });
    };
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      // attention block: (the last layer's residual) -> norm -> quantize -> q|k|v in one GEMM
      serial(kNorm, [&] {
        if (li > 0) add_rows(B.h, B.attn, rows * d);
        norm_and_quantize(B.h, L.norm1.data_ptr<float>(), rows, d, B.normed, B.codes, B.sx);
      });
      project(kQKV, {as_projection(L.q, B.wide, ld), as_projection(L.k, B.wide + qd, ld),
                     as_projection(L.v, B.wide + qd + kvd, ld)}, d);
      serial(kRope, [&] { rope_and_cache(li, B.wide, ld, tokens); });
      if (tokens > 1) {
        serial(kAttention, [&] { prompt_attention(li, B.wide, ld, tokens, B.attn); });
      } else {
        timed(team, kAttention, [&] {
          team.tasks(batch_ * heads_, [&](int64_t task) { attend_one(li, task, B.wide, ld, B.attn); });
        });
      }
      serial(kQuantize, [&] { quantize_rows(B.attn, rows, qd, B.codes, B.sx); });
      project(kOutProj, {as_projection(L.o, B.act, d)}, qd);
      // MLP block: residual -> norm -> quantize -> gate|up in one GEMM -> silu(gate) * up -> down
      serial(kNorm, [&] {
        add_rows(B.h, B.act, rows * d);
        norm_and_quantize(B.h, L.norm2.data_ptr<float>(), rows, d, B.normed, B.codes, B.sx);
      });
      project(kGateUp, {as_projection(L.gate, B.wide, ld), as_projection(L.up, B.wide + inter, ld)}, d);
      serial(kSiluQuantize, [&] {
        silu_mul(B.wide, ld, rows, inter, B.act);
        if (L.down_rotation > 0)
          at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) block_hadamard(B.act + r * inter, inter, L.down_rotation);
          });
        quantize_rows(B.act, rows, inter, B.codes, B.sx);
      });
      project(kDownProj, {as_projection(L.down, B.attn, d)}, inter);
    }
    // last position of every sequence: final norm, then the head
    float* last = has_head_ ? B.normed : B.out;
    serial(kHead, [&] {
      if (!layers_.empty()) add_rows(B.h, B.attn, rows * d);
      for (int64_t b = 0; b < batch_; ++b) {
        const float* state = B.h + ((b + 1) * tokens - 1) * d;
        if (has_final_matrix_) {  // rmsnorm, then the matrix; wide is free scratch by now
          rms_norm(state, final_norm_.data_ptr<float>(), d, eps_, B.wide + b * ld);
          row_times_matrix(B.wide + b * ld, final_matrix_.data_ptr<float>(), d, last + b * d);
        } else {
          rms_norm(state, final_norm_.data_ptr<float>(), d, eps_, last + b * d);
        }
        if (has_head_) B.sx[b] = quantize_row(last + b * d, d, B.codes + b * d, zero_point_for(batch_));
      }
    });
    if (has_head_) timed(team, kHead, [&] { team.project({as_projection(head_, B.out, head_.n)}, B.codes, B.sx, batch_, d); });
  }

  template <class Team, class F>
  void timed(Team& team, Stage s, F&& f) {
    if (!profiling_ || !team.clocks()) return f();
    const auto start = std::chrono::steady_clock::now();
    f();
    stage_seconds_[s] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

  void ensure_scratch(int64_t rows, int64_t wide) {
    if (normed_.defined() && normed_.size(0) >= rows && wide_.size(1) >= wide) return;
    const auto f = at::TensorOptions().dtype(at::kFloat);
    const int64_t inter = layers_.empty() ? hidden_ : std::max(layers_[0].gate.n, hidden_);
    const int64_t widest_in = std::max({hidden_, heads_ * head_dim_, inter});
    normed_ = at::empty({rows, hidden_}, f);
    codes_ = at::empty({rows, widest_in}, at::TensorOptions().dtype(at::kByte));
    sx_ = at::empty({rows}, f);
    wide_ = at::empty({rows, wide}, f);
    attn_ = at::empty({rows, std::max(heads_ * head_dim_, hidden_)}, f);
    act_ = at::empty({rows, std::max(inter, hidden_)}, f);
  }

  void norm_and_quantize(const float* h, const float* w, int64_t rows, int64_t d, float* normed, uint8_t* codes,
                         float* sx) {
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        rms_norm(h + r * d, w, d, eps_, normed + r * d);
        sx[r] = quantize_row(normed + r * d, d, codes + r * d, zero_point_for(rows));
      }
    });
  }

  void quantize_rows(const float* x, int64_t rows, int64_t k, uint8_t* codes, float* sx) {
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) sx[r] = quantize_row(x + r * k, k, codes + r * k, zero_point_for(rows));
    });
  }

  static void add_rows(float* h, const float* y, int64_t n) {
    at::parallel_for(0, n, 1 << 15, [&](int64_t i0, int64_t i1) {  // a prompt's rows; one token's stay serial
      for (int64_t i = i0; i < i1; ++i) h[i] = h[i] + y[i];
    });
  }

  static void silu_mul(const float* wide, int64_t ld, int64_t rows, int64_t inter, float* out) {
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) silu_times(wide + r * ld, wide + r * ld + inter, inter, out + r * inter);
    });
  }

  // per-head q/k norms where the layer has them (Qwen3), then rope on q and k (in place),
  // k and v into the cache (rounded to bf16 for bf16 attention)
  void rope_and_cache(size_t li, float* wide, int64_t ld, int64_t tokens) {
    const int64_t hd = head_dim_, half = hd / 2, qd = heads_ * hd, kvd = kv_heads_ * hd;
    const Layer& L = layers_[li];
    const float* q_norm = L.q_norm.defined() ? L.q_norm.data_ptr<float>() : nullptr;
    const float* k_norm = L.k_norm.defined() ? L.k_norm.data_ptr<float>() : nullptr;
    const float* cos = cos_.data_ptr<float>();
    const float* sin = sin_.data_ptr<float>();
    float* kc = layer_cache(keys_, li);
    float* vc = layer_cache(values_, li);
    at::parallel_for(0, batch_ * tokens, 16, [&](int64_t r0, int64_t r1) {
      std::vector<float> tmp(hd);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / tokens, t = r % tokens;
        const int64_t pos = position_ + t;
        float* row = wide + (b * tokens + t) * ld;
        const float* c = cos + pos * hd;
        const float* s = sin + pos * hd;
        for (int64_t head = 0; head < heads_ + kv_heads_; ++head) {
          float* x = row + head * hd;  // q heads, then k heads (contiguous in q|k|v)
          if (q_norm) rms_norm(x, head < heads_ ? q_norm : k_norm, hd, eps_, x);  // in place: reads x[i] first
          // x * cos + rotate_half(x) * sin, the sign of rotate_half folded into the sin table
          for (int64_t i = 0; i < half; ++i) tmp[i] = x[i] * c[i] + x[i + half] * s[i];
          for (int64_t i = half; i < hd; ++i) tmp[i] = x[i] * c[i] + x[i - half] * s[i];
          std::memcpy(x, tmp.data(), hd * sizeof(float));
          if (bf16_)
            for (int64_t i = 0; i < hd; ++i) x[i] = round_bf16(x[i]);
        }
        float* v = row + qd + kvd;
        if (bf16_)
          for (int64_t i = 0; i < kvd; ++i) v[i] = round_bf16(v[i]);
        for (int64_t kh = 0; kh < kv_heads_; ++kh) {
          const int64_t at = ((b * kv_heads_ + kh) * max_length_ + pos) * hd;
          std::memcpy(kc + at, row + qd + kh * hd, hd * sizeof(float));
          std::memcpy(vc + at, v + kh * hd, hd * sizeof(float));
        }
      }
    });
  }

  // Layer li's slice of a cache [layers, batch, kv_heads, max_length, head_dim], by pointer
  // (indexing the tensor would dispatch an op per call, on every head of every token).
  static float* layer_cache(const at::Tensor& cache, size_t li) {
    return cache.data_ptr<float>() + static_cast<int64_t>(li) * cache.stride(0);
  }

  // One new token's softmax(q k^T * scale) v for one (sequence, head) task; out [batch, heads * head_dim]
  void attend_one(size_t li, int64_t task, const float* wide, int64_t ld, float* out) {
    const int64_t hd = head_dim_, group = heads_ / kv_heads_, qd = heads_ * hd;
    const int64_t head = task % heads_, b = task / heads_, kh = head / group, len = position_ + 1;
    thread_local std::vector<float> scores, acc;
    scores.resize(max_length_);
    acc.assign(hd, 0.f);
    const float* q = wide + b * ld + head * hd;
    const float* kbase = layer_cache(keys_, li) + (b * kv_heads_ + kh) * max_length_ * hd;
    const float* vbase = layer_cache(values_, li) + (b * kv_heads_ + kh) * max_length_ * hd;
    float best = -INFINITY;
    for (int64_t j = 0; j < len; ++j) {
      scores[j] = dot(q, kbase + j * hd, hd) * attention_scale_;
      best = std::max(best, scores[j]);
    }
    float total = 0.f;
    for (int64_t j = 0; j < len; ++j) {
      const float e = std::exp(scores[j] - best);
      total += e;
      // ATen's bf16 flash attention multiplies v by the probabilities rounded to bf16
      scores[j] = bf16_ ? round_bf16(e) : e;
    }
    for (int64_t j = 0; j < len; ++j) axpy(scores[j], vbase + j * hd, acc.data(), hd);
    float* o = out + b * qd + head * hd;
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < hd; ++i) o[i] = bf16_ ? round_bf16(acc[i] * inv) : acc[i] * inv;
  }

  // A prompt's causal attention is compute-bound: ATen's flash attention (what the eager
  // loop runs, in bf16 where the model records it) does it better than a loop here.
  void prompt_attention(size_t li, float* wide, int64_t ld, int64_t tokens, float* out) {
    const int64_t hd = head_dim_, qd = heads_ * hd;
    const auto f = at::TensorOptions().dtype(at::kFloat);
    at::Tensor q = at::from_blob(wide, {batch_, tokens, heads_, hd}, {tokens * ld, ld, hd, 1}, f).transpose(1, 2);
    at::Tensor k = keys_[li].narrow(2, 0, tokens);
    at::Tensor v = values_[li].narrow(2, 0, tokens);
    if (bf16_) {
      q = q.to(at::kBFloat16);
      k = k.to(at::kBFloat16);
      v = v.to(at::kBFloat16);
    }
    at::Tensor o = at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, attention_scale_,
                                                       /*enable_gqa=*/true);
    at::Tensor dst = at::from_blob(out, {batch_, tokens, heads_, hd}, {tokens * qd, qd, hd, 1}, f);
    dst.copy_(o.transpose(1, 2));
  }

  std::vector<Layer> layers_;
  at::Tensor final_norm_, final_matrix_;
  bool has_final_matrix_ = false;
  Linear8 head_;
  bool has_head_ = false;
  at::Tensor cos_, sin_, keys_, values_;
  at::Tensor normed_, codes_, sx_, wide_, attn_, act_;
  int64_t hidden_ = 0, heads_, kv_heads_, head_dim_;
  float eps_, attention_scale_;
  bool bf16_;
  int64_t batch_, max_length_, position_ = 0;
  bool profiling_ = false;
  std::array<double, kStages> stage_seconds_{};
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa_name, "The instruction set the int8 GEMM was built for");
  m.def("gemm_isa", &ftq_gemm::isa, "The instruction set ftq's int8 GEMM (int8_gemm) was built for");
  m.def("int8_gemm", &int8_gemm, "int8 x [m, k] @ int8 w [n, k]^T -> exact int32 [m, n]");
  m.def("int8_linear", &int8_linear, "x [m, k] float32 through the decoder's int8 projection (tests)");
  m.def("block_hadamard", &block_hadamard_rows, "rows [m, width] float32 times the block Hadamard matrix (tests)");
  pybind11::class_<FusedLlama>(m, "FusedLlama")
      .def(pybind11::init<std::vector<std::vector<at::Tensor>>, std::vector<c10::optional<at::Tensor>>,
                          at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, at::Tensor,
                          at::Tensor, int64_t, int64_t, int64_t, double, double, bool, int64_t, int64_t,
                          std::vector<int64_t>, c10::optional<at::Tensor>,
                          std::vector<c10::optional<at::Tensor>>>())
      .def("forward", &FusedLlama::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("reset", &FusedLlama::reset)
      .def("set_profiling", &FusedLlama::set_profiling, "Turn the stage clock on (zeroed) or off")
      .def("stage_seconds", &FusedLlama::stage_seconds, "Wall seconds per stage since profiling was turned on")
      .def_property_readonly("position", &FusedLlama::position)
      .def_property_readonly("isa", &FusedLlama::isa);
}
