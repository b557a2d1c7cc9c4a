// AVX2 + FMA copy of the grouped SwiGLU tiles; built with those -m flags only and chosen at
// run time by ffi_grouped_swiglu.cc on CPUs without AVX-512.
#include <immintrin.h>

#include <cstdint>

#include "problem.h"

namespace brownout {
namespace avx2 {

#include "avx2_math.inc"

struct V {
  using T = __m256;
  static constexpr int W = 8;
  static constexpr const char* kName = "avx2";
  // 16 vector registers: 6 rows × (1 gate + 1 up) accumulators + 2 weight vectors = 14.
  static constexpr int kGateUpRows = 6;
  static constexpr int kGateUpVecs = 1;
  static constexpr int kDownRows = 6;
  static constexpr int kDownVecs = 2;

  static inline float scalar_bf16(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float out;
    __builtin_memcpy(&out, &wide, sizeof(out));
    return out;
  }
  static inline T zero() { return _mm256_setzero_ps(); }
  static inline T set1(float a) { return _mm256_set1_ps(a); }
  static inline T load(const float* p) { return _mm256_loadu_ps(p); }
  static inline T Widen(__m128i bits) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  static inline T load_bf16(const uint16_t* p) {
    return Widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // Edge panels only: copy the valid lanes so nothing past the matrix is read.
  static inline T load_partial(const float* p, int n) {
    alignas(32) float t[W] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n && i < W; ++i) t[i] = p[i];
    return _mm256_load_ps(t);
  }
  static inline T load_bf16_partial(const uint16_t* p, int n) {
    alignas(16) uint16_t t[W] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n && i < W; ++i) t[i] = p[i];
    return Widen(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
  }
  static inline void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static inline void store_partial(float* p, T v, int n) {
    alignas(32) float t[W];
    _mm256_store_ps(t, v);
    for (int i = 0; i < n && i < W; ++i) p[i] = t[i];
  }
  static inline T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static inline T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  // exp(x) = 2^n · e^r as in the AVX-512 copy; 2^n built in the exponent bits (n ∈ [-126, 127]).
  static inline T silu(T g) { return Silu256(g); }
};

#include "swiglu_tiles.inc"

}  // namespace avx2

const IsaKernels& Avx2Kernels() { return avx2::kKernels; }

}  // namespace brownout
