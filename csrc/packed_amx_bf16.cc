// AMX-BF16 copy of the packed matmul (Sapphire Rapids and later): tiles of 32 rows × one
// 32-column block, accumulated in four 16 × 16 fp32 tile registers (C00 C01 / C10 C11) from
// two A tiles (16 rows × 32 depth of x, row-major: the padded x the front hands over) and two
// B tiles read straight from the packed weights (16 depth pairs × 16 columns, 128-byte
// stride: the VNNI form TDPBF16PS expects). Each depth step of 32 is four TDPBF16PS on four
// tile loads. x rows are padded to a multiple of 32 (row_align), so no tile reads past x.
// Chosen by the front for calls with at least kAmxMinRows rows; fewer rows go to the
// AVX-512-BF16 copy (decode: bound by reading the weights, where tiles buy nothing).
#include <immintrin.h>

#include <cstdint>

#include "packed_linear.h"

namespace brownout {
namespace packed_amx_bf16 {

constexpr int64_t kTileRows = 32;  // two A tiles

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline void ConfigureTiles() {
  TileConfig config = {};
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {  // every tile: 16 rows of 64 bytes
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

inline int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

void AmxItem(const PackedProblem& p, int64_t item, float* scratch) {
  const int64_t block = item / p.row_chunks;
  const int64_t row0 = (item % p.row_chunks) * p.row_chunk;
  const int64_t rows = Min64(p.row_chunk, p.m - row0);
  const int64_t col0 = block * 32;
  const int64_t ncols = Min64(32, p.n - col0);
  if (rows <= 0 || ncols <= 0) return;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const uint16_t* w = p.w + block * p.kp * 64;
  const int64_t x_stride = p.ldx * 2;  // bytes
  ConfigureTiles();
  for (int64_t r = 0; r < rows; r += kTileRows) {
    const int64_t valid_rows = Min64(kTileRows, rows - r);
    if (PackedNoRowValid(p, row0 + r, valid_rows)) {
      PackedZeroRows(p, row0 + r, valid_rows, col0, ncols);
      continue;
    }
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint16_t* a = x + (row0 + r) * p.ldx;
    for (int64_t kk = 0; kk < p.kp; kk += 16) {
      _tile_loadd(4, a + 2 * kk, x_stride);
      _tile_loadd(5, a + 16 * p.ldx + 2 * kk, x_stride);
      _tile_loadd(6, w + kk * 64, 128);
      _tile_loadd(7, w + kk * 64 + 32, 128);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    // scratch: 32 × 32 floats, row-major.
    _tile_stored(0, scratch, 128);
    _tile_stored(1, scratch + 16, 128);
    _tile_stored(2, scratch + 16 * 32, 128);
    _tile_stored(3, scratch + 16 * 32 + 16, 128);
    for (int64_t i = 0; i < valid_rows; ++i) {
      float* out = p.y + (row0 + r + i) * p.n + col0;
      const float* in = scratch + i * 32;
      if (ncols == 32) {
        _mm512_storeu_ps(out, _mm512_load_ps(in));
        _mm512_storeu_ps(out + 16, _mm512_load_ps(in + 16));
      } else {
        for (int64_t c = 0; c < ncols; ++c) out[c] = in[c];
      }
    }
  }
  _tile_release();
}

const PackedKernels kPackedKernels = {"amx_bf16", true, 1, kTileRows, &AmxItem, 32 * 32};

}  // namespace packed_amx_bf16

const PackedKernels& PackedAmxBf16Kernels() { return packed_amx_bf16::kPackedKernels; }

}  // namespace brownout
