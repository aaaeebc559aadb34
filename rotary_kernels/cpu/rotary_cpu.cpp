// CPU kernels: rotary (q and k in one pass over tokens) and flash-attn's elementwise apply_rotary.
//
// Tokens (a, s) are split across threads with at::parallel_for. Per token, the cos/sin of every
// pair are converted once into a small table and reused for all heads of q and k. Rows with a
// contiguous head dim go through fixed-size chunks (loaded into local arrays, so the compiler
// vectorises them even when out aliases x); other strides take the generic indexed path.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../rotary_math.h"
#include "../rotary_ops.h"

namespace {

using namespace rotary_kernels;

constexpr int64_t kChunk = 32;  // pairs per vectorised chunk

// Branch-free conversions the compiler can vectorise (c10's bf16 store has a NaN branch).
template <typename T, typename acc_t>
inline acc_t load_acc(const T* p) {
  return static_cast<acc_t>(*p);
}
template <>
inline float load_acc<c10::BFloat16, float>(const c10::BFloat16* p) {
  uint16_t b;
  std::memcpy(&b, p, 2);
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T, typename acc_t>
inline void store_out(T* p, acc_t v) {
  *p = static_cast<T>(v);
}
template <>
inline void store_out<c10::BFloat16, float>(c10::BFloat16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  r = (v != v) ? 0x7FC0u : r;                            // NaN stays NaN
  const uint16_t b = static_cast<uint16_t>(r);
  std::memcpy(p, &b, 2);
}

// One token's cos/sin per pair (conj applied), structure of arrays for vector loads.
template <typename acc_t>
struct CSTable {
  std::vector<acc_t> c1, c2, s1, s2;
  explicit CSTable(int64_t half) : c1(half), c2(half), s1(half), s2(half) {}
  PairCS<acc_t> at(int64_t i) const { return {c1[i], c2[i], s1[i], s2[i]}; }
};

template <typename scalar_t, typename acc_t, bool interleaved>
void rotate_row(const scalar_t* x, scalar_t* y, int64_t sxd, int64_t syd, int64_t D, int64_t half, bool copy_pass,
                const CSTable<acc_t>& cs) {
  if (sxd == 1 && syd == 1) {
    // Contiguous head dim. Each chunk is loaded into local arrays before anything is stored,
    // so in place (y == x) needs no alias checks; compile-time strides let the loops vectorise.
    constexpr int64_t step1 = interleaved ? 2 : 1;
    const int64_t off2 = interleaved ? 1 : half;
    for (int64_t i0 = 0; i0 < half; i0 += kChunk) {
      const int64_t n = std::min(kChunk, half - i0);
      acc_t x1[kChunk], x2[kChunk], y1[kChunk], y2[kChunk];
      for (int64_t v = 0; v < n; ++v) {
        x1[v] = load_acc<scalar_t, acc_t>(x + (i0 + v) * step1);
        x2[v] = load_acc<scalar_t, acc_t>(x + (i0 + v) * step1 + off2);
      }
      const acc_t *c1 = &cs.c1[i0], *c2 = &cs.c2[i0], *s1 = &cs.s1[i0], *s2 = &cs.s2[i0];
      for (int64_t v = 0; v < n; ++v) rotate_pair(x1[v], x2[v], PairCS<acc_t>{c1[v], c2[v], s1[v], s2[v]}, y1[v], y2[v]);
      for (int64_t v = 0; v < n; ++v) {
        store_out<scalar_t, acc_t>(y + (i0 + v) * step1, y1[v]);
        store_out<scalar_t, acc_t>(y + (i0 + v) * step1 + off2, y2[v]);
      }
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const int64_t j1 = pair_first(i, half, interleaved), j2 = pair_second(i, half, interleaved);
      acc_t y1, y2;
      rotate_pair(load_acc<scalar_t, acc_t>(x + j1 * sxd), load_acc<scalar_t, acc_t>(x + j2 * sxd), cs.at(i), y1, y2);
      store_out<scalar_t, acc_t>(y + j1 * syd, y1);
      store_out<scalar_t, acc_t>(y + j2 * syd, y2);
    }
  }
  if (copy_pass) {
    for (int64_t j = 2 * half; j < D; ++j) y[j * syd] = x[j * sxd];
  }
}

Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename scalar_t, typename cs_t>
void rotary_cpu_impl(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                     const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                     bool interleaved, bool conj) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t A = q.size(0), S = q.size(1), D = q.size(3), half = cos.size(2) / 2;
  struct Operand {
    const scalar_t* x;
    scalar_t* y;
    Strides4 sx, sy;
    int64_t H;
    bool copy_pass;
  };
  std::vector<Operand> ops;
  auto add = [&](const at::Tensor& x, const at::Tensor& y) {
    if (x.size(2) == 0) return;
    const bool same = x.data_ptr() == y.data_ptr() && x.strides() == y.strides();
    ops.push_back({x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), strides4(x), strides4(y), x.size(2),
                   2 * half < D && !same});
  };
  add(q, q_out);
  if (k.has_value()) add(*k, *k_out);
  const Strides3 sc{cos.stride(0), cos.stride(1), cos.stride(2)};
  const Strides3 ss{sin.stride(0), sin.stride(1), sin.stride(2)};
  const cs_t* cp = cos.const_data_ptr<cs_t>();
  const cs_t* sp = sin.const_data_ptr<cs_t>();
  int64_t row_elems = 0;
  for (const auto& o : ops) row_elems += o.H * D;
  if (A * S == 0 || row_elems == 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / row_elems);

  at::parallel_for(0, A * S, grain, [&](int64_t begin, int64_t end) {
    CSTable<acc_t> cs(half);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t a = t / S, s = t % S;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t j1 = pair_first(i, half, interleaved), j2 = pair_second(i, half, interleaved);
        const PairCS<acc_t> p = make_pair_cs<acc_t>(
            load_acc<cs_t, acc_t>(cp + offset3(sc, a, s, j1)), load_acc<cs_t, acc_t>(cp + offset3(sc, a, s, j2)),
            load_acc<cs_t, acc_t>(sp + offset3(ss, a, s, j1)), load_acc<cs_t, acc_t>(sp + offset3(ss, a, s, j2)),
            conj);
        cs.c1[i] = p.c1;
        cs.c2[i] = p.c2;
        cs.s1[i] = p.s1;
        cs.s2[i] = p.s2;
      }
      for (const auto& o : ops) {
        for (int64_t h = 0; h < o.H; ++h) {
          const scalar_t* xr = o.x + offset4(o.sx, a, s, h, 0);
          scalar_t* yr = o.y + offset4(o.sy, a, s, h, 0);
          if (interleaved) {
            rotate_row<scalar_t, acc_t, true>(xr, yr, o.sx.d, o.sy.d, D, half, o.copy_pass, cs);
          } else {
            rotate_row<scalar_t, acc_t, false>(xr, yr, o.sx.d, o.sy.d, D, half, o.copy_pass, cs);
          }
        }
      }
    }
  });
}

}  // namespace

void rotary_cpu(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                bool interleaved, bool conj) {
  // cos/sin are read as float or as q's dtype; any other float dtype is converted (small: [A, S, R]).
  const bool cs_same = cos.scalar_type() == q.scalar_type();
  const at::Tensor c = cs_same ? cos : cos.to(at::kFloat), s = cs_same ? sin : sin.to(at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rotary_cpu", [&] {
    if (cs_same) {
      rotary_cpu_impl<scalar_t, scalar_t>(q, k, c, s, q_out, k_out, interleaved, conj);
    } else {
      rotary_cpu_impl<scalar_t, float>(q, k, c, s, q_out, k_out, interleaved, conj);
    }
  });
}

void apply_rotary_cpu(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& out1, const at::Tensor& out2, bool conj) {
  // cos/sin are read in the math type (a no-op for fp32 tables; zero strides are kept then).
  const auto acc_type = x1.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor cc = cos.to(acc_type), sc = sin.to(acc_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x1.scalar_type(), "apply_rotary_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* p1 = x1.const_data_ptr<scalar_t>();
    const scalar_t* p2 = x2.const_data_ptr<scalar_t>();
    const acc_t* pc = cc.const_data_ptr<acc_t>();
    const acc_t* ps = sc.const_data_ptr<acc_t>();
    scalar_t* q1 = out1.data_ptr<scalar_t>();
    scalar_t* q2 = out2.data_ptr<scalar_t>();
    const Strides4 s1 = strides4(x1), s2 = strides4(x2), scs = strides4(cc), sss = strides4(sc);
    const Strides4 so1 = strides4(out1), so2 = strides4(out2);
    const int64_t n0 = x1.size(0), n1 = x1.size(1), n2 = x1.size(2), n3 = x1.size(3);
    at::parallel_for(0, n0 * n1 * n2, std::max<int64_t>(1, 32768 / n3), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i2 = r % n2, i1 = (r / n2) % n1, i0 = r / (n1 * n2);
        for (int64_t i3 = 0; i3 < n3; ++i3) {
          acc_t y1, y2;
          rotate_elementwise(static_cast<acc_t>(p1[offset4(s1, i0, i1, i2, i3)]),
                             static_cast<acc_t>(p2[offset4(s2, i0, i1, i2, i3)]), pc[offset4(scs, i0, i1, i2, i3)],
                             ps[offset4(sss, i0, i1, i2, i3)], conj, y1, y2);
          q1[offset4(so1, i0, i1, i2, i3)] = static_cast<scalar_t>(y1);
          q2[offset4(so2, i0, i1, i2, i3)] = static_cast<scalar_t>(y2);
        }
      }
    });
  });
}
