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

// sketched_linear_bwd_x_fused_sm90's shared memory in elements with S stages (sm90.py's fused_x_shared_bytes): A's
// 128 x 128 tile, S stages of x's and dH's 64 x 128 tiles, and dx's 64 x 128 tile on its way out.
template <int S> struct FusedX { static constexpr int ELEMENTS = 128 * 128 + S * 2 * 64 * 128 + 64 * 128; };

// The pair of d[S1 | U2] at row i, columns c_lo + n and c_lo + n + 1 (one term: k even), into dS1 or dU2.
template <typename T>
__device__ __forceinline__ void store_side_pair(T* dS1, T* dU2, long long I, int Lk, int k, int c_lo, long long i,
                                                int n, float v0, float v1) {
    int cc = c_lo + n;
    T* out = dS1;
    if (cc >= Lk) {
        cc -= Lk;
        out = dU2;
    }
    *reinterpret_cast<unsigned*>(out + (static_cast<long long>(cc / k) * I + i) * k + cc % k) =
        pack2(from_float<T>(v0), from_float<T>(v1));
}

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
        if (dh_splits > 1) {  // the fp32 share (scaled when the shares are summed), staged: whole rows a store
            store_staged_f32(d, reinterpret_cast<float*>(ring), ws_dh + split * Tn * R, R, m0, n0, Tn, R, 1.0f);
            return;
        }
        each_pair(d, [&](int r, int c, float v0, float v1) {
            const long long t = m0 + r;
            const int col = n0 + c;
            if (t >= Tn || col >= R) return;
            *reinterpret_cast<unsigned*>(dh + t * R + col) = pack2(from_float<T>(v0 * scale), from_float<T>(v1 * scale));
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
    if (n_splits > 1) {  // the fp32 share of rows m0 .. of d[U1; S2], staged: whole rows a store
        store_staged_f32(d, reinterpret_cast<float*>(ring), ws + split * static_cast<long long>(rows_ws) * O, O, m0, n0,
                         c_n, O, scale);
    } else {
        each_pair(d, [&](int r, int c, float v0, float v1) {
            const long long m = m0 + r, o = n0 + c;
            if (m >= c_n || o >= O) return;
            const int row = c_lo + static_cast<int>(m);
            T* out = row < Lk ? dU1 + static_cast<long long>(row) * O : dS2 + static_cast<long long>(row - Lk) * O;
            *reinterpret_cast<unsigned*>(out + o) = pack2(from_float<T>(v0 * scale), from_float<T>(v1 * scale));
        });
    }
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
    if (n_splits > 1) {  // the fp32 share, staged: whole rows a store
        store_staged_f32(d, reinterpret_cast<float*>(ring), ws + split * I * c_n, c_n, m0, n0, I, c_n, 1.0f);
        return;
    }
    each_pair(d, [&](int r, int c, float v0, float v1) {
        const long long i = m0 + r;
        const int n = n0 + c;
        if (i < I && n < c_n) store_side_pair(dS1, dU2, I, Lk, k, c_lo, i, n, v0, v1);
    });
#else
    __trap();  // sm_90a only: the host launches it nowhere else
#endif
}

// dx and d[S1 | U2] in one pass over x where R <= 128 (backward.py's fused_x): block b owns columns i0 .. i0 + 127
// of I (i0 = 128 (b % column tiles)) and the 64-aligned share b / column tiles of T (RowSplit), and walks it 64 rows
// a step through a ring of S stages of x's and dH's 64 x 128 tiles (both MN-major, zero past T, I and R):
//   d[S1 | U2] rows i0.. += xᵀ dH (A(i, t) = x[t, i], B(t, c) = dH[t, c]; warpgroup g rows 64 g ..), summed over the
//                           share into registers and written once (columns c_lo .. c_lo + c_n; fp32 shares when
//                           n_splits > 1, summed by backward.cu's sketched_linear_bwd_sum);
//   dx's 64 x 128 tile of the step = dH Aᵀ (A = dH's tile read K-major, the same shared memory; B(c, i) = A's rows
//                           i0.. of [S1 | U2], loaded once, K-major; warpgroup g columns 64 g ..), staged and
//                           written out while the next steps' copies fly.
// So x is read once, dx written once and A's tile stays on chip (as the triton backend's _grad_from_x_kernel).
// dx is skipped when dx is null, the weight gradient when c_n is 0 (x then not read).
template <typename T, int S>
__global__ void __launch_bounds__(SM90_NT, 1) sketched_linear_bwd_x_fused_sm90(
    const T* __restrict__ x, const T* __restrict__ dh, const T* __restrict__ S1, const T* __restrict__ U2,
    T* __restrict__ dx, T* __restrict__ dS1, T* __restrict__ dU2, float* __restrict__ ws, long long Tn, long long I,
    int L, int k, int c_lo, int c_n, int n_splits) {
#ifdef PANTHER_SM90A
    constexpr int BI = 128, BT = RING_BK, RW = 128;  // columns of I a block owns, rows of T a step, R's room
    constexpr int SX = BT * BI, SH = BT * RW, AHEAD = S - 1;
    static_assert(S >= 3, "two steps ahead at least");
    extern __shared__ __align__(1024) unsigned char smem[];
    require_sm90_launch(smem, static_cast<unsigned>(FusedX<S>::ELEMENTS * sizeof(T)));
    T* As = reinterpret_cast<T*>(smem);  // A's tile: rows i, K-major along c (BI x RW, zero past I and R)
    T* Xs = As + BI * RW;                // stage s: x's tile at Xs + s SX (k = t, n = i)
    T* Hs = Xs + S * SX;                 // and dH's at Hs + s SH (k = t, n = c)
    T* Ys = Hs + S * SH;                 // dx's tile on its way out (BT x BI, copy_staged's layout)
    const int Lk = L * k, R = 2 * Lk;
    const long long i_tiles = cdiv(I, BI), i0 = blockIdx.x % i_tiles * BI;
    const int split = static_cast<int>(blockIdx.x / i_tiles);
    const RowSplit rows(Tn, split, n_splits, BT);
    const bool want_dx = dx != nullptr, want_w = c_n > 0;
    const int g = static_cast<int>(threadIdx.x >> 7);  // warpgroup
    float dw[64];  // d[S1 | U2] rows i0 + 64 g .., all RW columns
#pragma unroll
    for (int i = 0; i < 64; ++i) dw[i] = 0.0f;

    if (want_dx) load_kmajor_sw<T, RW>(As, Side<T>{S1, U2, I, L, k}, i0, 0, I, R);  // with the first step's copies
    Sm90Loads<T, true, BT, Dense<T, false>> lx(Dense<T, false>{x, I}, i0, rows.begin, I);
    Sm90Loads<T, true, BT, Dense<T, false>> lh(Dense<T, false>{dh, R}, 0, rows.begin, R);
    const long long steps = cdiv(rows.end - rows.begin, BT);
    auto load = [&](int s, long long step) {  // steps in order: the cursors move on by one step each
        const long long t0 = rows.begin + step * BT;
        if (want_w) lx.load(Xs + s * SX, t0, rows.end);
        lh.load(Hs + s * SH, t0, rows.end);
    };
#pragma unroll
    for (int s = 0; s < AHEAD; ++s) {
        if (s < steps) load(s, static_cast<long long>(s));
        cp_async_commit();
    }
    const int lane = threadIdx.x & 31, warp = (threadIdx.x & 127) >> 5;
    int stage = 0, next = AHEAD % S;
    for (long long step = 0; step < steps; ++step) {
        cp_async_wait<AHEAD - 1>();  // this step's tiles (and A's) are in
        sm90::fence_proxy_async();
        __syncthreads();  // ... for every thread; the stage loaded next and Ys are free (the last step's done)
        const T* xs = Xs + stage * SX;
        const T* hs = Hs + stage * SH;
        float dy[32];  // dx rows t0 .., columns i0 + 64 g ..
#pragma unroll
        for (int i = 0; i < 32; ++i) dy[i] = 0.0f;
        sm90::fence_operand(dw);
        sm90::fence_operand(dy);
        sm90::wgmma_fence();
        // both products, wanted or not (a branch between the fence and the commit makes ptxas fence each wgmma,
        // C7519): an unwanted one reads a tile never loaded, and its result is dropped
#pragma unroll
        for (int k0 = 0; k0 < BT; k0 += 16)
            sm90::Wgmma<T, true, true>::m64n128k16(dw, tile_descriptor<true, BT>(xs, k0, 64 * g),
                                                   tile_descriptor<true, BT>(hs, k0, 0), 1);
#pragma unroll
        for (int k0 = 0; k0 < RW; k0 += 16)
            sm90::Wgmma<T, false, false>::m64n64k16(dy, tile_descriptor<false, RW, BT>(hs, k0, 0),
                                                    tile_descriptor<false, RW>(As, k0, 64 * g), 1);
        sm90::wgmma_commit();
        if (step + AHEAD < steps) load(next, step + AHEAD);
        cp_async_commit();
        sm90::wgmma_wait<0>();
        sm90::fence_operand(dw);
        if (want_dx) {
            sm90::fence_operand(dy);
            const long long t0 = rows.begin + step * BT;
            // thread's pairs: rows 16 warp + lane / 4 (+ 8), columns 64 g + 8 i + 2 (lane % 4)
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int half = 0; half < 2; ++half)
                    stage_pair(Ys, warp * 16 + (lane >> 2) + 8 * half, 64 * g + 8 * i + 2 * (lane & 3),
                               from_float<T>(dy[4 * i + 2 * half]), from_float<T>(dy[4 * i + 2 * half + 1]));
            __syncthreads();
            copy_staged<T, BT>(Ys, dx, I, t0, i0, rows.end, I);
        }
        stage = stage == S - 1 ? 0 : stage + 1;
        next = next == S - 1 ? 0 : next + 1;
    }
    cp_async_wait<0>();
    if (!want_w) return;
    if (n_splits > 1) {  // the fp32 share of columns c_lo .. c_lo + c_n, staged: whole rows a store
        store_staged_f32(dw, reinterpret_cast<float*>(smem), ws + split * I * c_n, c_n, i0, -c_lo, I, c_n, 1.0f);
        return;
    }
    each_pair(dw, [&](int r, int c, float v0, float v1) {
        const long long i = i0 + r;
        const int n = c - c_lo;
        if (i < I && n >= 0 && n < c_n) store_side_pair(dS1, dU2, I, Lk, k, c_lo, i, n, v0, v1);
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
#define SM90_FUSED_X(T, S) \
    template __global__ void panther::sl::sketched_linear_bwd_x_fused_sm90<T, S>(const T*, const T*, const T*, const T*, \
        T*, T*, T*, float*, long long, long long, int, int, int, int, int);
SM90_FUSED_X(__half, 4) SM90_FUSED_X(__nv_bfloat16, 4)
#endif  // PANTHER_NVCC_CHECK
