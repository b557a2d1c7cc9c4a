// What the FFI fronts share (they are compiled without ISA flags, so these checks are safe
// on any x86-64 CPU): the ISA copy a call asks for, what the CPU (and the OS) let the kernels
// run, and how a thread waits for its workers. Internal linkage, as in problem.h.
#ifndef BROWNOUT_CSRC_CPU_FEATURES_H_
#define BROWNOUT_CSRC_CPU_FEATURES_H_

#include <cstdint>
#include <thread>

#if defined(BROWNOUT_HAVE_X86_KERNELS)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace brownout {

// The `isa` attribute of every handler (cpu_kernels.library.Isa).
enum IsaRequest : int64_t {
  kAuto = 0,
  kGeneric = 1,
  kAvx2 = 2,
  kAvx512 = 3,
  kAvx512Bf16 = 4,
  kAmxBf16 = 5,
};

// Spin briefly (pause), then yield: how the calling thread waits for the last items.
static inline void Relax(int spins) {
  if (spins < 64) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  } else {
    std::this_thread::yield();
  }
}

static inline bool CpuHasAvx2() {
#if defined(BROWNOUT_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

static inline bool CpuHasAvx512() {
#if defined(BROWNOUT_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

static inline bool CpuHasAvx512Bf16() {
#if defined(BROWNOUT_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  return CpuHasAvx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22), tile state enabled by the OS
// (XCR0 bits 17, 18), and Linux's permission to use it in this process — asked once
// (arch_prctl ARCH_REQ_XCOMP_PERM = 0x1023 for XFEATURE_XTILEDATA = 18; refused on kernels
// older than 5.16, and then AMX is not used).
static inline bool CpuHasAmxBf16() {
#if defined(BROWNOUT_HAVE_X86_KERNELS)
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!CpuHasAvx512Bf16() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if ((d & (1u << 22)) == 0 || (d & (1u << 24)) == 0) return false;
    uint32_t lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace brownout

#endif  // BROWNOUT_CSRC_CPU_FEATURES_H_
