// Runs the bias gradient kernels of bias_grad.cu (bias_channels on an NCHW g, bias_rows on a channels_last g)
// on the CPU under ../emulation/cuda_emulation.h, sums their partials over the first axis as the host code
// does (backward.bias_grad), and prints the max-normalised error of db against float64 loops written here
// from the definition db[o] = Σ_{n, h, w} g[n, o, h, w]. Partials start as NaN and shared memory as NaN
// bytes before every block, so a partial a kernel forgets to write, or a sum read before it is written, shows.
// With one bias_channels block per channel (the kernel writes db itself), it runs again writing T, and
// prints "rounded <count>": how many of those values differ from the float32 run's db rounded to T.
#include "harness.h"
#undef __launch_bounds__
#define __launch_bounds__(...)
namespace panther { alignas(16) unsigned char smem[1 << 16]; }
#include "bias_grad.cu"
using namespace panther;

template <typename T>
static void run(bool clast, bool vector, long long N, int O, int H, int W, long long per_block, long long chunks) {
    std::mt19937 gen(4321);
    const long long P = (long long)H * W, rows = N * P;
    auto g = rnd<T>(N * O * P, 1.0, gen);  // NCHW: (n, o, p) at (n O + o) P + p; channels_last: (n p) O + o
    std::vector<double> ref(O, 0.0), got(O, 0.0);
    for (long long n = 0; n < N; ++n)
        for (int o = 0; o < O; ++o)
            for (long long p = 0; p < P; ++p) ref[o] += g.at(clast ? (n * P + p) * O + o : (n * O + o) * P + p);
    if (!clast) {  // bias_channels: per images a block, chunks blocks per channel
        const unsigned shared = bias::CHANNEL_THREADS * sizeof(float);
        auto launch = [&](auto* out) {
            emu_launch((unsigned)O, bias::CHANNEL_THREADS, shared, panther::smem, sizeof(panther::smem), [&] {
                if (vector) bias_channels<T, 16 / sizeof(T)>(g.p(), out, (int)N, O, (int)P, (int)per_block);
                else bias_channels<T, 1>(g.p(), out, (int)N, O, (int)P, (int)per_block);
            }, (unsigned)chunks);
        };
        Buf<float> partial(chunks * O);
        launch(partial.p());
        for (long long c = 0; c < chunks; ++c)
            for (int o = 0; o < O; ++o) got[o] += partial.at(c * O + o);
        report("db", got, ref);
        if (chunks == 1) {
            Buf<T> db(O);
            launch(db.p());
            int differ = 0;
            for (int o = 0; o < O; ++o) differ += db.at(o) != to_float(from_float<T>(partial.v[o]));
            std::printf("rounded %d\n", differ);
        }
        return;
    }
    const unsigned shared = bias::THREADS * sizeof(float);
    {
        Buf<float> partial(chunks * O);
        emu_launch(cdv(O, 32), bias::THREADS, shared, panther::smem, sizeof(panther::smem),
                   [&] { bias_rows<T>(g.p(), partial.p(), rows, O, per_block); }, (unsigned)chunks);
        for (long long c = 0; c < chunks; ++c)
            for (int o = 0; o < O; ++o) got[o] += partial.at(c * O + o);
    }
    report("db", got, ref);
}

// usage: bias_grad MODE LAYOUT N O H W PER_BLOCK CHUNKS   (MODE float32|float16|bfloat16; LAYOUT nchw|channels_last,
// or nchw16: bias_channels in 16-byte loads; PER_BLOCK and CHUNKS: the host code's plan, bias_rows' rows or
// bias_channels' images a block and blocks)
int main(int argc, char** argv) {
    if (argc != 9) { std::fprintf(stderr, "usage: bias_grad MODE LAYOUT N O H W PER_BLOCK CHUNKS\n"); return 2; }
    const std::string mode = argv[1];
    const bool clast = std::string(argv[2]) == "channels_last", vector = std::string(argv[2]) == "nchw16";
    const long long N = std::atoll(argv[3]), per = std::atoll(argv[7]), chunks = std::atoll(argv[8]);
    const int O = std::atoi(argv[4]), H = std::atoi(argv[5]), W = std::atoi(argv[6]);
    if (mode == "float32") run<float>(clast, vector, N, O, H, W, per, chunks);
    else if (mode == "float16") run<__half>(clast, vector, N, O, H, W, per, chunks);
    else if (mode == "bfloat16") run<__nv_bfloat16>(clast, vector, N, O, H, W, per, chunks);
    else { std::fprintf(stderr, "unknown mode %s\n", mode.c_str()); return 2; }
    return 0;
}
