// Portable scalar copy of the grouped SwiGLU tiles (one float per "vector"): the fallback on
// CPUs without AVX2 and on other architectures. Built with the compiler's default flags.
#include <cmath>
#include <cstdint>

#include "problem.h"

namespace brownout {
namespace generic {

struct V {
  using T = float;
  static constexpr int W = 1;
  static constexpr const char* kName = "generic";
  static constexpr int kGateUpRows = 4;
  static constexpr int kGateUpVecs = 8;
  static constexpr int kDownRows = 4;
  static constexpr int kDownVecs = 8;

  static inline float scalar_bf16(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float out;
    __builtin_memcpy(&out, &wide, sizeof(out));
    return out;
  }
  static inline T zero() { return 0.0f; }
  static inline T set1(float a) { return a; }
  static inline T load(const float* p) { return *p; }
  static inline T load_bf16(const uint16_t* p) { return scalar_bf16(*p); }
  static inline T load_partial(const float* p, int n) { return n > 0 ? load(p) : 0.0f; }
  static inline T load_bf16_partial(const uint16_t* p, int n) {
    return n > 0 ? load_bf16(p) : 0.0f;
  }
  static inline void store(float* p, T v) { *p = v; }
  static inline void store_partial(float* p, T v, int n) {
    if (n > 0) *p = v;
  }
  static inline T fma(T a, T b, T c) { return a * b + c; }  // no libm fma: slow without FMA
  static inline T mul(T a, T b) { return a * b; }
  static inline T silu(T g) { return g / (1.0f + std::exp(-g)); }
};

#include "swiglu_tiles.inc"

}  // namespace generic

const IsaKernels& GenericKernels() { return generic::kKernels; }

}  // namespace brownout
