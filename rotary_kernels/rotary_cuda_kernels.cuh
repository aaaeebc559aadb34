// The CUDA kernels and their launch planning, kept apart from the CUDA runtime calls
// (rotary_cuda.cu) so that the tests can also run them on the CPU: no shared memory, no
// synchronisation, so walking blocks and threads one after another gives the GPU's result
// (tests/cuda_sim.cpp defines the CUDA built-ins for that, and the RK_SIM_* hooks below to check
// alignment, bounds and that no element is written by two threads). Math: rotary_math.h.
//
// rotary: canonical q [A, S, Hq, D], k [A, S, Hk, D], cos/sin [A, S, R], any strides (or [P, R]
//   caches read at each token's position, or mrope's [3, A, S, R]: rotary_math.h TokenIndex;
//   per-pair tables [..., R/2] with pair_tables: a half-split chunk's two groups then read the
//   same entries, one vector for both halves, so half the table bytes; interleaved per-pair
//   tables are read element by element, each entry for both elements of its pair: a half-width
//   vector spread in registers spilled the interleaved vector instances at 64 registers, sm_80).
//   grid.x = token (a, s); grid.y = a slice of the Hq + Hk rows (more than one slice only when
//   there are too few tokens to fill the GPU, e.g. decode).
//   block = (TX, TY): thread x owns a chunk of VEC pairs of the head dim and walks the rows of
//   its slice with stride TY, one row per step (with k's own tables, cos_k/sin_k, a thread
//   reloads its chunk's cos/sin from them at its first k row). The first row's q/k loads are issued before
//   anything waits on memory; the chunk's cos/sin are loaded once, after them (so a warp waits
//   one memory round trip per step, not two), and kept in registers as the words they arrived
//   in (16-bit tables: two values a register; unpacked at use). A row's loads are issued before
//   its stores, so in place is safe. Registers are capped at 64 (__launch_bounds__(256, 4)): 32
//   warps an SM, every one holding a row at every step with plan_launch's even steps (Llama:
//   6 blocks of 8x20); that budget is why a step holds one row, not two. (16-bit x with fp32
//   half-split tables: 72 registers in blocks of at most 224 threads, 5 blocks of 8x20: min_blocks.)
//   VEC pairs = two 16-byte vectors of x when the head dim is contiguous and aligned; otherwise
//   VEC = 1 with strided scalar accesses. Chunks of whole pairs with per-pair tables have their
//   own instances (PAIRS): swap_layout (MLA's rope: pairs written in the other layout,
//   rotary_math.h) and interleaved per-pair tables: a chunk of VEC pairs (two 16-byte vectors of
//   x, one vector of cos and one of sin, two vectors out, in x's layout or with swap_layout in the
//   other: rotate_pair_chunk) where x and the tables allow vectors; else swap_layout takes one
//   pair a chunk, loaded at its places in x's layout and stored at those of the other one. Every
//   element of q and k is read once and written once; cos/sin are read once per (token, chunk, block).
//   Index math is 32-bit where the planner bounds it (token, row, head-dim offsets < 2^31);
//   element offsets into the tensors stay 64-bit.
//   A token whose cache row lies outside [0, P) reads no cos/sin (nothing out of bounds) and
//   its rotated dims are written as NaN (its pass-through dims are copied as usual): memory
//   safe, recoverable and visible, where a device assert would lose the CUDA context.
// apply_rotary (flash-attn's elementwise API): one thread per VEC elements of a row of the
//   innermost dim (16-byte vectors when every operand allows), rows split with 32-bit division
//   once per thread and row (64-bit only for more than 2^32 rows).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

#include "rotary_math.h"
#include "rotary_ops.h"

// Simulation hooks (tests/cuda_sim.cpp): every global access of the kernels goes through them.
#ifndef RK_SIM_READ
#define RK_SIM_READ(ptr, bytes)
#endif
#ifndef RK_SIM_WRITE
#define RK_SIM_WRITE(ptr, bytes)
#endif
#ifndef RK_SIM_ALIGNED
#define RK_SIM_ALIGNED(ptr, bytes)
#endif

namespace rotary_kernels {

// At most kThreads threads per block, and registers capped so that kMinBlocks such blocks fit
// on an SM (65536 / (256 x 4) = 64 registers): up to 50% theoretical occupancy on sm_80/sm_90
// (46.9% with Llama's 8x20 blocks, 6 of them).
constexpr int kThreads = 256;
#ifndef RK_MIN_BLOCKS
#define RK_MIN_BLOCKS 4
#endif
constexpr int kMinBlocks = RK_MIN_BLOCKS;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// N values of T in registers as the 32-bit words they were loaded as (16-bit types: two values
// a register), converted to the math type only where a step uses them: q/k values in flight
// and a chunk's cos/sin, held across the steps of the row loop, never exist unpacked outside a
// step. The conj rule and the NaN of a bad token are applied to the words once; opaque() keeps
// the compilers from hoisting the per-step unpacking of cos/sin out of the loop, which would
// hold twice the registers for the whole loop (and spill under the register budget).
template <typename T, int N>
struct Packed {
  static constexpr bool kWords = (sizeof(T) * N) % 4 == 0;  // else VEC = 1 with a 16-bit T
  static constexpr int W = kWords ? static_cast<int>(sizeof(T) * N / 4) : 1;
  uint32_t w[W];
  Vec<T, N> v;  // used only when !kWords

  __device__ __forceinline__ void set(const Vec<T, N>& x) {
    if constexpr (kWords) {
      memcpy(w, &x, sizeof(x));
    } else {
      v = x;
    }
  }
  __device__ __forceinline__ Vec<T, N> get() const {
    if constexpr (kWords) {
      Vec<T, N> x;
      memcpy(&x, w, sizeof(x));
      return x;
    } else {
      return v;
    }
  }
  // Value i alone (a shift or byte permute of its word: only the values a step is using are
  // ever unpacked).
  __device__ __forceinline__ T at(int i) const {
    if constexpr (kWords) {
      T x;
      memcpy(&x, reinterpret_cast<const char*>(w) + i * sizeof(T), sizeof(T));
      return x;
    } else {
      return v.v[i];
    }
  }
  __device__ __forceinline__ void set_at(int i, T x) {
    if constexpr (kWords) {
      memcpy(reinterpret_cast<char*>(w) + i * sizeof(T), &x, sizeof(T));
    } else {
      v.v[i] = x;
    }
  }
  __device__ __forceinline__ void fill_nan() {
    Vec<T, N> x;
#pragma unroll
    for (int i = 0; i < N; ++i) x.v[i] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
    set(x);
  }
  // Flip the sign of every value (exact).
  __device__ __forceinline__ void negate() {
    if constexpr (kWords) {
      constexpr uint32_t lo = sizeof(T) == 2 ? 0x80008000u : (sizeof(T) == 4 ? 0x80000000u : 0u);
      constexpr uint32_t hi = sizeof(T) == 8 ? 0x80000000u : lo;  // doubles: the sign sits in the high word
#pragma unroll
      for (int i = 0; i < W; ++i) w[i] ^= (i % 2 ? hi : lo);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) v.v[i] = -v.v[i];
    }
  }
  // Swap the two values of each neighbouring pair (0, 1), (2, 3), ... (N even).
  __device__ __forceinline__ void swap_pairs() {
    static_assert(kWords && N % 2 == 0, "pairs inside a vector");
    if constexpr (sizeof(T) == 2) {
#pragma unroll
      for (int i = 0; i < W; ++i) w[i] = (w[i] >> 16) | (w[i] << 16);
    } else {
      constexpr int per = static_cast<int>(sizeof(T) / 4);  // words a value
#pragma unroll
      for (int i = 0; i < W; i += 2 * per) {
#pragma unroll
        for (int k = 0; k < per; ++k) {
          const uint32_t t = w[i + k];
          w[i + k] = w[i + per + k];
          w[i + per + k] = t;
        }
      }
    }
  }
  // w ^= zero, where zero is 0 but known only at run time and changes with the loop's step:
  // the per-step unpacking of the words cannot be hoisted out of the loop (by nvvm or ptxas).
  __device__ __forceinline__ void opaque(uint32_t zero) {
    if constexpr (kWords && sizeof(T) == 2) {  // wider values need no unpacking
#pragma unroll
      for (int i = 0; i < W; ++i) w[i] ^= zero;
    }
  }
};

// N elements starting at p, element stride `stride`; VECTOR means stride 1 and aligned: one
// 16-byte access (two for 8 floats), as words.
template <bool VECTOR, typename T, int N>
__device__ __forceinline__ void load_n(const T* p, int64_t stride, Packed<T, N>& out) {
  if constexpr (VECTOR) {
    static_assert(Packed<T, N>::kWords, "vectors are whole words");
    using WV = Vec<uint32_t, Packed<T, N>::W>;
    RK_SIM_ALIGNED(p, sizeof(WV));
    RK_SIM_READ(p, sizeof(WV));
    const WV v = *reinterpret_cast<const WV*>(p);
#pragma unroll
    for (int i = 0; i < Packed<T, N>::W; ++i) out.w[i] = v.v[i];
  } else {
    Vec<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      RK_SIM_READ(p + i * stride, sizeof(T));
      v.v[i] = p[i * stride];
    }
    out.set(v);
  }
}

// EXPLICIT: an st.global.v4 in inline PTX (apply_rotary_kernel, where nvvm otherwise splits the
// vector store into 32-bit pieces); the rotary kernel's plain stores already come out whole
// and the asm's memory clobber would cost it registers.
template <bool VECTOR, typename T, int N, bool EXPLICIT = false>
__device__ __forceinline__ void store_n(T* p, int64_t stride, const Packed<T, N>& in) {
  if constexpr (VECTOR) {
    using WV = Vec<uint32_t, Packed<T, N>::W>;
    RK_SIM_ALIGNED(p, sizeof(WV));
    RK_SIM_WRITE(p, sizeof(WV));
#if defined(__CUDA_ARCH__)
    if constexpr (EXPLICIT) {
      constexpr int W = Packed<T, N>::W;
      static_assert(W == 2 || W % 4 == 0, "8- or 16-byte pieces");
      if constexpr (W == 2) {
        asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(in.w[0]), "r"(in.w[1]) : "memory");
      } else {
#pragma unroll
        for (int i = 0; i < W; i += 4) {
          asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(reinterpret_cast<char*>(p) + 4 * i),
                       "r"(in.w[i]), "r"(in.w[i + 1]), "r"(in.w[i + 2]), "r"(in.w[i + 3])
                       : "memory");
        }
      }
      return;
    }
#endif
    WV v;
#pragma unroll
    for (int i = 0; i < Packed<T, N>::W; ++i) v.v[i] = in.w[i];
    *reinterpret_cast<WV*>(p) = v;
  } else {
    const Vec<T, N> v = in.get();
#pragma unroll
    for (int i = 0; i < N; ++i) {
      RK_SIM_WRITE(p + i * stride, sizeof(T));
      p[i * stride] = v.v[i];
    }
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
  const cs_t* cos_k;  // k's own tables, with cos/sin's strides (cos/sin when k shares q's)
  const cs_t* sin_k;
  TokenIndex ti;
  // 32-bit: the planner checks tokens, rows and D against INT32_MAX.
  int32_t S, D, half, rows, rows_per_slice;
  int32_t hq;  // q.H as 32 bits: rows r < hq are q's
  int32_t k_row0;  // rows r >= k_row0 read cos_k/sin_k: hq with k's own tables, else rows (none)
  bool conj;
  bool pair_tables;  // tables [..., R/2], one entry per pair (rotary_math.h table_index)
  bool swap;  // swap_layout: pairs stored in the other layout (PAIRS instances with VEC > 1)
  // cos/sin are the real and imaginary parts of one complex table (Llama 4's freqs_cis: sin one
  // element after cos, both of last stride 2): PAIRS instances with VEC > 1 read a chunk's
  // VEC (cos, sin) pairs as one vector of 2 VEC values
  bool complex_tables;
};

// A chunk is two VEC-element groups of the head dim, at element offsets oa and ob = oa +
// group_gap(): half-split pairs group A with group B element by element (oa = c VEC, gap R/2);
// interleaved pairs neighbours inside a group, or with VEC = 1 the two groups (oa = 2 c VEC,
// gap VEC). The kernel walks oa itself (no chunk index, no ob kept in a register).
template <int VEC, bool INTERLEAVED>
__device__ __forceinline__ int32_t group_gap(int32_t half) {
  return INTERLEAVED ? VEC : half;
}

// Rotates the pairs of a chunk in the math type acc_t, one pair at a time from the packed
// words; cos/sin already carry the conj rule.
template <int VEC, bool INTERLEAVED, typename acc_t, typename T, typename C>
__device__ __forceinline__ void rotate_chunk(Packed<T, VEC>& xa, Packed<T, VEC>& xb, const Packed<C, VEC>& ca,
                                             const Packed<C, VEC>& cb, const Packed<C, VEC>& sa,
                                             const Packed<C, VEC>& sb) {
  // x1 = X1[i1], x2 = X2[i2] with cos/sin from the same places.
  auto rot = [](Packed<T, VEC>& X1, int i1, Packed<T, VEC>& X2, int i2, const Packed<C, VEC>& C1,
                const Packed<C, VEC>& C2, const Packed<C, VEC>& S1, const Packed<C, VEC>& S2) {
    acc_t y1, y2;
    rotate_pair(static_cast<acc_t>(X1.at(i1)), static_cast<acc_t>(X2.at(i2)),
                make_pair_cs(static_cast<acc_t>(C1.at(i1)), static_cast<acc_t>(C2.at(i2)),
                             static_cast<acc_t>(S1.at(i1)), static_cast<acc_t>(S2.at(i2)), false),
                y1, y2);
    X1.set_at(i1, static_cast<T>(y1));
    X2.set_at(i2, static_cast<T>(y2));
  };
  if constexpr (INTERLEAVED && VEC >= 2) {
#pragma unroll
    for (int i = 0; i < VEC; i += 2) {
      rot(xa, i, xa, i + 1, ca, ca, sa, sa);
      rot(xb, i, xb, i + 1, cb, cb, sb, sb);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) rot(xa, i, xb, i, ca, cb, sa, sb);
  }
}

// A chunk of VEC pairs (VEC > 1) with per-pair tables: pair j reads cos/sin entry j. In x and
// out, interleaved: pairs 0 .. VEC/2 - 1 are neighbours in the first vector, the rest in the
// second (the chunk's 2 VEC elements); half-split: pair j is element j of the first vector
// (group A) and of the second (group B, R/2 on). out_interleaved differs from INTERLEAVED with
// swap_layout. sa carries the conj rule.
template <int VEC, bool INTERLEAVED, typename acc_t, typename T, typename C>
__device__ __forceinline__ void rotate_pair_chunk(const Packed<T, VEC>& xa, const Packed<T, VEC>& xb,
                                                  const Packed<C, VEC>& ca, const Packed<C, VEC>& sa,
                                                  Packed<T, VEC>& ya, Packed<T, VEC>& yb, bool out_interleaved) {
  constexpr int kHalf = VEC / 2;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const Packed<T, VEC>& src = j < kHalf ? xa : xb;
    const int e = 2 * (j % kHalf);
    const acc_t x1 = static_cast<acc_t>(INTERLEAVED ? src.at(e) : xa.at(j));
    const acc_t x2 = static_cast<acc_t>(INTERLEAVED ? src.at(e + 1) : xb.at(j));
    const acc_t c = static_cast<acc_t>(ca.at(j)), sn = static_cast<acc_t>(sa.at(j));
    acc_t y1, y2;
    rotate_pair(x1, x2, make_pair_cs(c, c, sn, sn, false), y1, y2);
    if (!out_interleaved) {
      ya.set_at(j, static_cast<T>(y1));
      yb.set_at(j, static_cast<T>(y2));
    } else {
      Packed<T, VEC>& dst = j < kHalf ? ya : yb;
      dst.set_at(e, static_cast<T>(y1));
      dst.set_at(e + 1, static_cast<T>(y2));
    }
  }
}

// The conj (backward) rule on a chunk's sin values, once per chunk: (s1, s2) := (-s2, -s1)
// within each pair (rotary_math.h make_pair_cs).
template <int VEC, bool INTERLEAVED, typename C>
__device__ __forceinline__ void conj_sin(Packed<C, VEC>& sa, Packed<C, VEC>& sb) {
  if constexpr (INTERLEAVED && VEC >= 2) {  // pairs are neighbours inside each vector
    sa.swap_pairs();
    sb.swap_pairs();
  } else {  // pair i joins element i of sa with element i of sb
    const Packed<C, VEC> t = sa;
    sa = sb;
    sb = t;
  }
  sa.negate();
  sb.negate();
}

// VEC cos (or sin) values of head-dim elements j0 .. j0 + VEC - 1 of token (a, s)'s row: one
// vector load (CS_VECTOR: contiguous, aligned, mrope only sectioned in whole chunks, not
// interleaved per-pair), else element by element, each from its pair's mrope axis and position.
// pair_tables: per-pair tables (table_index; a half-split group B reads group A's entries).
template <bool CS_VECTOR, int VEC, typename cs_t>
__device__ __forceinline__ void load_cs(const cs_t* t, const CSStrides& st, const TokenIndex& ti, int64_t a,
                                        int64_t s, const int64_t (&pos)[3], int32_t j0, int32_t half,
                                        bool interleaved, bool pair_tables, Packed<cs_t, VEC>& regs, int x0) {
  if constexpr (CS_VECTOR) {
    // (CS_VECTOR: st.r == 1; j0 >= 0 zero-extended, the row's offset shared by both groups; one
    // mrope axis x0 for the whole chunk, at position pos[0].)
    const int32_t jt = pair_tables && j0 >= half ? j0 - half : j0;
    load_n<true>(t + cs_offset(st, x0, a, s, pos[0], 0) + int64_t{static_cast<uint32_t>(jt)}, 1, regs);
  } else {
    Vec<cs_t, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t j = j0 + e, i = pair_of(j, half, interleaved);
      const int x = pair_axis(ti, i);
      const int64_t px = x == 0 ? pos[0] : (x == 1 ? pos[1] : pos[2]);  // no dynamic indexing: registers
      const cs_t* e_ptr = t + cs_offset(st, x, a, s, px, pair_tables ? i : j);
      RK_SIM_READ(e_ptr, sizeof(cs_t));
      out.v[e] = *e_ptr;
    }
    regs.set(out);
  }
}

// Row r of the token's q and k rows (q's first): where its input (OUT = false) or output
// starts, and the head-dim stride (VECTOR: contiguous, 1). Computed where used, so no 64-bit
// pointer stays live across the loads of a step.
template <bool OUT, bool VECTOR, typename scalar_t>
__device__ __forceinline__ auto row_ptr(const Operand<scalar_t>& q, const Operand<scalar_t>& k, int32_t hq, uint32_t a,
                                        uint32_t s, int32_t r, int64_t& stride) {
  // (a, s, h are non-negative 32-bit values: zero-extended, so no high words stay live.)
  const bool is_q = r < hq;
  const Operand<scalar_t>& o = is_q ? q : k;
  const uint32_t h = static_cast<uint32_t>(is_q ? r : r - hq);
  const Strides4& st = OUT ? o.sy : o.sx;
  stride = VECTOR ? 1 : st.d;
  const int64_t aa = a, ss = s, hh = h;
  if constexpr (OUT) {
    return o.y + offset4(st, aa, ss, hh, 0);
  } else {
    return o.x + offset4(st, aa, ss, hh, 0);
  }
}

// Blocks an SM must hold (the register budget: ptxas fits launch_bounds' blocks of the kernel's
// most threads, block_threads, that many times into the SM's four 16K-register quarters, a
// warp's registers in one quarter). The element-by-element cos/sin path (mrope, misaligned
// tables) does not fit 64 registers without spilling: it gets a larger budget, hence less
// occupancy (measured with ptxas, sm_90/sm_80; tests/test_codegen_cuda.py records each). 16-bit x
// with fp32 tables fits 64 when interleaved (the loop keeps its token and offsets as 32-bit values,
// the bad-token path stores NaN without holding cos/sin, and conj swaps sin by address). With k's
// own tables (K_TABLES) the element-by-element path needs more than 128 (sm_80): 255.
// 16-bit x with fp32 vector tables, half-split (wide_tables: 32 registers of cos/sin held across
// the row loop, and products rounded on their own, rotary_math.h mul_rn, no FMA) spills 12-16 bytes
// at 64 registers and uses 77 under (256, 3), whose budget is 80: Llama's 8x20 blocks then ran 4 an
// SM (Nsight Compute, H100: 31% occupancy, 81% of DRAM bandwidth, against the bf16-table
// instance's 6 blocks at 64 registers and 85%). Those instances take blocks of at most 224 threads
// (7 warps) instead, 4 of them: ptxas fits 72 registers without spilling (sm_80, sm_90), 7 warps a
// quarter, so 8x20 blocks run 5 an SM (25 warps).
constexpr int kWideThreads = 224, kWideBlocks = 4;
template <typename scalar_t, typename cs_t>
constexpr bool wide_tables(bool cs_vector, bool interleaved) {
  return cs_vector && sizeof(scalar_t) == 2 && sizeof(cs_t) == 4 && !interleaved;
}
template <typename scalar_t, typename cs_t>
constexpr int block_threads(bool cs_vector, bool interleaved) {
  return wide_tables<scalar_t, cs_t>(cs_vector, interleaved) ? kWideThreads : kThreads;
}
template <typename scalar_t, typename cs_t, bool CS_VECTOR, bool INTERLEAVED, bool K_TABLES>
constexpr int min_blocks() {
  if (wide_tables<scalar_t, cs_t>(CS_VECTOR, INTERLEAVED)) return kWideBlocks;
  return CS_VECTOR ? kMinBlocks : (K_TABLES ? kMinBlocks / 4 : kMinBlocks / 2);
}

// A chunk's head-dim offset (>= 0) as 64 bits: sign-extended for element-by-element 16-bit
// tables, zero-extended otherwise. Same value; chosen per instance because ptxas then fits each
// budget without spilling (sm_80 and sm_90, measured: those instances sit at their 128 cap).
template <bool SIGNED>
__device__ __forceinline__ int64_t chunk_off(int32_t o) {
  return SIGNED ? int64_t{o} : int64_t{static_cast<uint32_t>(o)};
}

// K_TABLES: k's rows read cos_k/sin_k (rows >= p.k_row0); the instances without it are the kernel
// as it is without that option (the segment loop below runs once). PAIRS: chunks of whole pairs with
// per-pair tables (VEC > 1: p.swap says whether they are stored in the other layout; VEC = 1:
// swap_layout always); the instances without it store where they load.
template <typename scalar_t, typename cs_t, int VEC, bool VECTOR, bool CS_VECTOR, bool INTERLEAVED, bool K_TABLES,
          bool PAIRS = false>
__global__ void __launch_bounds__(block_threads<scalar_t, cs_t>(CS_VECTOR, INTERLEAVED),
                                  min_blocks<scalar_t, cs_t, CS_VECTOR, INTERLEAVED, K_TABLES>())
    rotary_kernel(const RotaryParams<scalar_t, cs_t> p) {
  static_assert(!PAIRS || (VEC == 1 && !VECTOR && !CS_VECTOR) || (VECTOR && CS_VECTOR && !K_TABLES),
                "chunks of pairs: one pair (swap_layout), or VEC pairs with vector x and per-pair tables");
  constexpr bool kPairVec = PAIRS && VEC > 1;
  using acc_t = typename AccType<scalar_t>::type;
  const int32_t token = static_cast<int32_t>(blockIdx.x);
  const int32_t a = token / p.S, s = token - a * p.S;  // row_ptr takes them as unsigned
  const int32_t row0 = static_cast<int32_t>(blockIdx.y) * p.rows_per_slice;
  const int32_t row_end = p.rows - row0 < p.rows_per_slice ? p.rows : row0 + p.rows_per_slice;
  // Chunk c starts at oa = c kStride. The loop walks oa itself with vector tables, c otherwise
  // (each the form ptxas fits in its register budget without spilling, sm_80 and sm_90).
  constexpr int32_t kStride = INTERLEAVED ? 2 * VEC : VEC;
  constexpr int32_t kStep = CS_VECTOR ? kStride : 1;
  constexpr bool kSignedOff = !CS_VECTOR && sizeof(cs_t) == 2;
  const int32_t i_end = CS_VECTOR ? (INTERLEAVED ? 2 * p.half : p.half) : p.half / VEC;
  const int32_t TY = static_cast<int32_t>(blockDim.y);
  int64_t dx, dy;

#pragma unroll 1
  for (int32_t i = static_cast<int32_t>(threadIdx.x) * kStep; i < i_end; i += static_cast<int32_t>(blockDim.x) * kStep) {
    int32_t r = row0 + static_cast<int32_t>(threadIdx.y);
    if (r >= row_end) break;
    const int32_t oa = CS_VECTOR ? i : i * kStride;
    const int32_t ob = oa + group_gap<VEC, INTERLEAVED>(p.half);
    // Where the chunk is stored: where it was loaded, or with swap_layout its pairs' places in the
    // other layout (pi: its first pair; half-split output at pi and pi + R/2, interleaved at 2 pi
    // and 2 pi + VEC, the second half of its pairs).
    const int32_t pi = PAIRS && INTERLEAVED ? oa / 2 : oa;
    // (half-split PAIRS instances run for swap_layout alone: half-split per-pair tables without it
    // take the plain vector path)
    const bool out_swap = PAIRS && (VEC == 1 || !INTERLEAVED || p.swap);
    // The chunk's mrope axis (CS_VECTOR: one for all its pairs), 0 without mrope.
    const int cx = CS_VECTOR && p.ti.mrope ? pair_axis(p.ti, pair_of(oa, p.half, INTERLEAVED)) : 0;
    const int32_t ya = out_swap ? (INTERLEAVED ? pi : 2 * pi) : oa;
    const int32_t yb = out_swap ? (INTERLEAVED ? pi + p.half : 2 * pi + VEC) : ob;
    // The thread's rows in segments that read one table pair: all of them, or, with k's own
    // tables (K_TABLES), q's rows and then k's.
#pragma unroll 1
    for (;;) {
      // The segment's first row's q/k loads, before anything waits on memory.
      Packed<scalar_t, VEC> xa, xb;
      const scalar_t* x = row_ptr<false, VECTOR>(p.q, p.k, p.hq, a, s, r, dx);
      load_n<VECTOR>(x + chunk_off<kSignedOff>(oa) * dx, dx, xa);
      load_n<VECTOR>(x + chunk_off<kSignedOff>(ob) * dx, dx, xb);
      // Then the chunk's cos/sin: the token's cache row on each mrope axis (caches), else the
      // per-token tables. A row outside the cache on any axis: NaN, nothing read. CS_VECTOR
      // reads one axis, the chunk's (sectioned mrope whose sections are whole chunks), at pos[0].
      int64_t pos[3] = {0, 0, 0};
      bool bad = false;
#pragma unroll
      for (int ax = 0; ax < 3; ++ax) {
        if (ax == 0 || p.ti.mrope) {
          const int64_t px = token_position(p.ti, a, s, ax);
          bad = bad || !position_ok(p.ti, px);
          if (!CS_VECTOR) {
            pos[ax] = px;
          } else if (ax == cx) {
            pos[0] = px;
          }
        }
      }
      // A position outside the cache: nothing read, the rotated dims written as NaN. Vector
      // tables: a loop of NaN stores (no cos/sin held, which keeps the 16-bit x / fp32 tables
      // instances at 64 registers); element-by-element tables: row 0 read instead (in bounds),
      // cos/sin set to NaN (the loop above costs those 30 more registers).
      if constexpr (CS_VECTOR) {
        if (bad) {
          Packed<scalar_t, VEC> nan;
          nan.fill_nan();
          for (; r < row_end; r += TY) {
            scalar_t* y = row_ptr<true, VECTOR>(p.q, p.k, p.hq, a, s, r, dy);
            store_n<VECTOR>(y + chunk_off<kSignedOff>(ya) * dy, dy, nan);
            store_n<VECTOR>(y + chunk_off<kSignedOff>(yb) * dy, dy, nan);
          }
          break;  // (every row left: a bad position is bad for both tables)
        }
      } else if (bad) {
        pos[0] = pos[1] = pos[2] = 0;
      }
      const bool k_seg = K_TABLES && r >= p.k_row0;
      const int32_t seg_end = K_TABLES && !k_seg && p.k_row0 < row_end ? p.k_row0 : row_end;
      const cs_t* cos = k_seg ? p.cos_k : p.cos;
      const cs_t* sin = k_seg ? p.sin_k : p.sin;
      Packed<cs_t, VEC> ca, cb, sa, sb;
      if constexpr (kPairVec) {  // per-pair entries pi .. pi + VEC - 1, both elements of each pair
        if (p.complex_tables) {
          Packed<cs_t, 2 * VEC> cis;  // (cos, sin) of pair pi, of pi + 1, ...
          load_n<true>(cos + cs_offset(p.sc, cx, a, s, pos[0], 0) + 2 * int64_t{static_cast<uint32_t>(pi)}, 1, cis);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            ca.set_at(j, cis.at(2 * j));
            sa.set_at(j, cis.at(2 * j + 1));
          }
        } else {
          load_cs<true>(cos, p.sc, p.ti, a, s, pos, pi, p.half, false, true, ca, cx);
          load_cs<true>(sin, p.ss, p.ti, a, s, pos, pi, p.half, false, true, sa, cx);
        }
        if (p.conj) sa.negate();  // (s1, s2) := (-s2, -s1), s1 = s2
      }
      if constexpr (!kPairVec) {
        load_cs<CS_VECTOR>(cos, p.sc, p.ti, a, s, pos, oa, p.half, INTERLEAVED, p.pair_tables, ca, cx);
        load_cs<CS_VECTOR>(cos, p.sc, p.ti, a, s, pos, ob, p.half, INTERLEAVED, p.pair_tables, cb, cx);
      }
      // conj: (s1, s2) := (-s2, -s1). Half-split with vector x swaps sin's groups by address (no
      // register swap: what keeps 16-bit x / fp32 tables at 64 registers); interleaved and the
      // scalar path (VEC = 1, where by address costs ~20 registers more) swap in registers.
      constexpr bool kSwap = VECTOR && !INTERLEAVED;
      const bool swap = kSwap && p.conj;
      if constexpr (!kPairVec) {
        load_cs<CS_VECTOR>(sin, p.ss, p.ti, a, s, pos, swap ? ob : oa, p.half, INTERLEAVED, p.pair_tables, sa, cx);
        load_cs<CS_VECTOR>(sin, p.ss, p.ti, a, s, pos, swap ? oa : ob, p.half, INTERLEAVED, p.pair_tables, sb, cx);
      }
      if (!CS_VECTOR && bad) {
        ca.fill_nan();
        cb.fill_nan();
        sa.fill_nan();
        sb.fill_nan();
      }
      if (!kPairVec && p.conj) {
        if constexpr (!kSwap) {
          conj_sin<VEC, INTERLEAVED>(sa, sb);
        } else {  // already swapped: the signs
          sa.negate();
          sb.negate();
        }
      }

      // One row a step: rotate, store, then issue the next row's loads (TY rows on).
#pragma unroll 1
      for (;;) {
        const uint32_t zero = static_cast<uint32_t>(r) >> 31;  // 0: r >= 0
        ca.opaque(zero);
        sa.opaque(zero);
        if constexpr (kPairVec) {
          Packed<scalar_t, VEC> outa, outb;
          rotate_pair_chunk<VEC, INTERLEAVED, acc_t>(xa, xb, ca, sa, outa, outb, INTERLEAVED != out_swap);
          xa = outa;
          xb = outb;
        } else {
          cb.opaque(zero);
          sb.opaque(zero);
          rotate_chunk<VEC, INTERLEAVED, acc_t>(xa, xb, ca, cb, sa, sb);
        }
        scalar_t* y = row_ptr<true, VECTOR>(p.q, p.k, p.hq, a, s, r, dy);
        store_n<VECTOR>(y + chunk_off<kSignedOff>(ya) * dy, dy, xa);
        store_n<VECTOR>(y + chunk_off<kSignedOff>(yb) * dy, dy, xb);
        r += TY;
        if (r >= seg_end) break;
        x = row_ptr<false, VECTOR>(p.q, p.k, p.hq, a, s, r, dx);
        load_n<VECTOR>(x + chunk_off<kSignedOff>(oa) * dx, dx, xa);
        load_n<VECTOR>(x + chunk_off<kSignedOff>(ob) * dx, dx, xb);
      }
      if (!K_TABLES || r >= row_end) break;
    }
  }

  // Partial rotary, out of place: the dims [R, D) pass through unchanged (bad tokens too).
  const int32_t tail = p.D - 2 * p.half;
  if (tail > 0 && (p.q.copy_pass || p.k.copy_pass)) {
    for (int32_t r = row0 + static_cast<int32_t>(threadIdx.y); r < row_end; r += TY) {
      if (!(r < p.q.H ? p.q : p.k).copy_pass) continue;
      const scalar_t* x = row_ptr<false, VECTOR>(p.q, p.k, p.hq, a, s, r, dx) + 2 * p.half * dx;
      scalar_t* y = row_ptr<true, VECTOR>(p.q, p.k, p.hq, a, s, r, dy) + 2 * p.half * dy;
      if constexpr (VECTOR) {
        if (tail % VEC == 0) {
          for (int32_t j = static_cast<int32_t>(threadIdx.x) * VEC; j < tail;
               j += static_cast<int32_t>(blockDim.x) * VEC) {
            Packed<scalar_t, VEC> v;
            load_n<true>(x + j, 1, v);  // pass-through copy
            store_n<true>(y + j, 1, v);  // pass-through copy
          }
          continue;
        }
      }
      for (int32_t j = static_cast<int32_t>(threadIdx.x); j < tail; j += static_cast<int32_t>(blockDim.x)) {
        Packed<scalar_t, 1> v;
        load_n<false>(x + j * dx, dx, v);  // pass-through copy
        store_n<false>(y + j * dy, dy, v);  // pass-through copy
      }
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

// cos and sin are the real and imaginary parts of one complex tensor (sin one element after cos,
// equal strides, last 2), whose rows of vec pairs (2 vec values) are aligned vectors.
inline bool complex_parts_ok(const at::Tensor& cos, const at::Tensor& sin, int64_t vec) {
  if (cos.stride(-1) != 2 || cos.strides() != sin.strides() || cos.scalar_type() != sin.scalar_type() ||
      static_cast<const char*>(sin.data_ptr()) != static_cast<const char*>(cos.data_ptr()) + cos.element_size()) {
    return false;
  }
  for (int d = 0; d < cos.dim() - 1; ++d) {
    if (cos.size(d) > 1 && cos.stride(d) % (2 * vec) != 0) return false;
  }
  return aligned(cos.data_ptr(), 2 * vec * cos.element_size());
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

struct LaunchPlan {
  LaunchShape grid, block;
  int64_t rows_per_slice;
};

// The launch shape of rotary_kernel from sizes alone (tests call it without tensors):
// tokens = A * S, rows = Hq + Hk, nchunks = chunks of a row (pairs / VEC), sms = SMs.
// Block: TX threads over the chunks of a row, TY over rows, one row per thread and step.
// Small problems (decode) split the rows over grid.y so every row is in flight at once; large
// ones split grid.y only when tokens alone are too few. A slice's rows are spread evenly over
// the fewest steps blocks of up to kThreads allow (TY whole warps where it can): Llama's 40 rows
// take two steps of 20 (8x20 blocks), not 32 and then 8, which left 6 of a block's 8 warps
// waiting, holding their registers, through its second memory round trip. A block's resources
// are freed only when all its warps end, so what keeps an SM's loads in flight is every warp
// busy at every step (the H200 measured the 8x32 plan at 82-86% of a copy's bandwidth for bf16
// q/k, the H100 92-94%: too few bytes in flight for the H200's bandwidth).
inline LaunchPlan plan_launch(int64_t tokens, int64_t rows, int64_t nchunks, int64_t sms,
                              int64_t max_threads = kThreads) {
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max() - kThreads;  // r + TY stays < 2^31
  RK_CHECK(tokens <= std::numeric_limits<int32_t>::max(), "rotary: too many tokens (", tokens,
           "; the CUDA kernel takes < 2^31)");
  RK_CHECK(rows <= kMax32 && nchunks <= kMax32, "rotary: too many rows (", rows, ") or pairs (", nchunks, ")");
  const int64_t tx = std::min<int64_t>(nchunks, max_threads);
  const int64_t max_ty = std::max<int64_t>(1, max_threads / tx);
  const bool small = tokens * rows * nchunks <= sms * 2048;
  int64_t slices = small ? (rows + std::min(max_ty, rows) - 1) / std::min(max_ty, rows)
                         : std::min<int64_t>(rows, (4 * sms + tokens - 1) / tokens);
  slices = std::min<int64_t>(slices, 65535);  // grid.y's limit: then more rows per slice
  const int64_t rows_per_slice = (rows + slices - 1) / slices;
  const int64_t steps = (rows_per_slice + max_ty - 1) / max_ty;
  const int64_t warp_rows = std::max<int64_t>(1, 32 / tx);  // rows that make TY whole warps
  const int64_t even = (rows_per_slice + steps - 1) / steps;
  const int64_t ty = std::min(max_ty, (even + warp_rows - 1) / warp_rows * warp_rows);
  return {{tokens, (rows + rows_per_slice - 1) / rows_per_slice}, {tx, std::min(ty, rows_per_slice)}, rows_per_slice};
}

template <int VEC, bool VECTOR, bool CS_VECTOR, typename Launcher, typename Params>
void dispatch_interleaved(Launcher& launcher, const Params& p, bool interleaved, bool k_tables, LaunchShape grid,
                          LaunchShape block) {
  if (interleaved) {
    if (k_tables) {
      launcher.template run<VEC, VECTOR, CS_VECTOR, true, true>(p, grid, block);
    } else {
      launcher.template run<VEC, VECTOR, CS_VECTOR, true, false>(p, grid, block);
    }
  } else if (k_tables) {
    launcher.template run<VEC, VECTOR, CS_VECTOR, false, true>(p, grid, block);
  } else {
    launcher.template run<VEC, VECTOR, CS_VECTOR, false, false>(p, grid, block);
  }
}

// k's own tables are read with cos/sin's strides: the kernel picks between two pointers, not two
// sets of strides (which would cost registers). Tables laid out otherwise are all copied densely
// (a copy of the tables, not of q or k). Returns {cos, sin, cos_k, sin_k} for rotary_plan.
inline std::array<at::Tensor, 4> shared_table_strides(const at::Tensor& cos, const at::Tensor& sin,
                                                      const at::Tensor& cos_k, const at::Tensor& sin_k) {
  const bool k_tables = !(same_view(cos_k, cos) && same_view(sin_k, sin));
  if (!k_tables || (cos_k.strides() == cos.strides() && sin_k.strides() == sin.strides())) {
    return {cos, sin, cos_k, sin_k};
  }
  return {cos.contiguous(), sin.contiguous(), cos_k.contiguous(), sin_k.contiguous()};
}

// Host side: fill the parameters (cos_k/sin_k: k's tables, cos/sin themselves when k shares q's;
// through shared_table_strides),
// pick the memory path and the launch shape, then call
// launcher.template run<VEC, VECTOR, CS_VECTOR, INTERLEAVED, K_TABLES[, PAIRS]>(params, grid, block) — a real
// <<<>>> launch in rotary_cuda.cu, a sequential walk over blocks and threads in the CPU
// simulation the tests build (tests/cuda_sim.cpp).
template <typename scalar_t, typename cs_t, typename Launcher>
void rotary_plan(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                 const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                 bool interleaved, bool conj, const TokenIndexArgs& ix, int64_t sms, Launcher& launcher,
                 const at::Tensor& cos_k, const at::Tensor& sin_k, bool pair_tables, bool swap_layout = false) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const bool k_tables = !(same_view(cos_k, cos) && same_view(sin_k, sin));
  RK_CHECK(!k_tables || (cos_k.strides() == cos.strides() && sin_k.strides() == sin.strides()),
           "rotary: internal: k's tables must have cos/sin's strides (shared_table_strides)");
  const int64_t A = q.size(0), S = q.size(1), D = q.size(3), R = cos.size(-1) * (pair_tables ? 2 : 1), half = R / 2;
  RotaryParams<scalar_t, cs_t> p{};
  p.q = make_operand<scalar_t>(q, q_out, R);
  if (k.has_value()) p.k = make_operand<scalar_t>(*k, *k_out, R);
  p.cos = cos.const_data_ptr<cs_t>();
  p.sin = sin.const_data_ptr<cs_t>();
  p.sc = cs_strides(cos);
  p.ss = cs_strides(sin);
  p.cos_k = cos_k.const_data_ptr<cs_t>();
  p.sin_k = sin_k.const_data_ptr<cs_t>();
  p.ti = make_token_index(cos, ix, cos_k);
  p.conj = conj;
  p.pair_tables = pair_tables;
  const int64_t tokens = A * S, rows = p.q.H + p.k.H;
  if (tokens == 0 || rows == 0) return;

  // Chunks of whole pairs (PAIRS instances, VEC pairs with vector x and tables): swap_layout (the
  // op checks per-pair tables, no cos_k; else one pair a chunk, element by element) and
  // interleaved per-pair tables, each entry serving two neighbouring elements (with cos_k:
  // element by element).
  const bool pairs = swap_layout || (pair_tables && interleaved && !k_tables);
  bool vector = half % VEC == 0 && vector_ok(q, VEC) && vector_ok(q_out, VEC);
  if (k.has_value()) vector = vector && vector_ok(*k, VEC) && vector_ok(*k_out, VEC);
  // (sectioned mrope: when every section is whole chunks, a chunk reads one axis)
  const bool mrope_ok = p.ti.mrope == 0 || (p.ti.mrope == 1 && p.ti.sec0 % VEC == 0 && p.ti.sec1 % VEC == 0);
  // (a complex table's real and imaginary parts, read as one, in chunks of pairs)
  const bool complex_tables = pairs && !k_tables && sizeof(cs_t) >= 4 && complex_parts_ok(cos, sin, VEC);
  const bool cs_vector = vector && mrope_ok && !(pair_tables && interleaved && !pairs) &&
                         (complex_tables || (cs_vector_ok(cos, VEC) && cs_vector_ok(sin, VEC) &&
                                             cs_vector_ok(cos_k, VEC) && cs_vector_ok(sin_k, VEC)));
  if (swap_layout) vector = cs_vector;  // (the vector swap needs both)
  // (the instance's CS_VECTOR is cs_vector, its INTERLEAVED interleaved: its block_threads)
  const LaunchPlan plan = plan_launch(tokens, rows, vector ? half / VEC : half, sms,
                                      block_threads<scalar_t, cs_t>(cs_vector, interleaved));
  RK_CHECK(D <= std::numeric_limits<int32_t>::max(), "rotary: head dim too large (", D, ")");
  p.S = static_cast<int32_t>(S);
  p.D = static_cast<int32_t>(D);
  p.half = static_cast<int32_t>(half);
  p.rows = static_cast<int32_t>(rows);
  p.rows_per_slice = static_cast<int32_t>(plan.rows_per_slice);
  p.hq = static_cast<int32_t>(p.q.H);
  p.k_row0 = k_tables ? p.hq : p.rows;
  p.swap = swap_layout;
  p.complex_tables = complex_tables && cs_vector;
  RK_CHECK(!swap_layout || (pair_tables && !k_tables),
           "rotary: swap_layout takes per-pair tables without cos_k/sin_k");
  if (pairs && cs_vector) {
    if (interleaved) {
      launcher.template run<VEC, true, true, true, false, true>(p, plan.grid, plan.block);
    } else {
      launcher.template run<VEC, true, true, false, false, true>(p, plan.grid, plan.block);
    }
  } else if (swap_layout) {
    if (interleaved) {
      launcher.template run<1, false, false, true, false, true>(p, plan.grid, plan.block);
    } else {
      launcher.template run<1, false, false, false, false, true>(p, plan.grid, plan.block);
    }
  } else if (!vector) {
    dispatch_interleaved<1, false, false>(launcher, p, interleaved, k_tables, plan.grid, plan.block);
  } else if (cs_vector) {
    dispatch_interleaved<VEC, true, true>(launcher, p, interleaved, k_tables, plan.grid, plan.block);
  } else {
    dispatch_interleaved<VEC, true, false>(launcher, p, interleaved, k_tables, plan.grid, plan.block);
  }
}

// ---- flash-attn's elementwise apply_rotary ----

// Rows of the 4-D iteration space [n0, n1, n2] and VEC-element chunks of the innermost dim n3.
struct ElementwisePlan {
  LaunchShape grid, block;
  int64_t rows, chunks;
  int vec;  // elements per thread access: 16 / sizeof(scalar_t), or 1
};

// Whether every operand allows 16-byte accesses along dim 3 (n3 % vec == 0 already checked).
template <typename scalar_t, typename acc_t>
bool elementwise_vector_ok(const Elementwise<scalar_t, acc_t>& e, int vec) {
  auto ok = [&](const void* ptr, const Strides4& st, int64_t esize, int64_t v) {
    const int64_t n[3] = {e.n0, e.n1, e.n2}, sd[3] = {st.a, st.s, st.h};
    if (st.d != 1 && e.n3 > 1) return false;
    for (int d = 0; d < 3; ++d) {
      if (n[d] > 1 && sd[d] % v != 0) return false;
    }
    return aligned(ptr, v * esize);
  };
  const int64_t xs = sizeof(scalar_t), cs = sizeof(acc_t);
  return e.n3 % vec == 0 && ok(e.x1, e.sx1, xs, vec) && ok(e.x2, e.sx2, xs, vec) && ok(e.o1, e.so1, xs, vec) &&
         ok(e.o2, e.so2, xs, vec) && ok(e.c, e.sc, cs, vec) && ok(e.s, e.ss, cs, vec);
}

inline ElementwisePlan plan_elementwise(int64_t rows, int64_t n3, int vec) {
  const int64_t chunks = (n3 + vec - 1) / vec;
  const int64_t tx = std::min<int64_t>(chunks, kThreads);
  const int64_t ty = std::max<int64_t>(1, kThreads / tx);
  const int64_t blocks = std::min<int64_t>((rows + ty - 1) / ty, 65535LL * 16);
  return {{blocks, 1}, {tx, ty}, rows, chunks, vec};
}

// Row index -> (i0, i1, i2): per thread and row, 32-bit division unless there are >= 2^32 rows.
template <typename I>
__device__ __forceinline__ void split_row(I row, I n1, I n2, int64_t& i0, int64_t& i1, int64_t& i2) {
  const I q2 = row / n2;
  i2 = static_cast<int64_t>(row - q2 * n2);
  const I q1 = q2 / n1;
  i1 = static_cast<int64_t>(q2 - q1 * n1);
  i0 = static_cast<int64_t>(q1);
}

// ROWS32: fewer than 2^32 rows, split with 32-bit division (else 64-bit, once per row).
template <typename scalar_t, typename acc_t, int VEC, bool VECTOR, bool ROWS32>
__global__ void __launch_bounds__(kThreads, kMinBlocks) apply_rotary_kernel(const Elementwise<scalar_t, acc_t> e,
                                                                             int64_t rows) {
  const int64_t ty = blockDim.y;
  const int64_t chunks = (e.n3 + VEC - 1) / VEC;
  for (int64_t row = blockIdx.x * ty + threadIdx.y; row < rows; row += static_cast<int64_t>(gridDim.x) * ty) {
    int64_t i0, i1, i2;
    if constexpr (ROWS32) {
      split_row<uint32_t>(static_cast<uint32_t>(row), static_cast<uint32_t>(e.n1), static_cast<uint32_t>(e.n2), i0,
                          i1, i2);
    } else {
      split_row<int64_t>(row, e.n1, e.n2, i0, i1, i2);
    }
    const scalar_t* x1 = e.x1 + offset4(e.sx1, i0, i1, i2, 0);
    const scalar_t* x2 = e.x2 + offset4(e.sx2, i0, i1, i2, 0);
    const acc_t* c = e.c + offset4(e.sc, i0, i1, i2, 0);
    const acc_t* s = e.s + offset4(e.ss, i0, i1, i2, 0);
    scalar_t* o1 = e.o1 + offset4(e.so1, i0, i1, i2, 0);
    scalar_t* o2 = e.o2 + offset4(e.so2, i0, i1, i2, 0);
    for (int64_t ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
      const int64_t j = ch * VEC;
      // (VECTOR: every operand's dim 3 is contiguous.)
      const int64_t d1 = VECTOR ? 1 : e.sx1.d, d2 = VECTOR ? 1 : e.sx2.d, dc = VECTOR ? 1 : e.sc.d,
                    ds = VECTOR ? 1 : e.ss.d, do1 = VECTOR ? 1 : e.so1.d, do2 = VECTOR ? 1 : e.so2.d;
      Packed<scalar_t, VEC> pa, pb;
      Packed<acc_t, VEC> pc, ps;
      load_n<VECTOR>(x1 + j * d1, d1, pa);
      load_n<VECTOR>(x2 + j * d2, d2, pb);
      load_n<VECTOR>(c + j * dc, dc, pc);
      load_n<VECTOR>(s + j * ds, ds, ps);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc_t y1, y2;
        rotate_elementwise(static_cast<acc_t>(pa.at(i)), static_cast<acc_t>(pb.at(i)), pc.at(i), ps.at(i), e.conj,
                           y1, y2);
        pa.set_at(i, static_cast<scalar_t>(y1));
        pb.set_at(i, static_cast<scalar_t>(y2));
      }
      store_n<VECTOR, scalar_t, VEC, true>(o1 + j * do1, do1, pa);
      store_n<VECTOR, scalar_t, VEC, true>(o2 + j * do2, do2, pb);
    }
  }
}

// Host side of apply_rotary: picks the vector width, the launch shape and the row index
// width, then calls launcher.template run_elementwise<VEC, VECTOR, ROWS32>(e, plan).
template <typename scalar_t, typename acc_t, typename Launcher>
void apply_rotary_plan(const Elementwise<scalar_t, acc_t>& e, Launcher& launcher) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int64_t rows = e.n0 * e.n1 * e.n2;
  if (rows == 0 || e.n3 == 0) return;
  const bool vector = elementwise_vector_ok(e, VEC);
  const ElementwisePlan plan = plan_elementwise(rows, e.n3, vector ? VEC : 1);
  if (rows <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max())) {
    if (vector) {
      launcher.template run_elementwise<VEC, true, true>(e, plan);
    } else {
      launcher.template run_elementwise<1, false, true>(e, plan);
    }
  } else if (vector) {
    launcher.template run_elementwise<VEC, true, false>(e, plan);
  } else {
    launcher.template run_elementwise<1, false, false>(e, plan);
  }
}

}  // namespace rotary_kernels
