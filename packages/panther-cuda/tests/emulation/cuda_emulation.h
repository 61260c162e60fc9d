// Host emulation of the CUDA features the kernels of panther-cuda use, so that the real .cu sources
// compile with a C++20 host compiler and run on the CPU: thread and block indices (one std::thread per
// CUDA thread), __syncthreads (a barrier per block), dynamic shared memory, __half / __nv_bfloat16
// with round-to-nearest conversions, cvt.rna.tf32, and mma.sync (each lane's fragments are gathered
// per warp and the product taken from the PTX ISA fragment layouts, written out here independently of
// common.cuh's loaders), ldmatrix (each lane's row addresses gathered per warp, the PTX ISA layout
// applied), cp.async (each copy's 4, 8 or 16 bytes read at issue and written to shared memory when a
// wait_group retires its group, so that a read of a stage before its wait sees stale bytes; or, with
// PANTHER_EMU_CP_AT_ISSUE set, at issue, so that a stage rewritten while still read shows), and the
// sm_90a warpgroup MMA of wgmma.cuh (descriptors decoded per the PTX ISA's canonical layouts, without swizzle
// or with the 128-byte swizzle, each product taken when a wait_group retires its group: shared memory
// rewritten before the wait shows).
// The test substitutes this for common.cuh's includes and inline assembly.
#pragma once
#include <barrier>
#include <vector>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
struct Dim { unsigned x = 0, y = 0, z = 0; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };  // the CUDA vector types of the kernels' 8- and 16-byte accesses
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float2 make_float2(float a, float b) { return float2{a, b}; }
inline thread_local Dim threadIdx, blockIdx;
inline Dim gridDim, blockDim;
inline std::barrier<>* g_block_barrier;
constexpr int EMU_MAX_WARPS = 32;  // CUDA's 1024 threads a block
inline std::barrier<>* g_warp_barrier[EMU_MAX_WARPS];
inline unsigned g_dynamic_smem;
#define __syncthreads() g_block_barrier->arrive_and_wait()
#define __trap() (std::fprintf(stderr, "trap: a launch check failed (dynamic shared memory, block size)\n"), std::abort())
// the one inline assembly left in the kernels, tile.cuh's require_shared: `have` = the dynamic shared memory
#define asm(...) (have = g_dynamic_smem)

// cp.async (16 bytes, and 4, 8 or 16 bytes with a source size) / commit_group / wait_group, per thread, and
// ldmatrix below (the kernels use these in place of the inline assembly of common.cuh and tile.cuh when
// PANTHER_PTX_EMULATED is defined): cp.async's two addresses must be aligned to the copy's size.
#define PANTHER_PTX_EMULATED 1
// the block's dynamic shared memory (set by emu_launch): every cp.async destination and ldmatrix row must lie
// in its first g_dynamic_smem bytes, the size the launch asked for
inline unsigned char* g_emu_smem;
inline void emu_check_shared(const void* p, unsigned bytes, const char* what) {
    const long long off = static_cast<const unsigned char*>(p) - g_emu_smem;
    if (off < 0 || off + bytes > (long long)g_dynamic_smem) {
        std::fprintf(stderr, "%s: %u bytes at shared offset %lld, outside the %u bytes of dynamic shared memory\n",
                     what, bytes, off, g_dynamic_smem);
        std::abort();
    }
}
struct EmuCopy { void* dst; unsigned size; unsigned char data[16]; };
inline thread_local std::vector<EmuCopy> g_cp_open;                  // issued since the last commit
inline thread_local std::vector<std::vector<EmuCopy>> g_cp_groups;  // committed, oldest first
// A copy may land any time between its issue and the wait that retires it. By default it lands at the wait (a
// read of its bytes before the wait sees the old ones); with PANTHER_EMU_CP_AT_ISSUE set, at its issue (a stage
// rewritten while a product or another thread still reads it shows).
inline const bool g_cp_at_issue = std::getenv("PANTHER_EMU_CP_AT_ISSUE") != nullptr;
inline void emu_cp_issue(EmuCopy& c) {
    if (g_cp_at_issue) {
        std::memcpy(c.dst, c.data, c.size);
        c.size = 0;  // landed: the wait has nothing left to write
    }
    g_cp_open.push_back(c);
}
inline void cp_async16(void* s, const void* g) {
    if ((reinterpret_cast<unsigned long long>(s) | reinterpret_cast<unsigned long long>(g)) & 15) {
        std::fprintf(stderr, "cp.async: misaligned address\n");
        std::abort();
    }
    emu_check_shared(s, 16, "cp.async");
    EmuCopy c;
    c.dst = s;
    c.size = 16;
    std::memcpy(c.data, g, 16);
    emu_cp_issue(c);
}
// the src-size form: `bytes` (0..16) read from g, the rest of the 16 zero; g is not read when bytes is 0
inline void cp_async16_zfill(void* s, const void* g, unsigned bytes) {
    if ((reinterpret_cast<unsigned long long>(s) | reinterpret_cast<unsigned long long>(g)) & 15 || bytes > 16) {
        std::fprintf(stderr, "cp.async: misaligned address or src-size over 16\n");
        std::abort();
    }
    emu_check_shared(s, 16, "cp.async");
    EmuCopy c;
    c.dst = s;
    c.size = 16;
    std::memset(c.data, 0, 16);
    if (bytes) std::memcpy(c.data, g, bytes);
    emu_cp_issue(c);
}
// cp.async of B = 4, 8 or 16 bytes with a source size of 0 (zeros, g not read) or B; addresses aligned to B
template <int B> inline void cp_async_zfill(void* s, const void* g, unsigned bytes) {
    static_assert(B == 4 || B == 8 || B == 16, "cp.async copies 4, 8 or 16 bytes");
    if ((reinterpret_cast<unsigned long long>(s) | reinterpret_cast<unsigned long long>(g)) % B || (bytes != 0 && bytes != B)) {
        std::fprintf(stderr, "cp.async: misaligned address or a partial source size\n");
        std::abort();
    }
    emu_check_shared(s, B, "cp.async");
    EmuCopy c;
    c.dst = s;
    c.size = B;
    std::memset(c.data, 0, 16);
    if (bytes) std::memcpy(c.data, g, B);
    emu_cp_issue(c);
}
inline void cp_async_commit() { g_cp_groups.push_back(std::move(g_cp_open)); g_cp_open.clear(); }
template <int N> inline void cp_async_wait() {
    while (g_cp_groups.size() > static_cast<size_t>(N)) {
        for (const EmuCopy& c : g_cp_groups.front()) std::memcpy(c.dst, c.data, c.size);
        g_cp_groups.erase(g_cp_groups.begin());
    }
}
// a thread's copies all retired when its kernel returns (else shared memory would change under the next block)
inline bool emu_cp_async_idle() { return g_cp_open.empty() && g_cp_groups.empty(); }

struct __half { _Float16 v; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { __half h; h.v = (_Float16)f; return h; }
struct __nv_bfloat16 { unsigned short bits; };
inline float __bfloat162float(__nv_bfloat16 b) { unsigned u = (unsigned)b.bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    unsigned u; std::memcpy(&u, &f, 4); u += 0x7fffu + ((u >> 16) & 1u); __nv_bfloat16 b; b.bits = (unsigned short)(u >> 16); return b;
}
inline unsigned emu_to_tf32(float v) {  // round to nearest, ties away, keep 10 mantissa bits
    unsigned u; std::memcpy(&u, &v, 4); u += 0x1000u; u &= 0xffffe000u; return u;
}
inline float emu_bits_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }

struct WarpScratch { unsigned a[32][4]; unsigned b[32][2]; };
inline WarpScratch g_scratch[EMU_MAX_WARPS];

template <typename T> inline float emu_half_value(unsigned short bits) {
    T t; std::memcpy(&t, &bits, 2);
    if constexpr (sizeof(T) == 2 && requires { t.bits; }) return __bfloat162float(t); else return __half2float(t);
}

// mma.sync m16n8k16 (16-bit) / m16n8k8 (tf32), fragments per the PTX ISA layouts.
template <typename T, int K> inline void emu_mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    std::memcpy(g_scratch[w].a[lane], a, sizeof(a));
    std::memcpy(g_scratch[w].b[lane], b, sizeof(b));
    g_warp_barrier[w]->arrive_and_wait();
    float A[16][16] = {}, B[16][8] = {};
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        const unsigned* ra = g_scratch[w].a[l];
        const unsigned* rb = g_scratch[w].b[l];
        if constexpr (K == 16) {
            auto lo = [](unsigned r) { return emu_half_value<T>((unsigned short)(r & 0xffff)); };
            auto hi = [](unsigned r) { return emu_half_value<T>((unsigned short)(r >> 16)); };
            A[g][2 * t] = lo(ra[0]); A[g][2 * t + 1] = hi(ra[0]);
            A[g + 8][2 * t] = lo(ra[1]); A[g + 8][2 * t + 1] = hi(ra[1]);
            A[g][2 * t + 8] = lo(ra[2]); A[g][2 * t + 9] = hi(ra[2]);
            A[g + 8][2 * t + 8] = lo(ra[3]); A[g + 8][2 * t + 9] = hi(ra[3]);
            B[2 * t][g] = lo(rb[0]); B[2 * t + 1][g] = hi(rb[0]);
            B[2 * t + 8][g] = lo(rb[1]); B[2 * t + 9][g] = hi(rb[1]);
        } else {
            A[g][t] = emu_bits_float(ra[0]); A[g + 8][t] = emu_bits_float(ra[1]);
            A[g][t + 4] = emu_bits_float(ra[2]); A[g + 8][t + 4] = emu_bits_float(ra[3]);
            B[t][g] = emu_bits_float(rb[0]); B[t + 4][g] = emu_bits_float(rb[1]);
        }
    }
    g_warp_barrier[w]->arrive_and_wait();
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
        const int r = g + (i >= 2 ? 8 : 0), c = 2 * t + (i & 1);
        float s = d[i];
        for (int kk = 0; kk < K; ++kk) s += A[r][kk] * B[kk][c];
        d[i] = s;
    }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16, per the PTX ISA: lanes 8j .. 8j + 7 hold the addresses
// of rows 0 .. 7 of matrix j (16 bytes each, 16-byte aligned); lane l receives in r[j] the elements
// (row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1) of matrix j, or with .trans (rows 2 (l % 4) and
// 2 (l % 4) + 1, column l / 4): the first in the low 16 bits.
inline const unsigned char* g_ldm_rows[EMU_MAX_WARPS][32];
template <bool TRANS> inline void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (reinterpret_cast<unsigned long long>(p) & 15) {
        std::fprintf(stderr, "ldmatrix: misaligned row address\n");
        std::abort();
    }
    emu_check_shared(p, 16, "ldmatrix row");
    g_ldm_rows[w][lane] = static_cast<const unsigned char*>(p);
    g_warp_barrier[w]->arrive_and_wait();
    auto at = [&](int j, int row, int col) {  // element (row, col) of matrix j, as its 16 bits
        unsigned short v;
        std::memcpy(&v, g_ldm_rows[w][8 * j + row] + 2 * col, 2);
        return (unsigned)v;
    };
    const int g = lane >> 2, t = lane & 3;
    for (int j = 0; j < 4; ++j)
        r[j] = TRANS ? at(j, 2 * t, g) | (at(j, 2 * t + 1, g) << 16) : at(j, g, 2 * t) | (at(j, g, 2 * t + 1) << 16);
    g_warp_barrier[w]->arrive_and_wait();
}

// --- sm_90a: wgmma.mma_async from shared-memory descriptors (wgmma.cuh's panther::sm90, emulated) ---------
// Descriptors hold shared-memory offsets from the block's dynamic shared memory (g_emu_smem, set by
// emu_launch), >> 4 in 14 bits as on the device. Each thread computes its own accumulator elements (the
// warpgroup layout of wgmma.cuh) from the operands as the canonical layouts place them; a product is taken
// when wgmma_wait retires its group, reading shared memory then.
namespace panther { namespace sm90 {
inline unsigned long long descriptor(const void* p, unsigned lbo, unsigned sbo) {
    const long long off = static_cast<const unsigned char*>(p) - g_emu_smem;
    if (off < 0 || off % 16 || off >= (1 << 18) || lbo % 16 || sbo % 16 || lbo >= (1 << 18) || sbo >= (1 << 18)) {
        std::fprintf(stderr, "wgmma descriptor: address or offsets not 16-byte multiples in range\n");
        std::abort();
    }
    return (unsigned long long)((off >> 4) & 0x3FFF) | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
           ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32);
}
inline void fence_proxy_async() {}
inline void wgmma_fence() {}
template <int N> inline void fence_operand(float (&)[N]) {}
struct EmuWgmma { float* d; int n; unsigned long long a, b; int accumulate; bool trans_a, trans_b, bf; };  // n: N, 128 or 64
inline thread_local std::vector<EmuWgmma> g_wg_open;
inline thread_local std::vector<std::vector<EmuWgmma>> g_wg_groups;
// element (row, col) of a 16-bit operand: K-major (row = M or N index, col = K) or MN-major (row = K, col = M or N)
inline float emu_operand(unsigned long long desc, bool mn_major, int row, int col, bool bf) {
    const int layout = static_cast<int>(desc >> 62);
    if (layout > 1 || ((desc >> 49) & 7)) {
        std::fprintf(stderr, "wgmma descriptor: only the no-swizzle and 128-byte swizzle layouts, base offset 0\n");
        std::abort();
    }
    const long long start = (long long)(desc & 0x3FFF) << 4, lbo = (long long)((desc >> 16) & 0x3FFF) << 4,
                    sbo = (long long)((desc >> 32) & 0x3FFF) << 4;
    const int mn = mn_major ? col : row, k = mn_major ? row : col;
    long long off;
    if (layout == 0) {
        // K-major: (mn, k) at ((mn % 8) 8 + k % 8) 2 + (mn / 8) SBO + (k / 8) LBO bytes;
        // MN-major: (k, mn) at ((k % 8) 8 + mn % 8) 2 + (mn / 8) SBO + (k / 8) LBO bytes
        off = start + (mn_major ? ((k % 8) * 8 + mn % 8) * 2 : ((mn % 8) * 8 + k % 8) * 2) + (mn / 8) * sbo +
              (k / 8) * lbo;
    } else {
        // 128-byte swizzle, the canonical layouts before the swizzle (8 rows of 128 bytes an atom):
        // K-major: (mn, k) at (mn % 8) 128 + k 2 + (mn / 8) SBO bytes (k within the row: LBO unused);
        // MN-major: (k, mn) at (mn % 64) 2 + (k % 8) 128 + (mn / 64) LBO + (k / 8) SBO bytes;
        // then the address's bits 4-6 (its 16-byte chunk in a row) XOR bits 7-9 (its row in a 1024-byte atom)
        off = start + (mn_major ? (mn % 64) * 2 + (k % 8) * 128 + (mn / 64) * lbo + (k / 8) * sbo
                                : (mn % 8) * 128 + k * 2 + (mn / 8) * sbo);
        off ^= ((off >> 7) & 7) << 4;
    }
    if (off + 2 > (long long)g_dynamic_smem) { std::fprintf(stderr, "wgmma: operand outside shared memory\n"); std::abort(); }
    unsigned short bits;
    std::memcpy(&bits, g_emu_smem + off, 2);
    return bf ? emu_half_value<__nv_bfloat16>(bits) : emu_half_value<__half>(bits);
}
inline void emu_wgmma_run(const EmuWgmma& op) {
    const int t = threadIdx.x & 127, w = t >> 5, lane = t & 31;
    for (int i = 0; i < op.n / 8; ++i)
        for (int v = 0; v < 4; ++v) {
            const int m = 16 * w + (lane >> 2) + 8 * (v >> 1), n = 8 * i + 2 * (lane & 3) + (v & 1);
            float s = 0.0f;
            for (int k = 0; k < 16; ++k)
                s += (op.trans_a ? emu_operand(op.a, true, k, m, op.bf) : emu_operand(op.a, false, m, k, op.bf)) *
                     (op.trans_b ? emu_operand(op.b, true, k, n, op.bf) : emu_operand(op.b, false, n, k, op.bf));
            op.d[4 * i + v] = (op.accumulate ? op.d[4 * i + v] : 0.0f) + s;
        }
}
inline void wgmma_commit() { g_wg_groups.push_back(std::move(g_wg_open)); g_wg_open.clear(); }
template <int N> inline void wgmma_wait() {
    while (g_wg_groups.size() > static_cast<size_t>(N)) {
        for (const EmuWgmma& op : g_wg_groups.front()) emu_wgmma_run(op);
        g_wg_groups.erase(g_wg_groups.begin());
    }
}
template <typename T, bool TRANS_A, bool TRANS_B> struct Wgmma {
    static void m64n128k16(float (&d)[64], unsigned long long a, unsigned long long b, int accumulate) {
        static_assert(sizeof(T) == 2, "wgmma here: 16-bit operands");
        constexpr bool bf = requires(T x) { x.bits; };
        g_wg_open.push_back(EmuWgmma{d, 128, a, b, accumulate, TRANS_A, TRANS_B, bf});
    }
    static void m64n64k16(float (&d)[32], unsigned long long a, unsigned long long b, int accumulate) {
        static_assert(sizeof(T) == 2, "wgmma here: 16-bit operands");
        constexpr bool bf = requires(T x) { x.bits; };
        g_wg_open.push_back(EmuWgmma{d, 64, a, b, accumulate, TRANS_A, TRANS_B, bf});
    }
};
inline bool emu_wgmma_idle() { return g_wg_open.empty() && g_wg_groups.empty(); }
}}  // namespace panther::sm90
