// Portable scalar copy of the packed matmul (any CPU; the slow twin of the vector copies):
// 8 columns of fp32 per "vector", each packed lane split into its two bf16 halves.
#include <cmath>
#include <cstdint>

#include "packed_linear.h"

namespace brownout {
namespace packed_generic {

struct V {
  struct Vec {
    float v[8];
  };
  struct Lanes {
    uint32_t v[8];
  };
  struct Pair {
    float even, odd;
  };
  using T = Vec;
  using WP = Lanes;
  using XP = Pair;
  static constexpr int W = 8;
  static constexpr int kRows = 2;
  static constexpr int kBlocks = 1;
  static constexpr const char* kName = "generic";
  static constexpr bool kBf16XOnly = false;

  static inline float Bits(uint32_t bits) {
    float out;
    __builtin_memcpy(&out, &bits, sizeof(out));
    return out;
  }
  static inline T zero() { return T{}; }
  static inline WP load_pairs(const uint16_t* p) {
    WP w;
    __builtin_memcpy(w.v, p, sizeof(w.v));
    return w;
  }
  static inline XP prep(const uint16_t* x) {
    return {Bits(static_cast<uint32_t>(x[0]) << 16), Bits(static_cast<uint32_t>(x[1]) << 16)};
  }
  static inline XP prep(const float* x) { return {x[0], x[1]}; }
  static inline T dot(T acc, WP w, XP x) {
    for (int i = 0; i < W; ++i) {
      acc.v[i] += Bits(w.v[i] << 16) * x.even + Bits(w.v[i] & 0xFFFF0000u) * x.odd;
    }
    return acc;
  }
  static inline T load(const float* p) { return load_partial(p, W); }
  static inline T load_partial(const float* p, int n) {
    T v{};
    for (int i = 0; i < n; ++i) v.v[i] = p[i];
    return v;
  }
  static inline T set1(float a) {
    T v;
    for (int i = 0; i < W; ++i) v.v[i] = a;
    return v;
  }
  static inline T mul(T a, T b) {
    for (int i = 0; i < W; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static inline T silu(T g) {
    for (int i = 0; i < W; ++i) g.v[i] = g.v[i] / (1.0f + std::exp(-g.v[i]));
    return g;
  }
  using HT = float;
  static inline void store_hidden(float* p, T v, int n) { store_partial(p, v, n < W ? n : W); }
  static inline void store(float* p, T v) {
    for (int i = 0; i < W; ++i) p[i] = v.v[i];
  }
  static inline void store_partial(float* p, T v, int n) {
    for (int i = 0; i < n; ++i) p[i] = v.v[i];
  }
};

#include "packed_linear_tiles.inc"
#include "packed_experts_tiles.inc"

}  // namespace packed_generic

const PackedKernels& PackedGenericKernels() { return packed_generic::kPackedKernels; }
const IsaKernels& PackedExpertsGenericKernels() { return packed_generic::kPackedExpertKernels; }

}  // namespace brownout
