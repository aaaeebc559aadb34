// CUDA entry points: rotary (q and k in one launch, forward or conj/backward) and flash-attn's
// elementwise apply_rotary. The kernels and their launch planning: rotary_cuda_kernels.cuh.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "rotary_cuda_kernels.cuh"
#include "rotary_ops.h"

using namespace rotary_kernels;

namespace {

// Streaming multiprocessors of the current device (cached; the device guard is already set).
int64_t sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) dev = 0;
  if (cache[dev] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cache[dev] = n;
  }
  return cache[dev];
}

// Launches a kernel instance on the current stream.
struct CudaLauncher {
  cudaStream_t stream;
  template <int VEC, bool VECTOR, bool CS_VECTOR, bool INTERLEAVED, typename Params>
  void run(const Params& p, LaunchShape grid, LaunchShape block) {
    using scalar_t = typename Params::scalar_type;
    using cs_t = typename Params::cs_type;
    rotary_kernel<scalar_t, cs_t, VEC, VECTOR, CS_VECTOR, INTERLEAVED>
        <<<dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y)),
           dim3(static_cast<unsigned>(block.x), static_cast<unsigned>(block.y)), 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

void rotary_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                 const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                 bool interleaved, bool conj, const IndexArgs& ix) {
  const c10::cuda::CUDAGuard guard(q.device());
  CudaLauncher launcher{c10::cuda::getCurrentCUDAStream()};
  dispatch_rotary_types(q, cos, sin, [&](auto x_tag, auto cs_tag, const at::Tensor& c, const at::Tensor& s) {
    rotary_plan<decltype(x_tag), decltype(cs_tag)>(q, k, c, s, q_out, k_out, interleaved, conj, ix, sm_count(),
                                                   launcher);
  });
}

void apply_rotary_cuda(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& out1, const at::Tensor& out2, bool conj) {
  const c10::cuda::CUDAGuard guard(x1.device());
  const int64_t n = x1.numel();
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535LL * 8);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_elementwise(x1, x2, cos, sin, out1, out2, conj, [&](const auto& e) {
    apply_rotary_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(e);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
