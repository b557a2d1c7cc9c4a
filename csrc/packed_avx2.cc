// AVX2 + FMA copy of the packed matmul: as the AVX-512 copy (widen each pair lane into two
// fp32 halves, two FMAs), 8 columns per vector, 16 registers. x float32 or bf16.
#include <immintrin.h>

#include <cstdint>

#include "packed_linear.h"

namespace brownout {
namespace packed_avx2 {

#include "avx2_math.inc"

struct V {
  struct Pair {
    __m256 even, odd;
  };
  using T = __m256;
  using WP = __m256i;
  using XP = Pair;
  static constexpr int W = 8;
  static constexpr int kRows = 2;  // 2 rows × 4 accumulators + 4 weights + 2 widened
  static constexpr int kBlocks = 1;
  static constexpr const char* kName = "avx2";
  static constexpr bool kBf16XOnly = false;

  static inline float Bf16(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float out;
    __builtin_memcpy(&out, &wide, sizeof(out));
    return out;
  }
  static inline T zero() { return _mm256_setzero_ps(); }
  static inline WP load_pairs(const uint16_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static inline XP prep(const uint16_t* x) {
    return {_mm256_set1_ps(Bf16(x[0])), _mm256_set1_ps(Bf16(x[1]))};
  }
  static inline XP prep(const float* x) { return {_mm256_set1_ps(x[0]), _mm256_set1_ps(x[1])}; }
  static inline T dot(T acc, WP w, XP x) {
    const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(-65536)));
    return _mm256_fmadd_ps(x.odd, odd, _mm256_fmadd_ps(x.even, even, acc));
  }
  static inline T load(const float* p) { return _mm256_loadu_ps(p); }
  static inline T load_partial(const float* p, int n) {
    alignas(32) float lanes[8] = {};
    for (int i = 0; i < n; ++i) lanes[i] = p[i];
    return _mm256_load_ps(lanes);
  }
  static inline T set1(float a) { return _mm256_set1_ps(a); }
  static inline T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static inline T silu(T g) { return Silu256(g); }
  using HT = float;
  static inline void store_hidden(float* p, T v, int n) {
    if (n >= 8) {
      _mm256_storeu_ps(p, v);
    } else {
      store_partial(p, v, n);
    }
  }
  static inline void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static inline void store_partial(float* p, T v, int n) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, v);
    for (int i = 0; i < n; ++i) p[i] = lanes[i];
  }
};

#include "packed_linear_tiles.inc"
#include "packed_experts_tiles.inc"

}  // namespace packed_avx2

const PackedKernels& PackedAvx2Kernels() { return packed_avx2::kPackedKernels; }
const IsaKernels& PackedExpertsAvx2Kernels() { return packed_avx2::kPackedExpertKernels; }

}  // namespace brownout
