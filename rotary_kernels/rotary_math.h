// Rotary math shared by the CPU (rotary_cpu.cpp) and CUDA (rotary_cuda.cu) kernels.
//
// Everything here is __host__ __device__ so the CPU build, which CI runs, exercises the
// same indexing and arithmetic the GPU kernels use. Semantics: torch-ext/rotary_kernels/reference.py.
//
// Canonical tensors: x is [A, S, H, D] and cos/sin are [A, S, R] with arbitrary (int64)
// strides. Pair i (0 <= i < R/2) joins elements j1 and j2 of the head dim:
//   half-split (rotate_half):      j1 = i,      j2 = i + R/2
//   interleaved (rotate_every_two): j1 = 2 i,    j2 = 2 i + 1
// and, with the pair's own cos/sin values c1 = cos[j1], c2 = cos[j2], s1 = sin[j1], s2 = sin[j2]:
//   y1 = x1 c1 - x2 s1
//   y2 = x2 c2 + x1 s2
// The backward (conj) is the transpose of that map: the same formula with
// (s1, s2) := (-s2, -s1).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RK_HD __host__ __device__ __forceinline__
#else
#define RK_HD inline
#endif

namespace rotary_kernels {

struct Strides4 {  // [A, S, H, D]
  int64_t a, s, h, d;
};

struct Strides3 {  // [A, S, R]
  int64_t a, s, r;
};

RK_HD int64_t offset4(const Strides4& st, int64_t a, int64_t s, int64_t h, int64_t d) {
  return a * st.a + s * st.s + h * st.h + d * st.d;
}

RK_HD int64_t offset3(const Strides3& st, int64_t a, int64_t s, int64_t r) {
  return a * st.a + s * st.s + r * st.r;
}

// One rotated tensor (q or k) and its output, as the kernels walk them.
template <typename scalar_t>
struct Operand {
  const scalar_t* x;
  scalar_t* y;
  Strides4 sx, sy;
  int64_t H;
  bool copy_pass;  // out of place with R < D: copy the tail [R, D) of each row
};

// Head-dim indices of pair i.
RK_HD int64_t pair_first(int64_t i, int64_t half, bool interleaved) {
  (void)half;
  return interleaved ? 2 * i : i;
}

RK_HD int64_t pair_second(int64_t i, int64_t half, bool interleaved) {
  return interleaved ? 2 * i + 1 : i + half;
}

// cos/sin of one pair, with the conj rule applied.
template <typename acc_t>
struct PairCS {
  acc_t c1, c2, s1, s2;
};

template <typename acc_t>
RK_HD PairCS<acc_t> make_pair_cs(acc_t c1, acc_t c2, acc_t s1, acc_t s2, bool conj) {
  PairCS<acc_t> p;
  p.c1 = c1;
  p.c2 = c2;
  p.s1 = conj ? -s2 : s1;
  p.s2 = conj ? -s1 : s2;
  return p;
}

template <typename acc_t>
RK_HD void rotate_pair(acc_t x1, acc_t x2, const PairCS<acc_t>& p, acc_t& y1, acc_t& y2) {
  y1 = x1 * p.c1 - x2 * p.s1;
  y2 = x2 * p.c2 + x1 * p.s2;
}

// flash-attn's elementwise apply_rotary: out1 = x1 c - x2 s, out2 = x1 s + x2 c (s -> -s if conj).
template <typename acc_t>
RK_HD void rotate_elementwise(acc_t x1, acc_t x2, acc_t c, acc_t s, bool conj, acc_t& y1, acc_t& y2) {
  if (conj) s = -s;
  y1 = x1 * c - x2 * s;
  y2 = x1 * s + x2 * c;
}

// Math type: float for 16-bit and float inputs, double for double.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// flash-attn's apply_rotary over 4-D tensors of one shape: cos/sin expanded to it (any
// strides) and read in the math type acc_t; outputs may be the inputs (in place).
template <typename scalar_t, typename acc_t>
struct Elementwise {
  const scalar_t* x1;
  const scalar_t* x2;
  const acc_t* c;
  const acc_t* s;
  scalar_t* o1;
  scalar_t* o2;
  Strides4 sx1, sx2, sc, ss, so1, so2;
  int64_t n0, n1, n2, n3;
  bool conj;
};

template <typename scalar_t, typename acc_t>
RK_HD void apply_rotary_element(const Elementwise<scalar_t, acc_t>& e, int64_t i0, int64_t i1, int64_t i2,
                                int64_t i3) {
  acc_t y1, y2;
  rotate_elementwise(static_cast<acc_t>(e.x1[offset4(e.sx1, i0, i1, i2, i3)]),
                     static_cast<acc_t>(e.x2[offset4(e.sx2, i0, i1, i2, i3)]), e.c[offset4(e.sc, i0, i1, i2, i3)],
                     e.s[offset4(e.ss, i0, i1, i2, i3)], e.conj, y1, y2);
  e.o1[offset4(e.so1, i0, i1, i2, i3)] = static_cast<scalar_t>(y1);
  e.o2[offset4(e.so2, i0, i1, i2, i3)] = static_cast<scalar_t>(y2);
}

}  // namespace rotary_kernels
