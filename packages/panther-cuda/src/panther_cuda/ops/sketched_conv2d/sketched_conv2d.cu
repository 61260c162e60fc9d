// Implicit-GEMM kernels of the sketched conv2d op (NVRTC; no host code).
//
//   x: (N, C, H, W) any strides     S: (R, K) row-major, R = 2Lk, K = C kh kw     U: (R, O) row-major
//   Z[m, r] = Σ_κ im2col(x)[m, κ] S[r, κ]        m = (n, oh, ow) an output pixel, M = N H' W'
//   y[m, o] = scale Σ_r Z[m, r] U[r, o] + b[o]   scale = 1/(2L)
//
// sketched_conv2d_fwd: one block takes BM output pixels, computes Z for them (BM x R) on tensor cores
//   from im2col tiles gathered into shared memory, keeps Z in shared memory, then multiplies it by U in
//   O tiles with the scale and bias in the epilogue; Z never goes to global memory.
// conv_rank: Z (or any (M, R) product of the same form, e.g. dZ = g Uᵀ / (2L) as a 1x1 convolution of
//   g) written to global memory with the given strides and scale; one block per (BM pixels, RC columns).
// EXACT (float only): products in FFMA with the tensor-core accumulator layout, for exact float32.
#include "panther_cuda/common.cuh"

namespace panther {
namespace conv {

constexpr int BM = 64;        // output pixels per block
constexpr int THREADS = 128;  // 4 warps, 16 pixels each
constexpr int BK = 32;        // im2col depth per step
constexpr int BN = 64;        // output channels per epilogue tile

// Row padding of shared tiles (elements) that spreads fragment reads over the 32 banks.
template <typename T> struct Pad { static constexpr int value = sizeof(T) == 2 ? 8 : 4; };

struct Geometry {
    int C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
    long long M;  // N * Ho * Wo
    long long sxn, sxc, sxh, sxw;
};

// Where output pixel m reads its input window: x offset of its window's top-left corner (n, ih0, iw0),
// which may lie in the padding, and that corner's input row and column.
struct GatherRow {
    bool valid;
    long long base;  // n sxn + ih0 sxh + iw0 sxw
    int ih0, iw0;
};

__device__ __forceinline__ void pixel_coords(long long m, int Ho, int Wo, long long& n, int& oh, int& ow) {
    const long long hw = static_cast<long long>(Ho) * Wo;
    n = m / hw;
    const long long p = m - n * hw;
    oh = static_cast<int>(p / Wo);
    ow = static_cast<int>(p - static_cast<long long>(oh) * Wo);
}

__device__ __forceinline__ GatherRow gather_row(const Geometry& g, long long m) {
    GatherRow r;
    r.valid = m < g.M;
    long long n;
    int oh, ow;
    pixel_coords(r.valid ? m : 0, g.Ho, g.Wo, n, oh, ow);
    r.ih0 = oh * g.sh - g.ph;
    r.iw0 = ow * g.sw - g.pw;
    r.base = n * g.sxn + r.ih0 * g.sxh + r.iw0 * g.sxw;
    return r;
}

// acc[nt] (16 x 8 tile nt of this warp) += A (16 x depth) B (depth x 8 NT); A(r, k), B(k, n) read shared
// memory. Tensor cores (Mma<T>) or, for EXACT, FFMA into the same accumulator layout.
template <typename T, bool EXACT, int NT, typename FA, typename FB>
__device__ __forceinline__ void warp_product(float (&acc)[NT][4], FA A, FB B, int depth, int lane) {
    constexpr int KS = EXACT ? 8 : Mma<T>::K;
    const int g = lane >> 2, t = lane & 3;
    for (int k0 = 0; k0 < depth; k0 += KS) {
        if constexpr (EXACT) {
#pragma unroll
            for (int k = 0; k < KS; ++k) {
                const float a0 = to_float<T>(A(g, k0 + k)), a1 = to_float<T>(A(g + 8, k0 + k));
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const float b0 = to_float<T>(B(k0 + k, nt * 8 + 2 * t));
                    const float b1 = to_float<T>(B(k0 + k, nt * 8 + 2 * t + 1));
                    acc[nt][0] = fmaf(a0, b0, acc[nt][0]);
                    acc[nt][1] = fmaf(a0, b1, acc[nt][1]);
                    acc[nt][2] = fmaf(a1, b0, acc[nt][2]);
                    acc[nt][3] = fmaf(a1, b1, acc[nt][3]);
                }
            }
        } else {
            unsigned a[4];
            load_a<T>(a, [&](int r, int c) { return A(r, k0 + c); }, lane);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                unsigned b[2];
                load_b<T>(b, [&](int r, int c) { return B(k0 + r, nt * 8 + c); }, lane);
                Mma<T>::run(acc[nt], a, b);
            }
        }
    }
}

// Stage-1 workspace in shared memory: two column tables of BK entries (x offset, row and column offset of
// im2col column κ, double-buffered), then the im2col tile A (BM x BK) and the S tile (RC x BK).
// Bytes: 2 BK (8 + 4 + 4) + (BM + RC)(BK + Pad) sizeof(T) (forward.py: rank_shared_bytes).

// acc (this warp's 16 pixels x RC columns r0..r0+RC-1 of Z) = im2col(x) S[r0:r0+RC]ᵀ, over all of K.
// Every thread of the block calls it (it synchronises the block); `row` is this thread's gather row,
// pixel m0 + (threadIdx.x % BM); `work`: the stage-1 workspace above, 16-byte aligned.
// The next step's tiles are loaded into registers while the tensor cores work on this step's.
template <typename T, int RC, bool EXACT>
__device__ __forceinline__ void conv_rank_tile(float (&acc)[RC / 8][4], const T* __restrict__ x,
                                               const T* __restrict__ S, const Geometry& g, int R, int r0,
                                               const GatherRow& row, unsigned char* work) {
    constexpr int ALD = BK + Pad<T>::value;
    constexpr int XPT = BM * BK / THREADS;  // im2col elements per thread and step
    constexpr int WPT = RC * BK / THREADS;  // S elements per thread and step
    static_assert(XPT * THREADS == BM * BK && WPT * THREADS == RC * BK, "tiles split evenly over threads");
    long long* toff = reinterpret_cast<long long*>(work);  // [2][BK]: c sxc + i dh sxh + j dw sxw
    int* tih = reinterpret_cast<int*>(toff + 2 * BK);      // [2][BK]: i dh (far negative past K)
    int* tiw = tih + 2 * BK;                               // [2][BK]: j dw
    T* As = reinterpret_cast<T*>(tiw + 2 * BK);
    T* Ws = As + BM * ALD;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int KK = g.kh * g.kw;
    const int K = g.C * KK;
    const T zero = from_float<T>(0.f);
    const int m_local = tid & (BM - 1);
    const int kk_first = tid / BM;  // 0 or 1: this thread gathers columns kk_first, kk_first + 2, ...

    // column κ = k0 + kk = c kh kw + i kw + j of im2col -> table entry kk of buffer buf
    auto fill_table = [&](int buf, int k0) {
        if (tid < BK) {
            const int kidx = k0 + tid;
            long long off = 0;
            int dih = -(1 << 30), diw = 0;  // past K: a row offset no window reaches
            if (kidx < K) {
                const int c = kidx / KK;
                const int rem = kidx - c * KK;
                const int i = rem / g.kw;
                const int j = rem - i * g.kw;
                dih = i * g.dh;
                diw = j * g.dw;
                off = c * g.sxc + dih * g.sxh + diw * g.sxw;
            }
            toff[buf * BK + tid] = off;
            tih[buf * BK + tid] = dih;
            tiw[buf * BK + tid] = diw;
        }
    };
    // registers <- im2col(x)[m, k0 + kk] (0 in the padding and past K) and S[r0 + n, k0 + kk] (0 past R, K)
    T xr[XPT], wr[WPT];
    auto gather = [&](int buf, int k0) {
#pragma unroll
        for (int s = 0; s < XPT; ++s) {
            const int kk = kk_first + 2 * s;
            const int ih = row.ih0 + tih[buf * BK + kk];
            const int iw = row.iw0 + tiw[buf * BK + kk];
            const bool inside = row.valid && static_cast<unsigned>(ih) < static_cast<unsigned>(g.H) &&
                                static_cast<unsigned>(iw) < static_cast<unsigned>(g.W);
            xr[s] = inside ? x[row.base + toff[buf * BK + kk]] : zero;
        }
#pragma unroll
        for (int s = 0; s < WPT; ++s) {
            const int e = tid + s * THREADS;
            const int r = r0 + e / BK, kidx = k0 + e % BK;
            wr[s] = (r < R && kidx < K) ? S[static_cast<long long>(r) * K + kidx] : zero;
        }
    };

#pragma unroll
    for (int nt = 0; nt < RC / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
    fill_table(0, 0);
    __syncthreads();
    gather(0, 0);
    int buf = 0;
    for (int k0 = 0; k0 < K; k0 += BK, buf ^= 1) {
#pragma unroll
        for (int s = 0; s < XPT; ++s) As[m_local * ALD + kk_first + 2 * s] = xr[s];
#pragma unroll
        for (int s = 0; s < WPT; ++s) {
            const int e = tid + s * THREADS;
            Ws[(e / BK) * ALD + e % BK] = wr[s];
        }
        fill_table(buf ^ 1, k0 + BK);  // the other buffer: last read by the gather two steps back
        __syncthreads();
        if (k0 + BK < K) gather(buf ^ 1, k0 + BK);  // in flight during the products below
        warp_product<T, EXACT, RC / 8>(
            acc, [&](int r, int c) { return As[(warp * 16 + r) * ALD + c]; },
            [&](int k, int n) { return Ws[n * ALD + k]; }, BK, lane);
        __syncthreads();
    }
}

}  // namespace conv

// y (strides sy*) = scale · im2col(x) Sᵀ U + bias, for RP >= R (RP a multiple of 16; of 64 above 64).
// Grid: (ceil(M / 64)); block: 128; dynamic shared memory: fwd_shared_bytes (forward.py).
template <typename T, int RP, bool EXACT>
__global__ void __launch_bounds__(conv::THREADS, 3)
sketched_conv2d_fwd(const T* __restrict__ x, const T* __restrict__ S, const T* __restrict__ U,
                    const T* __restrict__ bias, T* __restrict__ y, int C, int H, int W, int Ho, int Wo, int kh,
                    int kw, int sh, int sw, int ph, int pw, int dh, int dw, long long M, int R, int O,
                    long long sxn, long long sxc, long long sxh, long long sxw, long long syn, long long syc,
                    long long syh, long long syw, float scale) {
    using namespace conv;
    static_assert(RP % 16 == 0 && (RP <= 64 || RP % 64 == 0), "RP: a multiple of 16, of 64 above 64");
    constexpr int RC = RP < 64 ? RP : 64;  // Z columns per stage-1 pass, U rows per stage-2 step
    constexpr int ZLD = RP + Pad<T>::value;
    constexpr int ULD = BN + Pad<T>::value;
    extern __shared__ __align__(16) unsigned char smem[];
    T* Zs = reinterpret_cast<T*>(smem);                            // BM x RP (ZLD)
    unsigned char* work = smem + BM * ZLD * sizeof(T);             // stage 1: its workspace
    T* Us = reinterpret_cast<T*>(work);                            // stage 2: U tile (RC x ULD), reusing it

    const Geometry g{C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, M, sxn, sxc, sxh, sxw};
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long m0 = static_cast<long long>(blockIdx.x) * BM;
    const GatherRow row = gather_row(g, m0 + (tid & (BM - 1)));

    // Stage 1: Zs = im2col(x) Sᵀ, RC columns per pass
    for (int r0 = 0; r0 < RP; r0 += RC) {
        float acc[RC / 8][4];
        conv_rank_tile<T, RC, EXACT>(acc, x, S, g, R, r0, row, work);
#pragma unroll
        for (int nt = 0; nt < RC / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i)
                Zs[(warp * 16 + acc_row(lane, i)) * ZLD + r0 + nt * 8 + acc_col(lane, i)] = from_float<T>(acc[nt][i]);
    }
    __syncthreads();

    // Output offsets of this lane's two accumulator rows (pixels warp*16 + g and + g + 8)
    long long ybase[2];
    bool yvalid[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const long long m = m0 + warp * 16 + (lane >> 2) + 8 * h;
        yvalid[h] = m < M;
        long long n;
        int oh, ow;
        pixel_coords(yvalid[h] ? m : 0, Ho, Wo, n, oh, ow);
        ybase[h] = n * syn + oh * syh + ow * syw;
    }

    // Stage 2: y tile (BM x BN) = scale · Zs U[:, o0:o0+BN] + bias
    const T zero = from_float<T>(0.f);
    for (int o0 = 0; o0 < O; o0 += BN) {
        float acc[BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
        for (int r0 = 0; r0 < RP; r0 += RC) {
            for (int e = tid; e < RC * BN; e += THREADS) {
                const int rr = e / BN, oo = e - (e / BN) * BN;
                const int r = r0 + rr, o = o0 + oo;
                Us[rr * ULD + oo] = (r < R && o < O) ? U[static_cast<long long>(r) * O + o] : zero;
            }
            __syncthreads();
            warp_product<T, EXACT, BN / 8>(
                acc, [&](int r, int c) { return Zs[(warp * 16 + r) * ZLD + r0 + c]; },
                [&](int k, int n) { return Us[k * ULD + n]; }, RC, lane);
            __syncthreads();
        }
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int h = i >> 1;
                const int o = o0 + nt * 8 + acc_col(lane, i);
                if (yvalid[h] && o < O) {
                    float v = acc[nt][i] * scale;
                    if (bias != nullptr) v += to_float<T>(bias[o]);
                    y[ybase[h] + o * syc] = from_float<T>(v);
                }
            }
    }
}

// z[n, r, oh, ow] (strides sz*) = scale · Σ_κ im2col(x)[m, κ] S[r, κ] for r < R.
// Grid: (ceil(M / 64), ceil(R / RC)); block: 128; dynamic shared memory: rank_shared_bytes (forward.py).
template <typename T, int RC, bool EXACT>
__global__ void __launch_bounds__(conv::THREADS, 3)
conv_rank(const T* __restrict__ x, const T* __restrict__ S, T* __restrict__ z, int C, int H, int W, int Ho,
          int Wo, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw, long long M, int R,
          long long sxn, long long sxc, long long sxh, long long sxw, long long szn, long long szr,
          long long szh, long long szw, float scale) {
    using namespace conv;
    static_assert(RC == 16 || RC == 32 || RC == 64, "RC: 16, 32 or 64");
    extern __shared__ __align__(16) unsigned char smem[];  // the stage-1 workspace

    const Geometry g{C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, M, sxn, sxc, sxh, sxw};
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long m0 = static_cast<long long>(blockIdx.x) * BM;
    const int r0 = blockIdx.y * RC;
    const GatherRow row = gather_row(g, m0 + (tid & (BM - 1)));

    float acc[RC / 8][4];
    conv_rank_tile<T, RC, EXACT>(acc, x, S, g, R, r0, row, smem);

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const long long m = m0 + warp * 16 + (lane >> 2) + 8 * h;
        if (m >= M) continue;
        long long n;
        int oh, ow;
        pixel_coords(m, Ho, Wo, n, oh, ow);
        const long long base = n * szn + oh * szh + ow * szw;
#pragma unroll
        for (int nt = 0; nt < RC / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int i = 2 * h + e;
                const int r = r0 + nt * 8 + acc_col(lane, i);
                if (r < R) z[base + r * szr] = from_float<T>(acc[nt][i] * scale);
            }
    }
}

}  // namespace panther

#ifdef PANTHER_NVCC_CHECK
// Every variant the host code launches (forward.py, backward.py), for the compile check of CI.
#define FWD(T, RP, E) template __global__ void panther::sketched_conv2d_fwd<T, RP, E>(const T*, const T*, const T*, const T*, T*, int, int, int, int, int, int, int, int, int, int, int, int, int, long long, int, int, long long, long long, long long, long long, long long, long long, long long, long long, float);
#define RANK(T, RC, E) template __global__ void panther::conv_rank<T, RC, E>(const T*, const T*, T*, int, int, int, int, int, int, int, int, int, int, int, int, int, long long, int, long long, long long, long long, long long, long long, long long, long long, long long, float);
#define ALLRP(T, E) FWD(T, 16, E) FWD(T, 32, E) FWD(T, 64, E) FWD(T, 128, E) FWD(T, 192, E) FWD(T, 256, E) \
    RANK(T, 16, E) RANK(T, 32, E) RANK(T, 64, E)
ALLRP(float, true)
ALLRP(float, false)
ALLRP(__half, false)
ALLRP(__nv_bfloat16, false)
#endif  // PANTHER_NVCC_CHECK
