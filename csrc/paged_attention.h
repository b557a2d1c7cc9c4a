// Paged attention as plain data, shared by the FFI front (ffi_paged_attention.cc) and the
// per-ISA translation units (attention_*.cc). Free of std:: templates for the reason given in
// problem.h (the ISA units are compiled with different -m flags).
//
// Queries q (B, T, H, C) attend to the keys and values of their row's sequence, held in a
// block pool (NB, BS, G, C) and addressed through the row's block table (B, W): key position
// s of row b lives at pool[table[b, s / BS], s % BS]. Query (b, t) attends to positions
// [0, limit[b, t]) — decode: limit = position + 1; a prefill chunk: each token's position + 1
// (causal, over the cache written so far); padding: 0 (its output is zeros). Each KV head g
// serves the R = H / G query heads g·R … g·R + R − 1 (GQA).
#ifndef BROWNOUT_CSRC_PAGED_ATTENTION_H_
#define BROWNOUT_CSRC_PAGED_ATTENTION_H_

#include <cstdint>

#include "problem.h"

namespace brownout {

// One item of work: one row, a range of KV heads (with the R query heads of each), a tile of
// consecutive query tokens, and one range of key positions. The heads of one key position are
// adjacent in the pool, so an item walks its keys front to back once for all its heads (a
// head at a time would jump G·C elements per key: a new page per key at Qwen's dims, which
// the hardware prefetchers do not follow). Items of one (row, heads, tile) with different key
// ranges (long contexts are split so both cores share them) write partial results that the
// front merges; an item that covers the whole range writes the output directly.
// Its query rows are ordered (token, KV head, R): row = (tt · heads + gi) · R + rr.
struct AttentionItem {
  int32_t b;
  int32_t g0, g1;       // KV heads g0 … g1 − 1
  int32_t t0, nt;       // query tokens t0 … t0 + nt − 1
  int32_t k0, k1;       // key positions [k0, k1)
  int64_t partial;      // index of its partial slot, or −1: write the output
};

struct AttentionProblem {
  const void* q;                // (B, T, H, C)
  ElementType q_type;
  const void* k_pool;           // (NB, BS, G, C), float32 or bfloat16 bits
  const void* v_pool;
  ElementType kv_type;
  const int32_t* tables;        // (B, W)
  const int32_t* limits;        // (B, T)
  float* out;                   // (B, T, H, C)
  int64_t b, t, h, g, c, bs, w, nb;
  float scale;                  // applied to q · k (1 / sqrt(C))
  const AttentionItem* items;
  int64_t num_items;
  // Partial slots, one per split item: rows × (C + 2) floats each — C accumulated values,
  // the max and the sum of exponentials of each of the item's rows.
  float* partials;
  int64_t max_rows;             // query rows per item: tile tokens × heads × R
  int64_t max_keys;             // key positions per item (scores buffer length)
};

// Floats of one worker's scratch for a problem (64-byte aligned by the caller).
// Either layout an item uses: rows × (q, acc, scores, max, sum, limit) + a key; or, for heads
// serving several rows, lane groups of W ≤ 16 rows (rows rounded up to 16): rows × (2 · C +
// keys + 3) + 72 · C (8 widened keys, 64 values).
static inline int64_t AttentionScratchFloats(int64_t max_rows, int64_t c, int64_t max_keys) {
  const int64_t keys = (max_keys + 15) / 16 * 16;
  const int64_t rows = (max_rows + 15) / 16 * 16;
  return rows * (c * 2 + keys + 3) + 72 * c + 64;
}

struct AttentionKernels {
  const char* name;
  int64_t lanes;  // the head dimension must be a multiple of this
  void (*item)(const AttentionProblem&, int64_t item, float* scratch);
};

const AttentionKernels& AttentionGenericKernels();
#if defined(BROWNOUT_HAVE_X86_KERNELS)
const AttentionKernels& AttentionAvx2Kernels();
const AttentionKernels& AttentionAvx512Kernels();
#endif

}  // namespace brownout

#endif  // BROWNOUT_CSRC_PAGED_ATTENTION_H_
