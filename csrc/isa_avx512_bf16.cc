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

// Panels of 64 columns (128 contiguous bytes of each weight row). 32 registers: gate/up
// 3 rows × 8 accumulators + 8 interleaved weights; down 6 rows × 4 + 4.
constexpr int kGateUpRows = 3;
constexpr int kDownRows = 6;
constexpr int64_t kGateUpCols = 64;
constexpr int64_t kDownCols = 64;

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

// Epilogues shared by the streamed and the packed tiles (accumulators in (lo, hi) column
// halves of each 32-column vector pair, see Columns0/Columns1).
template <int MR, int Q>
inline void ZeroAccumulators(__m512 (&lo)[MR][Q], __m512 (&hi)[MR][Q]) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) lo[r][q] = hi[r][q] = _mm512_setzero_ps();
  }
}

// h = SiLU(gate) · up, rounded to bf16.
template <int MR, int Q>
inline void StoreSiluProduct(__m512 (&g_lo)[MR][Q], __m512 (&g_hi)[MR][Q],
                             __m512 (&u_lo)[MR][Q], __m512 (&u_hi)[MR][Q], int64_t ncols,
                             uint16_t* __restrict h, int64_t ldh) {
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

// y = row weight · accumulators, fp32 (no weight: 1).
template <int MR, int Q>
inline void StoreScaled(__m512 (&lo)[MR][Q], __m512 (&hi)[MR][Q], int64_t ncols,
                        const float* __restrict row_weight, float* __restrict y, int64_t ldy) {
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

template <int MR, bool kFull>
inline void GateUpTile(const uint16_t* __restrict x, int64_t ldx, const uint16_t* __restrict wg,
                       const uint16_t* __restrict wu, int64_t ldw, int64_t depth, int64_t ncols,
                       uint16_t* __restrict h, int64_t ldh) {
  constexpr int Q = kGateUpCols / 32;
  __m512 g_lo[MR][Q], g_hi[MR][Q], u_lo[MR][Q], u_hi[MR][Q];
  ZeroAccumulators<MR, Q>(g_lo, g_hi);
  ZeroAccumulators<MR, Q>(u_lo, u_hi);
  int64_t k = 0;
  for (; k + 1 < depth; k += 2) {
    GateUpStep<MR, Q, kFull, true>(x, ldx, wg, wu, ldw, k, ncols, g_lo, g_hi, u_lo, u_hi);
  }
  if (k < depth) {
    GateUpStep<MR, Q, kFull, false>(x, ldx, wg, wu, ldw, k, ncols, g_lo, g_hi, u_lo, u_hi);
  }
  StoreSiluProduct<MR, Q>(g_lo, g_hi, u_lo, u_hi, ncols, h, ldh);
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
  ZeroAccumulators<MR, Q>(lo, hi);
  int64_t k = 0;
  for (; k + 1 < depth; k += 2) DownStep<MR, Q, kFull, true>(h, ldh, wd, ldw, k, ncols, lo, hi);
  if (k < depth) DownStep<MR, Q, kFull, false>(h, ldh, wd, ldw, k, ncols, lo, hi);
  StoreScaled<MR, Q>(lo, hi, ncols, row_weight, y, ldy);
}

// ---------------------------------------------------------------- packed panels
// A panel's rows lie a whole matrix row apart (2.8 KB in an expert, 303 KB in an LM head), a
// stride that maps every row into the same few cache sets: walked once per row block, the
// panel is refetched from memory for each block and the hardware prefetchers never engage.
// When a group has several row blocks, its panel is first copied into per-thread scratch in
// the order the tiles read it — per depth pair, Q × (lo, hi) interleaved vectors — so every
// block reads one contiguous, cache-resident run and does no interleaving of its own.

template <int Q>
constexpr int64_t PackedVectors(int64_t depth) {
  return (depth + 1) / 2 * 2 * Q;
}

template <int Q, bool kFull>
inline void PackPanel(const uint16_t* __restrict w, int64_t ldw, int64_t depth, int64_t ncols,
                      __m512i* __restrict out) {
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t k = 0; k < depth; k += 2) {
    const bool pair = k + 1 < depth;
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      const int64_t valid = ncols - 32 * q;
      const uint16_t* row = w + k * ldw + 32 * q;
      const __m512i a = LoadRow<kFull>(row, valid);
      const __m512i b = pair ? LoadRow<kFull>(row + ldw, valid) : zero;
      out[0] = _mm512_unpacklo_epi16(a, b);
      out[1] = _mm512_unpackhi_epi16(a, b);
      out += 2;
    }
  }
}

// acc[r][q] lo/hi += packed panel · x rows, over all depth pairs.
template <int MR, int Q>
inline void PackedDots(const uint16_t* __restrict x, int64_t ldx, const __m512i* __restrict panel,
                       int64_t depth, __m512 (&lo)[MR][Q], __m512 (&hi)[MR][Q]) {
  int64_t k = 0;
  for (; k + 1 < depth; k += 2, panel += 2 * Q) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh xp = BroadcastPair<true>(x + r * ldx + k);
#pragma GCC unroll 4
      for (int q = 0; q < Q; ++q) {
        lo[r][q] = _mm512_dpbf16_ps(lo[r][q], (__m512bh)_mm512_load_si512(panel + 2 * q), xp);
        hi[r][q] = _mm512_dpbf16_ps(hi[r][q], (__m512bh)_mm512_load_si512(panel + 2 * q + 1), xp);
      }
    }
  }
  if (k < depth) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh xp = BroadcastPair<false>(x + r * ldx + k);
#pragma GCC unroll 4
      for (int q = 0; q < Q; ++q) {
        lo[r][q] = _mm512_dpbf16_ps(lo[r][q], (__m512bh)_mm512_load_si512(panel + 2 * q), xp);
        hi[r][q] = _mm512_dpbf16_ps(hi[r][q], (__m512bh)_mm512_load_si512(panel + 2 * q + 1), xp);
      }
    }
  }
}

template <int MR>
inline void GateUpTilePacked(const uint16_t* __restrict x, int64_t ldx, const __m512i* gate,
                             const __m512i* up, int64_t depth, int64_t ncols,
                             uint16_t* __restrict h, int64_t ldh) {
  constexpr int Q = kGateUpCols / 32;
  __m512 g_lo[MR][Q], g_hi[MR][Q], u_lo[MR][Q], u_hi[MR][Q];
  ZeroAccumulators<MR, Q>(g_lo, g_hi);
  ZeroAccumulators<MR, Q>(u_lo, u_hi);
  PackedDots<MR, Q>(x, ldx, gate, depth, g_lo, g_hi);
  PackedDots<MR, Q>(x, ldx, up, depth, u_lo, u_hi);
  StoreSiluProduct<MR, Q>(g_lo, g_hi, u_lo, u_hi, ncols, h, ldh);
}

template <int MR>
inline void DownTilePacked(const uint16_t* __restrict h, int64_t ldh, const __m512i* panel,
                           int64_t depth, int64_t ncols, const float* __restrict row_weight,
                           float* __restrict y, int64_t ldy) {
  constexpr int Q = kDownCols / 32;
  __m512 lo[MR][Q], hi[MR][Q];
  ZeroAccumulators<MR, Q>(lo, hi);
  PackedDots<MR, Q>(h, ldh, panel, depth, lo, hi);
  StoreScaled<MR, Q>(lo, hi, ncols, row_weight, y, ldy);
}

template <int MR>
inline void GateUpRowsPacked(const Problem& p, int64_t row0, int64_t rows, const __m512i* gate,
                             const __m512i* up, int64_t col0, int64_t ncols) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  uint16_t* h = static_cast<uint16_t*>(p.h);
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) {
    GateUpTilePacked<MR>(x + (row0 + r) * p.d, p.d, gate, up, p.d, ncols,
                         h + (row0 + r) * p.f + col0, p.f);
  }
  if (r < rows) {
    if constexpr (MR > 1) GateUpRowsPacked<MR - 1>(p, row0 + r, rows - r, gate, up, col0, ncols);
  }
}

template <bool kFull, int MR>
inline void GateUpRows(const Problem& p, int64_t row0, int64_t rows, const uint16_t* wg,
                       const uint16_t* wu, int64_t col0, int64_t ncols, float* scratch) {
  if (rows > MR) {
    constexpr int Q = kGateUpCols / 32;
    __m512i* gate = reinterpret_cast<__m512i*>(scratch);
    __m512i* up = gate + PackedVectors<Q>(p.d);
    PackPanel<Q, kFull>(wg, p.f, p.d, ncols, gate);
    PackPanel<Q, kFull>(wu, p.f, p.d, ncols, up);
    GateUpRowsPacked<MR>(p, row0, rows, gate, up, col0, ncols);
    return;
  }
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  uint16_t* h = static_cast<uint16_t*>(p.h);
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) {
    GateUpTile<MR, kFull>(x + (row0 + r) * p.d, p.d, wg, wu, p.f, p.d, ncols,
                          h + (row0 + r) * p.f + col0, p.f);
  }
  if (r < rows) {
    if constexpr (MR > 1) {
      GateUpRows<kFull, MR - 1>(p, row0 + r, rows - r, wg, wu, col0, ncols, scratch);
    }
  }
}

template <int MR>
inline void DownRowsPacked(const Problem& p, int64_t row0, int64_t rows, const __m512i* panel,
                           int64_t col0, int64_t ncols) {
  const uint16_t* h = static_cast<const uint16_t*>(p.h);
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) {
    if (NoRowValid(p, row0 + r, MR)) {
      ZeroRows(p.y + (row0 + r) * p.d + col0, p.d, MR, ncols);
      continue;
    }
    DownTilePacked<MR>(h + (row0 + r) * p.f, p.f, panel, p.f, ncols,
                       p.row_weights == nullptr ? nullptr : p.row_weights + row0 + r,
                       p.y + (row0 + r) * p.d + col0, p.d);
  }
  if (r < rows) {
    if constexpr (MR > 1) DownRowsPacked<MR - 1>(p, row0 + r, rows - r, panel, col0, ncols);
  }
}

template <bool kFull, int MR>
inline void DownRows(const Problem& p, int64_t row0, int64_t rows, const uint16_t* wd,
                     int64_t col0, int64_t ncols, float* scratch) {
  if (rows > MR) {
    __m512i* panel = reinterpret_cast<__m512i*>(scratch);
    PackPanel<kDownCols / 32, kFull>(wd, p.d, p.f, ncols, panel);
    DownRowsPacked<MR>(p, row0, rows, panel, col0, ncols);
    return;
  }
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
    if constexpr (MR > 1) DownRows<kFull, MR - 1>(p, row0 + r, rows - r, wd, col0, ncols, scratch);
  }
}

void GateUpItem(const Problem& p, int64_t item, float* scratch) {
  const int64_t panels = CeilDiv(p.f, kGateUpCols);
  const int64_t slot = item / panels;
  const int64_t col0 = (item % panels) * kGateUpCols;
  const int64_t ncols = Min64(kGateUpCols, p.f - col0);
  const int64_t offset = p.active_group[slot] * p.d * p.f + col0;
  const uint16_t* wg = static_cast<const uint16_t*>(p.w_gate) + offset;
  const uint16_t* wu = static_cast<const uint16_t*>(p.w_up) + offset;
  if (ncols == kGateUpCols) {
    GateUpRows<true, kGateUpRows>(p, p.active_row0[slot], p.active_rows[slot], wg, wu, col0, ncols,
                                  scratch);
  } else {
    GateUpRows<false, kGateUpRows>(p, p.active_row0[slot], p.active_rows[slot], wg, wu, col0,
                                   ncols, scratch);
  }
}

// A down item covers kSuperPanels adjacent panels. With several row blocks it packs them all
// in one pass over the depth, reading 64 · kSuperPanels contiguous columns of each row (1 KB)
// instead of one panel's 128 bytes at a time: the strided first read of the weights, the
// dominant cost of a decode-sized LM head, then streams several times faster.
constexpr int64_t kSuperPanels = 4;  // 1 MB of packed panels per thread (L2) for D = 2048

inline void PackSuperPanel(const uint16_t* __restrict w, int64_t ldw, int64_t depth,
                           int64_t ncols, int64_t panels, __m512i* __restrict out) {
  constexpr int Q = kDownCols / 32;
  const int64_t stride = PackedVectors<Q>(depth);  // vectors per packed panel
  const __m512i zero = _mm512_setzero_si512();
  const int64_t bytes = ncols * static_cast<int64_t>(sizeof(uint16_t));
  for (int64_t k = 0, j = 0; k < depth; k += 2, j += 2 * Q) {
    const bool pair = k + 1 < depth;
    if (k + 3 < depth) {  // the next pair's rows: their stride defeats the prefetchers
      const char* ahead = reinterpret_cast<const char*>(w + (k + 2) * ldw);
      for (int64_t b = 0; b < bytes; b += 64) {
        _mm_prefetch(ahead + b, _MM_HINT_T0);
        _mm_prefetch(ahead + 2 * ldw + b, _MM_HINT_T0);
      }
    }
    for (int64_t g = 0; g < panels; ++g) {
#pragma GCC unroll 4
      for (int q = 0; q < Q; ++q) {
        const int64_t c = g * kDownCols + 32 * q;
        const uint16_t* row = w + k * ldw + c;
        const __m512i a = LoadRow<false>(row, ncols - c);
        const __m512i b = pair ? LoadRow<false>(row + ldw, ncols - c) : zero;
        __m512i* at = out + g * stride + j + 2 * q;
        at[0] = _mm512_unpacklo_epi16(a, b);
        at[1] = _mm512_unpackhi_epi16(a, b);
      }
    }
  }
}

void DownItem(const Problem& p, int64_t item, float* scratch) {
  const int64_t width = kDownCols * kSuperPanels;
  const int64_t items_per_slot = CeilDiv(p.d, width);
  const int64_t slot = item / items_per_slot;
  const int64_t first = (item % items_per_slot) * width;
  const int64_t cols = Min64(width, p.d - first);
  const int64_t panels = CeilDiv(cols, kDownCols);
  const uint16_t* wd =
      static_cast<const uint16_t*>(p.w_down) + p.active_group[slot] * p.f * p.d + first;
  const int64_t row0 = p.active_row0[slot], rows = p.active_rows[slot];
  if (rows > kDownRows) {
    __m512i* packed = reinterpret_cast<__m512i*>(scratch);
    PackSuperPanel(wd, p.d, p.f, cols, panels, packed);
    const int64_t stride = PackedVectors<kDownCols / 32>(p.f);
    for (int64_t g = 0; g < panels; ++g) {
      const int64_t col0 = first + g * kDownCols;
      DownRowsPacked<kDownRows>(p, row0, rows, packed + g * stride, col0,
                                Min64(kDownCols, p.d - col0));
    }
    return;
  }
  for (int64_t g = 0; g < panels; ++g) {
    const int64_t col0 = first + g * kDownCols;
    const int64_t ncols = Min64(kDownCols, p.d - col0);
    if (ncols == kDownCols) {
      DownRows<true, kDownRows>(p, row0, rows, wd + g * kDownCols, col0, ncols, scratch);
    } else {
      DownRows<false, kDownRows>(p, row0, rows, wd + g * kDownCols, col0, ncols, scratch);
    }
  }
}

// ---------------------------------------------------------------- whole-group streaming
// For a group of a few rows the cost is reading its weights, and a reader is fastest walking
// memory front to back: one item reads each matrix row after row (all columns), so every
// weight byte arrives in order, and each thread streams its own group. Accumulators for all
// columns live in `scratch` (L1/L2-resident: a few rows × F floats), in the interleaved
// lo/hi column order of the pair dot products, restored once when a result row is written.

constexpr int64_t kStreamMaxRows = 4;
constexpr int kStreamPairs = 4;  // depth pairs per pass over the columns (measured: 1 → 4 = 1.4×)

// acc[r][c … c+31] (chunk of 32 columns as lo 16 | hi 16) += Σ_k x[r, k] · w[k, c + j] for
// k in [k0, k0 + 2·KP): KP row pairs per pass over the columns, so each accumulator is loaded
// and stored once per KP pairs (KP = 1 for the odd tail, with kPair false on its last row).
template <int MR, int KP, bool kPair>
inline void StreamPass(const uint16_t* __restrict x, int64_t ldx, const uint16_t* __restrict w,
                       int64_t k0, int64_t ncols, float* __restrict acc, int64_t ldacc) {
  __m512bh xp[KP][MR];
#pragma GCC unroll 4
  for (int q = 0; q < KP; ++q) {
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) xp[q][r] = BroadcastPair<kPair>(x + r * ldx + k0 + 2 * q);
  }
  const uint16_t* base = w + k0 * ncols;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t c = 0; c < ncols; c += 32) {
    const int64_t valid = ncols - c;
    __m512bh lo[KP], hi[KP];
#pragma GCC unroll 4
    for (int q = 0; q < KP; ++q) {
      const uint16_t* row = base + 2 * q * ncols + c;
      const __m512i a = valid >= 32 ? _mm512_loadu_si512(row) : LoadRow<false>(row, valid);
      const __m512i b = !kPair         ? zero
                        : valid >= 32 ? _mm512_loadu_si512(row + ncols)
                                      : LoadRow<false>(row + ncols, valid);
      Interleave(a, b, &lo[q], &hi[q]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      float* at = acc + r * ldacc + c;
      __m512 acc_lo = _mm512_loadu_ps(at), acc_hi = _mm512_loadu_ps(at + 16);
#pragma GCC unroll 4
      for (int q = 0; q < KP; ++q) {
        acc_lo = _mm512_dpbf16_ps(acc_lo, lo[q], xp[q][r]);
        acc_hi = _mm512_dpbf16_ps(acc_hi, hi[q], xp[q][r]);
      }
      _mm512_storeu_ps(at, acc_lo);
      _mm512_storeu_ps(at + 16, acc_hi);
    }
  }
}

template <int MR>
inline void StreamRows(const uint16_t* __restrict x, int64_t ldx, const uint16_t* __restrict w,
                       int64_t depth, int64_t ncols, float* __restrict acc, int64_t ldacc) {
  constexpr int KP = kStreamPairs;
  int64_t k = 0;
  for (; k + 2 * KP <= depth; k += 2 * KP) StreamPass<MR, KP, true>(x, ldx, w, k, ncols, acc, ldacc);
  for (; k + 2 <= depth; k += 2) StreamPass<MR, 1, true>(x, ldx, w, k, ncols, acc, ldacc);
  if (k < depth) StreamPass<MR, 1, false>(x, ldx, w, k, ncols, acc, ldacc);
}

template <int MR>
inline void StreamGroup(const Problem& p, int64_t group, int64_t row0, float* scratch) {
  const int64_t d = p.d, f = p.f;
  const int64_t f32 = (f + 31) / 32 * 32, d32 = (d + 31) / 32 * 32;
  float* acc_gate = scratch;             // MR × f32
  float* acc_up = acc_gate + MR * f32;   // MR × f32
  float* acc_y = acc_up + MR * f32;      // MR × d32
  for (int64_t i = 0; i < MR * (2 * f32 + d32); ++i) scratch[i] = 0.0f;
  const uint16_t* x = static_cast<const uint16_t*>(p.x) + row0 * d;
  const int64_t offset = group * d * f;
  StreamRows<MR>(x, d, static_cast<const uint16_t*>(p.w_gate) + offset, d, f, acc_gate, f32);
  StreamRows<MR>(x, d, static_cast<const uint16_t*>(p.w_up) + offset, d, f, acc_up, f32);
  // h = SiLU(gate) · up, bf16, in column order: the down projection's input rows.
  uint16_t* h = static_cast<uint16_t*>(p.h) + row0 * f;
  for (int r = 0; r < MR; ++r) {
    for (int64_t c = 0; c < f; c += 32) {
      const float* g = acc_gate + r * f32 + c;
      const float* u = acc_up + r * f32 + c;
      const __m512 g_lo = _mm512_loadu_ps(g), g_hi = _mm512_loadu_ps(g + 16);
      const __m512 u_lo = _mm512_loadu_ps(u), u_hi = _mm512_loadu_ps(u + 16);
      StoreBf16(h + r * f + c, _mm512_mul_ps(Silu512(Columns0(g_lo, g_hi)), Columns0(u_lo, u_hi)),
                f - c);
      StoreBf16(h + r * f + c + 16,
                _mm512_mul_ps(Silu512(Columns1(g_lo, g_hi)), Columns1(u_lo, u_hi)), f - c - 16);
    }
  }
  StreamRows<MR>(h, f, static_cast<const uint16_t*>(p.w_down) + offset, f, d, acc_y, d32);
  for (int r = 0; r < MR; ++r) {
    const __m512 scale = _mm512_set1_ps(p.row_weights[row0 + r]);
    float* out = p.y + (row0 + r) * d;
    for (int64_t c = 0; c < d; c += 32) {
      const float* a = acc_y + r * d32 + c;
      const __m512 lo = _mm512_loadu_ps(a), hi = _mm512_loadu_ps(a + 16);
      _mm512_mask_storeu_ps(out + c, Mask16(d - c), _mm512_mul_ps(Columns0(lo, hi), scale));
      _mm512_mask_storeu_ps(out + c + 16, Mask16(d - c - 16),
                            _mm512_mul_ps(Columns1(lo, hi), scale));
    }
  }
}

void StreamItem(const Problem& p, int64_t slot, float* scratch) {
  const int64_t group = p.stream_group[slot], row0 = p.stream_row0[slot];
  switch (p.stream_rows[slot]) {
    case 1: StreamGroup<1>(p, group, row0, scratch); break;
    case 2: StreamGroup<2>(p, group, row0, scratch); break;
    case 3: StreamGroup<3>(p, group, row0, scratch); break;
    default: StreamGroup<4>(p, group, row0, scratch); break;
  }
}

// Per thread: two packed gate/up panels, or one packed down panel, or the accumulators of
// a stream item — never at once.
int64_t ScratchFloats(int64_t d, int64_t f) {
  const int64_t vector_floats = 16;
  const int64_t gate_up = 2 * PackedVectors<kGateUpCols / 32>(d) * vector_floats;
  const int64_t down = kSuperPanels * PackedVectors<kDownCols / 32>(f) * vector_floats;
  const int64_t d32 = (d + 31) / 32 * 32, f32 = (f + 31) / 32 * 32;
  const int64_t stream = kStreamMaxRows * (2 * f32 + d32);
  int64_t most = gate_up > down ? gate_up : down;
  return most > stream ? most : stream;
}

const IsaKernels kKernels = {"avx512_bf16", ElementType::kBF16, kGateUpCols,
                             kDownCols * kSuperPanels,
                             &GateUpItem,   &DownItem,          kStreamMaxRows, &StreamItem,
                             &ScratchFloats};

}  // namespace avx512_bf16

const IsaKernels& Avx512Bf16Kernels() { return avx512_bf16::kKernels; }

}  // namespace brownout
