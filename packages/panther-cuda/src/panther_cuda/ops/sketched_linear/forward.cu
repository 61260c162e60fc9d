// Forward of the sketched linear op: y = H B / (2L) + b, H = x A (forward.py launches these).
//
// x (T, I) contiguous; S1, U2 (L, I, k) and U1, S2 (L, k, O) contiguous; A = [S1 | U2] (I x R) and
// B = [U1; S2] (R x O) are read in place through tile.cuh's Side / Stack (column c = h Lk + l k + j);
// R = 2Lk. H (T, R) is written for the backward, in the input dtype (rounded once, as the reference's x A).
//
// * sketched_linear_fwd_fused — one launch for R <= the fused limit: block (row tile, group) computes
//   its BM x R tile of H into shared memory, 2 BN columns per pass over I, then streams
//   y over its group's share of O (o_groups blocks of a row tile each recompute H: more blocks fill
//   the SMs when T is small); 1/(2L) and the bias in the epilogue. Group 0 writes H.
// * sketched_linear_fwd_h, then sketched_linear_fwd_y — two launches for any R: H = x A written to
//   memory, then y = H B / (2L) + b read from it. When I is long and H has few tiles, fwd_h splits I
//   into shares summed in fp32 by sketched_linear_sum_shares (a launch in between).
#include "tile.cuh"

namespace panther {
namespace sl {

template <typename T, bool EXACT, typename C>
__global__ void __launch_bounds__(C::NT) sketched_linear_fwd_fused(
    const T* __restrict__ x, const T* __restrict__ S1, const T* __restrict__ U2, const T* __restrict__ U1,
    const T* __restrict__ S2, const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ h, long long Tn,
    long long I, long long O, int L, int k, int o_groups, float scale) {
    constexpr int BM = C::BM, BN = C::BN, BK = C::BK, NT = C::NT, LDA = C::LDA, LDB = C::LDB;
    extern __shared__ __align__(16) unsigned char smem[];
    const int Lk = L * k, R = 2 * Lk;
    const int ldh = (R + BN - 1) / BN * BN + C::PAD;  // H tile: BM x ldh, columns past R hold zeros
    require_shared(static_cast<unsigned>((C::FUSED_TILE_ELEMENTS + BM * ldh) * sizeof(T)));
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = As + BM * LDA;
    T* Bs2 = Bs + BK * LDB;  // the second column chunk of A in a pass
    T* Hs = Bs2 + BK * LDB;

    const long long m0 = static_cast<long long>(blockIdx.x / o_groups) * BM;
    const int group = blockIdx.x % o_groups;
    const Dense<T, false> xs{x, I};
    const Side<T> a{S1, U2, I, L, k};
    const Stack<T> b{U1, S2, O, Lk};
    const bool vx = xs.vec_ok(), va = a.vec_ok(), vb = b.vec_ok();

    // H = x A, two column chunks of BN per pass over I (each x tile feeds both): one pass for R <= 128
    for (int c0 = 0; c0 < R; c0 += 2 * BN) {
        const bool two = c0 + BN < R;  // the same for the whole block
        Acc<T, EXACT, C> acc, acc2;
        acc.zero();
        acc2.zero();
        for (long long k0 = 0; k0 < I; k0 += BK) {
            fill_tile<T, NT, BM, BK>(As, LDA, xs, vx, m0, k0, Tn, I);
            fill_tile<T, NT, BK, BN>(Bs, LDB, a, va, k0, c0, I, R);
            if (two) fill_tile<T, NT, BK, BN>(Bs2, LDB, a, va, k0, c0 + BN, I, R);
            __syncthreads();
            acc.step(As, LDA, Bs, LDB);
            if (two) acc2.step(As, LDA, Bs2, LDB);
            __syncthreads();
        }
        auto keep = [&](int c1) {  // H's columns c1 .. c1 + BN: zero past R and past T (masked loads)
            return [&, c1](int r, int c, float v) {
                const T hv = from_float<T>(v);
                Hs[r * ldh + c1 + c] = hv;
                const long long t = m0 + r;
                if (group == 0 && t < Tn && c1 + c < R) h[t * R + c1 + c] = hv;
            };
        };
        acc.each(keep(c0));
        if (two) acc2.each(keep(c0 + BN));
    }
    __syncthreads();

    // this group's columns of y: BN-aligned shares, so no tile straddles two groups
    const long long o_per = cdiv(cdiv(O, o_groups), BN) * BN;
    const long long o_end = min_ll(O, (group + 1) * o_per);
    for (long long n0 = group * o_per; n0 < o_end; n0 += BN) {
        Acc<T, EXACT, C> acc;
        acc.zero();
        for (int k0 = 0; k0 < R; k0 += BK) {
            fill_tile<T, NT, BK, BN>(Bs, LDB, b, vb, k0, n0, R, O);
            __syncthreads();
            acc.step(Hs + k0, ldh, Bs, LDB);
            __syncthreads();
        }
        acc.each([&](int r, int c, float v) {
            const long long t = m0 + r, o = n0 + c;
            if (t < Tn && o < O) {
                const float out = v * scale + (bias != nullptr ? to_float(bias[o]) : 0.0f);
                y[t * O + o] = from_float<T>(out);
            }
        });
    }
}

// H = x A, tile (tile / n_col_tiles, tile % n_col_tiles) of (T, R), tile = blockIdx.x % tiles; with
// n_splits > 1, block split = blockIdx.x / tiles sums the BK-aligned share `split` of I into
// ws[split] (fp32, T x R) and sketched_linear_sum_shares writes H from the shares.
template <typename T, bool EXACT, typename C>
__global__ void __launch_bounds__(C::NT, (MIN_BLOCKS<T, C>)) sketched_linear_fwd_h(
    const T* __restrict__ x, const T* __restrict__ S1, const T* __restrict__ U2, T* __restrict__ h,
    float* __restrict__ ws, long long Tn, long long I, int L, int k, int n_splits) {
    constexpr int BM = C::BM, BN = C::BN;
    extern __shared__ __align__(16) unsigned char smem[];
    require_shared(static_cast<unsigned>(C::SHARED_ELEMENTS * sizeof(T)));
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = As + C::STAGES * C::STAGE_A;
    const int R = 2 * L * k;
    const int n_col_tiles = (R + BN - 1) / BN;
    const long long tiles = cdiv(Tn, BM) * n_col_tiles;
    const long long tile = blockIdx.x % tiles;
    const int split = static_cast<int>(blockIdx.x / tiles);
    const long long m0 = tile / n_col_tiles * BM;
    const long long n0 = tile % n_col_tiles * BN;
    const RowSplit share(I, split, n_splits, C::BK);
    Acc<T, EXACT, C> acc;
    acc.zero();
    gemm(acc, As, Bs, Dense<T, false>{x, I}, Side<T>{S1, U2, I, L, k}, m0, n0, Tn, R, share.end, share.begin);
    if (n_splits > 1) {
        acc.each([&](int r, int c, float v) {
            const long long t = m0 + r, col = n0 + c;
            if (t < Tn && col < R) ws[(split * Tn + t) * R + col] = v;
        });
    } else {
        store_tile(acc, As, h, R, m0, n0, Tn, R, [](int, int, float v) { return from_float<T>(v); });
    }
}

// y = H B / (2L) + b, tile (blockIdx.x / n_col_tiles, blockIdx.x % n_col_tiles) of (T, O).
template <typename T, bool EXACT, typename C>
__global__ void __launch_bounds__(C::NT, (MIN_BLOCKS<T, C>)) sketched_linear_fwd_y(
    const T* __restrict__ h, const T* __restrict__ U1, const T* __restrict__ S2, const T* __restrict__ bias,
    T* __restrict__ y, long long Tn, long long O, int L, int k, float scale) {
    constexpr int BM = C::BM, BN = C::BN;
    extern __shared__ __align__(16) unsigned char smem[];
    require_shared(static_cast<unsigned>(C::SHARED_ELEMENTS * sizeof(T)));
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = As + C::STAGES * C::STAGE_A;
    const int Lk = L * k, R = 2 * Lk;
    const long long n_col_tiles = cdiv(O, BN);
    const long long m0 = static_cast<long long>(blockIdx.x / n_col_tiles) * BM;
    const long long n0 = static_cast<long long>(blockIdx.x % n_col_tiles) * BN;
    Acc<T, EXACT, C> acc;
    acc.zero();
    // H B = H[:, :Lk] U1 + H[:, Lk:] S2, U1 and S2 read as (Lk, O) matrices: two terms of one ring
    gemm_terms(acc, As, Bs, [&](int t) { return Dense<T, false>{t == 0 ? h : h + Lk, R}; },
               [&](int t) { return Dense<T, false>{t == 0 ? U1 : S2, O}; }, 2, m0, n0, Tn, O, Lk);
    store_tile(acc, As, y, O, m0, n0, Tn, O, [&](int, int c, float v) {
        const long long o = n0 + c;
        return from_float<T>(v * scale + (bias != nullptr && o < O ? to_float(bias[o]) : 0.0f));
    });
}

template <typename T, int W>
__device__ __forceinline__ void sum_share_runs(const float* __restrict__ ws, T* __restrict__ out, long long n,
                                               int n_splits, float scale) {
    for (long long e = (static_cast<long long>(blockIdx.x) * SUM_NT + threadIdx.x) * W; e < n;
         e += static_cast<long long>(gridDim.x) * SUM_NT * W) {
        float sum[W] = {};
        for (int s = 0; s < n_splits; ++s) add_run<W>(sum, ws + s * n + e);
        store_run<T, W>(out + e, sum, scale);
    }
}

// out[e] = scale Σ_s ws[s n + e] for e < n, rounded once: a split reduction's fp32 shares summed (H here,
// dH in the backward), the shares in order; grid-stride, four elements a thread (16-byte loads) where n is a
// multiple of four and ws and out are aligned to it, else one.
template <typename T>
__global__ void __launch_bounds__(SUM_NT) sketched_linear_sum_shares(const float* __restrict__ ws, T* __restrict__ out,
                                                                     long long n, int n_splits, float scale) {
    if (n % 4 == 0 && aligned16(ws) && aligned_run(out)) {
        sum_share_runs<T, 4>(ws, out, n, n_splits, scale);
    } else {
        sum_share_runs<T, 1>(ws, out, n, n_splits, scale);
    }
}

}  // namespace sl
}  // namespace panther

#ifdef PANTHER_NVCC_CHECK
// Every variant the host code launches (forward.py; limits.py's CONFIGS: SMALL and LARGE), for the compile
// check of CI; the fused kernel runs with SMALL only.
#define SMALL panther::sl::Tile<64, 64, 32, 2, 2, 3>
#define LARGE panther::sl::Tile<128, 128, 32, 2, 4, 4>
#define DEEP64 panther::sl::Tile<128, 128, 64, 2, 4, 4>
#define FUSED(T, E) \
    template __global__ void panther::sl::sketched_linear_fwd_fused<T, E, SMALL>(const T*, const T*, const T*, \
        const T*, const T*, const T*, T*, T*, long long, long long, long long, int, int, int, float);
#define INST(T, E, C) \
    template __global__ void panther::sl::sketched_linear_fwd_h<T, E, C>(const T*, const T*, const T*, T*, float*, \
        long long, long long, int, int, int); \
    template __global__ void panther::sl::sketched_linear_fwd_y<T, E, C>(const T*, const T*, const T*, const T*, T*, \
        long long, long long, int, int, float);
#define ALL(T, E) FUSED(T, E) INST(T, E, SMALL) INST(T, E, LARGE) INST(T, E, DEEP64)
ALL(float, false) ALL(float, true) ALL(__half, false) ALL(__nv_bfloat16, false)
#define SUM(T) template __global__ void panther::sl::sketched_linear_sum_shares<T>(const float*, T*, long long, int, \
    float);
SUM(float) SUM(__half) SUM(__nv_bfloat16)
#endif  // PANTHER_NVCC_CHECK
