// Registers the ops in the extension's namespace (TORCH_EXTENSION_NAME, set by the build),
// with CPU and (when built with CUDA: RK_HAVE_CUDA, see torch_binding.h) CUDA implementations.
//
//   rotary(q, k?, cos, sin, q_out!, k_out?!, interleaved, conj, <index>, cos_k?, sin_k?, pair_tables,
//          swap_layout)
//       one launch for q and k; k reads cos_k/sin_k when given (its own tables)
//   rotary_inplace(q!, k?!, cos, sin, interleaved, conj, <index>, cos_k?, sin_k?, pair_tables,
//                  swap_layout)   out = in
//   apply_rotary(x1, x2, cos, sin, out1!, out2!, conj)              flash-attn elementwise API
//   rotary_transformers(q, k?, cos, sin, unsqueeze_dim, interleaved, conj, pair_tables) -> [q_out, k_out?]
//       the public functions' common case in one call: any layout in, fresh outputs out
//   rotary_transformers_(q!, k?!, cos, sin, unsqueeze_dim, interleaved, pair_tables) -> done   in place
//
// pair_tables: every table's last dim is R/2, one entry per rotary pair (rotary_math.h table_index).
// swap_layout: pairs are written in the other layout than `interleaved` reads them (DeepSeek-V3's
// MLA rope, rotary_math.h): out of place, per-pair tables, no cos_k/sin_k.
//
// Fake (meta) implementations are registered from Python (rotary_kernels/_compiled.py).
//
// Builds: setup.py (pip) defines ROTARY_WITH_CUDA when it compiles the CUDA sources;
// kernel-builder defines CUDA_KERNEL and generates registration.h, whose macros are
// reproduced below when it is absent.
#include <algorithm>
#include <array>
#include <utility>

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include "torch_binding.h"

#if __has_include("registration.h")
#include "registration.h"
#else
#include <Python.h>
#define RK_CONCAT_(a, b) a##b
#define RK_CONCAT(a, b) RK_CONCAT_(a, b)
#define RK_STRINGIFY_(x) #x
#define RK_STRINGIFY(x) RK_STRINGIFY_(x)
#define TORCH_LIBRARY_EXPAND(NAME, MODULE) TORCH_LIBRARY(NAME, MODULE)
#define TORCH_LIBRARY_IMPL_EXPAND(NAME, DEVICE, MODULE) TORCH_LIBRARY_IMPL(NAME, DEVICE, MODULE)
// An importable (empty) Python module: importing it registers the ops.
#define REGISTER_EXTENSION(NAME)                                                                  \
  extern "C" PyObject* RK_CONCAT(PyInit_, NAME)(void) {                                          \
    static PyModuleDef module = {PyModuleDef_HEAD_INIT, RK_STRINGIFY(NAME), nullptr, 0, nullptr}; \
    return PyModule_Create(&module);                                                              \
  }
#endif

namespace {

bool is_float(const at::Tensor& t) {
  auto st = t.scalar_type();
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

void check_float(const at::Tensor& t, const char* name) {
  RK_CHECK(is_float(t), name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_like(const at::Tensor& out, const at::Tensor& x, const char* name) {
  RK_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.device() == x.device(), name,
           " must have its input's shape, dtype and device: expected ", x.sizes(), " ", x.scalar_type(), " on ",
           x.device(), ", got ", out.sizes(), " ", out.scalar_type(), " on ", out.device());
}

void check_index_tensor(const std::optional<at::Tensor>& t, const at::Tensor& q, const char* name, int64_t dim) {
  if (!t.has_value()) return;
  RK_CHECK(t->scalar_type() == at::kLong, name, " must be int64, got ", t->scalar_type());
  RK_CHECK(t->dim() == dim, name, " must be ", dim, "-D, got ", t->sizes());
  RK_CHECK(t->device() == q.device(), name, " must be on q's device");
}

void check_rotary(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                  const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                  const rotary_kernels::TokenIndexArgs& ix, const std::optional<at::Tensor>& cos_k,
                  const std::optional<at::Tensor>& sin_k, bool pair_tables, bool swap_layout) {
  RK_CHECK(q.dim() == 4, "q must be 4-D [A, S, H, D], got ", q.sizes());
  RK_CHECK(cos.dim() >= 2 && cos.dim() <= 4, "cos must be [A, S, R], [3, A, S, R] or a [P, R] cache, got ",
           cos.sizes());
  RK_CHECK(cos.sizes() == sin.sizes(), "cos and sin must have the same shape, got ", cos.sizes(), " and ",
           sin.sizes());
  RK_CHECK(cos.scalar_type() == sin.scalar_type(), "cos and sin must have the same dtype");
  check_float(q, "q");
  check_float(cos, "cos");
  const int64_t R = pair_tables ? 2 * cos.size(-1) : cos.size(-1);  // the rotary dim
  RK_CHECK(R > 0 && R % 2 == 0 && R <= q.size(3),
           pair_tables ? "rotary dim (2 cos.size(-1), per-pair tables) must be positive and <= D="
                       : "rotary dim (cos.size(-1)) must be even, positive and <= D=",
           q.size(3), ", got ", R);
  const bool cache = cos.dim() == 2, mrope = !ix.mrope_section.empty();
  RK_CHECK(!cache || cos.size(0) > 0, "the cos/sin cache is empty (0 rows)");
  RK_CHECK(ix.mrope_section.empty() || ix.mrope_section.size() == 3, "mrope_section must be empty or 3 sizes");
  if (mrope) {
    const auto& m = ix.mrope_section;
    RK_CHECK(m[0] >= 0 && m[1] >= 0 && m[2] >= 0 && m[0] + m[1] + m[2] == R / 2,
             "mrope_section must be 3 non-negative sizes summing to R/2 = ", R / 2);
  }
  if (!cache) {
    const int64_t o = cos.dim() - 3;  // 1 for mrope's [3, A, S, R]
    RK_CHECK(cos.dim() == (mrope ? 4 : 3) && (!mrope || cos.size(0) == 3),
             mrope ? "with mrope_section, cos must be [3, A, S, R] or a [P, R] cache, got "
                   : "cos must be [A, S, R] or a [P, R] cache, got ",
             cos.sizes());
    RK_CHECK(cos.size(o) == q.size(0) && cos.size(o + 1) == q.size(1), "cos must be [A, S, R] with q's A, S: q ",
             q.sizes(), ", cos ", cos.sizes());
    RK_CHECK(!ix.positions && !ix.cu_seqlens && !ix.seqlen_offsets && ix.offset == 0,
             "positions, cu_seqlens and seqlen_offsets need cos/sin caches [P, R]");
  }
  check_index_tensor(ix.positions, q, "positions", 3);
  if (ix.positions) {
    const auto& p = *ix.positions;
    RK_CHECK(p.size(0) == (mrope ? 3 : 1) && p.size(1) == q.size(0) && p.size(2) == q.size(1),
             "positions must be [X, A, S] with q's A, S and X = 3 for mrope (else 1): q ", q.sizes(),
             ", positions ", p.sizes());
  }
  check_index_tensor(ix.cu_seqlens, q, "cu_seqlens", 1);
  if (ix.cu_seqlens) {
    RK_CHECK(ix.cu_seqlens->numel() >= 2 && q.size(0) == 1, "cu_seqlens needs [n + 1] entries and q with A == 1");
    RK_CHECK(ix.cu_seqlens->is_contiguous(), "cu_seqlens must be contiguous (the kernels read it so)");
  }
  check_index_tensor(ix.seqlen_offsets, q, "seqlen_offsets", 1);
  if (ix.seqlen_offsets) {
    const int64_t n = ix.cu_seqlens ? ix.cu_seqlens->numel() - 1 : q.size(0);
    RK_CHECK(ix.seqlen_offsets->size(0) == n, "seqlen_offsets must have one entry per sequence (", n, "), got ",
             ix.seqlen_offsets->sizes());
  }
  RK_CHECK(cos.device() == q.device() && sin.device() == q.device(), "cos/sin must be on q's device");
  check_like(q_out, q, "q_out");
  RK_CHECK(k.has_value() == k_out.has_value(), "k and k_out must both be given or both be None");
  RK_CHECK(cos_k.has_value() == sin_k.has_value(), "cos_k and sin_k must both be given or both be None");
  if (cos_k.has_value()) {
    const at::Tensor &ck = *cos_k, &sk = *sin_k;
    RK_CHECK(k.has_value(), "cos_k/sin_k rotate k, but k is None");
    RK_CHECK(ck.sizes() == sk.sizes() && ck.scalar_type() == sk.scalar_type(),
             "cos_k and sin_k must have the same shape and dtype, got ", ck.sizes(), " and ", sk.sizes());
    check_float(ck, "cos_k");
    RK_CHECK(ck.device() == q.device() && sk.device() == q.device(), "cos_k/sin_k must be on q's device");
    // cos's form (the same dims: [A, S, R], [3, A, S, R] or a [P, R] cache) and rotary dim
    RK_CHECK(ck.dim() == cos.dim() && ck.size(-1) == cos.size(-1) && (cos.dim() == 2 || (ck.sizes().slice(0, ck.dim() - 1) ==
                                                                             cos.sizes().slice(0, cos.dim() - 1))),
             "cos_k must have cos's form and rotary dim: cos ", cos.sizes(), ", cos_k ", ck.sizes());
    RK_CHECK(ck.dim() != 2 || ck.size(0) > 0, "the cos_k/sin_k cache is empty (0 rows)");
  }
  if (k.has_value()) {
    const at::Tensor& kk = *k;
    RK_CHECK(kk.dim() == 4 && kk.size(0) == q.size(0) && kk.size(1) == q.size(1) && kk.size(3) == q.size(3),
             "k must be [A, S, Hk, D] with q's A, S and D: q ", q.sizes(), ", k ", kk.sizes());
    RK_CHECK(kk.scalar_type() == q.scalar_type(), "k must have q's dtype");
    RK_CHECK(kk.device() == q.device(), "k must be on q's device");
    check_like(*k_out, kk, "k_out");
  }
  if (swap_layout) {  // (a pair's two places differ between the layouts: in place would need a scratch)
    RK_CHECK(pair_tables && !cos_k.has_value(), "swap_layout takes per-pair tables (pair_tables) without cos_k/sin_k");
    RK_CHECK(q_out.data_ptr() != q.data_ptr() && (!k.has_value() || k_out->data_ptr() != k->data_ptr()),
             "swap_layout rotates out of place only");
  }
}

// The device's kernel launcher, for arguments already checked (check_rotary, or the one-call
// entry's plan below, whose canonical views meet the same contract by construction).
void launch(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos, const at::Tensor& sin,
            const at::Tensor& q_out, const std::optional<at::Tensor>& k_out, bool interleaved, bool conj,
            const rotary_kernels::TokenIndexArgs& ix, const std::optional<at::Tensor>& cos_k,
            const std::optional<at::Tensor>& sin_k, bool pair_tables, bool swap_layout = false) {
#ifdef RK_HAVE_CUDA
  if (q.is_cuda()) {
    rotary_cuda(q, k, cos, sin, q_out, k_out, interleaved, conj, ix, cos_k, sin_k, pair_tables, swap_layout);
    return;
  }
#endif
  RK_CHECK(q.is_cpu(), "rotary: unsupported device ", q.device());
  rotary_cpu(q, k, cos, sin, q_out, k_out, interleaved, conj, ix, cos_k, sin_k, pair_tables, swap_layout);
}

void rotary_op(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
               const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
               bool interleaved, bool conj, const std::optional<at::Tensor>& positions,
               const std::optional<at::Tensor>& cu_seqlens, const std::optional<at::Tensor>& seqlen_offsets,
               int64_t offset, at::IntArrayRef mrope_section, bool mrope_interleaved,
               const std::optional<at::Tensor>& cos_k, const std::optional<at::Tensor>& sin_k, bool pair_tables,
               bool swap_layout) {
  const rotary_kernels::TokenIndexArgs ix{positions, cu_seqlens, seqlen_offsets, offset, mrope_section.vec(),
                                     mrope_interleaved};
  check_rotary(q, k, cos, sin, q_out, k_out, ix, cos_k, sin_k, pair_tables, swap_layout);
  launch(q, k, cos, sin, q_out, k_out, interleaved, conj, ix, cos_k, sin_k, pair_tables, swap_layout);
}

void rotary_inplace_op(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                       const at::Tensor& sin, bool interleaved, bool conj, const std::optional<at::Tensor>& positions,
                       const std::optional<at::Tensor>& cu_seqlens, const std::optional<at::Tensor>& seqlen_offsets,
                       int64_t offset, at::IntArrayRef mrope_section, bool mrope_interleaved,
                       const std::optional<at::Tensor>& cos_k, const std::optional<at::Tensor>& sin_k,
                       bool pair_tables, bool swap_layout) {
  rotary_op(q, k, cos, sin, q, k, interleaved, conj, positions, cu_seqlens, seqlen_offsets, offset, mrope_section,
            mrope_interleaved, cos_k, sin_k, pair_tables, swap_layout);
}

void apply_rotary_op(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& out1, const at::Tensor& out2, bool conj) {
  check_float(x1, "x1");
  check_float(cos, "cos");
  check_float(sin, "sin");
  RK_CHECK(x2.sizes() == x1.sizes() && x2.scalar_type() == x1.scalar_type(),
           "x1 and x2 must have the same shape and dtype");
  check_like(out1, x1, "out1");
  check_like(out2, x2, "out2");
  RK_CHECK(x1.device() == x2.device() && cos.device() == x1.device() && sin.device() == x1.device(),
           "all tensors must be on the same device");
  RK_CHECK(x1.dim() <= 4, "apply_rotary supports up to 4-D tensors, got ", x1.sizes());
  // cos/sin broadcast to x1's shape (zero strides), all viewed as 4-D.
  auto as4 = [&](const at::Tensor& t) {
    at::Tensor e = t.expand(x1.sizes());
    while (e.dim() < 4) e = e.unsqueeze(0);
    return e;
  };
  at::Tensor a1 = as4(x1), a2 = as4(x2), c = as4(cos), s = as4(sin), o1 = as4(out1), o2 = as4(out2);
  if (a1.numel() == 0) return;
#ifdef RK_HAVE_CUDA
  if (x1.is_cuda()) {
    apply_rotary_cuda(a1, a2, c, s, o1, o2, conj);
    return;
  }
#endif
  RK_CHECK(x1.is_cpu(), "apply_rotary: unsupported device ", x1.device());
  apply_rotary_cpu(a1, a2, c, s, o1, o2, conj);
}

// ---- rotary_transformers(_): the common call in one op (validate, view, allocate, launch) ----
// Why a C++ copy of the shape rules: built in Python, the views of a small (decode) call cost
// several times the kernel's own host time; here they cost one op dispatch. For the plain call
// on a compiled backend these functions are the rules' owner. They follow rotary_kernels/_canon.py
// (canonical_x, canonical_cs) -- the owner for the Python path (Triton, reference, pure-Python
// Hub builds) -- and decline (no tensors / false) whatever they do not take: the Python path then
// validates, reports errors with its messages and handles the rest (token positions, k not fusable
// with q, writes it cannot prove safe). tests/test_properties.py holds the two to one rule set.

// Dims, sizes or strides, held inline: these functions run on every one-call op, where
// std::vector's heap allocations (dozens a call, as the vectors grew) cost ~0.8 us of a one-token
// call's ~7 (1 thread, builds alternated: the op 6.8-7.6 -> 6.2-6.4 us, in place 5.6-6.0 -> 4.8-4.9).
using Dims = c10::SmallVector<int64_t, 5>;

// The permutation taking x to [others..., head, D] (head: the axis unsqueeze_dim inserts into
// cos), or an empty one when cos unsqueezed there does not broadcast to x or the rotary dim R
// exceeds x's head dim.
Dims canonical_perm(const at::Tensor& x, const at::Tensor& cos, int64_t unsqueeze_dim, int64_t R) {
  const int64_t xd = x.dim(), nd = cos.dim() + 1;
  if ((xd != 3 && xd != 4) || nd > xd || unsqueeze_dim < -nd || unsqueeze_dim >= nd || R > x.size(-1)) {
    return {};
  }
  const int64_t u = (unsqueeze_dim + nd) % nd, head = u + (xd - nd);
  if (head == xd - 1) return {};
  Dims lead(cos.sizes().begin(), cos.sizes().end() - 1);  // cos.unsqueeze(u)'s leading dims,
  lead.insert(lead.begin() + u, 1);                       // right-aligned against x's
  for (size_t i = 0; i < lead.size(); ++i) {
    if (lead[i] != 1 && lead[i] != x.size(xd - nd + static_cast<int64_t>(i))) return {};
  }
  Dims perm;
  for (int64_t i = 0; i < xd - 1; ++i) {
    if (i != head) perm.push_back(i);
  }
  perm.push_back(head);
  perm.push_back(xd - 1);
  return perm;
}

// t with these sizes and strides: t itself where it has them already (the strides of its size-1
// dims aside: they address nothing), as cos/sin [B, S, R] of the transformers call and q and k
// with unsqueeze_dim=2; else one as_strided view (~0.15 us each here, one ATen call rather than
// a chain of permute/unsqueeze/expand; a decode call makes up to six).
at::Tensor restrided(const at::Tensor& t, at::IntArrayRef sizes, at::IntArrayRef strides) {
  bool same = t.sizes() == sizes;
  for (size_t d = 0; d < sizes.size() && same; ++d) same = sizes[d] == 1 || t.stride(d) == strides[d];
  return same ? t : t.as_strided(sizes, strides);
}

at::Tensor canonical_view(const at::Tensor& t, at::IntArrayRef perm) {  // -> [A, S, H, D]
  Dims sizes, strides;
  if (perm.size() == 3) {
    sizes.push_back(1);
    strides.push_back(0);
  }
  for (int64_t p : perm) {
    sizes.push_back(t.size(p));
    strides.push_back(t.stride(p));
  }
  return restrided(t, sizes, strides);
}

// cos or sin -> [A, S, R], zero strides where it broadcasts against x.
at::Tensor canonical_cs(const at::Tensor& cs, const at::Tensor& x, int64_t unsqueeze_dim, at::IntArrayRef perm) {
  const int64_t xd = x.dim(), nd = cs.dim() + 1, u = (unsqueeze_dim + nd) % nd;
  Dims sizes, strides;
  if (xd == 3) {
    sizes.push_back(1);
    strides.push_back(0);
  }
  for (size_t j = 0; j < perm.size(); ++j) {
    if (j == perm.size() - 2) continue;  // the head axis, which cos/sin broadcast over
    const int64_t p = perm[j], i = p - (xd - nd);  // p's dim in cs.unsqueeze(u)
    const int64_t d = i < u ? i : i - 1;           // ... and in cs
    const bool bcast = i < 0 || i == u || cs.size(d) == 1;
    sizes.push_back(p == xd - 1 ? cs.size(-1) : x.size(p));
    strides.push_back(bcast ? 0 : cs.stride(d));
  }
  return restrided(cs, sizes, strides);
}

std::array<int64_t, 4> canonical_sizes(const at::Tensor& x, const Dims& perm) {
  std::array<int64_t, 4> sizes{1, 1, 1, 1};
  const size_t o = 4 - perm.size();  // a 3-D x has A = 1 prepended
  for (size_t j = 0; j < perm.size(); ++j) sizes[j + o] = x.size(perm[j]);
  return sizes;
}

// The permutations of q (and k) to their canonical views, or nothing when the arguments are
// outside the one-call path.
struct Plan {
  Dims qp, kp;  // kp empty without k
};

std::optional<Plan> plan_rotary(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                                const at::Tensor& sin, int64_t unsqueeze_dim, bool pair_tables) {
  const int64_t R = cos.dim() >= 1 ? cos.size(-1) * (pair_tables ? 2 : 1) : 0;
  if (!is_float(q) || !is_float(cos) || cos.sizes() != sin.sizes() || cos.scalar_type() != sin.scalar_type() ||
      R <= 0 || R % 2 || cos.device() != q.device() || sin.device() != q.device()) {
    return std::nullopt;
  }
  // Negative views (z.conj().imag) reach these ops as they are (see the Negative registration
  // below): the Python path resolves them (_dispatch._unresolved).
  if (q.is_neg() || cos.is_neg() || sin.is_neg() || (k.has_value() && k->is_neg())) return std::nullopt;
  Plan p{canonical_perm(q, cos, unsqueeze_dim, R), {}};
  if (p.qp.empty()) return std::nullopt;
  if (k.has_value()) {
    p.kp = canonical_perm(*k, cos, unsqueeze_dim, R);
    if (p.kp.empty() || k->scalar_type() != q.scalar_type() || k->device() != q.device()) return std::nullopt;
    // one launch for both: the same A, S and D in the canonical [A, S, H, D]
    const auto qs = canonical_sizes(q, p.qp), ks = canonical_sizes(*k, p.kp);
    if (qs[0] != ks[0] || qs[1] != ks[1] || qs[3] != ks[3]) return std::nullopt;
  }
  return p;
}

void launch_planned(const Plan& p, const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                    const at::Tensor& sin, int64_t unsqueeze_dim, const at::Tensor& q_out,
                    const std::optional<at::Tensor>& k_out, bool interleaved, bool conj, bool pair_tables) {
  std::optional<at::Tensor> k4, ko4;
  if (k.has_value()) {
    k4 = canonical_view(*k, p.kp);
    ko4 = canonical_view(*k_out, p.kp);
  }
  launch(canonical_view(q, p.qp), k4, canonical_cs(cos, q, unsqueeze_dim, p.qp),
         canonical_cs(sin, q, unsqueeze_dim, p.qp), canonical_view(q_out, p.qp), ko4, interleaved, conj,
         rotary_kernels::TokenIndexArgs{}, std::nullopt, std::nullopt, pair_tables);
}

std::vector<at::Tensor> rotary_transformers_op(const at::Tensor& q, const std::optional<at::Tensor>& k,
                                               const at::Tensor& cos, const at::Tensor& sin, int64_t unsqueeze_dim,
                                               bool interleaved, bool conj, bool pair_tables) {
  const at::AutoDispatchBelowADInplaceOrView guard;  // internal views and outputs: no autograd layers
  const auto plan = plan_rotary(q, k, cos, sin, unsqueeze_dim, pair_tables);
  if (!plan) return {};
  std::vector<at::Tensor> outs{at::empty_like(q)};
  if (k.has_value()) outs.push_back(at::empty_like(*k));
  if (q.is_meta()) return outs;  // shapes only (FakeTensor / torch.compile tracing)
  launch_planned(*plan, q, k, cos, sin, unsqueeze_dim, outs[0],
                 k.has_value() ? std::optional<at::Tensor>(outs[1]) : std::nullopt, interleaved, conj, pair_tables);
  return outs;
}

using StrideSizes = c10::SmallVector<std::pair<int64_t, int64_t>, 5>;  // (stride, size) of dims of size > 1

// Sorted by stride, does each stride exceed the reach of the smaller ones? Then no two index
// tuples of these dims share an address.
bool strides_nest(StrideSizes dims) {
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return false;
    reach += (size - 1) * stride;
  }
  return true;
}

// Provably no two elements of t share memory: its dims nest (strides_nest; any permuted slice of
// a contiguous tensor). Anything else declines to the Python path, whose exact test
// (_canon.internal_overlap) accepts or reports it.
bool nested(const at::Tensor& t) {
  StrideSizes dims;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  return strides_nest(std::move(dims));
}

// a and b may share memory: one storage and intersecting byte spans. Disjoint spans are the
// common case (separate projections); anything else declines to the Python path, whose exact
// test (_canon.overlap) tells strided views of one storage (a packed qkv's heads) apart.
bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  auto span = [](const at::Tensor& x) {
    const auto lo = reinterpret_cast<uintptr_t>(x.data_ptr());
    int64_t last = 0;
    for (int64_t d = 0; d < x.dim(); ++d) last += (x.size(d) - 1) * x.stride(d);
    return std::make_pair(lo, lo + static_cast<uintptr_t>((last + 1) * x.element_size()));
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

// q and k are provably disjoint views of one storage: the same strides, the same sizes but in one
// dim j, k's start m steps of dim j from q's outside q's range there, and the box spanning both
// is nested (each element one address). The usual case: q's and k's heads sliced from a packed
// qkv, which may_overlap alone sends to the Python path (~40 us of exact checks per call).
bool disjoint_slices(const at::Tensor& q, const at::Tensor& k) {
  if (q.dim() != k.dim() || q.scalar_type() != k.scalar_type() || q.strides() != k.strides()) return false;
  const int64_t es = q.element_size();
  const auto diff = static_cast<int64_t>(reinterpret_cast<intptr_t>(k.data_ptr()) -
                                         reinterpret_cast<intptr_t>(q.data_ptr()));
  if (diff % es != 0) return false;
  const int64_t delta = diff / es;
  for (int64_t j = 0; j < q.dim(); ++j) {
    const int64_t st = q.stride(j);
    if (st <= 0 || delta % st != 0) continue;
    bool others_equal = true;
    for (int64_t d = 0; d < q.dim(); ++d) others_equal = others_equal && (d == j || q.size(d) == k.size(d));
    if (!others_equal) continue;
    const int64_t m = delta / st;
    if (m < q.size(j) && m + k.size(j) > 0) continue;  // index ranges along j intersect
    const int64_t lo = std::min<int64_t>(0, m), hi = std::max<int64_t>(q.size(j), m + k.size(j));
    StrideSizes dims;  // the spanning box's
    for (int64_t d = 0; d < q.dim(); ++d) {
      const int64_t n = d == j ? hi - lo : q.size(d);
      if (n != 1) dims.emplace_back(q.stride(d), n);
    }
    if (strides_nest(std::move(dims))) return true;
  }
  return false;
}

// In place: true when done; false for anything outside the one-call path or not provably safe
// to write (the Python path then applies _canon.check_writes and reports). Eager only (it reads
// data pointers): under torch.compile the public functions use the functionalizable rotary_ op.
bool rotary_transformers_inplace_op(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                                    const at::Tensor& sin, int64_t unsqueeze_dim, bool interleaved, bool pair_tables) {
  const at::AutoDispatchBelowADInplaceOrView guard;
  const auto plan = plan_rotary(q, k, cos, sin, unsqueeze_dim, pair_tables);
  if (!plan) return false;
  for (const at::Tensor* x : {&q, k.has_value() ? &*k : nullptr}) {
    if (x != nullptr && (!nested(*x) || may_overlap(*x, cos) || may_overlap(*x, sin))) return false;
  }
  if (k.has_value() && may_overlap(*k, q) && !disjoint_slices(q, *k)) return false;
  launch_planned(*plan, q, k, cos, sin, unsqueeze_dim, q, k, interleaved, false, pair_tables);
  return true;
}

}  // namespace

// Token-position arguments (rotary_kernels/_index.py): positions int64 [X, A, S], cu_seqlens
// int64 [n + 1], seqlen_offsets int64 [n], a scalar offset, and mrope's 3 section sizes.
#define RK_INDEX_ARGS                                                                            \
  "Tensor? positions=None, Tensor? cu_seqlens=None, Tensor? seqlen_offsets=None, int offset=0, " \
  "int[] mrope_section=[], bool mrope_interleaved=False"
// k's own tables (cos/sin's form and rotary dim; None: k reads cos/sin), and the tables' kind
// (per-pair [..., R/2] with pair_tables, for all of them), and swap_layout (pairs written in the
// other layout).
#define RK_K_TABLE_ARGS "Tensor? cos_k=None, Tensor? sin_k=None, bool pair_tables=False, bool swap_layout=False"

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, m) {
  m.def(
      "rotary(Tensor q, Tensor? k, Tensor cos, Tensor sin, Tensor(a!) q_out, Tensor(b!)? k_out, "
      "bool interleaved, bool conj, " RK_INDEX_ARGS ", " RK_K_TABLE_ARGS ") -> ()");
  m.def("rotary_inplace(Tensor(a!) q, Tensor(b!)? k, Tensor cos, Tensor sin, bool interleaved, bool conj, "
        RK_INDEX_ARGS ", " RK_K_TABLE_ARGS ") -> ()");
  m.def(
      "rotary_transformers(Tensor q, Tensor? k, Tensor cos, Tensor sin, int unsqueeze_dim, bool interleaved, "
      "bool conj, bool pair_tables=False) -> Tensor[]");
  m.def(
      "rotary_transformers_(Tensor(a!) q, Tensor(b!)? k, Tensor cos, Tensor sin, int unsqueeze_dim, "
      "bool interleaved, bool pair_tables=False) -> bool");
  m.def(
      "apply_rotary(Tensor x1, Tensor x2, Tensor cos, Tensor sin, Tensor(a!) out1, Tensor(b!) out2, "
      "bool conj) -> ()");
}

TORCH_LIBRARY_IMPL_EXPAND(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("rotary", &rotary_op);
  m.impl("rotary_inplace", &rotary_inplace_op);
  m.impl("apply_rotary", &apply_rotary_op);
  m.impl("rotary_transformers", &rotary_transformers_op);
  m.impl("rotary_transformers_", &rotary_transformers_inplace_op);
}

TORCH_LIBRARY_IMPL_EXPAND(TORCH_EXTENSION_NAME, Meta, m) { m.impl("rotary_transformers", &rotary_transformers_op); }

// The one-call ops decline negative views themselves (plan_rotary), rather than meet PyTorch's
// Negative fallback: it resolves them into copies, and for the in-place op it cannot return the
// bool, raising after the kernel had rotated the other, ordinary tensor.
TORCH_LIBRARY_IMPL_EXPAND(TORCH_EXTENSION_NAME, Negative, m) {
  m.impl("rotary_transformers", torch::CppFunction::makeFallthrough());
  m.impl("rotary_transformers_", torch::CppFunction::makeFallthrough());
}

#ifdef RK_HAVE_CUDA
TORCH_LIBRARY_IMPL_EXPAND(TORCH_EXTENSION_NAME, CUDA, m) {
  m.impl("rotary", &rotary_op);
  m.impl("rotary_inplace", &rotary_inplace_op);
  m.impl("apply_rotary", &apply_rotary_op);
  m.impl("rotary_transformers", &rotary_transformers_op);
  m.impl("rotary_transformers_", &rotary_transformers_inplace_op);
}
#endif

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
