// The bias gradient of the sketched conv2d op, db[o] = Σ_{n, h, w} g[n, o, h, w], summed in float32 (NVRTC; no
// host code). No atomics: every sum runs in a fixed order, so the result is the same from run to run.
//
// bias_channels: g NCHW-contiguous, N planes of HW contiguous values per channel o. Block (o, s) sums channel o
//   over images s·per .. s·per + per - 1: its threads run along the flattened (image, value) index (coalesced,
//   eight loads in flight per thread) and their sums are added in a fixed order: out[s·O + o]. With one block
//   per channel (s = 0 only) out is db itself, written in its dtype TO; else float32 partials that the host
//   sums over s. Loads of V values: 16 bytes where g is 16-byte aligned and HW a multiple of V
//   (V = 16 / sizeof(T)), else 1.
// bias_rows: g channels_last-contiguous, as N·H·W rows of O contiguous values. blockIdx.x takes 32 columns
//   (one per lane), blockIdx.y `per_block` rows, split over the block's warps row by row (each warp reads
//   32 adjacent values of a row): partial[blockIdx.y·O + o] = Σ over those rows of g[row, o]; the host sums
//   the partials over their first axis.
#include "panther_cuda/common.cuh"

namespace panther {
namespace bias {

constexpr int THREADS = 256;  // bias_rows
constexpr int WARPS = THREADS / 32;
constexpr int CHANNEL_THREADS = 512;  // bias_channels
constexpr int UNROLL = 8;  // independent loads in flight per lane

// Each thread's UNROLL sums added in a fixed order into sums[threadIdx.x], for the block to read.
__device__ __forceinline__ void publish(const float (&acc)[UNROLL], float* sums) {
    float s = 0.f;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) s += acc[u];
    sums[threadIdx.x] = s;
    __syncthreads();
}

// V values of g in one load (16 bytes, aligned, for V > 1), kept as loaded until vector_sum, so that a thread
// issues all its loads of a step before it waits on the first.
template <typename T, int V> struct Vector { uint4 w; };
template <typename T> struct Vector<T, 1> { T w; };

template <typename T, int V>
__device__ __forceinline__ Vector<T, V> load_vector(const T* __restrict__ p) {
    static_assert(V == 1 || V * sizeof(T) == 16, "V values make one 16-byte load");
    Vector<T, V> v;
    v.w = *reinterpret_cast<const decltype(v.w)*>(p);
    return v;
}

template <typename T, int V>
__device__ __forceinline__ float vector_sum(const Vector<T, V>& v) {
    if constexpr (V == 1) {
        return to_float<T>(v.w);
    } else {
        const T* e = reinterpret_cast<const T*>(&v.w);
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i) s += to_float<T>(e[i]);
        return s;
    }
}

}  // namespace bias

template <typename T, int V, typename TO>
__global__ void __launch_bounds__(bias::CHANNEL_THREADS)
bias_channels(const T* __restrict__ g, TO* __restrict__ out, int N, int O, int plane, int per) {
    extern __shared__ __align__(16) unsigned char smem[];
    float* sums = reinterpret_cast<float*>(smem);  // one per thread
    constexpr unsigned STEP = bias::CHANNEL_THREADS * bias::UNROLL;
    const int o = blockIdx.x, n0 = blockIdx.y * per;
    const int images = N - n0 < per ? N - n0 : per;
    // the host passes V > 1 only where V divides the plane, and per·plane / V < 2^31
    const unsigned L = plane / V, total = images > 0 ? (unsigned)images * L : 0u;
    const unsigned dq = STEP / L, dr = STEP % L;  // a cursor's step, in (image, value) of the flattened index
    const long long image_stride = (long long)O * plane;
    const T* base = g + ((long long)n0 * O + o) * plane;
    float acc[bias::UNROLL] = {};
    unsigned img[bias::UNROLL], at[bias::UNROLL];  // UNROLL cursors, CHANNEL_THREADS apart
#pragma unroll
    for (int u = 0; u < bias::UNROLL; ++u) {
        const unsigned j = threadIdx.x + u * bias::CHANNEL_THREADS;
        img[u] = j / L;
        at[u] = j % L;
    }
    auto at_cursor = [&](int u) { return base + img[u] * image_stride + (long long)at[u] * V; };
    unsigned j = threadIdx.x;  // cursor 0's index; cursor u's is j + u CHANNEL_THREADS
    for (; j + (bias::UNROLL - 1) * bias::CHANNEL_THREADS < total; j += STEP) {  // every cursor in range
        bias::Vector<T, V> v[bias::UNROLL];
#pragma unroll
        for (int u = 0; u < bias::UNROLL; ++u) v[u] = bias::load_vector<T, V>(at_cursor(u));
#pragma unroll
        for (int u = 0; u < bias::UNROLL; ++u) {
            acc[u] += bias::vector_sum<T, V>(v[u]);
            img[u] += dq;
            at[u] += dr;
            if (at[u] >= L) {
                at[u] -= L;
                ++img[u];
            }
        }
    }
#pragma unroll
    for (int u = 0; u < bias::UNROLL; ++u)  // the last step: the cursors still in range
        if (j + u * bias::CHANNEL_THREADS < total) acc[u] += bias::vector_sum<T, V>(bias::load_vector<T, V>(at_cursor(u)));
    bias::publish(acc, sums);
    if (threadIdx.x < 32) {  // lane l: the sums of threads l, l + 32, ... in order
        float part = 0.f;
        for (int w = 0; w < bias::CHANNEL_THREADS / 32; ++w) part += sums[w * 32 + threadIdx.x];
        sums[threadIdx.x] = part;  // read above by this lane alone
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float total_sum = 0.f;
        for (int l = 0; l < 32; ++l) total_sum += sums[l];
        out[(long long)blockIdx.y * O + o] = from_float<TO>(total_sum);
    }
}

template <typename T>
__global__ void __launch_bounds__(bias::THREADS)
bias_rows(const T* __restrict__ g, float* __restrict__ partial, long long rows, int O, long long per_block) {
    extern __shared__ __align__(16) unsigned char smem[];
    float* sums = reinterpret_cast<float*>(smem);  // WARPS x 32
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int o = blockIdx.x * 32 + lane;
    const long long r0 = (long long)blockIdx.y * per_block;
    const long long r1 = r0 + per_block < rows ? r0 + per_block : rows;
    float acc[bias::UNROLL] = {};
    if (o < O) {
        long long r = r0 + w;
        for (; r + (long long)bias::WARPS * (bias::UNROLL - 1) < r1; r += (long long)bias::WARPS * bias::UNROLL) {
#pragma unroll
            for (int u = 0; u < bias::UNROLL; ++u) acc[u] += to_float<T>(g[(r + bias::WARPS * u) * O + o]);
        }
        for (; r < r1; r += bias::WARPS) acc[0] += to_float<T>(g[r * O + o]);
    }
    bias::publish(acc, sums);
    if (w == 0 && o < O) {
        float total = 0.f;
        for (int v = 0; v < bias::WARPS; ++v) total += sums[v * 32 + lane];
        partial[(long long)blockIdx.y * O + o] = total;
    }
}

}  // namespace panther

#ifdef PANTHER_NVCC_CHECK
// Every variant the host code launches (backward.py), for the compile check of CI.
#define BIAS_CHANNELS(T, TO) \
    template __global__ void panther::bias_channels<T, 1, TO>(const T*, TO*, int, int, int, int); \
    template __global__ void panther::bias_channels<T, 16 / sizeof(T), TO>(const T*, TO*, int, int, int, int);
#define BIAS(T) BIAS_CHANNELS(T, float) template __global__ void panther::bias_rows<T>(const T*, float*, long long, int, long long);
BIAS(float)
BIAS(__half)
BIAS(__nv_bfloat16)
BIAS_CHANNELS(__half, __half)  // db in T itself (float32's is the float instance)
BIAS_CHANNELS(__nv_bfloat16, __nv_bfloat16)
#endif  // PANTHER_NVCC_CHECK
