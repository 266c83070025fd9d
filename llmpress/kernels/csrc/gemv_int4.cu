// 4-bit dequantize-GEMV for llmpress's uniform packed format (layers/quant_linear.py).
//
// y[m, n] = sum_k x[m, k] * scale[n, g] * (code[n, k] - zero[n, g]),  g = g_idx[k] or k / group_size
//
// qweight int32 [N, K/8]: code k of row n is bits 4*(k%8) .. 4*(k%8)+3 of word k/8.
// scales fp16 [N, G]; qzeros int32 [N, ceil(G/8)] packed the same way; g_idx int32 [K] or null.
// x fp16 [M, K] with M <= 8 rows; y fp16 [M, N]. One warp per output column n: lanes stride over
// the words of row n, expand 8 codes per word, accumulate in fp32 per row, reduce with shuffles.
// Pure CUDA (no torch headers), so that `nvcc -c` checks it anywhere; gemv_int4_binding.cpp binds it.

#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int kMaxRows = 8;
constexpr int kWarp = 32;

__device__ __forceinline__ int nibble(const int32_t* row, int index) {
  return (static_cast<uint32_t>(row[index >> 3]) >> ((index & 7) * 4)) & 0xF;
}

__global__ void gemv_int4_kernel(const half* __restrict__ x, const int32_t* __restrict__ qweight,
                                 const half* __restrict__ scales, const int32_t* __restrict__ qzeros,
                                 const int32_t* __restrict__ g_idx, half* __restrict__ y, int M, int N,
                                 int K, int n_groups, int group_size) {
  const int n = blockIdx.x * blockDim.y + threadIdx.y;
  const int lane = threadIdx.x;
  if (n >= N) return;
  const int words = K / 8;
  const int zero_words = (n_groups + 7) / 8;
  const int32_t* wrow = qweight + static_cast<int64_t>(n) * words;
  const int32_t* zrow = qzeros + static_cast<int64_t>(n) * zero_words;
  const half* srow = scales + static_cast<int64_t>(n) * n_groups;

  float acc[kMaxRows];
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) acc[m] = 0.f;

  for (int w = lane; w < words; w += kWarp) {
    const uint32_t packed = static_cast<uint32_t>(wrow[w]);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int k = w * 8 + j;
      const int g = g_idx ? g_idx[k] : (n_groups == 1 ? 0 : k / group_size);
      const float weight = __half2float(srow[g]) * static_cast<float>(
          static_cast<int>((packed >> (4 * j)) & 0xF) - nibble(zrow, g));
#pragma unroll
      for (int m = 0; m < kMaxRows; ++m) {
        if (m < M) acc[m] += weight * __half2float(x[static_cast<int64_t>(m) * K + k]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    float v = acc[m];
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
    if (lane == 0 && m < M) y[static_cast<int64_t>(m) * N + n] = __float2half(v);
  }
}

}  // namespace

// Returns 0 on success, else a cudaError_t. K must be a multiple of 8 and M <= 8.
extern "C" int llmpress_gemv_int4(const void* x, const int32_t* qweight, const void* scales,
                                  const int32_t* qzeros, const int32_t* g_idx, void* y, int M, int N,
                                  int K, int n_groups, int group_size, void* stream) {
  if (M < 1 || M > kMaxRows || K % 8 != 0) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 block(kWarp, 4);
  const dim3 grid((N + block.y - 1) / block.y);
  gemv_int4_kernel<<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const half*>(x), qweight, static_cast<const half*>(scales), qzeros, g_idx,
      static_cast<half*>(y), M, N, K, n_groups, group_size);
  return static_cast<int>(cudaGetLastError());
}
