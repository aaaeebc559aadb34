// Rotary math shared by the CPU (cpu/rotary_cpu.h) and CUDA (rotary_cuda.cu) kernels.
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
// Per-pair tables (pair_tables: cos/sin [..., R/2], gpt-oss / flash-attn / vLLM) hold pair i's
// values at i, for both of its elements: c1 = c2 = cos[i], s1 = s2 = sin[i] (table_index).
// swap_layout (DeepSeek-V3's MLA rope, out of place, per-pair tables only): pair i is read at
// pair_first/pair_second(i, interleaved) of x and written at those of the other layout,
// (i, i + R/2) for interleaved input; the backward reads half-split and writes interleaved (conj).
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

// Element strides of a cos/sin table. Per-token tables [A, S, R] use (a, s, r), mrope's per-axis
// tables [3, A, S, R] also x; caches [P, R] read at each token's position use only (p, r).
struct CSStrides {
  int64_t x, a, s, p, r;
};

RK_HD int64_t offset4(const Strides4& st, int64_t a, int64_t s, int64_t h, int64_t d) {
  return a * st.a + s * st.s + h * st.h + d * st.d;
}

// Offset of element j of the cos/sin row that token (a, s) reads on mrope axis x at position pos.
RK_HD int64_t cs_offset(const CSStrides& st, int64_t x, int64_t a, int64_t s, int64_t pos, int64_t j) {
  return x * st.x + a * st.a + s * st.s + pos * st.p + j * st.r;
}

// Where each token's cos/sin row comes from (torch-ext/rotary_kernels/reference.py, "Token
// positions"). All pointers null and mrope == 0: the plain per-token tables.
struct TokenIndex {
  const int64_t* pos;  // [X, A, S] positions (strides px, pa, ps), or null: the index in the sequence
  int64_t px, pa, ps;
  const int64_t* cu;  // [n_seqs + 1] starts of packed sequences (A == 1, S == T), or null
  int64_t n_seqs;
  const int64_t* off;  // [n_seqs] per-sequence offsets (stride so), or null
  int64_t so;
  int64_t offset;  // added to every position
  int64_t rows;    // cache rows P (positions must lie in [0, P)); 0: not a cache
  int64_t sec0, sec1, sec2;
  int mrope;  // 0: none, 1: sectioned (Qwen2-VL), 2: interleaved (Qwen3-VL)
};

// The mrope axis (0, 1, 2) that pair i reads.
RK_HD int pair_axis(const TokenIndex& t, int64_t i) {
  if (t.mrope == 1) return i < t.sec0 ? 0 : (i < t.sec0 + t.sec1 ? 1 : 2);
  if (t.mrope == 2) {
    const int64_t r = i % 3;
    return (r == 1 && i < 3 * t.sec1) ? 1 : ((r == 2 && i < 3 * t.sec2) ? 2 : 0);
  }
  return 0;
}

// The cache row of token (a, s) on mrope axis x (0 when cos/sin are per-token tables).
RK_HD int64_t token_position(const TokenIndex& t, int64_t a, int64_t s, int x) {
  if (t.rows == 0) return 0;
  int64_t b = a;
  if (t.cu) {  // the packed token's sequence: the last b < n_seqs with cu[b] <= s
    int64_t lo = 0, hi = t.n_seqs;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (t.cu[mid] <= s) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    b = lo;
  }
  int64_t p = t.pos ? t.pos[x * t.px + a * t.pa + s * t.ps] : (t.cu ? s - t.cu[b] : s);
  if (t.off) p += t.off[b * t.so];
  return p + t.offset;
}

RK_HD bool position_ok(const TokenIndex& t, int64_t p) { return t.rows == 0 || (p >= 0 && p < t.rows); }

// The pair index of head-dim element j (j < R).
RK_HD int64_t pair_of(int64_t j, int64_t half, bool interleaved) {
  return interleaved ? j / 2 : (j < half ? j : j - half);
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

// The entry of a cos/sin table row that head-dim element j reads: j in a full-width table, its
// pair in a per-pair one. (A per-launch flag rather than strides: element j of a half-split pair
// reads entry j mod R/2 of a per-pair table, which no stride expresses.)
RK_HD int64_t table_index(int64_t j, int64_t half, bool interleaved, bool pair_tables) {
  return pair_tables ? pair_of(j, half, interleaved) : j;
}

// Head-dim indices of pair i.
RK_HD int64_t pair_first(int64_t i, bool interleaved) { return interleaved ? 2 * i : i; }

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

// A product rounded on its own. nvcc contracts x1 * c - x2 * s into an FMA by default (one rounding
// fewer), and where it does depends on the instance: in place and out of place, or the MLA layout
// and the plain one, would differ in the last bit, and the GPU from the CPU kernel (built with
// -ffp-contract=off), PyTorch's ops and the reference. __fmul_rn / __dmul_rn are never contracted,
// so every kernel rounds each product, then the sum: the same bits on every device and path.
template <typename acc_t>
RK_HD acc_t mul_rn(acc_t a, acc_t b) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(acc_t) == 8) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

template <typename acc_t>
RK_HD void rotate_pair(acc_t x1, acc_t x2, const PairCS<acc_t>& p, acc_t& y1, acc_t& y2) {
  y1 = mul_rn(x1, p.c1) - mul_rn(x2, p.s1);
  y2 = mul_rn(x2, p.c2) + mul_rn(x1, p.s2);
}

// flash-attn's elementwise apply_rotary: out1 = x1 c - x2 s, out2 = x1 s + x2 c (s -> -s if conj).
template <typename acc_t>
RK_HD void rotate_elementwise(acc_t x1, acc_t x2, acc_t c, acc_t s, bool conj, acc_t& y1, acc_t& y2) {
  if (conj) s = -s;
  y1 = mul_rn(x1, c) - mul_rn(x2, s);
  y2 = mul_rn(x1, s) + mul_rn(x2, c);
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
