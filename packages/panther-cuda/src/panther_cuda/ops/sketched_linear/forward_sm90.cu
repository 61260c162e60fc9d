// Forward of the sketched linear op on Hopper (sm_90a): y = H B / (2L) + b with warpgroup MMA (wgmma.cuh), for
// 16-bit inputs. forward.py launches it in place of forward.cu's sketched_linear_fwd_y where the plan asks
// (ForwardPlan.hopper) and the shapes allow (sm90_fits): R = 2Lk <= 256 and a multiple of 8, O a multiple of 8,
// 16-byte aligned H, U1 and S2 (contiguous).
//
// A block is two warpgroups (256 threads) on a 128-row tile of y, warpgroup g its rows 64 g .. 64 g + 63. H's
// 128 x KP tile (KP = R rounded up to 16; zero past R and past T) is loaded once; the block then walks its
// column tiles of BN = 128 (group, group + groups, ...), B's KP x BN tile of each double-buffered: the copy of
// the next tile is in flight while the tensor cores multiply this one and the epilogue writes it.
//
// Shared memory, in the no-swizzle layouts of wgmma.cuh, every 16-byte run written by one cp.async (zero-filled
// past the edges), eight consecutive threads filling one 128-byte core matrix:
//   As (BM x KP, K-major): (m, k) at (m % 8) 8 + (k % 8) + (k / 8) 64 + (m / 8) KP 8   (LBO 128 B, SBO 16 KP B)
//   Bs (2 stages of KP x BN, MN-major): (k, n) at (k % 8) 8 + (n % 8) + (n / 8) 64 + (k / 8) BN 8
//                                                                                       (SBO 128 B, LBO 16 BN B)
#include "tile.cuh"
#include "wgmma.cuh"

namespace panther {
namespace sl {

constexpr int SM90_NT = 256;  // threads of a block: two warpgroups (forward.py's SM90_THREADS)

// KP: the depth of the products, R rounded up to one of SM90_DEPTHS (forward.py), zero past R.
template <typename T, int KP>
__global__ void __launch_bounds__(SM90_NT) sketched_linear_fwd_y_sm90(
    const T* __restrict__ h, const T* __restrict__ U1, const T* __restrict__ S2, const T* __restrict__ bias,
    T* __restrict__ y, long long Tn, long long O, int Lk, int groups, float scale) {
#ifdef PANTHER_SM90A
    constexpr int BM = 128, BN = 128, NT = SM90_NT;  // the tile (forward.py's SM90_BM, SM90_BN)
    extern __shared__ __align__(128) unsigned char smem[];
    static_assert(KP % 16 == 0 && KP <= 256, "whole wgmma steps, H's row in one tile");
    const int R = 2 * Lk;
    require_shared(static_cast<unsigned>((BM * KP + 2 * KP * BN) * sizeof(T)));
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = As + BM * KP;  // stage s at Bs + s KP BN

    const long long m0 = static_cast<long long>(blockIdx.x / groups) * BM;
    const int group = static_cast<int>(blockIdx.x % groups);
    const long long n_tiles = cdiv(O, BN);

    // H's tile: run i (16 bytes) = row (i / (8 KC)) 8 + i % 8, chunk (i / 8) % KC; lands at As + 8 i
    constexpr int KC = KP / 8;
    for (int i = threadIdx.x; i < BM * KC; i += NT) {
        const int r = i / (8 * KC) * 8 + i % 8, c = i / 8 % KC;
        const long long t = m0 + r;
        const bool in = t < Tn && 8 * c < R;
        cp_async16_zfill(As + 8 * i, in ? h + t * R + 8 * c : h, in ? 16u : 0u);
    }
    // B's tile at column n0 into stage s: run i = row (i / (8 BN / 8)) 8 + i % 8, column chunk (i / 8) % (BN / 8);
    // lands at Bs_s + 8 i. Row k of B = [U1; S2] is U1's row k, or S2's row k - Lk.
    auto load_b = [&](long long n0, int s) {
        T* dst = Bs + s * KP * BN;
        for (int i = threadIdx.x; i < KP * BN / 8; i += NT) {
            const int k = i / BN * 8 + i % 8, j = i / 8 % (BN / 8);
            const long long o = n0 + 8 * j;
            const bool in = k < R && o < O;
            const T* src = k < Lk ? U1 + static_cast<long long>(k) * O : S2 + static_cast<long long>(k - Lk) * O;
            cp_async16_zfill(dst + 8 * i, in ? src + o : U1, in ? 16u : 0u);
        }
    };
    if (group < n_tiles) load_b(group * BN, 0);
    cp_async_commit();

    const int wg = threadIdx.x / 128, lane = threadIdx.x & 31, warp = (threadIdx.x & 127) >> 5;
    const T* a_tile = As + wg * 64 * KP;  // this warpgroup's 64 rows: 8 core-matrix rows of KP 8 elements each
    int stage = 0;
    for (long long nt = group; nt < n_tiles; nt += groups) {
        const long long n0 = nt * BN;
        if (nt + groups < n_tiles) load_b((nt + groups) * BN, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();  // H's tile and this column tile are in (the next one may still fly)
        sm90::fence_proxy_async();
        __syncthreads();

        float d[64];  // written by the first step (accumulate 0), then accumulated
        sm90::wgmma_fence();
        const T* b_tile = Bs + stage * KP * BN;
#pragma unroll
        for (int k0 = 0; k0 < KP; k0 += 16) {  // 16 deep: two core matrices along K of each operand
            const unsigned long long da = sm90::descriptor(a_tile + k0 * 8, 128u, 16u * KP);
            const unsigned long long db = sm90::descriptor(b_tile + k0 * BN, 16u * BN, 128u);
            sm90::Wgmma<T, true>::m64n128k16(d, da, db, k0 > 0 ? 1 : 0);
        }
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();

        // epilogue: element (16 warp + lane / 4 + 8 (v / 2), 8 i + 2 (lane % 4) + v % 2) of this warpgroup's rows,
        // two neighbouring columns per 4-byte store where both lie inside O
        const long long row0 = m0 + wg * 64 + warp * 16 + (lane >> 2);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const long long o = n0 + 8 * i + 2 * (lane & 3);
            if (o >= O) continue;
            const float b0 = bias != nullptr ? to_float(bias[o]) : 0.0f;
            const float b1 = bias != nullptr && o + 1 < O ? to_float(bias[o + 1]) : 0.0f;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const long long t = row0 + 8 * half;
                if (t >= Tn) continue;
                const T v0 = from_float<T>(d[4 * i + 2 * half] * scale + b0);
                const T v1 = from_float<T>(d[4 * i + 2 * half + 1] * scale + b1);
                T* out = y + t * O + o;
                if (o + 1 < O) {
                    *reinterpret_cast<unsigned*>(out) = pack2(v0, v1);
                } else {
                    out[0] = v0;
                }
            }
        }
        __syncthreads();  // every warpgroup is done with this stage before the next tile's copy lands in it
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
// The instances forward.py launches (16-bit inputs; each depth of SM90_DEPTHS).
#define SM90_Y(T, KP) template __global__ void panther::sl::sketched_linear_fwd_y_sm90<T, KP>(const T*, const T*, \
    const T*, const T*, T*, long long, long long, int, int, float);
#define SM90_ALL(T) SM90_Y(T, 32) SM90_Y(T, 64) SM90_Y(T, 128) SM90_Y(T, 256)
SM90_ALL(__half) SM90_ALL(__nv_bfloat16)
#endif  // PANTHER_NVCC_CHECK
