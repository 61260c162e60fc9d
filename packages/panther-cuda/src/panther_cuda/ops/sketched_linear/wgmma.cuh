// Hopper (sm_90a) warpgroup matrix products: wgmma.mma_async reads its operands from shared memory through
// 64-bit matrix descriptors and accumulates in registers, issued by the 128 threads of a warpgroup (four
// consecutive warps from a warp index divisible by 4). Used by forward_sm90.cu; compiled for sm_90a only
// (PANTHER_SM90A below; elsewhere the kernels that use it trap, and the host never launches them).
//
// Operand layouts: PTX ISA, "Shared Memory Matrix Layout"; the kernels use the 128-byte swizzle (tile_sm90.cuh
// says where each element lies; the descriptor's layout type 1, LBO and SBO byte offsets in multiples of 16).
// K-major: A read as rows m with K contiguous; MN-major: B read with transpose, row k of a row-major K x N
// matrix, N contiguous.
#pragma once

#include "panther_cuda/common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(PANTHER_PTX_EMULATED)
#define PANTHER_SM90A 1
#endif
// The host compiles these kernels with -arch=sm_90a, which defines PANTHER_REQUIRE_SM90A (_nvrtc.compile_options);
// should another -arch win (CuPy appends the device's own), fail the compile rather than build the trap.
#if defined(__CUDA_ARCH__) && defined(PANTHER_REQUIRE_SM90A) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "the sm_90a kernels compiled without sm_90a features: another -arch option overrode -arch=sm_90a"
#endif

namespace panther {
namespace sm90 {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The descriptor of an operand starting at `p` (shared memory, 16-byte aligned): bits 0-13 the start address,
// 16-29 the leading byte offset, 32-45 the stride byte offset, each >> 4; base offset 0; the layout type in bits
// 62-63 zero (no swizzle), which the caller replaces (tile_sm90.cuh: 1, the 128-byte swizzle).
__device__ __forceinline__ unsigned long long descriptor(const void* p, unsigned lbo, unsigned sbo) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    return static_cast<unsigned long long>((a >> 4) & 0x3FFF) |
           (static_cast<unsigned long long>((lbo >> 4) & 0x3FFF) << 16) |
           (static_cast<unsigned long long>((sbo >> 4) & 0x3FFF) << 32);
}

// Orders this thread's earlier ordinary (generic-proxy) writes of shared memory, cp.async's included once
// waited for, before later reads by the tensor cores (async proxy); a barrier after it publishes them.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Before the first wgmma of a group: the accumulator registers' earlier writes are ordered before it.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Returns once at most N committed groups of this warpgroup are pending: their accumulators may be read and
// the shared memory they read rewritten.
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins every accumulator register at this point, so that the compiler moves no access of d across the wgmma
// fence before the products or the wait after them (the fence and the wait do not name d).
template <int N> __device__ __forceinline__ void fence_operand(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (64 rows x N columns of fp32 per warpgroup, N = 128 or 64) += A (64 x 16; K-major, or MN-major when TRANS_A) B (16 x
// N; K-major, or MN-major when TRANS_B), or = when accumulate is 0. Thread t of the warpgroup (warp
// w = t / 32, lane l) holds
// d[4 i + v] = element (16 w + l / 4 + 8 (v / 2), 8 i + 2 (l % 4) + v % 2), i < N / 8 (acc_row / acc_col's
// 16 x 8 layout, repeated along N).
template <typename T, bool TRANS_A, bool TRANS_B> struct Wgmma;

#define PANTHER_WGMMA(TYPE, PTX)                                                                                    \
    template <bool TRANS_A, bool TRANS_B> struct Wgmma<TYPE, TRANS_A, TRANS_B> {                                    \
        __device__ __forceinline__ static void m64n128k16(float (&d)[64], unsigned long long a, unsigned long long b, \
                                                           int accumulate) {                                          \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                   \
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " "                              \
                         "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                                                                               \
                         "%64, %65, p, 1, 1, %67, %68;\n}\n"                                                         \
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                                                                                       \
                         : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_A ? 1 : 0), "n"(TRANS_B ? 1 : 0));             \
        }                                                                                                              \
        __device__ __forceinline__ static void m64n64k16(float (&d)[32], unsigned long long a, unsigned long long b,   \
                                                          int accumulate) {                                           \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                   \
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " "                               \
                         "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                                                                                  \
                         "%32, %33, p, 1, 1, %35, %36;\n}\n"                                                         \
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                                                                      \
                         : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_A ? 1 : 0), "n"(TRANS_B ? 1 : 0));             \
        }                                                                                                              \
    };
PANTHER_WGMMA(bf16, "bf16")
PANTHER_WGMMA(f16, "f16")
#undef PANTHER_WGMMA
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace sm90
}  // namespace panther
