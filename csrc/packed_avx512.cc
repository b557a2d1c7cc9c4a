// AVX-512 (F, BW, VL) copy of the packed matmul, for CPUs without the bf16 dot product: each
// 32-bit lane of a packed block, (w[2p, c], w[2p+1, c]), is widened into its two fp32 halves
// (a shift and a mask) and multiplied by x[2p] and x[2p+1] with two FMAs. x float32 or bf16.
#include <immintrin.h>

#include <cstdint>

#include "packed_linear.h"

namespace brownout {
namespace packed_avx512 {

#include "avx512_math.inc"

struct V {
  struct Pair {
    __m512 even, odd;
  };
  using T = __m512;
  using WP = __m512i;
  using XP = Pair;
  static constexpr int W = 16;
  static constexpr int kRows = 4;  // 4 rows × 4 accumulators + 4 weights + 2 widened
  static constexpr int kBlocks = 2;
  static constexpr const char* kName = "avx512";
  static constexpr bool kBf16XOnly = false;

  static inline float Bf16(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float out;
    __builtin_memcpy(&out, &wide, sizeof(out));
    return out;
  }
  static inline T zero() { return _mm512_setzero_ps(); }
  static inline WP load_pairs(const uint16_t* p) { return _mm512_loadu_si512(p); }
  static inline XP prep(const uint16_t* x) {
    return {_mm512_set1_ps(Bf16(x[0])), _mm512_set1_ps(Bf16(x[1]))};
  }
  static inline XP prep(const float* x) { return {_mm512_set1_ps(x[0]), _mm512_set1_ps(x[1])}; }
  static inline T dot(T acc, WP w, XP x) {
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(-65536)));
    return _mm512_fmadd_ps(x.odd, odd, _mm512_fmadd_ps(x.even, even, acc));
  }
  static inline T load(const float* p) { return _mm512_loadu_ps(p); }
  static inline T load_partial(const float* p, int n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  static inline T set1(float a) { return _mm512_set1_ps(a); }
  static inline T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static inline T silu(T g) { return Silu512(g); }
  using HT = float;
  static inline void store_hidden(float* p, T v, int n) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1), v);
  }
  static inline void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static inline void store_partial(float* p, T v, int n) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
  }
};

#include "packed_linear_tiles.inc"
#include "packed_experts_tiles.inc"

}  // namespace packed_avx512

const PackedKernels& PackedAvx512Kernels() { return packed_avx512::kPackedKernels; }
const IsaKernels& PackedExpertsAvx512Kernels() { return packed_avx512::kPackedExpertKernels; }

}  // namespace brownout
