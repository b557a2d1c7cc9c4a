// The grouped SwiGLU problem as plain data, shared by the FFI front (ffi_grouped_swiglu.cc)
// and the per-ISA kernel translation units. Deliberately free of std:: templates: the ISA
// units are compiled with different -m flags, and an inline std:: function instantiated in
// two of them could be merged by the linker into the AVX-512 copy and run on a CPU without
// AVX-512.
#ifndef BROWNOUT_CSRC_PROBLEM_H_
#define BROWNOUT_CSRC_PROBLEM_H_

#include <cstdint>

namespace brownout {

enum class ElementType : int32_t { kF32 = 0, kBF16 = 1 };

// Rows x[M, D] are sorted by group; group g owns rows [row0[g], row0[g] + rows[g]).
// Only the active groups (rows > 0) are listed. Weights are stacked per group in their stored
// layout: w_gate, w_up (G, D, F) and w_down (G, F, D), row-major, float32 or bfloat16.
struct Problem {
  const void* x;             // (M, D)
  ElementType x_type;
  const void* w_gate;        // (G, D, F)
  const void* w_up;          // (G, D, F)
  const void* w_down;        // (G, F, D)
  ElementType weight_type;
  const float* row_weights;  // (M,) routing weight of each row, applied to its output; or null
  float* y;                  // (M, D) output
  // (M, F) input of the down projection: SiLU(x·w_gate) · (x·w_up) written by the gate/up
  // items, as float32 rows, or bfloat16 rows in the bf16-dot copy (it multiplies bf16 pairs).
  // linear() runs the down items alone with h = its input.
  void* h;
  ElementType h_type;
  // (M,) or null: rows marked 0 need no output (bucket padding); down items skip row blocks
  // without a valid row and write zeros there (never uninitialised values, which could be NaN
  // and reach real tokens through 0 · NaN in attention).
  const uint8_t* row_valid;
  int64_t m, d, f;
  const int64_t* active_group;  // (num_active,) group id
  const int64_t* active_row0;   // (num_active,) first row
  const int64_t* active_rows;   // (num_active,) row count (> 0)
  int64_t num_active;
  // Groups run whole by one stream item each (few rows: their cost is reading the weights),
  // listed like the active ones; the active list then holds only the others.
  const int64_t* stream_group;
  const int64_t* stream_row0;
  const int64_t* stream_rows;
  int64_t num_stream;
};

// Internal linkage on purpose: every ISA unit gets its own copy (see the header comment).
static inline bool NoRowValid(const Problem& p, int64_t row, int64_t count) {
  if (p.row_valid == nullptr) return false;
  for (int64_t i = 0; i < count; ++i) {
    if (p.row_valid[row + i] != 0) return false;
  }
  return true;
}

static inline void ZeroRows(float* y, int64_t ldy, int64_t rows, int64_t ncols) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < ncols; ++c) y[r * ldy + c] = 0.0f;
  }
}

// One vector ISA's kernels. Work is cut into items that the caller schedules on threads:
// gate/up items are (active group, column panel of F), down items (active group, column panel
// of D); an item writes only its own rows × panel, so items never race. Every gate/up item
// must finish before any down item starts (down reads whole rows of h). The active "groups"
// may list one group several times with disjoint row ranges (linear() cuts its rows so).
struct IsaKernels {
  const char* name;
  ElementType hidden_type;  // what gate/up items store in h (and down items read)
  int64_t gate_up_panel;  // columns of F per gate/up item
  int64_t down_panel;     // columns of D per down item
  // Items get the calling thread's `scratch`: scratch_floats(d, f) floats, 64-byte aligned
  // (packed weight panels, stream accumulators), never shared between threads.
  void (*gate_up_item)(const Problem&, int64_t item, float* scratch);
  void (*down_item)(const Problem&, int64_t item, float* scratch);
  // Whole-group streaming for groups of at most stream_max_rows rows (0: none): one item
  // reads the group's three weight matrices front to back — sequential memory, no barrier.
  int64_t stream_max_rows;
  void (*stream_item)(const Problem&, int64_t slot, float* scratch);
  int64_t (*scratch_floats)(int64_t d, int64_t f);
};

// Defined in one translation unit each; the AVX units exist on x86-64 builds only. The
// AVX-512-BF16 copy multiplies bf16 pairs (vdpbf16ps) and takes bf16 x and weights only.
const IsaKernels& GenericKernels();
#if defined(BROWNOUT_HAVE_X86_KERNELS)
const IsaKernels& Avx2Kernels();
const IsaKernels& Avx512Kernels();
const IsaKernels& Avx512Bf16Kernels();
#endif

}  // namespace brownout

#endif  // BROWNOUT_CSRC_PROBLEM_H_
