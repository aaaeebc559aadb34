// The CUDA kernels and their launch planning, kept apart from the CUDA runtime calls
// (rotary_cuda.cu) so that the tests can also run them on the CPU: no shared memory, no
// synchronisation, so walking blocks and threads one after another gives the GPU's result
// (tests/cuda_sim.cpp defines the CUDA built-ins for that). Math: rotary_math.h.
//
// rotary: canonical q [A, S, Hq, D], k [A, S, Hk, D], cos/sin [A, S, R], any strides (or [P, R]
//   caches read at each token's position, or mrope's [3, A, S, R]: rotary_math.h TokenIndex).
//   grid.x = token (a, s); grid.y = a slice of the Hq + Hk rows (more than one slice only when
//   there are too few tokens to fill the GPU, e.g. decode).
//   block = (TX, TY): thread x owns a chunk of VEC pairs of the head dim, keeps that chunk's
//   cos/sin in registers and walks the rows of its slice with stride TY, two rows per step
//   (all loads of a step are issued before its stores, so in place is safe and two rows'
//   loads are in flight at once).
//   VEC pairs = two 16-byte vectors of x when the head dim is contiguous and aligned; otherwise
//   VEC = 1 with strided scalar accesses. Every element of q and k is read once and written
//   once; cos/sin are read once per (token, chunk, block).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "rotary_math.h"
#include "rotary_ops.h"

// Device-side check of token positions (the simulation in tests/cuda_sim.cpp throws instead).
#ifndef RK_KERNEL_ASSERT
#define RK_KERNEL_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#endif

namespace rotary_kernels {

constexpr int kThreads = 256;  // target threads per block

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// N elements starting at p, element stride `stride`; VECTOR means stride 1 and aligned.
template <bool VECTOR, typename T, typename acc_t, int N>
__device__ __forceinline__ void load_n(const T* p, int64_t stride, acc_t (&out)[N]) {
  if constexpr (VECTOR) {
    const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = static_cast<acc_t>(v.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = static_cast<acc_t>(p[i * stride]);
  }
}

template <bool VECTOR, typename T, typename acc_t, int N>
__device__ __forceinline__ void store_n(T* p, int64_t stride, const acc_t (&in)[N]) {
  if constexpr (VECTOR) {
    Vec<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = static_cast<T>(in[i]);
    *reinterpret_cast<Vec<T, N>*>(p) = v;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i * stride] = static_cast<T>(in[i]);
  }
}

template <typename scalar_t, typename cs_t>
struct RotaryParams {
  using scalar_type = scalar_t;
  using cs_type = cs_t;
  Operand<scalar_t> q, k;  // k.H == 0 when there is no k
  const cs_t* cos;
  const cs_t* sin;
  CSStrides sc, ss;
  TokenIndex ti;
  int64_t S, D, half, rows_per_slice;
  bool conj;
};

// Element offsets (in the head dim) of the two VEC-element groups of chunk c, and how the
// pairs sit in them: half-split pairs group A with group B element by element; interleaved
// pairs neighbours inside a group (or, with VEC = 1, the two groups).
template <int VEC, bool INTERLEAVED>
__device__ __forceinline__ void chunk_offsets(int64_t c, int64_t half, int64_t& oa, int64_t& ob) {
  if constexpr (INTERLEAVED) {
    oa = 2 * c * VEC;
    ob = oa + VEC;
  } else {
    oa = c * VEC;
    ob = half + c * VEC;
  }
}

template <int VEC, bool INTERLEAVED, typename acc_t>
__device__ __forceinline__ void rotate_chunk(acc_t (&xa)[VEC], acc_t (&xb)[VEC], const acc_t (&ca)[VEC],
                                             const acc_t (&cb)[VEC], const acc_t (&sa)[VEC],
                                             const acc_t (&sb)[VEC], bool conj) {
  if constexpr (INTERLEAVED && VEC >= 2) {
#pragma unroll
    for (int i = 0; i < VEC; i += 2) {
      rotate_pair(xa[i], xa[i + 1], make_pair_cs(ca[i], ca[i + 1], sa[i], sa[i + 1], conj), xa[i], xa[i + 1]);
      rotate_pair(xb[i], xb[i + 1], make_pair_cs(cb[i], cb[i + 1], sb[i], sb[i + 1], conj), xb[i], xb[i + 1]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      rotate_pair(xa[i], xb[i], make_pair_cs(ca[i], cb[i], sa[i], sb[i], conj), xa[i], xb[i]);
    }
  }
}

// VEC cos (or sin) values of head-dim elements j0 .. j0 + VEC - 1 of token (a, s)'s row: one
// vector load (CS_VECTOR: contiguous, aligned, no mrope), else element by element, each from
// its pair's mrope axis and position.
template <bool CS_VECTOR, int VEC, typename cs_t, typename acc_t>
__device__ __forceinline__ void load_cs(const cs_t* t, const CSStrides& st, const TokenIndex& ti, int64_t a,
                                        int64_t s, const int64_t (&pos)[3], int64_t j0, int64_t half,
                                        bool interleaved, acc_t (&out)[VEC]) {
  if constexpr (CS_VECTOR) {
    load_n<true>(t + cs_offset(st, 0, a, s, pos[0], j0), 1, out);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t j = j0 + e;
      const int x = pair_axis(ti, pair_of(j, half, interleaved));
      const int64_t px = x == 0 ? pos[0] : (x == 1 ? pos[1] : pos[2]);  // no dynamic indexing: registers
      out[e] = static_cast<acc_t>(t[cs_offset(st, x, a, s, px, j)]);
    }
  }
}

template <typename scalar_t>
__device__ __forceinline__ const Operand<scalar_t>& operand_of(const Operand<scalar_t>& q,
                                                              const Operand<scalar_t>& k, int64_t row,
                                                              int64_t& h) {
  const bool is_q = row < q.H;
  h = is_q ? row : row - q.H;
  return is_q ? q : k;
}

template <typename scalar_t, typename cs_t, int VEC, bool VECTOR, bool CS_VECTOR, bool INTERLEAVED>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams<scalar_t, cs_t> p) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t token = blockIdx.x;
  const int64_t a = token / p.S, s = token % p.S;
  const int64_t rows = p.q.H + p.k.H;
  const int64_t row0 = blockIdx.y * p.rows_per_slice;
  const int64_t row_end = rows < row0 + p.rows_per_slice ? rows : row0 + p.rows_per_slice;
  const int64_t nchunks = p.half / VEC;
  const int64_t TY = blockDim.y;

  // The token's cos/sin rows: its position on each mrope axis (caches), else per-token tables.
  int64_t pos[3];
#pragma unroll
  for (int x = 0; x < 3; ++x) {
    pos[x] = (x == 0 || p.ti.mrope) ? token_position(p.ti, a, s, x) : 0;
    RK_KERNEL_ASSERT(position_ok(p.ti, pos[x]));  // a position outside the cos/sin cache
    if (!position_ok(p.ti, pos[x])) return;
  }

  for (int64_t c = threadIdx.x; c < nchunks; c += blockDim.x) {
    int64_t oa, ob;
    chunk_offsets<VEC, INTERLEAVED>(c, p.half, oa, ob);
    acc_t ca[VEC], cb[VEC], sa[VEC], sb[VEC];
    load_cs<CS_VECTOR>(p.cos, p.sc, p.ti, a, s, pos, oa, p.half, INTERLEAVED, ca);
    load_cs<CS_VECTOR>(p.cos, p.sc, p.ti, a, s, pos, ob, p.half, INTERLEAVED, cb);
    load_cs<CS_VECTOR>(p.sin, p.ss, p.ti, a, s, pos, oa, p.half, INTERLEAVED, sa);
    load_cs<CS_VECTOR>(p.sin, p.ss, p.ti, a, s, pos, ob, p.half, INTERLEAVED, sb);

    for (int64_t r = row0 + threadIdx.y; r < row_end; r += 2 * TY) {
      const bool two = r + TY < row_end;
      int64_t h0, h1 = 0;
      const Operand<scalar_t>& o0 = operand_of(p.q, p.k, r, h0);
      const Operand<scalar_t>& o1 = operand_of(p.q, p.k, two ? r + TY : r, h1);
      const scalar_t* x0 = o0.x + offset4(o0.sx, a, s, h0, 0);
      const scalar_t* x1 = o1.x + offset4(o1.sx, a, s, h1, 0);
      acc_t xa0[VEC], xb0[VEC], xa1[VEC], xb1[VEC];
      load_n<VECTOR>(x0 + oa * o0.sx.d, o0.sx.d, xa0);
      load_n<VECTOR>(x0 + ob * o0.sx.d, o0.sx.d, xb0);
      if (two) {
        load_n<VECTOR>(x1 + oa * o1.sx.d, o1.sx.d, xa1);
        load_n<VECTOR>(x1 + ob * o1.sx.d, o1.sx.d, xb1);
      }
      rotate_chunk<VEC, INTERLEAVED>(xa0, xb0, ca, cb, sa, sb, p.conj);
      scalar_t* y0 = o0.y + offset4(o0.sy, a, s, h0, 0);
      store_n<VECTOR>(y0 + oa * o0.sy.d, o0.sy.d, xa0);
      store_n<VECTOR>(y0 + ob * o0.sy.d, o0.sy.d, xb0);
      if (two) {
        rotate_chunk<VEC, INTERLEAVED>(xa1, xb1, ca, cb, sa, sb, p.conj);
        scalar_t* y1 = o1.y + offset4(o1.sy, a, s, h1, 0);
        store_n<VECTOR>(y1 + oa * o1.sy.d, o1.sy.d, xa1);
        store_n<VECTOR>(y1 + ob * o1.sy.d, o1.sy.d, xb1);
      }
    }
  }

  // Partial rotary, out of place: the dims [R, D) pass through unchanged.
  const int64_t tail = p.D - 2 * p.half;
  if (tail > 0 && (p.q.copy_pass || p.k.copy_pass)) {
    for (int64_t r = row0 + threadIdx.y; r < row_end; r += TY) {
      int64_t h;
      const Operand<scalar_t>& o = operand_of(p.q, p.k, r, h);
      if (!o.copy_pass) continue;
      const scalar_t* x = o.x + offset4(o.sx, a, s, h, 2 * p.half);
      scalar_t* y = o.y + offset4(o.sy, a, s, h, 2 * p.half);
      if constexpr (VECTOR) {
        if (tail % VEC == 0) {
          for (int64_t j = threadIdx.x * VEC; j < tail; j += blockDim.x * VEC) {
            *reinterpret_cast<Vec<scalar_t, VEC>*>(y + j) = *reinterpret_cast<const Vec<scalar_t, VEC>*>(x + j);
          }
          continue;
        }
      }
      for (int64_t j = threadIdx.x; j < tail; j += blockDim.x) y[j * o.sy.d] = x[j * o.sx.d];
    }
  }
}

inline bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// The head dim of t can be read as VEC-element vectors at every chunk offset.
inline bool vector_ok(const at::Tensor& t, int64_t vec) {
  if (t.size(2) == 0) return true;
  if (t.stride(3) != 1 && t.size(3) > 1) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  }
  return aligned(t.data_ptr(), vec * t.element_size());
}

inline bool cs_vector_ok(const at::Tensor& t, int64_t vec) {
  if (t.stride(-1) != 1) return false;
  for (int d = 0; d < t.dim() - 1; ++d) {
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  }
  return aligned(t.data_ptr(), vec * t.element_size());
}

struct LaunchShape {
  int64_t x, y;
};

template <int VEC, bool VECTOR, bool CS_VECTOR, typename Launcher, typename Params>
void dispatch_interleaved(Launcher& launcher, const Params& p, bool interleaved, LaunchShape grid,
                          LaunchShape block) {
  if (interleaved) {
    launcher.template run<VEC, VECTOR, CS_VECTOR, true>(p, grid, block);
  } else {
    launcher.template run<VEC, VECTOR, CS_VECTOR, false>(p, grid, block);
  }
}

// Host side: fill the parameters, pick the memory path and the launch shape, then call
// launcher.template run<VEC, VECTOR, CS_VECTOR, INTERLEAVED>(params, grid, block) — a real
// <<<>>> launch in rotary_cuda.cu, a sequential walk over blocks and threads in the CPU
// simulation the tests build (tests/cuda_sim.cpp).
template <typename scalar_t, typename cs_t, typename Launcher>
void rotary_plan(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                 const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                 bool interleaved, bool conj, const IndexArgs& ix, int64_t sms, Launcher& launcher) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int64_t A = q.size(0), S = q.size(1), D = q.size(3), R = cos.size(-1), half = R / 2;
  RotaryParams<scalar_t, cs_t> p{};
  p.q = make_operand<scalar_t>(q, q_out, R);
  if (k.has_value()) p.k = make_operand<scalar_t>(*k, *k_out, R);
  p.cos = cos.const_data_ptr<cs_t>();
  p.sin = sin.const_data_ptr<cs_t>();
  p.sc = cs_strides(cos);
  p.ss = cs_strides(sin);
  p.ti = make_token_index(cos, ix);
  p.S = S;
  p.D = D;
  p.half = half;
  p.conj = conj;
  const int64_t tokens = A * S, rows = p.q.H + p.k.H;
  if (tokens == 0 || rows == 0) return;
  TORCH_CHECK(tokens <= std::numeric_limits<int32_t>::max(), "rotary: too many tokens (", tokens, ")");

  bool vector = half % VEC == 0 && vector_ok(q, VEC) && vector_ok(q_out, VEC);
  if (k.has_value()) vector = vector && vector_ok(*k, VEC) && vector_ok(*k_out, VEC);
  const bool cs_vector = vector && p.ti.mrope == 0 && cs_vector_ok(cos, VEC) && cs_vector_ok(sin, VEC);

  // Block shape: TX threads over the chunks of a row, TY over rows. Small problems (decode)
  // get one row per thread and the rows split over grid.y so every row is in flight at once;
  // large ones two rows per thread, and grid.y splits only when tokens alone are too few.
  const int64_t nchunks = vector ? half / VEC : half;
  const int64_t tx = std::min<int64_t>(nchunks, kThreads);
  const int64_t max_ty = std::max<int64_t>(1, kThreads / tx);
  const bool small = tokens * rows * nchunks <= sms * 2048;
  int64_t slices = small ? (rows + std::min(max_ty, rows) - 1) / std::min(max_ty, rows)
                         : std::min<int64_t>(rows, (4 * sms + tokens - 1) / tokens);
  slices = std::min<int64_t>(slices, 65535);
  const int64_t rows_per_slice = (rows + slices - 1) / slices;
  p.rows_per_slice = rows_per_slice;
  const int64_t rows_per_thread = small ? 1 : 2;
  const int64_t steps = (rows_per_slice + rows_per_thread * max_ty - 1) / (rows_per_thread * max_ty);
  const int64_t ty = std::min<int64_t>(max_ty, (rows_per_slice + rows_per_thread * steps - 1) / (rows_per_thread * steps));
  const LaunchShape grid{tokens, (rows + rows_per_slice - 1) / rows_per_slice};
  const LaunchShape block{tx, ty};
  if (!vector) {
    dispatch_interleaved<1, false, false>(launcher, p, interleaved, grid, block);
  } else if (cs_vector) {
    dispatch_interleaved<VEC, true, true>(launcher, p, interleaved, grid, block);
  } else {
    dispatch_interleaved<VEC, true, false>(launcher, p, interleaved, grid, block);
  }
}

// flash-attn's elementwise rotation: one thread per element, grid-stride.
template <typename scalar_t, typename acc_t>
__global__ void apply_rotary_kernel(const Elementwise<scalar_t, acc_t> e) {
  const int64_t n = e.n0 * e.n1 * e.n2 * e.n3;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    apply_rotary_element(e, idx / (e.n3 * e.n2 * e.n1), (idx / (e.n3 * e.n2)) % e.n1, (idx / e.n3) % e.n2,
                         idx % e.n3);
  }
}

}  // namespace rotary_kernels
