// What the harnesses of every op share (tests/<op>_emulation/harness.cpp): a kernel body run over a grid of
// emulated blocks, buffers that start as NaN, random inputs, and the error report the tests parse.
#pragma once
#include "panther_cuda/common.cuh"  // as build_harness writes it for the host (it includes cuda_emulation.h)
#include <thread>
#include <vector>
#include <random>
#include <functional>
#include <algorithm>
#include <string>
#include <memory>

// body() as a grid of `blocks` x `blocks_y` blocks of `nt` threads, one block after another, with `shared`
// bytes of dynamic shared memory at `smem` (of `capacity` bytes), all of it filled with NaN bytes before each
// block: a kernel that reads shared memory it did not write, or beyond the `shared` bytes, shows.
inline void emu_launch(long long blocks, int nt, unsigned shared, unsigned char* smem, size_t capacity,
                       const std::function<void()>& body, unsigned blocks_y = 1) {
    g_dynamic_smem = shared;
    gridDim.x = (unsigned)blocks;
    gridDim.y = blocks_y;
    blockDim.x = (unsigned)nt;
    if (shared > capacity) { std::printf("shared too big\n"); std::abort(); }
    if (nt % 32 || nt / 32 > EMU_MAX_WARPS) { std::printf("bad block size\n"); std::abort(); }
    std::barrier<> block_bar(nt);
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    for (int w = 0; w < nt / 32; ++w) {
        warp_bars.push_back(std::make_unique<std::barrier<>>(32));
        g_warp_barrier[w] = warp_bars.back().get();
    }
    g_block_barrier = &block_bar;
    g_emu_smem = smem;
    for (long long b = 0; b < blocks * blocks_y; ++b) {
        std::memset(smem, 0xff, capacity);
        std::vector<std::thread> th;
        for (int t = 0; t < nt; ++t)
            th.emplace_back([&, t, b] {
                threadIdx.x = t; blockIdx.x = (unsigned)(b % blocks); blockIdx.y = (unsigned)(b / blocks); body();
                if (!emu_cp_async_idle()) { std::printf("cp.async copies left in flight\n"); std::abort(); }
                if (!panther::sm90::emu_wgmma_idle()) { std::printf("wgmma products left in flight\n"); std::abort(); }
            });
        for (auto& x : th) x.join();
    }
}

inline long long cdv(long long a, long long b) { return (a + b - 1) / b; }

// A host buffer of T, NaN until written.
template <typename T> struct Buf {
    std::vector<T> v;
    explicit Buf(size_t n) : v(n) { for (auto& e : v) e = panther::from_float<T>(NAN); }
    T* p() { return v.empty() ? nullptr : v.data(); }
    double at(size_t i) const { return panther::to_float(v[i]); }
};

template <typename T> inline Buf<T> rnd(size_t n, double scale, std::mt19937& g) {
    std::normal_distribution<double> N(0, 1);
    Buf<T> b(n);
    for (auto& e : b.v) e = panther::from_float<T>((float)(N(g) * scale));
    return b;
}

// "<what> <error>": max |got - ref| over max |ref|, 1e30 where anything got is not finite.
inline void report(const char* what, const std::vector<double>& got, const std::vector<double>& ref) {
    double m = 0, r = 1e-30;
    for (size_t i = 0; i < ref.size(); ++i) { m = std::max(m, std::fabs(got[i] - ref[i])); r = std::max(r, std::fabs(ref[i])); }
    bool nan = false;
    for (double v : got) nan |= !std::isfinite(v);
    std::printf("%s %.6e\n", what, nan ? 1e30 : m / r);
}
