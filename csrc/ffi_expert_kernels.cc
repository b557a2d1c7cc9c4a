// XLA FFI front of the CPU expert kernels: decodes and checks the buffers, lists the active
// row groups, picks the ISA copy at run time and runs the work items on XLA's own intra-op
// thread pool. Two handlers share it: the grouped SwiGLU of the routed experts, and a plain
// matmul (linear) for the dense layers, which runs the down-projection items alone.
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
#include <thread>
#include <vector>

#include "cpu_features.h"
#include "packed_linear.h"
#include "problem.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace brownout {
namespace {

// Rows per active slot of linear(): a chunk's input rows stay in L2 while the weight panels
// stream past them.
constexpr int64_t kLinearRowChunk = 96;

// The best copy the CPU runs for these operand types, or the requested one; nullptr when the
// CPU lacks it. The bf16-dot copy takes bf16 activations and weights only.
const IsaKernels* SelectKernels(int64_t request, bool all_bf16) {
  if (request < kAuto || request > kAvx512Bf16) return nullptr;  // e.g. AMX: packed only
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
  Problem problem{};
  const IsaKernels* kernels = nullptr;
  std::vector<int64_t> active_group, active_row0, active_rows;
  std::vector<int64_t> stream_group, stream_row0, stream_rows;
  std::vector<unsigned char> x_padded;  // x rows padded to the packed depth, when needed
  std::vector<float> scratch;  // one 64-byte-aligned block per worker (IsaKernels)
  int64_t scratch_per_worker = 0;
  int64_t gate_up_items = 0;  // stream items first, then panel gate/up items
  int64_t down_items = 0;
  std::atomic<int64_t> next_worker{0};
  std::atomic<int64_t> next_gate_up{0};
  std::atomic<int64_t> done_gate_up{0};
  std::atomic<int64_t> next_down{0};
  std::atomic<int64_t> done_down{0};

  void AddRows(int64_t group, int64_t row0, int64_t rows) {
    active_group.push_back(group);
    active_row0.push_back(row0);
    active_rows.push_back(rows);
  }

  // A group of few rows runs whole in one stream item when this copy can do that.
  void AddGroup(int64_t group, int64_t row0, int64_t rows) {
    if (rows <= kernels->stream_max_rows) {
      stream_group.push_back(group);
      stream_row0.push_back(row0);
      stream_rows.push_back(rows);
    } else {
      AddRows(group, row0, rows);
    }
  }
};

void WorkOn(SharedWork& w) {
  const int64_t streams = w.problem.num_stream;
  float* scratch = nullptr;
  if (w.scratch_per_worker > 0) {
    const int64_t worker = w.next_worker.fetch_add(1, std::memory_order_relaxed);
    float* base = w.scratch.data() + worker * w.scratch_per_worker;
    // 64-byte alignment for the packed panels' aligned loads (16 floats of slack per block).
    scratch = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(base) + 63) & ~uintptr_t{63});
  }
  for (int64_t i; (i = w.next_gate_up.fetch_add(1, std::memory_order_relaxed)) <
                  w.gate_up_items;) {
    if (i < streams) {
      w.kernels->stream_item(w.problem, i, scratch);
    } else {
      w.kernels->gate_up_item(w.problem, i - streams, scratch);
    }
    w.done_gate_up.fetch_add(1, std::memory_order_release);
  }
  for (int spins = 0; w.done_gate_up.load(std::memory_order_acquire) < w.gate_up_items; ++spins) {
    Relax(spins);
  }
  for (int64_t i; (i = w.next_down.fetch_add(1, std::memory_order_relaxed)) < w.down_items;) {
    w.kernels->down_item(w.problem, i, scratch);
    w.done_down.fetch_add(1, std::memory_order_release);
  }
}

// Fills in the item counts from the active list and runs every item; returns when all are
// done. with_gate_up = false runs the down items alone (linear).
void Run(ffi::ThreadPool& pool, const std::shared_ptr<SharedWork>& work, bool with_gate_up,
         int64_t max_threads) {
  SharedWork& w = *work;
  const int64_t slots = static_cast<int64_t>(w.active_group.size());
  const int64_t streams = static_cast<int64_t>(w.stream_group.size());
  Problem& p = w.problem;
  p.active_group = w.active_group.data();
  p.active_row0 = w.active_row0.data();
  p.active_rows = w.active_rows.data();
  p.num_active = slots;
  p.stream_group = w.stream_group.data();
  p.stream_row0 = w.stream_row0.data();
  p.stream_rows = w.stream_rows.data();
  p.num_stream = streams;
  const IsaKernels& k = *w.kernels;
  w.gate_up_items =
      with_gate_up ? streams + slots * ((p.f + k.gate_up_panel - 1) / k.gate_up_panel) : 0;
  w.down_items = slots * ((p.d + k.down_panel - 1) / k.down_panel);
  int64_t threads = pool.num_threads();
  if (max_threads > 0 && threads > max_threads) threads = max_threads;
  const int64_t most_items = w.gate_up_items > w.down_items ? w.gate_up_items : w.down_items;
  if (threads > most_items) threads = most_items;
  if (threads < 1) threads = 1;
  // linear() has no gate/up items: no packed gate/up panels of its output width.
  const int64_t floats = k.scratch_floats(with_gate_up ? p.d : 0, p.f);
  if (floats > 0) {
    w.scratch_per_worker = floats + 16;
    w.scratch.resize(static_cast<size_t>(threads * w.scratch_per_worker));
  }
  for (int64_t t = 1; t < threads; ++t) {
    pool.Schedule([work] { WorkOn(*work); });
  }
  WorkOn(w);
  for (int spins = 0; w.done_down.load(std::memory_order_acquire) < w.down_items; ++spins) {
    Relax(spins);
  }
}

bool IsF32OrBf16(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

ElementType TypeOf(ffi::DataType t) {
  return t == ffi::DataType::BF16 ? ElementType::kBF16 : ElementType::kF32;
}

int64_t Dim(const ffi::AnyBuffer& b, int64_t i) { return b.dimensions()[i]; }

ffi::Error NoIsa() {
  return ffi::Error::InvalidArgument(
      "this CPU lacks the requested ISA copy (or it needs bf16 x and weights)");
}

ffi::Error RunGroups(ffi::ThreadPool& pool, const std::shared_ptr<SharedWork>& work,
                     ffi::Buffer<ffi::S32>& group_sizes, int64_t g,
                     ffi::Buffer<ffi::F32>& row_weights, ffi::ResultBuffer<ffi::F32>& y,
                     ffi::ResultBuffer<ffi::F32>& h, int64_t m, int64_t d, int64_t f,
                     int64_t max_threads);

ffi::Error GroupedSwigluImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                             ffi::Buffer<ffi::S32> group_sizes, ffi::AnyBuffer w_gate,
                             ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                             ffi::Buffer<ffi::F32> row_weights, ffi::ResultBuffer<ffi::F32> y,
                             ffi::ResultBuffer<ffi::F32> h, int64_t isa, int64_t max_threads) {
  if (x.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("grouped_swiglu: x must be (M, D)");
  }
  const int64_t m = Dim(x, 0), d = Dim(x, 1);
  if (w_gate.dimensions().size() != 3 || w_up.dimensions().size() != 3 ||
      w_down.dimensions().size() != 3) {
    return ffi::Error::InvalidArgument("grouped_swiglu: weights must be 3-D stacks");
  }
  const int64_t g = Dim(w_gate, 0), f = Dim(w_gate, 2);
  if (Dim(w_gate, 1) != d || Dim(w_up, 0) != g || Dim(w_up, 1) != d || Dim(w_up, 2) != f ||
      Dim(w_down, 0) != g || Dim(w_down, 1) != f || Dim(w_down, 2) != d) {
    return ffi::Error::InvalidArgument(
        "grouped_swiglu: w_gate, w_up must be (G, D, F) and w_down (G, F, D)");
  }
  const ffi::DataType wt = w_gate.element_type();
  if (w_up.element_type() != wt || w_down.element_type() != wt || !IsF32OrBf16(wt) ||
      !IsF32OrBf16(x.element_type())) {
    return ffi::Error::InvalidArgument(
        "grouped_swiglu: x and the weights must be float32 or bfloat16 (weights all alike)");
  }
  if (group_sizes.element_count() != static_cast<size_t>(g) ||
      row_weights.element_count() != static_cast<size_t>(m) ||
      y->element_count() != static_cast<size_t>(m * d) ||
      h->element_count() != static_cast<size_t>(m * f)) {
    return ffi::Error::InvalidArgument(
        "grouped_swiglu: group_sizes (G,), row_weights (M,), y (M, D), h (M, F) expected");
  }
  auto work = std::make_shared<SharedWork>();
  work->kernels = SelectKernels(isa, wt == ffi::DataType::BF16 &&
                                         x.element_type() == ffi::DataType::BF16);
  if (work->kernels == nullptr) return NoIsa();
  Problem& p = work->problem;
  p.x = x.untyped_data();
  p.x_type = TypeOf(x.element_type());
  p.w_gate = w_gate.untyped_data();
  p.w_up = w_up.untyped_data();
  p.w_down = w_down.untyped_data();
  p.weight_type = TypeOf(wt);
  return RunGroups(pool, work, group_sizes, g, row_weights, y, h, m, d, f, max_threads);
}

// Lists the active groups of group_sizes and runs the SwiGLU items of work->kernels on the
// operands already set in work->problem (x, weights).
ffi::Error RunGroups(ffi::ThreadPool& pool, const std::shared_ptr<SharedWork>& work,
                     ffi::Buffer<ffi::S32>& group_sizes, int64_t g,
                     ffi::Buffer<ffi::F32>& row_weights, ffi::ResultBuffer<ffi::F32>& y,
                     ffi::ResultBuffer<ffi::F32>& h, int64_t m, int64_t d, int64_t f,
                     int64_t max_threads) {
  const int32_t* sizes = group_sizes.typed_data();
  int64_t row = 0;
  for (int64_t i = 0; i < g && row < m; ++i) {
    // Negative sizes count as empty; groups past M rows are cut at M (rows past the sum of
    // group_sizes belong to no group).
    int64_t rows = sizes[i] > 0 ? sizes[i] : 0;
    if (rows > m - row) rows = m - row;
    if (rows > 0) work->AddGroup(i, row, rows);
    row += rows;
  }
  float* out = y->typed_data();
  if (row < m) std::memset(out + row * d, 0, sizeof(float) * (m - row) * d);
  if ((work->active_group.empty() && work->stream_group.empty()) || d == 0) {
    return ffi::Error::Success();
  }
  if (f == 0) {
    std::memset(out, 0, sizeof(float) * row * d);
    return ffi::Error::Success();
  }
  Problem& p = work->problem;
  p.row_weights = row_weights.typed_data();
  p.y = out;
  p.h = h->untyped_data();
  p.h_type = work->kernels->hidden_type;
  p.m = m;
  p.d = d;
  p.f = f;
  Run(pool, work, /*with_gate_up=*/true, max_threads);
  return ffi::Error::Success();
}

// The copy of the packed-stack SwiGLU for this request: no AMX copy of it (yet), so AMX and
// AUTO take the best vector copy for x's type.
const IsaKernels* SelectPackedExperts(int64_t request, bool x_bf16) {
#if defined(BROWNOUT_HAVE_X86_KERNELS)
  switch (request) {
    case kAvx512Bf16:
      return x_bf16 && CpuHasAvx512Bf16() ? &PackedExpertsAvx512Bf16Kernels() : nullptr;
    case kAvx512:
      return CpuHasAvx512() ? &PackedExpertsAvx512Kernels() : nullptr;
    case kAvx2:
      return CpuHasAvx2() ? &PackedExpertsAvx2Kernels() : nullptr;
    case kGeneric:
      return &PackedExpertsGenericKernels();
    case kAuto:
    case kAmxBf16:
      break;
    default:
      return nullptr;
  }
  if (x_bf16 && CpuHasAvx512Bf16()) return &PackedExpertsAvx512Bf16Kernels();
  if (CpuHasAvx512()) return &PackedExpertsAvx512Kernels();
  if (CpuHasAvx2()) return &PackedExpertsAvx2Kernels();
#else
  if (request != kAuto && request != kGeneric && request != kAmxBf16) return nullptr;
#endif
  return &PackedExpertsGenericKernels();
}

ffi::Error PackedGroupedSwigluImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                                   ffi::Buffer<ffi::S32> group_sizes,
                                   ffi::Buffer<ffi::BF16> w_gate, ffi::Buffer<ffi::BF16> w_up,
                                   ffi::Buffer<ffi::BF16> w_down,
                                   ffi::Buffer<ffi::F32> row_weights,
                                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> h,
                                   int64_t f, int64_t isa, int64_t max_threads) {
  if (x.dimensions().size() != 2 || !IsF32OrBf16(x.element_type())) {
    return ffi::Error::InvalidArgument("packed_grouped_swiglu: x must be (M, D) f32 or bf16");
  }
  const int64_t m = Dim(x, 0), d = Dim(x, 1);
  const int64_t nbd = (d + 31) / 32, nbf = (f + 31) / 32;
  const auto gd = w_gate.dimensions();
  const auto ud = w_up.dimensions();
  const auto dd = w_down.dimensions();
  if (gd.size() != 4 || ud.size() != 4 || dd.size() != 4 || f < 0) {
    return ffi::Error::InvalidArgument("packed_grouped_swiglu: weights must be packed stacks");
  }
  const int64_t g = gd[0];
  for (int i = 0; i < 4; ++i) {
    if (gd[i] != ud[i]) {
      return ffi::Error::InvalidArgument("packed_grouped_swiglu: w_up must match w_gate");
    }
  }
  if (gd[1] != nbf || gd[2] != nbd * 16 || gd[3] != 64 || dd[0] != g || dd[1] != nbd ||
      dd[2] != nbf * 16 || dd[3] != 64) {
    return ffi::Error::InvalidArgument(
        "packed_grouped_swiglu: w_gate/w_up must pack (G, D, F) and w_down (G, F, D) stacks");
  }
  if (group_sizes.element_count() != static_cast<size_t>(g) ||
      row_weights.element_count() != static_cast<size_t>(m) ||
      y->element_count() != static_cast<size_t>(m * d) ||
      h->element_count() != static_cast<size_t>(m * nbf * 32)) {
    return ffi::Error::InvalidArgument(
        "packed_grouped_swiglu: group_sizes (G,), row_weights (M,), y (M, D), h (M, F "
        "padded to 32) expected");
  }
  const bool x_bf16 = x.element_type() == ffi::DataType::BF16;
  auto work = std::make_shared<SharedWork>();
  work->kernels = SelectPackedExperts(isa, x_bf16);
  if (work->kernels == nullptr) return NoIsa();
  Problem& p = work->problem;
  const int64_t ldx = nbd * 32, elem = x_bf16 ? 2 : 4;
  if (ldx == d) {
    p.x = x.untyped_data();
  } else {  // rows padded with zeros to the packed depth
    work->x_padded.assign(static_cast<size_t>(m * ldx * elem), 0);
    const auto* in = static_cast<const unsigned char*>(x.untyped_data());
    for (int64_t r = 0; r < m; ++r) {
      std::memcpy(work->x_padded.data() + r * ldx * elem, in + r * d * elem,
                  static_cast<size_t>(d * elem));
    }
    p.x = work->x_padded.data();
  }
  p.x_type = x_bf16 ? ElementType::kBF16 : ElementType::kF32;
  p.w_gate = w_gate.typed_data();
  p.w_up = w_up.typed_data();
  p.w_down = w_down.typed_data();
  p.weight_type = ElementType::kBF16;
  return RunGroups(pool, work, group_sizes, g, row_weights, y, h, m, d, f, max_threads);
}

ffi::Error LinearImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::Buffer<ffi::PRED> row_valid, ffi::ResultBuffer<ffi::F32> y,
                      int64_t isa, int64_t max_threads) {
  if (x.dimensions().size() != 2 || w.dimensions().size() != 2 || Dim(w, 0) != Dim(x, 1)) {
    return ffi::Error::InvalidArgument("linear: x must be (M, K) and w (K, N)");
  }
  if (!IsF32OrBf16(x.element_type()) || !IsF32OrBf16(w.element_type())) {
    return ffi::Error::InvalidArgument("linear: x and w must be float32 or bfloat16");
  }
  const int64_t m = Dim(x, 0), k = Dim(x, 1), n = Dim(w, 1);
  if (y->element_count() != static_cast<size_t>(m * n) ||
      row_valid.element_count() != static_cast<size_t>(m)) {
    return ffi::Error::InvalidArgument("linear: row_valid must be (M,) and y (M, N)");
  }
  auto work = std::make_shared<SharedWork>();
  work->kernels = SelectKernels(isa, x.element_type() == ffi::DataType::BF16 &&
                                         w.element_type() == ffi::DataType::BF16);
  if (work->kernels == nullptr) return NoIsa();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(y->typed_data(), 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  for (int64_t row = 0; row < m; row += kLinearRowChunk) {
    work->AddRows(0, row, m - row < kLinearRowChunk ? m - row : kLinearRowChunk);
  }
  // The down items compute y = h · w_down[0] over (row chunk, column panel) items.
  Problem& p = work->problem;
  p.w_down = w.untyped_data();
  p.weight_type = TypeOf(w.element_type());
  p.row_weights = nullptr;
  p.row_valid = reinterpret_cast<const uint8_t*>(row_valid.typed_data());
  p.y = y->typed_data();
  p.h = const_cast<void*>(x.untyped_data());
  p.h_type = TypeOf(x.element_type());
  p.m = m;
  p.d = n;
  p.f = k;
  Run(pool, work, /*with_gate_up=*/false, max_threads);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace brownout

// The library is built with hidden visibility; the handlers and the ISA query are its exports.
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(BrownoutLinear, brownout::LinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x (M, K)
                                  .Arg<ffi::AnyBuffer>()         // w (K, N)
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // row_valid (M,)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y (M, N)
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BrownoutPackedGroupedSwiglu, brownout::PackedGroupedSwigluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x (M, D), rows by group
                                  .Arg<ffi::Buffer<ffi::S32>>()   // group_sizes (G,)
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w_gate (G, NBf, KPd, 64)
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w_up (G, NBf, KPd, 64)
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w_down (G, NBd, KPf, 64)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // row_weights (M,)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y (M, D)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h (M, NBf·32), scratch
                                  .Attr<int64_t>("f")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("max_threads"));

// The copy a packed-stack SwiGLU request resolves to on this CPU ("" when it lacks it).
extern "C" const char* BrownoutPackedExpertsIsa(int64_t request, int32_t x_bf16) {
  const brownout::IsaKernels* kernels = brownout::SelectPackedExperts(request, x_bf16 != 0);
  return kernels == nullptr ? "" : kernels->name;
}

// The ISA copy a request resolves to on this CPU ("" when it lacks it); for logs and tests.
extern "C" const char* BrownoutCpuKernelIsa(int64_t request, int32_t all_bf16) {
  const brownout::IsaKernels* kernels = brownout::SelectKernels(request, all_bf16 != 0);
  return kernels == nullptr ? "" : kernels->name;
}
#pragma GCC visibility pop
