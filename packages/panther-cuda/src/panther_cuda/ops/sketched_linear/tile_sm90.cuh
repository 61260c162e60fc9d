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
// address the tensor cores compute), an MN-major one's by whole atoms. ROWS: a K-major tile's rows (its blocks of
// 64 along K lie ROWS 64 elements apart: 128 as above, or 64 for the 64 x KW tile that is an MN-major KD = 64 tile
// read the other way: both layouts place (t, c) at (c / 64) 4096 + t 64 + the swizzled chunk).
template <bool MN, int KD, int ROWS = 128>
__device__ __forceinline__ unsigned long long tile_descriptor(const void* tile, int k0, int row0) {
    const auto* p = static_cast<const unsigned char*>(tile);
    constexpr unsigned long long SWIZZLE_128B = 1ull << 62;
    if (MN) {
        return sm90::descriptor(p + 2 * ((row0 / 64) * (KD / 8) * 512 + (k0 / 8) * 512), KD / 8 * 1024u, 1024u) |
               SWIZZLE_128B;
    }
    return sm90::descriptor(p + 2 * ((k0 / 64) * (ROWS * 64) + row0 * 64 + k0 % 64), 16u, 1024u) | SWIZZLE_128B;
}

// One operand's tiles through ring_sm90 with the address arithmetic done once (tile.cuh's TileCursor, for the
// swizzled layouts above): each of this thread's runs keeps its source and how many of its elements lie inside
// the edge that is not K; its place in the tile and its first index along K follow from the thread and the run.
// Each load() copies the next step's tile, KD further along K: `advance` elements, KD times the operand's
// stride along K (F::row_step() for an MN-major tile, whose runs go along M or N; F::col_step() for a K-major
// one, whose runs go along K). For operands with such a stride (WalksK) whose runs are 16-byte aligned (the
// sm_90a kernels' hosts check that every operand is).
template <typename F, bool MN> struct WalksK { static constexpr bool value = true; };
template <typename T> struct WalksK<Side<T>, false> { static constexpr bool value = false; };  // terms apart
template <typename T> struct WalksK<Stack<T>, true> { static constexpr bool value = false; };  // halves apart

template <typename T, bool MN, int KD, typename F> struct Sm90Cursor {
    static constexpr int RUNS = 128 * KD / 8, PER = RUNS / SM90_NT;
    static_assert(RUNS % SM90_NT == 0 && KD == 64, "whole runs for every thread, one 128-byte row a step");
    const T* src[PER];  // run j's source at the next step
    int inside[PER];    // run j's elements inside the edge that is not K (0 .. 8)
    const T* base;      // a valid address for runs that copy nothing
    long long advance;

    // The thread's run j: MN-major, K row kk = tid / 16 + 16 j and chunk c = tid % 16 along M or N (one place
    // 1024 j further on: two atoms down); K-major, row r = tid / 8 + 32 j and chunk c = tid % 8 along K (2048 j).
    __device__ __forceinline__ static int run_k(int j) {
        return MN ? static_cast<int>(threadIdx.x >> 4) + 16 * j : 8 * static_cast<int>(threadIdx.x & 7);
    }
    __device__ __forceinline__ static int place(int j) {
        return MN ? sw_mnmajor<KD>(static_cast<int>(threadIdx.x >> 4), threadIdx.x & 15) + 1024 * j
                  : sw_kmajor<KD>(static_cast<int>(threadIdx.x >> 3), threadIdx.x & 7) + 2048 * j;
    }

    // The tile whose first row along M or N is r0, at k0 along K; nr the edge that is not K.
    __device__ __forceinline__ Sm90Cursor(const F& f, long long r0, long long k0, long long nr) {
        advance = KD * (MN ? f.row_step() : f.col_step());
        base = f.ptr(0, 0);
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const long long gr = r0 + (MN ? 8 * (threadIdx.x & 15) : (threadIdx.x >> 3) + 32 * j);
            const long long room = nr - gr;
            inside[j] = MN ? (room <= 0 ? 0 : room >= 8 ? 8 : static_cast<int>(room)) : (room > 0 ? 8 : 0);
            src[j] = inside[j] > 0 ? (MN ? f.ptr(k0 + run_k(j), gr) : f.ptr(gr, k0 + run_k(j))) : base;
        }
    }

    // Copy the tile at k along K (the next step's: the cursor moves on) into tile; nk the K edge (zeros past it).
    __device__ __forceinline__ void load(T* tile, long long k, long long nk) {
        if (k + KD <= nk) {  // the whole step inside K (the same for the whole block): the edge that is not K only
#pragma unroll
            for (int j = 0; j < PER; ++j) {
                cp_async16_zfill(tile + place(j), inside[j] > 0 ? src[j] : base, static_cast<unsigned>(inside[j] * sizeof(T)));
                src[j] += advance;
            }
            return;
        }
        const int room_k = static_cast<int>(nk - k);  // < KD: the K edge cuts this step
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int room = room_k - run_k(j);
            const int kin = MN ? (room > 0 ? 8 : 0) : (room <= 0 ? 0 : room >= 8 ? 8 : room);
            const int n = kin < inside[j] ? kin : inside[j];
            cp_async16_zfill(tile + place(j), n > 0 ? src[j] : base, static_cast<unsigned>(n * sizeof(T)));
            src[j] += advance;
        }
    }
};

// An operand's loads in ring_sm90: by Sm90Cursor where the operand walks K by a constant stride, else each run's
// address from f.ptr (load_kmajor_sw / load_mnmajor_sw).
template <typename T, bool MN, int KD, typename F, bool CURSOR = WalksK<F, MN>::value> struct Sm90Loads {
    Sm90Cursor<T, MN, KD, F> cursor;
    __device__ __forceinline__ Sm90Loads(const F& f, long long r0, long long k0, long long nr) : cursor(f, r0, k0, nr) {}
    __device__ __forceinline__ void load(T* tile, long long k, long long nk) { cursor.load(tile, k, nk); }
};
template <typename T, bool MN, int KD, typename F> struct Sm90Loads<T, MN, KD, F, false> {
    F f;
    long long r0, nr;
    __device__ __forceinline__ Sm90Loads(const F& f_, long long r0_, long long, long long nr_) : f(f_), r0(r0_), nr(nr_) {}
    __device__ __forceinline__ void load(T* tile, long long k, long long nk) {
        if (MN) load_mnmajor_sw<T, KD>(tile, f, k, r0, nk, nr);
        else load_kmajor_sw<T, KD>(tile, f, r0, k, nr, nk);
    }
};

// d (this warpgroup's 64 x 128 fp32) = A B, plus d itself when ACCUMULATE: A the block's 128 x KD tile at a
// (MN-major when A_MN), B its KD x 128 tile at b (MN-major when B_MN); KD / 16 wgmma in one group, waited for
// unless WAIT is false (the caller then waits, wgmma_wait and fence_operand(d), before it reads d or rewrites
// either tile).
template <typename T, bool A_MN, bool B_MN, int KD, bool ACCUMULATE, bool WAIT = true>
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
    if (WAIT) {
        sm90::wgmma_wait<0>();
        sm90::fence_operand(d);
    }
}

// The ring's depth per step (sm90.py's RING_BK) and its shared memory in elements with S stages (sm90.py's
// RING_STAGES: the instances of the ring kernels, its ring_stages the one a launch takes).
constexpr int RING_BK = 64;
template <int S> struct Ring { static constexpr int ELEMENTS = S * 2 * 128 * RING_BK; };

// d += A B over K in [k_begin, k_end), RING_BK per step, through a ring of S stages in smem (A's tiles first, then
// B's): A = fa (M x K: (m, k) = fa.ptr(m0 + m, k), or (k, m) when A_MN) and B = fb ((k, n) = fb.ptr(k, n0 + n)
// when B_MN, else (n, k)), zero past M = ma, N = nb and k_end (Sm90Loads). A step waits for its tiles, passes one
// barrier, issues its products, then the copies of the step AHEAD further, so that the copies' address work and
// issue overlap the tensor cores; it ends when all but LAG groups of its products are done. With LAG 0, S - 1
// steps of copies stay in flight, each into the stage the step before read, whose products every warpgroup
// retired before the barrier; with LAG 1 (S >= 4), S - 2, each into the stage of two steps before, and the
// step's products run on across the next barrier (fwd_h_sm90's deep ring: timed a little faster,
// benchmarks/results/NOTES.md). hook(stage tile of B) sees each step's B tile once it is in.
// Every thread of the block must call it; on return no copy or product is in flight and the ring is free to reuse.
template <typename T, bool A_MN, bool B_MN, int S, int LAG = 0, typename FA, typename FB, typename Hook>
__device__ __forceinline__ void ring_sm90(float (&d)[64], T* smem, const FA& fa, const FB& fb, long long m0,
                                          long long n0, long long ma, long long nb, long long k_begin,
                                          long long k_end, const Hook& hook) {
    constexpr int KD = RING_BK, SA = 128 * KD, SB = KD * 128;
    constexpr int AHEAD = S - 1 - LAG;
    static_assert((LAG == 0 || LAG == 1) && AHEAD >= 2 && KD * sizeof(T) == 128,
                  "at most one group of products in flight, two steps of copies ahead at least; a step is one 128-byte row "
                  "of the swizzle");
    T* As = smem;
    T* Bs = smem + S * SA;
    const long long steps = cdiv(k_end - k_begin, KD);
    Sm90Loads<T, A_MN, KD, FA> la(fa, m0, k_begin, ma);
    Sm90Loads<T, B_MN, KD, FB> lb(fb, n0, k_begin, nb);
    auto load = [&](int s, long long step) {  // steps in order: the cursors move on by one step each
        const long long k0 = k_begin + step * KD;
        la.load(As + s * SA, k0, k_end);
        lb.load(Bs + s * SB, k0, k_end);
    };
#pragma unroll
    for (int s = 0; s < AHEAD; ++s) {
        if (s < steps) load(s, static_cast<long long>(s));
        cp_async_commit();
    }
    int stage = 0, next = AHEAD % S;
    for (long long step = 0; step < steps; ++step) {
        cp_async_wait<AHEAD - 1>();  // this step's tiles are in
        sm90::fence_proxy_async();
        __syncthreads();  // ... for every thread; every warpgroup retired the products of the stage loaded next
        product<T, A_MN, B_MN, KD, true, false>(d, As + stage * SA, Bs + stage * SB);
        hook(Bs + stage * SB);
        if (step + AHEAD < steps) load(next, step + AHEAD);
        cp_async_commit();
        sm90::wgmma_wait<LAG>();
        stage = stage == S - 1 ? 0 : stage + 1;
        next = next == S - 1 ? 0 : next + 1;
    }
    sm90::wgmma_wait<0>();
    sm90::fence_operand(d);
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

// The ring's dynamic shared memory with S stages (its launch checked) and a zeroed accumulator.
template <typename T, int S> __device__ __forceinline__ T* ring_memory(unsigned char* smem, float (&d)[64]) {
    require_sm90_launch(smem, static_cast<unsigned>(Ring<S>::ELEMENTS * sizeof(T)));
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
// Element (r, c) of a staged 128 x 128 fp32 tile: the 16-byte chunk c / 4 of row r at chunk (c / 4) ^ (r % 8), so that
// the eight rows of a warp's pair stores, and a quarter warp's 16-byte reads of a row, fall on different banks.
__device__ __forceinline__ int fp32_staged(int r, int c) { return r * 128 + (((c >> 2) ^ (r & 7)) << 2) + (c & 3); }

// Write the block's 128 x 128 fp32 tile (the accumulators d of both warpgroups) times scale to out (leading dimension
// ld) at (m0, n0): element (r, c) to out[(m0 + r) ld + n0 + c] where m0 + r < nr and 0 <= n0 + c < nc (n0 may be
// negative: a tile whose first columns are not wanted). Staged through `stage` (128 x 128 fp32, 64 KiB of shared
// memory nothing else uses from the barrier that begins the call; fp32_staged's layout), then 16-byte stores,
// consecutive threads along a row (scalar where a run crosses an edge, or where out's runs are not 16-byte aligned):
// whole 512-byte rows where the two-element stores from the accumulators would touch eight rows a request. Every
// thread of the block must call it; it ends behind a barrier.
__device__ __forceinline__ void store_staged_f32(const float (&d)[64], float* stage, float* out, long long ld,
                                                 long long m0, long long n0, long long nr, long long nc, float scale) {
    __syncthreads();  // the stage's memory is no longer read by products or copies
    each_pair(d, [&](int r, int c, float v0, float v1) {
        *reinterpret_cast<float2*>(stage + fp32_staged(r, c)) = make_float2(v0 * scale, v1 * scale);
    });
    __syncthreads();
    const bool vec = ld % 4 == 0 && n0 % 4 == 0 && aligned16(out);
    for (int i = threadIdx.x; i < 128 * 32; i += SM90_NT) {
        const int r = i >> 5, j = i & 31;
        const long long t = m0 + r, o = n0 + 4 * j;
        if (t >= nr || o >= nc || o + 4 <= 0) continue;
        const float* s = stage + r * 128 + ((j ^ (r & 7)) << 2);
        if (vec && o >= 0 && o + 4 <= nc) {
            *reinterpret_cast<float4*>(out + t * ld + o) = *reinterpret_cast<const float4*>(s);
        } else {
            for (int e = 0; e < 4; ++e)
                if (o + e >= 0 && o + e < nc) out[t * ld + o + e] = s[e];
        }
    }
    __syncthreads();
}

// The pair (r, c), (r, c + 1) into a staged ROWS x 128 tile (copy_staged's layout; c even).
template <typename T> __device__ __forceinline__ void stage_pair(T* stage, int r, int c, T v0, T v1) {
    *reinterpret_cast<unsigned*>(stage + r * 128 + ((((c >> 3) ^ (r & 7)) << 3) | (c & 7))) = pack2(v0, v1);
}
// Copy a staged ROWS x 128 tile of 16-bit elements (16-byte chunk j of row r at chunk j ^ (r % 8)) to out (leading
// dimension ld) at (m0, n0), rows < nr and columns < nc: 16-byte runs, consecutive threads along a row (scalar where
// a run crosses nc, or where out's rows are not 16-byte aligned). No barrier: the caller orders the stage's writes
// before and its reuse after.
template <typename T, int ROWS>
__device__ __forceinline__ void copy_staged(const T* stage, T* out, long long ld, long long m0, long long n0,
                                            long long nr, long long nc) {
    const bool vec = ld % 8 == 0 && aligned16(out);
    for (int i = threadIdx.x; i < ROWS * 16; i += SM90_NT) {
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
    each_pair(d, [&](int r, int c, float v0, float v1) { stage_pair(stage, r, c, value(r, c, v0), value(r, c + 1, v1)); });
    __syncthreads();
    copy_staged<T, 128>(stage, out, ld, m0, n0, nr, nc);
    __syncthreads();
}
#endif  // PANTHER_SM90A

}  // namespace sl
}  // namespace panther
