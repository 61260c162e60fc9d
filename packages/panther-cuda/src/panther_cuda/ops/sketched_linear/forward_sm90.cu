// Forward of the sketched linear op on Hopper (sm_90a), warpgroup MMA (wgmma.cuh) for 16-bit inputs; forward.py
// launches these in place of forward.cu's kernels where the plan asks (ForwardPlan.hopper_h, .hopper_y) and the
// shapes allow:
//
// * sketched_linear_fwd_h_sm90 — H = x A (sm90.h_fits: I and k multiples of 8): a block is a 128 x 128 tile of
//   H (T x R), or its fp32 share of I (n_splits > 1, summed by forward.cu's sketched_linear_sum_shares); x's and
//   A's tiles 64 deep through tile_sm90.cuh's ring of S stages of cp.async (3 or 6: sm90.py's ring_stages; the
//   ring of six keeps one group of products in flight).
// * sketched_linear_fwd_y_sm90 — y = H B / (2L) + b (sm90.y_fits: R = 2Lk <= 256, R and O multiples of 8): a
//   block is a 128-row tile of y; H's 128 x KP tile (KP = R rounded up to one of sm90.py's DEPTHS, the tile at
//   least 64 wide; zero past R and T) is loaded once; the block then walks its column tiles of BN = 128 (group,
//   group + groups, ...), B's KP x BN tile of each double-buffered: the copy of the next tile is in flight while
//   the tensor cores multiply this one and the epilogue writes it.
//
// Tiles (tile_sm90.cuh): x's and H's K-major, A's and B's MN-major.
#include "tile_sm90.cuh"

namespace panther {
namespace sl {

// H = x A: block b is tile b % tiles of H (row tile of 128 x column tile of 128: tiles = row tiles x column
// tiles, columns fastest), summing the BK-aligned share b / tiles of I (RowSplit) into ws[share] (fp32, T x R)
// when n_splits > 1, else into H (rounded once). A = [S1 | U2] (I x R) read in place: row i, column c = h Lk +
// l k + j is W_h[l, i, j], k a multiple of 8 so that a 16-byte run stays in one term.
template <typename T, int S>
__global__ void __launch_bounds__(SM90_NT, (S <= 3 ? 2 : 1)) sketched_linear_fwd_h_sm90(
    const T* __restrict__ x, const T* __restrict__ S1, const T* __restrict__ U2, T* __restrict__ h,
    float* __restrict__ ws, long long Tn, long long I, int L, int k, int n_splits) {
#ifdef PANTHER_SM90A
    constexpr int BM = 128, BN = 128;  // the tile (sm90.py's BM, BN)
    extern __shared__ __align__(1024) unsigned char smem[];
    float d[64];  // zero: an empty share (past I) writes zeros
    T* ring = ring_memory<T, S>(smem, d);
    const int R = 2 * L * k;
    const int n_col_tiles = (R + BN - 1) / BN;
    const long long tiles = cdiv(Tn, BM) * n_col_tiles;
    const long long tile = blockIdx.x % tiles;
    const int split = static_cast<int>(blockIdx.x / tiles);
    const long long m0 = tile / n_col_tiles * BM;
    const int n0 = static_cast<int>(tile % n_col_tiles) * BN;
    const RowSplit share(I, split, n_splits, RING_BK);
    // the deep ring (a block alone on its SM) keeps one group of products in flight (ring_sm90's LAG)
    ring_sm90<T, false, true, S, (S >= 6 ? 1 : 0)>(d, ring, Dense<T, false>{x, I}, Side<T>{S1, U2, I, L, k}, m0, n0,
                                                Tn, R, share.begin, share.end, [](const T*) {});
    if (n_splits > 1) {  // the fp32 share, staged: whole rows a store
        store_staged_f32(d, reinterpret_cast<float*>(ring), ws + split * Tn * R, R, m0, n0, Tn, R, 1.0f);
        return;
    }
    each_pair(d, [&](int r, int c, float v0, float v1) {
        const long long t = m0 + r;
        const int col = n0 + c;
        if (t >= Tn || col >= R) return;  // R even: both columns inside
        *reinterpret_cast<unsigned*>(h + t * R + col) = pack2(from_float<T>(v0), from_float<T>(v1));
    });
#else
    __trap();  // sm_90a only: the host launches it nowhere else
#endif
}

// KP: the depth of the products, R rounded up to one of sm90.py's DEPTHS, zero past R.
template <typename T, int KP>
__global__ void __launch_bounds__(SM90_NT, (KP <= 128 ? 2 : 1)) sketched_linear_fwd_y_sm90(
    const T* __restrict__ h, const T* __restrict__ U1, const T* __restrict__ S2, const T* __restrict__ bias,
    T* __restrict__ y, long long Tn, long long O, int Lk, int groups, float scale) {
#ifdef PANTHER_SM90A
    constexpr int BM = 128, BN = 128;  // the tile (sm90.py's BM, BN)
    extern __shared__ __align__(1024) unsigned char smem[];
    static_assert(KP % 16 == 0 && KP <= 256, "whole wgmma steps, H's row in one tile");
    constexpr int KW = KP < 64 ? 64 : KP;  // H's tile: whole 128-byte rows of the swizzle (zero past R)
    const int R = 2 * Lk;
    require_sm90_launch(smem, static_cast<unsigned>((BM * KW + 2 * KP * BN) * sizeof(T)));
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = As + BM * KW;  // stage s at Bs + s KP BN

    const long long m0 = static_cast<long long>(blockIdx.x / groups) * BM;
    const int group = static_cast<int>(blockIdx.x % groups);
    const long long n_tiles = cdiv(O, BN);

    load_kmajor_sw<T, KW>(As, Dense<T, false>{h, R}, m0, 0, Tn, R);  // H's tile, once
    const Stack<T> b{U1, S2, O, Lk};  // B = [U1; S2]: row c is U1's row c, or S2's row c - Lk
    auto load_b = [&](long long n0, int s) { load_mnmajor_sw<T, KP>(Bs + s * KP * BN, b, 0, n0, R, O); };
    if (group < n_tiles) load_b(group * BN, 0);
    cp_async_commit();

    int stage = 0;
    for (long long nt = group; nt < n_tiles; nt += groups) {
        const long long n0 = nt * BN;
        if (nt + groups < n_tiles) load_b((nt + groups) * BN, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();  // H's tile and this column tile are in (the next one may still fly)
        sm90::fence_proxy_async();
        __syncthreads();

        float d[64];  // written by the first step (accumulate 0), then accumulated
        product<T, false, true, KP, false>(d, As, Bs + stage * KP * BN);

        if constexpr (KP * BN >= BM * BN) {
            // epilogue staged in this column tile's stage of B, once both warpgroups' products are done with it:
            // 16-byte stores of y
            __syncthreads();
            store_staged(d, Bs + stage * KP * BN, y, O, m0, n0, Tn, O, [&](int, int c, float v) {
                const long long o = n0 + c;
                return from_float<T>(v * scale + (bias != nullptr && o < O ? to_float(bias[o]) : 0.0f));
            });
        } else {
            // epilogue: two neighbouring columns per 4-byte store (O is even)
            each_pair(d, [&](int r, int c, float v0, float v1) {
                const long long t = m0 + r, o = n0 + c;
                if (t >= Tn || o >= O) return;
                const float b0 = bias != nullptr ? to_float(bias[o]) : 0.0f;
                const float b1 = bias != nullptr ? to_float(bias[o + 1]) : 0.0f;
                *reinterpret_cast<unsigned*>(y + t * O + o) =
                    pack2(from_float<T>(v0 * scale + b0), from_float<T>(v1 * scale + b1));
            });
            __syncthreads();  // every warpgroup is done with this stage before the next tile's copy lands in it
        }
        stage ^= 1;
    }
    cp_async_wait<0>();
#else
    __trap();  // sm_90a only: the host launches it nowhere else
#endif
}

}  // namespace sl
}  // namespace panther

#ifdef PANTHER_NVCC_CHECK
// The instances forward.py launches (16-bit inputs; y at each depth of sm90.py's DEPTHS, H with each ring of
// sm90.py's RING_STAGES).
#define SM90_Y(T, KP) template __global__ void panther::sl::sketched_linear_fwd_y_sm90<T, KP>(const T*, const T*, \
    const T*, const T*, T*, long long, long long, int, int, float);
#define SM90_ALL(T) SM90_Y(T, 32) SM90_Y(T, 64) SM90_Y(T, 128) SM90_Y(T, 256)
SM90_ALL(__half) SM90_ALL(__nv_bfloat16)
#define SM90_H(T, S) template __global__ void panther::sl::sketched_linear_fwd_h_sm90<T, S>(const T*, const T*, \
    const T*, T*, float*, long long, long long, int, int, int);
SM90_H(__half, 3) SM90_H(__nv_bfloat16, 3) SM90_H(__half, 6) SM90_H(__nv_bfloat16, 6)
#endif  // PANTHER_NVCC_CHECK
