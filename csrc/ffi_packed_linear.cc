// XLA FFI front of the packed-weight matmul (packed_linear.h): checks the buffers, pads x to
// the packed depth (and to the AMX row tiles), picks the ISA copy from what the CPU has and
// how many rows the call has, and runs its items on XLA:CPU's intra-op pool — the calling
// thread too; workers take items from an atomic counter, so nobody waits for a worker that
// never started (the scheme of ffi_expert_kernels.cc, without its gate/up barrier).
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "cpu_features.h"
#include "packed_linear.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace brownout {
namespace {

// Calls with fewer rows read the weights once and are bound by that: the vector copies
// stream them; tiles pay off from here on.
constexpr int64_t kAmxMinRows = 16;
// Rows of one item (a multiple of every copy's row tile: 6, 4, 2, 32): up to this many rows
// read each weight block once; more rows are split so both cores share a narrow matrix.
constexpr int64_t kVectorRowChunk = 96;
constexpr int64_t kAmxRowChunk = 256;

const PackedKernels* SelectPacked(int64_t request, bool x_bf16, int64_t m) {
#if defined(BROWNOUT_HAVE_X86_KERNELS)
  switch (request) {
    case kAmxBf16:
      return x_bf16 && CpuHasAmxBf16() ? &PackedAmxBf16Kernels() : nullptr;
    case kAvx512Bf16:
      return x_bf16 && CpuHasAvx512Bf16() ? &PackedAvx512Bf16Kernels() : nullptr;
    case kAvx512:
      return CpuHasAvx512() ? &PackedAvx512Kernels() : nullptr;
    case kAvx2:
      return CpuHasAvx2() ? &PackedAvx2Kernels() : nullptr;
    case kGeneric:
      return &PackedGenericKernels();
    default:
      break;
  }
  if (x_bf16 && m >= kAmxMinRows && CpuHasAmxBf16()) return &PackedAmxBf16Kernels();
  if (x_bf16 && CpuHasAvx512Bf16()) return &PackedAvx512Bf16Kernels();
  if (CpuHasAvx512()) return &PackedAvx512Kernels();
  if (CpuHasAvx2()) return &PackedAvx2Kernels();
#else
  if (request != kAuto && request != kGeneric) return nullptr;
#endif
  return &PackedGenericKernels();
}

struct PackedRun {
  PackedProblem problem{};
  const PackedKernels* kernels = nullptr;
  int64_t items = 0;
  std::vector<unsigned char> x_padded;  // owned copy of x when it needs padding
  std::vector<float> scratch;
  int64_t scratch_per_worker = 0;
  std::atomic<int64_t> next_worker{0};
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void WorkOn(PackedRun& run) {
  float* scratch = nullptr;
  if (run.scratch_per_worker > 0) {
    const int64_t worker = run.next_worker.fetch_add(1, std::memory_order_relaxed);
    float* base = run.scratch.data() + worker * run.scratch_per_worker;
    scratch = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(base) + 63) & ~uintptr_t{63});
  }
  for (int64_t i; (i = run.next.fetch_add(1, std::memory_order_relaxed)) < run.items;) {
    run.kernels->item(run.problem, i, scratch);
    run.done.fetch_add(1, std::memory_order_release);
  }
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

ffi::Error PackedLinearImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::BF16> w,
                            ffi::Buffer<ffi::PRED> row_valid, ffi::ResultBuffer<ffi::F32> y,
                            int64_t isa, int64_t max_threads) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != 64 || yd[0] != xd[0]) {
    return ffi::Error::InvalidArgument(
        "packed_linear: x must be (M, K), w (NB, KP, 64) packed bf16, y (M, N)");
  }
  const int64_t m = xd[0], k = xd[1], n = yd[1], blocks = wd[0], kp = wd[1];
  if (kp % 16 != 0 || 2 * kp < k || 2 * kp - k >= kPackDepthAlign || blocks * 32 < n ||
      blocks * 32 - n >= kPackBlockCols) {
    return ffi::Error::InvalidArgument(
        "packed_linear: w is not the packing of a (K, N) weight for x's K and y's N");
  }
  if (row_valid.element_count() != static_cast<size_t>(m)) {
    return ffi::Error::InvalidArgument("packed_linear: row_valid must be (M,)");
  }
  const ffi::DataType xt = x.element_type();
  if (xt != ffi::DataType::F32 && xt != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("packed_linear: x must be float32 or bfloat16");
  }
  const bool x_bf16 = xt == ffi::DataType::BF16;
  auto run = std::make_shared<PackedRun>();
  run->kernels = SelectPacked(isa, x_bf16, m);
  if (run->kernels == nullptr) {
    return ffi::Error::InvalidArgument(
        "packed_linear: this CPU lacks the requested ISA copy (or it needs bf16 x)");
  }
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (kp == 0) {
    std::memset(y->typed_data(), 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  const PackedKernels& kernels = *run->kernels;
  PackedProblem& p = run->problem;
  const int64_t elem = x_bf16 ? 2 : 4;
  const int64_t rows = CeilDiv(m, kernels.row_align) * kernels.row_align;
  p.ldx = 2 * kp;
  if (p.ldx == k && rows == m) {
    p.x = x.untyped_data();
  } else {  // zero-padded copy: depth to 2 · KP, rows to the copy's row tiles
    run->x_padded.assign(static_cast<size_t>(rows * p.ldx * elem), 0);
    const auto* in = static_cast<const unsigned char*>(x.untyped_data());
    for (int64_t r = 0; r < m; ++r) {
      std::memcpy(run->x_padded.data() + r * p.ldx * elem, in + r * k * elem,
                  static_cast<size_t>(k * elem));
    }
    p.x = run->x_padded.data();
  }
  p.x_type = x_bf16 ? ElementType::kBF16 : ElementType::kF32;
  p.w = reinterpret_cast<const uint16_t*>(w.typed_data());
  p.kp = kp;
  p.blocks = blocks;
  p.y = y->typed_data();
  p.m = m;
  p.n = n;
  p.row_valid = reinterpret_cast<const uint8_t*>(row_valid.typed_data());
  p.row_chunk = kernels.row_align > 1 ? kAmxRowChunk : kVectorRowChunk;
  if (p.row_chunk > m) p.row_chunk = m;
  p.row_chunks = CeilDiv(m, p.row_chunk);
  p.blocks_per_item = kernels.blocks_per_item;
  run->items = CeilDiv(blocks, kernels.blocks_per_item) * p.row_chunks;

  int64_t threads = pool.num_threads();
  if (max_threads > 0 && threads > max_threads) threads = max_threads;
  if (threads > run->items) threads = run->items;
  if (threads < 1) threads = 1;
  if (kernels.scratch_floats > 0) {
    run->scratch_per_worker = kernels.scratch_floats + 16;
    run->scratch.resize(static_cast<size_t>(threads * run->scratch_per_worker));
  }
  for (int64_t t = 1; t < threads; ++t) {
    pool.Schedule([run] { WorkOn(*run); });
  }
  WorkOn(*run);
  for (int spins = 0; run->done.load(std::memory_order_acquire) < run->items; ++spins) {
    Relax(spins);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace brownout

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(BrownoutPackedLinear, brownout::PackedLinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x (M, K)
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // w (NB, KP, 64) packed
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // row_valid (M,)
                                  .Ret<ffi::Buffer<ffi::F32>>()    // y (M, N)
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("max_threads"));

// The copy a packed call with these operands resolves to on this CPU ("" when it lacks it).
extern "C" const char* BrownoutPackedLinearIsa(int64_t request, int32_t x_bf16, int64_t rows) {
  const brownout::PackedKernels* kernels =
      brownout::SelectPacked(request, x_bf16 != 0, rows);
  return kernels == nullptr ? "" : kernels->name;
}
#pragma GCC visibility pop
