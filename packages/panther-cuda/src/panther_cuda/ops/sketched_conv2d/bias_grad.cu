// The bias gradient of the sketched conv2d op, db[o] = Σ_{n, h, w} g[n, o, h, w], as partial sums in float32
// (NVRTC; no host code). No atomics: each partial is one block's, summed in a fixed order, and the host sums
// the partials over their first axis, so the result is the same from run to run.
//
// bias_planes: g NCHW-contiguous, as N·O planes of HW contiguous values. One warp per plane, its lanes
//   along the plane (coalesced), eight loads in flight per lane: partial[n·O + o] = Σ_hw g[n, o, hw]. Loads of
//   V values: 16 bytes where g is 16-byte aligned and HW a multiple of V (V = 16 / sizeof(T)), else 1.
// bias_rows: g channels_last-contiguous, as N·H·W rows of O contiguous values. blockIdx.x takes 32 columns
//   (one per lane), blockIdx.y `per_block` rows, split over the block's warps row by row (each warp reads
//   32 adjacent values of a row): partial[blockIdx.y·O + o] = Σ over those rows of g[row, o].
#include "panther_cuda/common.cuh"

namespace panther {
namespace bias {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int UNROLL = 8;  // independent loads in flight per lane

// Each thread's UNROLL sums added in a fixed order into sums[threadIdx.x], for the block to read.
__device__ __forceinline__ void publish(const float (&acc)[UNROLL], float* sums) {
    float s = 0.f;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) s += acc[u];
    sums[threadIdx.x] = s;
    __syncthreads();
}

// The sum of the V values at p (one load; 16 bytes, aligned, for V > 1).
template <typename T, int V>
__device__ __forceinline__ float load_sum(const T* __restrict__ p) {
    if constexpr (V == 1) {
        return to_float<T>(*p);
    } else {
        static_assert(V * sizeof(T) == 16, "V values make one 16-byte load");
        const uint4 w = *reinterpret_cast<const uint4*>(p);
        const T* v = reinterpret_cast<const T*>(&w);
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i) s += to_float<T>(v[i]);
        return s;
    }
}

}  // namespace bias

template <typename T, int V>
__global__ void __launch_bounds__(bias::THREADS)
bias_planes(const T* __restrict__ g, float* __restrict__ partial, long long planes, int plane) {
    extern __shared__ __align__(16) unsigned char smem[];
    float* sums = reinterpret_cast<float*>(smem);  // one per thread
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const long long p = (long long)blockIdx.x * bias::WARPS + w;
    float acc[bias::UNROLL] = {};
    if (p < planes) {
        const T* row = g + p * plane;
        const int loads = plane / V;  // whole loads: the host passes V > 1 only where V divides the plane
        int i = lane;
        for (; i + 32 * (bias::UNROLL - 1) < loads; i += 32 * bias::UNROLL) {
#pragma unroll
            for (int u = 0; u < bias::UNROLL; ++u) acc[u] += bias::load_sum<T, V>(row + (i + 32 * u) * V);
        }
        for (; i < loads; i += 32) acc[0] += bias::load_sum<T, V>(row + i * V);
    }
    bias::publish(acc, sums);
    if (lane == 0 && p < planes) {
        float total = 0.f;
        for (int l = 0; l < 32; ++l) total += sums[w * 32 + l];
        partial[p] = total;
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
#define BIAS(T) \
    template __global__ void panther::bias_planes<T, 1>(const T*, float*, long long, int); \
    template __global__ void panther::bias_planes<T, 16 / sizeof(T)>(const T*, float*, long long, int); \
    template __global__ void panther::bias_rows<T>(const T*, float*, long long, int, long long);
BIAS(float)
BIAS(__half)
BIAS(__nv_bfloat16)
#endif  // PANTHER_NVCC_CHECK
