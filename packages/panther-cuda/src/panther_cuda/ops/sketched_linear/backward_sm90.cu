// Backward of the sketched linear op on Hopper (sm_90a), warpgroup MMA for 16-bit inputs: the kernels of
// backward.cu with the same arguments, roles and grids on 128 x 128 tiles (LARGE's): backward.py launches them
// in its place where asked (hopper=True) and sm90_bwd_fits allows (k, I and O multiples of 8, aligned tensors).
//
// g = dL/dy (T, O), s = 1/(2L), A = [S1 | U2] (I x R), B = [U1; S2] (R x O), H (T, R), column c = h Lk + l k + j:
//   sketched_linear_bwd_g_sm90: dH = s g Bᵀ (g K-major, B's rows K-major; in fp32 shares of O where split);
//                               d[U1; S2] = s Hᵀ g (H and g MN-major) with db = Σ_T g from the g tiles
//   sketched_linear_bwd_x_sm90: dx = dH Aᵀ (dH K-major, A's rows K-major: k a multiple of 8 keeps a 16-byte run
//                               in one term); d[S1 | U2] = xᵀ dH (x and dH MN-major)
// Reductions run through tile_sm90.cuh's ring, 64 deep per step, S stages; the weight gradients in fp32
// shares of T where split (summed by backward.cu's sketched_linear_bwd_sum).
#include "tile_sm90.cuh"

namespace panther {
namespace sl {

template <typename T, int S>
__global__ void __launch_bounds__(SM90_NT, (S <= 3 ? 2 : 1)) sketched_linear_bwd_g_sm90(
    const T* __restrict__ g, const T* __restrict__ h, const T* __restrict__ U1, const T* __restrict__ S2,
    T* __restrict__ dh, T* __restrict__ dU1, T* __restrict__ dS2, T* __restrict__ db, float* __restrict__ ws,
    long long Tn, long long O, int L, int k, float scale, long long n_dh_blocks, int c_lo, int c_n, int n_splits,
    float* __restrict__ ws_dh, int dh_splits) {
#ifdef PANTHER_SM90A
    constexpr int BM = 128, BN = 128;
    extern __shared__ __align__(1024) unsigned char smem[];
    float d[64];
    T* ring = ring_memory<T, S>(smem, d);
    const int Lk = L * k, R = 2 * Lk;
    long long block = blockIdx.x;

    if (block < n_dh_blocks) {  // dH = s g Bᵀ: A(t, o) = g[t, o]; B(o, c) = [U1; S2](c, o), rows c K-major
        const int n_col_tiles = (R + BN - 1) / BN;
        const long long dh_tiles = n_dh_blocks / dh_splits;
        const long long tile = block % dh_tiles;
        const int split = static_cast<int>(block / dh_tiles);
        const long long m0 = tile / n_col_tiles * BM;
        const int n0 = static_cast<int>(tile % n_col_tiles) * BN;
        const RowSplit share(O, split, dh_splits, RING_BK);
        ring_sm90<T, false, false, S>(d, ring, Dense<T, false>{g, O}, Stack<T>{U1, S2, O, Lk}, m0, n0, Tn, R, share.begin,
                                   share.end, [](const T*) {});
        each_pair(d, [&](int r, int c, float v0, float v1) {
            const long long t = m0 + r;
            const int col = n0 + c;
            if (t >= Tn || col >= R) return;
            if (dh_splits > 1) {
                float* out = ws_dh + (split * Tn + t) * R + col;  // scaled when the shares are summed
                out[0] = v0;
                out[1] = v1;
            } else {
                *reinterpret_cast<unsigned*>(dh + t * R + col) = pack2(from_float<T>(v0 * scale), from_float<T>(v1 * scale));
            }
        });
        return;
    }
    block -= n_dh_blocks;

    // rows c_lo .. c_lo + c_n of s Hᵀ g: A(m, t) = H[t, c_lo + m] and B(t, o) = g[t, o], both MN-major; and db
    const long long n_col_tiles = cdiv(O, BN);
    const long long n_tiles = cdiv(c_n > 0 ? c_n : 1, BM) * n_col_tiles;  // one row tile for db alone
    const long long tile = block % n_tiles;
    const int split = static_cast<int>(block / n_tiles);
    const long long m0 = tile / n_col_tiles * BM, n0 = tile % n_col_tiles * BN;
    const RowSplit rows(Tn, split, n_splits, RING_BK);
    const bool with_db = db != nullptr && m0 == 0;  // the same for the whole block
    const int rows_ws = c_n + (db != nullptr ? 1 : 0);  // rows of a share in ws: d[U1; S2]'s, then db's
    // db: thread tid sums column tid % 128 of rows (tid / 128) 32 .. + 31 of each g tile (MN-major, swizzled, zero
    // past the edges)
    float db_part = 0.0f;
    const int db_col = threadIdx.x % BN, db_row = threadIdx.x / BN * (RING_BK / 2);
    auto hook = [&](const T* g_tile) {
        if (!with_db) return;
        const T* gs = g_tile + db_col % 8;
#pragma unroll 8
        for (int r = db_row; r < db_row + RING_BK / 2; ++r) db_part += to_float(gs[sw_mnmajor<RING_BK>(r, db_col / 8)]);
    };
    ring_sm90<T, true, true, S>(d, ring, Dense<T, false>{h + c_lo, R}, Dense<T, false>{g, O}, m0, n0, c_n, O, rows.begin,
                             rows.end, hook);
    each_pair(d, [&](int r, int c, float v0, float v1) {
        const long long m = m0 + r, o = n0 + c;
        if (m >= c_n || o >= O) return;
        if (n_splits > 1) {
            float* out = ws + (split * static_cast<long long>(rows_ws) + m) * O + o;
            out[0] = v0 * scale;
            out[1] = v1 * scale;
        } else {
            const int row = c_lo + static_cast<int>(m);
            T* out = row < Lk ? dU1 + static_cast<long long>(row) * O : dS2 + static_cast<long long>(row - Lk) * O;
            *reinterpret_cast<unsigned*>(out + o) = pack2(from_float<T>(v0 * scale), from_float<T>(v1 * scale));
        }
    });
    if (with_db) {
        float* part = reinterpret_cast<float*>(ring);  // free: the ring returns behind a barrier
        part[threadIdx.x] = db_part;
        __syncthreads();
        const long long o = n0 + threadIdx.x;
        if (threadIdx.x < BN && o < O) {
            const float sum = part[threadIdx.x] + part[threadIdx.x + BN];
            if (n_splits > 1) {
                ws[(split * static_cast<long long>(rows_ws) + c_n) * O + o] = sum;
            } else {
                db[o] = from_float<T>(sum);
            }
        }
    }
#else
    __trap();  // sm_90a only: the host launches it nowhere else
#endif
}

template <typename T, int S>
__global__ void __launch_bounds__(SM90_NT, (S <= 3 ? 2 : 1)) sketched_linear_bwd_x_sm90(
    const T* __restrict__ x, const T* __restrict__ dh, const T* __restrict__ S1, const T* __restrict__ U2,
    T* __restrict__ dx, T* __restrict__ dS1, T* __restrict__ dU2, float* __restrict__ ws, long long Tn, long long I,
    int L, int k, long long n_dx_blocks, int c_lo, int c_n, int n_splits) {
#ifdef PANTHER_SM90A
    constexpr int BM = 128, BN = 128;
    extern __shared__ __align__(1024) unsigned char smem[];
    float d[64];
    T* ring = ring_memory<T, S>(smem, d);
    const int Lk = L * k, R = 2 * Lk;
    // the weight gradient's blocks first (long reductions over T), then dx's (R deep), as backward.cu
    const long long n_w_blocks = static_cast<long long>(gridDim.x) - n_dx_blocks;
    long long block = blockIdx.x;

    if (block >= n_w_blocks) {  // dx = dH Aᵀ: A(t, c) = dH[t, c]; B(c, i) = A(i, c), rows i K-major
        block -= n_w_blocks;
        const long long n_col_tiles = cdiv(I, BN);
        const long long m0 = block / n_col_tiles * BM, n0 = block % n_col_tiles * BN;
        ring_sm90<T, false, false, S>(d, ring, Dense<T, false>{dh, R}, Side<T>{S1, U2, I, L, k}, m0, n0, Tn, I, 0, R,
                                   [](const T*) {});
        store_staged(d, ring, dx, I, m0, n0, Tn, I, [](int, int, float v) { return from_float<T>(v); });
        return;
    }

    // columns c_lo .. c_lo + c_n of xᵀ dH: A(i, t) = x[t, i] and B(t, n) = dH[t, c_lo + n], both MN-major
    const int n_col_tiles = (c_n + BN - 1) / BN;
    const long long n_tiles = cdiv(I, BM) * n_col_tiles;
    const long long tile = block % n_tiles;
    const int split = static_cast<int>(block / n_tiles);
    const long long m0 = tile / n_col_tiles * BM;
    const int n0 = static_cast<int>(tile % n_col_tiles) * BN;
    const RowSplit rows(Tn, split, n_splits, RING_BK);
    ring_sm90<T, true, true, S>(d, ring, Dense<T, false>{x, I}, Dense<T, false>{dh + c_lo, R}, m0, n0, I, c_n, rows.begin,
                             rows.end, [](const T*) {});
    each_pair(d, [&](int r, int c, float v0, float v1) {
        const long long i = m0 + r;
        const int n = n0 + c;
        if (i >= I || n >= c_n) return;
        if (n_splits > 1) {
            float* out = ws + (split * I + i) * c_n + n;
            out[0] = v0;
            out[1] = v1;
        } else {  // columns cc and cc + 1 of one term (k even)
            int cc = c_lo + n;
            T* out = dS1;
            if (cc >= Lk) {
                cc -= Lk;
                out = dU2;
            }
            *reinterpret_cast<unsigned*>(out + (static_cast<long long>(cc / k) * I + i) * k + cc % k) =
                pack2(from_float<T>(v0), from_float<T>(v1));
        }
    });
#else
    __trap();  // sm_90a only: the host launches it nowhere else
#endif
}

}  // namespace sl
}  // namespace panther

#ifdef PANTHER_NVCC_CHECK
// The instances backward.py launches (16-bit inputs; each ring of sm90.py's RING_STAGES).
#define SM90_BWD(T, S) \
    template __global__ void panther::sl::sketched_linear_bwd_g_sm90<T, S>(const T*, const T*, const T*, const T*, T*, T*, \
        T*, T*, float*, long long, long long, int, int, float, long long, int, int, int, float*, int); \
    template __global__ void panther::sl::sketched_linear_bwd_x_sm90<T, S>(const T*, const T*, const T*, const T*, T*, T*, \
        T*, float*, long long, long long, int, int, long long, int, int, int);
SM90_BWD(__half, 3) SM90_BWD(__nv_bfloat16, 3) SM90_BWD(__half, 6) SM90_BWD(__nv_bfloat16, 6)
#endif  // PANTHER_NVCC_CHECK
