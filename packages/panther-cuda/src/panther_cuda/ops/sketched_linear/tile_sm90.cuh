// Block-level tiles of the sm_90a kernels (forward_sm90.cu, backward_sm90.cu): a block of two warpgroups
// (SM90_NT = 256 threads) computes a 128 x 128 fp32 tile with wgmma (wgmma.cuh), warpgroup g its rows
// 64 g .. 64 g + 63, from operand tiles in shared memory in the no-swizzle layouts, each 16-byte run written by
// one cp.async (zero-filled past the edges), eight consecutive threads filling one 128-byte core matrix:
//   K-major, ROWS x KD (rows: M of A, N of B; K contiguous in memory):
//       (r, k) at (r % 8) 8 + (k % 8) + (k / 8) 64 + (r / 8) KD 8          (LBO 128 B, SBO 16 KD B)
//   MN-major, KD x 128 (M of A or N of B contiguous in memory):
//       (k, n) at (k % 8) 8 + (n % 8) + (n / 8) 64 + (k / 8) 128 8          (SBO 128 B, LBO 2048 B)
// Run i of a tile lands at tile + 8 i; kmajor_run / mnmajor_run say which 16 bytes it holds. The operands'
// tensors must be 16-byte aligned and their runs whole (the host checks).
#pragma once

#include "tile.cuh"
#include "wgmma.cuh"

namespace panther {
namespace sl {

constexpr int SM90_NT = 256;  // threads of a block: two warpgroups (forward.py's SM90_THREADS)

#ifdef PANTHER_SM90A
// Run i of a K-major tile ROWS x KD: row (i / KD) 8 + i % 8, 8-element chunk (i / 8) % (KD / 8) along K.
template <int KD> __device__ __forceinline__ void kmajor_run(int i, int& row, int& chunk) {
    row = i / KD * 8 + i % 8;
    chunk = i / 8 % (KD / 8);
}
// Run i of an MN-major tile KD x 128: K row (i / 128) 8 + i % 8, 8-element chunk (i / 8) % 16 along M or N.
__device__ __forceinline__ void mnmajor_run(int i, int& k, int& chunk) {
    k = i / 128 * 8 + i % 8;
    chunk = i / 8 % 16;
}

// An operand tile's descriptor, its first 16 steps along K from `tile`, warpgroup-row offset `row0` (A: 64 g).
template <bool MN, int KD> __device__ __forceinline__ unsigned long long tile_descriptor(const void* tile, int k0, int row0) {
    const auto* p = static_cast<const unsigned char*>(tile);
    if (MN) return sm90::descriptor(p + 2 * (k0 * 128 + row0 * 8), 16u * 128, 128u);
    return sm90::descriptor(p + 2 * (k0 * 8 + row0 * KD), 128u, 16u * KD);
}

// d (this warpgroup's 64 x 128 fp32) = A B, plus d itself when ACCUMULATE: A the block's 128 x KD tile at a
// (MN-major when A_MN), B its KD x 128 tile at b (MN-major when B_MN); KD / 16 wgmma, waited for.
template <typename T, bool A_MN, bool B_MN, int KD, bool ACCUMULATE>
__device__ __forceinline__ void product(float (&d)[64], const T* a, const T* b) {
    const int row0 = threadIdx.x / 128 * 64;
    sm90::wgmma_fence();
#pragma unroll
    for (int k0 = 0; k0 < KD; k0 += 16) {  // 16 deep: two core matrices along K of each operand
        sm90::Wgmma<T, A_MN, B_MN>::m64n128k16(d, tile_descriptor<A_MN, KD>(a, k0, row0),
                                              tile_descriptor<B_MN, KD>(b, k0, 0), ACCUMULATE || k0 > 0 ? 1 : 0);
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
}

// d += Σ over `steps` steps of KD: load(stage, step) fills stage `stage` (A's tile at As + stage 128 KD, B's at
// Bs + stage KD 128) with the tiles of step `step` by cp.async, S stages deep (one barrier per step, as
// tile.cuh's ring); hook(stage) sees each step's tiles once they are in. Every thread of the block must call
// it; on return no copy is in flight.
template <typename T, bool A_MN, bool B_MN, int KD, int S, typename Load, typename Hook>
__device__ __forceinline__ void ring_sm90(float (&d)[64], T* As, T* Bs, long long steps, const Load& load,
                                          const Hook& hook) {
    constexpr int SA = 128 * KD, SB = KD * 128;
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (s < steps) load(s, static_cast<long long>(s));
        cp_async_commit();
    }
    int stage = 0;
    for (long long step = 0; step < steps; ++step) {
        cp_async_wait<S - 2>();  // this step's tiles are in
        sm90::fence_proxy_async();
        __syncthreads();  // ... for every thread, and every warpgroup is done with the stage loaded next
        if (step + S - 1 < steps) load(stage == 0 ? S - 1 : stage - 1, step + S - 1);
        cp_async_commit();
        hook(stage);
        product<T, A_MN, B_MN, KD, true>(d, As + stage * SA, Bs + stage * SB);
        stage = stage == S - 1 ? 0 : stage + 1;
    }
    cp_async_wait<0>();
    __syncthreads();
}

// f(row, col, v0, v1) for each pair of neighbouring columns this thread holds of the block's 128 x 128 tile
// (from the tile's origin; col even).
template <typename F> __device__ __forceinline__ void each_pair(const float (&d)[64], F f) {
    const int lane = threadIdx.x & 31, warp = (threadIdx.x & 127) >> 5;
    const int row0 = (threadIdx.x >> 7) * 64 + warp * 16 + (lane >> 2);
#pragma unroll
    for (int i = 0; i < 16; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half)
            f(row0 + 8 * half, 8 * i + 2 * (lane & 3), d[4 * i + 2 * half], d[4 * i + 2 * half + 1]);
}
#endif  // PANTHER_SM90A

}  // namespace sl
}  // namespace panther
