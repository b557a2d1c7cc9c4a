// AVX-512-BF16 copy of the packed matmul: each 64-byte load of a packed block is 16 columns'
// (w[2p, c], w[2p+1, c]) pairs, multiplied into fp32 lanes by vdpbf16ps with a broadcast x
// pair — no interleaving, no column permute (compare isa_avx512_bf16.cc, which reads the
// stored layout). bf16 x only.
#include <immintrin.h>

#include <cstdint>

#include "packed_linear.h"

namespace brownout {
namespace packed_avx512_bf16 {

#include "avx512_math.inc"

struct V {
  using T = __m512;
  using WP = __m512bh;
  using XP = __m512bh;
  static constexpr int W = 16;
  // 32 registers: 6 rows × 4 accumulators (two 32-column blocks) + 4 weight vectors.
  static constexpr int kRows = 6;
  static constexpr int kBlocks = 2;
  static constexpr const char* kName = "avx512_bf16";
  static constexpr bool kBf16XOnly = true;

  static inline T zero() { return _mm512_setzero_ps(); }
  static inline WP load_pairs(const uint16_t* p) { return (WP)_mm512_loadu_si512(p); }
  static inline XP prep(const uint16_t* x) {
    int32_t pair;
    __builtin_memcpy(&pair, x, sizeof(pair));
    return (XP)_mm512_set1_epi32(pair);
  }
  // Never called (the front sends this copy bf16 x only); kept correct: the pair rounded to
  // bf16 (nearest even), x[0] in each lane's low half as the packed weights have w[2p].
  static inline uint32_t Bf16Bits(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, sizeof(u));
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  }
  static inline XP prep(const float* x) {
    const uint32_t pair = Bf16Bits(x[0]) | (Bf16Bits(x[1]) << 16);
    return (XP)_mm512_set1_epi32(static_cast<int32_t>(pair));
  }
  static inline T dot(T acc, WP w, XP x) { return _mm512_dpbf16_ps(acc, w, x); }
  static inline T load(const float* p) { return _mm512_loadu_ps(p); }
  static inline T load_partial(const float* p, int n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  static inline T set1(float a) { return _mm512_set1_ps(a); }
  static inline T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static inline T silu(T g) { return Silu512(g); }
  // The hidden rows of the experts' SwiGLU (the down projection's x): bf16, as a bf16 model
  // rounds them, and what vdpbf16ps multiplies.
  using HT = uint16_t;
  static inline void store_hidden(uint16_t* p, T v, int n) {
    const __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1), bits);
  }
  static inline void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static inline void store_partial(float* p, T v, int n) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
  }
};

#include "packed_linear_tiles.inc"
#include "packed_experts_tiles.inc"

}  // namespace packed_avx512_bf16

const PackedKernels& PackedAvx512Bf16Kernels() { return packed_avx512_bf16::kPackedKernels; }
const IsaKernels& PackedExpertsAvx512Bf16Kernels() { return packed_avx512_bf16::kPackedExpertKernels; }

}  // namespace brownout
