// ftq's fused int8 decoder for Llama-family models: one native call per step.
//
// Eager PyTorch runs a decode token of a small int8 Llama as ~700 small ops
// (norms, per-token quantize, rescale, rope, cache writes, SiLU * up, residual
// adds), each with dispatch and a thread fork/join; at batch 1 that overhead
// outweighs the int8 GEMMs.  Here one call runs every layer: the glue is plain
// loops over a few thousand floats, and the int8 products are a GEMM that
// reads the layers' own row-major int8 weights (no packed copy is kept: the
// weights are the model's memory) with AVX512-VNNI where the CPU has it.
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
// (no fused multiply-adds: rope and the rescale round as ATen does).

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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define FTQ_VNNI 1
#else
#define FTQ_VNNI 0
#endif

namespace {

constexpr float kInt8Max = 127.0f;
constexpr float kScaleFloor = 1e-12f;
// VNNI multiplies unsigned by signed bytes: activations are stored as code + 128
// and the 128 * rowsum(W) this adds is taken off afterwards (exact, integers).
constexpr int32_t kZeroPoint = 128;

std::string isa_name() { return FTQ_VNNI ? "avx512-vnni" : "generic"; }

// -- per-token quantization ------------------------------------------------------
// Codes are stored as code + zero_point in a byte (int8 when zero_point is 0).
inline float quantize_row(const float* x, int64_t k, uint8_t* codes, int32_t zero_point) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = std::max(amax, kScaleFloor) / kInt8Max;
  for (int64_t i = 0; i < k; ++i) {
    codes[i] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(x[i] / scale)) + zero_point);
  }
  return scale;
}

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
      const int32_t exact = acc[m * RT + r] - kZeroPoint * p.rowsum[n];
      float y = static_cast<float>(exact) * sx[m0 + m];
      y = y * p.scale[n];
      if (p.bias) y = y + p.bias[n];
      out[n] = y;
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

// -- many token rows (a prompt): oneDNN's int8 GEMM ----------------------------------------
// With many rows the products are compute-bound, and oneDNN's s8 x s8 GEMM behind
// torch._int_mm (AMX where the CPU has it) beats the row-major kernel above, which
// must reduce every dot product across a vector.  Activations are then quantized to
// signed codes (zero point 0), as Int8DynamicLinear's int-mm kernel does.
constexpr int64_t kGemmMinRows = 16;

int32_t zero_point_for(int64_t m_rows) { return m_rows >= kGemmMinRows ? 0 : kZeroPoint; }

void project_gemm(const std::vector<Projection>& group, const uint8_t* codes, const float* sx, int64_t m_rows,
                  int64_t k) {
  const at::Tensor x = at::from_blob(const_cast<uint8_t*>(codes), {m_rows, k}, at::TensorOptions().dtype(at::kChar));
  for (const Projection& p : group) {
    const at::Tensor w = at::from_blob(const_cast<int8_t*>(p.weight), {p.n, k}, at::TensorOptions().dtype(at::kChar));
    const at::Tensor acc = at::_int_mm(x, w.t());
    const int32_t* a = acc.data_ptr<int32_t>();
    at::parallel_for(0, m_rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t m = r0; m < r1; ++m) {
        float* out = p.out + m * p.ld;
        for (int64_t n = 0; n < p.n; ++n) {
          float y = static_cast<float>(a[m * p.n + n]) * sx[m];
          y = y * p.scale[n];
          if (p.bias) y = y + p.bias[n];
          out[n] = y;
        }
      }
    });
  }
}

// Weight rows per task: a block of rows stays in cache while every token row passes it.
constexpr int64_t kRowBlock = 32;

// All projections of a group (q/k/v, or gate/up) against one quantized input, in one parallel region.
void project(const std::vector<Projection>& group, const uint8_t* codes, const float* sx, int64_t m_rows, int64_t k) {
  if (m_rows >= kGemmMinRows) return project_gemm(group, codes, sx, m_rows, k);
  std::vector<int64_t> starts;  // block index where each projection starts
  int64_t blocks = 0;
  for (const auto& p : group) {
    starts.push_back(blocks);
    blocks += (p.n + kRowBlock - 1) / kRowBlock;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      size_t j = std::upper_bound(starts.begin(), starts.end(), b) - starts.begin() - 1;
      const Projection& p = group[j];
      const int64_t row0 = (b - starts[j]) * kRowBlock;
      const int64_t row1 = std::min(p.n, row0 + kRowBlock);
      if (m_rows <= 3) {  // one token row at a time against 8 weight rows
        project_rows<1, 8>(p, codes, sx, m_rows, k, row0, row1);
      } else {
        project_rows<4, 4>(p, codes, sx, m_rows, k, row0, row1);
      }
    }
  });
}

struct Linear8 {
  at::Tensor weight, scale, rowsum, bias;  // int8 [n, k], float [n], int32 [n], float [n] or undefined
  int64_t n = 0, k = 0;
};

Linear8 make_linear(const at::Tensor& weight, const at::Tensor& scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dtype() == at::kChar && weight.dim() == 2 && weight.is_contiguous(), "int8 weight [n, k] expected");
  TORCH_CHECK(scale.dtype() == at::kFloat && scale.numel() == weight.size(0), "float32 scale [n] expected");
  Linear8 l;
  l.weight = weight;
  l.scale = scale.contiguous();
  l.rowsum = weight.sum(1, /*keepdim=*/false, at::kInt).contiguous();
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
  Linear8 q, k, v, o, gate, up, down;
  int64_t down_rotation = 0;  // > 0: down_proj's input is rotated by Hadamard blocks of this size first
};

// x <- x H for the orthogonal block-diagonal Sylvester Hadamard matrix: the butterfly of
// ftq_plugins.int8.hadamard.block_hadamard, in the same order, then the same scaling.
void block_hadamard(float* x, int64_t width, int64_t block) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(block));
  for (int64_t b0 = 0; b0 < width; b0 += block) {
    float* v = x + b0;
    for (int64_t half = 1; half < block; half *= 2)
      for (int64_t i = 0; i < block; i += 2 * half)
        for (int64_t j = i; j < i + half; ++j) {
          const float low = v[j], high = v[j + half];
          v[j] = low + high;
          v[j + half] = low - high;
        }
    for (int64_t i = 0; i < block; ++i) v[i] = v[i] * scale;
  }
}

class FusedLlama {
 public:
  FusedLlama(std::vector<std::vector<at::Tensor>> layers, std::vector<c10::optional<at::Tensor>> biases,
             at::Tensor final_norm, c10::optional<at::Tensor> head_weight, c10::optional<at::Tensor> head_scale,
             at::Tensor cos, at::Tensor sin, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
             double attention_scale, bool bf16_attention, int64_t batch, int64_t max_length,
             std::vector<int64_t> down_rotation)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), eps_(static_cast<float>(eps)),
        attention_scale_(static_cast<float>(attention_scale)), bf16_(bf16_attention), batch_(batch),
        max_length_(max_length) {
    // layers[i] = {norm1, norm2, q_w, q_s, k_w, k_s, v_w, v_s, o_w, o_s, gate_w, gate_s, up_w, up_s, down_w, down_s}
    // biases[3 * i + {0, 1, 2}] = q/k/v biases (Qwen2) or None
    TORCH_CHECK(biases.size() == 3 * layers.size(), "three biases per layer expected");
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
      l.down_rotation = i < down_rotation.size() ? down_rotation[i] : 0;
      TORCH_CHECK(l.down_rotation == 0 || l.down.k % l.down_rotation == 0, "rotation block must divide down_proj's input");
      layers_.push_back(std::move(l));
    }
    final_norm_ = final_norm.to(at::kFloat).contiguous();
    hidden_ = final_norm_.numel();
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

    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      // attention block: norm -> quantize -> q|k|v in one GEMM
      norm_and_quantize(h, L.norm1.data_ptr<float>(), rows, d, normed, codes, sx);
      project({as_projection(L.q, wide, wide_ld), as_projection(L.k, wide + qd, wide_ld),
               as_projection(L.v, wide + qd + kvd, wide_ld)},
              codes, sx, rows, d);
      rope_and_cache(li, wide, wide_ld, tokens);
      attention(li, wide, wide_ld, tokens, attn);
      quantize_rows(attn, rows, qd, codes, sx);
      project({as_projection(L.o, act, d)}, codes, sx, rows, qd);
      add_rows(h, act, rows * d);
      // MLP block: norm -> quantize -> gate|up in one GEMM -> silu(gate) * up -> down
      norm_and_quantize(h, L.norm2.data_ptr<float>(), rows, d, normed, codes, sx);
      project({as_projection(L.gate, wide, wide_ld), as_projection(L.up, wide + inter, wide_ld)}, codes, sx, rows, d);
      silu_mul(wide, wide_ld, rows, inter, act);
      if (L.down_rotation > 0)
        at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) block_hadamard(act + r * inter, inter, L.down_rotation);
        });
      quantize_rows(act, rows, inter, codes, sx);
      project({as_projection(L.down, attn, d)}, codes, sx, rows, inter);
      add_rows(h, attn, rows * d);
    }
    position_ += tokens;

    // last position of every sequence: final norm, then the head
    at::Tensor last = at::empty({batch_, d}, hidden.options());
    float* lp = last.data_ptr<float>();
    for (int64_t b = 0; b < batch_; ++b)
      rms_norm(h + ((b + 1) * tokens - 1) * d, final_norm_.data_ptr<float>(), d, eps_, lp + b * d);
    if (!has_head_) return last;
    at::Tensor logits = at::empty({batch_, head_.n}, hidden.options());
    std::vector<uint8_t> head_codes(batch_ * d);
    std::vector<float> head_sx(batch_);
    for (int64_t b = 0; b < batch_; ++b) head_sx[b] = quantize_row(lp + b * d, d, head_codes.data() + b * d, zero_point_for(batch_));
    project({as_projection(head_, logits.data_ptr<float>(), head_.n)}, head_codes.data(), head_sx.data(), batch_, d);
    return logits;
  }

 private:
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
    for (int64_t i = 0; i < n; ++i) h[i] = h[i] + y[i];
  }

  static void silu_mul(const float* wide, int64_t ld, int64_t rows, int64_t inter, float* out) {
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* g = wide + r * ld;
        const float* u = g + inter;
        float* o = out + r * inter;
        for (int64_t i = 0; i < inter; ++i) {
          const float silu = g[i] / (1.0f + std::exp(-g[i]));
          o[i] = silu * u[i];
        }
      }
    });
  }

  // rope on q and k (in place), k and v into the cache (rounded to bf16 for bf16 attention)
  void rope_and_cache(size_t li, float* wide, int64_t ld, int64_t tokens) {
    const int64_t hd = head_dim_, half = hd / 2, qd = heads_ * hd, kvd = kv_heads_ * hd;
    const float* cos = cos_.data_ptr<float>();
    const float* sin = sin_.data_ptr<float>();
    float* kc = keys_[li].data_ptr<float>();
    float* vc = values_[li].data_ptr<float>();
    std::vector<float> tmp(hd);
    for (int64_t b = 0; b < batch_; ++b)
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t pos = position_ + t;
        float* row = wide + (b * tokens + t) * ld;
        const float* c = cos + pos * hd;
        const float* s = sin + pos * hd;
        for (int64_t head = 0; head < heads_ + kv_heads_; ++head) {
          float* x = row + head * hd;  // q heads, then k heads (contiguous in q|k|v)
          for (int64_t i = 0; i < hd; ++i) {
            const float a = x[i] * c[i];
            const float bb = x[(i + half) % hd] * s[i];
            tmp[i] = a + bb;
          }
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
  }

  // softmax(q k^T * scale) v per head, causal within the new tokens; out [rows, heads * head_dim]
  void attention(size_t li, float* wide, int64_t ld, int64_t tokens, float* out) {
    if (tokens > 1) return prompt_attention(li, wide, ld, tokens, out);
    const int64_t hd = head_dim_, group = heads_ / kv_heads_, qd = heads_ * hd;
    const float* kc = keys_[li].data_ptr<float>();
    const float* vc = values_[li].data_ptr<float>();
    const int64_t tasks = batch_ * heads_ * tokens;
    at::parallel_for(0, tasks, tokens > 1 ? 4 : 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> scores(max_length_);
      std::vector<float> acc(hd);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t t = task % tokens, head = (task / tokens) % heads_, b = task / (tokens * heads_);
        const int64_t kh = head / group, len = position_ + t + 1;
        const float* q = wide + (b * tokens + t) * ld + head * hd;
        const float* kbase = kc + (b * kv_heads_ + kh) * max_length_ * hd;
        const float* vbase = vc + (b * kv_heads_ + kh) * max_length_ * hd;
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
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < len; ++j) {
          axpy(scores[j], vbase + j * hd, acc.data(), hd);
        }
        float* o = out + (b * tokens + t) * qd + head * hd;
        const float inv = 1.0f / total;
        for (int64_t i = 0; i < hd; ++i) o[i] = bf16_ ? round_bf16(acc[i] * inv) : acc[i] * inv;
      }
    });
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
  at::Tensor final_norm_;
  Linear8 head_;
  bool has_head_ = false;
  at::Tensor cos_, sin_, keys_, values_;
  at::Tensor normed_, codes_, sx_, wide_, attn_, act_;
  int64_t hidden_ = 0, heads_, kv_heads_, head_dim_;
  float eps_, attention_scale_;
  bool bf16_;
  int64_t batch_, max_length_, position_ = 0;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa_name, "The instruction set the int8 GEMM was built for");
  pybind11::class_<FusedLlama>(m, "FusedLlama")
      .def(pybind11::init<std::vector<std::vector<at::Tensor>>, std::vector<c10::optional<at::Tensor>>,
                          at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, at::Tensor,
                          at::Tensor, int64_t, int64_t, int64_t, double, double, bool, int64_t, int64_t,
                          std::vector<int64_t>>())
      .def("forward", &FusedLlama::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("reset", &FusedLlama::reset)
      .def_property_readonly("position", &FusedLlama::position)
      .def_property_readonly("isa", &FusedLlama::isa);
}
