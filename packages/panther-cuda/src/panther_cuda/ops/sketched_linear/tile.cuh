// Block-level tiles of the sketched linear kernels: a BM x BN fp32 accumulator per block of NT threads,
// filled BK at a time from shared-memory tiles, on the tensor cores (Mma<T>) or, for exact float32, FFMA.
// The shape is a template argument, Tile<BM, BN, BK, WARPS_M, WARPS_N, STAGES> (limits.py's CONFIGS);
// outputs of the input dtype leave through store_tile (staged in shared memory, 16-byte stores).
//
// Every product of the op is C (M x N) = Σ_k a(m, k) b(k, n) with operands `a` and `b` that read the
// tensors in place (Side / Stack: the (L, ., k) weights indexed by column c = l k + j; Dense; Transposed);
// gemm() loads their tiles into shared memory, 16 bytes at a time where sizes and pointers are aligned,
// zero outside the M x K and K x N edges, so every size is covered by the same loop. Included by
// forward.cu and backward.cu (NVRTC: -I this folder).
#pragma once

#include "panther_cuda/common.cuh"

namespace panther {
namespace sl {

// The tile shape of a kernel instance, a template argument of every kernel (limits.py's TileConfig holds
// the same table for the host): a block of WARPS_M x WARPS_N warps computes a BM x BN tile, BK deep per
// shared-memory step, with STAGES steps of operand tiles in a cp.async ring. LDA, LDB, the tiles' sizes and
// the staged output's rows (LDC) are multiples of 16 bytes, so every row of every tile starts aligned.
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_> struct Tile {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
    static constexpr int NT = 32 * WARPS_M * WARPS_N;  // threads of a block
    static constexpr int PAD = 8;                      // elements added to each shared row
    static constexpr int LDA = BK + PAD;               // As: BM x BK, row-major
    static constexpr int LDB = BN + PAD;               // Bs: BK x BN, row-major
    // gemm() stores each tile along its operand's contiguous direction: a ROW_CONTIGUOUS operand's tile
    // transposed (A: BK x BM, leading dimension LDA_T; B: BN x BK, LDB_T), so a stage holds the larger of
    // the two layouts.
    static constexpr int LDA_T = BM + PAD;
    static constexpr int LDB_T = BK + PAD;
    static constexpr int STAGE_A = BM * LDA > BK * LDA_T ? BM * LDA : BK * LDA_T;
    static constexpr int STAGE_B = BK * LDB > BN * LDB_T ? BK * LDB : BN * LDB_T;
    static constexpr int GEMM_ELEMENTS = STAGES * (STAGE_A + STAGE_B);
    static constexpr int LDC = BN + PAD;  // store_tile's BM x BN output tile, staged in the operands' memory
    static constexpr int SHARED_ELEMENTS = GEMM_ELEMENTS > BM * LDC ? GEMM_ELEMENTS : BM * LDC;
    // The fused forward: one A and two B tiles, then H (BM rows of R rounded up to BN, plus PAD).
    static constexpr int FUSED_TILE_ELEMENTS = BM * LDA + 2 * BK * LDB;
    static_assert(STAGES >= 2 && BK % 16 == 0 && BM % (16 * WARPS_M) == 0 && BN % (16 * WARPS_N) == 0,
                  "a tile is whole mma tiles per warp, at least two stages");
};

// Blocks per SM that the registers must allow (the tiled kernels' launch bounds): for 16-bit operands at most
// 128 registers a thread, so that two 256-thread or four 128-thread blocks stay resident and one block's copies
// overlap another's products; float32 tiles (TF32 fragments converted in registers, or FFMA) keep the registers
// they would otherwise spill.
template <typename T, typename C> constexpr int MIN_BLOCKS = sizeof(T) == 2 && C::NT <= 512 ? 512 / C::NT : 1;

constexpr int SUM_NT = 128;  // threads of a block of the kernels that sum fp32 shares (no tiles)

// The share-summing kernels take runs of W consecutive elements a thread: W = 4 (16-byte loads of the fp32
// shares; the caller checks alignment) or 1. add_run adds the run at p to acc; store_run writes scale acc to p,
// rounded once, in one store where W = 4.
template <int W> __device__ __forceinline__ void add_run(float (&acc)[W], const float* __restrict__ p) {
    if constexpr (W == 4) {
        const float4 v = *reinterpret_cast<const float4*>(p);
        acc[0] += v.x;
        acc[1] += v.y;
        acc[2] += v.z;
        acc[3] += v.w;
    } else {
        acc[0] += *p;
    }
}
template <typename T, int W>
__device__ __forceinline__ void store_run(T* __restrict__ p, const float (&acc)[W], float scale) {
    if constexpr (W == 1) {
        *p = from_float<T>(acc[0] * scale);
    } else if constexpr (sizeof(T) == 4) {
        *reinterpret_cast<float4*>(p) = float4{acc[0] * scale, acc[1] * scale, acc[2] * scale, acc[3] * scale};
    } else {
        *reinterpret_cast<uint2*>(p) = uint2{pack2(from_float<T>(acc[0] * scale), from_float<T>(acc[1] * scale)),
                                             pack2(from_float<T>(acc[2] * scale), from_float<T>(acc[3] * scale))};
    }
}

__device__ __forceinline__ long long min_ll(long long a, long long b) { return a < b ? a : b; }

// Elements of T in 16 bytes: the width of one vector load.
template <typename T> struct Vec {
    static constexpr int N = 16 / static_cast<int>(sizeof(T));
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<unsigned long long>(p) & 15) == 0; }
// p at a multiple of four elements of T: a run of four is one store
template <typename T> __device__ __forceinline__ bool aligned_run(const T* p) {
    return reinterpret_cast<unsigned long long>(p) % (4 * sizeof(T)) == 0;
}

// Fill the ROWS x COLS tile `s` (leading dimension ld) with f(r0 + r, c0 + c), zero where r0 + r >= nr
// or c0 + c >= nc. Consecutive threads take consecutive elements along the direction in which the
// operand is contiguous (F::ROW_CONTIGUOUS: down its rows, e.g. a transposed view; else along them),
// and the tile is stored that way: element (r, c) at s[r ld + c], or s[c ld + r] when ROW_CONTIGUOUS.
// vec (f.vec_ok(), the same for the whole block): runs of Vec<T>::N elements there, starting at
// multiples of Vec<T>::N, are 16-byte aligned in memory: one 16-byte load each, the scalar path for a
// run cut by an edge; r0 and c0 are multiples of Vec<T>::N (tile origins and BK-aligned row shares).
// ASYNC: whole runs of an operand contiguous along the tile's rows go by cp.async (the caller commits and
// waits); the rest the thread loads and stores itself, as in the synchronous path.
template <typename T, int NT, int ROWS, int COLS, bool ASYNC = false, typename F>
__device__ __forceinline__ void fill_tile(T* s, int ld, const F& f, bool vec, long long r0, long long c0, long long nr,
                                          long long nc) {
    constexpr bool RC = F::ROW_CONTIGUOUS;
    if (vec) {
        constexpr int V = Vec<T>::N;
        static_assert((RC ? ROWS : COLS) % V == 0 && COLS % V == 0, "tiles are whole runs of 16 bytes");
        constexpr int RUNS = ROWS * COLS / V;
        for (int run = threadIdx.x; run < RUNS; run += NT) {
            const int r = RC ? run % (ROWS / V) * V : run / (COLS / V);
            const int c = RC ? run / (ROWS / V) : run % (COLS / V) * V;
            const long long gr = r0 + r, gc = c0 + c;
            T* dst = s + (RC ? c * ld + r : r * ld + c);  // rows of the shared tiles are 16-byte aligned
            const bool whole = RC ? (gr + V <= nr && gc < nc) : (gr < nr && gc + V <= nc);
            if (ASYNC && whole) {
                cp_async16(dst, f.ptr(gr, gc));
                continue;
            }
            uint4 u;
            T* v = reinterpret_cast<T*>(&u);
            if (whole) {
                u = *reinterpret_cast<const uint4*>(f.ptr(gr, gc));
            } else {
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    const long long er = RC ? gr + e : gr, ec = RC ? gc : gc + e;
                    v[e] = (er < nr && ec < nc) ? *f.ptr(er, ec) : from_float<T>(0.0f);
                }
            }
            *reinterpret_cast<uint4*>(dst) = u;
        }
    } else {
        for (int idx = threadIdx.x; idx < ROWS * COLS; idx += NT) {
            const int r = RC ? idx % ROWS : idx / COLS;
            const int c = RC ? idx / ROWS : idx % COLS;
            const long long gr = r0 + r, gc = c0 + c;
            s[RC ? c * ld + r : r * ld + c] = (gr < nr && gc < nc) ? *f.ptr(gr, gc) : from_float<T>(0.0f);
        }
    }
}

// One operand's tile loads in the ring of gemm(), with the address arithmetic done once: each run of
// Vec<T>::N elements that a thread copies (fill_tile's runs, for the tile at (r0, c0)) keeps its source
// address, its place in the tile and how many of its elements lie inside the edge that is not K; the tile
// `dk` further along K (along its columns when K_COLS: the A operand; its rows otherwise: B) is `dk * step`
// elements further, `step` the operand's constant stride along K (F::col_step() / row_step()). Every run
// goes by one cp.async whose source size stops at the edges (the rest of the 16 bytes zero), so edges
// cost no branch. For operands whose runs are 16-byte aligned (vec_ok(): a run cut by an edge starts
// aligned too) and whose stride along K is the same everywhere (usable()); gemm() fills the tiles of the
// others with fill_tile.
template <typename T, int NT, int ROWS, int COLS, bool K_COLS, typename F> struct TileCursor {
    static constexpr bool RC = F::ROW_CONTIGUOUS;
    static constexpr bool ALONG_K = RC != K_COLS;  // a run's V elements lie along K
    static constexpr int V = Vec<T>::N, RUNS = ROWS * COLS / V, PER = (RUNS + NT - 1) / NT;
    static_assert((RC ? ROWS : COLS) % V == 0 && COLS % V == 0, "tiles are whole runs of 16 bytes");
    const T* src[PER];  // run i's source at dk = 0
    int dst[PER];       // run i's first element in the tile
    int kpos[PER];      // run i's first index along K, from the tile's origin
    int inside[PER];    // run i's elements inside the edge that is not K (0 .. V)
    long long step;

    __device__ __forceinline__ static bool usable(const F& f) {
        return f.vec_ok() && (K_COLS ? f.col_step() : f.row_step()) >= 0;
    }

    __device__ __forceinline__ static int clamp_run(long long n) { return n < 0 ? 0 : n > V ? V : static_cast<int>(n); }

    __device__ __forceinline__ TileCursor(const F& f, int ld, long long r0, long long c0, long long nr, long long nc) {
        step = K_COLS ? f.col_step() : f.row_step();
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int run = threadIdx.x + i * NT;
            const int r = RC ? run % (ROWS / V) * V : run / (COLS / V);
            const int c = RC ? run / (ROWS / V) : run % (COLS / V) * V;
            const long long gr = r0 + r, gc = c0 + c;
            dst[i] = RC ? c * ld + r : r * ld + c;
            kpos[i] = K_COLS ? c : r;
            // across the edge that is not K: a run along it counts its elements inside, a run across it is all in or out
            const long long room = K_COLS ? nr - gr : nc - gc;
            inside[i] = run >= RUNS ? 0 : ALONG_K ? (room > 0 ? V : 0) : clamp_run(room);
            src[i] = inside[i] > 0 ? f.ptr(gr, gc) : f.ptr(r0, c0);
        }
    }

    // The tile moved dk along K into s; k0 the tile's origin along K at dk = 0, nk the K edge. shift: elements
    // added to every source address, to read another operand of the same layout and edges (gemm_terms()).
    __device__ __forceinline__ void load(T* s, long long dk, long long k0, long long nk, long long shift = 0) const {
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            if (RUNS % NT != 0 && threadIdx.x + i * NT >= RUNS) continue;
            const long long room = nk - (k0 + dk + kpos[i]);
            const int kin = ALONG_K ? clamp_run(room) : (room > 0 ? V : 0);
            const int n = kin < inside[i] ? kin : inside[i];
            cp_async16_zfill(s + dst[i], n > 0 ? src[i] + shift + dk * step : src[i],
                             static_cast<unsigned>(n * sizeof(T)));
        }
    }
};

template <typename T, bool EXACT, typename C> struct Acc;

// Tensor cores: warp w owns rows (w / WARPS_N) WM .. +WM and columns (w % WARPS_N) WN .. +WN of the tile
// (WM = BM / WARPS_M, WN = BN / WARPS_N), as MI x NI mma tiles of 16 x 8.
template <typename T, typename C> struct Acc<T, false, C> {
    static constexpr int BM = C::BM, BN = C::BN, BK = C::BK, WM = BM / C::WARPS_M, WN = BN / C::WARPS_N;
    static constexpr int MI = WM / 16, NI = WN / 8;
    float d[MI][NI][4];

    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int i = 0; i < 4; ++i) d[mi][ni][i] = 0.0f;
    }

    // d += As Bs for the BM x BK tile As (leading dimension lda) and the BK x BN tile Bs (ldb); AT / BT:
    // the tile is stored transposed (As BK x BM, Bs BN x BK).
    template <bool AT = false, bool BT = false>
    __device__ __forceinline__ void step(const T* As, int lda, const T* Bs, int ldb) {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        const int wm = warp / C::WARPS_N * WM, wn = warp % C::WARPS_N * WN;
#pragma unroll
        for (int kk = 0; kk < BK; kk += Mma<T>::K) {
            unsigned a[MI][4], b[NI][2];
            if constexpr (sizeof(T) == 2) {
                // ldmatrix: lane l addresses row l % 8 of matrix j = l / 8; a[0..3] are the A fragment's
                // quarters (m 0-7 | 8-15) x (k 0-7 | 8-15), m fastest; b[ni][0], b[ni][1], b[ni + 1][0],
                // b[ni + 1][1] the B blocks (k 0-7 | 8-15) x (n block ni | ni + 1), k fastest. A tile stored
                // row-major in the fragment's sense (A: rows m, B: rows n) loads plain, else .trans.
                const int j = lane >> 3, r = lane & 7;
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    const int m = wm + mi * 16 + (j & 1) * 8, k = kk + (j >> 1) * 8;
                    ldmatrix_x4<AT>(a[mi], AT ? As + (k + r) * lda + m : As + (m + r) * lda + k);
                }
                static_assert(NI % 2 == 0, "B fragments load two 8-column blocks at a time");
#pragma unroll
                for (int ni = 0; ni < NI; ni += 2) {
                    unsigned q[4];
                    const int k = kk + (j & 1) * 8, n = wn + ni * 8 + (j >> 1) * 8;
                    ldmatrix_x4<!BT>(q, BT ? Bs + (n + r) * ldb + k : Bs + (k + r) * ldb + n);
                    b[ni][0] = q[0];
                    b[ni][1] = q[1];
                    b[ni + 1][0] = q[2];
                    b[ni + 1][1] = q[3];
                }
            } else {
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    const int m = wm + mi * 16;
                    load_a<T>(a[mi], [&](int r, int c) { return AT ? As[(kk + c) * lda + m + r] : As[(m + r) * lda + kk + c]; },
                              lane);
                }
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) {
                    const int n = wn + ni * 8;
                    load_b<T>(b[ni], [&](int r, int c) { return BT ? Bs[(n + c) * ldb + kk + r] : Bs[(kk + r) * ldb + n + c]; },
                              lane);
                }
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) Mma<T>::run(d[mi][ni], a[mi], b[ni]);
        }
    }

    // f(row, col, value) for each element this thread holds, in tile coordinates.
    template <typename F> __device__ __forceinline__ void each(F f) const {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        const int wm = warp / C::WARPS_N * WM, wn = warp % C::WARPS_N * WN;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    f(wm + mi * 16 + acc_row(lane, i), wn + ni * 8 + acc_col(lane, i), d[mi][ni][i]);
    }
};

// Exact float32 (matmul precision "highest"): FFMA, thread t owns rows (t / CT) * TM .. +TM and
// columns (t % CT) * TN .. +TN of the tile.
template <typename T, typename C> struct Acc<T, true, C> {
    static_assert(sizeof(T) == 4, "exact products are for float32; 16-bit types use the tensor cores");
    static constexpr int BM = C::BM, BN = C::BN, BK = C::BK, NT = C::NT;
    static constexpr int TN = 8, CT = BN / TN, TM = BM / (NT / CT);
    static_assert(CT * (NT / CT) == NT && TM * (NT / CT) == BM, "FFMA thread tiles must cover the block tile");
    float d[TM][TN];

    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) d[i][j] = 0.0f;
    }

    template <bool AT = false, bool BT = false>
    __device__ __forceinline__ void step(const T* As, int lda, const T* Bs, int ldb) {
        const int r0 = (threadIdx.x / CT) * TM, c0 = (threadIdx.x % CT) * TN;
#pragma unroll 4
        for (int kk = 0; kk < BK; ++kk) {
            float a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) a[i] = to_float(AT ? As[kk * lda + r0 + i] : As[(r0 + i) * lda + kk]);
#pragma unroll
            for (int j = 0; j < TN; ++j) b[j] = to_float(BT ? Bs[(c0 + j) * ldb + kk] : Bs[kk * ldb + c0 + j]);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) d[i][j] = fmaf(a[i], b[j], d[i][j]);
        }
    }

    template <typename F> __device__ __forceinline__ void each(F f) const {
        const int r0 = (threadIdx.x / CT) * TM, c0 = (threadIdx.x % CT) * TN;
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) f(r0 + i, c0 + j, d[i][j]);
    }
};

struct NoHook {
    template <typename T> __device__ __forceinline__ void operator()(const T*, const T*) const {}
};

// The ring of gemm(): load(stage, k0) fills stage `stage` with the tiles of step k0 (k0 < K; the copies a
// thread issues form its group of the step), called once per step, in the order of the steps.
template <typename C, bool AT, bool BT, typename T, typename A, typename Load, typename Hook>
__device__ __forceinline__ void ring(A& acc, T* As, T* Bs, long long k_begin, long long K, const Load& load,
                                     const Hook& hook) {
    constexpr int S = C::STAGES, SA = C::STAGE_A, SB = C::STAGE_B, BK = C::BK;
    constexpr int lda = AT ? C::LDA_T : C::LDA, ldb = BT ? C::LDB_T : C::LDB;
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        const long long k0 = k_begin + static_cast<long long>(s) * BK;
        if (k0 < K) load(s, k0);
        cp_async_commit();  // one group per step, empty past K: the wait below counts steps
    }
    int stage = 0;
    for (long long k0 = k_begin; k0 < K; k0 += BK) {
        cp_async_wait<S - 2>();  // this step's group is in (only the S - 2 later ones may still fly)
        __syncthreads();
        const long long next = k0 + static_cast<long long>(S - 1) * BK;
        if (next < K) load(stage == 0 ? S - 1 : stage - 1, next);
        cp_async_commit();
        acc.template step<AT, BT>(As + stage * SA, lda, Bs + stage * SB, ldb);
        hook(As + stage * SA, Bs + stage * SB);
        stage = stage == S - 1 ? 0 : stage + 1;
    }
    cp_async_wait<0>();
    __syncthreads();
}

// gemm() with every tile filled by fill_tile (operands that the cursors do not take).
template <typename T, bool EXACT, typename C, typename FA, typename FB, typename Hook = NoHook>
__device__ __forceinline__ void gemm_filled(Acc<T, EXACT, C>& acc, T* As, T* Bs, const FA& fa, const FB& fb,
                                            long long m0, long long n0, long long M, long long N, long long K,
                                            long long k_begin = 0, Hook hook = {}) {
    constexpr int SA = C::STAGE_A, SB = C::STAGE_B, BM = C::BM, BN = C::BN, BK = C::BK, NT = C::NT;
    constexpr bool AT = FA::ROW_CONTIGUOUS, BT = FB::ROW_CONTIGUOUS;  // tiles stored transposed
    constexpr int lda = AT ? C::LDA_T : C::LDA, ldb = BT ? C::LDB_T : C::LDB;
    const bool va = fa.vec_ok(), vb = fb.vec_ok();
    ring<C, AT, BT>(acc, As, Bs, k_begin, K, [&](int stage, long long k0) {
        fill_tile<T, NT, BM, BK, true>(As + stage * SA, lda, fa, va, m0, k0, M, K);
        fill_tile<T, NT, BK, BN, true>(Bs + stage * SB, ldb, fb, vb, k0, n0, K, N);
    }, hook);
}

// acc += Σ_{k_begin <= k < K} a(m0 + r, k) b(k, n0 + c) for the tile at (m0, n0) of an M x N product,
// through a ring of STAGES pairs of shared tiles As (STAGES x STAGE_A) and Bs (STAGES x STAGE_B): step i
// reads stage i % STAGES while the copies (cp.async) of the next STAGES - 1 steps are in flight. One
// barrier per step: after it, every thread has left step i - 1, so its stage takes step i + STAGES - 1's
// tiles. The tiles come through TileCursors where both operands allow them (every long reduction of the
// op: its addresses are computed once, then advanced), else through fill_tile. hook(As, Bs) sees each
// step's tiles (for a sum taken on the side). Every thread of the block must call it (it synchronises);
// on return no copy is in flight and the whole ring is free to reuse.
template <typename T, bool EXACT, typename C, typename FA, typename FB, typename Hook = NoHook>
__device__ __forceinline__ void gemm(Acc<T, EXACT, C>& acc, T* As, T* Bs, const FA& fa, const FB& fb, long long m0,
                                     long long n0, long long M, long long N, long long K, long long k_begin = 0,
                                     Hook hook = {}) {
    constexpr int SA = C::STAGE_A, SB = C::STAGE_B, BM = C::BM, BN = C::BN, BK = C::BK, NT = C::NT;
    constexpr bool AT = FA::ROW_CONTIGUOUS, BT = FB::ROW_CONTIGUOUS;  // tiles stored transposed
    constexpr int lda = AT ? C::LDA_T : C::LDA, ldb = BT ? C::LDB_T : C::LDB;
    using CursorA = TileCursor<T, NT, BM, BK, true, FA>;
    using CursorB = TileCursor<T, NT, BK, BN, false, FB>;
    if (CursorA::usable(fa) && CursorB::usable(fb)) {  // the same for the whole block
        const CursorA ca(fa, lda, m0, k_begin, M, K);
        const CursorB cb(fb, ldb, k_begin, n0, K, N);
        ring<C, AT, BT>(acc, As, Bs, k_begin, K, [&](int stage, long long k0) {
            ca.load(As + stage * SA, k0 - k_begin, k_begin, K);
            cb.load(Bs + stage * SB, k0 - k_begin, k_begin, K);
        }, hook);
    } else {
        gemm_filled(acc, As, Bs, fa, fb, m0, n0, M, N, K, k_begin, hook);
    }
}

// Elements of T from p to q (both 16-byte aligned): how far a second operand of the same layout lies from a first.
template <typename T> __device__ __forceinline__ long long elements_between(const T* p, const T* q) {
    return static_cast<long long>(reinterpret_cast<unsigned long long>(q) - reinterpret_cast<unsigned long long>(p)) /
           static_cast<long long>(sizeof(T));
}

// acc += Σ_{t < n_terms} a_t b_t over K for the tile at (m0, n0) of an M x N product, the operands of term t
// being op_a(t) and op_b(t): operands of one layout and the same edges, in different places (the halves of H and
// the weights [U1; S2] in the forward, the 2L terms of dH Aᵀ in the backward). Where every term's operands take
// the cursors, one ring walks all the terms' steps (each term ceil(K / BK) steps, zero past K) with term 0's
// cursors shifted to term t's operands, so a term's first copies fly while the one before is multiplied. Else
// (ragged ranks or misaligned weights) one product per term, its tiles filled by fill_tile.
template <typename T, bool EXACT, typename C, typename OpA, typename OpB>
__device__ __forceinline__ void gemm_terms(Acc<T, EXACT, C>& acc, T* As, T* Bs, const OpA& op_a, const OpB& op_b,
                                           int n_terms, long long m0, long long n0, long long M, long long N,
                                           long long K) {
    using FA = decltype(op_a(0));
    using FB = decltype(op_b(0));
    constexpr int SA = C::STAGE_A, SB = C::STAGE_B, BK = C::BK;
    constexpr bool AT = FA::ROW_CONTIGUOUS, BT = FB::ROW_CONTIGUOUS;
    constexpr int lda = AT ? C::LDA_T : C::LDA, ldb = BT ? C::LDB_T : C::LDB;
    using CursorA = TileCursor<T, C::NT, C::BM, BK, true, FA>;
    using CursorB = TileCursor<T, C::NT, BK, C::BN, false, FB>;
    bool chained = true;  // the same for the whole block
    for (int t = 0; t < n_terms; ++t) chained = chained && CursorA::usable(op_a(t)) && CursorB::usable(op_b(t));
    if (!chained) {
#pragma unroll 1
        for (int t = 0; t < n_terms; ++t) gemm_filled(acc, As, Bs, op_a(t), op_b(t), m0, n0, M, N, K);
        return;
    }
    const FA a0 = op_a(0);
    const FB b0 = op_b(0);
    const CursorA ca(a0, lda, m0, 0, M, K);
    const CursorB cb(b0, ldb, 0, n0, K, N);
    const int per = static_cast<int>(cdiv(K, static_cast<long long>(BK))) * BK;  // one term's steps (K: a rank)
    // ring() loads the steps in order: the term, the step within it and the term's shifts advance with each load
    int t = 0, dk = 0;
    long long shift_a = 0, shift_b = 0;
    ring<C, AT, BT>(acc, As, Bs, 0, static_cast<long long>(n_terms) * per, [&](int stage, long long) {
        ca.load(As + stage * SA, dk, 0, K, shift_a);
        cb.load(Bs + stage * SB, dk, 0, K, shift_b);
        dk += BK;
        if (dk == per && ++t < n_terms) {
            dk = 0;
            shift_a = elements_between(a0.ptr(0, 0), op_a(t).ptr(0, 0));
            shift_b = elements_between(b0.ptr(0, 0), op_b(t).ptr(0, 0));
        }
    }, NoHook{});
}

// Rows [begin, end) of T that split s of n_splits sums over: BK-aligned shares (empty past T).
struct RowSplit {
    long long begin, end;
    __device__ __forceinline__ RowSplit(long long Tn, int s, int n_splits, int BK) {
        const long long per = cdiv(cdiv(Tn, n_splits), BK) * BK;
        begin = min_ll(Tn, s * per);
        end = min_ll(Tn, begin + per);
    }
};

// Operands, read in place: ptr(r, c) is the address of element (r, c); ROW_CONTIGUOUS says along which
// index consecutive elements sit in memory; vec_ok() whether fill_tile may read runs of 16 bytes;
// row_step() / col_step() the elements between (r, c) and (r + 1, c) / (r, c + 1) where that is the same
// everywhere, else -1 (TileCursor walks the K axis by it).

// The (L, rows, k) weights [W1 | W2] as one rows x 2Lk matrix: element (i, c), c = h Lk + l k + j, is
// W_h[l, i, j] (S1s and U2s as A = [S1 | U2]); contiguous along c within a term.
template <typename T> struct Side {
    static constexpr bool ROW_CONTIGUOUS = false;
    const T* w1;
    const T* w2;
    long long rows;
    int L, k;
    __device__ __forceinline__ const T* ptr(long long i, long long c) const {
        const int Lk = L * k;
        int cc = static_cast<int>(c);
        const T* w = w1;
        if (cc >= Lk) {
            cc -= Lk;
            w = w2;
        }
        return w + (static_cast<long long>(cc / k) * rows + i) * k + cc % k;
    }
    // runs of Vec<T>::N columns stay in one term of one half when k is a multiple of it
    __device__ __forceinline__ bool vec_ok() const { return k % Vec<T>::N == 0 && aligned16(w1) && aligned16(w2); }
    __device__ __forceinline__ long long row_step() const { return k; }
    __device__ __forceinline__ long long col_step() const { return -1; }  // terms and halves apart
};

// The (L, k, cols) weights [W1; W2] as one 2Lk x cols matrix: element (c, o), c = h Lk + l k + j, is
// W_h[l, j, o] (U1s and S2s as B = [U1; S2]); in a contiguous (L, k, cols) tensor that is (l k + j) cols + o.
template <typename T> struct Stack {
    static constexpr bool ROW_CONTIGUOUS = false;
    const T* w1;
    const T* w2;
    long long cols;
    int Lk;
    __device__ __forceinline__ const T* ptr(long long c, long long o) const {
        const int cc = static_cast<int>(c);
        return cc < Lk ? w1 + cc * cols + o : w2 + (cc - Lk) * cols + o;
    }
    __device__ __forceinline__ bool vec_ok() const {
        return cols % Vec<T>::N == 0 && aligned16(w1) && aligned16(w2);
    }
    __device__ __forceinline__ long long row_step() const { return -1; }  // the halves apart
    __device__ __forceinline__ long long col_step() const { return 1; }
};

// A contiguous rows x cols matrix with leading dimension ld, read as (r, c) or, TRANSPOSED, as its
// transpose (element (r, c) at p[c ld + r]).
template <typename T, bool TRANSPOSED> struct Dense {
    static constexpr bool ROW_CONTIGUOUS = TRANSPOSED;
    const T* p;
    long long ld;
    __device__ __forceinline__ const T* ptr(long long r, long long c) const {
        return TRANSPOSED ? p + c * ld + r : p + r * ld + c;
    }
    __device__ __forceinline__ bool vec_ok() const { return ld % Vec<T>::N == 0 && aligned16(p); }
    __device__ __forceinline__ long long row_step() const { return TRANSPOSED ? 1 : ld; }
    __device__ __forceinline__ long long col_step() const { return TRANSPOSED ? ld : 1; }
};

// The transpose of another operand: element (r, c) is f's (c, r).
template <typename F> struct Transposed {
    static constexpr bool ROW_CONTIGUOUS = !F::ROW_CONTIGUOUS;
    F f;
    __device__ __forceinline__ auto ptr(long long r, long long c) const { return f.ptr(c, r); }
    __device__ __forceinline__ bool vec_ok() const { return f.vec_ok(); }
    __device__ __forceinline__ long long row_step() const { return f.col_step(); }
    __device__ __forceinline__ long long col_step() const { return f.row_step(); }
};

// The BM x BN tile at (m0, n0) of an M x N row-major output (leading dimension ld): f(r, c, v) makes each
// element (scale, bias, conversion; c past N may give anything), staged as T in Cs (BM x LDC, the ring's
// memory: gemm() leaves it free) so that consecutive threads write consecutive 16-byte runs of a row;
// the scalar path where rows are not 16-byte aligned, a run cut by the N edge element by element.
// Every thread of the block must call it; Cs is read until it returns (a barrier before reusing it).
template <typename T, bool EXACT, typename C, typename F>
__device__ __forceinline__ void store_tile(const Acc<T, EXACT, C>& acc, T* Cs, T* out, long long ld, long long m0,
                                           long long n0, long long M, long long N, const F& f) {
    constexpr int BM = C::BM, BN = C::BN, LDC = C::LDC, NT = C::NT, V = Vec<T>::N;
    acc.each([&](int r, int c, float v) { Cs[r * LDC + c] = f(r, c, v); });
    __syncthreads();
    if (ld % V == 0 && aligned16(out)) {  // n0 is a multiple of BN: runs start 16-byte aligned
        for (int run = threadIdx.x; run < BM * BN / V; run += NT) {
            const int r = run / (BN / V), c = run % (BN / V) * V;
            const long long t = m0 + r, o = n0 + c;
            if (t >= M || o >= N) continue;
            if (o + V <= N) {
                *reinterpret_cast<uint4*>(out + t * ld + o) = *reinterpret_cast<const uint4*>(Cs + r * LDC + c);
            } else {
                for (int e = 0; o + e < N; ++e) out[t * ld + o + e] = Cs[r * LDC + c + e];
            }
        }
    } else {
        for (int idx = threadIdx.x; idx < BM * BN; idx += NT) {
            const int r = idx / BN, c = idx % BN;
            const long long t = m0 + r, o = n0 + c;
            if (t < M && o < N) out[t * ld + o] = Cs[r * LDC + c];
        }
    }
}

// Fail loudly if the launch gave less dynamic shared memory than the kernel carves out.
__device__ __forceinline__ void require_shared(unsigned bytes) {
    unsigned have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < bytes) __trap();
}

}  // namespace sl
}  // namespace panther
