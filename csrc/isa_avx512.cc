// AVX-512 (F, BW, VL) copy of the grouped SwiGLU tiles; built with those -m flags only and
// chosen at run time by ffi_grouped_swiglu.cc when the CPU has them.
#include <immintrin.h>

#include <cstdint>

#include "problem.h"

namespace brownout {
namespace avx512 {

#include "avx512_math.inc"

struct V {
  using T = __m512;
  static constexpr int W = 16;
  static constexpr const char* kName = "avx512";
  // 32 vector registers: 6 rows × (2 gate + 2 up) accumulators + 4 weight vectors = 28.
  static constexpr int kGateUpRows = 6;
  static constexpr int kGateUpVecs = 2;
  static constexpr int kDownRows = 6;
  static constexpr int kDownVecs = 4;

  static inline __mmask16 Mask(int n) {
    if (n >= W) return static_cast<__mmask16>(0xFFFF);
    if (n <= 0) return 0;
    return static_cast<__mmask16>((1u << n) - 1);
  }
  static inline float scalar_bf16(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float out;
    __builtin_memcpy(&out, &wide, sizeof(out));
    return out;
  }
  static inline T zero() { return _mm512_setzero_ps(); }
  static inline T set1(float a) { return _mm512_set1_ps(a); }
  static inline T load(const float* p) { return _mm512_loadu_ps(p); }
  static inline T Widen(__m256i bits) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  static inline T load_bf16(const uint16_t* p) {
    return Widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // Masked loads never touch (or fault on) the lanes left out.
  static inline T load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(Mask(n), p); }
  static inline T load_bf16_partial(const uint16_t* p, int n) {
    return Widen(_mm256_maskz_loadu_epi16(Mask(n), p));
  }
  static inline void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static inline void store_partial(float* p, T v, int n) { _mm512_mask_storeu_ps(p, Mask(n), v); }
  static inline T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static inline T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static inline T silu(T g) { return Silu512(g); }
};

#include "swiglu_tiles.inc"

}  // namespace avx512

const IsaKernels& Avx512Kernels() { return avx512::kKernels; }

}  // namespace brownout
