// Declarations of the ops' device implementations (cpu/rotary_cpu.cpp and rotary_cuda.cu),
// called by torch-ext/torch_binding.cpp, which validates shapes before they run.
#pragma once

#include <algorithm>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/core/Tensor.h>

#include "rotary_math.h"

namespace rotary_kernels {

// ---- Error messages: RK_CHECK(cond, parts...), RK_CHECK_INDEX (IndexError) ----
// TORCH_CHECK's own formatting (c10::str) streams its parts through a std::ostringstream compiled
// into this library. On the GPU machines (g++ 13 build, torch 2.11) that killed the process
// inside the library's ostream::_M_insert<long> before anything was raised, while PyTorch's own
// errors raised (benchmarks/results/cuda-NVIDIA_H100_80GB_HBM3/session-2026-11-26.md). So every
// message here is concatenated into a std::string (no iostreams) and TORCH_CHECK gets it as one C
// string, which it passes on untouched. Parts: C strings, std::string, integers, sizes
// (IntArrayRef, printed like PyTorch: [1, 2]), dtypes and devices.
namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}
}  // namespace detail

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string s;
  (detail::append(s, parts), ...);
  return s;
}

#define RK_CHECK(cond, ...) TORCH_CHECK(cond, ::rotary_kernels::message(__VA_ARGS__).c_str())
#define RK_CHECK_INDEX(cond, ...) TORCH_CHECK_INDEX(cond, ::rotary_kernels::message(__VA_ARGS__).c_str())

// f(scalar_t{}) for a floating dtype (AT_DISPATCH_FLOATING_TYPES_AND2's four, without its
// stream-formatted error).
template <typename F>
void dispatch_float(c10::ScalarType st, const char* name, F&& f) {
  switch (st) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::Double: f(double{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    default: RK_CHECK(false, name, ": no kernel for dtype ", st);
  }
}

inline Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

inline CSStrides cs_strides(const at::Tensor& t) {
  if (t.dim() == 2) return {0, 0, 0, t.stride(0), t.stride(1)};  // cache [P, R]
  if (t.dim() == 3) return {0, t.stride(0), t.stride(1), 0, t.stride(2)};  // [A, S, R]
  return {t.stride(0), t.stride(1), t.stride(2), 0, t.stride(3)};  // mrope [3, A, S, R]
}

// The token-position arguments of the rotary ops as tensors (validated by the binding): the host
// side of rotary_math.h's TokenIndex and of the Python TokenIndex (_index.py).
struct TokenIndexArgs {
  std::optional<at::Tensor> positions;       // int64 [X, A, S]
  std::optional<at::Tensor> cu_seqlens;      // int64 [n + 1]
  std::optional<at::Tensor> seqlen_offsets;  // int64 [n]
  int64_t offset = 0;
  std::vector<int64_t> mrope_section;  // empty or 3 sizes, in pairs
  bool mrope_interleaved = false;
};

// cos_k: k's cache (cos itself when k shares q's tables); a position must lie inside both.
inline TokenIndex make_token_index(const at::Tensor& cos, const TokenIndexArgs& ix, const at::Tensor& cos_k) {
  TokenIndex t{};
  t.rows = cos.dim() == 2 ? std::min(cos.size(0), cos_k.size(0)) : 0;
  if (ix.positions) {
    t.pos = ix.positions->const_data_ptr<int64_t>();
    t.px = ix.positions->stride(0);
    t.pa = ix.positions->stride(1);
    t.ps = ix.positions->stride(2);
  }
  if (ix.cu_seqlens) {
    t.cu = ix.cu_seqlens->const_data_ptr<int64_t>();
    t.n_seqs = ix.cu_seqlens->numel() - 1;
  }
  if (ix.seqlen_offsets) {
    t.off = ix.seqlen_offsets->const_data_ptr<int64_t>();
    t.so = ix.seqlen_offsets->stride(0);
  }
  t.offset = ix.offset;
  if (ix.mrope_section.size() == 3) {
    t.mrope = ix.mrope_interleaved ? 2 : 1;
    t.sec0 = ix.mrope_section[0];
    t.sec1 = ix.mrope_section[1];
    t.sec2 = ix.mrope_section[2];
  }
  return t;
}

// a and b are the same view of the same memory (an output that is its input: in place).
inline bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.strides() == b.strides() && a.sizes() == b.sizes();
}

// x (canonical [A, S, H, D]) rotated into y; R = rotary dim. In place when y is x.
template <typename scalar_t>
Operand<scalar_t> make_operand(const at::Tensor& x, const at::Tensor& y, int64_t R) {
  return {x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), strides4(x), strides4(y), x.size(2),
          R < x.size(3) && !same_view(x, y)};
}

// The rotary ops' type dispatch: x's dtype, and the tables (cos/sin and k's own cos_k/sin_k)
// read as x's dtype when all have it, else as float (any other float dtype is converted first;
// the tables are small, [A, S, R]). Calls f(scalar_t{}, cs_t{}, cos, sin, cos_k, sin_k) with the
// tables to use; without k tables, cos_k/sin_k are cos/sin themselves.
template <typename F>
void dispatch_rotary_types(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                           const std::optional<at::Tensor>& cos_k, const std::optional<at::Tensor>& sin_k, F&& f) {
  const bool cs_same = cos.scalar_type() == x.scalar_type() && (!cos_k || cos_k->scalar_type() == x.scalar_type());
  auto as_cs = [&](const at::Tensor& t) { return cs_same ? t : t.to(at::kFloat); };
  const at::Tensor c = as_cs(cos), s = as_cs(sin);
  const at::Tensor ck = cos_k ? as_cs(*cos_k) : c, sk = sin_k ? as_cs(*sin_k) : s;
  dispatch_float(x.scalar_type(), "rotary", [&](auto x_tag) {
    using scalar_t = decltype(x_tag);
    if (cs_same) {
      f(scalar_t{}, scalar_t{}, c, s, ck, sk);
    } else {
      f(scalar_t{}, float{}, c, s, ck, sk);
    }
  });
}

// A cos/sin table of the elementwise op (expanded to x's shape) in the math type. Broadcast
// dims (zero strides) stay broadcast: the table's distinct elements are converted, then
// expanded again. (Converting the expanded view itself would make an x-sized copy: to() lays
// out a non-dense view densely.)
inline at::Tensor elementwise_table(const at::Tensor& x, const at::Tensor& t) {
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (t.scalar_type() == acc_type) return t;
  std::vector<int64_t> distinct(t.sizes().begin(), t.sizes().end());
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.stride(d) == 0) distinct[d] = 1;
  }
  return t.as_strided(distinct, t.strides()).to(acc_type).expand(t.sizes());
}

// The elementwise op's type dispatch: cos/sin converted to the math type (elementwise_table:
// a no-op for fp32 tables), then f(Elementwise<scalar_t, acc_t>{...}).
template <typename F>
void dispatch_elementwise(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& out1, const at::Tensor& out2, bool conj, F&& f) {
  const at::Tensor cc = elementwise_table(x1, cos), sc = elementwise_table(x1, sin);
  dispatch_float(x1.scalar_type(), "apply_rotary", [&](auto x_tag) {
    using scalar_t = decltype(x_tag);
    using acc_t = typename AccType<scalar_t>::type;
    f(Elementwise<scalar_t, acc_t>{x1.const_data_ptr<scalar_t>(), x2.const_data_ptr<scalar_t>(),
                                   cc.const_data_ptr<acc_t>(), sc.const_data_ptr<acc_t>(), out1.data_ptr<scalar_t>(),
                                   out2.data_ptr<scalar_t>(), strides4(x1), strides4(x2), strides4(cc), strides4(sc),
                                   strides4(out1), strides4(out2), x1.size(0), x1.size(1), x1.size(2), x1.size(3),
                                   conj});
  });
}

}  // namespace rotary_kernels

// q [A, S, Hq, D], k [A, S, Hk, D] (optional), cos/sin [A, S, R] ([3, A, S, R] for mrope,
// [P, R] caches with token positions), any strides. q_out/k_out have q/k's shapes and may be
// q/k themselves (in place). cos_k/sin_k (optional, cos/sin's form): k's own tables.
// pair_tables: every table's last dim is R/2, one entry per pair (rotary_math.h table_index).
// swap_layout: pairs written in the other layout than read (rotary_math.h; out of place, pair_tables).
void rotary_cpu(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                bool interleaved, bool conj, const rotary_kernels::TokenIndexArgs& ix,
                const std::optional<at::Tensor>& cos_k, const std::optional<at::Tensor>& sin_k, bool pair_tables,
                bool swap_layout = false);

// x1, x2, out1, out2 of one shape; cos/sin already expanded to it.
void apply_rotary_cpu(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& out1, const at::Tensor& out2, bool conj);

#if defined(ROTARY_WITH_CUDA) || defined(CUDA_KERNEL)
#define RK_HAVE_CUDA 1
void rotary_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                 const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                 bool interleaved, bool conj, const rotary_kernels::TokenIndexArgs& ix,
                 const std::optional<at::Tensor>& cos_k, const std::optional<at::Tensor>& sin_k, bool pair_tables,
                 bool swap_layout = false);

void apply_rotary_cuda(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& out1, const at::Tensor& out2, bool conj);
#endif
