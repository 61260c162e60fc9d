// Block-level tiles of the sm_90a kernels (forward_sm90.cu, backward_sm90.cu): a block of two warpgroups
// (SM90_NT = 256 threads) computes a 128 x 128 fp32 tile with wgmma (wgmma.cuh), warpgroup g its rows
// 64 g .. 64 g + 63, from operand tiles in shared memory in the 128-byte swizzle (layout type 1): 1024-byte atoms
// of 8 rows of 128 bytes, aligned to 1024 bytes, the 16-byte chunk c of row r of an atom stored at chunk c ^ r.
// Each 16-byte run is written by one cp.async (zero-filled past the edges), consecutive threads copying
// consecutive runs of a row in memory:
//   K-major, 128 x KW (rows: M of A, N of B; K contiguous in memory; KW / 64 blocks of 128 x 64 side by side):
//       (r, k) at (k / 64) 8192 + r 64 + (((k / 8) % 8) ^ (r % 8)) 8 + k % 8                 (SBO 1024 B)
//   MN-major, KD x 128 (M of A or N of B contiguous in memory; two columns of KD / 8 atoms):
//       (k, n) at ((n / 64) (KD / 8) + k / 8) 512 + (k % 8) 64 + (((n / 8) % 8) ^ (k % 8)) 8 + n % 8
//                                                                           (SBO 1024 B, LBO KD / 8 1024 B)
// The operands' tensors must be 16-byte aligned and their rows whole runs (the host checks).
#pragma once

#include "tile.cuh"
#include "wgmma.cuh"

namespace panther {
namespace sl {

// Threads of a block: two warpgroups (sm90.py's THREADS); the kernels ask for two blocks per SM (at most 128
// registers a thread) where their shared memory allows it.
constexpr int SM90_NT = 256;

#ifdef PANTHER_SM90A
// The swizzled layouts' element offsets (above): run (row r, chunk c along K) of a K-major 128 x KW tile (KW a
// multiple of 64: KW / 64 blocks of 128 x 64 side by side), and run (K row k, chunk c of 16 along M or N) of an
// MN-major KD x 128 tile (KD a multiple of 8: two columns of KD / 8 atoms).
template <int KW> __device__ __forceinline__ int sw_kmajor(int r, int c) {
    static_assert(KW % 64 == 0, "whole 128-byte rows");
    return (c >> 3) * (128 * 64) + r * 64 + (((c & 7) ^ (r & 7)) << 3);
}
template <int KD> __device__ __forceinline__ int sw_mnmajor(int k, int c) {
    static_assert(KD % 8 == 0, "whole atoms along K");
    return ((c >> 3) * (KD / 8) + (k >> 3)) * 512 + (k & 7) * 64 + (((c & 7) ^ (k & 7)) << 3);
}

// Fill the swizzled K-major 128 x KW tile with f's elements (r0 + r, k0 + k), zero where r0 + r >= nr or
// k0 + k >= nk (a run cut by the K edge copies its part), by cp.async (the caller commits and waits).
template <typename T, int KW, typename F>
__device__ __forceinline__ void load_kmajor_sw(T* tile, const F& f, long long r0, long long k0, long long nr, long long nk) {
    constexpr int CH = KW / 8;  // runs of a row
#pragma unroll
    for (int i = threadIdx.x; i < 128 * CH; i += SM90_NT) {
        const int r = i / CH, c = i % CH;
        const long long gr = r0 + r, gk = k0 + 8 * c, room = nk - gk;
        const int n = gr >= nr || room <= 0 ? 0 : room >= 8 ? 8 : static_cast<int>(room);
        cp_async16_zfill(tile + sw_kmajor<KW>(r, c), n > 0 ? f.ptr(gr, gk) : f.ptr(0, 0),
                         static_cast<unsigned>(n * sizeof(T)));
    }
}
// Fill the swizzled MN-major KD x 128 tile with f's elements (k0 + k, n0 + n), zero where k0 + k >= nk or
// n0 + n >= nn (a run cut by the edge of N copies its part).
template <typename T, int KD, typename F>
__device__ __forceinline__ void load_mnmajor_sw(T* tile, const F& f, long long k0, long long n0, long long nk, long long nn) {
#pragma unroll
    for (int i = threadIdx.x; i < KD * 16; i += SM90_NT) {
        const int kk = i >> 4, c = i & 15;
        const long long gk = k0 + kk, gn = n0 + 8 * c, room = nn - gn;
        const int n = gk >= nk || room <= 0 ? 0 : room >= 8 ? 8 : static_cast<int>(room);
        cp_async16_zfill(tile + sw_mnmajor<KD>(kk, c), n > 0 ? f.ptr(gk, gn) : f.ptr(0, 0),
                         static_cast<unsigned>(n * sizeof(T)));
    }
}

// An operand tile's descriptor, its first 16 steps along K from `tile` (k0 a multiple of 16), warpgroup-row offset
// `row0` (A: 64 g): the start address of a K-major tile moves along its block's rows (the swizzle applies to the
// address the tensor cores compute), an MN-major one's by whole atoms.
template <bool MN, int KD> __device__ __forceinline__ unsigned long long tile_descriptor(const void* tile, int k0, int row0) {
    const auto* p = static_cast<const unsigned char*>(tile);
    constexpr unsigned long long SWIZZLE_128B = 1ull << 62;
    if (MN) {
        return sm90::descriptor(p + 2 * ((row0 / 64) * (KD / 8) * 512 + (k0 / 8) * 512), KD / 8 * 1024u, 1024u) |
               SWIZZLE_128B;
    }
    return sm90::descriptor(p + 2 * ((k0 / 64) * (128 * 64) + row0 * 64 + k0 % 64), 16u, 1024u) | SWIZZLE_128B;
}

// d (this warpgroup's 64 x 128 fp32) = A B, plus d itself when ACCUMULATE: A the block's 128 x KD tile at a
// (MN-major when A_MN), B its KD x 128 tile at b (MN-major when B_MN); KD / 16 wgmma, waited for.
template <typename T, bool A_MN, bool B_MN, int KD, bool ACCUMULATE>
__device__ __forceinline__ void product(float (&d)[64], const T* a, const T* b) {
    const int row0 = threadIdx.x / 128 * 64;
    sm90::fence_operand(d);
    sm90::wgmma_fence();
#pragma unroll
    for (int k0 = 0; k0 < KD; k0 += 16) {  // 16 deep: two core matrices along K of each operand
        sm90::Wgmma<T, A_MN, B_MN>::m64n128k16(d, tile_descriptor<A_MN, KD>(a, k0, row0),
                                              tile_descriptor<B_MN, KD>(b, k0, 0), ACCUMULATE || k0 > 0 ? 1 : 0);
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_operand(d);
}

// The ring's depth per step and stages (sm90.py's RING_BK, RING_STAGES), and its shared memory in elements.
constexpr int RING_BK = 64, RING_STAGES = 3, RING_ELEMENTS = RING_STAGES * 2 * 128 * RING_BK;

// d += A B over K in [k_begin, k_end), RING_BK per step, through a ring of RING_STAGES stages in smem (A's tiles
// first, then B's): A = fa (M x K: (m, k) = fa.ptr(m0 + m, k), or (k, m) when A_MN) and B = fb ((k, n) =
// fb.ptr(k, n0 + n) when B_MN, else (n, k)), zero past M = ma, N = nb and k_end (load_kmajor_sw /
// load_mnmajor_sw),
// one barrier per step as tile.cuh's ring; hook(stage tile of B) sees each step's B tile once it is in. Every
// thread of the block must call it; on return no copy is in flight and the ring is free to reuse.
template <typename T, bool A_MN, bool B_MN, typename FA, typename FB, typename Hook>
__device__ __forceinline__ void ring_sm90(float (&d)[64], T* smem, const FA& fa, const FB& fb, long long m0,
                                          long long n0, long long ma, long long nb, long long k_begin,
                                          long long k_end, const Hook& hook) {
    constexpr int S = RING_STAGES, KD = RING_BK, SA = 128 * KD, SB = KD * 128;
    static_assert(KD * sizeof(T) == 128, "a step is one 128-byte row of the swizzle's atoms");
    T* As = smem;
    T* Bs = smem + S * SA;
    const long long steps = cdiv(k_end - k_begin, KD);
    auto load = [&](int s, long long step) {
        const long long k0 = k_begin + step * KD;
        if (A_MN) load_mnmajor_sw<T, KD>(As + s * SA, fa, k0, m0, k_end, ma);
        else load_kmajor_sw<T, KD>(As + s * SA, fa, m0, k0, ma, k_end);
        if (B_MN) load_mnmajor_sw<T, KD>(Bs + s * SB, fb, k0, n0, k_end, nb);
        else load_kmajor_sw<T, KD>(Bs + s * SB, fb, n0, k0, nb, k_end);
    };
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
        hook(Bs + stage * SB);
        product<T, A_MN, B_MN, KD, true>(d, As + stage * SA, Bs + stage * SB);
        stage = stage == S - 1 ? 0 : stage + 1;
    }
    cp_async_wait<0>();
    __syncthreads();
}

// What every sm_90a kernel checks of its launch: `bytes` of dynamic shared memory at least, SM90_NT threads (the
// loaders and the warpgroups assume them), and the shared memory starting at a multiple of 1024 bytes of the
// shared window, where the swizzle's atoms must start (the kernels declare their dynamic shared memory so aligned).
__device__ __forceinline__ void require_sm90_launch(const unsigned char* smem, unsigned bytes) {
    require_shared(bytes);
    if (blockDim.x != SM90_NT) __trap();
#ifndef PANTHER_PTX_EMULATED
    if (static_cast<unsigned>(__cvta_generic_to_shared(smem)) & 1023u) __trap();
#endif
}

// The ring's dynamic shared memory (its launch checked) and a zeroed accumulator.
template <typename T> __device__ __forceinline__ T* ring_memory(unsigned char* smem, float (&d)[64]) {
    require_sm90_launch(smem, static_cast<unsigned>(RING_ELEMENTS * sizeof(T)));
#pragma unroll
    for (int i = 0; i < 64; ++i) d[i] = 0.0f;
    return reinterpret_cast<T*>(smem);
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
// Write the block's 128 x 128 tile (the accumulators d of both warpgroups, value(row, col, v) of the input dtype;
// row and col from the tile's origin) to out (leading dimension ld) at (m0, n0), rows < nr and columns < nc, staged
// through `stage` (128 x 128 elements of shared memory that no thread reads or writes meanwhile): the pairs go to
// the stage, 16-byte chunk j of row r at chunk j ^ (r % 8) (the eight rows of a warp's pair stores on different
// banks), then 16-byte runs of rows go out, consecutive threads along a row (scalar where a run crosses nc, or
// where out's rows are not 16-byte aligned). Every thread of the block must call it; it ends behind a barrier.
template <typename T, typename V>
__device__ __forceinline__ void store_staged(const float (&d)[64], T* stage, T* out, long long ld, long long m0,
                                             long long n0, long long nr, long long nc, const V& value) {
    static_assert(sizeof(T) == 2, "16-bit tiles: eight elements a run");
    each_pair(d, [&](int r, int c, float v0, float v1) {
        *reinterpret_cast<unsigned*>(stage + r * 128 + ((((c >> 3) ^ (r & 7)) << 3) | (c & 7))) =
            pack2(value(r, c, v0), value(r, c + 1, v1));
    });
    __syncthreads();
    const bool vec = ld % 8 == 0 && aligned16(out);
    for (int i = threadIdx.x; i < 128 * 16; i += SM90_NT) {
        const int r = i >> 4, j = i & 15;
        const long long t = m0 + r, o = n0 + 8 * j;
        if (t >= nr || o >= nc) continue;
        const T* s = stage + r * 128 + ((j ^ (r & 7)) << 3);
        T* g = out + t * ld + o;
        if (vec && o + 8 <= nc) {
            *reinterpret_cast<uint4*>(g) = *reinterpret_cast<const uint4*>(s);
        } else {
            for (int e = 0; e < 8 && o + e < nc; ++e) g[e] = s[e];
        }
    }
    __syncthreads();
}
#endif  // PANTHER_SM90A

}  // namespace sl
}  // namespace panther
