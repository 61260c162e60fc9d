// What every Panther CUDA kernel shares: element types, conversions, and the tensor-core MMA of each
// precision with its fragment layout. Included by the ops' .cu files (NVRTC: -I<package>/include).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace panther {

using bf16 = __nv_bfloat16;
using f16 = __half;

// ---------------------------------------------------------------------------------------------------
// Conversions to and from the fp32 accumulator

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<f16>(f16 v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<bf16>(bf16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ f16 from_float<f16>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }

// Two 16-bit elements in one 32-bit register, `lo` in the low half: the operand format of mma.sync.
template <typename T> __device__ __forceinline__ unsigned pack2(T lo, T hi) {
    static_assert(sizeof(T) == 2, "pack2 packs 16-bit elements");
    unsigned short a = *reinterpret_cast<unsigned short*>(&lo);
    unsigned short b = *reinterpret_cast<unsigned short*>(&hi);
    return static_cast<unsigned>(a) | (static_cast<unsigned>(b) << 16);
}

// fp32 -> tf32 (round to nearest, ties away), kept in a 32-bit register: the operand format of tf32 mma.
__device__ __forceinline__ unsigned to_tf32(float v) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
}

// ---------------------------------------------------------------------------------------------------
// Tensor-core MMA, D = A B + C, one warp, fp32 accumulator (sm_80 and later).
//
// Fragment layout (g = lane / 4, t = lane % 4), per PTX ISA "mma.m16n8k16" / "mma.m16n8k8":
//   C, D (16 x 8 fp32):   c[0], c[1] = (row g,     cols 2t, 2t+1);  c[2], c[3] = (row g + 8, cols 2t, 2t+1)
//   16-bit A (16 x 16):   a[0] = (row g, cols 2t..2t+1)    a[1] = (row g+8, cols 2t..2t+1)
//                         a[2] = (row g, cols 2t+8..2t+9)  a[3] = (row g+8, cols 2t+8..2t+9)
//   16-bit B (16 x 8):    b[0] = (rows 2t..2t+1, col g)    b[1] = (rows 2t+8..2t+9, col g)
//   tf32 A (16 x 8):      a[0] = (g, t)  a[1] = (g+8, t)  a[2] = (g, t+4)  a[3] = (g+8, t+4)
//   tf32 B (8 x 8):       b[0] = (row t, col g)  b[1] = (row t+4, col g)
// (for 16-bit operands, the lower column / row index sits in the low half of the register).

template <typename T> struct Mma;  // Mma<T>::K: depth of one instruction; Mma<T>::run(d, a, b)

template <> struct Mma<bf16> {
    static constexpr int K = 16;
    __device__ __forceinline__ static void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

template <> struct Mma<f16> {
    static constexpr int K = 16;
    __device__ __forceinline__ static void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

// float operands on the tensor cores as TF32 (torch's allow_tf32); exact float32 products use FFMA instead.
template <> struct Mma<float> {
    static constexpr int K = 8;
    __device__ __forceinline__ static void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
        asm volatile(
            "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

// Fragments from tiles in shared memory. `A(r, c)` / `B(r, c)` return the element at (row, col) of the
// 16 x K / K x 8 operand tile as T; the caller's functors carry the tile's strides (row- or column-major,
// transposed views) so one loader serves every layout.
template <typename T, typename F>
__device__ __forceinline__ void load_a(unsigned (&a)[4], F A, int lane) {
    const int g = lane >> 2, t = lane & 3;
    if constexpr (sizeof(T) == 2) {
        a[0] = pack2<T>(A(g, 2 * t), A(g, 2 * t + 1));
        a[1] = pack2<T>(A(g + 8, 2 * t), A(g + 8, 2 * t + 1));
        a[2] = pack2<T>(A(g, 2 * t + 8), A(g, 2 * t + 9));
        a[3] = pack2<T>(A(g + 8, 2 * t + 8), A(g + 8, 2 * t + 9));
    } else {
        a[0] = to_tf32(A(g, t));
        a[1] = to_tf32(A(g + 8, t));
        a[2] = to_tf32(A(g, t + 4));
        a[3] = to_tf32(A(g + 8, t + 4));
    }
}

template <typename T, typename F>
__device__ __forceinline__ void load_b(unsigned (&b)[2], F B, int lane) {
    const int g = lane >> 2, t = lane & 3;
    if constexpr (sizeof(T) == 2) {
        b[0] = pack2<T>(B(2 * t, g), B(2 * t + 1, g));
        b[1] = pack2<T>(B(2 * t + 8, g), B(2 * t + 9, g));
    } else {
        b[0] = to_tf32(B(t, g));
        b[1] = to_tf32(B(t + 4, g));
    }
}

// Row / column of accumulator element i (0..3) of a 16 x 8 tile for this lane.
__device__ __forceinline__ int acc_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
__device__ __forceinline__ int acc_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

__device__ __forceinline__ long long cdiv(long long a, long long b) { return (a + b - 1) / b; }

#ifndef PANTHER_PTX_EMULATED
// 16 bytes from global to shared memory with no register round trip (sm_80 cp.async, L2 only); the copies
// a thread issued since its last commit form one group; wait<N> returns once at most N of its groups are
// still in flight (the copies are visible to the block after a __syncthreads that follows).
__device__ __forceinline__ void cp_async16(void* s, const void* g) {
    const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(s));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(g) : "memory");
}
// The same with a source size: the first `bytes` (0..16) of the 16 come from g, the rest are zero (g is not
// read when bytes is 0): the edges of a tile without a branch.
__device__ __forceinline__ void cp_async16_zfill(void* s, const void* g, unsigned bytes) {
    const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(s));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(g), "r"(bytes) : "memory");
}
// B = 4, 8 or 16 bytes (s and g aligned to B) with a source size of 0 or B: zeros, or a copy (the narrow
// copies go through L1, .ca; cp.async has no 4- or 8-byte .cg).
template <int B> __device__ __forceinline__ void cp_async_zfill(void* s, const void* g, unsigned bytes) {
    static_assert(B == 4 || B == 8 || B == 16, "cp.async copies 4, 8 or 16 bytes");
    const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(s));
    if constexpr (B == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(g), "r"(bytes) : "memory");
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(sa), "l"(g), "n"(B), "r"(bytes) : "memory");
    }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Four 8 x 8 matrices of 16-bit elements from shared memory, one warp: lanes 8j .. 8j + 7 give the
// (16-byte aligned) addresses of matrix j's rows 0 .. 7; r[j] gets lane l's part of matrix j, per PTX
// "ldmatrix": (row l / 4, columns 2 (l % 4), +1), or with TRANS (rows 2 (l % 4), +1, column l / 4),
// the lower index in the low half.
template <bool TRANS> __device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    }
}
#endif  // PANTHER_PTX_EMULATED

}  // namespace panther
