// The CUDA rotary kernel run on the CPU: CUDA's built-ins defined as plain host code, and a
// launcher that walks every block and thread of the grid in turn. The kernel uses no shared
// memory and no barriers and its threads write disjoint elements, so this computes exactly
// what the GPU computes, with the same launch planning (rotary_plan). Built by
// tests/test_cuda_sim.py so that a machine without a GPU still tests the CUDA kernel's logic.
#include <torch/extension.h>

#include <vector>

namespace sim {
struct Dim3 {
  int64_t x = 0, y = 0, z = 0;
};
}  // namespace sim
static sim::Dim3 blockIdx, threadIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define RK_KERNEL_ASSERT(cond) TORCH_CHECK_INDEX(cond, "rotary (CUDA simulation): position outside the cos/sin cache")

#include "rotary_cuda_kernels.cuh"

using namespace rotary_kernels;

namespace {

struct SimLauncher {
  std::vector<int64_t> info;  // grid.x, grid.y, block.x, block.y, VEC, VECTOR, CS_VECTOR
  template <int VEC, bool VECTOR, bool CS_VECTOR, bool INTERLEAVED, typename Params>
  void run(const Params& p, LaunchShape grid, LaunchShape block) {
    using scalar_t = typename Params::scalar_type;
    using cs_t = typename Params::cs_type;
    TORCH_CHECK(block.x >= 1 && block.y >= 1 && block.x * block.y <= kThreads, "bad block ", block.x, "x", block.y);
    TORCH_CHECK(grid.x >= 1 && grid.x <= 2147483647 && grid.y >= 1 && grid.y <= 65535, "bad grid");
    info = {grid.x, grid.y, block.x, block.y, VEC, VECTOR, CS_VECTOR};
    gridDim = {grid.x, grid.y, 1};
    blockDim = {block.x, block.y, 1};
    for (int64_t by = 0; by < grid.y; ++by)
      for (int64_t bx = 0; bx < grid.x; ++bx)
        for (int64_t ty = 0; ty < block.y; ++ty)
          for (int64_t tx = 0; tx < block.x; ++tx) {
            blockIdx = {bx, by, 0};
            threadIdx = {tx, ty, 0};
            rotary_kernel<scalar_t, cs_t, VEC, VECTOR, CS_VECTOR, INTERLEAVED>(p);
          }
  }
};

// Same contract as the rotary op (shapes already valid); returns the launch it made.
std::vector<int64_t> rotary_sim(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                                bool interleaved, bool conj, int64_t sms,
                                const std::optional<at::Tensor>& positions = std::nullopt,
                                const std::optional<at::Tensor>& cu_seqlens = std::nullopt,
                                const std::optional<at::Tensor>& seqlen_offsets = std::nullopt, int64_t offset = 0,
                                std::vector<int64_t> mrope_section = {}, bool mrope_interleaved = false) {
  const IndexArgs ix{positions, cu_seqlens, seqlen_offsets, offset, mrope_section, mrope_interleaved};
  SimLauncher launcher;
  dispatch_rotary_types(q, cos, sin, [&](auto x_tag, auto cs_tag, const at::Tensor& c, const at::Tensor& s) {
    rotary_plan<decltype(x_tag), decltype(cs_tag)>(q, k, c, s, q_out, k_out, interleaved, conj, ix, sms, launcher);
  });
  return launcher.info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rotary_sim", &rotary_sim, pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("cos"), pybind11::arg("sin"),
        pybind11::arg("q_out"), pybind11::arg("k_out"), pybind11::arg("interleaved"), pybind11::arg("conj"),
        pybind11::arg("sms"), pybind11::arg("positions") = pybind11::none(),
        pybind11::arg("cu_seqlens") = pybind11::none(), pybind11::arg("seqlen_offsets") = pybind11::none(),
        pybind11::arg("offset") = 0, pybind11::arg("mrope_section") = std::vector<int64_t>{},
        pybind11::arg("mrope_interleaved") = false);
}
