// XLA FFI front of the grouped SwiGLU kernel: decodes and checks the buffers, lists the
// active groups, picks the ISA copy at run time and runs the work items on XLA's own
// intra-op thread pool.
//
// Threads. The handler receives XLA:CPU's intra-op pool (the one XLA's own parallel loops
// use) and schedules (threads − 1) workers on it; the calling thread works too. Workers take
// items from shared atomic counters, so no thread waits for a worker that has not started: if
// the pool is busy, the caller does all items itself and a late worker finds nothing left.
// Gate/up items all finish before down items start (a counter of finished items is the
// barrier; only threads that hold items are waited for). The shared state lives in a
// shared_ptr, so a late worker never touches freed memory, and it touches no buffer: every
// item was taken before the handler returned.
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "problem.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace brownout {
namespace {

enum IsaRequest : int64_t { kAuto = 0, kGeneric = 1, kAvx2 = 2, kAvx512 = 3, kAvx512Bf16 = 4 };

bool CpuHasAvx512() {
#if defined(BROWNOUT_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool CpuHasAvx512Bf16() {
#if defined(BROWNOUT_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  return CpuHasAvx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool CpuHasAvx2() {
#if defined(BROWNOUT_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The best copy the CPU runs for these operand types, or the requested one; nullptr when the
// CPU lacks it. The bf16-dot copy takes bf16 activations and weights only.
const IsaKernels* SelectKernels(int64_t request, bool all_bf16) {
#if defined(BROWNOUT_HAVE_X86_KERNELS)
  if (request == kAvx512Bf16 || (request == kAuto && all_bf16 && CpuHasAvx512Bf16())) {
    return CpuHasAvx512Bf16() && all_bf16 ? &Avx512Bf16Kernels() : nullptr;
  }
  if (request == kAvx512 || (request == kAuto && CpuHasAvx512())) {
    return CpuHasAvx512() ? &Avx512Kernels() : nullptr;
  }
  if (request == kAvx2 || (request == kAuto && CpuHasAvx2())) {
    return CpuHasAvx2() ? &Avx2Kernels() : nullptr;
  }
#else
  if (request != kAuto && request != kGeneric) return nullptr;
#endif
  return &GenericKernels();
}

struct SharedWork {
  Problem problem;
  const IsaKernels* kernels = nullptr;
  int64_t gate_up_items = 0;
  int64_t down_items = 0;
  std::atomic<int64_t> next_gate_up{0};
  std::atomic<int64_t> done_gate_up{0};
  std::atomic<int64_t> next_down{0};
  std::atomic<int64_t> done_down{0};
};

void Relax(int spins) {
  if (spins < 64) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  } else {
    std::this_thread::yield();
  }
}

void WorkOn(SharedWork& w) {
  for (int64_t i; (i = w.next_gate_up.fetch_add(1, std::memory_order_relaxed)) <
                  w.gate_up_items;) {
    w.kernels->gate_up_item(w.problem, i);
    w.done_gate_up.fetch_add(1, std::memory_order_release);
  }
  for (int spins = 0; w.done_gate_up.load(std::memory_order_acquire) < w.gate_up_items; ++spins) {
    Relax(spins);
  }
  for (int64_t i; (i = w.next_down.fetch_add(1, std::memory_order_relaxed)) < w.down_items;) {
    w.kernels->down_item(w.problem, i);
    w.done_down.fetch_add(1, std::memory_order_release);
  }
}

int64_t Dims(const ffi::AnyBuffer& b, int64_t i) { return b.dimensions()[i]; }

bool IsF32OrBf16(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

ElementType TypeOf(ffi::DataType t) {
  return t == ffi::DataType::BF16 ? ElementType::kBF16 : ElementType::kF32;
}

ffi::Error GroupedSwigluImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                             ffi::Buffer<ffi::S32> group_sizes, ffi::AnyBuffer w_gate,
                             ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                             ffi::Buffer<ffi::F32> row_weights, ffi::ResultBuffer<ffi::F32> y,
                             ffi::ResultBuffer<ffi::F32> h, int64_t isa, int64_t max_threads) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("grouped_swiglu: x must be (M, D)");
  const int64_t m = xd[0], d = xd[1];
  if (w_gate.dimensions().size() != 3 || w_up.dimensions().size() != 3 ||
      w_down.dimensions().size() != 3) {
    return ffi::Error::InvalidArgument("grouped_swiglu: weights must be 3-D stacks");
  }
  const int64_t g = Dims(w_gate, 0), f = Dims(w_gate, 2);
  if (Dims(w_gate, 1) != d || Dims(w_up, 0) != g || Dims(w_up, 1) != d || Dims(w_up, 2) != f ||
      Dims(w_down, 0) != g || Dims(w_down, 1) != f || Dims(w_down, 2) != d) {
    return ffi::Error::InvalidArgument(
        "grouped_swiglu: w_gate, w_up must be (G, D, F) and w_down (G, F, D)");
  }
  const ffi::DataType wt = w_gate.element_type();
  if (w_up.element_type() != wt || w_down.element_type() != wt || !IsF32OrBf16(wt)) {
    return ffi::Error::InvalidArgument(
        "grouped_swiglu: weights must all be float32 or all bfloat16");
  }
  if (!IsF32OrBf16(x.element_type())) {
    return ffi::Error::InvalidArgument("grouped_swiglu: x must be float32 or bfloat16");
  }
  if (group_sizes.element_count() != static_cast<size_t>(g) ||
      row_weights.element_count() != static_cast<size_t>(m) ||
      y->element_count() != static_cast<size_t>(m * d) ||
      h->element_count() != static_cast<size_t>(m * f)) {
    return ffi::Error::InvalidArgument(
        "grouped_swiglu: group_sizes (G,), row_weights (M,), y (M, D), h (M, F) expected");
  }
  const bool all_bf16 = wt == ffi::DataType::BF16 && x.element_type() == ffi::DataType::BF16;
  const IsaKernels* kernels = SelectKernels(isa, all_bf16);
  if (kernels == nullptr) {
    return ffi::Error::InvalidArgument(
        "grouped_swiglu: this CPU lacks the requested ISA (or it needs bf16 x and weights)");
  }

  auto work = std::make_shared<SharedWork>();
  std::vector<int64_t> active_group, active_row0, active_rows;
  const int32_t* sizes = group_sizes.typed_data();
  int64_t row = 0;
  for (int64_t i = 0; i < g && row < m; ++i) {
    // Negative sizes count as empty; groups past M rows are cut at M (rows past the sum of
    // group_sizes belong to no group).
    int64_t rows = sizes[i] > 0 ? sizes[i] : 0;
    if (rows > m - row) rows = m - row;
    if (rows == 0) continue;
    active_group.push_back(i);
    active_row0.push_back(row);
    active_rows.push_back(rows);
    row += rows;
  }
  float* out = y->typed_data();
  if (row < m) std::memset(out + row * d, 0, sizeof(float) * (m - row) * d);
  const int64_t num_active = static_cast<int64_t>(active_group.size());
  if (num_active == 0 || d == 0 || f == 0) {
    if (row > 0) std::memset(out, 0, sizeof(float) * row * d);
    return ffi::Error::Success();
  }

  Problem& p = work->problem;
  p.x = x.untyped_data();
  p.x_type = TypeOf(x.element_type());
  p.w_gate = w_gate.untyped_data();
  p.w_up = w_up.untyped_data();
  p.w_down = w_down.untyped_data();
  p.weight_type = TypeOf(wt);
  p.row_weights = row_weights.typed_data();
  p.y = out;
  p.h = h->untyped_data();
  p.m = m;
  p.d = d;
  p.f = f;
  p.active_group = active_group.data();
  p.active_row0 = active_row0.data();
  p.active_rows = active_rows.data();
  p.num_active = num_active;
  work->kernels = kernels;
  work->gate_up_items = num_active * ((f + kernels->gate_up_panel - 1) / kernels->gate_up_panel);
  work->down_items = num_active * ((d + kernels->down_panel - 1) / kernels->down_panel);

  int64_t threads = pool.num_threads();
  if (max_threads > 0 && threads > max_threads) threads = max_threads;
  const int64_t items = work->gate_up_items < work->down_items ? work->gate_up_items
                                                               : work->down_items;
  if (threads > items) threads = items;
  for (int64_t t = 1; t < threads; ++t) {
    pool.Schedule([work] { WorkOn(*work); });
  }
  WorkOn(*work);
  for (int spins = 0; work->done_down.load(std::memory_order_acquire) < work->down_items;
       ++spins) {
    Relax(spins);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace brownout

// The library is built with hidden visibility; the handler is its one exported symbol.
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(BrownoutGroupedSwiglu, brownout::GroupedSwigluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x (M, D), rows by group
                                  .Arg<ffi::Buffer<ffi::S32>>()  // group_sizes (G,)
                                  .Arg<ffi::AnyBuffer>()         // w_gate (G, D, F)
                                  .Arg<ffi::AnyBuffer>()         // w_up (G, D, F)
                                  .Arg<ffi::AnyBuffer>()         // w_down (G, F, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // row_weights (M,)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y (M, D)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h (M, F), scratch
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("max_threads"));
#pragma GCC visibility pop

// The ISA copy a request resolves to on this CPU ("" when it lacks it); for logs and tests.
extern "C" __attribute__((visibility("default"))) const char* BrownoutCpuKernelIsa(
    int64_t request, int32_t all_bf16) {
  const brownout::IsaKernels* kernels = brownout::SelectKernels(request, all_bf16 != 0);
  return kernels == nullptr ? "" : kernels->name;
}
