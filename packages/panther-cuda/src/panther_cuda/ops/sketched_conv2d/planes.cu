// Whole-tensor passes of the sketched conv2d op over its tensors' planes (NVRTC; no host code).
//
// transpose_planes: `planes` matrices of rows x cols, each row-major and contiguous after the one before, written
//   transposed (cols x rows, row-major) at the same offsets of out: NCHW to channels_last with rows = C and
//   cols = H·W, channels_last to NCHW with rows = H·W and cols = C. Block (t, p) takes tile t (TILE x TILE, row
//   tiles of `cols` / TILE each) of planes p, p + gridDim.y, ...: its threads read rows of the tile (adjacent
//   threads, adjacent values), stage it in shared memory (rows padded by 4 bytes: the column reads of 4- and
//   2-byte values fall in 32 different banks) and write rows of the transposed tile, so that both the reads and
//   the writes are coalesced.
// fill_planes: out NCHW-contiguous (N, C, H·W), out[n, c, :] = value[c]: the bias that a cuBLAS product then adds
//   to (its beta = 1). Each thread writes V values at a time (16 bytes, where the host found out aligned and
//   H·W a multiple of V; else V = 1), along the flattened index, grid-stride.
#include "panther_cuda/common.cuh"

namespace panther {
namespace planes {

constexpr int TILE = 32;  // values a tile's side
constexpr int ROWS = 8;   // threads along a tile's rows: each takes TILE / ROWS values of a column
constexpr int FILL_THREADS = 256;

}  // namespace planes

template <typename T>
__global__ void __launch_bounds__(planes::TILE * planes::ROWS)
transpose_planes(const T* __restrict__ in, T* __restrict__ out, int rows, int cols, long long planes) {
    __shared__ T tile[planes::TILE][planes::TILE + 4 / sizeof(T)];
    const int col_tiles = (cols + planes::TILE - 1) / planes::TILE;
    const int r0 = (int)(blockIdx.x / col_tiles) * planes::TILE, c0 = (int)(blockIdx.x % col_tiles) * planes::TILE;
    const long long size = (long long)rows * cols;
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        const T* src = in + p * size;
        T* dst = out + p * size;
        if (c0 + tx < cols) {
#pragma unroll
            for (int i = ty; i < planes::TILE; i += planes::ROWS)
                if (r0 + i < rows) tile[i][tx] = src[(long long)(r0 + i) * cols + c0 + tx];
        }
        __syncthreads();
        if (r0 + tx < rows) {
#pragma unroll
            for (int i = ty; i < planes::TILE; i += planes::ROWS)
                if (c0 + i < cols) dst[(long long)(c0 + i) * rows + r0 + tx] = tile[tx][i];
        }
        __syncthreads();  // the tile is rewritten for the next plane
    }
}

template <typename T, int V>
__global__ void __launch_bounds__(planes::FILL_THREADS)
fill_planes(T* __restrict__ out, const T* __restrict__ value, long long vectors, int plane_vectors, int C) {
    static_assert(V == 1 || V * sizeof(T) == 16, "V values make one 16-byte store");
    for (long long i = blockIdx.x * (long long)planes::FILL_THREADS + threadIdx.x; i < vectors;
         i += (long long)gridDim.x * planes::FILL_THREADS) {
        const T v = value[(i / plane_vectors) % C];
        if constexpr (V == 1) {
            out[i] = v;
        } else {  // V copies of v's bits in one 16-byte store
            unsigned word;
            if constexpr (sizeof(T) == 2) {
                const unsigned bits = *reinterpret_cast<const unsigned short*>(&v);
                word = bits | bits << 16;
            } else {
                word = *reinterpret_cast<const unsigned*>(&v);
            }
            reinterpret_cast<uint4*>(out)[i] = make_uint4(word, word, word, word);
        }
    }
}

}  // namespace panther

#ifdef PANTHER_NVCC_CHECK
// Every variant the host code launches (forward.py), for the compile check of CI.
#define PLANES(T) \
    template __global__ void panther::transpose_planes<T>(const T*, T*, int, int, long long); \
    template __global__ void panther::fill_planes<T, 1>(T*, const T*, long long, int, int); \
    template __global__ void panther::fill_planes<T, 16 / sizeof(T)>(T*, const T*, long long, int, int);
PLANES(float)
PLANES(__half)
PLANES(__nv_bfloat16)
#endif  // PANTHER_NVCC_CHECK
