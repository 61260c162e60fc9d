// Backward of the sketched linear op in two to four launches (backward.py launches these).
//
// g = dL/dy (T, O) contiguous, s = 1/(2L), A = [S1 | U2] (I x R), B = [U1; S2] (R x O), H (T, R) saved
// by the forward, R = 2Lk, column c = h Lk + l k + j:
//   dH = s g Bᵀ (T, R);  d[U1; S2] = s Hᵀ g (R, O);  db = Σ_T g       <- sketched_linear_bwd_g (reads g)
//   (db is summed on the side by the d[U1; S2] blocks of the first row tile, from the g tiles they load;
//   with db alone those blocks run with no rows of H)
//   dx = dH Aᵀ (T, I);   d[S1 | U2] = xᵀ dH (I, R)                    <- sketched_linear_bwd_x (reads dH)
// dH reduces over O: with dh_splits > 1 its tiles have dh_splits blocks each, summing a share of O into an
// fp32 workspace (ws_dh[split], T x R) that forward.cu's sketched_linear_sum_shares sums, scales and writes
// as dH before the second launch.
// Each launch runs several roles, told apart by blockIdx.x: the first blocks take one product's tiles, the
// next ones another's (launch 2: the weight gradient's long reductions first, then dx). A gradient not asked
// for has no blocks (and a null pointer); the weight gradients cover only the columns c_lo .. c_lo + c_n of R
// that are asked for (one half or both).
// The weight gradients reduce over T: with n_splits > 1 each tile has n_splits blocks, each summing a
// share of the rows into an fp32 workspace (ws[split] of the tile's product, db as one more row of
// d[U1; S2]'s), and a third launch,
// sketched_linear_bwd_sum, adds the shares and writes the gradients; with n_splits == 1 the blocks
// write the gradients themselves.
#include "tile.cuh"

namespace panther {
namespace sl {

template <typename T, bool EXACT, typename C>
__global__ void __launch_bounds__(C::NT, (MIN_BLOCKS<T, C>)) sketched_linear_bwd_g(
    const T* __restrict__ g, const T* __restrict__ h, const T* __restrict__ U1, const T* __restrict__ S2,
    T* __restrict__ dh, T* __restrict__ dU1, T* __restrict__ dS2, T* __restrict__ db, float* __restrict__ ws,
    long long Tn, long long O, int L, int k, float scale, long long n_dh_blocks, int c_lo, int c_n, int n_splits,
    float* __restrict__ ws_dh, int dh_splits) {
    constexpr int BM = C::BM, BN = C::BN, BK = C::BK, NT = C::NT;
    extern __shared__ __align__(16) unsigned char smem[];
    require_shared(static_cast<unsigned>(C::SHARED_ELEMENTS * sizeof(T)));
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = As + C::STAGES * C::STAGE_A;
    const int Lk = L * k, R = 2 * Lk;
    long long block = blockIdx.x;

    if (block < n_dh_blocks) {  // dH = s g Bᵀ: A(t, o) = g[t, o], B(o, c) = [U1; S2](c, o)
        const int n_col_tiles = (R + BN - 1) / BN;
        const long long dh_tiles = n_dh_blocks / dh_splits;
        const long long tile = block % dh_tiles;
        const int split = static_cast<int>(block / dh_tiles);
        const long long m0 = tile / n_col_tiles * BM, n0 = tile % n_col_tiles * BN;
        const RowSplit share(O, split, dh_splits, BK);
        Acc<T, EXACT, C> acc;
        acc.zero();
        gemm(acc, As, Bs, Dense<T, false>{g, O}, Transposed<Stack<T>>{{U1, S2, O, Lk}}, m0, n0, Tn, R, share.end,
             share.begin);
        if (dh_splits > 1) {
            acc.each([&](int r, int c, float v) {
                const long long t = m0 + r, col = n0 + c;
                if (t < Tn && col < R) ws_dh[(split * Tn + t) * R + col] = v;  // scaled when the shares are summed
            });
        } else {
            store_tile(acc, As, dh, R, m0, n0, Tn, R, [&](int, int, float v) { return from_float<T>(v * scale); });
        }
        return;
    }
    block -= n_dh_blocks;

    // the other blocks: rows c_lo .. c_lo + c_n of s Hᵀ g, A(m, t) = H[t, c_lo + m], B(t, o) = g[t, o]; and db
    static_assert(NT % BN == 0 && BK % (NT / BN) == 0, "db: each column of a g tile summed by NT / BN threads");
    constexpr int DB_ROWS = BK / (NT / BN);
    const long long n_col_tiles = cdiv(O, BN);
    const long long n_tiles = cdiv(c_n > 0 ? c_n : 1, BM) * n_col_tiles;  // one row tile for db alone
    const long long tile = block % n_tiles;
    const int split = static_cast<int>(block / n_tiles);
    const long long m0 = tile / n_col_tiles * BM, n0 = tile % n_col_tiles * BN;
    const RowSplit rows(Tn, split, n_splits, BK);
    const bool with_db = db != nullptr && m0 == 0;  // the same for the whole block
    const int rows_ws = c_n + (db != nullptr ? 1 : 0);  // rows of a share in ws: d[U1; S2]'s, then db's
    float db_part = 0.0f;  // column threadIdx.x % BN, DB_ROWS rows of each g tile
    const int db_col = threadIdx.x % BN, db_row = threadIdx.x / BN * DB_ROWS;
    Acc<T, EXACT, C> acc;
    acc.zero();
    gemm(acc, As, Bs, Dense<T, true>{h + c_lo, R}, Dense<T, false>{g, O}, m0, n0, c_n, O, rows.end, rows.begin,
         [&](const T*, const T* gs) {
             if (with_db) {
#pragma unroll
                 for (int r = 0; r < DB_ROWS; ++r) db_part += to_float(gs[(db_row + r) * C::LDB + db_col]);
             }
         });
    acc.each([&](int r, int c, float v) {
        const long long m = m0 + r, o = n0 + c;
        if (m < c_n && o < O) {
            if (n_splits > 1) {
                ws[(split * static_cast<long long>(rows_ws) + m) * O + o] = v * scale;
            } else {
                const int row = c_lo + static_cast<int>(m);
                T* out = row < Lk ? dU1 + static_cast<long long>(row) * O : dS2 + static_cast<long long>(row - Lk) * O;
                out[o] = from_float<T>(v * scale);
            }
        }
    });
    if (with_db) {
        float* part = reinterpret_cast<float*>(As);  // free: gemm() returns behind a barrier
        part[threadIdx.x] = db_part;
        __syncthreads();
        const long long o = n0 + threadIdx.x;
        if (threadIdx.x < BN && o < O) {
            float sum = 0.0f;
#pragma unroll
            for (int p = 0; p < NT / BN; ++p) sum += part[p * BN + threadIdx.x];
            if (n_splits > 1) {
                ws[(split * static_cast<long long>(rows_ws) + c_n) * O + o] = sum;
            } else {
                db[o] = from_float<T>(sum);
            }
        }
    }
}

template <typename T, bool EXACT, typename C>
__global__ void __launch_bounds__(C::NT, (MIN_BLOCKS<T, C>)) sketched_linear_bwd_x(
    const T* __restrict__ x, const T* __restrict__ dh, const T* __restrict__ S1, const T* __restrict__ U2,
    T* __restrict__ dx, T* __restrict__ dS1, T* __restrict__ dU2, float* __restrict__ ws, long long Tn, long long I,
    int L, int k, long long n_dx_blocks, int c_lo, int c_n, int n_splits) {
    constexpr int BM = C::BM, BN = C::BN, BK = C::BK;
    extern __shared__ __align__(16) unsigned char smem[];
    require_shared(static_cast<unsigned>(C::SHARED_ELEMENTS * sizeof(T)));
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = As + C::STAGES * C::STAGE_A;
    const int Lk = L * k, R = 2 * Lk;
    // the weight gradient's blocks first: each reduces over a share of T, far longer than a dx block (R deep),
    // so they start in the first wave and the short dx blocks fill in behind them
    const long long n_w_blocks = static_cast<long long>(gridDim.x) - n_dx_blocks;
    long long block = blockIdx.x;

    if (block >= n_w_blocks) {  // dx = dH Aᵀ: A(t, c) = dH[t, c], B(c, i) = A(i, c) = [S1 | U2](i, c)
        block -= n_w_blocks;
        const long long n_col_tiles = cdiv(I, BN);
        const long long m0 = block / n_col_tiles * BM, n0 = block % n_col_tiles * BN;
        Acc<T, EXACT, C> acc;
        acc.zero();
        // dH Aᵀ = Σ over the 2L terms W of dH[:, c .. c + k] Wᵀ (W = S1[l] or U2[l], an (I, k) matrix; c = term k
        // its first column of R), the terms through one ring
        gemm_terms(acc, As, Bs, [&](int term) { return Dense<T, false>{dh + term * k, R}; },
                   [&](int term) {
                       return Dense<T, true>{(term < L ? S1 : U2) + static_cast<long long>(term % L) * I * k, k};
                   }, 2 * L, m0, n0, Tn, I, k);
        store_tile(acc, As, dx, I, m0, n0, Tn, I, [](int, int, float v) { return from_float<T>(v); });
        return;
    }

    // columns c_lo .. c_lo + c_n of xᵀ dH: A(i, t) = x[t, i], B(t, n) = dH[t, c_lo + n]
    const int n_col_tiles = (c_n + BN - 1) / BN;
    const long long n_tiles = cdiv(I, BM) * n_col_tiles;
    const long long tile = block % n_tiles;
    const int split = static_cast<int>(block / n_tiles);
    const long long m0 = tile / n_col_tiles * BM, n0 = tile % n_col_tiles * BN;
    const RowSplit rows(Tn, split, n_splits, BK);
    Acc<T, EXACT, C> acc;
    acc.zero();
    gemm(acc, As, Bs, Dense<T, true>{x, I}, Dense<T, false>{dh + c_lo, R}, m0, n0, I, c_n, rows.end, rows.begin);
    acc.each([&](int r, int c, float v) {
        const long long i = m0 + r, n = n0 + c;
        if (i < I && n < c_n) {
            if (n_splits > 1) {
                ws[(split * I + i) * c_n + n] = v;
            } else {
                int cc = c_lo + static_cast<int>(n);
                T* out = dS1;
                if (cc >= Lk) {
                    cc -= Lk;
                    out = dU2;
                }
                out[(static_cast<long long>(cc / k) * I + i) * k + cc % k] = from_float<T>(v);
            }
        }
    });
}

template <typename T, int W>
__device__ __forceinline__ void sum_grad_runs(const float* __restrict__ ws1, const float* __restrict__ ws2,
                                              T* __restrict__ dS1, T* __restrict__ dU2, T* __restrict__ dU1,
                                              T* __restrict__ dS2, T* __restrict__ db, long long I, long long O, int Lk,
                                              int k, int c1_lo, int c1_n, int c2_lo, int c2_n, int n_splits1,
                                              int n_splits2) {
    const long long n1 = I * c1_n, n2 = static_cast<long long>(c2_n + (db != nullptr ? 1 : 0)) * O;
    for (long long e = (static_cast<long long>(blockIdx.x) * SUM_NT + threadIdx.x) * W; e < n1 + n2;
         e += static_cast<long long>(gridDim.x) * SUM_NT * W) {
        float sum[W] = {};
        if (e < n1) {
            for (int s = 0; s < n_splits1; ++s) add_run<W>(sum, ws1 + s * n1 + e);
            const long long i = e / c1_n;
            int cc = c1_lo + static_cast<int>(e % c1_n);
            T* out = dS1;
            if (cc >= Lk) {
                cc -= Lk;
                out = dU2;
            }
            store_run<T, W>(out + (static_cast<long long>(cc / k) * I + i) * k + cc % k, sum, 1.0f);
        } else {
            const long long e2 = e - n1;
            for (int s = 0; s < n_splits2; ++s) add_run<W>(sum, ws2 + s * n2 + e2);
            const int m = static_cast<int>(e2 / O);
            const int row = c2_lo + m;
            T* out = m == c2_n ? db : row < Lk ? dU1 + static_cast<long long>(row) * O : dS2 + static_cast<long long>(row - Lk) * O;
            store_run<T, W>(out + e2 % O, sum, 1.0f);
        }
    }
}

// The weight gradients from their fp32 shares: elements [0, I c1_n) of d[S1 | U2]'s columns c1_lo .. c1_lo + c1_n
// (n_splits1 shares ws1[split][i][n]), then [0, (c2_n + has db) O) of d[U1; S2]'s rows c2_lo .. c2_lo + c2_n and db
// (n_splits2 shares ws2[split][m][o], db as row c2_n), the shares in order; grid-stride. A gradient its launch wrote
// itself (one share) is left out here: c1_n = 0, or c2_n = 0 and db null. Four elements a thread (16-byte loads)
// where a run of four stays in one row of a share and in one term of the output (c1_n, c1_lo, k and O multiples of
// four) and every pointer is aligned to it, else one.
template <typename T>
__global__ void __launch_bounds__(SUM_NT) sketched_linear_bwd_sum(
    const float* __restrict__ ws1, const float* __restrict__ ws2, T* __restrict__ dS1, T* __restrict__ dU2,
    T* __restrict__ dU1, T* __restrict__ dS2, T* __restrict__ db, long long I, long long O, int L, int k, int c1_lo,
    int c1_n, int c2_lo, int c2_n, int n_splits1, int n_splits2) {
    const bool runs = c1_n % 4 == 0 && c1_lo % 4 == 0 && k % 4 == 0 && O % 4 == 0 && aligned16(ws1) && aligned16(ws2) &&
                      aligned_run(dS1) && aligned_run(dU2) && aligned_run(dU1) && aligned_run(dS2) && aligned_run(db);
    if (runs) {
        sum_grad_runs<T, 4>(ws1, ws2, dS1, dU2, dU1, dS2, db, I, O, L * k, k, c1_lo, c1_n, c2_lo, c2_n, n_splits1,
                            n_splits2);
    } else {
        sum_grad_runs<T, 1>(ws1, ws2, dS1, dU2, dU1, dS2, db, I, O, L * k, k, c1_lo, c1_n, c2_lo, c2_n, n_splits1,
                            n_splits2);
    }
}

}  // namespace sl
}  // namespace panther

#ifdef PANTHER_NVCC_CHECK
// Every variant the host code launches (backward.py; limits.py's CONFIGS: SMALL and LARGE), for the compile
// check of CI.
#define SMALL panther::sl::Tile<64, 64, 32, 2, 2, 3>
#define LARGE panther::sl::Tile<128, 128, 32, 2, 4, 4>
#define DEEP64 panther::sl::Tile<128, 128, 64, 2, 4, 4>
#define INST(T, E, C) \
    template __global__ void panther::sl::sketched_linear_bwd_g<T, E, C>(const T*, const T*, const T*, const T*, T*, \
        T*, T*, T*, float*, long long, long long, int, int, float, long long, int, int, int, float*, int); \
    template __global__ void panther::sl::sketched_linear_bwd_x<T, E, C>(const T*, const T*, const T*, const T*, T*, \
        T*, T*, float*, long long, long long, int, int, long long, int, int, int);
#define ALL(T, E) INST(T, E, SMALL) INST(T, E, LARGE) INST(T, E, DEEP64)
ALL(float, false) ALL(float, true) ALL(__half, false) ALL(__nv_bfloat16, false)
#define SUM(T) template __global__ void panther::sl::sketched_linear_bwd_sum<T>(const float*, const float*, T*, T*, T*, \
    T*, T*, long long, long long, int, int, int, int, int, int, int, int);
SUM(float) SUM(__half) SUM(__nv_bfloat16)
#endif  // PANTHER_NVCC_CHECK
