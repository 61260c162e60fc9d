// Runs the halo kernels of sketched_conv2d.cu (sketched_conv2d_fwd_halo, conv_rank_halo, with the loader the
// plan's flags name: HALO_ASYNC* the cp.async copies, HALO_VECTOR conv_rank_halo's 8-byte loader alone,
// which the forward does not have, else element loads; HALO_TAPS the tap-major plans, S passed to them as
// (R, kh, kw, C)) on the CPU under
// ../emulation/cuda_emulation.h and prints, for y and z, the max-normalised error against
// float64 loops written here from the op's definition (|got - ref|max / |ref|max). Outputs start as NaN
// and shared memory as NaN bytes before every block, so a value a kernel forgets to write, or reads before
// writing, shows. The tile plan (TH, TW, CC, flags, halo buffer) comes from the host code (forward.py). Past
// R = 64, z alone, in column blocks of 64 (the forward keeps Z on chip only up to 64).
#include "harness.h"
#undef __launch_bounds__
#define __launch_bounds__(...)
namespace panther { alignas(16) unsigned char smem[1 << 20]; }
#include "sketched_conv2d.cu"
using namespace panther;

constexpr int NTHREADS = conv::THREADS;

static void launch(long long blocks, unsigned shared, const std::function<void()>& body, unsigned blocks_y = 1) {
    emu_launch(blocks, NTHREADS, shared, panther::smem, sizeof(panther::smem), body, blocks_y);
}

struct Args {
    bool clast;
    long long N;
    int C, H, W, O, R, terms, kh, kw, sh, sw, ph, pw, dh, dw, bm, TH, TW, CC, flags;
    unsigned shared;
    bool bias;
};

// Strides (n, c, h, w) of an (N, C, H, W) tensor, NCHW or channels_last.
static void strides(bool clast, long long C, long long H, long long W, long long (&s)[4]) {
    if (clast) { s[0] = H * W * C; s[1] = 1; s[2] = W * C; s[3] = C; }
    else { s[0] = C * H * W; s[1] = H * W; s[2] = W; s[3] = 1; }
}

template <typename T, bool EXACT, int RP, int BM>
static void run(const Args& a) {
    std::mt19937 gen(1234);
    const int K = a.C * a.kh * a.kw;
    const int Ho = (a.H + 2 * a.ph - a.dh * (a.kh - 1) - 1) / a.sh + 1;
    const int Wo = (a.W + 2 * a.pw - a.dw * (a.kw - 1) - 1) / a.sw + 1;
    const long long M = a.N * Ho * Wo;
    long long sx[4], sy[4], sz[4];
    strides(a.clast, a.C, a.H, a.W, sx);
    strides(a.clast, a.O, Ho, Wo, sy);
    strides(a.clast, a.R, Ho, Wo, sz);
    auto x = rnd<T>(a.N * a.C * a.H * a.W, 1.0, gen);
    auto S = rnd<T>((size_t)a.R * K, 1 / std::sqrt((double)K), gen);
    auto U = rnd<T>((size_t)a.R * a.O, 1 / std::sqrt((double)a.R), gen);
    auto b = rnd<T>(a.O, 1.0, gen);
    Buf<T> y(M * a.O), z(M * a.R);
    const float scale = 1.0f / a.terms, zscale = 0.75f;
    const long long blocks = a.N * cdv(Ho, a.TH) * cdv(Wo, a.TW);
    const bool async = (a.flags & conv::HALO_ASYNC) != 0, taps = (a.flags & conv::HALO_TAPS) != 0;
    const bool xvec = !async && (a.flags & conv::HALO_VECTOR) != 0;  // conv_rank_halo's 8-byte loader; no forward then
    auto fwd = async ? sketched_conv2d_fwd_halo<T, RP, EXACT, BM, conv::LOAD_ASYNC>
                     : sketched_conv2d_fwd_halo<T, RP, EXACT, BM, conv::LOAD_ELEMENTS>;
    auto rank = async ? conv_rank_halo<T, RP, EXACT, BM, conv::LOAD_ASYNC>
                : xvec ? conv_rank_halo<T, RP, EXACT, BM, conv::LOAD_ROWS8>
                       : conv_rank_halo<T, RP, EXACT, BM, conv::LOAD_ELEMENTS>;
    Buf<T> St((size_t)a.R * K);  // the tap-major plans read S as (R, kh, kw, C)
    for (int r = 0; r < a.R; ++r)
        for (int c = 0; c < a.C; ++c)
            for (int t = 0; t < a.kh * a.kw; ++t) St.v[(size_t)r * K + (size_t)t * a.C + c] = S.v[(size_t)r * K + (size_t)c * a.kh * a.kw + t];
    if (taps) {
        if constexpr (sizeof(T) == 2 && !EXACT) {
            fwd = async ? sketched_conv2d_fwd_halo<T, RP, EXACT, BM, conv::LOAD_TAPS | conv::LOAD_ASYNC>
                        : sketched_conv2d_fwd_halo<T, RP, EXACT, BM, conv::LOAD_TAPS>;
            rank = async ? conv_rank_halo<T, RP, EXACT, BM, conv::LOAD_TAPS | conv::LOAD_ASYNC>
                         : conv_rank_halo<T, RP, EXACT, BM, conv::LOAD_TAPS>;
        } else {
            std::fprintf(stderr, "HALO_TAPS: 16-bit types\n");
            std::exit(2);
        }
    }
    const T* Sk = taps ? St.p() : S.p();
    const bool fused = !xvec && a.R <= RP;  // the forward keeps Z on chip: R <= RP; z alone takes column blocks
    if (fused) launch(blocks, a.shared, [&] {
        fwd(x.p(), Sk, U.p(), a.bias ? b.p() : nullptr, y.p(), a.C, a.H, a.W, Ho,
                                                   Wo, a.kh, a.kw, a.sh, a.sw, a.ph, a.pw, a.dh, a.dw, M, a.R, a.O, sx[0],
                                                   sx[1], sx[2], sx[3], sy[0], sy[1], sy[2], sy[3], scale, a.TH, a.TW,
                                                   a.CC, a.flags);
    });
    launch(blocks, a.shared, [&] {
        rank(x.p(), Sk, z.p(), a.C, a.H, a.W, Ho, Wo, a.kh, a.kw, a.sh, a.sw, a.ph, a.pw, a.dh, a.dw, M, a.R, sx[0],
             sx[1], sx[2], sx[3], sz[0], sz[1], sz[2], sz[3], zscale, a.TH, a.TW, a.CC, a.flags);
    }, (unsigned)cdv(a.R, RP));
    // float64 reference from the definition: Z[n, r, oh, ow] = Σ_{c, i, j} x[n, c, oh sh - ph + i dh, ...] S[r, c, i, j]
    std::vector<double> Z(M * a.R), gy(M * a.O), ry(M * a.O), gz(M * a.R), rz(M * a.R);
    for (long long n = 0; n < a.N; ++n)
        for (int oh = 0; oh < Ho; ++oh)
            for (int ow = 0; ow < Wo; ++ow) {
                const long long m = (n * Ho + oh) * Wo + ow;
                for (int r = 0; r < a.R; ++r) {
                    double s = 0;
                    for (int c = 0; c < a.C; ++c)
                        for (int i = 0; i < a.kh; ++i)
                            for (int j = 0; j < a.kw; ++j) {
                                const int ih = oh * a.sh - a.ph + i * a.dh, iw = ow * a.sw - a.pw + j * a.dw;
                                if (ih < 0 || ih >= a.H || iw < 0 || iw >= a.W) continue;
                                s += x.at(n * sx[0] + c * sx[1] + ih * sx[2] + iw * sx[3]) *
                                     S.at((size_t)r * K + (c * a.kh + i) * a.kw + j);
                            }
                    Z[m * a.R + r] = s;
                    const long long zi = n * sz[0] + r * sz[1] + oh * sz[2] + ow * sz[3];
                    rz[m * a.R + r] = s * zscale;
                    gz[m * a.R + r] = z.at(zi);
                }
                for (int o = 0; o < a.O; ++o) {
                    double s = 0;
                    for (int r = 0; r < a.R; ++r) s += Z[m * a.R + r] * U.at((size_t)r * a.O + o);
                    ry[m * a.O + o] = s * scale + (a.bias ? b.at(o) : 0.0);
                    gy[m * a.O + o] = y.at(n * sy[0] + o * sy[1] + oh * sy[2] + ow * sy[3]);
                }
            }
    if (fused) report("y", gy, ry);
    report("z", gz, rz);
}

template <typename T, bool EXACT, int RP>
static void run_bm(const Args& a) {
    if (a.bm == 64) run<T, EXACT, RP, 64>(a);
    else if (a.bm == 128) run<T, EXACT, RP, 128>(a);
    else { std::fprintf(stderr, "BM: 64 or 128\n"); std::exit(2); }
}

template <typename T, bool EXACT>
static void run_rp(const Args& a) {
    if (a.R <= 16) run_bm<T, EXACT, 16>(a);
    else if (a.R <= 32) run_bm<T, EXACT, 32>(a);
    else run_bm<T, EXACT, 64>(a);  // z in column blocks of 64 (no forward past 64)
}

// usage: harness MODE LAYOUT N C H W O TERMS R KH KW SH SW PH PW DH DW BM TH TW CC FLAGS SHARED BIAS
// (MODE float32|tf32|float16|bfloat16; LAYOUT nchw|channels_last; y's scale is 1/TERMS, z's 0.75)
int main(int argc, char** argv) {
    if (argc != 25) { std::fprintf(stderr, "usage: harness MODE LAYOUT N C H W O TERMS R KH KW SH SW PH PW DH DW BM TH TW CC FLAGS SHARED BIAS\n"); return 2; }
    const std::string mode = argv[1];
    Args a;
    a.clast = std::string(argv[2]) == "channels_last";
    a.N = std::atoll(argv[3]);
    int* f[] = {&a.C, &a.H, &a.W, &a.O, &a.terms, &a.R, &a.kh, &a.kw, &a.sh, &a.sw, &a.ph, &a.pw, &a.dh, &a.dw,
                &a.bm, &a.TH, &a.TW, &a.CC, &a.flags};
    for (int i = 0; i < 19; ++i) *f[i] = std::atoi(argv[4 + i]);
    a.shared = (unsigned)std::atol(argv[23]);
    a.bias = std::atoi(argv[24]) != 0;
    if (mode == "float32") run_rp<float, true>(a);
    else if (mode == "tf32") run_rp<float, false>(a);
    else if (mode == "float16") run_rp<__half, false>(a);
    else if (mode == "bfloat16") run_rp<__nv_bfloat16, false>(a);
    else { std::fprintf(stderr, "unknown mode %s\n", mode.c_str()); return 2; }
    return 0;
}
