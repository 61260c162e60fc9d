// Runs the sketched linear kernels of forward.cu and backward.cu on the CPU under ../emulation/cuda_emulation.h and
// prints, for H, y and each gradient asked for, the max-normalised error against float64 loops written
// here from the op's definition (|got - ref|max / |ref|max). Outputs start as NaN and shared memory as
// NaN bytes before every block, so a value a kernel forgets to write, or reads before writing, shows.
#include "harness.h"
#include <type_traits>
namespace panther { namespace sl { alignas(16) unsigned char smem[1 << 20]; } }
#include "forward.cu"
#include "forward_sm90.cu"
#include "backward.cu"
#include "backward_sm90.cu"
using namespace panther;
using namespace panther::sl;
// The tile shapes of limits.py's CONFIGS.
using Small = Tile<64, 64, 32, 2, 2, 3>;
using Large = Tile<128, 128, 32, 2, 4, 4>;
using Deep64 = Tile<128, 128, 64, 2, 4, 4>;


static void launch(long long blocks, int nt, unsigned shared, const std::function<void()>& body) {
    emu_launch(blocks, nt, shared, sl::smem, sizeof(sl::smem), body);
}

static int g_sm90_groups = 0;  // > 0: y by forward_sm90.cu's kernel, that many blocks per row tile
static bool g_sm90_h = false;  // H by forward_sm90.cu's kernel too
static int g_sm90_stages = 3;  // the ring of the sm_90a H and backward kernels: 3 or 6 stages (sm90.py's RING_STAGES)

// f(std::integral_constant<int, S>{}) with S = g_sm90_stages: the kernels' instance of that ring
template <typename F> static void with_stages(const F& f) {
    if (g_sm90_stages == 6) f(std::integral_constant<int, 6>{});
    else f(std::integral_constant<int, 3>{});
}

// y = H B / (2L) + b by sketched_linear_fwd_y_sm90<T, KP>, KP the depth forward.py picks (R rounded up to 32,
// 64, 128 or 256)
template <typename T>
static void fwd_y_sm90(const T* h, const T* U1, const T* S2, const T* bias, T* y, long long Tn, long long O, int Lk,
                       float scale) {
    const int R = 2 * Lk, groups = g_sm90_groups;
    const int KP = R <= 32 ? 32 : R <= 64 ? 64 : R <= 128 ? 128 : 256;
    const unsigned shared = (128 * (KP < 64 ? 64 : KP) + 2 * KP * 128) * sizeof(T);  // H's tile: whole swizzle rows
    launch(cdv(Tn, 128) * groups, SM90_NT, shared, [&] {
        switch (KP) {
            case 32: sketched_linear_fwd_y_sm90<T, 32>(h, U1, S2, bias, y, Tn, O, Lk, groups, scale); break;
            case 64: sketched_linear_fwd_y_sm90<T, 64>(h, U1, S2, bias, y, Tn, O, Lk, groups, scale); break;
            case 128: sketched_linear_fwd_y_sm90<T, 128>(h, U1, S2, bias, y, Tn, O, Lk, groups, scale); break;
            default: sketched_linear_fwd_y_sm90<T, 256>(h, U1, S2, bias, y, Tn, O, Lk, groups, scale); break;
        }
    });
}

template <typename T, bool EXACT, typename C>
static void run(long long Tn, long long I, long long O, int L, int k, int plan, int split, bool bias_on, const bool needs[6]) {
    std::mt19937 gen(1234);
    const int Lk = L * k, R = 2 * Lk;
    auto x = rnd<T>(Tn * I, 1.0, gen);
    auto S1 = rnd<T>((size_t)L * I * k, 1 / std::sqrt((double)I), gen), U2 = rnd<T>((size_t)L * I * k, 1 / std::sqrt((double)I), gen);
    auto U1 = rnd<T>((size_t)L * k * O, 1 / std::sqrt((double)k), gen), S2 = rnd<T>((size_t)L * k * O, 1 / std::sqrt((double)k), gen);
    auto b = rnd<T>(O, 1.0, gen);
    auto g = rnd<T>(Tn * O, 1.0, gen);
    Buf<T> y(Tn * O), h(Tn * R);
    const float scale = 1.0f / (2 * L);
    const T* bp = bias_on ? b.p() : nullptr;
    const unsigned tile = C::SHARED_ELEMENTS * sizeof(T);
    constexpr int BM = C::BM, BN = C::BN, NT = C::NT;
    if (plan > 0) {  // fused with `plan` groups, on the small tiles (as forward.py launches it)
        using F = Small;
        const unsigned shared = (F::FUSED_TILE_ELEMENTS + F::BM * ((R + F::BN - 1) / F::BN * F::BN + F::PAD)) * sizeof(T);
        launch(cdv(Tn, F::BM) * plan, F::NT, shared, [&] {
            sketched_linear_fwd_fused<T, EXACT, F>(x.p(), S1.p(), U2.p(), U1.p(), S2.p(), bp, y.p(), h.p(), Tn, I, O, L, k, plan, scale);
        });
    } else {  // two launches, H = x A in -plan shares of I (summed by a launch of their own) when plan < -1
        const int hs = plan < -1 ? -plan : 1;
        std::vector<float> wsh(hs > 1 ? (size_t)hs * Tn * R : 0, NAN);
        float* wshp = wsh.empty() ? nullptr : wsh.data();
        bool h_done = false;
        if constexpr (sizeof(T) == 2) {
            if (g_sm90_h) {  // 128 x 128 tiles, g_sm90_stages stages of 64-deep x and A tiles
                launch(cdv(Tn, 128) * cdv(R, 128) * hs, SM90_NT, g_sm90_stages * (128 * 64 + 64 * 128) * sizeof(T), [&] {
                    with_stages([&](auto S) {
                        sketched_linear_fwd_h_sm90<T, S.value>(x.p(), S1.p(), U2.p(), h.p(), wshp, Tn, I, L, k, hs);
                    });
                });
                h_done = true;
            }
        }
        if (!h_done)
            launch(cdv(Tn, BM) * cdv(R, BN) * hs, NT, tile, [&] { sketched_linear_fwd_h<T, EXACT, C>(x.p(), S1.p(), U2.p(), h.p(), wshp, Tn, I, L, k, hs); });
        if (hs > 1) launch(5, SUM_NT, 0, [&] { sketched_linear_sum_shares<T>(wshp, h.p(), Tn * R, hs, 1.0f); });
        if constexpr (sizeof(T) == 2) {
            if (g_sm90_groups > 0) {
                fwd_y_sm90<T>(h.p(), U1.p(), S2.p(), bp, y.p(), Tn, O, Lk, scale);
            } else {
                launch(cdv(Tn, BM) * cdv(O, BN), NT, tile, [&] { sketched_linear_fwd_y<T, EXACT, C>(h.p(), U1.p(), S2.p(), bp, y.p(), Tn, O, L, k, scale); });
            }
        } else {
            launch(cdv(Tn, BM) * cdv(O, BN), NT, tile, [&] { sketched_linear_fwd_y<T, EXACT, C>(h.p(), U1.p(), S2.p(), bp, y.p(), Tn, O, L, k, scale); });
        }
    }
    // reference in double
    auto A = [&](long long i, int c) { int cc = c % Lk; const auto& w = c < Lk ? S1 : U2; return w.at(((long long)(cc / k) * I + i) * k + cc % k); };
    auto B = [&](int c, long long o) { int cc = c % Lk; const auto& w = c < Lk ? U1 : S2; return w.at((long long)cc * O + o); };
    std::vector<double> H(Tn * R), Y(Tn * O), gh(Tn * R), gy(Tn * O);
    for (long long t = 0; t < Tn; ++t)
        for (int c = 0; c < R; ++c) { double s = 0; for (long long i = 0; i < I; ++i) s += x.at(t * I + i) * A(i, c); H[t * R + c] = s; }
    for (long long t = 0; t < Tn; ++t)
        for (long long o = 0; o < O; ++o) {
            double s = 0; for (int c = 0; c < R; ++c) s += h.at(t * R + c) * B(c, o);  // from the kernel's (rounded) H
            Y[t * O + o] = s * scale + (bias_on ? b.at(o) : 0.0);
        }
    for (size_t i = 0; i < H.size(); ++i) gh[i] = h.at(i);
    for (size_t i = 0; i < Y.size(); ++i) gy[i] = y.at(i);
    report("H", gh, H);
    report("y", gy, Y);

    // backward
    const bool nx = needs[0], ns1 = needs[1], ns2 = needs[2], nu1 = needs[3], nu2 = needs[4], nb = needs[5];
    Buf<T> dx(nx ? Tn * I : 0), dS1(ns1 ? (size_t)L * I * k : 0), dU2(nu2 ? (size_t)L * I * k : 0);
    Buf<T> dS2(ns2 ? (size_t)L * k * O : 0), dU1(nu1 ? (size_t)L * k * O : 0), db(nb ? O : 0);
    const bool need_dh = nx || ns1 || nu2;
    Buf<T> dh(need_dh ? Tn * R : 0);
    auto range = [&](bool first, bool second, int& lo, int& n) { lo = 0; n = 0; if (first && second) n = R; else if (first) n = Lk; else if (second) { lo = Lk; n = Lk; } };
    int w_lo, w_n; range(nu1, ns2, w_lo, w_n);
    int c_lo, c_n; range(ns1, nu2, c_lo, c_n);
    if (!need_dh) c_n = 0;
    // sm90h with R <= 128: dx and d[S1 | U2] by bwd_x_fused_sm90 (as backward.py launches it), in x_split shares of T:
    // one more than launch 1's where T is split (backward.py's counts may differ; launch 3 takes both)
    bool sm90 = false;
    if constexpr (sizeof(T) == 2) sm90 = g_sm90_h;
    const bool fused_x = sm90 && R <= 128;
    const int x_split = fused_x && split > 1 ? split + 1 : split;
    std::vector<float> ws1(x_split > 1 ? (size_t)x_split * I * c_n : 0, NAN), ws2(split > 1 ? (size_t)split * (w_n + nb) * O : 0, NAN);
    float* ws1p = ws1.empty() ? nullptr : ws1.data();
    float* ws2p = ws2.empty() ? nullptr : ws2.data();
    long long n_dh = need_dh ? cdv(Tn, BM) * cdv(R, BN) : 0;
    long long tiles_g = (w_n || nb) ? cdv(std::max(w_n, 1), BM) * cdv(O, BN) : 0;
    // dH in SPLIT shares of O too (summed by a launch of their own)
    std::vector<float> wsd(split > 1 && need_dh ? (size_t)split * Tn * R : 0, NAN);
    float* wsdp = wsd.empty() ? nullptr : wsd.data();
    n_dh *= split;
    // sm90h: the backward by backward_sm90.cu's kernels, on the large tiles' grids (128 x 128, 256 threads)
    const unsigned sm90_shared = g_sm90_stages * (128 * 64 + 64 * 128) * sizeof(T);
    if (n_dh + tiles_g)
        launch(n_dh + tiles_g * split, NT, sm90 ? sm90_shared : tile, [&] {
            if constexpr (sizeof(T) == 2) {
                if (sm90) {
                    with_stages([&](auto S) {
                        sketched_linear_bwd_g_sm90<T, S.value>(g.p(), h.p(), U1.p(), S2.p(), dh.p(), dU1.p(), dS2.p(), db.p(),
                                                               ws2p, Tn, O, L, k, scale, n_dh, w_lo, w_n, split, wsdp, split);
                    });
                    return;
                }
            }
            sketched_linear_bwd_g<T, EXACT, C>(g.p(), h.p(), U1.p(), S2.p(), dh.p(), dU1.p(), dS2.p(), db.p(), ws2p, Tn, O, L, k,
                                            scale, n_dh, w_lo, w_n, split, wsdp, split);
        });
    if (wsdp) launch(3, SUM_NT, 0, [&] { sketched_linear_sum_shares<T>(wsdp, dh.p(), Tn * R, split, scale); });
    if (need_dh && fused_x) {
        if constexpr (sizeof(T) == 2) {
            launch(cdv(I, 128) * x_split, SM90_NT, FusedX<4>::ELEMENTS * sizeof(T), [&] {  // sm90.py's FUSED_X_STAGES
                sketched_linear_bwd_x_fused_sm90<T, 4>(x.p(), dh.p(), S1.p(), U2.p(), dx.p(), dS1.p(), dU2.p(), ws1p, Tn, I,
                                                       L, k, c_lo, c_n, x_split);
            });
        }
    } else if (need_dh) {
        long long n_dx = nx ? cdv(Tn, BM) * cdv(I, BN) : 0, n_dw1 = cdv(I, BM) * cdv(c_n, BN) * split;
        launch(n_dx + n_dw1, NT, sm90 ? sm90_shared : tile, [&] {
            if constexpr (sizeof(T) == 2) {
                if (sm90) {
                    with_stages([&](auto S) {
                        sketched_linear_bwd_x_sm90<T, S.value>(x.p(), dh.p(), S1.p(), U2.p(), dx.p(), dS1.p(), dU2.p(), ws1p,
                                                               Tn, I, L, k, n_dx, c_lo, c_n, split);
                    });
                    return;
                }
            }
            sketched_linear_bwd_x<T, EXACT, C>(x.p(), dh.p(), S1.p(), U2.p(), dx.p(), dS1.p(), dU2.p(), ws1p, Tn, I, L, k, n_dx,
                                            c_lo, c_n, split);
        });
    }
    const int c1_n = ws1p ? c_n : 0, c2_n = ws2p ? w_n : 0;  // the gradients whose launch wrote shares
    T* db2 = ws2p ? db.p() : nullptr;
    if (I * c1_n + (long long)(c2_n + (db2 ? 1 : 0)) * O > 0)
        launch(7, SUM_NT, 0, [&] {  // a short grid: the grid-stride loop takes several elements per thread
            sketched_linear_bwd_sum<T>(ws1p, ws2p, dS1.p(), dU2.p(), dU1.p(), dS2.p(), db2, I, O, L, k, c_lo, c1_n, w_lo, c2_n,
                                       x_split, split);
        });
    std::vector<double> DH(Tn * R);
    for (long long t = 0; t < Tn; ++t)
        for (int c = 0; c < R; ++c) { double s = 0; for (long long o = 0; o < O; ++o) s += g.at(t * O + o) * B(c, o); DH[t * R + c] = s * scale; }
    if (need_dh) { std::vector<double> got(dh.v.size()); for (size_t i = 0; i < got.size(); ++i) got[i] = dh.at(i); report("dH", got, DH); }
    if (nx) {
        std::vector<double> ref(Tn * I), got(Tn * I);
        for (long long t = 0; t < Tn; ++t) for (long long i = 0; i < I; ++i) { double s = 0; for (int c = 0; c < R; ++c) s += dh.at(t * R + c) * A(i, c); ref[t * I + i] = s; got[t * I + i] = dx.at(t * I + i); }
        report("dx", got, ref);
    }
    for (int half = 0; half < 2; ++half) {  // d[S1 | U2] = xᵀ dH
        Buf<T>& out = half == 0 ? dS1 : dU2;
        if (!(half == 0 ? ns1 : nu2)) continue;
        std::vector<double> ref(out.v.size()), got(out.v.size());
        for (int l = 0; l < L; ++l) for (long long i = 0; i < I; ++i) for (int j = 0; j < k; ++j) {
            int c = half * Lk + l * k + j; double s = 0;
            for (long long t = 0; t < Tn; ++t) s += x.at(t * I + i) * dh.at(t * R + c);
            size_t idx = ((size_t)l * I + i) * k + j; ref[idx] = s; got[idx] = out.at(idx);
        }
        report(half == 0 ? "dS1" : "dU2", got, ref);
    }
    for (int half = 0; half < 2; ++half) {  // d[U1; S2] = s Hᵀ g
        Buf<T>& out = half == 0 ? dU1 : dS2;
        if (!(half == 0 ? nu1 : ns2)) continue;
        std::vector<double> ref(out.v.size()), got(out.v.size());
        for (int cc = 0; cc < Lk; ++cc) for (long long o = 0; o < O; ++o) {
            double s = 0; for (long long t = 0; t < Tn; ++t) s += h.at(t * R + half * Lk + cc) * g.at(t * O + o);
            ref[cc * O + o] = s * scale; got[cc * O + o] = out.at(cc * O + o);
        }
        report(half == 0 ? "dU1" : "dS2", got, ref);
    }
    if (nb) {
        std::vector<double> ref(O), got(O);
        for (long long o = 0; o < O; ++o) { double s = 0; for (long long t = 0; t < Tn; ++t) s += g.at(t * O + o); ref[o] = s; got[o] = db.at(o); }
        report("db", got, ref);
    }
}

template <typename C>
static int run_mode(const std::string& mode, long long Tn, long long I, long long O, int L, int k, int plan, int split,
                    bool bias, const bool needs[6]) {
    if (mode == "float32") run<float, true, C>(Tn, I, O, L, k, plan, split, bias, needs);
    else if (mode == "tf32") run<float, false, C>(Tn, I, O, L, k, plan, split, bias, needs);
    else if (mode == "float16") run<__half, false, C>(Tn, I, O, L, k, plan, split, bias, needs);
    else if (mode == "bfloat16") run<__nv_bfloat16, false, C>(Tn, I, O, L, k, plan, split, bias, needs);
    else { std::fprintf(stderr, "unknown mode %s\n", mode.c_str()); return 2; }
    return 0;
}

// usage: harness MODE TILES PLAN SPLIT T I O L K BIAS NEEDS   (MODE float32|tf32|float16|bfloat16; TILES small|large|deep64:
// the tile shape of every kernel but the fused one (always small), or sm90:G: large, with y by the sm_90a kernel on
// G blocks per row tile (16-bit modes, two launches), or sm90h:G: H and the backward by the sm_90a kernels too
// (I, O and k multiples of 8; their ring of three stages, sm90h6:G of six); PLAN 0: two
// launches, -n: two launches with H in n shares of I, n > 0: fused with n groups; SPLIT: shares of T of the
// weight gradients and of O of dH; NEEDS six 0/1 digits
// for x, S1s, S2s, U1s, U2s, bias)
int main(int argc, char** argv) {
    if (argc != 12) { std::fprintf(stderr, "usage: harness MODE TILES PLAN SPLIT T I O L K BIAS NEEDS\n"); return 2; }
    const std::string mode = argv[1];
    const std::string tiles = argv[2];
    const int plan = std::atoi(argv[3]), split = std::atoi(argv[4]);
    const long long Tn = std::atoll(argv[5]), I = std::atoll(argv[6]), O = std::atoll(argv[7]);
    const int L = std::atoi(argv[8]), k = std::atoi(argv[9]);
    const bool bias = std::atoi(argv[10]) != 0;
    bool needs[6];
    for (int i = 0; i < 6; ++i) needs[i] = argv[11][i] == '1';
    if (tiles == "small") return run_mode<Small>(mode, Tn, I, O, L, k, plan, split, bias, needs);
    if (tiles == "large") return run_mode<Large>(mode, Tn, I, O, L, k, plan, split, bias, needs);
    if (tiles == "deep64") return run_mode<Deep64>(mode, Tn, I, O, L, k, plan, split, bias, needs);
    if (tiles.rfind("sm90:", 0) == 0 || tiles.rfind("sm90h", 0) == 0) {
        g_sm90_h = tiles[4] == 'h';
        g_sm90_stages = g_sm90_h && tiles[5] != ':' ? tiles[5] - '0' : 3;
        if (g_sm90_stages != 3 && g_sm90_stages != 6) { std::fprintf(stderr, "bad sm90 stages\n"); return 2; }
        g_sm90_groups = std::atoi(tiles.c_str() + tiles.find(':') + 1);
        if (g_sm90_groups < 1 || plan > 0 || (mode != "float16" && mode != "bfloat16")) { std::fprintf(stderr, "bad sm90 case\n"); return 2; }
        return run_mode<Large>(mode, Tn, I, O, L, k, plan, split, bias, needs);
    }
    std::fprintf(stderr, "unknown tiles %s\n", tiles.c_str());
    return 2;
}
