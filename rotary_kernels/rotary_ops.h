// Declarations of the ops' device implementations (cpu/rotary_cpu.cpp and rotary_cuda.cu),
// called by torch-ext/torch_binding.cpp, which validates shapes before they run.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

// q [A, S, Hq, D], k [A, S, Hk, D] (optional), cos/sin [A, S, R], any strides. q_out/k_out
// have q/k's shapes and may be q/k themselves (in place).
void rotary_cpu(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                bool interleaved, bool conj);

// x1, x2, out1, out2 of one shape; cos/sin already expanded to it.
void apply_rotary_cpu(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& out1, const at::Tensor& out2, bool conj);

#if defined(ROTARY_WITH_CUDA) || defined(CUDA_KERNEL)
#define RK_HAVE_CUDA 1
void rotary_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                 const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                 bool interleaved, bool conj);

void apply_rotary_cuda(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& out1, const at::Tensor& out2, bool conj);
#endif
