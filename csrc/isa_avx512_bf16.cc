// AVX-512-BF16 copy: bfloat16 activations × bfloat16 weights with vdpbf16ps, which multiplies
// pairs of bf16 along the depth and accumulates both products into one fp32 lane — twice the
// multiply-adds of an fp32 FMA per instruction, and no bf16→fp32 widening of the weights.
//
// Weights stay in their stored (depth, columns) layout: two consecutive depth rows of a
// 32-column panel are loaded and interleaved per 128-bit lane (vpunpck{l,h}wd), giving lanes of
// (w[k, c], w[k+1, c]) pairs whose columns come out in the order {0-3, 8-11, 16-19, 24-27} and
// {4-7, …}; the epilogue restores column order with one permute per 16 columns. The SiLU·up
// hidden rows are stored as bf16 (h of the Problem), the input of the down projection — the
// rounding HF's bf16 model applies at the same place.
#include <immintrin.h>

#include <cstdint>

#include "problem.h"

namespace brownout {
namespace avx512_bf16 {

#include "avx512_math.inc"

// Panels of 64 columns: 128 contiguous bytes of each weight row, which the hardware
// prefetcher streams far better than 64 (measured: decode gate/up 4.6 → see BENCHMARKS).
// 32 registers: gate/up 3 rows × 8 accumulators + 8 interleaved weights; down 6 rows × 4 + 4.
#ifndef GU_ROWS
#define GU_ROWS 3
#define GU_COLS 64
#endif
#ifndef DN_ROWS
#define DN_ROWS 6
#define DN_COLS 64
#endif
constexpr int kGateUpRows = GU_ROWS;
constexpr int kDownRows = DN_ROWS;
constexpr int64_t kGateUpCols = GU_COLS;
constexpr int64_t kDownCols = DN_COLS;

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline __mmask32 Mask32(int64_t n) {
  if (n >= 32) return static_cast<__mmask32>(0xFFFFFFFFu);
  if (n <= 0) return 0;
  return static_cast<__mmask32>((1u << n) - 1);
}

inline __mmask16 Mask16(int64_t n) {
  if (n >= 16) return static_cast<__mmask16>(0xFFFF);
  if (n <= 0) return 0;
  return static_cast<__mmask16>((1u << n) - 1);
}

// 32 bf16 of one depth row; masked lanes (past the matrix edge) read nothing and are zero.
template <bool kFull>
inline __m512i LoadRow(const uint16_t* p, int64_t valid) {
  if (kFull) return _mm512_loadu_si512(p);
  return _mm512_maskz_loadu_epi16(Mask32(valid), p);
}

// A bf16 pair (a[k], a[k+1]) broadcast to every lane; the odd last element pairs with 0.
template <bool kPair>
inline __m512bh BroadcastPair(const uint16_t* p) {
  int32_t pair = p[0];
  // One 32-bit load, folded into the broadcast (not two 16-bit loads and a shift).
  if (kPair) __builtin_memcpy(&pair, p, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}

inline void Interleave(__m512i a, __m512i b, __m512bh* lo, __m512bh* hi) {
  *lo = (__m512bh)_mm512_unpacklo_epi16(a, b);
  *hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
}

// Columns 0-15 and 16-31 of a 32-column panel from its interleaved lo/hi accumulators.
inline __m512 Columns0(__m512 lo, __m512 hi) {
  const __m512i idx = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  return _mm512_permutex2var_ps(lo, idx, hi);
}
inline __m512 Columns1(__m512 lo, __m512 hi) {
  const __m512i idx =
      _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  return _mm512_permutex2var_ps(lo, idx, hi);
}

inline void StoreBf16(uint16_t* p, __m512 v, int64_t valid) {
  const __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
  _mm256_mask_storeu_epi16(p, Mask16(valid), bits);
}

// One depth step (a pair of rows k, k+1; or the odd last row k alone) of a gate/up tile.
template <int MR, int Q, bool kFull, bool kPair>
inline void GateUpStep(const uint16_t* __restrict x, int64_t ldx, const uint16_t* __restrict wg,
                       const uint16_t* __restrict wu, int64_t ldw, int64_t k, int64_t ncols,
                       __m512 (&g_lo)[MR][Q], __m512 (&g_hi)[MR][Q], __m512 (&u_lo)[MR][Q],
                       __m512 (&u_hi)[MR][Q]) {
  const __m512i zero = _mm512_setzero_si512();
  __m512bh glo[Q], ghi[Q], ulo[Q], uhi[Q];
#pragma GCC unroll 4
  for (int q = 0; q < Q; ++q) {
    const int64_t valid = ncols - 32 * q;
    const int64_t at = k * ldw + 32 * q;
    Interleave(LoadRow<kFull>(wg + at, valid), kPair ? LoadRow<kFull>(wg + at + ldw, valid) : zero,
               &glo[q], &ghi[q]);
    Interleave(LoadRow<kFull>(wu + at, valid), kPair ? LoadRow<kFull>(wu + at + ldw, valid) : zero,
               &ulo[q], &uhi[q]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512bh xp = BroadcastPair<kPair>(x + r * ldx + k);
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      g_lo[r][q] = _mm512_dpbf16_ps(g_lo[r][q], glo[q], xp);
      g_hi[r][q] = _mm512_dpbf16_ps(g_hi[r][q], ghi[q], xp);
      u_lo[r][q] = _mm512_dpbf16_ps(u_lo[r][q], ulo[q], xp);
      u_hi[r][q] = _mm512_dpbf16_ps(u_hi[r][q], uhi[q], xp);
    }
  }
}

template <int MR, bool kFull>
inline void GateUpTile(const uint16_t* __restrict x, int64_t ldx, const uint16_t* __restrict wg,
                       const uint16_t* __restrict wu, int64_t ldw, int64_t depth, int64_t ncols,
                       uint16_t* __restrict h, int64_t ldh) {
  constexpr int Q = kGateUpCols / 32;
  __m512 g_lo[MR][Q], g_hi[MR][Q], u_lo[MR][Q], u_hi[MR][Q];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      g_lo[r][q] = g_hi[r][q] = u_lo[r][q] = u_hi[r][q] = _mm512_setzero_ps();
    }
  }
  int64_t k = 0;
  for (; k + 1 < depth; k += 2) {
    GateUpStep<MR, Q, kFull, true>(x, ldx, wg, wu, ldw, k, ncols, g_lo, g_hi, u_lo, u_hi);
  }
  if (k < depth) {
    GateUpStep<MR, Q, kFull, false>(x, ldx, wg, wu, ldw, k, ncols, g_lo, g_hi, u_lo, u_hi);
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      const __m512 h0 = _mm512_mul_ps(Silu512(Columns0(g_lo[r][q], g_hi[r][q])),
                                      Columns0(u_lo[r][q], u_hi[r][q]));
      const __m512 h1 = _mm512_mul_ps(Silu512(Columns1(g_lo[r][q], g_hi[r][q])),
                                      Columns1(u_lo[r][q], u_hi[r][q]));
      StoreBf16(h + r * ldh + 32 * q, h0, ncols - 32 * q);
      StoreBf16(h + r * ldh + 32 * q + 16, h1, ncols - 32 * q - 16);
    }
  }
}

// One depth step of a down tile (a pair of rows of w_down, or the odd last row alone).
template <int MR, int Q, bool kFull, bool kPair>
inline void DownStep(const uint16_t* __restrict h, int64_t ldh, const uint16_t* __restrict wd,
                     int64_t ldw, int64_t k, int64_t ncols, __m512 (&lo)[MR][Q],
                     __m512 (&hi)[MR][Q]) {
  const __m512i zero = _mm512_setzero_si512();
  __m512bh wlo[Q], whi[Q];
#pragma GCC unroll 4
  for (int q = 0; q < Q; ++q) {
    const int64_t valid = ncols - 32 * q;
    const int64_t at = k * ldw + 32 * q;
    Interleave(LoadRow<kFull>(wd + at, valid), kPair ? LoadRow<kFull>(wd + at + ldw, valid) : zero,
               &wlo[q], &whi[q]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m512bh hp = BroadcastPair<kPair>(h + r * ldh + k);
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      lo[r][q] = _mm512_dpbf16_ps(lo[r][q], wlo[q], hp);
      hi[r][q] = _mm512_dpbf16_ps(hi[r][q], whi[q], hp);
    }
  }
}

template <int MR, bool kFull>
inline void DownTile(const uint16_t* __restrict h, int64_t ldh, const uint16_t* __restrict wd,
                     int64_t ldw, int64_t depth, int64_t ncols, const float* __restrict row_weight,
                     float* __restrict y, int64_t ldy) {
  constexpr int Q = kDownCols / 32;
  __m512 lo[MR][Q], hi[MR][Q];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) lo[r][q] = hi[r][q] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 1 < depth; k += 2) DownStep<MR, Q, kFull, true>(h, ldh, wd, ldw, k, ncols, lo, hi);
  if (k < depth) DownStep<MR, Q, kFull, false>(h, ldh, wd, ldw, k, ncols, lo, hi);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m512 scale = _mm512_set1_ps(row_weight == nullptr ? 1.0f : row_weight[r]);
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      float* out = y + r * ldy + 32 * q;
      const int64_t valid = ncols - 32 * q;
      _mm512_mask_storeu_ps(out, Mask16(valid), _mm512_mul_ps(Columns0(lo[r][q], hi[r][q]), scale));
      _mm512_mask_storeu_ps(out + 16, Mask16(valid - 16),
                            _mm512_mul_ps(Columns1(lo[r][q], hi[r][q]), scale));
    }
  }
}

template <bool kFull, int MR>
inline void GateUpRows(const Problem& p, int64_t row0, int64_t rows, const uint16_t* wg,
                       const uint16_t* wu, int64_t col0, int64_t ncols) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  uint16_t* h = static_cast<uint16_t*>(p.h);
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) {
    GateUpTile<MR, kFull>(x + (row0 + r) * p.d, p.d, wg, wu, p.f, p.d, ncols,
                          h + (row0 + r) * p.f + col0, p.f);
  }
  if (r < rows) {
    if constexpr (MR > 1) GateUpRows<kFull, MR - 1>(p, row0 + r, rows - r, wg, wu, col0, ncols);
  }
}

template <bool kFull, int MR>
inline void DownRows(const Problem& p, int64_t row0, int64_t rows, const uint16_t* wd,
                     int64_t col0, int64_t ncols) {
  const uint16_t* h = static_cast<const uint16_t*>(p.h);
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) {
    if (NoRowValid(p, row0 + r, MR)) {
      ZeroRows(p.y + (row0 + r) * p.d + col0, p.d, MR, ncols);
      continue;
    }
    DownTile<MR, kFull>(h + (row0 + r) * p.f, p.f, wd, p.d, p.f, ncols,
                        p.row_weights == nullptr ? nullptr : p.row_weights + row0 + r,
                        p.y + (row0 + r) * p.d + col0, p.d);
  }
  if (r < rows) {
    if constexpr (MR > 1) DownRows<kFull, MR - 1>(p, row0 + r, rows - r, wd, col0, ncols);
  }
}

void GateUpItem(const Problem& p, int64_t item) {
  const int64_t panels = CeilDiv(p.f, kGateUpCols);
  const int64_t slot = item / panels;
  const int64_t col0 = (item % panels) * kGateUpCols;
  const int64_t ncols = Min64(kGateUpCols, p.f - col0);
  const int64_t offset = p.active_group[slot] * p.d * p.f + col0;
  const uint16_t* wg = static_cast<const uint16_t*>(p.w_gate) + offset;
  const uint16_t* wu = static_cast<const uint16_t*>(p.w_up) + offset;
  if (ncols == kGateUpCols) {
    GateUpRows<true, kGateUpRows>(p, p.active_row0[slot], p.active_rows[slot], wg, wu, col0, ncols);
  } else {
    GateUpRows<false, kGateUpRows>(p, p.active_row0[slot], p.active_rows[slot], wg, wu, col0, ncols);
  }
}

void DownItem(const Problem& p, int64_t item) {
  const int64_t panels = CeilDiv(p.d, kDownCols);
  const int64_t slot = item / panels;
  const int64_t col0 = (item % panels) * kDownCols;
  const int64_t ncols = Min64(kDownCols, p.d - col0);
  const uint16_t* wd = static_cast<const uint16_t*>(p.w_down) + p.active_group[slot] * p.f * p.d + col0;
  if (ncols == kDownCols) {
    DownRows<true, kDownRows>(p, p.active_row0[slot], p.active_rows[slot], wd, col0, ncols);
  } else {
    DownRows<false, kDownRows>(p, p.active_row0[slot], p.active_rows[slot], wd, col0, ncols);
  }
}

const IsaKernels kKernels = {"avx512_bf16", ElementType::kBF16, kGateUpCols,
                             kDownCols,     &GateUpItem,       &DownItem};

}  // namespace avx512_bf16

const IsaKernels& Avx512Bf16Kernels() { return avx512_bf16::kKernels; }

}  // namespace brownout
