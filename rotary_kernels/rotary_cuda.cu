// CUDA entry points: rotary (q and k in one launch, forward or conj/backward) and flash-attn's
// elementwise apply_rotary. The kernels and their launch planning: rotary_cuda_kernels.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <torch/library.h>

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
  template <int VEC, bool VECTOR, bool CS_VECTOR, bool INTERLEAVED, bool K_TABLES, bool PAIRS = false,
            typename Params>
  void run(const Params& p, LaunchShape grid, LaunchShape block) {
    using scalar_t = typename Params::scalar_type;
    using cs_t = typename Params::cs_type;
    rotary_kernel<scalar_t, cs_t, VEC, VECTOR, CS_VECTOR, INTERLEAVED, K_TABLES, PAIRS>
        <<<dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y)),
           dim3(static_cast<unsigned>(block.x), static_cast<unsigned>(block.y)), 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <int VEC, bool VECTOR, bool ROWS32, typename scalar_t, typename acc_t>
  void run_elementwise(const Elementwise<scalar_t, acc_t>& e, const ElementwisePlan& plan) {
    apply_rotary_kernel<scalar_t, acc_t, VEC, VECTOR, ROWS32>
        <<<dim3(static_cast<unsigned>(plan.grid.x)),
           dim3(static_cast<unsigned>(plan.block.x), static_cast<unsigned>(plan.block.y)), 0, stream>>>(
            e, plan.rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Whether this build has a kernel image (SASS, or PTX the driver can JIT) for the device:
// cudaFuncGetAttributes fails with cudaErrorNoKernelImageForDevice otherwise. Cached per device.
// Python's backend selection asks once per device and falls back to Triton when not.
bool cuda_image_ok(int64_t device) {
  static int8_t cache[64] = {0};  // 0 unknown, 1 yes, -1 no
  const bool cacheable = device >= 0 && device < 64;
  if (cacheable && cache[device] != 0) return cache[device] > 0;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attr;
  const cudaError_t err =
      cudaFuncGetAttributes(&attr, rotary_kernel<at::BFloat16, at::BFloat16, 8, true, true, false, false>);
  if (err != cudaSuccess) (void)cudaGetLastError();  // clear the sticky-free error state
  const bool ok = err == cudaSuccess;
  RK_CHECK(ok || err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidKernelImage,
           "rotary_kernels: cudaFuncGetAttributes failed: ", cudaGetErrorString(err));
  if (cacheable) cache[device] = ok ? 1 : -1;
  return ok;
}

}  // namespace

void rotary_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                 const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                 bool interleaved, bool conj, const TokenIndexArgs& ix, const std::optional<at::Tensor>& cos_k,
                 const std::optional<at::Tensor>& sin_k, bool pair_tables, bool swap_layout) {
  const c10::cuda::CUDAGuard guard(q.device());
  CudaLauncher launcher{c10::cuda::getCurrentCUDAStream()};
  dispatch_rotary_types(q, cos, sin, cos_k, sin_k,
                        [&](auto x_tag, auto cs_tag, const at::Tensor& c, const at::Tensor& s, const at::Tensor& ck,
                            const at::Tensor& sk) {
                          const auto t = shared_table_strides(c, s, ck, sk);
                          rotary_plan<decltype(x_tag), decltype(cs_tag)>(q, k, t[0], t[1], q_out, k_out, interleaved,
                                                                         conj, ix, sm_count(), launcher, t[2], t[3],
                                                                         pair_tables, swap_layout);
                        });
}

void apply_rotary_cuda(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& out1, const at::Tensor& out2, bool conj) {
  const c10::cuda::CUDAGuard guard(x1.device());
  if (x1.numel() == 0) return;
  CudaLauncher launcher{c10::cuda::getCurrentCUDAStream()};
  dispatch_elementwise(x1, x2, cos, sin, out1, out2, conj, [&](const auto& e) { apply_rotary_plan(e, launcher); });
}

// Registered here rather than in torch_binding.cpp: it exists only in CUDA builds.
#define RK_LIBRARY_FRAGMENT(NAME, MODULE) TORCH_LIBRARY_FRAGMENT(NAME, MODULE)
RK_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, m) { m.def("cuda_image_ok(int device) -> bool", &cuda_image_ok); }
