// Layout changes of the sketched conv2d op's tensors between NCHW and channels_last (NVRTC; no host code).
//
// transpose_planes: `planes` matrices of rows x cols, each row-major and contiguous after the one before, written
//   transposed (cols x rows, row-major) at the same offsets of out: NCHW to channels_last with rows = C and
//   cols = H·W, channels_last to NCHW with rows = H·W and cols = C. Block (t, p) takes tile t (TILE x TILE, row
//   tiles of `cols` / TILE each) of planes p, p + gridDim.y, ...: its threads read rows of the tile (adjacent
//   threads, adjacent values), stage it in shared memory (rows padded by 4 bytes: the column reads of 4- and
//   2-byte values fall in 32 different banks) and write rows of the transposed tile, so that both the reads and
//   the writes are coalesced.
#include "panther_cuda/common.cuh"

namespace panther {
namespace layout {

constexpr int TILE = 32;  // values a tile's side
constexpr int ROWS = 8;   // threads along a tile's rows: each takes TILE / ROWS values of a column

}  // namespace layout

template <typename T>
__global__ void __launch_bounds__(layout::TILE * layout::ROWS)
transpose_planes(const T* __restrict__ in, T* __restrict__ out, int rows, int cols, long long planes) {
    __shared__ T tile[layout::TILE][layout::TILE + 4 / sizeof(T)];
    const int col_tiles = (cols + layout::TILE - 1) / layout::TILE;
    const int r0 = (int)(blockIdx.x / col_tiles) * layout::TILE, c0 = (int)(blockIdx.x % col_tiles) * layout::TILE;
    const long long size = (long long)rows * cols;
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (long long p = blockIdx.y; p < planes; p += gridDim.y) {
        const T* src = in + p * size;
        T* dst = out + p * size;
        if (c0 + tx < cols) {
#pragma unroll
            for (int i = ty; i < layout::TILE; i += layout::ROWS)
                if (r0 + i < rows) tile[i][tx] = src[(long long)(r0 + i) * cols + c0 + tx];
        }
        __syncthreads();
        if (r0 + tx < rows) {
#pragma unroll
            for (int i = ty; i < layout::TILE; i += layout::ROWS)
                if (c0 + i < cols) dst[(long long)(c0 + i) * rows + r0 + tx] = tile[tx][i];
        }
        __syncthreads();  // the tile is rewritten for the next plane
    }
}

}  // namespace panther

#ifdef PANTHER_NVCC_CHECK
// Every variant the host code launches (forward.py), for the compile check of CI.
#define TRANSPOSE(T) template __global__ void panther::transpose_planes<T>(const T*, T*, int, int, long long);
TRANSPOSE(float)
TRANSPOSE(__half)
TRANSPOSE(__nv_bfloat16)
#endif  // PANTHER_NVCC_CHECK
