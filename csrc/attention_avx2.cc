// AVX2 copy of the paged-attention item (paged_attention_tiles.inc): 8 fp32 lanes.
#include <immintrin.h>

#include <cstdint>

#include "paged_attention.h"

namespace brownout {
namespace attention_avx2 {

#include "avx2_math.inc"

struct V {
  using T = __m256;
  static constexpr int W = 8;
  static constexpr const char* kName = "avx2";
  static inline T zero() { return _mm256_setzero_ps(); }
  static inline T set1(float a) { return _mm256_set1_ps(a); }
  static inline T load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static inline T load_bf16(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static inline T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static inline T add(T a, T b) { return _mm256_add_ps(a, b); }
  static inline T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static inline T max(T a, T b) { return _mm256_max_ps(a, b); }
  static inline T exp(T a) { return Exp256(a); }
  static inline T mask_lt(T a, T b, T x, float otherwise) {
    return _mm256_blendv_ps(_mm256_set1_ps(otherwise), x, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
  }
  static inline float hsum(T a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline float hmax(T a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#include "paged_attention_tiles.inc"

}  // namespace attention_avx2

const AttentionKernels& AttentionAvx2Kernels() { return attention_avx2::kAttentionKernels; }

}  // namespace brownout
