// Host emulation of the CUDA features the kernels of panther-cuda use, so that the real .cu sources
// compile with a C++20 host compiler and run on the CPU: thread and block indices (one std::thread per
// CUDA thread), __syncthreads (a barrier per block), dynamic shared memory, __half / __nv_bfloat16
// with round-to-nearest conversions, cvt.rna.tf32, and mma.sync (each lane's fragments are gathered
// per warp and the product taken from the PTX ISA fragment layouts, written out here independently of
// common.cuh's loaders), ldmatrix (each lane's row addresses gathered per warp, the PTX ISA layout
// applied), and cp.async (each copy's 16 bytes read at issue and written to shared memory
// only when a wait_group retires its group: a read of a stage before its wait sees stale bytes). The
// test substitutes this for common.cuh's includes and inline assembly.
#pragma once
#include <barrier>
#include <vector>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
struct Dim { unsigned x = 0, y = 0, z = 0; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline thread_local Dim threadIdx, blockIdx;
inline Dim gridDim;
inline std::barrier<>* g_block_barrier;
constexpr int EMU_MAX_WARPS = 8;
inline std::barrier<>* g_warp_barrier[EMU_MAX_WARPS];
inline unsigned g_dynamic_smem;
#define __syncthreads() g_block_barrier->arrive_and_wait()
#define __trap() (std::fprintf(stderr, "trap: dynamic shared memory too small\n"), std::abort())
// the one inline assembly left in the kernels, tile.cuh's require_shared: `have` = the dynamic shared memory
#define asm(...) (have = g_dynamic_smem)

// cp.async.cg.shared.global 16 / commit_group / wait_group, per thread, and ldmatrix below (the kernels
// use these in place of the inline assembly of common.cuh and tile.cuh when PANTHER_PTX_EMULATED is defined): cp.async's two
// addresses must be 16-byte aligned.
#define PANTHER_PTX_EMULATED 1
struct EmuCopy { void* dst; unsigned char data[16]; };
inline thread_local std::vector<EmuCopy> g_cp_open;                  // issued since the last commit
inline thread_local std::vector<std::vector<EmuCopy>> g_cp_groups;  // committed, oldest first
inline void cp_async16(void* s, const void* g) {
    if ((reinterpret_cast<unsigned long long>(s) | reinterpret_cast<unsigned long long>(g)) & 15) {
        std::fprintf(stderr, "cp.async: misaligned address\n");
        std::abort();
    }
    EmuCopy c;
    c.dst = s;
    std::memcpy(c.data, g, 16);
    g_cp_open.push_back(c);
}
// the src-size form: `bytes` (0..16) read from g, the rest of the 16 zero; g is not read when bytes is 0
inline void cp_async16_zfill(void* s, const void* g, unsigned bytes) {
    if ((reinterpret_cast<unsigned long long>(s) | reinterpret_cast<unsigned long long>(g)) & 15 || bytes > 16) {
        std::fprintf(stderr, "cp.async: misaligned address or src-size over 16\n");
        std::abort();
    }
    EmuCopy c;
    c.dst = s;
    std::memset(c.data, 0, 16);
    if (bytes) std::memcpy(c.data, g, bytes);
    g_cp_open.push_back(c);
}
inline void cp_async_commit() { g_cp_groups.push_back(std::move(g_cp_open)); g_cp_open.clear(); }
template <int N> inline void cp_async_wait() {
    while (g_cp_groups.size() > static_cast<size_t>(N)) {
        for (const EmuCopy& c : g_cp_groups.front()) std::memcpy(c.dst, c.data, 16);
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
