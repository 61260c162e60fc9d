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

// ---------------------------------------------------------------------------------------------------
// Halo kernels: a block takes a tile of TH x TW output pixels of one image (TH TW <= BM), loads the input
// halo those pixels read, CC channels at a time, into shared memory with coalesced loads, and builds the
// tensor-core A fragments of every tap (i, j) from there: each input element is read from global memory
// once per block and kh kw times from shared memory. Channel chunks are double-buffered: the next chunk's
// halo is loaded into registers and its S rows copied (cp.async, 16 bytes, where aligned) while the
// tensor cores work on this chunk; the cp.async loaders keep a ring of 2 to 4 buffers (flags:
// HALO_STAGES_SHIFT), up to 3 chunks in flight. Z (BM x RP) stays in registers until the epilogue.
//
// Halo of a chunk: CC x IH x IW, IH = (TH - 1) sh + (kh - 1) dh + 1, IW = (TW - 1) sw + (kw - 1) dw + 1,
// stored [c][ih][iw] (HS = IH IW elements a channel), then a block of zeros (HS elements) that the
// columns past the chunk's depth point at. im2col column kl = c kh kw + i kw + j of the chunk reads
// halo offset koff[kl] = c HS + i dh IW + j dw from pixel m's corner poff[m] = (m / TW) sh IW + (m % TW) sw.
// Loads: lanes run along the input's contiguous axis, iw (flag HALO_CHANNELS_INNER off: NCHW rows) or c
// (on: channels_last pixels); each thread loads at most HALO_PASSES elements of a chunk, or with
// LOAD = LOAD_ROWS8 (conv_rank_halo, with flag HALO_VECTOR: NCHW rows whose every 8-byte group lies
// wholly inside or outside the image, aligned) at most HALO_VPASSES groups of 8 bytes. LOAD = LOAD_ASYNC
// (flag HALO_ASYNC4/8/16): no registers in between; each thread issues at most ASYNC_PASSES cp.async
// copies of 4, 8 or 16 bytes per chunk, zero-filled outside the image, into a layout whose copies are
// aligned: NCHW rows widened to IWP (a multiple of the copy, from the aligned column iwa at or left of
// iw0), channels_last pixels of CCP channels (the chunk's CC, whole copies, and at least one zero slot).
// The loader is a template parameter, as two loaders in one kernel would cost registers. With LOAD_TAPS
// (flag HALO_TAPS; 16-bit types; S given as (R, kh, kw, C)) the halo is pixel-major whatever the loader
// and the chunk's depth runs tap by tap, CC (a multiple of 16) channels each: every A fragment (16 pixels x
// 16 channels of one tap) is one ldmatrix, as is every pair of B fragments. The host (forward.py:
// halo_plan) picks TH, TW, CC, the flags.
namespace conv {

constexpr int HALO_PASSES = 16;      // halo elements one thread loads per chunk, at most
constexpr int KC_MAX = 144;          // im2col depth of one chunk, CC kh kw rounded up to 16, at most
constexpr int HALO_CHANNELS_INNER = 1;  // flags: lanes along channels (channels_last input)
constexpr int S_VECTOR = 2;             // flags: S rows copied 16 bytes at a time (K, CC kh kw, S aligned)
constexpr int HALO_VECTOR = 4;          // flags: halo rows loaded 8 bytes at a time (with XVEC)
constexpr int HALO_VPASSES = HALO_PASSES / 2;  // 8-byte loads per thread and chunk (the same registers)
constexpr int HALO_ASYNC4 = 8, HALO_ASYNC8 = 16, HALO_ASYNC16 = 32;  // flags: cp.async copies of that many bytes
constexpr int HALO_ASYNC = HALO_ASYNC4 | HALO_ASYNC8 | HALO_ASYNC16;
constexpr int HALO_TAPS = 64;  // flags: the chunk's depth tap by tap from a pixel-major halo (LOAD_TAPS)
constexpr int ASYNC_PASSES = 8;  // cp.async copies one thread issues per chunk, at most
// flags bits 7-8: the cp.async loaders' ring of NS buffers, NS = 2 + their value, at most 4 (chunks held in
// shared memory at once: the one multiplied and up to NS - 1 in flight)
constexpr int HALO_STAGES_SHIFT = 7;
__host__ __device__ constexpr int halo_stages(int flags) {
    const int stages = 2 + ((flags >> HALO_STAGES_SHIFT) & 3);
    return stages < 4 ? stages : 4;
}
// flags (sketched_conv2d_fwd_halo): the epilogue's U tiles and bias copied by cp.async, 16 bytes at a time, one
// tile ahead of their products, the first while the main loop runs (O a whole number of copies, U and bias
// aligned to 16 bytes); else loaded through registers when their tile comes
constexpr int U_ASYNC = 512;
// halo loaders, the template parameter LOAD: element loads (0), or bits LOAD_ROWS8 (8-byte row loads),
// LOAD_ASYNC (cp.async copies), LOAD_TAPS (pixel-major, tap-major depth; with elements or copies)
constexpr int LOAD_ELEMENTS = 0, LOAD_ROWS8 = 1, LOAD_ASYNC = 2, LOAD_TAPS = 4;
// Blocks per SM the halo kernels are bound to: 3 of 64 pixels (168 registers), 2 of 128; 2 for the tap-major
// plan loading through registers (its register loader and ldmatrix fragments need ~200)
__host__ __device__ constexpr int halo_blocks(int bm, int load) {
    return (load & LOAD_TAPS) && !(load & LOAD_ASYNC) ? 2 : bm == 64 ? 3 : 2;
}

// The bits of a T in the low bits of a 32-bit word, and back.
template <typename T> __device__ __forceinline__ unsigned to_bits(T v) {
    if constexpr (sizeof(T) == 2) {
        return *reinterpret_cast<unsigned short*>(&v);
    } else {
        return *reinterpret_cast<unsigned*>(&v);
    }
}
template <typename T> __device__ __forceinline__ T from_bits(unsigned w) {
    T v;
    if constexpr (sizeof(T) == 2) {
        *reinterpret_cast<unsigned short*>(&v) = static_cast<unsigned short>(w);
    } else {
        *reinterpret_cast<unsigned*>(&v) = w;
    }
    return v;
}


// Two adjacent outputs in one store (p aligned to two elements).
template <typename T> __device__ __forceinline__ void store_pair(T* p, float a, float b) {
    if constexpr (sizeof(T) == 2) {
        *reinterpret_cast<unsigned*>(p) = pack2<T>(from_float<T>(a), from_float<T>(b));
    } else {
        *reinterpret_cast<float2*>(p) = make_float2(a, b);
    }
}

// Row length of the S chunk in shared memory: KC_MAX plus the padding that spreads rows over the banks.
template <typename T> struct HaloLd { static constexpr int value = KC_MAX + Pad<T>::value; };

// The block's tile and the chunk geometry derived from TH, TW, CC and the flags (the host derives the same:
// forward.py, halo_buffer). Halo element (channel c of the chunk, row a, column b) lies at shared offset
// c sc + a sa + b sb + base of a halo buffer; column offset `zero` reads 0 from every pixel's corner.
struct HaloTile {
    int TH, TW, CC, IH, IW, HS, KK, KC, KCP, HB;  // HB: elements of one halo buffer (a multiple of 8)
    int sc, sa, sb, base, zero;
    int VB, RW;  // LOAD_ASYNC: bytes per copy; the row width IWP (NCHW) or the pixel's channels CCP
    long long n;
    int oh0, ow0, ih0, iw0, iwa;  // iwa: LOAD_ASYNC, NCHW: the aligned column of the buffers' column 0
};

template <int LOAD>
__device__ __forceinline__ HaloTile halo_tile(const Geometry& g, int TH, int TW, int CC, int flags, int size) {
    HaloTile h;
    h.TH = TH;
    h.TW = TW;
    h.CC = CC;
    h.IH = (TH - 1) * g.sh + (g.kh - 1) * g.dh + 1;
    h.IW = (TW - 1) * g.sw + (g.kw - 1) * g.dw + 1;
    h.KK = g.kh * g.kw;
    h.KC = CC * h.KK;
    h.KCP = (h.KC + 15) / 16 * 16;
    h.VB = !(LOAD & LOAD_ASYNC) ? 0 : (flags & HALO_ASYNC16) ? 16 : (flags & HALO_ASYNC8) ? 8 : 4;
    const int V = h.VB / size;  // elements per copy (0: the loaders through registers)
    h.RW = h.IW;
    h.base = 0;
    if ((LOAD & LOAD_TAPS) || (V > 0 && (flags & HALO_CHANNELS_INNER))) {  // pixels of CCP channels: whole
                                                                            // 16-byte units, an odd count
        const int units = CC * size / 16 + 1;
        h.RW = (units + 1 - units % 2) * 16 / size;
        h.HS = h.IH * h.IW;
        h.sc = 1;
        h.sa = h.IW * h.RW;
        h.sb = h.RW;
        h.zero = CC;
        h.HB = (h.HS * h.RW + 7) / 8 * 8;
    } else {  // channel planes of IH rows; rows of RW = IW, or IWP for the copies
        if (V > 0) h.RW = (h.IW + 2 * V - 2) / V * V;
        h.HS = h.IH * h.RW;
        h.sc = h.HS;
        h.sa = h.RW;
        h.sb = 1;
        h.zero = CC * h.HS;
        h.HB = ((CC + 1) * h.HS + 7) / 8 * 8;
    }
    const int tiles_w = (g.Wo + TW - 1) / TW, tiles_h = (g.Ho + TH - 1) / TH;
    long long b = blockIdx.x;
    const int tw = static_cast<int>(b % tiles_w);
    b /= tiles_w;
    const int th = static_cast<int>(b % tiles_h);
    h.n = b / tiles_h;
    h.oh0 = th * TH;
    h.ow0 = tw * TW;
    h.ih0 = h.oh0 * g.sh - g.ph;
    h.iw0 = h.ow0 * g.sw - g.pw;
    h.iwa = h.iw0;
    if (V > 0 && !(LOAD & LOAD_TAPS) && !(flags & HALO_CHANNELS_INNER)) {  // floor to a multiple of V; the tile
                                                                             // starts base columns in
        h.iwa = h.iw0 - ((h.iw0 % V) + V) % V;
        h.base = h.iw0 - h.iwa;
    }
    return h;
}

// Byte offset of the forward's U_ASYNC buffers: past the tables (KC_MAX + BM ints) and the larger of the main
// loop's buffers (NS halo buffers, NS S buffers) and the epilogue's Z and U tile, rounded up to 16 bytes
// (forward.py: halo_shared_bytes).
template <typename T, int RP, int BM, int LOAD>
__device__ __forceinline__ int halo_u_offset(const HaloTile& h, int flags) {
    const int ns = (LOAD & LOAD_ASYNC) ? halo_stages(flags) : 2;
    const int loop = ns * (h.HB + RP * HaloLd<T>::value);
    const int epilogue = BM * (RP + Pad<T>::value) + RP * (BN + Pad<T>::value);
    const int bytes = (KC_MAX + BM) * 4 + static_cast<int>(sizeof(T)) * (loop > epilogue ? loop : epilogue);
    return (bytes + 15) / 16 * 16;
}

// Output pixel of row m of the block's tile: (oh, ow), and whether it is an output pixel at all.
__device__ __forceinline__ bool halo_pixel(const Geometry& g, const HaloTile& h, int m, int& oh, int& ow) {
    const int r = m / h.TW;
    oh = h.oh0 + r;
    ow = h.ow0 + (m - r * h.TW);
    return m < h.TH * h.TW && oh < g.Ho && ow < g.Wo;
}

// acc[mt] (this warp's m-tile mt: rows warp BM/4 + 16 mt + 0..15 of the tile; RP columns of Z) =
// im2col(x) S[0:RP]ᵀ over all of K. Every thread of the block calls it (it synchronises the block).
// Shared memory (`smem`, 16-byte aligned): koff [KC_MAX] ints, poff [BM] ints, the halo buffers
// (NS HB elements), the S buffers (NS x RP x HaloLd), NS = 2, or halo_stages(flags) for the cp.async loaders;
// forward.py: halo_shared_bytes.
template <typename T, int RP, bool EXACT, int BM, int LOAD>
__device__ __forceinline__ void halo_rank(float (&acc)[BM / 64][RP / 8][4], const T* __restrict__ x,
                                          const T* __restrict__ S, const Geometry& g, int R, const HaloTile& h,
                                          int flags, unsigned char* smem) {
    constexpr int MT = BM / 64;
    constexpr int NT = RP / 8;
    constexpr int LD = HaloLd<T>::value;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int K = g.C * h.KK;
    const T zero = from_float<T>(0.f);
    int* koff = reinterpret_cast<int*>(smem);
    constexpr bool ASYNC = (LOAD & LOAD_ASYNC) != 0, TAPS = (LOAD & LOAD_TAPS) != 0;
    const int NS = ASYNC ? halo_stages(flags) : 2;  // halo and S buffers: a ring of NS for the copies
    int* poff = koff + KC_MAX;
    T* Hs = reinterpret_cast<T*>(poff + BM);
    T* Ss = Hs + NS * h.HB;
    const bool vec_s = (flags & S_VECTOR) != 0;
    const bool cinner = (flags & HALO_CHANNELS_INNER) != 0;  // x channels_last: lanes along channels
    static_assert(!TAPS || (sizeof(T) == 2 && !EXACT), "LOAD_TAPS: 16-bit types (ldmatrix)");
    constexpr int VE = 16 / static_cast<int>(sizeof(T));  // elements of a 16-byte copy

    for (int k = tid; k < h.KCP; k += THREADS) {
        int off = h.zero;  // past the chunk's depth: zeros
        if (TAPS) {  // koff[t]: tap t's offset (t < KK)
            if (k < h.KK) off = (k / g.kw) * g.dh * h.sa + (k % g.kw) * g.dw * h.sb;
        } else if (k < h.KC) {
            const int c = k / h.KK;
            const int rem = k - c * h.KK;
            const int i = rem / g.kw;
            const int j = rem - i * g.kw;
            off = c * h.sc + i * g.dh * h.sa + j * g.dw * h.sb;
        }
        koff[k] = off;
    }
    for (int m = tid; m < BM; m += THREADS) {
        const int r = m / h.TW;
        poff[m] = h.base + (m < h.TH * h.TW ? r * g.sh * h.sa + (m - r * h.TW) * g.sw * h.sb : 0);
    }
    if (TAPS || (ASYNC && cinner)) {  // pixels of RW channels: channels CC.. of every pixel of every buffer
        const int pad = h.RW - h.CC;
        for (int e = tid; e < NS * h.HS * pad; e += THREADS) {
            const int p = e / pad;  // pixel of buffer p / HS
            Hs[(p / h.HS) * h.HB + (p % h.HS) * h.RW + h.CC + (e - p * pad)] = zero;
        }
    } else {
        for (int e = h.zero + tid; e < h.HB; e += THREADS)  // the zero block of every buffer
            for (int b = 0; b < NS; ++b) Hs[b * h.HB + e] = zero;
    }
    if (vec_s)  // columns KC..KCP of every S buffer, never copied into: zero
        for (int e = tid; e < NS * RP * (h.KCP - h.KC); e += THREADS) {
            const int row = e / (h.KCP - h.KC);
            Ss[row * LD + h.KC + (e - row * (h.KCP - h.KC))] = zero;
        }

    // This thread's halo elements: lanes along the inner (contiguous) axis, items of the outer one by passes.
    constexpr bool vec_x = (LOAD & LOAD_ROWS8) != 0;  // rows along iw in 8-byte groups (never with cinner)
    constexpr int XV = 8 / static_cast<int>(sizeof(T));  // elements of an 8-byte load
    const int lin = cinner ? h.CC : vec_x ? h.IW / XV : h.IW;
    const int outer = cinner ? h.HS : h.CC * h.IH;
    const int opp = THREADS / lin;  // outer items per pass
    const int inner = tid % lin;
    const int icol = vec_x ? inner * XV : inner;  // NCHW: this thread's (first) halo column
    const int passes = vec_x ? HALO_VPASSES : HALO_PASSES;
    int hq[HALO_PASSES];  // (c << 16 | ih) with iw = icol, or (ih << 16 | iw) with c = inner; -1: none
#pragma unroll
    for (int u = 0; u < HALO_PASSES; ++u) {
        const int o = tid / lin + u * opp;
        hq[u] = -1;
        if (!ASYNC && tid < opp * lin && o < outer && u < passes) {
            const int d = cinner ? h.IW : h.IH;
            const int hi = o / d;
            hq[u] = (hi << 16) | (o - hi * d);
        }
    }
    const T* __restrict__ xn = x + h.n * g.sxn;
    unsigned hr[HALO_PASSES];  // the elements' bits, or with vec_x two words per 8-byte load
    auto halo_coords = [&](int q, int& c, int& a, int& b) {
        if (cinner) {
            c = inner;
            a = q >> 16;
            b = q & 0xffff;
        } else {
            c = q >> 16;
            a = q & 0xffff;
            b = icol;
        }
    };
    // offset in xn of halo element q of the chunk at channel c0; -1 where it is zero (past C, or padding)
    auto halo_at = [&](int q, int c0) -> long long {
        int c, a, b;
        halo_coords(q, c, a, b);
        const int ih = h.ih0 + a, iw = h.iw0 + b;
        const bool inside = c0 + c < g.C && static_cast<unsigned>(ih) < static_cast<unsigned>(g.H) &&
                            static_cast<unsigned>(iw) < static_cast<unsigned>(g.W);
        return inside ? (c0 + c) * g.sxc + ih * g.sxh + iw * g.sxw : -1;
    };
    auto load_halo = [&](int c0) {
        if constexpr (vec_x) {  // an 8-byte group lies wholly inside or outside the image (the host's condition)
#pragma unroll
            for (int u = 0; u < HALO_VPASSES; ++u) {
                uint2 v;
                v.x = 0u;
                v.y = 0u;
                const long long at = hq[u] >= 0 ? halo_at(hq[u], c0) : -1;
                if (at >= 0) v = *reinterpret_cast<const uint2*>(xn + at);
                hr[2 * u] = v.x;
                hr[2 * u + 1] = v.y;
            }
        } else {
#pragma unroll
        for (int u = 0; u < HALO_PASSES; ++u) {
            T v = zero;
            const long long at = hq[u] >= 0 ? halo_at(hq[u], c0) : -1;
            if (at >= 0) v = xn[at];
            hr[u] = to_bits<T>(v);
        }
        }
    };
    auto store_halo = [&](int buf) {
        if constexpr (vec_x) {
#pragma unroll
            for (int u = 0; u < HALO_VPASSES; ++u)
                if (hq[u] >= 0) {
                    int c, a, b;
                    halo_coords(hq[u], c, a, b);
                    uint2 v;
                    v.x = hr[2 * u];
                    v.y = hr[2 * u + 1];
                    *reinterpret_cast<uint2*>(Hs + buf * h.HB + c * h.sc + a * h.sa + b) = v;
                }
        } else {
#pragma unroll
            for (int u = 0; u < HALO_PASSES; ++u)
                if (hq[u] >= 0) {
                    int c, a, b;
                    halo_coords(hq[u], c, a, b);
                    Hs[buf * h.HB + c * h.sc + a * h.sa + b * h.sb] = from_bits<T>(hr[u]);
                }
        }
    };
    // LOAD_ASYNC: this thread's copies, (p << 22 | a << 11 | b) with p the chunk's channel (NCHW) or the
    // pixel's copy (channels_last), a the row, b the row's copy (NCHW) or column; ad: where they land
    int aq[ASYNC_PASSES], ad[ASYNC_PASSES];
    const int V = h.VB / static_cast<int>(sizeof(T));
#pragma unroll
    for (int u = 0; u < ASYNC_PASSES; ++u) {
        aq[u] = -1;
        ad[u] = 0;
        if constexpr (ASYNC) {
            const int e = tid + u * THREADS;
            const int per = cinner ? h.CC / V : h.RW / V;  // copies per pixel / per row
            if (e < (cinner ? h.HS : h.CC * h.IH) * per) {
                const int b = e % per, rest = e / per;  // rest: pixel a IW + column, or row c IH + a
                if (cinner) {
                    aq[u] = b << 22 | (rest / h.IW) << 11 | (rest % h.IW);
                    ad[u] = rest * h.RW + b * V;
                } else {
                    aq[u] = (rest / h.IH) << 22 | (rest % h.IH) << 11 | b;
                    ad[u] = rest * h.RW + b * V;
                }
            }
        }
    }
    // the chunk at channel c0 -> halo buffer `buf` by cp.async copies of B = 4, 8 or 16 bytes (zeros outside
    // the image and past C). B is a plain argument, folded where the call inlines: NVRTC 12 and 13.0 take a
    // generic lambda (`auto` parameter) in device code for a host function unless -default-device is given.
    auto copy_halo = [&](int buf, int c0, int B) {
        T* Hb = Hs + buf * h.HB;
#pragma unroll
        for (int u = 0; u < ASYNC_PASSES; ++u) {
            const int q = aq[u];
            if (q < 0) continue;
            const int p = q >> 22, ih = h.ih0 + ((q >> 11) & 2047), b = q & 2047;
            long long at;
            bool inside;
            if (cinner) {
                const int iw = h.iw0 + b, c = c0 + p * V;
                inside = c < g.C && static_cast<unsigned>(ih) < static_cast<unsigned>(g.H) &&
                         static_cast<unsigned>(iw) < static_cast<unsigned>(g.W);
                at = ih * g.sxh + iw * g.sxw + c;
            } else {
                const int iw = h.iwa + b * V, c = c0 + p;  // W is a multiple of V: a copy is inside or outside
                inside = c < g.C && static_cast<unsigned>(ih) < static_cast<unsigned>(g.H) &&
                         static_cast<unsigned>(iw) < static_cast<unsigned>(g.W);
                at = c * g.sxc + ih * g.sxh + iw;
            }
            const T* src = inside ? xn + at : xn;
            const unsigned n = inside ? B : 0;
            if (B == 16) {
                cp_async_zfill<16>(Hb + ad[u], src, n);
            } else if (B == 8) {
                cp_async_zfill<8>(Hb + ad[u], src, n);
            } else {
                cp_async_zfill<4>(Hb + ad[u], src, n);
            }
        }
    };
    auto load_halo_async = [&](int buf, int c0) {
        if (h.VB == 16) {
            copy_halo(buf, c0, 16);
        } else if (h.VB == 8) {
            copy_halo(buf, c0, 8);
        } else {
            copy_halo(buf, c0, 4);
        }
    };
    // S[0:RP, c0 kh kw + 0..KCP) -> S buffer `buf` (zero past R, K and the chunk's depth). 16-byte copies
    // (cp.async, one group) when aligned, else loads through registers, RP / 4 in flight per thread.
    // TAPS: S is (R, kh, kw, C); the chunk's column t CC + cl is S[r, t, c0 + cl] (zero past R and C), in
    // 16-byte copies of VE channels where aligned (C a multiple of VE)
    auto load_s_taps = [&](int buf, int c0) {
        T* Sb = Ss + buf * RP * LD;
        if (vec_s) {
            const int per = h.CC / VE, row = h.KK * per;  // copies per tap, per row
            for (int e = tid; e < RP * row; e += THREADS) {
                const int r = e / row, t = (e - r * row) / per, v = e - r * row - t * per;
                const int c = c0 + v * VE;
                const bool in = r < R && c < g.C;
                cp_async16_zfill(Sb + r * LD + t * h.CC + v * VE,
                                 in ? S + static_cast<long long>(r) * K + static_cast<long long>(t) * g.C + c : S,
                                 in ? 16u : 0u);
            }
        } else {
            for (int e = tid; e < RP * h.KC; e += THREADS) {
                const int r = e / h.KC, kl = e - r * h.KC, t = kl / h.CC, c = c0 + kl - t * h.CC;
                Sb[r * LD + kl] = (r < R && c < g.C) ? S[static_cast<long long>(r) * K + static_cast<long long>(t) * g.C + c]
                                                     : zero;
            }
        }
    };
    auto load_s = [&](int buf, int c0) {
        if constexpr (TAPS) {
            load_s_taps(buf, c0);
            return;
        }
        T* Sb = Ss + buf * RP * LD;
        const long long k0 = static_cast<long long>(c0) * h.KK;
        if (vec_s) {
            const int nv = h.KC / VE;
            for (int e = tid; e < RP * nv; e += THREADS) {
                const int r = e / nv, kl = (e - r * nv) * VE;
                T* dst = Sb + r * LD + kl;
                if (r < R && k0 + kl < K) {
                    cp_async16(dst, S + static_cast<long long>(r) * K + k0 + kl);
                } else {
#pragma unroll
                    for (int v = 0; v < VE; ++v) dst[v] = zero;
                }
            }
        } else {
            for (int kl = lane; kl < h.KCP; kl += 32) {
                const long long kg = k0 + kl;
                T v[RP / 4];
#pragma unroll
                for (int i = 0; i < RP / 4; ++i) {
                    const int r = warp + 4 * i;
                    v[i] = (r < R && kl < h.KC && kg < K) ? S[static_cast<long long>(r) * K + kg] : zero;
                }
#pragma unroll
                for (int i = 0; i < RP / 4; ++i) Sb[(warp + 4 * i) * LD + kl] = v[i];
            }
        }
    };

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

    int p[MT][2];  // halo offsets of this lane's fragment rows g and g + 8 of each m-tile
    int pl[MT];    // TAPS: of the pixel whose row this lane gives ldmatrix (row l % 16 of each m-tile)
    const int gq = lane >> 2, tq = lane & 3;
    // acc += the products of the chunk in halo buffer Hb and S buffer Sb
    auto products = [&](const T* Hb, const T* Sb) {
        if constexpr (TAPS) {
            // A (16 pixels x 16 channels of tap t): lane l gives row l % 16 (pixel) at channel 8 (l / 16); B (16
            // columns of S x 16 channels): lane l gives row 8 (l / 16) + l % 8 at channel 8 ((l / 8) % 2)
#pragma unroll 1
            for (int t = 0; t < h.KK; ++t) {
                const T* At = Hb + koff[t] + 8 * (lane >> 4);
                const T* Bt = Sb + ((lane >> 4) * 8 + (lane & 7)) * LD + t * h.CC + 8 * ((lane >> 3) & 1);
                for (int cb = 0; cb < h.CC; cb += 16) {
                    unsigned a[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4<false>(a[mt], At + pl[mt] + cb);
#pragma unroll
                    for (int np = 0; np < NT / 2; ++np) {  // columns 16 np .. 16 np + 15 of S: tiles 2 np, 2 np + 1
                        unsigned q[4];
                        ldmatrix_x4<false>(q, Bt + np * 16 * LD + cb);
                        const unsigned b0[2] = {q[0], q[1]}, b1[2] = {q[2], q[3]};
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) {
                            Mma<T>::run(acc[mt][2 * np], a[mt], b0);
                            Mma<T>::run(acc[mt][2 * np + 1], a[mt], b1);
                        }
                    }
                }
            }
        } else if constexpr (EXACT) {
            for (int k = 0; k < h.KCP; ++k) {
                const int ko = koff[k];
                float b0[NT], b1[NT];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    b0[nt] = to_float<T>(Sb[(nt * 8 + 2 * tq) * LD + k]);
                    b1[nt] = to_float<T>(Sb[(nt * 8 + 2 * tq + 1) * LD + k]);
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const float a0 = to_float<T>(Hb[p[mt][0] + ko]), a1 = to_float<T>(Hb[p[mt][1] + ko]);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        acc[mt][nt][0] = fmaf(a0, b0[nt], acc[mt][nt][0]);
                        acc[mt][nt][1] = fmaf(a0, b1[nt], acc[mt][nt][1]);
                        acc[mt][nt][2] = fmaf(a1, b0[nt], acc[mt][nt][2]);
                        acc[mt][nt][3] = fmaf(a1, b1[nt], acc[mt][nt][3]);
                    }
                }
            }
        } else if constexpr (sizeof(T) == 2) {
            for (int k0 = 0; k0 < h.KCP; k0 += 16) {
                const int k00 = koff[k0 + 2 * tq], k01 = koff[k0 + 2 * tq + 1];
                const int k10 = koff[k0 + 2 * tq + 8], k11 = koff[k0 + 2 * tq + 9];
                unsigned a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    a[mt][0] = pack2<T>(Hb[p[mt][0] + k00], Hb[p[mt][0] + k01]);
                    a[mt][1] = pack2<T>(Hb[p[mt][1] + k00], Hb[p[mt][1] + k01]);
                    a[mt][2] = pack2<T>(Hb[p[mt][0] + k10], Hb[p[mt][0] + k11]);
                    a[mt][3] = pack2<T>(Hb[p[mt][1] + k10], Hb[p[mt][1] + k11]);
                }
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    // B (k x r) = S rows: two consecutive k of row r = nt 8 + g in one 32-bit word
                    const T* sr = Sb + (nt * 8 + gq) * LD + k0 + 2 * tq;
                    unsigned b[2];
                    b[0] = *reinterpret_cast<const unsigned*>(sr);
                    b[1] = *reinterpret_cast<const unsigned*>(sr + 8);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) Mma<T>::run(acc[mt][nt], a[mt], b);
                }
            }
        } else {
            for (int k0 = 0; k0 < h.KCP; k0 += 8) {
                const int ka = koff[k0 + tq], kb = koff[k0 + tq + 4];
                unsigned a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    a[mt][0] = to_tf32(Hb[p[mt][0] + ka]);
                    a[mt][1] = to_tf32(Hb[p[mt][1] + ka]);
                    a[mt][2] = to_tf32(Hb[p[mt][0] + kb]);
                    a[mt][3] = to_tf32(Hb[p[mt][1] + kb]);
                }
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const T* sr = Sb + (nt * 8 + gq) * LD + k0 + tq;
                    unsigned b[2];
                    b[0] = to_tf32(sr[0]);
                    b[1] = to_tf32(sr[4]);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) Mma<T>::run(acc[mt][nt], a[mt], b);
                }
            }
        }
    };
    auto fragment_rows = [&] {  // after a barrier: poff written
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            p[mt][0] = poff[warp * 16 * MT + mt * 16 + gq];
            p[mt][1] = poff[warp * 16 * MT + mt * 16 + gq + 8];
            pl[mt] = poff[warp * 16 * MT + mt * 16 + (lane & 15)];
        }
    };

    if constexpr (ASYNC) {
        // A ring of NS buffers: chunk i lands in buffer i % NS, copied NS - 1 chunks ahead of its products,
        // one group of copies (halo and S) per chunk, committed even when empty so that the count holds.
        for (int s = 0; s < NS - 1; ++s) {
            if (s * h.CC < g.C) {
                load_halo_async(s, s * h.CC);
                load_s(s, s * h.CC);
            }
            cp_async_commit();
        }
        __syncthreads();
        fragment_rows();
        for (int c0 = 0, i = 0; c0 < g.C; c0 += h.CC, ++i) {
            // chunk i's group done (at most NS - 2 younger ones in flight), and every thread past the
            // products of chunk i - 1, whose buffer the copies of chunk i + NS - 1 then take
            if (NS >= 4) {
                cp_async_wait<2>();
            } else if (NS == 3) {
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const int ahead = c0 + (NS - 1) * h.CC;
            if (ahead < g.C) {
                load_halo_async((i + NS - 1) % NS, ahead);
                load_s((i + NS - 1) % NS, ahead);
            }
            cp_async_commit();
            products(Hs + (i % NS) * h.HB, Ss + (i % NS) * RP * LD);
        }
        cp_async_wait<0>();  // only empty groups are left; then the caller may reuse shared memory
        __syncthreads();
    } else {
        load_halo(0);
        load_s(0, 0);
        if (vec_s) cp_async_commit();  // the S copies
        store_halo(0);
        if (vec_s) cp_async_wait<0>();
        __syncthreads();
        fragment_rows();
        int buf = 0;
        for (int c0 = 0; c0 < g.C; c0 += h.CC, buf ^= 1) {
            const bool more = c0 + h.CC < g.C;
            if (more) {  // in flight during the products below; buffer buf ^ 1 was last read before the barrier
                load_halo(c0 + h.CC);
                load_s(buf ^ 1, c0 + h.CC);
                if (vec_s) cp_async_commit();
            }
            products(Hs + buf * h.HB, Ss + buf * RP * LD);
            if (more) {
                store_halo(buf ^ 1);
                if (vec_s) cp_async_wait<0>();
            }
            __syncthreads();
        }
    }
}

}  // namespace conv

// y (strides sy*) = scale · im2col(x) Sᵀ U + bias through the halo tiles above, for RP >= R (16, 32, 64).
// Grid: (N ceil(Ho / TH) ceil(Wo / TW)); block: 128; dynamic shared memory: halo_shared_bytes (forward.py).
// TH TW <= BM; CC, flags: see halo_rank and forward.py's halo_plan; LOAD: LOAD_ELEMENTS or LOAD_ASYNC, either
// with LOAD_TAPS.
template <typename T, int RP, bool EXACT, int BM, int LOAD>
__global__ void __launch_bounds__(conv::THREADS, conv::halo_blocks(BM, LOAD))
sketched_conv2d_fwd_halo(const T* __restrict__ x, const T* __restrict__ S, const T* __restrict__ U,
                         const T* __restrict__ bias, T* __restrict__ y, int C, int H, int W, int Ho, int Wo,
                         int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw, long long M, int R, int O,
                         long long sxn, long long sxc, long long sxh, long long sxw, long long syn, long long syc,
                         long long syh, long long syw, float scale, int TH, int TW, int CC, int flags) {
    using namespace conv;
    static_assert(RP == 16 || RP == 32 || RP == 64, "RP: 16, 32 or 64");
    static_assert(BM == 64 || BM == 128, "BM: 64 or 128");
    static_assert(!(LOAD & LOAD_ROWS8), "the forward's halo loaders: elements, copies, either with taps");
    constexpr int MT = BM / 64;
    constexpr int ZLD = RP + Pad<T>::value;
    constexpr int ULD = BN + Pad<T>::value;
    extern __shared__ __align__(16) unsigned char smem[];
    const Geometry g{C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, M, sxn, sxc, sxh, sxw};
    const HaloTile h = halo_tile<LOAD>(g, TH, TW, CC, flags, static_cast<int>(sizeof(T)));
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    // U_ASYNC: two buffers of UB elements (a U tile, RP x ULD, then its bias, BN) past the main loop's and the
    // epilogue's shared memory (forward.py: halo_shared_bytes); tile 0's copies go out before the main loop
    constexpr int UB = RP * ULD + BN;
    constexpr int UV = 16 / static_cast<int>(sizeof(T));  // elements of a copy
    const bool u_async = (flags & U_ASYNC) != 0;
    T* Ub = reinterpret_cast<T*>(smem + halo_u_offset<T, RP, BM, LOAD>(h, flags));
    auto copy_u = [&](int buf, int o0) {  // U[0:RP, o0:o0+BN] and bias[o0:o0+BN] (zeros past R, O, or no bias)
        T* dst = Ub + buf * UB;
        for (int e = tid; e < (RP + 1) * (BN / UV); e += THREADS) {
            const int r = e / (BN / UV), o = o0 + (e - r * (BN / UV)) * UV;
            const bool in = r < RP ? r < R && o < O : bias != nullptr && o < O;
            const T* src = !in ? U : r < RP ? U + static_cast<long long>(r) * O + o : bias + o;
            cp_async16_zfill(dst + r * ULD + (o - o0), src, in ? 16u : 0u);
        }
    };
    if (u_async) {
        copy_u(0, 0);
        cp_async_commit();  // the oldest group: retired by the main loop's waits, or by the epilogue's
    }

    float acc[MT][RP / 8][4];
    halo_rank<T, RP, EXACT, BM, LOAD>(acc, x, S, g, R, h, flags, smem);

    // Z -> shared memory (rounded to T), over the halo region; the loop above ended with a barrier
    T* Zs = reinterpret_cast<T*>(smem + (KC_MAX + BM) * sizeof(int));  // BM x RP (ZLD)
    T* Us = Zs + BM * ZLD;                                            // RP x BN (ULD)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < RP / 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i)
                Zs[(warp * 16 * MT + mt * 16 + acc_row(lane, i)) * ZLD + nt * 8 + acc_col(lane, i)] =
                    from_float<T>(acc[mt][nt][i]);

    long long ybase[MT][2];
    bool yvalid[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            int oh, ow;
            yvalid[mt][hh] = halo_pixel(g, h, warp * 16 * MT + mt * 16 + (lane >> 2) + 8 * hh, oh, ow);
            ybase[mt][hh] = h.n * syn + oh * syh + ow * syw;
        }

    // channels contiguous in y (channels_last), O even, y aligned: columns o, o + 1 in one store
    const bool pair = syc == 1 && (O & 1) == 0 && ((syn | syh | syw) & 1) == 0 &&
                      (reinterpret_cast<unsigned long long>(y) & (2 * sizeof(T) - 1)) == 0;
    const T zero = from_float<T>(0.f);
    for (int o0 = 0, j = 0; o0 < O; o0 += BN, ++j) {
        const T* Ut = Us;  // this tile's U (RP x BN, ULD), and with U_ASYNC its bias after it
        __syncthreads();   // Zs written (first pass) / the previous tile's buffer read
        if (u_async) {
            if (o0 + BN < O) copy_u((j + 1) & 1, o0 + BN);  // into the buffer of tile j - 1
            cp_async_commit();
            cp_async_wait<1>();  // this tile's copies: every group but the one just committed
            Ut = Ub + (j & 1) * UB;
        } else {
            for (int e = tid; e < RP * BN; e += THREADS) {
                const int r = e / BN, oo = e - (e / BN) * BN;
                const int o = o0 + oo;
                Us[r * ULD + oo] = (r < R && o < O) ? U[static_cast<long long>(r) * O + o] : zero;
            }
        }
        __syncthreads();
        float acc2[BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc2[nt][i] = 0.f;
            warp_product<T, EXACT, BN / 8>(
                acc2, [&](int r, int c) { return Zs[(warp * 16 * MT + mt * 16 + r) * ZLD + c]; },
                [&](int k, int n) { return Ut[k * ULD + n]; }, RP, lane);
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int oo = nt * 8 + 2 * (lane & 3), o = o0 + oo;  // this lane's columns o, o + 1
                    if (!yvalid[mt][hh] || o >= O) continue;
                    float v0 = acc2[nt][2 * hh] * scale, v1 = acc2[nt][2 * hh + 1] * scale;
                    if (u_async) {  // the tile's bias (zeros without one)
                        v0 += to_float<T>(Ut[RP * ULD + oo]);
                        v1 += to_float<T>(Ut[RP * ULD + oo + 1]);
                    } else if (bias != nullptr) {
                        v0 += to_float<T>(bias[o]);
                        if (o + 1 < O) v1 += to_float<T>(bias[o + 1]);
                    }
                    if (pair) {
                        store_pair<T>(y + ybase[mt][hh] + o, v0, v1);
                    } else {
                        y[ybase[mt][hh] + o * syc] = from_float<T>(v0);
                        if (o + 1 < O) y[ybase[mt][hh] + (o + 1) * syc] = from_float<T>(v1);
                    }
                }
        }
    }
    if (u_async) cp_async_wait<0>();  // the last tile's group (empty)
}

// z[n, r, oh, ow] (strides sz*) = scale · Σ_κ im2col(x)[m, κ] S[r, κ] for r < R, through the halo tiles
// (the backward's dZ, a 1x1 convolution of g; its recomputed Z; dx, a convolution of dZ). Grid: (N
// ceil(Ho / TH) ceil(Wo / TW), ceil(R / RP)): blockIdx.y takes columns RP blockIdx.y .. of z; block and
// shared memory as sketched_conv2d_fwd_halo's. LOAD: the halo loader (LOAD_ROWS8 with the plan's flag
// HALO_VECTOR, LOAD_ASYNC with HALO_ASYNC*, else LOAD_ELEMENTS; with HALO_TAPS, LOAD_TAPS added).
template <typename T, int RP, bool EXACT, int BM, int LOAD>
__global__ void __launch_bounds__(conv::THREADS, conv::halo_blocks(BM, LOAD))
conv_rank_halo(const T* __restrict__ x, const T* __restrict__ S, T* __restrict__ z, int C, int H, int W, int Ho,
               int Wo, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw, long long M, int R,
               long long sxn, long long sxc, long long sxh, long long sxw, long long szn, long long szr,
               long long szh, long long szw, float scale, int TH, int TW, int CC, int flags) {
    using namespace conv;
    static_assert(RP == 16 || RP == 32 || RP == 64, "RP: 16, 32 or 64");
    static_assert(BM == 64 || BM == 128, "BM: 64 or 128");
    constexpr int MT = BM / 64;
    extern __shared__ __align__(16) unsigned char smem[];
    const Geometry g{C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, M, sxn, sxc, sxh, sxw};
    const HaloTile h = halo_tile<LOAD>(g, TH, TW, CC, flags, static_cast<int>(sizeof(T)));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r0 = static_cast<int>(blockIdx.y) * RP;  // this block's columns r0 .. r0 + RP of z: rows of S
    S += static_cast<long long>(r0) * C * kh * kw;
    z += r0 * szr;
    R = R - r0 < RP ? R - r0 : RP;

    float acc[MT][RP / 8][4];
    halo_rank<T, RP, EXACT, BM, LOAD>(acc, x, S, g, R, h, flags, smem);
    // channels contiguous in z (pixel-major), R even, z aligned: columns r, r + 1 in one store
    const bool pair = szr == 1 && (R & 1) == 0 && ((szn | szh | szw) & 1) == 0 &&
                      (reinterpret_cast<unsigned long long>(z) & (2 * sizeof(T) - 1)) == 0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            int oh, ow;
            if (!halo_pixel(g, h, warp * 16 * MT + mt * 16 + (lane >> 2) + 8 * hh, oh, ow)) continue;
            const long long base = h.n * szn + oh * szh + ow * szw;
#pragma unroll
            for (int nt = 0; nt < RP / 8; ++nt) {
                const int r = nt * 8 + 2 * (lane & 3);  // this lane's columns r, r + 1
                if (r >= R) continue;
                const float v0 = acc[mt][nt][2 * hh] * scale, v1 = acc[mt][nt][2 * hh + 1] * scale;
                if (pair) {
                    store_pair<T>(z + base + r, v0, v1);
                } else {
                    z[base + r * szr] = from_float<T>(v0);
                    if (r + 1 < R) z[base + (r + 1) * szr] = from_float<T>(v1);
                }
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
#define HALO_FWD(T, RP, E, BM, LD) \
    template __global__ void panther::sketched_conv2d_fwd_halo<T, RP, E, BM, LD>(const T*, const T*, const T*, const T*, T*, int, int, int, int, int, int, int, int, int, int, int, int, int, long long, int, int, long long, long long, long long, long long, long long, long long, long long, long long, float, int, int, int, int);
#define HALO_RANK(T, RP, E, BM, LD) \
    template __global__ void panther::conv_rank_halo<T, RP, E, BM, LD>(const T*, const T*, T*, int, int, int, int, int, int, int, int, int, int, int, int, int, long long, int, long long, long long, long long, long long, long long, long long, long long, long long, float, int, int, int, int);
#define HALO(T, RP, E, BM) HALO_FWD(T, RP, E, BM, 0) HALO_FWD(T, RP, E, BM, 2) \
    HALO_RANK(T, RP, E, BM, 0) HALO_RANK(T, RP, E, BM, 1) HALO_RANK(T, RP, E, BM, 2)
#define TAPS(T, RP, BM) HALO_FWD(T, RP, false, BM, 4) HALO_FWD(T, RP, false, BM, 6) \
    HALO_RANK(T, RP, false, BM, 4) HALO_RANK(T, RP, false, BM, 6)
#define ALLTAPS(T) TAPS(T, 16, 64) TAPS(T, 32, 64) TAPS(T, 64, 64) TAPS(T, 16, 128) TAPS(T, 32, 128) TAPS(T, 64, 128)
#define ALLHALO(T, E) HALO(T, 16, E, 64) HALO(T, 32, E, 64) HALO(T, 64, E, 64) \
    HALO(T, 16, E, 128) HALO(T, 32, E, 128) HALO(T, 64, E, 128)
ALLHALO(float, true)
ALLHALO(float, false)
ALLHALO(__half, false)
ALLHALO(__nv_bfloat16, false)
ALLTAPS(__half)
ALLTAPS(__nv_bfloat16)
ALLRP(float, true)
ALLRP(float, false)
ALLRP(__half, false)
ALLRP(__nv_bfloat16, false)
#endif  // PANTHER_NVCC_CHECK
