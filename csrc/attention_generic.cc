// Portable scalar copy of the paged-attention item (any CPU, any head dimension; the slow
// twin the vector copies are tested against).
#include <cmath>
#include <cstdint>

#include "paged_attention.h"

namespace brownout {
namespace attention_generic {

struct V {
  using T = float;
  static constexpr int W = 1;
  static constexpr const char* kName = "generic";
  static inline T zero() { return 0.0f; }
  static inline T set1(float a) { return a; }
  static inline T load(const float* p) { return *p; }
  static inline void store(float* p, T v) { *p = v; }
  static inline T load_bf16(const uint16_t* p) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float out;
    __builtin_memcpy(&out, &bits, sizeof(out));
    return out;
  }
  static inline T fmadd(T a, T b, T c) { return a * b + c; }
  static inline T add(T a, T b) { return a + b; }
  static inline T sub(T a, T b) { return a - b; }
  static inline T max(T a, T b) { return a > b ? a : b; }
  static inline T exp(T a) { return std::exp(a < -87.0f ? -87.0f : a); }
  static inline T mask_lt(T a, T b, T x, float otherwise) { return a < b ? x : otherwise; }
  static inline float hsum(T a) { return a; }
  static inline float hmax(T a) { return a; }
};

#include "paged_attention_tiles.inc"

}  // namespace attention_generic

const AttentionKernels& AttentionGenericKernels() { return attention_generic::kAttentionKernels; }

}  // namespace brownout
