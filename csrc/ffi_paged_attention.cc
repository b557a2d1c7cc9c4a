// XLA FFI front of paged attention (paged_attention.h): checks the buffers, cuts the work into
// items — (row, KV head, query tile, key range) — runs them on XLA:CPU's intra-op pool (the
// calling thread too; workers take items from an atomic counter, as in ffi_packed_linear.cc),
// then merges the partial results of rows whose keys were split across items.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "cpu_features.h"
#include "paged_attention.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace brownout {
namespace {

// Query rows an item holds at most (tokens × KV heads × R): bounds its scratch (scores:
// rows × keys floats, in L2). Decode takes all heads of a row while they fit (the keys of one
// position are read front to back once); prefill tiles take fewer heads and more tokens, each
// key then serving every token of the tile.
constexpr int64_t kMaxRows = 64;
constexpr int64_t kPrefillTileTokens = 64;
// Key positions per item by default: bounds the scores buffer and splits long contexts so
// both cores share one sequence (flash-decoding's split).
constexpr int64_t kDefaultSplitKeys = 512;

const AttentionKernels* SelectAttention(int64_t request, int64_t head_dim) {
  const AttentionKernels* chosen = nullptr;
#if defined(BROWNOUT_HAVE_X86_KERNELS)
  switch (request) {
    case kAvx512:
      chosen = CpuHasAvx512() ? &AttentionAvx512Kernels() : nullptr;
      break;
    case kAvx2:
      chosen = CpuHasAvx2() ? &AttentionAvx2Kernels() : nullptr;
      break;
    case kGeneric:
      chosen = &AttentionGenericKernels();
      break;
    case kAuto:
    case kAvx512Bf16:  // no copy of its own: the best vector copy
    case kAmxBf16:
      if (CpuHasAvx512() && head_dim % 16 == 0) return &AttentionAvx512Kernels();
      if (CpuHasAvx2() && head_dim % 8 == 0) return &AttentionAvx2Kernels();
      return &AttentionGenericKernels();
    default:
      return nullptr;
  }
#else
  if (request == kAuto || request == kGeneric) chosen = &AttentionGenericKernels();
#endif
  if (chosen != nullptr && head_dim % chosen->lanes != 0) return nullptr;
  return chosen;
}

// The calling thread's buffers, kept between calls: fresh allocations of this size are
// fresh pages, and the kernel's page faults cost more than the attention (measured).
struct AttentionBuffers {
  std::vector<AttentionItem> items;
  std::vector<float> partials;
  std::vector<float> scratch;
};

AttentionBuffers& CallerBuffers() {
  static thread_local AttentionBuffers buffers;
  return buffers;
}

struct AttentionRun {
  AttentionProblem problem{};
  const AttentionKernels* kernels = nullptr;
  int64_t num_items = 0;
  float* scratch = nullptr;
  int64_t scratch_per_worker = 0;
  std::atomic<int64_t> next_worker{0};
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void WorkOn(AttentionRun& run) {
  const int64_t worker = run.next_worker.fetch_add(1, std::memory_order_relaxed);
  float* base = run.scratch + worker * run.scratch_per_worker;
  auto* scratch =
      reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(base) + 63) & ~uintptr_t{63});
  for (int64_t i; (i = run.next.fetch_add(1, std::memory_order_relaxed)) < run.num_items;) {
    run.kernels->item(run.problem, i, scratch);
    run.done.fetch_add(1, std::memory_order_release);
  }
}

// The rows of items [first, first + count) (one row, heads and tile, split by keys): each
// partial holds unnormalised values, the max and the sum of exponentials; combined in the
// softmax's own algebra.
void MergeSplits(const AttentionProblem& p, int64_t first, int64_t count, float* acc) {
  const AttentionItem& item = p.items[first];
  const int64_t r = p.h / p.g, c = p.c;
  const int64_t heads = item.g1 - item.g0;
  const int64_t rows = static_cast<int64_t>(item.nt) * heads * r;
  auto slot_of = [&](int64_t i, int64_t row) {
    return p.partials + (p.items[first + i].partial * p.max_rows + row) * (c + 2);
  };
  for (int64_t row = 0; row < rows; ++row) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < count; ++i) mx = std::fmax(mx, slot_of(i, row)[c]);
    std::fill(acc, acc + c, 0.0f);
    float sum = 0.0f;
    if (mx != -INFINITY) {
      for (int64_t i = 0; i < count; ++i) {
        const float* slot = slot_of(i, row);
        if (slot[c + 1] <= 0.0f) continue;
        const float scale = std::exp(slot[c] - mx);
        for (int64_t j = 0; j < c; ++j) acc[j] += scale * slot[j];
        sum += scale * slot[c + 1];
      }
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    const int64_t tt = row / (heads * r), gi = (row / r) % heads, rr = row % r;
    const int64_t token = static_cast<int64_t>(item.b) * p.t + item.t0 + tt;
    float* dst = p.out + (token * p.h + (item.g0 + gi) * r + rr) * c;
    for (int64_t j = 0; j < c; ++j) dst[j] = acc[j] * inv;
  }
}

bool IsBf16(ffi::DataType type) {
  return type == ffi::DataType::BF16 || type == ffi::DataType::U16;
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_pool,
                              ffi::AnyBuffer v_pool, ffi::Buffer<ffi::S32> tables,
                              ffi::Buffer<ffi::S32> limits, ffi::ResultBuffer<ffi::F32> out,
                              int64_t isa, int64_t max_threads, int64_t split_keys) {
  const auto qd = q.dimensions();
  const auto kd = k_pool.dimensions();
  const auto td = tables.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2 || v_pool.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument(
        "paged_attention: q must be (B, T, H, C), the pools (NB, BS, G, C), tables (B, W)");
  }
  const int64_t b = qd[0], t = qd[1], h = qd[2], c = qd[3];
  const int64_t nb = kd[0], bs = kd[1], g = kd[2], w = td[1];
  for (int i = 0; i < 4; ++i) {
    if (v_pool.dimensions()[i] != kd[i]) {
      return ffi::Error::InvalidArgument("paged_attention: k_pool and v_pool differ in shape");
    }
  }
  if (kd[3] != c || td[0] != b || g <= 0 || h % g != 0 || bs <= 0) {
    return ffi::Error::InvalidArgument(
        "paged_attention: the pools' head dim must be q's, tables' rows q's rows, H a "
        "multiple of G");
  }
  if (limits.element_count() != static_cast<size_t>(b * t)) {
    return ffi::Error::InvalidArgument("paged_attention: limits must be (B, T)");
  }
  const ffi::DataType qt = q.element_type(), kt = k_pool.element_type();
  if ((qt != ffi::DataType::F32 && qt != ffi::DataType::BF16) ||
      (kt != ffi::DataType::F32 && !IsBf16(kt)) || v_pool.element_type() != kt) {
    return ffi::Error::InvalidArgument(
        "paged_attention: q must be float32 or bfloat16, both pools float32 or bfloat16 (or "
        "its bits as uint16)");
  }
  auto run = std::make_shared<AttentionRun>();
  run->kernels = SelectAttention(isa, c);
  if (run->kernels == nullptr) {
    return ffi::Error::InvalidArgument(
        "paged_attention: this CPU lacks the requested ISA copy, or the head dim is not a "
        "multiple of its lanes");
  }
  if (b * t * h * c == 0) return ffi::Error::Success();
  if (nb == 0 && w * bs > 0) {
    return ffi::Error::InvalidArgument("paged_attention: the pools hold no blocks");
  }

  const int64_t r = h / g;
  const int64_t tile =
      t == 1 ? 1 : std::max<int64_t>(1, std::min<int64_t>(t, kPrefillTileTokens / r));
  const int64_t heads = std::max<int64_t>(1, std::min<int64_t>(g, kMaxRows / (tile * r)));
  const int64_t split = split_keys > 0 ? split_keys : kDefaultSplitKeys;
  const int64_t capacity = w * bs;
  const int32_t* lim = limits.typed_data();
  AttentionBuffers& buffers = CallerBuffers();
  std::vector<AttentionItem>& items = buffers.items;
  items.clear();
  // Items of one (row, heads, tile) are consecutive; `groups` lists the split ones to merge.
  std::vector<std::pair<int64_t, int64_t>> groups;
  int64_t num_partials = 0;
  for (int64_t row = 0; row < b; ++row) {
    for (int64_t t0 = 0; t0 < t; t0 += tile) {
      const int64_t nt = std::min(tile, t - t0);
      int64_t end = 0;
      for (int64_t i = 0; i < nt; ++i) {
        end = std::max<int64_t>(end, std::min<int64_t>(lim[row * t + t0 + i], capacity));
      }
      const int64_t pieces = end <= 0 ? 1 : (end - 1) / split + 1;  // no overflow near 2^63
      for (int64_t g0 = 0; g0 < g; g0 += heads) {
        const int64_t first = static_cast<int64_t>(items.size());
        for (int64_t piece = 0; piece < pieces; ++piece) {
          AttentionItem item{};
          item.b = static_cast<int32_t>(row);
          item.g0 = static_cast<int32_t>(g0);
          item.g1 = static_cast<int32_t>(std::min(g, g0 + heads));
          item.t0 = static_cast<int32_t>(t0);
          item.nt = static_cast<int32_t>(nt);
          item.k0 = static_cast<int32_t>(piece * split);
          item.k1 = static_cast<int32_t>(std::min(end, (piece + 1) * split));
          item.partial = pieces > 1 ? num_partials++ : -1;
          items.push_back(item);
        }
        if (pieces > 1) groups.emplace_back(first, pieces);
      }
    }
  }

  AttentionProblem& p = run->problem;
  p.q = q.untyped_data();
  p.q_type = qt == ffi::DataType::BF16 ? ElementType::kBF16 : ElementType::kF32;
  p.k_pool = k_pool.untyped_data();
  p.v_pool = v_pool.untyped_data();
  p.kv_type = IsBf16(kt) ? ElementType::kBF16 : ElementType::kF32;
  p.tables = tables.typed_data();
  p.limits = lim;
  p.out = out->typed_data();
  p.b = b, p.t = t, p.h = h, p.g = g, p.c = c, p.bs = bs, p.w = w, p.nb = nb;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c));
  p.max_rows = tile * heads * r;
  p.max_keys = std::min(split, std::max<int64_t>(capacity, 1));
  const auto partial_floats = static_cast<size_t>(num_partials * p.max_rows * (c + 2));
  if (buffers.partials.size() < partial_floats) buffers.partials.resize(partial_floats);
  p.partials = buffers.partials.data();
  p.items = items.data();
  p.num_items = static_cast<int64_t>(items.size());
  run->num_items = p.num_items;

  int64_t threads = pool.num_threads();
  if (max_threads > 0 && threads > max_threads) threads = max_threads;
  if (threads > p.num_items) threads = p.num_items;
  if (threads < 1) threads = 1;
  run->scratch_per_worker = AttentionScratchFloats(p.max_rows, c, p.max_keys) + 16;
  const auto scratch_floats = static_cast<size_t>(threads * run->scratch_per_worker);
  if (buffers.scratch.size() < scratch_floats) buffers.scratch.resize(scratch_floats);
  run->scratch = buffers.scratch.data();
  for (int64_t i = 1; i < threads; ++i) {
    pool.Schedule([run] { WorkOn(*run); });
  }
  WorkOn(*run);
  for (int spins = 0; run->done.load(std::memory_order_acquire) < p.num_items; ++spins) {
    Relax(spins);
  }
  for (const auto& [first, count] : groups) MergeSplits(p, first, count, run->scratch);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace brownout

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(BrownoutPagedAttention, brownout::PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // q (B, T, H, C)
                                  .Arg<ffi::AnyBuffer>()           // k_pool (NB, BS, G, C)
                                  .Arg<ffi::AnyBuffer>()           // v_pool (NB, BS, G, C)
                                  .Arg<ffi::Buffer<ffi::S32>>()    // tables (B, W)
                                  .Arg<ffi::Buffer<ffi::S32>>()    // limits (B, T)
                                  .Ret<ffi::Buffer<ffi::F32>>()    // out (B, T, H, C)
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("split_keys"));

// The copy paged attention runs with `request` for this head dim ("" when none can).
extern "C" const char* BrownoutPagedAttentionIsa(int64_t request, int64_t head_dim) {
  const brownout::AttentionKernels* kernels = brownout::SelectAttention(request, head_dim);
  return kernels == nullptr ? "" : kernels->name;
}
#pragma GCC visibility pop
