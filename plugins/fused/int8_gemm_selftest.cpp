// Stand-alone check of ftq's int8 GEMM kernels (int8_gemm_kernels.h) against plain integer sums,
// with no torch: built for the host and cross-built for aarch64, which runs under qemu-user in the
// test suite (tests/test_exact_matmul.py), so the NEON code is executed, not only compiled.
// Prints the kernel's instruction set and "ok", or the first mismatch; exits non-zero on one.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "int8_gemm_kernels.h"

namespace {

uint32_t state = 12345u;
int8_t next_code() {  // a fixed LCG: the same cases on every machine
  state = state * 1664525u + 1013904223u;
  return static_cast<int8_t>(static_cast<int32_t>((state >> 8) % 255u) - 127);
}

bool check(int64_t m, int64_t k, int64_t n) {
  std::vector<int8_t> x(m * k), w(n * k);
  for (auto& v : x) v = next_code();
  for (auto& v : w) v = next_code();
  for (int64_t i = 0; i < std::min<int64_t>(k, 40); ++i) {  // the extremes, where int16 pair sums are tightest
    x[i] = 127;
    w[i] = -127;
  }
  std::vector<int32_t> out(m * n, -1);
  const int64_t tasks = ((m + ftq_gemm::kBlockM - 1) / ftq_gemm::kBlockM) * ((n + ftq_gemm::kBlockN - 1) / ftq_gemm::kBlockN);
  for (int64_t t = 0; t < tasks; ++t) ftq_gemm::gemm_task(x.data(), m, k, w.data(), n, out.data(), t);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int64_t expected = 0;
      for (int64_t p = 0; p < k; ++p) expected += int64_t(x[i * k + p]) * int64_t(w[j * k + p]);
      if (out[i * n + j] != expected) {
        std::printf("%s: mismatch at m=%lld k=%lld n=%lld [%lld, %lld]: %d != %lld\n", ftq_gemm::isa(), (long long)m,
                    (long long)k, (long long)n, (long long)i, (long long)j, out[i * n + j], (long long)expected);
        return false;
      }
    }
  return true;
}

}  // namespace

int main() {
  const int64_t shapes[][3] = {{1, 576, 192}, {5, 100, 7}, {67, 576, 130}, {33, 1536, 65}, {3, 31, 9}, {64, 17, 64}};
  for (const auto& s : shapes)
    if (!check(s[0], s[1], s[2])) return 1;
  std::printf("%s ok\n", ftq_gemm::isa());
  return 0;
}
