// AVX-512 copy of the paged-attention item (paged_attention_tiles.inc): 16 fp32 lanes; bf16
// keys and values widened by a zero-extend and a shift (AVX-512F/BW, no BF16 extension).
#include <immintrin.h>

#include <cstdint>

#include "paged_attention.h"

namespace brownout {
namespace attention_avx512 {

#include "avx512_math.inc"

struct V {
  using T = __m512;
  static constexpr int W = 16;
  static constexpr const char* kName = "avx512";
  static inline T zero() { return _mm512_setzero_ps(); }
  static inline T set1(float a) { return _mm512_set1_ps(a); }
  static inline T load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static inline T load_bf16(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static inline T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static inline T add(T a, T b) { return _mm512_add_ps(a, b); }
  static inline T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static inline T max(T a, T b) { return _mm512_max_ps(a, b); }
  static inline T exp(T a) { return Exp512(a); }
  static inline T mask_lt(T a, T b, T x, float otherwise) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), _mm512_set1_ps(otherwise), x);
  }
  static inline float hsum(T a) { return _mm512_reduce_add_ps(a); }
  static inline float hmax(T a) { return _mm512_reduce_max_ps(a); }
};

#include "paged_attention_tiles.inc"

}  // namespace attention_avx512

const AttentionKernels& AttentionAvx512Kernels() { return attention_avx512::kAttentionKernels; }

}  // namespace brownout
