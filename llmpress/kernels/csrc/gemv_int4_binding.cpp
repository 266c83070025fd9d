// torch binding of llmpress_gemv_int4 (gemv_int4.cu); built by llmpress/kernels/cuda_ext.py only
// where a CUDA build of torch is installed.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

extern "C" int llmpress_gemv_int4(const void* x, const int32_t* qweight, const void* scales,
                                  const int32_t* qzeros, const int32_t* g_idx, void* y, int M, int N,
                                  int K, int n_groups, int group_size, void* stream);

torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor qzeros,
                        c10::optional<torch::Tensor> g_idx, int64_t group_size) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kHalf && x.dim() == 2, "x must be a 2-D fp16 CUDA tensor");
  TORCH_CHECK(qweight.scalar_type() == torch::kInt && qzeros.scalar_type() == torch::kInt, "packed tensors are int32");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf, "scales must be fp16");
  const auto M = x.size(0), K = x.size(1), N = qweight.size(0);
  auto y = torch::empty({M, N}, x.options());
  const int32_t* g = g_idx.has_value() ? g_idx->data_ptr<int32_t>() : nullptr;
  const int err = llmpress_gemv_int4(x.contiguous().data_ptr(), qweight.data_ptr<int32_t>(), scales.data_ptr(),
                                     qzeros.data_ptr<int32_t>(), g, y.data_ptr(), M, N, K, scales.size(1),
                                     group_size, at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "llmpress_gemv_int4 failed with CUDA error ", err);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv_int4", &gemv_int4, "4-bit dequantize-GEMV (M <= 8)"); }
