// CPU entry points: rotary (the kernel: rotary_cpu.h, instantiated here for fp32 and fp64 q/k and
// in rotary_cpu_bf16.cpp / rotary_cpu_f16.cpp for 16-bit ones) and flash-attn's elementwise
// apply_rotary.
#include "rotary_cpu.h"

extern template RK_CPU_TYPED(c10::BFloat16, c10::BFloat16);
extern template RK_CPU_TYPED(c10::BFloat16, float);
extern template RK_CPU_TYPED(c10::Half, c10::Half);
extern template RK_CPU_TYPED(c10::Half, float);

void rotary_cpu(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                bool interleaved, bool conj, const rotary_kernels::TokenIndexArgs& ix,
                const std::optional<at::Tensor>& cos_k, const std::optional<at::Tensor>& sin_k, bool pair_tables,
                bool swap_layout) {
  rotary_kernels::dispatch_rotary_types(
      q, cos, sin, cos_k, sin_k,
      [&](auto x_tag, auto cs_tag, const at::Tensor& c, const at::Tensor& s, const at::Tensor& ck,
          const at::Tensor& sk) {
        rotary_cpu_typed<decltype(x_tag), decltype(cs_tag)>(q, k, c, s, q_out, k_out, interleaved, conj, ix, ck, sk,
                                                            pair_tables, swap_layout);
      });
}

void apply_rotary_cpu(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& out1, const at::Tensor& out2, bool conj) {
  rotary_kernels::dispatch_elementwise(x1, x2, cos, sin, out1, out2, conj, [&](const auto& e) {
    at::parallel_for(0, e.n0 * e.n1 * e.n2, std::max<int64_t>(1, 32768 / e.n3), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i2 = r % e.n2, i1 = (r / e.n2) % e.n1, i0 = r / (e.n1 * e.n2);
        for (int64_t i3 = 0; i3 < e.n3; ++i3) rotary_kernels::apply_rotary_element(e, i0, i1, i2, i3);
      }
    });
  });
}
