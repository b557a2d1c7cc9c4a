// The packed-weight matmul y = x · w as plain data, shared by its FFI front
// (ffi_packed_linear.cc) and the per-ISA translation units (packed_*.cc). Like problem.h it is
// free of std:: templates, for the same reason (each ISA unit has its own -m flags).
//
// The packed layout ("pair-interleaved column blocks"): a (K, N) bf16 weight is stored as
//   packed[b, p, c, j] = w[2p + j, 32b + c]      shape (NB, KP, 32, 2), zero past K and N,
// with NB = ceil(N / 32) and KP = ceil(K / 32) · 16 (K padded to a multiple of 32). One column
// block b is one contiguous run of KP · 128 bytes, read front to back by every path:
//  * AVX-512-BF16: a 64-byte load at (b, p, 16q) holds 16 lanes of (w[2p, c], w[2p+1, c]) —
//    exactly vdpbf16ps's operand, so no shuffle and no column permute are needed;
//  * AMX-BF16: 16 consecutive p of one half block (16 columns) with a 128-byte stride are a B
//    tile in VNNI form (16 rows × 16 column pairs), so tiles load straight from the weights;
//  * AVX-512 / AVX2 / scalar: each 32-bit lane is widened into its two fp32 halves.
// Rows of x are padded (by the FFI front) to 2 · KP columns of zeros, so no path has a depth
// tail; N tails are zero columns of the last block, computed and not stored.
#ifndef BROWNOUT_CSRC_PACKED_LINEAR_H_
#define BROWNOUT_CSRC_PACKED_LINEAR_H_

#include <cstdint>

#include "problem.h"

namespace brownout {

constexpr int64_t kPackBlockCols = 32;  // columns per block
constexpr int64_t kPackDepthAlign = 32;  // K is padded to a multiple of this

struct PackedProblem {
  const void* x;        // (rows_padded, ldx): x rows, zero-padded to ldx = 2 · kp columns
  ElementType x_type;
  int64_t ldx;
  const uint16_t* w;    // (blocks, kp, 64) bf16, see above
  int64_t kp;           // pairs of depth, a multiple of 16
  int64_t blocks;       // NB
  float* y;             // (m, n) float32
  int64_t m, n;
  const uint8_t* row_valid;  // (m,) or null: rows marked 0 need no output (written as zeros)
  // Work items: (row chunk, group of column blocks); item i covers column group i / row_chunks
  // and row chunk i % row_chunks, so consecutive items share their weights.
  int64_t row_chunk;
  int64_t row_chunks;
  int64_t blocks_per_item;
};

// Internal linkage on purpose, as in problem.h.
static inline bool PackedNoRowValid(const PackedProblem& p, int64_t row, int64_t count) {
  if (p.row_valid == nullptr) return false;
  for (int64_t i = 0; i < count; ++i) {
    if (p.row_valid[row + i] != 0) return false;
  }
  return true;
}

static inline void PackedZeroRows(const PackedProblem& p, int64_t row0, int64_t rows, int64_t col0,
                           int64_t ncols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* out = p.y + (row0 + r) * p.n + col0;
    for (int64_t c = 0; c < ncols; ++c) out[c] = 0.0f;
  }
}

// One ISA's copy of the packed matmul.
struct PackedKernels {
  const char* name;
  bool bf16_x_only;          // needs bf16 x (the pair dot products multiply bf16)
  int64_t blocks_per_item;   // column blocks an item computes together (its register tile)
  int64_t row_align;         // x rows are padded (zeros) to a multiple of this; 1: none
  void (*item)(const PackedProblem&, int64_t item, float* scratch);
  int64_t scratch_floats;    // per thread, 64-byte aligned
};

// The grouped SwiGLU of the routed experts on packed stacks, per copy (packed_experts_tiles.inc);
// scheduled by ffi_expert_kernels.cc like the stored-layout copies (problem.h).
const PackedKernels& PackedGenericKernels();
const IsaKernels& PackedExpertsGenericKernels();
#if defined(BROWNOUT_HAVE_X86_KERNELS)
const PackedKernels& PackedAvx2Kernels();
const PackedKernels& PackedAvx512Kernels();
const PackedKernels& PackedAvx512Bf16Kernels();
const PackedKernels& PackedAmxBf16Kernels();
const IsaKernels& PackedExpertsAvx2Kernels();
const IsaKernels& PackedExpertsAvx512Kernels();
const IsaKernels& PackedExpertsAvx512Bf16Kernels();
#endif

}  // namespace brownout

#endif  // BROWNOUT_CSRC_PACKED_LINEAR_H_
