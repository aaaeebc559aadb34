// The CPU rotary kernel (q and k in one pass over tokens), for every dtype: rotary_cpu_typed at the
// end of this file. One file per dtype instantiates it (rotary_cpu.cpp: fp32 and fp64, with the
// entry points and flash-attn's elementwise apply_rotary; rotary_cpu_bf16.cpp, rotary_cpu_f16.cpp),
// so that the build compiles them in parallel: as one file this was the package's longest
// compile (67 s on the CI VM; the parts take at most 28 s).
//
// Tokens (a, s) are split across threads with at::parallel_for. Per block of tokens, the cos/sin
// of every pair are converted once into small tables and reused for all heads of q and k, whose
// rows are walked in memory order (see "Loop order" below). Rows with a
// contiguous head dim go through fixed-size chunks (loaded into local arrays, so the compiler
// vectorises them even when out aliases x); other strides take the generic indexed path.
// 16-bit conversions are branch-free bit arithmetic (vectorisable, IEEE round to nearest even),
// and on x86-64 Linux the per-token work is compiled for AVX-512, AVX2 and baseline x86-64,
// picked at load time (GCC function multiversioning), so one binary runs everywhere.
// On CPUs with AVX-512F, bf16 rotate-half rows take explicit 512-bit code with the same
// arithmetic and conversions, so the same bits: many rows a call, a token's table row in
// registers (rotate_tokens_avx512; with AVX512-BF16's vcvtne2ps2bf16 narrowing,
// rotate_bf16_tokens_avx512bf16, and with bf16 cos/sin its vdpbf16ps dot products, checked to give
// the same bits), or a row a call (rotate_avx512) for the rows those do not take;
// fp32 and fp16 rotate-half rows of R = 64 or 128 take rotate_tokens_avx512 (many rows a call). On
// CPUs with AVX2 and F16C but no AVX-512, rotate-half and interleaved rows of every dtype but fp64
// take rotate_tokens_avx2 (R a multiple of 16). Large outputs (16 MB and more) are written with
// non-temporal stores.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include <vector>

// The explicit x86-64 code (F16C, AVX2 and AVX-512 intrinsics, GCC function multiversioning)
// is compiled by GCC on x86-64 only; elsewhere (aarch64, clang, MSVC), or with
// ROTARY_KERNELS_NO_X86_SIMD defined, the portable loops alone (the same bits). Everything
// x86-specific lies inside `#ifdef RK_X86_SIMD` (tests/test_cpu_isa.py compiles the sources
// without it).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ROTARY_KERNELS_NO_X86_SIMD)
#define RK_X86_SIMD 1
#include <immintrin.h>
#endif

#include "../rotary_math.h"
#include "../rotary_ops.h"

namespace {

using namespace rotary_kernels;

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

template <>
inline float load_acc<c10::Half, float>(const c10::Half* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  // Normal and subnormal halves: shift into a float's bits and rescale by 2^112 (exact).
  uint32_t u = em << 13;
  float f;
  std::memcpy(&f, &u, 4);
  f *= 0x1p112f;
  std::memcpy(&u, &f, 4);
  u = em >= 0x7C00u ? ((em << 13) | 0x7F800000u) : u;  // inf / nan
  u |= sign;
  std::memcpy(&f, &u, 4);
  return f;
}
template <>
inline void store_out<c10::Half, float>(c10::Half* p, float v) {
  uint32_t f;
  std::memcpy(&f, &v, 4);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  // Overflow to inf (nan stays a quiet nan), normals rounded to nearest even, and subnormals
  // through a float addition that rounds at the half's subnormal precision.
  const uint32_t big = f > 0x7F800000u ? 0x7E00u : 0x7C00u;
  const uint32_t normal = (f + 0xC8000FFFu + ((f >> 13) & 1u)) >> 13;  // rebias by -112 << 23
  float tmp;
  std::memcpy(&tmp, &f, 4);
  tmp += 0.5f;  // aligns the mantissa so that the sum's low bits are the subnormal half
  uint32_t sub;
  std::memcpy(&sub, &tmp, 4);
  sub -= 0x3F000000u;
  const uint32_t o = f >= 0x47800000u ? big : (f < 0x38800000u ? sub : normal);
  const uint16_t h = static_cast<uint16_t>(o | (sign >> 16));
  std::memcpy(p, &h, 2);
}

// One token's cos/sin per pair (conj applied), structure of arrays for vector loads: four
// runs of `half` values in a block buffer (see rotate_tokens).
template <typename acc_t>
struct CSTable {
  const acc_t *c1, *c2, *s1, *s2;
  // bf16 rows on AVX512-BF16 CPUs: the same values as bf16 pairs for vdpbf16ps (bf16_pair_table),
  // or null where they do not make its products exact.
  const uint32_t* bf16_pairs = nullptr;
  PairCS<acc_t> at(int64_t i) const { return {c1[i], c2[i], s1[i], s2[i]}; }
};

// Software prefetch of the line at p into L1, or with l2 into L2 only (prefetch_into_l2). As asm
// on x86-64: with the locality picked at run time, GCC 12 deleted the loops of __builtin_prefetch
// in prefetch_row from rotate_tokens_avx512 (its fp32 code had no prefetch instruction left).
inline void prefetch_line(const char* p, bool l2) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (l2) {
    asm volatile("prefetcht1 %0" : : "m"(*p));
  } else {
    asm volatile("prefetcht0 %0" : : "m"(*p));
  }
#else
  l2 ? __builtin_prefetch(p, 0, 2) : __builtin_prefetch(p, 0, 3);
#endif
}

// Software prefetch of a row of x and y (y only when it is not x), `bytes` of each.
template <typename T>
inline void prefetch_row(const T* x, const T* y, int64_t bytes, bool fetch_y = true, bool l2 = false) {
  const char* px = reinterpret_cast<const char*>(x);
  const char* py = reinterpret_cast<const char*>(y);
  fetch_y = fetch_y && py != px;
  for (int64_t off = 0; off < bytes; off += 64) {
    prefetch_line(px + off, l2);
    if (fetch_y) prefetch_line(py + off, l2);
  }
}

// The prefetches of the rows of one token: row r < rows fetches the row dx elements past x's row r
// (and dy past y's, unless y is streamed), or from row `split` on, dx2 (dy2) past it; `bytes` of
// each.
struct RowPrefetch {
  int64_t rows = 0, dx = 0, dy = 0, bytes = 0;
  int64_t split = INT64_MAX, dx2 = 0, dy2 = 0;
  bool l2 = false;  // prefetch into L2 only (prefetch_into_l2)
  int64_t ox(int64_t r) const { return r < split ? dx : dx2; }
  int64_t oy(int64_t r) const { return r < split ? dy : dy2; }
};

// The prefetches of a walk over the rows of tokens b (offsets xo[b], yo[b] of n) and heads r: each
// row fetches the same head's row d tokens ahead, or past the n-th token, token b + d - n's row
// of head r + dh, for r < wrap_rows (the next heads' runs, where they exist); d = 0: none. With
// m > 0, the row d * nh + m rows later in the walk's order instead (token b + d's row r + m, or
// past its last row, token b + d + 1's), among the n tokens with offsets (a token-major walk's,
// then the next ones').
// stream: y is written with non-temporal stores (its lines not read first nor kept in the
// caches) and not prefetched; needs y's rows 64-byte aligned (aligned64), and a stream_fence
// after the walk.
struct WalkPrefetch {
  int64_t d = 0, n = 0, dh = 0, wrap_rows = 0, bytes = 0;
  bool stream = false;
  int64_t m = 0;
  bool l2 = false;  // prefetch into L2 only (prefetch_into_l2)
  int runs = 1;     // 4: the tokens taken as 4 runs side by side, row by row (rotate_tokens_avx512)
};

// Token b's RowPrefetch in the walk pf (its nh rows x + xo[b] + r * sx), written into rp field by
// field: returned by value from several paths, GCC merged them through a temporary copied as one
// 64-byte vector load of fields just stored one by one, which the store buffer cannot forward (the
// load waits for the stores to reach L1): in a head-major walk, a token every 4 rows, 14% of a
// bf16 in-place walk's samples sat on that copy.
inline void token_prefetch(const WalkPrefetch& pf, const int64_t* xo, const int64_t* yo, int64_t b, int64_t nh,
                           int64_t sx, int64_t sy, RowPrefetch& rp) {
  rp = RowPrefetch{};  // (no prefetch; stores only: what is read back is read field by field)
  rp.bytes = pf.bytes;
  rp.l2 = pf.l2;
  if (pf.m > 0) {
    const int64_t b1 = b + pf.d;
    if (b1 >= pf.n) return;
    rp.rows = nh;
    rp.dx = xo[b1] - xo[b] + pf.m * sx;
    rp.dy = yo[b1] - yo[b] + pf.m * sy;
    rp.split = nh - pf.m;
    if (b1 + 1 < pf.n) {
      rp.dx2 = xo[b1 + 1] - xo[b] + (pf.m - nh) * sx;
      rp.dy2 = yo[b1 + 1] - yo[b] + (pf.m - nh) * sy;
    } else {
      rp.rows = nh - pf.m;
    }
    return;
  }
  if (pf.d <= 0) return;
  if (b + pf.d < pf.n) {
    rp.rows = nh;
    rp.dx = xo[b + pf.d] - xo[b];
    rp.dy = yo[b + pf.d] - yo[b];
  } else {
    const int64_t b2 = b + pf.d - pf.n;
    rp.rows = pf.wrap_rows;
    rp.dx = xo[b2] - xo[b] + pf.dh * sx;
    rp.dy = yo[b2] - yo[b] + pf.dh * sy;
  }
}

// All pairs of a row with a contiguous head dim. Iteration i reads and writes only its own
// pair's two elements, reads before it writes, so the iterations are independent even in place
// (y == x): `omp simd` tells the compiler so, and it vectorises without alias checks.
// `same`: the table's c2 and s2 runs are bit-identical to c1 and s1 (the usual cos/sin cache,
// cat(freqs, freqs)), so c1 and s1 serve both elements: half the table loads and footprint, the
// same values, so the same bits.
template <typename scalar_t, typename acc_t, bool interleaved, bool same>
inline void rotate_contig(const scalar_t* x, scalar_t* y, int64_t half, const CSTable<acc_t>& cs) {
  constexpr int64_t step = interleaved ? 2 : 1;
  const int64_t off2 = interleaved ? 1 : half;
  const acc_t *c1 = cs.c1, *c2 = same ? cs.c1 : cs.c2, *s1 = cs.s1, *s2 = same ? cs.s1 : cs.s2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const acc_t a = load_acc<scalar_t, acc_t>(x + i * step), b = load_acc<scalar_t, acc_t>(x + i * step + off2);
    acc_t ya, yb;
    rotate_pair(a, b, PairCS<acc_t>{c1[i], c2[i], s1[i], s2[i]}, ya, yb);
    store_out<scalar_t, acc_t>(y + i * step, ya);
    store_out<scalar_t, acc_t>(y + i * step + off2, yb);
  }
}

// fp16 rows on x86-64 CPUs with F16C: convert the row to fp32 with vcvtph2ps, rotate in fp32,
// convert back with vcvtps2ph (round to nearest even, like c10::Half): the portable branch-free
// conversions above do not vectorise for fp16, and these run 8 elements per instruction.
#ifdef RK_X86_SIMD
#define RK_HAVE_F16C_PATH 1
constexpr int64_t kF16cRow = 1024;  // longest rotary span (R) taken by this path

__attribute__((target("avx2,f16c"))) void half_to_float_f16c(const c10::Half* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  }
  for (; i < n; ++i) out[i] = load_acc<c10::Half, float>(x + i);
}

__attribute__((target("avx2,f16c"))) void float_to_half_f16c(const float* in, c10::Half* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) store_out<c10::Half, float>(y + i, in[i]);
}

// bf16 rows (rotate-half pairs) on x86-64 CPUs with AVX-512F: 16 pairs per step in zmm
// registers, the same arithmetic as rotate_contig (x1*c1 - x2*s1, x2*c2 + x1*s2, no FMA) and the
// same conversions as load_acc / store_out (bf16 -> fp32 is a shift; fp32 -> bf16 rounds to
// nearest even in integers, NaN -> 0x7FC0), so the same bits. The compiler's own vectorisation
// of rotate_contig stays at 256 bits with a byte blend for the NaN select and a pack + permute
// per store; here the NaN select is a mask move and the narrowing one vpmovdw.
#define RK_HAVE_AVX512_BF16_PATH 1
__attribute__((target("avx512f"))) inline __m512 bf16x16_load(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// 32 bytes at p, non-temporal with `stream` (then p is 32-byte aligned).
__attribute__((target("avx512f"))) inline void store256(void* p, __m256i v, bool stream) {
  if (stream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
}
// fp32 v's bits plus store_out's rounding bias to bf16 (nearest even): v's bf16 value in the high
// half of each lane, but for NaNs (store_out writes 0x7FC0 for those).
__attribute__((target("avx512f"), always_inline)) inline __m512i bf16_rounded_high(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
}
__attribute__((target("avx512f"))) inline void bf16x16_store(c10::BFloat16* p, __m512 v, bool stream = false) {
  __m512i r = _mm512_srli_epi32(bf16_rounded_high(v), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  store256(p, _mm512_cvtepi32_epi16(r), stream);
}

__attribute__((target("avx512f"))) inline __m512 f32x16_load(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline void f32x16_store(float* p, __m512 v, bool stream = false) {
  if (stream) {  // non-temporal: p 64-byte aligned
    _mm512_stream_ps(p, v);
  } else {
    _mm512_storeu_ps(p, v);
  }
}
__attribute__((target("avx512f"))) inline __m512 x16_load(const c10::BFloat16* p) { return bf16x16_load(p); }
__attribute__((target("avx512f"))) inline void x16_store(c10::BFloat16* p, __m512 v, bool stream = false) {
  bf16x16_store(p, v, stream);
}
__attribute__((target("avx512f"))) inline __m512 x16_load(const float* p) { return f32x16_load(p); }
__attribute__((target("avx512f"))) inline void x16_store(float* p, __m512 v, bool stream = false) {
  f32x16_store(p, v, stream);
}
// fp16: vcvtph2ps / vcvtps2ph (round to nearest even), the F16C path's conversions in 512 bits.
__attribute__((target("avx512f"))) inline __m512 x16_load(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
__attribute__((target("avx512f"))) inline void x16_store(c10::Half* p, __m512 v, bool stream = false) {
  store256(p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), stream);
}

// 16 pairs in fp32, x1's values in a, x2's in b, with their table values: y1 = x1*c1 - x2*s1,
// y2 = x2*c2 + x1*s2, rotate_pair's products and sum in its order (so its bits). The arithmetic of
// every AVX-512 row kernel here but vdpbf16ps's (bf16_dp_step32).
__attribute__((target("avx512f"), always_inline)) inline void rotate16(__m512 a, __m512 b, __m512 c1, __m512 s1,
                                                                      __m512 c2, __m512 s2, __m512& y1, __m512& y2) {
  y1 = _mm512_sub_ps(_mm512_mul_ps(a, c1), _mm512_mul_ps(b, s1));
  y2 = _mm512_add_ps(_mm512_mul_ps(b, c2), _mm512_mul_ps(a, s2));
}
// rotate16 of the 16 pairs x[0, 16), x[half, half + 16) into y.
template <typename scalar_t>
__attribute__((target("avx512f"), always_inline)) inline void rotate16(const scalar_t* x, scalar_t* y, int64_t half,
                                                                      __m512 c1, __m512 s1, __m512 c2, __m512 s2,
                                                                      bool stream) {
  __m512 y1, y2;
  rotate16(x16_load(x), x16_load(x + half), c1, s1, c2, s2, y1, y2);
  x16_store(y, y1, stream);
  x16_store(y + half, y2, stream);
}

// bf16 rotate-half rows, 16 pairs per step (templated on the row type; fp32 rows measured 10-25%
// slower this way than through the compiler's inlined loop here, so rotate_row sends only bf16).
template <typename scalar_t, bool same>
__attribute__((target("avx512f"))) void rotate_avx512(const scalar_t* x, scalar_t* y, int64_t half,
                                                           const float* c1, const float* c2, const float* s1,
                                                           const float* s2) {
  if (same) {
    c2 = c1;
    s2 = s1;
  }
  int64_t i = 0;
  for (; i + 16 <= half; i += 16) {
    const __m512 vc1 = _mm512_loadu_ps(c1 + i), vs1 = _mm512_loadu_ps(s1 + i);
    const __m512 vc2 = same ? vc1 : _mm512_loadu_ps(c2 + i), vs2 = same ? vs1 : _mm512_loadu_ps(s2 + i);
    rotate16(x + i, y + i, half, vc1, vs1, vc2, vs2, false);
  }
  for (; i < half; ++i) {
    const float a = load_acc<scalar_t, float>(x + i), b = load_acc<scalar_t, float>(x + half + i);
    float ya, yb;
    rotate_pair(a, b, PairCS<float>{c1[i], c2[i], s1[i], s2[i]}, ya, yb);
    store_out<scalar_t, float>(y + i, ya);
    store_out<scalar_t, float>(y + half + i, yb);
  }
}
// n runs of 16 pairs' table values from c1, c2, s1, s2 into registers (c2, s2: c1, s1's with
// `same` tables, see rotate_contig).
template <bool same>
__attribute__((target("avx512f"), always_inline)) inline void table_regs(int n, const float* c1, const float* c2,
                                                                        const float* s1, const float* s2, __m512* vc1,
                                                                        __m512* vs1, __m512* vc2, __m512* vs2) {
  for (int u = 0; u < n; ++u) {
    vc1[u] = _mm512_loadu_ps(c1 + 16 * u);
    vs1[u] = _mm512_loadu_ps(s1 + 16 * u);
    vc2[u] = same ? vc1[u] : _mm512_loadu_ps(c2 + 16 * u);
    vs2[u] = same ? vs1[u] : _mm512_loadu_ps(s2 + 16 * u);
  }
}

// n bytes from x to y (apart): a row's pass-through elements (a partial span's, out of place),
// copied by the rows kernels as each row is done, inline: a memcpy call per row cost more than the
// row. fp32 R = 32 of D = 80 (Hq = Hk = 32), 512 tokens, 1 thread, forward: rows one at a time
// 0.50 ms; the rows kernel, then memcpy per row 0.92-1.18, these moves in a second pass 0.71, as
// each row is done 0.46-0.49 (bf16 0.25 -> 0.19). kMove-byte moves, the caller's vector width (64 in
// the AVX-512 kernels, 32 in the AVX2 one: one vmovdqu each, inlined into them), the last one
// ending at n (overlapping the one before: the same bytes).
template <int kMove>
__attribute__((always_inline)) inline void copy_bytes(const void* x, void* y, int64_t n) {
  typedef char Move __attribute__((vector_size(kMove), aligned(1), may_alias));
  const char* src = static_cast<const char*>(x);
  char* dst = static_cast<char*>(y);
  if (n < kMove) {
    std::memcpy(dst, src, n);
    return;
  }
  for (int64_t i = 0; i + kMove < n; i += kMove) {
    *reinterpret_cast<Move*>(dst + i) = *reinterpret_cast<const Move*>(src + i);
  }
  *reinterpret_cast<Move*>(dst + n - kMove) = *reinterpret_cast<const Move*>(src + n - kMove);
}

// The 16 pairs from pair p on of a row, x1's values in a and x2's in b (fp32): rotate-half pairs
// (x[p + i], x[half + p + i]), or interleaved ones (x[2(p + i)], x[2(p + i) + 1]), whose 32
// elements are split into their even and odd ones by two permutes (undone by store_pairs).
alignas(64) constexpr int32_t kPairSplit[2][16] = {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
                                                   {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}};
alignas(64) constexpr int32_t kPairJoin[2][16] = {{0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23},
                                                  {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31}};
template <bool interleaved, typename scalar_t>
__attribute__((target("avx512f"), always_inline)) inline void load_pairs(const scalar_t* x, int64_t half, int64_t p,
                                                                         __m512& a, __m512& b) {
  if constexpr (interleaved) {
    const __m512 lo = x16_load(x + 2 * p), hi = x16_load(x + 2 * p + 16);
    a = _mm512_permutex2var_ps(lo, _mm512_load_si512(kPairSplit[0]), hi);
    b = _mm512_permutex2var_ps(lo, _mm512_load_si512(kPairSplit[1]), hi);
  } else {
    a = x16_load(x + p);
    b = x16_load(x + half + p);
  }
}
// Their results y1, y2 stored where load_pairs read x1 and x2.
template <bool interleaved, typename scalar_t>
__attribute__((target("avx512f"), always_inline)) inline void store_pairs(scalar_t* y, int64_t half, int64_t p,
                                                                          __m512 y1, __m512 y2, bool stream) {
  if constexpr (interleaved) {
    x16_store(y + 2 * p, _mm512_permutex2var_ps(y1, _mm512_load_si512(kPairJoin[0]), y2), stream);
    x16_store(y + 2 * p + 16, _mm512_permutex2var_ps(y1, _mm512_load_si512(kPairJoin[1]), y2), stream);
  } else {
    x16_store(y + p, y1, stream);
    x16_store(y + half + p, y2, stream);
  }
}

// rotate_tokens_avx512's walk of the tokens, one token's rows after the other, compiled for each kind
// of store (kStream: y non-temporal), so that no store branches on it.
template <typename scalar_t, bool same, int kChunks, int kN, bool kLast, bool kStream, bool kInterleaved,
          bool kSwap = false>
__attribute__((target("avx512f"), always_inline)) inline void avx512_token_walk(
    const scalar_t* x, scalar_t* y, const int64_t* xo, const int64_t* yo, int64_t n_tok, int64_t nh, int64_t sx,
    int64_t sy, const CSTable<float>* cs, const WalkPrefetch& pf, int64_t half, int64_t rest) {
  constexpr int kRegs = kChunks + (kLast ? 1 : 0);
  const int64_t last = kChunks > 0 ? half - 16 : 0;  // (kLast: the last step's first pair)
  const __mmask16 m = kChunks > 0 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << half) - 1);
  for (int64_t b = 0; b < n_tok; ++b) {
    RowPrefetch rp;
    token_prefetch(pf, xo, yo, b, nh, sx, sy, rp);
    const CSTable<float>& t = cs[b];
    __m512 vc1[kRegs], vs1[kRegs], vc2[kRegs], vs2[kRegs];
    table_regs<same>(kChunks, t.c1, t.c2, t.s1, t.s2, vc1, vs1, vc2, vs2);
    if constexpr (kLast) {
      vc1[kChunks] = _mm512_maskz_loadu_ps(m, t.c1 + last);
      vs1[kChunks] = _mm512_maskz_loadu_ps(m, t.s1 + last);
      vc2[kChunks] = same ? vc1[kChunks] : _mm512_maskz_loadu_ps(m, t.c2 + last);
      vs2[kChunks] = same ? vs1[kChunks] : _mm512_maskz_loadu_ps(m, t.s2 + last);
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < (kN > 0 ? kN : nh); ++r) {
      const scalar_t* xr = x + xo[b] + r * sx;
      scalar_t* yr = y + yo[b] + r * sy;
      if (r < rp.rows) prefetch_row(xr + rp.ox(r), yr + rp.oy(r), rp.bytes, !kStream, rp.l2);
      __m512 la, lb;  // (kLast: the last step's x, loaded first)
      if constexpr (kLast && kChunks > 0) {
        load_pairs<kInterleaved>(xr, half, last, la, lb);
      } else if constexpr (kLast) {
        la = _mm512_maskz_loadu_ps(m, xr);
        lb = _mm512_maskz_loadu_ps(m, xr + half);
      }
      for (int c = 0; c < kChunks; ++c) {
        __m512 a, b, y1, y2;
        load_pairs<kInterleaved>(xr, half, 16 * c, a, b);
        rotate16(a, b, vc1[c], vs1[c], vc2[c], vs2[c], y1, y2);
        store_pairs<kInterleaved != kSwap>(yr, half, 16 * c, y1, y2, kStream);
      }
      if constexpr (kLast) {
        __m512 y1, y2;
        rotate16(la, lb, vc1[kChunks], vs1[kChunks], vc2[kChunks], vs2[kChunks], y1, y2);
        if constexpr (kChunks > 0) {
          store_pairs<kInterleaved != kSwap>(yr, half, last, y1, y2, false);
        } else {
          _mm512_mask_storeu_ps(yr, m, y1);
          _mm512_mask_storeu_ps(yr + half, m, y2);
        }
      }
      if (rest > 0) copy_bytes<64>(xr + 2 * half, yr + 2 * half, rest);
    }
  }
}

// bf16 rows on CPUs without AVX512-BF16, fp32 and fp16 rows, of R = 32 * kChunks (64 or 128; fp32
// and fp16 any R = 2 * half up to 128, with kLast): over tokens b in [0, n_tok), rows x + xo[b] +
// r * sx, r in [0, nh), with table row cs[b] held in registers, rows walked one after the other in
// memory order (rotate_avx512's arithmetic and conversions, so the same bits). Against a call per
// row, here: bf16 with AVX512-BF16 turned off 1.15-1.45x faster, every layout; fp32 at 512 tokens
// 1.12-1.15x out of place and 1.2-1.4x in place, at 2048 tokens out of place (streamed)
// 1.4-1.8x, in place 1.14x on qkv slices but 4-6% slower on the dense layouts. kN > 0: nh is kN,
// the rows unrolled (rotate_rows).
// kLast (half = 16 * kChunks + t, 0 < t < 16: head dim 80, partial spans): each row's pairs [half -
// 16, half) as one more step after its kChunks full ones, overlapping the last (those pairs
// stored twice, the same bits), its loads before the row's first store (as bf16_rows_tail; in
// place no step reads what another stored); with kChunks = 0 (fp32 rows of half < 16), one step
// masked to the row's pairs. Never streamed (aligned64). kInterleaved: x's pairs interleaved
// (load_pairs); kSwap: y's in the other layout (swap_layout rows, MLA's rope): DeepSeek-V3's
// apply_rotary_pos_emb_interleave on Llama-3-8B's q + k, 1 thread, against rotate_row_swapped
// row by row: 512 tokens fp32 1.18-1.55 -> 0.68-0.69 ms, fp16 1.05-1.11 -> 0.34-0.35, bf16 with
// AVX512-BF16 turned off 0.70 -> 0.55; 2048 tokens fp32 7.47 -> 3.19, fp16 5.30 -> 1.42.
template <typename scalar_t, bool same, int kChunks, int kN = 0, bool kLast = false, bool kInterleaved = false,
          bool kSwap = false>
__attribute__((target("avx512f"))) void rotate_tokens_avx512(const scalar_t* x, scalar_t* y, const int64_t* xo,
                                                             const int64_t* yo, int64_t n_tok, int64_t nh, int64_t sx,
                                                             int64_t sy, const CSTable<float>* cs,
                                                             const WalkPrefetch& pf, int64_t rest,
                                                             int64_t row_half = 0) {
  static_assert(kChunks > 0 || (kLast && !kInterleaved && !kSwap && std::is_same_v<scalar_t, float>),
                "masked rows: fp32 rotate-half only");
  const int64_t half = kLast ? row_half : 16 * kChunks;
  const bool stream = pf.stream;  // (a local: pf could alias y for all the compiler knows)
  if constexpr (kN == 0 && !kLast && !kInterleaved && !kSwap) {
    if (pf.runs == 4 && stream && n_tok % 4 == 0) {
      // Token-major rows from memory, out of place (WalkPrefetch::runs): the block's tokens as 4
      // runs of n_tok / 4, their rows taken in turn (token j's row r, then token j + n_tok / 4's,
      // ...), so that 4 streams of x and y advance together, as the head-major walk's 4 heads do;
      // the tables are read from L1 per row (4 tokens' would fill the register file). Each row
      // prefetches its run's next token's row. fp32, 2048 tokens, side by side against the tokens
      // one after the other: 1 thread forward 2.89-3.03 -> 2.38-2.61 ms (qkv slices 2.83-2.96 ->
      // 2.22-2.30), backward 3.0-3.2 -> 2.55-2.69; 2 threads forward 1.42-1.83 -> 1.25-1.58,
      // backward 1.77-2.00 -> 1.46-1.67. In place 1.06-1.2x slower: not taken there. A plain-C
      // walk of the same bytes: 4 runs row by row 2.09-2.12 ms, one run 2.35-2.49, runs switched
      // every 4 rows 2.33.
      const int64_t len = n_tok / 4;
      for (int64_t j = 0; j < len; ++j) {
        for (int64_t r = 0; r < nh; ++r) {
#pragma GCC unroll 4
          for (int64_t b = j; b < n_tok; b += len) {
            // (the table's pointers copied: y's stores could alias cs[b] for all the compiler knows)
            const float *c1 = cs[b].c1, *c2 = cs[b].c2, *s1 = cs[b].s1, *s2 = cs[b].s2;
            const scalar_t* xr = x + xo[b] + r * sx;
            scalar_t* yr = y + yo[b] + r * sy;
            if (j + 1 < len) prefetch_row(x + xo[b + 1] + r * sx, y + yo[b + 1] + r * sy, pf.bytes, !stream, pf.l2);
            for (int c = 0; c < kChunks; ++c) {
              const __m512 vc1 = _mm512_loadu_ps(c1 + 16 * c), vs1 = _mm512_loadu_ps(s1 + 16 * c);
              const __m512 vc2 = same ? vc1 : _mm512_loadu_ps(c2 + 16 * c);
              const __m512 vs2 = same ? vs1 : _mm512_loadu_ps(s2 + 16 * c);
              rotate16(xr + 16 * c, yr + 16 * c, half, vc1, vs1, vc2, vs2, true);  // (stream: a constant)
            }
            if (rest > 0) copy_bytes<64>(xr + 2 * half, yr + 2 * half, rest);
          }
        }
      }
      return;
    }
  }
  constexpr bool kI = kInterleaved;
  if (!kLast && stream) {
    avx512_token_walk<scalar_t, same, kChunks, kN, kLast, true, kI, kSwap>(x, y, xo, yo, n_tok, nh, sx, sy, cs, pf,
                                                                           half, rest);
  } else {
    avx512_token_walk<scalar_t, same, kChunks, kN, kLast, false, kI, kSwap>(x, y, xo, yo, n_tok, nh, sx, sy, cs, pf,
                                                                            half, rest);
  }
}

// rotate_tokens_avx512 for fp32 and fp16 rows of any other half up to 64 (rows_at_once): whole
// 16-pair chunks, and a last step where half is not a multiple of 16.
template <typename scalar_t, bool same, int kN, bool kInterleaved, bool kSwap = false>
__attribute__((target("avx512f"))) void rotate_tokens_avx512_any(const scalar_t* x, scalar_t* y, const int64_t* xo,
                                                                 const int64_t* yo, int64_t n_tok, int64_t nh,
                                                                 int64_t sx, int64_t sy, const CSTable<float>* cs,
                                                                 const WalkPrefetch& pf, int64_t rest, int64_t half) {
  const auto run = [&](auto chunks, auto last) {
    constexpr int kChunks = decltype(chunks)::value;
    constexpr bool kLast = decltype(last)::value;
    rotate_tokens_avx512<scalar_t, same, kChunks, kN, kLast, kInterleaved, kSwap>(x, y, xo, yo, n_tok, nh, sx, sy, cs,
                                                                                  pf, rest, half);
  };
  using Last = std::true_type;
  using Whole = std::false_type;
  const bool tail = half % 16 != 0;
  switch (half / 16) {  // (32 and 64: rotate_rows)
    case 0:
      if constexpr (std::is_same_v<scalar_t, float> && !kInterleaved && !kSwap) {
        run(std::integral_constant<int, 0>{}, Last{});
      }
      break;
    case 1:
      if (tail) {
        run(std::integral_constant<int, 1>{}, Last{});
      } else {
        run(std::integral_constant<int, 1>{}, Whole{});
      }
      break;
    case 2:
      run(std::integral_constant<int, 2>{}, Last{});
      break;
    default:
      if (tail) {
        run(std::integral_constant<int, 3>{}, Last{});
      } else {
        run(std::integral_constant<int, 3>{}, Whole{});
      }
  }
}

// Rotate-half rows on CPUs with AVX2 and F16C but no AVX-512 (Zen 2 and 3, Intel's client cores):
// rotate_tokens_avx512's walk in 256-bit registers, 16 pairs a step (8 at the end of a row of
// half = 16k + 8), rotate_pair's arithmetic (no FMA) and load_acc / store_out's conversions (bf16
// widened by a shift and narrowed to nearest even in integers, NaN -> 0x7FC0; fp16 through
// vcvtph2ps / vcvtps2ph), so the same bits. The table values are read from L1 each step (a row of
// R = 128 in fp32 is 16 ymm, the whole register file). Against the compiler's loop a row a call
// (ROTARY_KERNELS_CPU_ISA=avx2 on Zen 4, Llama-3-8B q + k, 1 thread, every layout, ms): 512 tokens
// bf16 forward 0.58-0.64 -> 0.45-0.49, in place 0.57-0.61 -> 0.44-0.46; fp16 0.55-0.59 ->
// 0.26-0.31, 0.54-0.56 -> 0.24-0.27; fp32 0.53-0.62 -> 0.35-0.45, 0.24-0.33 -> 0.23-0.28; 2048
// tokens bf16 2.8-3.2 -> 2.0-2.1, in place 2.4-2.6 -> 1.8-1.9; fp16 2.7-2.9 -> 1.2-1.3, 2.3-2.5 ->
// 1.05-1.16; fp32 5.2-5.8 -> 2.6-2.8 (streamed), 2.6-3.7 -> 1.4-1.8. Head-major groups of 4 rows
// unrolled out of place (kN, as rotate_tokens_avx512's): fp32 [B, H, S, D] forward 0.71 in a run with
// the row loop, 0.52-0.57 in two later runs of the same script (not alternated).
__attribute__((target("avx2,f16c"), always_inline)) inline __m256 x8_load(const float* p) {
  return _mm256_loadu_ps(p);
}
__attribute__((target("avx2,f16c"), always_inline)) inline __m256 x8_load(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx2,f16c"), always_inline)) inline __m256 x8_load(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// store_out's bf16 of each lane of v, in its low 16 bits.
__attribute__((target("avx2,f16c"), always_inline)) inline __m256i bf16x8_rounded(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)),
                                              _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
__attribute__((target("avx2,f16c"), always_inline)) inline void store256_avx2(void* p, __m256i v, bool stream) {
  if (stream) {  // (p 32-byte aligned: aligned64)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
}
// 16 values at p: lo's 8, then hi's.
__attribute__((target("avx2,f16c"), always_inline)) inline void x16_store2(float* p, __m256 lo, __m256 hi,
                                                                          bool stream) {
  store256_avx2(p, _mm256_castps_si256(lo), stream);
  store256_avx2(p + 8, _mm256_castps_si256(hi), stream);
}
__attribute__((target("avx2,f16c"), always_inline)) inline void x16_store2(c10::BFloat16* p, __m256 lo, __m256 hi,
                                                                          bool stream) {
  // (packus interleaves the 128-bit lanes: lo 0-3, hi 0-3, lo 4-7, hi 4-7; the permute orders them)
  const __m256i packed = _mm256_packus_epi32(bf16x8_rounded(lo), bf16x8_rounded(hi));
  store256_avx2(p, _mm256_permute4x64_epi64(packed, 0xD8), stream);
}
__attribute__((target("avx2,f16c"), always_inline)) inline void x16_store2(c10::Half* p, __m256 lo, __m256 hi,
                                                                          bool stream) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  store256_avx2(p, _mm256_set_m128i(_mm256_cvtps_ph(hi, kRound), _mm256_cvtps_ph(lo, kRound)), stream);
}
// 8 values at p (never streamed: a row's last 8 pairs).
__attribute__((target("avx2,f16c"), always_inline)) inline void x8_store(float* p, __m256 v) {
  _mm256_storeu_ps(p, v);
}
__attribute__((target("avx2,f16c"), always_inline)) inline void x8_store(c10::BFloat16* p, __m256 v) {
  const __m256i r = bf16x8_rounded(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
__attribute__((target("avx2,f16c"), always_inline)) inline void x8_store(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// rotate16's arithmetic on 8 pairs (`same`: c2, s2 are c1, s1).
template <bool same>
__attribute__((target("avx2,f16c"), always_inline)) inline void rotate8(__m256 a, __m256 b, const float* c1,
                                                                       const float* s1, const float* c2,
                                                                       const float* s2, __m256& y1, __m256& y2) {
  const __m256 vc1 = _mm256_loadu_ps(c1), vs1 = _mm256_loadu_ps(s1);
  const __m256 vc2 = same ? vc1 : _mm256_loadu_ps(c2), vs2 = same ? vs1 : _mm256_loadu_ps(s2);
  y1 = _mm256_sub_ps(_mm256_mul_ps(a, vc1), _mm256_mul_ps(b, vs1));
  y2 = _mm256_add_ps(_mm256_mul_ps(b, vc2), _mm256_mul_ps(a, vs2));
}
// Interleaved (GPT-J) pairs in place in a vector, 4 of them, x1 x2 x1 x2 ...: each pair's (x1, x2)
// times its (c1, c2) plus its (x2, x1) times its (-s1, s2), i.e. x1*c1 - x2*s1 and x2*c2 + x1*s2,
// rotate_pair's products and sums (a - b is a + (-b) exactly), with the token's table interleaved
// likewise (cd, sg: interleave_table_avx2).
__attribute__((target("avx2,f16c"), always_inline)) inline __m256 rotate_pairs8(__m256 v, const float* cd,
                                                                               const float* sg) {
  const __m256 swapped = _mm256_permute_ps(v, 0xB1);  // (x2, x1) in each pair
  return _mm256_add_ps(_mm256_mul_ps(v, _mm256_loadu_ps(cd)), _mm256_mul_ps(swapped, _mm256_loadu_ps(sg)));
}
constexpr int64_t kAvx2InterleavedPairs = 128;  // longest interleaved row (pairs) rotate_tokens_avx2 takes
// A token's table runs as rotate_pairs8 reads them: cd = c1[0], c2[0], c1[1], ...; sg = -s1[0],
// s2[0], -s1[1], ... (half a multiple of 8).
__attribute__((target("avx2,f16c"), always_inline)) inline void interleave_table_avx2(
    const float* c1, const float* c2, const float* s1, const float* s2, int64_t half, float* cd, float* sg) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < half; i += 8) {
    const __m256 a[2] = {_mm256_loadu_ps(c1 + i), _mm256_xor_ps(_mm256_loadu_ps(s1 + i), sign)};
    const __m256 b[2] = {_mm256_loadu_ps(c2 + i), _mm256_loadu_ps(s2 + i)};
    float* out[2] = {cd + 2 * i, sg + 2 * i};
    for (int t = 0; t < 2; ++t) {  // (unpack pairs within 128-bit lanes; permute2f128 orders the lanes)
      const __m256 lo = _mm256_unpacklo_ps(a[t], b[t]), hi = _mm256_unpackhi_ps(a[t], b[t]);
      _mm256_storeu_ps(out[t], _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_storeu_ps(out[t] + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  }
}
// Rows x + xo[b] + r * sx -> y + yo[b] + r * sy of tokens b in [0, n_tok), heads r in [0, nh),
// half a multiple of 8 (rows_at_once), prefetched as pf says. kN > 0: nh is kN, the rows unrolled
// (rotate_rows). kInterleaved: x's pairs interleaved (half up to kAvx2InterleavedPairs; against
// the compiler's loop a row a call, ROTARY_KERNELS_CPU_ISA=avx2, Llama-3-8B q + k, 512 tokens, 1
// thread, builds alternated, ms: bf16 0.883 -> 0.534, per-pair tables 0.831 -> 0.499; fp16 0.778
// -> 0.405, 0.576 -> 0.281; fp32 0.873 -> 0.590, 0.671 -> 0.460).
template <typename scalar_t, bool same, int kN, bool kStream, bool kInterleaved = false>
__attribute__((target("avx2,f16c"))) void rotate_tokens_avx2(const scalar_t* x, scalar_t* y, const int64_t* xo,
                                                             const int64_t* yo, int64_t n_tok, int64_t nh, int64_t sx,
                                                             int64_t sy, const CSTable<float>* cs,
                                                             const WalkPrefetch& pf, int64_t half, int64_t rest) {
  alignas(32) float cd[kInterleaved ? 2 * kAvx2InterleavedPairs : 1], sg[kInterleaved ? 2 * kAvx2InterleavedPairs : 1];
  for (int64_t b = 0; b < n_tok; ++b) {
    RowPrefetch rp;
    token_prefetch(pf, xo, yo, b, nh, sx, sy, rp);
    // (copied: y's stores could alias the table for all the compiler knows)
    const float *c1 = cs[b].c1, *s1 = cs[b].s1, *c2 = same ? c1 : cs[b].c2, *s2 = same ? s1 : cs[b].s2;
    if constexpr (kInterleaved) interleave_table_avx2(c1, c2, s1, s2, half, cd, sg);
#pragma GCC unroll 4
    for (int64_t r = 0; r < (kN > 0 ? kN : nh); ++r) {
      const scalar_t* xr = x + xo[b] + r * sx;
      scalar_t* yr = y + yo[b] + r * sy;
      if (r < rp.rows) prefetch_row(xr + rp.ox(r), yr + rp.oy(r), rp.bytes, !kStream, rp.l2);
      if constexpr (kInterleaved) {  // (2 * half a multiple of 16: no last step of 8)
        for (int64_t j = 0; j < 2 * half; j += 16) {
          x16_store2(yr + j, rotate_pairs8(x8_load(xr + j), cd + j, sg + j),
                     rotate_pairs8(x8_load(xr + j + 8), cd + j + 8, sg + j + 8), kStream);
        }
        if (rest > 0) copy_bytes<32>(xr + 2 * half, yr + 2 * half, rest);
        continue;
      }
      int64_t i = 0;
      for (; i + 16 <= half; i += 16) {
        __m256 y10, y20, y11, y21;
        rotate8<same>(x8_load(xr + i), x8_load(xr + half + i), c1 + i, s1 + i, c2 + i, s2 + i, y10, y20);
        rotate8<same>(x8_load(xr + i + 8), x8_load(xr + half + i + 8), c1 + i + 8, s1 + i + 8, c2 + i + 8,
                      s2 + i + 8, y11, y21);
        x16_store2(yr + i, y10, y11, kStream);
        x16_store2(yr + half + i, y20, y21, kStream);
      }
      if (i < half) {
        __m256 y1, y2;
        rotate8<same>(x8_load(xr + i), x8_load(xr + half + i), c1 + i, s1 + i, c2 + i, s2 + i, y1, y2);
        x8_store(yr + i, y1);
        x8_store(yr + half + i, y2);
      }
      if (rest > 0) copy_bytes<32>(xr + 2 * half, yr + 2 * half, rest);
    }
  }
}

// The fast narrowings of the bf16 steps below are exact for results in [2^-64, 2^64) (bf16_step32's
// vcvtne2ps2bf16 away from denormals and NaNs; bf16_dp_step32 from 2^-97 on, but NaNs: see there),
// a window tested in two instructions a vector: adding kBf16Window to a result's bits (sign
// included) sets bit 14 exactly when its exponent field is in [63, 190]: those magnitudes,
// [0x1F80, 0x5F80) in 15 bits, move to [0x4000, 0x8000) (negative values to [0xC000, 0x10000)),
// every other one lands with bit 14 clear (checked over all 2^16 bit patterns). The rest (zeros,
// NaNs, infinities and magnitudes no activation reaches) go the exact way. In bf16_dp_step32,
// against the range [2^-97, inf] in min/max form (doubled magnitudes, 6 instructions a step): bf16
// rows in L1 here 3.55 -> 3.18 ns a step, 512 tokens 4-9% faster.
constexpr int16_t kBf16Window = 0x2080;
constexpr int16_t kBf16WindowBit = 0x4000;
// v's bf16 lanes plus kBf16Window: bit 14 set in the lanes in the window.
__attribute__((target("avx512f,avx512bw"), always_inline)) inline __m512i bf16_window_bits(__m512i v) {
  return _mm512_add_epi16(v, _mm512_set1_epi16(kBf16Window));
}
// Are all 32 results in a and b (bf16) in the window?
__attribute__((target("avx512f,avx512bw"), always_inline)) inline bool bf16_in_window(__m512i a, __m512i b) {
  const __m512i bit = _mm512_set1_epi16(kBf16WindowBit);
  const __mmask32 ka = _mm512_test_epi16_mask(bf16_window_bits(a), bit);
  return _mm512_mask_test_epi16_mask(ka, bf16_window_bits(b), bit) == 0xFFFFFFFFu;
}
// Are the results in lanes `lanes` of a and b in the window (a row's masked last step)?
__attribute__((target("avx512f,avx512bw"), always_inline)) inline bool bf16_in_window(__m512i a, __m512i b,
                                                                                     __mmask32 lanes) {
  const __m512i bit = _mm512_set1_epi16(kBf16WindowBit);
  const __mmask32 ka = _mm512_mask_test_epi16_mask(lanes, bf16_window_bits(a), bit);
  return _mm512_mask_test_epi16_mask(ka, bf16_window_bits(b), bit) == lanes;
}
// The steps whose check is deferred (bf16_dp_step32<true>): the AND of their bf16_window_bits,
// whose bit 14 is set in every lane while all of them were in the window.
struct DpSeen {
  __m512i all;
};
__attribute__((target("avx512f,avx512bw"), always_inline)) inline bool dp_seen_in_window(const DpSeen& seen) {
  return _mm512_test_epi16_mask(seen.all, _mm512_set1_epi16(kBf16WindowBit)) == 0xFFFFFFFFu;
}

// bf16 rotate-half rows on CPUs with AVX512-BF16 (and BW, DQ): as rotate_avx512, 32 pairs per step,
// narrowed by vcvtne2ps2bf16 (one instruction per 32 values, round to nearest even). It equals
// store_out on every fp32 input but NaNs and denormals (checked over all 2^32 bit patterns: it
// flushes denormals and keeps a NaN's sign), so a step with a narrowed result outside
// bf16_in_window's [2^-64, 2^64) (NaNs, and denormals, flushed to zero) is narrowed by
// bf16x16_store instead (against vfpclassps on the fp32 results, 4 instructions a step rather than
// 6: token-major rows at 512 tokens, 1 thread, 12-15% faster).
// The bf16 inputs are widened with vpermt2w (AVX512-BW), one instruction per 16 values instead of
// vpmovzxwd + vpslld (the same fp32 values; 2-7% faster at 512-2048 tokens here: these rows are
// bound by the vector units at one thread, ~11 cycles a step; pair_words with zeros
// instead: token-major 2-4% slower, [B, H, S, D] 3-8% faster).
// vpermt2w indices that widen 32 bf16 values (one zmm) to fp32, each value the high half of a
// 32-bit lane (the low half from a zero vector): [0] values 0-15, [1] values 16-31.
alignas(64) constexpr uint16_t kWiden[2][32] = {
    {0, 32, 0, 33, 0, 34, 0, 35, 0, 36, 0, 37, 0, 38, 0, 39, 0, 40, 0, 41, 0, 42, 0, 43, 0, 44, 0, 45, 0, 46, 0, 47},
    {0, 48, 0, 49, 0, 50, 0, 51, 0, 52, 0, 53, 0, 54, 0, 55, 0, 56, 0, 57, 0, 58, 0, 59, 0, 60, 0, 61, 0, 62, 0, 63}};
// a's and b's 32 words paired in 32-bit lanes, a's in the low half: out[0] lanes i = 0..15 hold
// (a[i], b[i]), out[1] (a[16 + i], b[16 + i]). Each input's quadwords placed in the order
// 0 4 1 5 2 6 3 7, vpunpcklwd / vpunpckhwd (which interleave words within 128-bit lanes) pair
// words 0-15 / 16-31 in order: a quadword permute and an in-lane unpack per output rather than a
// two-source word permute (vpermt2w, slow on Zen 4).
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void pair_words(__m512i a, __m512i b,
                                                                                 __m512i out[2]) {
  const __m512i order = _mm512_set_epi64(7, 3, 6, 2, 5, 1, 4, 0);
  const __m512i pa = _mm512_permutexvar_epi64(order, a), pb = _mm512_permutexvar_epi64(order, b);
  out[0] = _mm512_unpacklo_epi16(pa, pb);
  out[1] = _mm512_unpackhi_epi16(pa, pb);
}
// 32 pairs of one row, x[0, 32) with x[half, half + 32) (loaded: xa, xb), with the table values in
// vc*/vs*: their fp32 results, ya[u] and yb[u] the y1 and y2 of pairs 16u to 16u + 15 ...
template <bool same>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), always_inline)) inline void bf16_step32_results(
    __m512i xa, __m512i xb, const __m512* vc1, const __m512* vs1, const __m512* vc2, const __m512* vs2, __m512 ya[2],
    __m512 yb[2]) {
  for (int u = 0; u < 2; ++u) {
    const __m512i idx = _mm512_load_si512(kWiden[u]);
    const __m512 a = _mm512_castsi512_ps(_mm512_permutex2var_epi16(_mm512_setzero_si512(), idx, xa));
    const __m512 b = _mm512_castsi512_ps(_mm512_permutex2var_epi16(_mm512_setzero_si512(), idx, xb));
    rotate16(a, b, vc1[u], vs1[u], same ? vc1[u] : vc2[u], same ? vs1[u] : vs2[u], ya[u], yb[u]);
  }
}
// ... narrowed into y.
template <bool same>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), always_inline)) inline void bf16_step32(
    __m512i xa, __m512i xb, c10::BFloat16* y, int64_t half, const __m512* vc1, const __m512* vs1, const __m512* vc2,
    const __m512* vs2, bool stream) {
  __m512 ya[2], yb[2];
  bf16_step32_results<same>(xa, xb, vc1, vs1, vc2, vs2, ya, yb);
  const __m512i a = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(ya[1], ya[0]));
  const __m512i b = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(yb[1], yb[0]));
  if (__builtin_expect(bf16_in_window(a, b), 1)) {
    if (stream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(y), a);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(y + half), b);
    } else {
      _mm512_storeu_si512(y, a);
      _mm512_storeu_si512(y + half, b);
    }
  } else {
    for (int u = 0; u < 2; ++u) {
      bf16x16_store(y + 16 * u, ya[u]);
      bf16x16_store(y + half + 16 * u, yb[u]);
    }
  }
}

// The first min(n, 32) lanes of a 32-lane step (n > 0): a row's last step masked to the pairs it has.
inline __mmask32 tail_mask32(int64_t n) {
  return n >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint32_t{1} << n) - 1);
}

// The bf16 table values among v's 32 that make bf16_dp_step32 inexact: over 2 in magnitude, or
// denormal (magnitude - 1 under 0x7F).
__attribute__((target("avx512f,avx512bw"), always_inline)) inline __mmask32 bf16_table_values_refused(__m512i v) {
  const __m512i m = _mm512_and_si512(v, _mm512_set1_epi16(0x7FFF));
  return _mm512_cmpgt_epu16_mask(m, _mm512_set1_epi16(0x4000)) |
         _mm512_cmplt_epu16_mask(_mm512_sub_epi16(m, _mm512_set1_epi16(1)), _mm512_set1_epi16(0x007F));
}

// bf16 tables for vdpbf16ps, straight from bf16 cos/sin runs (the table values of rotate_tokens'
// plain rows: c1, c2, s1, s2, the sin runs negated with `neg`): per pair i, 32-bit lanes
// (c1[i], -s1[i]) then (s2[i], c2[i]), x1's factor in the low half, x2's in the high one, into
// `out` (2 * half lanes; a last run of under 32 pairs read and written masked). True when every
// value is zero or normal and at most 2 in magnitude (YaRN-style scaled cos/sin stay under it):
// with bf16 values, what makes bf16_dp_step32 exact. *same: whether c2, s2 equal c1, s1 bit for
// bit (then the second lanes are the first ones' halves swapped, see bf16_rows_avx512bf16).
__attribute__((target("avx512f,avx512bw"))) bool bf16_pair_table(const c10::BFloat16* c1, const c10::BFloat16* c2,
                                                                 const c10::BFloat16* s1, const c10::BFloat16* s2,
                                                                 bool neg, int64_t half, uint32_t* out, bool* same) {
  const __m512i sign = _mm512_set1_epi16(static_cast<int16_t>(0x8000));
  const __m512i neg_s1 = neg ? _mm512_setzero_si512() : sign, neg_s2 = neg ? sign : _mm512_setzero_si512();
  __mmask32 bad = 0, differ = 0;
  for (int64_t i = 0; i < half; i += 32) {
    const __mmask32 m = tail_mask32(half - i);  // (lanes past it read as zero, which passes)
    const __m512i cc1 = _mm512_maskz_loadu_epi16(m, c1 + i), cc2 = _mm512_maskz_loadu_epi16(m, c2 + i);
    const __m512i ss1 = _mm512_maskz_loadu_epi16(m, s1 + i), ss2 = _mm512_maskz_loadu_epi16(m, s2 + i);
    differ |= _mm512_cmpneq_epi16_mask(cc1, cc2) | _mm512_cmpneq_epi16_mask(ss1, ss2);
    const __m512i v[4] = {cc1, cc2, _mm512_xor_si512(ss1, neg_s1), _mm512_xor_si512(ss2, neg_s2)};
    for (const __m512i& x : v) bad |= bf16_table_values_refused(x);
    __m512i t1[2], t2[2];
    pair_words(v[0], v[2], t1);
    pair_words(v[3], v[1], t2);
    for (int u = 0; u < 2; ++u) {
      const __mmask16 mu = static_cast<__mmask16>(m >> (16 * u));
      _mm512_mask_storeu_epi32(out + i + 16 * u, mu, t1[u]);
      _mm512_mask_storeu_epi32(out + half + i + 16 * u, mu, t2[u]);
    }
  }
  *same = differ == 0;
  return bad == 0;
}

// Pairs [j0, half) of a bf16 row one by one (rotate_pair and store_out: the reference's bits), with
// fp32 table values, or (lanes) taken back from the vdpbf16ps lanes (bf16_pair_table's, as
// bf16_step32_lanes does): a row's last pairs, where no step takes them or one failed its check.
inline void bf16_pair_one(const c10::BFloat16* x, c10::BFloat16* y, int64_t half, int64_t j, const PairCS<float>& cs) {
  float ya, yb;
  rotate_pair(load_acc<c10::BFloat16, float>(x + j), load_acc<c10::BFloat16, float>(x + half + j), cs, ya, yb);
  store_out<c10::BFloat16, float>(y + j, ya);
  store_out<c10::BFloat16, float>(y + half + j, yb);
}
__attribute__((noinline, cold)) void bf16_pairs_one_by_one(const c10::BFloat16* x, c10::BFloat16* y, int64_t half,
                                                          int64_t j0, const float* c1, const float* c2,
                                                          const float* s1, const float* s2) {
  for (int64_t j = j0; j < half; ++j) bf16_pair_one(x, y, half, j, PairCS<float>{c1[j], c2[j], s1[j], s2[j]});
}
__attribute__((noinline, cold)) void bf16_pairs_one_by_one(const c10::BFloat16* x, c10::BFloat16* y, int64_t half,
                                                          int64_t j0, const uint32_t* lanes) {
  auto value = [](uint32_t bits) {
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  };
  for (int64_t j = j0; j < half; ++j) {
    const uint32_t t1 = lanes[j], t2 = lanes[half + j];  // (c1, -s1), (s2, c2)
    const PairCS<float> cs{value(t1 << 16), value(t2 & 0xFFFF0000u), -value(t1 & 0xFFFF0000u), value(t2 << 16)};
    bf16_pair_one(x, y, half, j, cs);
  }
}

// The fp32 table values of 16 pairs taken back from their vdpbf16ps lanes t1 = (c1, -s1) and
// t2 = (s2, c2) (bf16_pair_table's; bf16 values, so the same fp32 ones): the exact way's tables
// where a step through the lanes fails its check.
__attribute__((target("avx512f"), always_inline)) inline void bf16_lanes_values(__m512i t1, __m512i t2, __m512& c1,
                                                                              __m512& s1, __m512& c2, __m512& s2) {
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)), sign = _mm512_set1_epi32(INT32_MIN);
  c1 = _mm512_castsi512_ps(_mm512_slli_epi32(t1, 16));
  s1 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_and_si512(t1, hi), sign));
  s2 = _mm512_castsi512_ps(_mm512_slli_epi32(t2, 16));
  c2 = _mm512_castsi512_ps(_mm512_and_si512(t2, hi));
}

// bf16_step32 with the table values taken back from their lanes (t1 the step's first 32, t1 + half
// its second: bf16_lanes_values): bf16_dp_step32's fallback.
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), noinline, cold)) void bf16_step32_lanes(
    const c10::BFloat16* x, c10::BFloat16* y, int64_t half, const uint32_t* t1, bool stream) {
  __m512 vc1[2], vs1[2], vc2[2], vs2[2];
  for (int u = 0; u < 2; ++u) {
    bf16_lanes_values(_mm512_loadu_si512(t1 + 16 * u), _mm512_loadu_si512(t1 + half + 16 * u), vc1[u], vs1[u], vc2[u],
                      vs2[u]);
  }
  bf16_step32<false>(_mm512_loadu_si512(x), _mm512_loadu_si512(x + half), y, half, vc1, vs1, vc2, vs2, stream);
}

// bf16_dp_step32's arithmetic: the narrowed results of 32 pairs (xa: x1's values, xb: x2's, table lanes
// t1, t2), a = x1*c1 - x2*s1, b = x2*c2 + x1*s2.
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), always_inline)) inline void bf16_dp_results(
    __m512i xa, __m512i xb, const __m512i* t1, const __m512i* t2, __m512i& a, __m512i& b) {
  __m512 ya[2], yb[2];
  // x1 and x2's values paired in 32-bit lanes: [0] pairs 0-15, [1] pairs 16-31 (pair_words; against
  // vpermt2w: bf16 rows in L1 here 3.18 -> 3.0 ns a step, 512 tokens 2-7% faster).
  __m512i pairs[2];
  pair_words(xa, xb, pairs);
  for (int u = 0; u < 2; ++u) {
    const __m512bh pr = reinterpret_cast<__m512bh>(pairs[u]);
    ya[u] = _mm512_dpbf16_ps(_mm512_setzero_ps(), pr, reinterpret_cast<__m512bh>(t1[u]));
    yb[u] = _mm512_dpbf16_ps(_mm512_setzero_ps(), pr, reinterpret_cast<__m512bh>(t2[u]));
  }
  a = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(ya[1], ya[0]));
  b = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(yb[1], yb[0]));
}

// bf16_step32 through vdpbf16ps (AVX512-BF16's pairwise dot product): x1 and x2's values of a
// pair side by side in a 32-bit lane, one instruction gives x1*c1 - x2*s1 (table lanes t1,
// bf16_pair_table), another x2*c2 + x1*s2 (t2): 4 dot products, 4 shuffles a step instead of 8
// multiplies, 4 adds and 4 widening permutes (Zen 4, L1-resident rows: 1.5 ns a step rather than
// 3.1; bf16 rows were bound by the vector units at one thread). The same bits as bf16_step32,
// checked on every step's results: vdpbf16ps is an fp32 FMA with round to nearest even, denormal
// inputs read as zero and denormal results flushed. A product of two bf16 values is exact in fp32 unless under 2^-126 in
// magnitude, and a denormal x times a table value (at most 2) is under 2^-125, so every product
// it gets wrong is under 2^-125; a result of at least 2^-97 then comes from an exact product of
// at least 2^-99, whose fp32 neighbours are 2^-123 or more apart: adding the other product (exact,
// or under 2^-125 either way) rounds the same in both, so the fp32 results are equal (and so their
// vcvtne2ps2bf16 narrowing, exact for normal values). Infinities come from the same exact
// products on both paths. Steps with a result outside bf16_in_window's window (zeros: signs of
// zero; NaNs: payloads; anything under 2^-64 or from 2^64) store nothing and return false: the
// caller redoes them by bf16_step32 (bf16_step32_lanes, from the step's lanes in memory, t1 and
// t2's), in place too, as the step's x is still unchanged. The caller decides where that call
// goes: the unrolled rows make it after their group, so that no call sits among their 16 zmm of loaded x (live across a call, they
// would be spilled). kDefer (out of place only: x must outlive the stores): the step stores its
// results whatever they are and folds them into `seen`, which the caller checks once for many
// steps, redoing all of them if any was outside the window (3 instructions a step rather than 4
// and a branch). xa, xb: x[0, 32) and x[half, half + 32).
template <bool kDefer>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), always_inline)) inline bool bf16_dp_step32(
    __m512i xa, __m512i xb, c10::BFloat16* y, int64_t half, const __m512i* t1, const __m512i* t2, bool stream,
    DpSeen& seen) {
  __m512i a, b;
  bf16_dp_results(xa, xb, t1, t2, a, b);
  if constexpr (kDefer) {
    seen.all = _mm512_ternarylogic_epi32(seen.all, bf16_window_bits(a), bf16_window_bits(b), 0x80);  // AND
  } else if (__builtin_expect(!bf16_in_window(a, b), 0)) {
    return false;
  }
  if (stream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(y), a);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(y + half), b);
  } else {
    _mm512_storeu_si512(y, a);
    _mm512_storeu_si512(y + half, b);
  }
  return true;
}

// n rows, x + r * sx for r in [0, n) (heads of a token, which share its table row), with the
// table values in registers: a row of kChunks * 32 pairs holds all of them (8 zmm for R = 128
// with same tables) and the rows are walked one after the other, each in memory order; longer
// rows (kChunks = 0) load 32 pairs' values at a time and apply them to every row before the next
// 32 (each row then visited in pieces: out of place at 2048 tokens ~1.4x slower than in order,
// the write streams interleaved). Against one call per row: 1.3-1.8x on bf16 rows here. Row
// r < pf.rows also prefetches its row pf.ox(r) (pf.oy(r)) elements ahead before it is rotated.
// kDp: steps through vdpbf16ps with the token's bf16_pairs (bf16_dp_step32), else bf16_step32.
// kN > 0: n is kN, the rows unrolled (rotate_rows). kDefer (out of place): the steps' check once,
// after all n rows, which are then redone by bf16_step32_lanes if any step failed it.
template <bool same, int kChunks, bool kDp, int kN = 0, bool kDefer = false>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), always_inline)) inline void bf16_rows_avx512bf16(
    const c10::BFloat16* x, c10::BFloat16* y, int64_t n, int64_t sx, int64_t sy, int64_t half, const float* c1,
    const float* c2, const float* s1, const float* s2, const uint32_t* pairs, const RowPrefetch& pf, bool stream,
    int64_t rest) {
  // Lambdas would lose this function's target attribute (and the intrinsics with it): the two
  // kinds of step are spelled out below.
  constexpr int kRegs = 2 * (kChunks > 0 ? kChunks : 1);
  __m512 vc1[kRegs], vs1[kRegs], vc2[kRegs], vs2[kRegs];  // fp32 table values (bf16_step32)
  __m512i t1[kRegs], t2[kRegs];                           // vdpbf16ps lanes (bf16_dp_step32)
  DpSeen seen{_mm512_set1_epi16(-1)};
  constexpr int64_t kPairs = kChunks > 0 ? 32 * kChunks : 32;  // pairs whose table values are in registers
  int64_t i = 0;
  for (; i + 32 <= half; i += kPairs) {
    if constexpr (kDp) {
      for (int u = 0; u < kPairs / 16; ++u) {
        t1[u] = _mm512_loadu_si512(pairs + i + 16 * u);
        // same: (s2, c2) = (s1, c1), t1's halves swapped, -s1's sign dropped, where a token's row
        // serves all its heads (kN = 0: half the table's bytes read). The head-major groups (a
        // table row every 4 rows) load t2 instead: their walk is bound by the vector units, not by
        // the table's bytes (bf16 [B, H, S, D], 512 tokens, 1 thread, alternated builds: in place
        // 0.189 -> 0.181 ms, backward 0.248-0.252 -> 0.242-0.245, forward 0.200-0.205 ->
        // 0.196-0.204; 2048 tokens within noise).
        t2[u] = (same && kN == 0) ? _mm512_xor_si512(_mm512_rol_epi32(t1[u], 16), _mm512_set1_epi32(0x8000))
                                  : _mm512_loadu_si512(pairs + half + i + 16 * u);
      }
    } else {
      table_regs<same>(static_cast<int>(kPairs / 16), c1 + i, c2 + i, s1 + i, s2 + i, vc1, vs1, vc2, vs2);
    }
    if constexpr (kN > 0 && kChunks > 0) {
      // Unrolled rows (one step of i): every row's values loaded before the first store (16 zmm
      // for R = 128). In place, head h + 1's row of a token lies S * D * 2 bytes (a multiple of
      // 4 KB) past head h's, so its loads would follow a store at the same address modulo 4 KB,
      // which the CPU holds them behind (4K aliasing). [B, H, S, D], 512 tokens, against a row
      // at a time (side by side, order rotated): 1 thread in place 0.139 -> 0.106 ms (unrolled
      // but a row at a time: slower than the loop), and out of place too (more loads in flight):
      // forward 0.177 -> 0.148, backward 0.211 -> 0.175; 2 threads 0.080 -> 0.062, 0.097 ->
      // 0.087, 0.122 -> 0.110; 2048 tokens forward 0.709 -> 0.668, backward 0.777 -> 0.731.
      // With fp32 tables (bf16_step32: 4 zmm of them per chunk, 8 without `same`, against
      // vdpbf16ps's 4 lanes) all chunks at once spill: there one chunk of every row at a time
      // (its loads still all before its stores; the next chunk's lie 64 bytes further, on other
      // addresses modulo 4 KB). [B, H, S, D] bf16, fp32 tables, 512 tokens, 1 thread, alternated
      // builds: in place 0.258 -> 0.240-0.250 ms, backward 0.34 -> 0.33; vdpbf16ps steps a chunk
      // at a time: within noise (forward 0.206-0.213 -> 0.212-0.225).
      constexpr int kAtOnce = kDp ? kChunks : 1;
      uint32_t redo = 0;  // bf16_dp_step32's steps left to bf16_step32_lanes: bit r * kChunks + c
      for (int c0 = 0; c0 < kChunks; c0 += kAtOnce) {
        __m512i xa[kN][kAtOnce], xb[kN][kAtOnce];
#pragma GCC unroll 8
        for (int r = 0; r < kN; ++r) {
          for (int c = 0; c < kAtOnce; ++c) {
            xa[r][c] = _mm512_loadu_si512(x + r * sx + 32 * (c0 + c));
            xb[r][c] = _mm512_loadu_si512(x + r * sx + half + 32 * (c0 + c));
          }
        }
#pragma GCC unroll 8
        for (int r = 0; r < kN; ++r) {
          if (c0 == 0 && r < pf.rows) {
            prefetch_row(x + r * sx + pf.ox(r), y + r * sy + pf.oy(r), pf.bytes, !stream, pf.l2);
          }
          for (int c = 0; c < kAtOnce; ++c) {
            const int cc = c0 + c;
            if constexpr (kDp) {
              if (!bf16_dp_step32<kDefer>(xa[r][c], xb[r][c], y + r * sy + 32 * cc, half, t1 + 2 * cc, t2 + 2 * cc,
                                          stream, seen)) {
                redo |= 1u << (r * kChunks + cc);
              }
            } else {
              bf16_step32<same>(xa[r][c], xb[r][c], y + r * sy + 32 * cc, half, vc1 + 2 * cc, vs1 + 2 * cc,
                                vc2 + 2 * cc, vs2 + 2 * cc, stream);
            }
          }
        }
      }
      for (; redo != 0; redo &= redo - 1) {
        const int r = __builtin_ctz(redo) / kChunks, c = __builtin_ctz(redo) % kChunks;
        bf16_step32_lanes(x + r * sx + 32 * c, y + r * sy + 32 * c, half, pairs + 32 * c, stream);
      }
      continue;
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < n; ++r) {
      if (i == 0 && r < pf.rows) prefetch_row(x + r * sx + pf.ox(r), y + r * sy + pf.oy(r), pf.bytes, !stream, pf.l2);
      for (int64_t j = 0; j < kPairs; j += 32) {
        const int u = static_cast<int>(j / 16);
        const c10::BFloat16* xr = x + r * sx + i + j;
        const __m512i xa = _mm512_loadu_si512(xr), xb = _mm512_loadu_si512(xr + half);
        if constexpr (kDp) {
          if (!bf16_dp_step32<kDefer>(xa, xb, y + r * sy + i + j, half, t1 + u, t2 + u, stream, seen)) {
            bf16_step32_lanes(xr, y + r * sy + i + j, half, pairs + i + j, stream);
          }
        } else {
          bf16_step32<same>(xa, xb, y + r * sy + i + j, half, vc1 + u, vs1 + u, vc2 + u, vs2 + u, stream);
        }
      }
    }
  }
  if constexpr (kDp && kDefer) {
    if (__builtin_expect(!dp_seen_in_window(seen), 0)) {
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t j = 0; j < i; j += 32) bf16_step32_lanes(x + r * sx + j, y + r * sy + j, half, pairs + j, stream);
      }
    }
  }
  for (int64_t r = 0; r < n && i < half; ++r) bf16_pairs_one_by_one(x + r * sx, y + r * sy, half, i, c1, c2, s1, s2);
  for (int64_t r = 0; r < n && rest > 0; ++r) copy_bytes<64>(x + r * sx + 2 * half, y + r * sy + 2 * half, rest);
}

// One step of a bf16 row, with x's values loaded (xa: x1's, xb: x2's) and the table values of its
// lanes in t1, t2 (kDp: vdpbf16ps lanes) or vc*/vs*: results in lanes m stored at y and y + half
// (masked where m is not all of them). True when done; false (nothing stored) where a result fell
// outside the window.
template <bool kDp, bool same>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), always_inline)) inline bool bf16_step_masked(
    __m512i xa, __m512i xb, c10::BFloat16* y, int64_t half, __mmask32 m, const __m512i* t1, const __m512i* t2,
    const __m512* vc1, const __m512* vs1, const __m512* vc2, const __m512* vs2) {
  __m512i a, b;
  if constexpr (kDp) {
    bf16_dp_results(xa, xb, t1, t2, a, b);
  } else {
    __m512 ya[2], yb[2];
    bf16_step32_results<same>(xa, xb, vc1, vs1, vc2, vs2, ya, yb);
    a = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(ya[1], ya[0]));
    b = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(yb[1], yb[0]));
  }
  if (__builtin_expect(!bf16_in_window(a, b, m), 0)) return false;
  _mm512_mask_storeu_epi16(y, m, a);
  _mm512_mask_storeu_epi16(y + half, m, b);
  return true;
}

// bf16_rows_tail's pieces of a row. Its x, every step's (kFull full ones, then the last one from
// pair `last` on, on lanes m), loaded before any of its stores.
template <int kFull>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), always_inline)) inline void bf16_tail_row_load(
    const c10::BFloat16* xr, int64_t half, int64_t last, __mmask32 m, __m512i* xa, __m512i* xb) {
  for (int c = 0; c < kFull; ++c) {
    xa[c] = _mm512_loadu_si512(xr + 32 * c);
    xb[c] = _mm512_loadu_si512(xr + half + 32 * c);
  }
  xa[kFull] = _mm512_maskz_loadu_epi16(m, xr + last);
  xb[kFull] = _mm512_maskz_loadu_epi16(m, xr + half + last);
}
// Its steps, into yr; returns those left: bit c < kFull a full step that failed the check, bit
// kFull its pairs [32 * kFull, half), where the last step failed it or was not taken (after a
// failed full step: it overlaps that one's pairs, whose x must stay unrotated until it is redone).
template <bool same, int kFull, bool kDp>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), always_inline)) inline uint32_t bf16_tail_row_steps(
    const __m512i* xa, const __m512i* xb, c10::BFloat16* yr, int64_t half, int64_t last, __mmask32 m,
    const __m512i* t1, const __m512i* t2, const __m512* vc1, const __m512* vs1, const __m512* vc2, const __m512* vs2) {
  uint32_t left = 0;
  DpSeen seen{};  // (unused: the steps check at once)
  for (int c = 0; c < kFull; ++c) {
    if constexpr (kDp) {
      if (!bf16_dp_step32<false>(xa[c], xb[c], yr + 32 * c, half, t1 + 2 * c, t2 + 2 * c, false, seen)) {
        left |= 1u << c;
      }
    } else {
      bf16_step32<same>(xa[c], xb[c], yr + 32 * c, half, vc1 + 2 * c, vs1 + 2 * c, vc2 + 2 * c, vs2 + 2 * c, false);
    }
  }
  const int u = 2 * kFull;  // the last step's registers
  if (left != 0 || !bf16_step_masked<kDp, same>(xa[kFull], xb[kFull], yr + last, half, m, t1 + u, t2 + u, vc1 + u,
                                                vs1 + u, vc2 + u, vs2 + u)) {
    left |= 1u << kFull;
  }
  return left;
}
// The steps a row left (bf16_tail_row_steps), the exact way, from its x (unrotated there).
template <int kFull, bool kDp>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), always_inline)) inline void bf16_tail_row_redo(
    const c10::BFloat16* xr, c10::BFloat16* yr, int64_t half, uint32_t left, const float* c1, const float* c2,
    const float* s1, const float* s2, const uint32_t* pairs) {
  for (int c = 0; c < kFull; ++c) {
    if ((left >> c) & 1) bf16_step32_lanes(xr + 32 * c, yr + 32 * c, half, pairs + 32 * c, false);  // (kDp only)
  }
  if ((left >> kFull) & 1) {
    if constexpr (kDp) {
      bf16_pairs_one_by_one(xr, yr, half, 32 * kFull, pairs);
    } else {
      bf16_pairs_one_by_one(xr, yr, half, 32 * kFull, c1, c2, s1, s2);
    }
  }
}

// n bf16 rows (as bf16_rows_avx512bf16's) of half = 32 * kFull + t pairs, 0 < t < 32 (R = 2 * half
// not a multiple of 64: head dims 80 and 96, partial spans such as phi-2's R = 32), the table
// values of every step in registers, the rows one after the other:
// - kFull > 0: each row's kFull full steps, then its last 32 pairs, [half - 32, half), as one more
//   step, which overlaps the last full one (those pairs stored twice, the same bits). All of a
//   row's loads come before its first store: in place, no step reads what another stored (the
//   overlapping pairs are read unrotated), and no load waits on a store it overlaps, neither in
//   the row nor in the next one: a step masked to the last t pairs stores 64 bytes from x2's pair
//   32 * kFull on, past the row's end, and the next row's first load, which overlaps it, waits
//   for it to reach the cache (head dim 80, 512 tokens, in place: 1.16 ms masked, 0.27
//   overlapping; out of place 0.28 either way).
// - kFull = 0 (half < 32): one step masked to the row's pairs (loads and stores).
// Where the last step fails the check, its pairs not taken by a full step, [32 * kFull, half), go
// one by one (bf16_pairs_one_by_one). kN > 0 (kFull < 2): n is kN, a head-major group's rows,
// unrolled (rows_unrolled; the branch below says how). Never streamed: the row's pieces are not
// 64-byte aligned (aligned64). Against those pairs one by one after the steps (as
// bf16_rows_avx512bf16 does for longer rows): see rows_at_once.
template <bool same, int kFull, bool kDp, int kN = 0>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), always_inline)) inline void bf16_rows_tail(
    const c10::BFloat16* x, c10::BFloat16* y, int64_t n, int64_t sx, int64_t sy, int64_t half, const float* c1,
    const float* c2, const float* s1, const float* s2, const uint32_t* pairs, const RowPrefetch& pf, int64_t rest) {
  constexpr int kRegs = 2 * kFull + 2;  // 16 pairs a register, the last step's 2 last
  const int64_t last = kFull > 0 ? half - 32 : 0;  // the last step's first pair
  const __mmask32 m = kFull > 0 ? ~__mmask32{0} : tail_mask32(half);
  __m512i t1[kRegs], t2[kRegs];
  __m512 vc1[kRegs], vs1[kRegs], vc2[kRegs], vs2[kRegs];
  for (int u = 0; u < kRegs; ++u) {
    const bool in_last = u >= 2 * kFull;
    const __mmask16 mu = static_cast<__mmask16>(in_last ? m >> (16 * (u & 1)) : 0xFFFF);
    const int64_t j = in_last ? last + 16 * (u & 1) : 16 * u;
    if constexpr (kDp) {
      t1[u] = _mm512_maskz_loadu_epi32(mu, pairs + j);
      t2[u] = _mm512_maskz_loadu_epi32(mu, pairs + half + j);
    } else {
      vc1[u] = _mm512_maskz_loadu_ps(mu, c1 + j);
      vs1[u] = _mm512_maskz_loadu_ps(mu, s1 + j);
      vc2[u] = same ? vc1[u] : _mm512_maskz_loadu_ps(mu, c2 + j);
      vs2[u] = same ? vs1[u] : _mm512_maskz_loadu_ps(mu, s2 + j);
    }
  }
  if constexpr (kN > 0) {
    // A head-major group's kN rows unrolled (rows_unrolled; as bf16_rows_avx512bf16's): every row's
    // loads before the first store, so that in place no load follows a store at its address
    // modulo 4 KB (head h + 1's row lies a multiple of 4 KB past head h's); the steps left are
    // redone after the group (no call among the loaded rows).
    __m512i xa[kN][kFull + 1], xb[kN][kFull + 1];
#pragma GCC unroll 8
    for (int r = 0; r < kN; ++r) bf16_tail_row_load<kFull>(x + r * sx, half, last, m, xa[r], xb[r]);
    uint32_t left[kN];
#pragma GCC unroll 8
    for (int r = 0; r < kN; ++r) {
      if (r < pf.rows) prefetch_row(x + r * sx + pf.ox(r), y + r * sy + pf.oy(r), pf.bytes, true, pf.l2);
      left[r] = bf16_tail_row_steps<same, kFull, kDp>(xa[r], xb[r], y + r * sy, half, last, m, t1, t2, vc1, vs1, vc2,
                                                      vs2);
    }
    for (int r = 0; r < kN; ++r) {
      if (left[r] != 0) bf16_tail_row_redo<kFull, kDp>(x + r * sx, y + r * sy, half, left[r], c1, c2, s1, s2, pairs);
      if (rest > 0) copy_bytes<64>(x + r * sx + 2 * half, y + r * sy + 2 * half, rest);
    }
    return;
  }
  for (int64_t r = 0; r < n; ++r) {
    const c10::BFloat16* xr = x + r * sx;
    c10::BFloat16* yr = y + r * sy;
    if (r < pf.rows) prefetch_row(xr + pf.ox(r), yr + pf.oy(r), pf.bytes, true, pf.l2);
    __m512i xa[kFull + 1], xb[kFull + 1];
    bf16_tail_row_load<kFull>(xr, half, last, m, xa, xb);
    const uint32_t left = bf16_tail_row_steps<same, kFull, kDp>(xa, xb, yr, half, last, m, t1, t2, vc1, vs1, vc2, vs2);
    if (left != 0) bf16_tail_row_redo<kFull, kDp>(xr, yr, half, left, c1, c2, s1, s2, pairs);
    if (rest > 0) copy_bytes<64>(xr + 2 * half, yr + 2 * half, rest);
  }
}

// One token's n rows (bf16_rows_avx512bf16) with its table t, the row size picked; rest > 0: each
// row's pass-through elements (a partial span's, out of place), that many bytes, copied after it.
template <bool same, bool kDp, int kN, bool kDefer>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), always_inline)) inline void bf16_token_rows(
    const c10::BFloat16* x, c10::BFloat16* y, int64_t n, int64_t sx, int64_t sy, int64_t half, const CSTable<float>& t,
    const RowPrefetch& rp, bool stream, int64_t rest) {
  if (half == 64) {
    bf16_rows_avx512bf16<same, 2, kDp, kN, kDefer>(x, y, n, sx, sy, half, t.c1, t.c2, t.s1, t.s2, t.bf16_pairs, rp,
                                                   stream, rest);
  } else if (half == 32) {
    bf16_rows_avx512bf16<same, 1, kDp, kN, kDefer>(x, y, n, sx, sy, half, t.c1, t.c2, t.s1, t.s2, t.bf16_pairs, rp,
                                                   stream, rest);
  } else if (half == 128 && kN == 0) {  // (head dim 256: Gemma)
    bf16_rows_avx512bf16<same, 4, kDp, kN, kDefer>(x, y, n, sx, sy, half, t.c1, t.c2, t.s1, t.s2, t.bf16_pairs, rp,
                                                   stream, rest);
  } else if (half % 32 != 0 && half < (kN > 0 ? 64 : 96)) {  // (unrolled under 64: rows_unrolled)
    if (half < 32) {
      bf16_rows_tail<same, 0, kDp, kN>(x, y, n, sx, sy, half, t.c1, t.c2, t.s1, t.s2, t.bf16_pairs, rp, rest);
    } else if (half < 64) {
      bf16_rows_tail<same, 1, kDp, kN>(x, y, n, sx, sy, half, t.c1, t.c2, t.s1, t.s2, t.bf16_pairs, rp, rest);
    } else if constexpr (kN == 0) {
      bf16_rows_tail<same, 2, kDp>(x, y, n, sx, sy, half, t.c1, t.c2, t.s1, t.s2, t.bf16_pairs, rp, rest);
    }
  } else {
    bf16_rows_avx512bf16<same, 0, kDp>(x, y, n, sx, sy, half, t.c1, t.c2, t.s1, t.s2, t.bf16_pairs, rp, stream,
                                     rest);
  }
}

// bf16_rows_avx512bf16 over tokens b in [0, n_tok): rows x + xo[b] + r * sx, r in [0, nh), with
// table row cs[b]. One call per block of a head-major walk, not one per token (at 4 heads a call:
// out of place 5-12% faster, in place up to 7%). kN > 0: nh is kN, the rows unrolled (rotate_rows).
// The walk is compiled for each kind of store (kStream: pf.stream), so that no step branches on it
// (GCC laid the unrolled rows out 10-15% slower with some spellings of that branch than with
// others: [B, H, S, D] at 512 tokens, 1 thread, in place 0.117-0.120 ms against 0.105-0.113,
// builds compared runs apart; without the branch 0.110-0.113).
template <bool same, int kN, bool kStream, bool kDefer>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), always_inline)) inline void bf16_tokens(
    const c10::BFloat16* x, c10::BFloat16* y, const int64_t* xo, const int64_t* yo, int64_t n_tok, int64_t nh,
    int64_t sx, int64_t sy, int64_t half, const CSTable<float>* cs, const WalkPrefetch& pf, int64_t rest) {
  for (int64_t b = 0; b < n_tok; ++b) {
    RowPrefetch rp;
    token_prefetch(pf, xo, yo, b, nh, sx, sy, rp);
    const CSTable<float>& t = cs[b];
    if (t.bf16_pairs) {
      bf16_token_rows<same, true, kN, kDefer>(x + xo[b], y + yo[b], nh, sx, sy, half, t, rp, kStream, rest);
    } else {
      bf16_token_rows<same, false, kN, false>(x + xo[b], y + yo[b], nh, sx, sy, half, t, rp, kStream, rest);
    }
  }
}

template <bool same, int kN = 0>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"))) void rotate_bf16_tokens_avx512bf16(
    const c10::BFloat16* x, c10::BFloat16* y, const int64_t* xo, const int64_t* yo, int64_t n_tok, int64_t nh,
    int64_t sx, int64_t sy, int64_t half, const CSTable<float>* cs, const WalkPrefetch& pf, int64_t rest = 0) {
  // Out of place, the unrolled groups of rows check their vdpbf16ps steps once per token (kDefer:
  // see bf16_rows_avx512bf16). [B, H, S, D] bf16 at 512 tokens (bf16 tables), side by side (order
  // rotated, with A/A controls), Zen 4: forward 0.248 -> 0.232 ms, backward 0.306 -> 0.291 at 1
  // thread, 0.131 -> 0.124 and 0.183 -> 0.169 at 2. The token-major rows' loop (kN = 0) keeps the
  // per-step check: deferred there, 2% faster at 64 tokens, 3-4% slower at 512. Checked once per
  // 256-token block instead: 2.3-2.9x slower, as failing steps are not rare (exact zeros, x1 c = x2 s
  // with colliding bf16 values: 19 of 2.1M results at 512 tokens, in 19 of 4096 token groups but
  // 7 of 16 blocks, each then redone by bf16_step32_lanes).
  constexpr bool kDefer = kN > 0;
  if (pf.stream) {  // (out of place)
    bf16_tokens<same, kN, true, kDefer>(x, y, xo, yo, n_tok, nh, sx, sy, half, cs, pf, rest);
  } else if (kDefer && x != y) {
    bf16_tokens<same, kN, false, kDefer>(x, y, xo, yo, n_tok, nh, sx, sy, half, cs, pf, rest);
  } else {
    bf16_tokens<same, kN, false, false>(x, y, xo, yo, n_tok, nh, sx, sy, half, cs, pf, rest);
  }
}

// bf16_pair_table's lanes for interleaved (GPT-J) pairs, straight from a contiguous bf16 cos row c
// and sin row s (2 * half values each, half a multiple of 16): pair i's values are the 32-bit
// words i of c and s (make_pair_cs: c1 = c[2i], c2 = c[2i + 1], s1 = s[2i], s2 = s[2i + 1]; with
// conj s1 = -s[2i + 1], s2 = -s[2i]), so its lanes (c1, -s1) and (s2, c2) are those words' halves
// recombined, 16 pairs a vector, and checked as bf16_pair_table checks its values. Llama-3-8B's
// q + k, 512 tokens, 1 thread, forward: 0.179-0.187 -> 0.174-0.175 ms against an fp32 table built
// 16 pairs a vector and narrowed into lanes (bf16_pair_table_from); per-pair tables, which went
// pair by pair, 0.30 -> 0.174-0.177 (bf16_pair_table; rotate-half rows: 0.171-0.175).
__attribute__((target("avx512f,avx512bw"))) bool bf16_interleaved_pair_table(const c10::BFloat16* c,
                                                                            const c10::BFloat16* s, bool conj,
                                                                            int64_t half, uint32_t* out) {
  const __m512i lo = _mm512_set1_epi32(0xFFFF), hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i sign_hi = _mm512_set1_epi32(INT32_MIN), sign_lo = _mm512_set1_epi32(0x8000);
  __mmask32 bad = 0;
  for (int64_t i = 0; i < half; i += 16) {
    const __m512i cw = _mm512_loadu_si512(c + 2 * i), sw = _mm512_loadu_si512(s + 2 * i);
    bad |= bf16_table_values_refused(cw) | bf16_table_values_refused(sw);
    const __m512i c1 = _mm512_and_si512(cw, lo), c2 = _mm512_and_si512(cw, hi);
    // -s1 in the high half, s2 in the low one
    const __m512i neg_s1 = conj ? _mm512_and_si512(sw, hi) : _mm512_xor_si512(_mm512_slli_epi32(sw, 16), sign_hi);
    const __m512i s2 = conj ? _mm512_xor_si512(_mm512_and_si512(sw, lo), sign_lo) : _mm512_srli_epi32(sw, 16);
    _mm512_storeu_si512(out + i, _mm512_or_si512(c1, neg_s1));
    _mm512_storeu_si512(out + half + i, _mm512_or_si512(s2, c2));
  }
  return bad == 0;
}

// bf16_pair_table from a token's fp32 table runs r (c1, c2, s1, s2 of `half` each, conj applied:
// the general table loop's, whose values came from bf16 cos/sin, so they narrow exactly).
__attribute__((target("avx512f,avx512bw"))) bool bf16_pair_table_from(const float* r, int64_t half, uint32_t* out) {
  c10::BFloat16 runs[4 * 64];  // (half <= 64: rows_at_once)
  for (int64_t i = 0; i < 4 * half; ++i) {
    uint32_t bits;
    std::memcpy(&bits, r + i, sizeof(bits));
    runs[i] = c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
  }
  bool same = false;
  return bf16_pair_table(runs, runs + half, runs + 2 * half, runs + 3 * half, false, half, out, &same);
}

// Pairs 16u to 16u + 15 of a bf16 row x as 32-bit words, x1's value in the low half (as vdpbf16ps
// reads a pair): an interleaved row's own words, or from a half-split row (kHalves: swap_layout's
// backward) its two runs' values widened and joined.
template <bool kHalves>
__attribute__((target("avx512f"), always_inline)) inline __m512i load_pair_words(const c10::BFloat16* x, int64_t half,
                                                                               int u) {
  if constexpr (kHalves) {
    const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * u)));
    const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + half + 16 * u)));
    return _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
  } else {
    return _mm512_loadu_si512(x + 32 * u);
  }
}

// The results of pairs 16u to 16u + 15, narrowed (a: y1's 16 words, then y2's, as vcvtne2ps2bf16
// gives them), stored into row y if every one is in bf16_in_window's window, where that
// narrowing is exact, as pairs (one word permute), or with kHalves at u and half + u (a's two
// halves: swap_layout's forward); false, nothing stored, otherwise.
template <bool kStream, bool kHalves = false>
__attribute__((target("avx512f,avx512bw"), always_inline)) inline bool bf16_store_pairs_in_window(c10::BFloat16* y,
                                                                                                 int64_t half, int u,
                                                                                                 __m512i a) {
  // Word j of the pairs: y1 of pair j / 2 (word j / 2 of a) for even j, y2 of it (word 16 + j / 2)
  // for odd j.
  alignas(64) static constexpr uint16_t kJoin[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  if (__builtin_expect(
          _mm512_test_epi16_mask(bf16_window_bits(a), _mm512_set1_epi16(kBf16WindowBit)) != 0xFFFFFFFFu, 0)) {
    return false;
  }
  if constexpr (kHalves) {
    store256(y + 16 * u, _mm512_castsi512_si256(a), kStream);
    store256(y + half + 16 * u, _mm512_extracti64x4_epi64(a, 1), kStream);
    return true;
  }
  const __m512i out = _mm512_permutexvar_epi16(_mm512_load_si512(kJoin), a);
  if constexpr (kStream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(y + 32 * u), out);
  } else {
    _mm512_storeu_si512(y + 32 * u, out);
  }
  return true;
}

// x1's and x2's values (fp32) of 16 interleaved bf16 pairs v, each pair one 32-bit lane.
__attribute__((target("avx512f"), always_inline)) inline __m512 x1_of(__m512i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
__attribute__((target("avx512f"), always_inline)) inline __m512 x2_of(__m512i v) {
  return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// One token's rows x + r * sx (y + r * sy), r in [0, nh), for bf16_interleaved_tokens: through the
// table's vdpbf16ps lanes (kLanes) or its fp32 values.
template <int kRegs, bool kStream, bool kReadHalves, bool kWriteHalves, bool kLanes>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"), always_inline)) inline void bf16_pair_token(
    const c10::BFloat16* x, c10::BFloat16* y, int64_t nh, int64_t sx, int64_t sy, const CSTable<float>& t,
    const RowPrefetch& rp, int64_t rest) {
  constexpr int64_t half = 16 * kRegs;
  __m512i t1[kRegs], t2[kRegs];
  __m512 vc1[kRegs], vs1[kRegs], vc2[kRegs], vs2[kRegs];
  if constexpr (kLanes) {
    for (int u = 0; u < kRegs; ++u) {
      t1[u] = _mm512_loadu_si512(t.bf16_pairs + 16 * u);
      t2[u] = _mm512_loadu_si512(t.bf16_pairs + half + 16 * u);
    }
  } else {
    table_regs<false>(kRegs, t.c1, t.c2, t.s1, t.s2, vc1, vs1, vc2, vs2);
  }
  for (int64_t r = 0; r < nh; ++r) {
    const c10::BFloat16* xr = x + r * sx;
    c10::BFloat16* yr = y + r * sy;
    if (r < rp.rows) prefetch_row(xr + rp.ox(r), yr + rp.oy(r), rp.bytes, !kStream, rp.l2);
    for (int u = 0; u < kRegs; ++u) {
      const __m512i v = load_pair_words<kReadHalves>(xr, half, u);
      __m512 y1, y2;
      if constexpr (kLanes) {
        const __m512bh pr = reinterpret_cast<__m512bh>(v);
        const __m512 ya = _mm512_dpbf16_ps(_mm512_setzero_ps(), pr, reinterpret_cast<__m512bh>(t1[u]));
        const __m512 yb = _mm512_dpbf16_ps(_mm512_setzero_ps(), pr, reinterpret_cast<__m512bh>(t2[u]));
        const __m512i a = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(yb, ya));
        if (bf16_store_pairs_in_window<kStream, kWriteHalves>(yr, half, u, a)) continue;
        bf16_lanes_values(t1[u], t2[u], vc1[u], vs1[u], vc2[u], vs2[u]);  // (the exact way)
        rotate16(x1_of(v), x2_of(v), vc1[u], vs1[u], vc2[u], vs2[u], y1, y2);
      } else {
        rotate16(x1_of(v), x2_of(v), vc1[u], vs1[u], vc2[u], vs2[u], y1, y2);
        const __m512i a = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(y2, y1));
        if (bf16_store_pairs_in_window<kStream, kWriteHalves>(yr, half, u, a)) continue;
      }
      store_pairs<!kWriteHalves>(yr, half, 16 * u, y1, y2, kStream);
    }
    if (rest > 0) copy_bytes<64>(xr + 2 * half, yr + 2 * half, rest);
  }
}

// Interleaved (GPT-J) bf16 rows with AVX512-BF16, over tokens b in [0, n_tok), rows x + xo[b] + r * sx,
// r in [0, nh), of R = 32 * kRegs. A pair (x[2i], x[2i + 1]) sits in a 32-bit lane, x1's value in
// the low half: as vdpbf16ps reads it, so 16 pairs a vector take two dot products with the token's
// bf16_pair_table lanes (the rotate-half steps' arithmetic, so the same bits: see bf16_dp_step32);
// and widened to fp32 by a shift (x1) and a mask (x2), for rotate16 with an fp32 table (fp32
// cos/sin, such as Llama 4's freqs_cis, or a token whose values the lanes refused). Either way
// one narrowing and one word permute back into pairs (bf16_store_pairs_in_window); a vector with
// a result outside the window is done the exact way (rotate16 on the widened pairs, with the dot
// products' table values taken back from the lanes, bf16_lanes_values; store_pairs). Llama-3-8B's
// q + k at 512 tokens, 1 thread, forward: 0.17 ms with bf16 tables (lanes from
// bf16_interleaved_pair_table; 0.28 from an fp32 table built pair by pair); fp32 per-pair tables
// 0.61-0.62 -> 0.21-0.22, 2048 tokens 2.60-2.74 -> 0.90-0.92 (through rotate_tokens_avx512's
// interleaved rows, which widen and narrow exactly, 16 values an instruction sequence); 0.96 one
// row at a time. kReadHalves / kWriteHalves: x's / y's pairs half-split instead (swap_layout rows,
// MLA's rope: interleaved into half-split, the forward, or back; load_pair_words joins x's two
// runs into the words, y's runs are the narrowing's two halves): DeepSeek-V3's
// apply_rotary_pos_emb_interleave, 1 thread, builds alternated: Llama-3-8B's q + k, bf16, 512
// tokens, fp32 tables 0.67 -> 0.30 ms, bf16 ones 0.71-0.72 -> 0.26, backward 0.58 -> 0.31-0.32;
// 2048 tokens 2.98-3.28 -> 1.11-1.40; DeepSeek-V3's q_pe (128 heads of 64, [B, H, S, D]) 512
// tokens 1.14-1.20 -> 0.50-0.57, 2048 tokens 5.26 -> 2.08-2.09 (rotate_row_swapped, row by row).
template <int kRegs, bool kStream, bool kReadHalves = false, bool kWriteHalves = false>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16"))) void bf16_interleaved_tokens(
    const c10::BFloat16* x, c10::BFloat16* y, const int64_t* xo, const int64_t* yo, int64_t n_tok, int64_t nh,
    int64_t sx, int64_t sy, const CSTable<float>* cs, const WalkPrefetch& pf, int64_t rest) {
  for (int64_t b = 0; b < n_tok; ++b) {
    RowPrefetch rp;
    token_prefetch(pf, xo, yo, b, nh, sx, sy, rp);
    if (cs[b].bf16_pairs) {
      bf16_pair_token<kRegs, kStream, kReadHalves, kWriteHalves, true>(x + xo[b], y + yo[b], nh, sx, sy, cs[b], rp,
                                                                       rest);
    } else {
      bf16_pair_token<kRegs, kStream, kReadHalves, kWriteHalves, false>(x + xo[b], y + yo[b], nh, sx, sy, cs[b], rp,
                                                                        rest);
    }
  }
}

// Interleaved (GPT-J) bf16 rows on CPUs with AVX-512F but not AVX512-BF16, as bf16_interleaved_tokens
// with an fp32 table: a pair widened from its 32-bit lane by a shift and a mask, rotate16, and
// each result rounded to bf16 in integers (bf16x16_store's rounding: nearest even, NaN -> 0x7FC0),
// y1 into the lane's low half and y2 into its high half, joined by an or: no permute either way
// (rotate_tokens_avx512's interleaved rows split and join pairs with 4 two-source permutes a 16
// pairs). Llama-3-8B's q + k, 512 tokens, 1 thread, ROTARY_KERNELS_CPU_ISA=avx512: forward
// 0.62-0.63 -> 0.475-0.477, then 0.40-0.41 with the tables' own loop (rotate_tokens), per-pair
// tables 0.64 -> 0.38 (rotate-half rows there: 0.405).
template <int kRegs, bool kStream>
__attribute__((target("avx512f"))) void bf16_interleaved_tokens_avx512(
    const c10::BFloat16* x, c10::BFloat16* y, const int64_t* xo, const int64_t* yo, int64_t n_tok, int64_t nh,
    int64_t sx, int64_t sy, const CSTable<float>* cs, const WalkPrefetch& pf, int64_t rest) {
  constexpr int64_t half = 16 * kRegs;
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i nan_lo = _mm512_set1_epi32(0x7FC0), nan_hi = _mm512_set1_epi32(0x7FC00000);
  for (int64_t b = 0; b < n_tok; ++b) {
    RowPrefetch rp;
    token_prefetch(pf, xo, yo, b, nh, sx, sy, rp);
    const CSTable<float>& t = cs[b];
    __m512 vc1[kRegs], vs1[kRegs], vc2[kRegs], vs2[kRegs];
    table_regs<false>(kRegs, t.c1, t.c2, t.s1, t.s2, vc1, vs1, vc2, vs2);
    for (int64_t r = 0; r < nh; ++r) {
      const c10::BFloat16* xr = x + xo[b] + r * sx;
      c10::BFloat16* yr = y + yo[b] + r * sy;
      if (r < rp.rows) prefetch_row(xr + rp.ox(r), yr + rp.oy(r), rp.bytes, !kStream, rp.l2);
      for (int u = 0; u < kRegs; ++u) {
        const __m512i v = _mm512_loadu_si512(xr + 32 * u);
        __m512 y1, y2;
        rotate16(x1_of(v), x2_of(v), vc1[u], vs1[u], vc2[u], vs2[u], y1, y2);
        const __mmask16 nan1 = _mm512_cmp_ps_mask(y1, y1, _CMP_UNORD_Q), nan2 = _mm512_cmp_ps_mask(y2, y2, _CMP_UNORD_Q);
        const __m512i r1 = _mm512_mask_mov_epi32(_mm512_srli_epi32(bf16_rounded_high(y1), 16), nan1, nan_lo);
        const __m512i r2 = _mm512_mask_mov_epi32(_mm512_and_si512(bf16_rounded_high(y2), hi), nan2, nan_hi);
        const __m512i out = _mm512_or_si512(r1, r2);
        if constexpr (kStream) {
          _mm512_stream_si512(reinterpret_cast<__m512i*>(yr + 32 * u), out);
        } else {
          _mm512_storeu_si512(yr + 32 * u, out);
        }
      }
      if (rest > 0) copy_bytes<64>(xr + 2 * half, yr + 2 * half, rest);
    }
  }
}

// go(kRegs, kStream) as compile-time constants (std::integral_constant) for rows of half 32 or 64
// pairs (kRegs 2 or 4: rows_at_once's bf16 interleaved and swapped rows), stored as pf says.
template <typename Go>
inline void by_regs_and_stream(int64_t half, const WalkPrefetch& pf, const Go& go) {
  using Two = std::integral_constant<int, 2>;
  using Four = std::integral_constant<int, 4>;
  if (pf.stream) {
    half == 64 ? go(Four{}, std::true_type{}) : go(Two{}, std::true_type{});
  } else {
    half == 64 ? go(Four{}, std::false_type{}) : go(Two{}, std::false_type{});
  }
}

// bf16_interleaved_tokens for rows of half 32 or 64 pairs.
template <bool kReadHalves, bool kWriteHalves>
inline void bf16_pair_rows(const c10::BFloat16* x, c10::BFloat16* y, const int64_t* xo, const int64_t* yo,
                           int64_t n_tok, int64_t nh, int64_t sx, int64_t sy, int64_t half, const CSTable<float>* cs,
                           const WalkPrefetch& pf, int64_t rest) {
  by_regs_and_stream(half, pf, [&](auto regs, auto stream) {
    bf16_interleaved_tokens<decltype(regs)::value, decltype(stream)::value, kReadHalves, kWriteHalves>(
        x, y, xo, yo, n_tok, nh, sx, sy, cs, pf, rest);
  });
}
#endif  // RK_X86_SIMD

// Orders this thread's non-temporal stores (WalkPrefetch::stream) before whatever reads y next:
// once, at the end of a walk (rotate_tokens). A fence after each token's rows, as a call that
// streams one token would need, waits for its stores to drain: token-major walks 1.6x slower.
inline void stream_fence() {
#ifdef RK_HAVE_AVX512_BF16_PATH
  _mm_sfence();
#endif
}

// The instruction sets the row paths use, as found on this CPU at load time.
struct CpuIsa {
  bool avx2;        // AVX2 and F16C (fp16 rows convert 8 elements per instruction; rotate_tokens_avx2)
  bool avx512;      // AVX-512F (row kernels rotate_tokens_avx512 and rotate_avx512)
  bool avx512bf16;  // and AVX512-BF16, BW and DQ (bf16 rows take rotate_bf16_tokens_avx512bf16)
};

// n values of a contiguous cos or sin run into accumulator precision (the same values whichever
// way): fp16 through F16C's vcvtph2ps where the CPU has it (load_acc's portable fp16 conversion
// does not vectorise: fp16 tables made a 2048-token fp16 call 1.6x slower than fp32 ones here),
// everything else through load_acc.
template <typename cs_t, typename acc_t>
inline void load_run(const cs_t* src, acc_t* dst, int64_t n, const CpuIsa& isa) {
#ifdef RK_HAVE_F16C_PATH
  if constexpr (std::is_same_v<cs_t, c10::Half> && std::is_same_v<acc_t, float>) {
    if (isa.avx2) {
      half_to_float_f16c(src, dst, n);
      return;
    }
  }
#endif
  (void)isa;
  for (int64_t i = 0; i < n; ++i) dst[i] = load_acc<cs_t, acc_t>(src + i);
}

// One token's table (rotate_tokens) from contiguous cos/sin runs c1, c2, s1, s2 of `half` values
// each (the sin runs negated with conj), r: room for 4 * half values. Where c2 and s2 hold the same
// bits as c1 and s1 (the usual cos/sin cache, cat(freqs, freqs); equal source bits are equal table
// values, every conversion here being exact and one to one) only c1 and s1 are converted, c2 and
// s2 pointing at them. Against the four runs always converted, then compared and compacted per
// block (Zen 4, Llama-3-8B q + k at 512 tokens, 1 thread, builds alternated, 3 runs each, ms):
// bf16 rows with fp32 tables forward 0.271-0.281 -> 0.256-0.261, backward 0.331-0.347 ->
// 0.306-0.314, in place 0.265 -> 0.249; fp32 in place 0.204-0.214 -> 0.187-0.198 (out of place
// within this VM's noise). Reading fp32 rows where they lie instead, with no copy: slower (the
// transposed view at 512 tokens, 0.51-0.54 -> 0.58 forward): the rows then wait on each token's
// table from L3.
template <typename cs_t, typename acc_t>
inline CSTable<acc_t> table_row(const cs_t* c1, const cs_t* c2, const cs_t* s1, const cs_t* s2, bool conj,
                                int64_t half, acc_t* r, const CpuIsa& isa) {
  const size_t bytes = half * sizeof(cs_t);
  const bool same = (c2 == c1 || std::memcmp(c2, c1, bytes) == 0) && (s2 == s1 || std::memcmp(s2, s1, bytes) == 0);
  const int64_t runs = same ? 2 : 4;  // c1 [, c2], s1 [, s2] from r on
  load_run(c1, r, half, isa);
  if (!same) load_run(c2, r + half, half, isa);
  acc_t* s = r + (runs / 2) * half;
  load_run(s1, s, half, isa);
  if (!same) load_run(s2, s + half, half, isa);
  if (conj) {
    for (int64_t i = 0; i < (runs / 2) * half; ++i) s[i] = -s[i];
  }
  if (same) return {r, r, s, s};
  return {r, r + half, s, s + half};
}

#ifdef RK_HAVE_F16C_PATH
// The instruction sets found on this CPU, capped by the environment variable
// ROTARY_KERNELS_CPU_ISA: "avx512" (no AVX512-BF16 kernel), "avx2" (no AVX-512 kernel),
// "default" (none of these explicit paths; the compiler's multiversioned loops still pick their
// own), so that every path can be tested and timed on one machine. Read once per process.
CpuIsa cpu_isa() {
  const char* env = std::getenv("ROTARY_KERNELS_CPU_ISA");
  const std::string cap = env ? env : "";
  const int level = cap.empty() ? 3 : cap == "avx512" ? 2 : cap == "avx2" ? 1 : cap == "default" ? 0 : -1;
  RK_CHECK(level >= 0, "ROTARY_KERNELS_CPU_ISA must be one of avx512, avx2, default (or unset), got '", cap, "'");
  const bool avx512 = level >= 2 && __builtin_cpu_supports("avx512f");
  return {level >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"), avx512,
          level >= 3 && avx512 && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512bf16")};
}
#endif

template <typename scalar_t, typename acc_t, bool interleaved>
inline void rotate_row_swapped(const scalar_t* x, scalar_t* y, int64_t sxd, int64_t syd, int64_t D, int64_t half,
                               bool copy_pass, const CSTable<acc_t>& cs, bool same, const CpuIsa& isa);

// `swap`: swap_layout rows (rotate_row_swapped); the other instances are the row paths as they are.
template <typename scalar_t, typename acc_t, bool interleaved, bool swap = false>
inline void rotate_row(const scalar_t* x, scalar_t* y, int64_t sxd, int64_t syd, int64_t D, int64_t half,
                       bool copy_pass, const CSTable<acc_t>& cs, bool same, const CpuIsa& isa) {
  if constexpr (swap) {
    rotate_row_swapped<scalar_t, acc_t, interleaved>(x, y, sxd, syd, D, half, copy_pass, cs, same, isa);
    return;
  }
#ifdef RK_HAVE_AVX512_BF16_PATH
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && !interleaved) {
    if (isa.avx512bf16 && sxd == 1 && syd == 1 && half % 32 == 0) {
      const int64_t zero = 0;
      if (same) {
        rotate_bf16_tokens_avx512bf16<true>(x, y, &zero, &zero, 1, 1, 0, 0, half, &cs, WalkPrefetch{});
      } else {
        rotate_bf16_tokens_avx512bf16<false>(x, y, &zero, &zero, 1, 1, 0, 0, half, &cs, WalkPrefetch{});
      }
      if (copy_pass) std::memcpy(y + 2 * half, x + 2 * half, (D - 2 * half) * sizeof(scalar_t));
      return;
    }
    if (isa.avx512 && sxd == 1 && syd == 1) {
      if (same) {
        rotate_avx512<scalar_t, true>(x, y, half, cs.c1, cs.c2, cs.s1, cs.s2);
      } else {
        rotate_avx512<scalar_t, false>(x, y, half, cs.c1, cs.c2, cs.s1, cs.s2);
      }
      if (copy_pass) std::memcpy(y + 2 * half, x + 2 * half, (D - 2 * half) * sizeof(scalar_t));
      return;
    }
  }
#endif
#ifdef RK_HAVE_F16C_PATH
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (isa.avx2 && sxd == 1 && syd == 1 && 2 * half <= kF16cRow) {
      float buf[kF16cRow];
      half_to_float_f16c(x, buf, 2 * half);
      if (same) {
        rotate_contig<float, float, interleaved, true>(buf, buf, half, cs);
      } else {
        rotate_contig<float, float, interleaved, false>(buf, buf, half, cs);
      }
      float_to_half_f16c(buf, y, 2 * half);
      if (copy_pass) std::memcpy(y + 2 * half, x + 2 * half, (D - 2 * half) * sizeof(scalar_t));
      return;
    }
  }
#endif
  (void)isa;
  if (sxd == 1 && syd == 1) {
    if (same) {
      rotate_contig<scalar_t, acc_t, interleaved, true>(x, y, half, cs);
    } else {
      rotate_contig<scalar_t, acc_t, interleaved, false>(x, y, half, cs);
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const int64_t j1 = pair_first(i, interleaved), j2 = pair_second(i, half, interleaved);
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

// swap_layout rows (MLA's rope, rotary_math.h): pair i read at its place in x's layout
// (`interleaved`) and written at its place in the other one. A row with a unit head-dim stride on
// either side is moved between the layouts in a buffer, a shuffle of x's own values, and rotated
// half-split by rotate_row (its vectorised paths, the same arithmetic per pair, so the same bits):
// interleaved x is de-interleaved first, a half-split result is interleaved after. Other rows
// take the pairs one by one. Out of place (checked by the op): y never aliases x.
constexpr int64_t kSwapRow = 1024;  // longest rotary span (R) taken through the buffer

// A pair (2i, 2i + 1) of 16- or 32-bit values as one word: the shuffles between the layouts are
// then shifts and narrowing moves, which the compiler vectorises (element copies it does not).
template <typename scalar_t>
using PairWord = std::conditional_t<sizeof(scalar_t) == 2, uint32_t, uint64_t>;

// out[i] = x[2 i], out[half + i] = x[2 i + 1].
template <typename scalar_t>
inline void deinterleave_row(const scalar_t* x, scalar_t* out, int64_t half) {
  if constexpr (sizeof(scalar_t) <= 4) {
    using W = PairWord<scalar_t>;
    using E = std::conditional_t<sizeof(scalar_t) == 2, uint16_t, uint32_t>;
    constexpr int kBits = 8 * sizeof(scalar_t);
    E lo[kSwapRow / 2], hi[kSwapRow / 2];
    for (int64_t i = 0; i < half; ++i) {
      W w;
      std::memcpy(&w, x + 2 * i, sizeof(W));
      lo[i] = static_cast<E>(w);
      hi[i] = static_cast<E>(w >> kBits);
    }
    std::memcpy(out, lo, half * sizeof(E));
    std::memcpy(out + half, hi, half * sizeof(E));
  } else {
    for (int64_t i = 0; i < half; ++i) {
      out[i] = x[2 * i];
      out[half + i] = x[2 * i + 1];
    }
  }
}

// y[2 i] = in[i], y[2 i + 1] = in[half + i].
template <typename scalar_t>
inline void interleave_row(const scalar_t* in, scalar_t* y, int64_t half) {
  if constexpr (sizeof(scalar_t) <= 4) {
    using W = PairWord<scalar_t>;
    using E = std::conditional_t<sizeof(scalar_t) == 2, uint16_t, uint32_t>;
    constexpr int kBits = 8 * sizeof(scalar_t);
    E lo[kSwapRow / 2], hi[kSwapRow / 2];
    W w[kSwapRow / 2];
    std::memcpy(lo, in, half * sizeof(E));
    std::memcpy(hi, in + half, half * sizeof(E));
    for (int64_t i = 0; i < half; ++i) w[i] = static_cast<W>(lo[i]) | (static_cast<W>(hi[i]) << kBits);
    std::memcpy(y, w, half * sizeof(W));
  } else {
    for (int64_t i = 0; i < half; ++i) {
      y[2 * i] = in[i];
      y[2 * i + 1] = in[half + i];
    }
  }
}

// bf16 rows with unit strides: the pair (2i, 2i + 1) of the interleaved side is one 32-bit word,
// whose halves shifted into place are the two values as fp32 (read) or which the two rounded
// values make (written): no shuffle at all, one loop the compiler vectorises. Same arithmetic and
// conversions as rotate_contig (load_acc / store_out), so the same bits.
// store_out's rounding of v to bf16 (nearest even, NaN -> 0x7FC0), as the low 16 bits.
inline uint32_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (v != v) ? 0x7FC0u : r;
}

template <bool interleaved>
inline void rotate_bf16_swapped(const c10::BFloat16* x, c10::BFloat16* y, int64_t half, const CSTable<float>& cs) {
  const float *c1 = cs.c1, *c2 = cs.c2, *s1 = cs.s1, *s2 = cs.s2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    float a, b, ya, yb;
    if constexpr (interleaved) {
      uint32_t w;
      std::memcpy(&w, x + 2 * i, 4);
      const uint32_t ua = w << 16, ub = w & 0xFFFF0000u;
      std::memcpy(&a, &ua, 4);
      std::memcpy(&b, &ub, 4);
    } else {
      a = load_acc<c10::BFloat16, float>(x + i);
      b = load_acc<c10::BFloat16, float>(x + half + i);
    }
    rotate_pair(a, b, PairCS<float>{c1[i], c2[i], s1[i], s2[i]}, ya, yb);
    if constexpr (interleaved) {
      store_out<c10::BFloat16, float>(y + i, ya);
      store_out<c10::BFloat16, float>(y + half + i, yb);
    } else {
      const uint32_t w = bf16_bits(ya) | (bf16_bits(yb) << 16);
      std::memcpy(y + 2 * i, &w, 4);
    }
  }
}

template <typename scalar_t, typename acc_t, bool interleaved>
inline void rotate_row_swapped(const scalar_t* x, scalar_t* y, int64_t sxd, int64_t syd, int64_t D, int64_t half,
                               bool copy_pass, const CSTable<acc_t>& cs, bool same, const CpuIsa& isa) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    if (sxd == 1 && syd == 1) {
      rotate_bf16_swapped<interleaved>(x, y, half, cs);
      if (copy_pass) std::memcpy(y + 2 * half, x + 2 * half, (D - 2 * half) * sizeof(scalar_t));
      return;
    }
  }
  if (2 * half <= kSwapRow && (interleaved ? sxd == 1 : syd == 1)) {
    scalar_t buf[kSwapRow];
    if constexpr (interleaved) {  // de-interleave x, rotate half-split into y
      deinterleave_row(x, buf, half);
      rotate_row<scalar_t, acc_t, false>(buf, y, 1, syd, 2 * half, half, false, cs, same, isa);
    } else {  // rotate half-split into the buffer, interleave it into y
      rotate_row<scalar_t, acc_t, false>(x, buf, sxd, 1, 2 * half, half, false, cs, same, isa);
      interleave_row(buf, y, half);
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      acc_t y1, y2;
      rotate_pair(load_acc<scalar_t, acc_t>(x + pair_first(i, interleaved) * sxd),
                  load_acc<scalar_t, acc_t>(x + pair_second(i, half, interleaved) * sxd), cs.at(i), y1, y2);
      store_out<scalar_t, acc_t>(y + pair_first(i, !interleaved) * syd, y1);
      store_out<scalar_t, acc_t>(y + pair_second(i, half, !interleaved) * syd, y2);
    }
  }
  if (copy_pass) {
    for (int64_t j = 2 * half; j < D; ++j) y[j * syd] = x[j * sxd];
  }
}

// Do o's rows have a kernel that rotates many rows a call (rotate_rows)? Rotate-half rows with a
// contiguous head dim on CPUs with AVX-512F: bf16 with AVX512-BF16 R a multiple of 64 or under 192
// (rotate_bf16_tokens_avx512bf16; bf16_rows_tail), without it R = 64 or 128 (rotate_tokens_avx512);
// fp32 of R up to 128, fp16 of R from 32 to 128 (rotate_tokens_avx512; fp16 2x faster than a row
// at a time through the F16C buffer, 512 and 2048 tokens, every layout). The other rows are taken
// one by one (rotate_row). Rows of other spans than R = 64, 128 against one by one (where a row's
// last pairs were also taken one by one), 512 tokens, 1 thread, transformers' layout, forward / in
// place, ms: head dim 80 (Hq = Hk = 32) bf16 0.70 / 0.69 -> 0.29 / 0.27, fp16 0.61 / 0.59 ->
// 0.30 / 0.29, fp32 0.46-0.57 / 0.31 -> 0.37-0.46 / 0.26; R = 32 of D = 80 bf16 0.35 / 0.27 ->
// 0.19 / 0.15, fp16 0.44 / 0.34 -> 0.17 / 0.11, fp32 0.50 / 0.23 -> 0.49 / 0.17; head dim 96 (Hq =
// 32, Hk = 8) bf16 0.34 / 0.33 -> 0.20 / 0.19, fp16 0.46 / 0.44 -> 0.19 / 0.19, fp32 0.34 / 0.19 ->
// 0.26-0.30 / 0.15; R = 16 of D = 64 bf16 0.61 / 0.58 -> 0.13 / 0.11, fp32 0.18 / 0.13 -> 0.18 /
// 0.10. Interleaved (GPT-J) rows with a contiguous head dim on CPUs with AVX-512F: R = 64 or 128,
// fp32 and fp16 R from 32 to 128 (rotate_tokens_avx512's kInterleaved: a row's pairs split into
// x1's and x2's values by permutes, the same arithmetic), bf16 with AVX512-BF16 through vdpbf16ps
// (bf16_interleaved_tokens): Llama-3-8B's q + k, 512 tokens, forward, bf16 0.96 -> 0.17 ms (0.62
// through kInterleaved; 0.28 with the tables built pair by pair), fp16 0.79 -> 0.52, fp32
// 0.50-0.51 either way (bf16's rotate-half rows: 0.17). On CPUs with AVX2 and F16C, the rows
// avx2_rows names go through rotate_tokens_avx2.
#ifdef RK_HAVE_AVX512_BF16_PATH
// Rows (of R = 2 * half) that rotate_tokens_avx2 takes: on CPUs without AVX-512, rotate-half rows
// of R a multiple of 16 and interleaved ones up to kAvx2InterleavedPairs pairs; with AVX-512,
// some rotate-half rows that no AVX-512 rows kernel takes whole, which went row by row (512
// tokens, 1 thread, ms): fp32 and fp16 of R over 128 but 256 (16 + 8 heads of 192: fp32
// 0.69 -> 0.42, in place 0.28 -> 0.23; fp16 0.47 -> 0.24, 0.46 -> 0.23), bf16 without
// AVX512-BF16 of R = 16k + 8, whose last 8 pairs rotate_avx512 took one by one (Phi-2's head dim
// 80: 0.70 -> 0.48; R = 96 and 256, all 16-pair steps: within 5% either way, left to it).
template <typename scalar_t, bool interleaved>
inline bool avx2_rows(int64_t half, const CpuIsa& isa) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, float> ||
                std::is_same_v<scalar_t, c10::Half>) {
    if (half % 8 != 0 || !isa.avx2) return false;
    if (!isa.avx512) return !interleaved || half <= kAvx2InterleavedPairs;
    if constexpr (interleaved) return false;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return !isa.avx512bf16 && half % 16 != 0;
    return half > 64 && half != 128;
  }
  (void)half, (void)isa;
  return false;
}
#endif

template <typename scalar_t, bool interleaved, bool swap>
inline bool rows_at_once(const Operand<scalar_t>& o, int64_t half, const CpuIsa& isa) {
#ifdef RK_HAVE_AVX512_BF16_PATH
  if constexpr (interleaved || swap) {  // (rotate_tokens_avx512's kInterleaved, kSwap; bf16_pair_rows)
    if (o.sx.d != 1 || o.sy.d != 1) return false;
    if (!isa.avx512) return !swap && avx2_rows<scalar_t, interleaved>(half, isa);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return half == 32 || half == 64;
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::Half>) {
      return half >= 16 && half <= 64;
    }
    return false;
  }
  if constexpr (!interleaved && !swap) {
    if (o.sx.d != 1 || o.sy.d != 1) return false;
    if (avx2_rows<scalar_t, false>(half, isa)) return true;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return isa.avx512bf16 ? half % 32 == 0 || half < 96 : isa.avx512 && (half == 32 || half == 64);
    }
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::Half>) {
      return isa.avx512 && ((half <= 64 && (half >= 16 || std::is_same_v<scalar_t, float>)) || half == 128);
    }
  }
#endif
  (void)o, (void)half, (void)isa;
  return false;
}

// Does a head-major walk's group of nh heads x -> y (rows of `half` pairs) go through rotate_rows
// unrolled (see there)? Groups of 4 out of place; bf16 rows on the AVX512-BF16 kernel only where it
// unrolls them (R = 64 or 128, and any R under 128: bf16_token_rows), and there in place too, as
// that kernel loads all 4 rows before it stores any (bf16_rows_avx512bf16, bf16_rows_tail: head
// dim 80, 512 tokens, 1 thread, in place 0.368 -> 0.286-0.296 ms, forward 0.366 -> 0.317-0.323,
// against 0.30-0.34 token-major). In place from memory, side by side (2048
// tokens; the two A/A runs' range before the arrow): 1 thread 1.204-1.218 -> 1.073 ms,
// 1.487-1.524 -> 1.220 (an earlier measurement, 4-10% slower unrolled, did not hold up here),
// 2 threads 0.876-0.955 -> 0.844.
template <typename scalar_t>
inline bool rows_unrolled(const scalar_t* x, const scalar_t* y, int64_t nh, int64_t half, const CpuIsa& isa) {
  if (nh != 4) return false;
  if (std::is_same_v<scalar_t, c10::BFloat16> && isa.avx512bf16) return half <= 64;
  return x != y;
}

// Rows x + xo[b] + r * o.sx.h (y + yo[b] + r * o.sy.h) of tokens b in [0, n_tok) and heads r in
// [0, nh), token b's rotated with table row cs[b], in one call; only for operands that
// rows_at_once accepts. unrolled: nh is 4, a head-major group that rows_unrolled unrolls.
template <typename scalar_t, typename acc_t, bool interleaved, bool swap>
inline void rotate_rows(const Operand<scalar_t>& o, const scalar_t* x, scalar_t* y, const int64_t* xo,
                        const int64_t* yo, int64_t n_tok, int64_t nh, int64_t D, int64_t half,
                        const CSTable<acc_t>* cs, bool same, const CpuIsa& isa, const WalkPrefetch& pf,
                        bool unrolled = false) {
#ifdef RK_HAVE_AVX512_BF16_PATH
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, float> ||
                std::is_same_v<scalar_t, c10::Half>) {
    // 4 rows a token (a head-major walk's group of heads, rows_unrolled): the row loop unrolled, each
    // row's loads their own instructions, which from token to token step by one row: a constant
    // stride per instruction, what the CPU's stride prefetcher follows (one loop over the 4 rows
    // jumps between their runs). 512 tokens of [B, H, S, D], 1 thread, side by side (one process,
    // the order of the variants rotated each round; loop -> unrolled, ms): fp32 forward 0.398 ->
    // 0.353, backward 0.470 -> 0.370; fp16 0.177 -> 0.175, 0.208 -> 0.200; bf16 (AVX512-BF16)
    // forward 0.156 -> 0.138, in place 0.113 -> 0.103, backward 0.180 -> 0.165 with the loads
    // unrolled too (bf16_rows_avx512bf16; unrolled a row at a time it was slower than the loop:
    // 0.177, 0.115, 0.198). In place the loop stays but for that bf16 kernel (fp32 unrolled in
    // place: 5% slower at 2048 tokens).
    // The pass-through elements of a partial span (out of place): bytes per row, which the rows
    // kernels copy as they go (copy_bytes).
    const int64_t rest = o.copy_pass ? (D - 2 * half) * static_cast<int64_t>(sizeof(scalar_t)) : 0;
    auto run = [&](auto same_tag, auto n_tag) {
      constexpr bool kSame = decltype(same_tag)::value;
      constexpr int kN = decltype(n_tag)::value;
      if constexpr (!swap) {
        if (avx2_rows<scalar_t, interleaved>(half, isa)) {
          constexpr bool kI = interleaved;
          if (pf.stream) {
            rotate_tokens_avx2<scalar_t, kSame, kN, true, kI>(x, y, xo, yo, n_tok, nh, o.sx.h, o.sy.h, cs, pf, half,
                                                              rest);
          } else {
            rotate_tokens_avx2<scalar_t, kSame, kN, false, kI>(x, y, xo, yo, n_tok, nh, o.sx.h, o.sy.h, cs, pf, half,
                                                               rest);
          }
          return;
        }
      }
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && !interleaved && !swap) {
        if (isa.avx512bf16) {
          rotate_bf16_tokens_avx512bf16<kSame, kN>(x, y, xo, yo, n_tok, nh, o.sx.h, o.sy.h, half, cs, pf, rest);
          return;
        }
      }
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && (interleaved || swap)) {
        if (isa.avx512bf16) {  // (half 32 or 64: rows_at_once)
          // swap_layout rows (MLA's rope): interleaved x into half-split y, or (its backward)
          // half-split x into interleaved y.
          constexpr bool kReadHalves = !interleaved, kWriteHalves = interleaved == swap;
          bf16_pair_rows<kReadHalves, kWriteHalves>(x, y, xo, yo, n_tok, nh, o.sx.h, o.sy.h, half, cs, pf, rest);
          return;
        }
        if constexpr (interleaved && !swap) {  // (AVX-512F without AVX512-BF16)
          by_regs_and_stream(half, pf, [&](auto regs, auto stream) {
            bf16_interleaved_tokens_avx512<decltype(regs)::value, decltype(stream)::value>(
                x, y, xo, yo, n_tok, nh, o.sx.h, o.sy.h, cs, pf, rest);
          });
          return;
        }
      }
      // (kI: x's pairs interleaved; swap: y's in the other layout)
      constexpr bool kI = interleaved;
      if (half == 64) {
        rotate_tokens_avx512<scalar_t, kSame, 4, kN, false, kI, swap>(x, y, xo, yo, n_tok, nh, o.sx.h, o.sy.h, cs, pf,
                                                                      rest);
      } else if (half == 32) {
        rotate_tokens_avx512<scalar_t, kSame, 2, kN, false, kI, swap>(x, y, xo, yo, n_tok, nh, o.sx.h, o.sy.h, cs, pf,
                                                                      rest);
      } else if (half == 128) {  // (head dim 256, rotate-half fp32 and fp16 only: rows_at_once)
        if constexpr (!kI && !swap && !std::is_same_v<scalar_t, c10::BFloat16>) {
          rotate_tokens_avx512<scalar_t, kSame, 8, kN>(x, y, xo, yo, n_tok, nh, o.sx.h, o.sy.h, cs, pf, rest);
        }
      } else if constexpr (!std::is_same_v<scalar_t, c10::BFloat16>) {
        rotate_tokens_avx512_any<scalar_t, kSame, kN, kI, swap>(x, y, xo, yo, n_tok, nh, o.sx.h, o.sy.h, cs, pf, rest,
                                                                half);
      }
    };
    using Loop = std::integral_constant<int, 0>;
    using Four = std::integral_constant<int, 4>;
    if (same) {
      unrolled ? run(std::true_type{}, Four{}) : run(std::true_type{}, Loop{});
    } else {
      unrolled ? run(std::false_type{}, Four{}) : run(std::false_type{}, Loop{});
    }
    return;
  }
#endif
  (void)o, (void)x, (void)y, (void)xo, (void)yo, (void)n_tok, (void)nh, (void)D, (void)half, (void)cs, (void)same,
      (void)isa, (void)pf;
  TORCH_INTERNAL_ASSERT(false, "rotary: rotate_rows on rows without a rows kernel");
}

template <typename scalar_t, typename cs_t>
struct CpuParams {
  Operand<scalar_t> ops[2];
  int n_ops;
  const cs_t* cp;
  const cs_t* sp;
  CSStrides sc, ss;
  const cs_t* ckp;  // k's own tables (cos_k/sin_k) when k_tables
  const cs_t* skp;
  CSStrides sck, ssk;
  bool k_tables;
  int tset[2];  // the table set (0: cos/sin, 1: cos_k/sin_k) each operand reads
  bool pair_tables;  // tables [..., R/2]: one entry per pair (rotary_math.h table_index)
  TokenIndex ti;
  int64_t S, D, half;
  bool conj;
  CpuIsa isa;
  bool prefetch;  // large enough to stream from memory (software prefetch pays off)
};

#if defined(RK_X86_SIMD) && defined(__linux__)
#define RK_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), flatten))
#else
#define RK_CPU_CLONES
#endif

// Loop order (issue 19). A thread's tokens [begin, end) are taken a block at a time: the
// block's cos/sin tables are built once, then the rows are walked in the order they lie in
// memory, picked from the canonical strides:
//   - token-major operands (|stride h| <= |stride s|: [B, S, H, D], packed tokens [T, H, D],
//     slices of a packed qkv, transformers' transposed view of [B, S, H, D]): blocks of kTokBlock
//     tokens (tables of kTokBlock * R accumulator values: 32 KB for R = 128 in fp32, held in L1
//     while the block's rows read them), or where the walk prefetches rows ahead (rows taken at
//     once, from memory, or fp32 rows with gaps), kTokBlockRowsAhead (fewer switches between
//     q's and k's streams); token outer, then q's heads, then k's, which is memory order for a
//     packed qkv too; where both operands' rows are taken at once (rotate_rows), q's block of
//     tokens then k's, one call each (512 tokens: bf16 4-7% faster out of place, 13-17% in
//     place, fp32 qkv slices 1.2x out of place; 2048: the same within 5%), not two calls a token;
//   - head-major operands (contiguous [B, H, S, D]): blocks of kTokBlockHeadMajor tokens, heads
//     outer, tokens inner, so that a head's rows of the block are one contiguous run, whereas
//     walking one token across all heads jumps S*D elements per head, one stream per head (40
//     for Llama-3's q + k), more than the hardware prefetchers follow (3-5x slower here). Each
//     row reads its own token's table row (for bf16 twice the row's bytes), so the tables are
//     taken from L2 (256 tokens: 128-256 KB) and a few heads walk their runs side by side, each
//     table row serving all of them: longer runs and a fraction of the table traffic.
//     kHeadsAtOnce for rows taken one by one (at 2048 tokens ~20-25% faster than 32-token
//     blocks one head at a time; more heads: slower), kHeadsAtOnceRows for rows taken a token's
//     heads at a time (rotate_rows: the table chunk in registers serves them all, one call for
//     all: bf16 2 heads rather than 4 1.3x slower in place, 1.1-1.25x out of place, 1 and 2
//     threads).
// Gaps in the walk (a qkv slice skips v; a head-major block's run of a head ends every block) stall
// the hardware prefetchers, so rows with a contiguous head dim are also prefetched in software:
// token-major walks fetch each row one token ahead, or where their rows are taken at once,
// kPrefetchAheadRows bytes of rows later in the walk, on into the next block (2048 tokens, 1
// thread, side by side against one token ahead
// in 32-token blocks: fp32 forward 1.65-1.86 -> 1.50-1.65 ms, backward 1.78 -> 1.63-1.67, in place
// [B, S, H, D] 1.18 -> 1.05; bf16 forward 0.63-0.67 -> 0.59-0.61, in place 0.44-0.52 -> 0.41-0.48;
// 16 KB ahead: within noise of 8 KB, the 128-token blocks alone a third of the gain), head-major
// walks kPrefetchBytes (kPrefetchBytesRows) ahead in each head's run, on into the next heads' runs
// (2-4x on a qkv slice and on [B, H, S, D] here, ~10% on the dense layouts; fp32 rows 8 KB ahead
// rather than 4 KB: [B, H, S, D] at 2048 tokens ~15% faster; 4 bf16 heads 8 KB ahead overflow L1:
// out of place 1.25-1.45x slower than 2 KB).
// Tried and dropped: walking [B, H, S, D] token-major while it sits in L3 (under 8 MB): 7-12%
// faster at 512 tokens on prepared outputs, but forward+backward through the API 1.6x slower
// (a head stride of S * D * 2 = 128 KB puts every head's row of a token in the same cache sets);
// bf16 groups of 8 heads out of place (two groups of 4 loaded rows per table row): forward 0.149
// -> 0.160 ms, backward 0.176 -> 0.199 (512 tokens); head-major blocks of 64, 128 or 512 tokens
// with the unrolled rows: within 3% of 256.
// Each row is read and written once whatever the order, with the same arithmetic: the order
// changes the speed only, never a bit of the result.
constexpr int64_t kTokBlock = 32;
constexpr int64_t kTokBlockRowsAhead = 128;  // token-major walks that prefetch rows ahead
constexpr int64_t kPrefetchAheadRows = 8192;  // their prefetch distance, in bytes of rows
constexpr int64_t kTokBlockHeadMajor = 256;
constexpr int64_t kHeadsAtOnce = 2;          // rows taken one by one (rotate_row)
constexpr int64_t kPrefetchBytes = 8192;     // ahead in each of their runs
constexpr int64_t kHeadsAtOnceRows = 4;      // rows taken together (rotate_rows)
constexpr int64_t kPrefetchBytesRows = 2048;
constexpr int64_t kPrefetchMin = int64_t{16} << 20;
static_assert(kHeadsAtOnceRows == 4, "rotate_rows unrolls groups of 4 rows (rows_unrolled)");

// Do all of y's rows, and their second halves (`half` elements in), start on a 64-byte boundary?
// Then so does every piece the row kernels store (their rows have a unit head-dim stride; rows
// with a masked last step, bf16_rows_tail, fail the second test): what non-temporal stores need.
template <typename scalar_t>
inline bool aligned64(const scalar_t* y, const Strides4& sy, int64_t half) {
  constexpr int64_t kElems = 64 / static_cast<int64_t>(sizeof(scalar_t));
  return reinterpret_cast<uintptr_t>(y) % 64 == 0 && sy.a % kElems == 0 && sy.s % kElems == 0 &&
         sy.h % kElems == 0 && half % kElems == 0;
}

// Are x's heads its outer dimension (rather than the tokens)? The output's layout decides when
// x's does not (a broadcast x with zero strides, or S == 1 or H == 1).
template <typename scalar_t>
inline bool heads_outer(const Operand<scalar_t>& o) {
  auto mag = [](int64_t v) { return v < 0 ? -v : v; };
  const int64_t xh = mag(o.sx.h), xs = mag(o.sx.s);
  if (xh != xs) return xh > xs;
  return mag(o.sy.h) > mag(o.sy.s);
}

// This thread's table buffer, at least n values, kept between calls: a block allocated per
// call (32 KB a token-major block of R = 128 in fp32, 256 KB a head-major one) may be freshly
// mapped or trimmed memory whose pages fault in again (glibc's thresholds move with what else
// the process allocates): measured 20-25% of a bf16 call at 512-2048 tokens here. Entries are
// written before they are read.
template <typename acc_t>
acc_t* table_scratch(int64_t n) {
  thread_local std::vector<acc_t> scratch;
  if (static_cast<int64_t>(scratch.size()) < n) scratch.resize(n);
  return scratch.data();
}

// Are b's heads the heads after a's, in x and in y (same strides, b's first head one head past
// a's last)? Then a and b are walked as one operand of a.H + b.H heads: for the q and k slices of
// a packed qkv rotated in place, a token's q and k rows are one run rather than two walks, each
// with its gaps (fp32, 512 tokens, in place, 1 thread, side by side: 0.231 -> 0.217 ms; packed
// tokens without gaps 0.197; 2048 tokens, bf16 512 tokens: within noise).
template <typename scalar_t>
inline bool heads_follow(const Operand<scalar_t>& a, const Operand<scalar_t>& b) {
  auto same = [](const Strides4& u, const Strides4& v) { return u.a == v.a && u.s == v.s && u.h == v.h && u.d == v.d; };
  return same(a.sx, b.sx) && same(a.sy, b.sy) && a.copy_pass == b.copy_pass && b.x == a.x + a.H * a.sx.h &&
         b.y == a.y + a.H * a.sy.h;
}

// Do consecutive tokens' rows of operand o (tokens outer) leave gaps in x, or out of place in y?
// Slices of a packed qkv do (q's rows skip k's and v's): the gaps stop the CPU's stream
// prefetchers, so such walks prefetch in software from the caches too (prefetch_from_caches).
template <typename scalar_t>
inline bool token_gaps(const Operand<scalar_t>& o, int64_t D) {
  const bool x_gaps = o.sx.h != D || o.sx.s != o.H * D;
  const bool y_gaps = o.sy.h != D || o.sy.s != o.H * D;
  return x_gaps || (o.y != o.x && y_gaps);
}

// Does a walk over operand o's rows (heads outer or tokens outer) that prefetches them (from
// memory, or a token-major walk with gaps: see prefetch_from_caches) prefetch into L2 only
// (RowPrefetch::l2) rather than into L1? A software prefetch into L1 is held to the few lines L1
// can have in flight; into L2 many more fly, but the lines are not in L1 when the row is read.
// Measured side by side (one process, order rotated, tensors placed anew each round; Zen 4,
// 2048 tokens, 1 thread unless said):
// - fp32 rows, every walk. From memory (kPrefetchMin), [B, H, S, D] forward
//   2.92-3.06 -> 2.68-2.73 ms, in place 3.09-3.11 -> 1.98-2.05, backward 2.95 -> 2.75-2.77 (2
//   threads: 2.28-2.38 -> 1.70-1.86, 1.85-1.97 -> 1.15-1.23, 2.38-2.60 -> 1.93-2.14); packed
//   tokens and [B, S, H, D] forward 3.17-3.34 -> 2.86-3.11, in place 2.30-2.52 -> 1.83-2.06,
//   backward 3.41-3.47 -> 2.97-3.28 (2 threads: within noise). 16-bit rows from memory stay in
//   L1 (into L2: within noise, or up to 9% slower head-major).
// - Token-major walks with gaps (token_gaps), whatever the size. bf16 qkv slices forward 2.42 ->
//   1.49 ms, in place 2.52 -> 1.55 (packed tokens, no gaps: 1.44, 1.22).
template <typename scalar_t>
inline bool prefetch_into_l2(const Operand<scalar_t>& o, int64_t D, bool head_major) {
  return std::is_same_v<scalar_t, float> || (!head_major && token_gaps(o, D));
}

// Does a walk over operand o's rows that come from the caches (q + k under kPrefetchMin) prefetch
// them in software, where it would from memory? Only a token-major walk with gaps (token_gaps: fp32
// qkv slices in place at 512 tokens 0.276 -> 0.314 ms without); 16-bit rows from the caches are
// not prefetched at all (5-16% slower with the fp32 rows' prefetches). Without gaps the hardware
// prefetchers keep up and the software ones cost more than they save, in place and out of place,
// head-major and token-major. Side by side, 2026-11-27, Zen 4, 1 thread unless said:
// - out of place (one process, prefetched and not alternated in shuffled order, three runs,
//   Llama-3-8B q + k, ms): fp32 512 tokens, transposed view forward 0.478-0.616 -> 0.388-0.528,
//   backward 0.570-0.801 -> 0.502-0.646; [B, S, H, D] forward 0.510-0.643 -> 0.412-0.505;
//   [B, H, S, D] forward 0.495-0.642 -> 0.412-0.515, backward 0.627-0.788 -> 0.497-0.658; 256
//   tokens view forward 0.192 -> 0.173, [B, H, S, D] 0.227 -> 0.190; 2 threads [B, H, S, D] 512
//   tokens forward 0.289 -> 0.237, backward 0.385 -> 0.310, fp16 0.178 -> 0.141, 0.240 -> 0.184;
//   bf16 unchanged (its token-major rows were not prefetched, nor its unrolled head-major groups
//   of 4). The minimal C loop of the same walk, in the same process: 0.375-0.43 ms at 512
//   tokens, about what the package now runs. (When these prefetches landed, on this VM with
//   other neighbours, they measured 5-20% faster: the balance moves with how busy the shared L3
//   is.)
// - in place (A/A pairs within 2%): fp32 [B, H, S, D] 512 tokens 0.325 -> 0.263 ms at 1 thread,
//   0.173 -> 0.141 at 2; 256 tokens 0.155 -> 0.128 (2 threads 0.090 -> 0.077), 128 0.088 -> 0.074;
//   fp16 512 tokens 0.269 -> 0.255; bf16 without AVX512-BF16 0.511 -> 0.476; fp32 [B, S, H, D] and
//   packed tokens 512 tokens 0.265 -> 0.219 (2 threads 0.120 -> 0.108), 256 0.118 -> 0.107, 128
//   0.068 -> 0.060.
// From memory (kPrefetchMin) they stay: head-major in place without them, bf16 2048 tokens 1.12
// -> 1.44 ms; token-major out of place 5-10% slower without.
template <typename scalar_t>
inline bool prefetch_from_caches(const Operand<scalar_t>& o, int64_t D) {
  return token_gaps(o, D);
}

// Tokens [begin, end): per block, the cos/sin tables, then every row of q and k. Returns -1, or
// the first token whose position lies outside the cos/sin cache (the tokens before it are
// done, nothing is written for it).
template <typename scalar_t, typename cs_t, bool interleaved, bool swap>
RK_CPU_CLONES int64_t rotate_tokens(const CpuParams<scalar_t, cs_t>& p, int64_t begin, int64_t end) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t half = p.half;
  const int n_axes = p.ti.mrope ? 3 : 1;
  bool outer[2] = {false, false}, at_once[2] = {false, false}, stream[2] = {false, false}, all_token_major = true,
       all_at_once = true, gaps = false;
  bool prefetch = p.prefetch;
  for (int k = 0; k < p.n_ops; ++k) {
    const Operand<scalar_t>& o = p.ops[k];
    outer[k] = heads_outer(o);
    // Out of place from kPrefetchMin bytes (y does not stay in the caches), rows taken at once
    // write y with non-temporal stores: no read of each y line before it is written, no
    // eviction of x's lines to make room (2048 tokens, outputs fresh from the allocator as in
    // use, 1-2 threads here: bf16 1.2-1.5x faster, fp32 1.4-1.8x; below kPrefetchMin, where y
    // stays in L3 for whatever reads it next, 1.6x slower at 2 threads).
    at_once[k] = rows_at_once<scalar_t, interleaved, swap>(o, half, p.isa);
    stream[k] = at_once[k] && p.prefetch && o.x != o.y && aligned64(o.y, o.sy, half);
    all_token_major = all_token_major && !outer[k];
    all_at_once = all_at_once && at_once[k];
    prefetch = prefetch && o.sx.d == 1 && o.sy.d == 1;
    gaps = gaps || prefetch_from_caches(o, p.D);
  }
  // Token-major walks whose rows are taken at once fetch the row ahead_rows later
  // (kPrefetchAheadRows), which may lie up to `extra` tokens past the block (their offsets are set
  // up with the block's): from kPrefetchMin bytes, and below it fp32 rows with gaps
  // (prefetch_from_caches).
  const bool rows_ahead = all_token_major && all_at_once && (prefetch || (std::is_same_v<scalar_t, float> && gaps));
  const int64_t tb = std::min<int64_t>(
      all_token_major ? (rows_ahead ? kTokBlockRowsAhead : kTokBlock) : kTokBlockHeadMajor, end - begin);
  const int64_t row_bytes = p.D * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t ahead_rows = (kPrefetchAheadRows + row_bytes - 1) / row_bytes;
  int64_t extra = 0;
  for (int k = 0; k < p.n_ops && rows_ahead; ++k) extra = std::max<int64_t>(extra, ahead_rows / p.ops[k].H + 1);
  const int64_t tbx = tb + extra;  // per operand: the block's offsets, then the next tokens'
  // The tables: per token four runs c1, c2, s1, s2 in buf, or where c2 and s2 equal c1 and s1 bit
  // for bit (the usual cos/sin cache, cat(freqs, freqs): checked per token, on the source rows
  // where they are plain: table_row) two, c2 and s2 pointing at them. A block whose tokens all have
  // equal runs is rotated with `same` (see rotate_contig).
  // Table set t of token b of the block is entry t * tb + b (set 1: k's own tables).
  const int n_sets = p.k_tables ? 2 : 1;
  acc_t* const buf = table_scratch<acc_t>(n_sets * tb * 4 * half);
  std::vector<CSTable<acc_t>> tab(n_sets * tb);
  // bf16 rows all taken by the AVX512-BF16 rows kernel, with bf16 cos/sin: the tables' vdpbf16ps
  // lanes (2 * half a token, bf16_dp_step32), for the plain rows below, in place of the
  // accumulator tables (a token whose values do not allow them gets those instead).
#ifdef RK_HAVE_AVX512_BF16_PATH
  uint32_t* pairs = nullptr;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<cs_t, c10::BFloat16>) {
    if (p.isa.avx512bf16 && all_at_once) {
      pairs = table_scratch<uint32_t>(n_sets * tb * 2 * half);
    }
  }
#endif
  // Per operand and token of the block (then `extra` tokens past it): the offsets of its row
  // (a, s, h = 0, d = 0) in x and y.
  std::vector<int64_t> xoff(2 * tbx), yoff(2 * tbx);
  // Rotate-half pairs from one contiguous cos/sin row (no mrope): the table row is two
  // contiguous runs of each, converted in loops the compiler vectorises (the general loop below
  // costs ~90 ns more a token here, 16% of a 512-token bf16 call).
  // Per-pair tables, either layout, the same: each pair's cos and sin for both of its values; their
  // rows also strided, up to kMaxGatheredPairs (a complex table's real and imaginary parts, as
  // Llama 4's freqs_cis: bf16 q + k of Llama-3-8B's shape at 512 tokens, 1 thread, 0.31 -> 0.24-0.25
  // ms against the general loop below).
  constexpr int64_t kMaxGatheredPairs = 256;
  const bool plain_rows = (!interleaved || p.pair_tables) && !p.ti.mrope;  // (and the set's rows contiguous: below)

  int64_t a = begin / p.S, s = begin % p.S;  // the next token to set up, stepped (no divisions)
  int64_t bad = -1;
  for (int64_t t0 = begin; t0 < end && bad < 0; t0 += tb) {
    int64_t n = std::min<int64_t>(tb, end - t0);
    bool same = true;  // the block's tokens all have equal runs (c2 = c1, s2 = s1)
    for (int64_t b = 0; b < n; ++b, s = (s + 1 == p.S) ? (++a, 0) : s + 1) {
      int64_t pos[3] = {0, 0, 0};
      for (int x = 0; x < n_axes && bad < 0; ++x) {
        pos[x] = token_position(p.ti, a, s, x);
        if (!position_ok(p.ti, pos[x])) bad = t0 + b;
      }
      if (bad >= 0) {
        n = b;  // rotate the block's tokens before the bad one, then report it
        break;
      }
      for (int k = 0; k < p.n_ops; ++k) {
        xoff[k * tbx + b] = offset4(p.ops[k].sx, a, s, 0, 0);
        yoff[k * tbx + b] = offset4(p.ops[k].sy, a, s, 0, 0);
      }
      for (int t = 0; t < n_sets; ++t) {  // set 1: k's own tables
        const cs_t *cp = t ? p.ckp : p.cp, *sp = t ? p.skp : p.sp;
        const CSStrides &sc = t ? p.sck : p.sc, &ss = t ? p.ssk : p.ss;
        const int64_t e = t * tb + b;
        acc_t* r = buf + e * 4 * half;
        tab[e] = {r, r + half, r + 2 * half, r + 3 * half};
        const bool strided_pairs = p.pair_tables && (sc.r != 1 || ss.r != 1) && half <= kMaxGatheredPairs;
        if (plain_rows && ((sc.r == 1 && ss.r == 1) || strided_pairs)) {
          // The four runs: c1, c2 = cos[0, half), cos[half, R); s1, s2 = sin[0, half), sin[half, R),
          // or with conj sin[half, R), sin[0, half), negated; pair tables: cos[0, half) and
          // sin[0, half) twice (negated with conj).
          const cs_t* c = cp + cs_offset(sc, 0, a, s, pos[0], 0);
          const cs_t* sn = sp + cs_offset(ss, 0, a, s, pos[0], 0);
          cs_t gathered[2 * kMaxGatheredPairs];
          if (strided_pairs) {  // (gathered into runs first: the general loop cost 2x the rotation)
            for (int64_t i = 0; i < half; ++i) {
              gathered[i] = c[i * sc.r];
              gathered[kMaxGatheredPairs + i] = sn[i * ss.r];
            }
            c = gathered;
            sn = gathered + kMaxGatheredPairs;
          }
          const int64_t hi = p.pair_tables ? 0 : half;
          const cs_t *c1 = c, *c2 = c + hi, *s1 = sn + (p.conj ? hi : 0), *s2 = sn + (p.conj ? 0 : hi);
#ifdef RK_HAVE_AVX512_BF16_PATH
          if constexpr (std::is_same_v<cs_t, c10::BFloat16>) {
            uint32_t* pr = pairs ? pairs + e * 2 * half : nullptr;
            bool same_runs = false;
            if (pr && bf16_pair_table(c1, c2, s1, s2, p.conj, half, pr, &same_runs)) {
              tab[e].bf16_pairs = pr;
              same = same && same_runs;
              continue;
            }
          }
#endif
          tab[e] = table_row(c1, c2, s1, s2, p.conj, half, r, p.isa);
          same = same && tab[e].c2 == tab[e].c1 && tab[e].s2 == tab[e].s1;
          continue;
        }
        const bool plain_pairs = interleaved && !p.ti.mrope && sc.r == 1 && ss.r == 1;  // (!pair_tables: plain_rows)
        if (plain_pairs) {
          // Interleaved pairs from one contiguous cos/sin row (per-pair tables took the plain rows
          // above): pair i's values at 2i and 2i + 1 (make_pair_cs's conj rule).
          const cs_t* c = cp + cs_offset(sc, 0, a, s, pos[0], 0);
          const cs_t* sn = sp + cs_offset(ss, 0, a, s, pos[0], 0);
#ifdef RK_HAVE_AVX512_BF16_PATH
          if constexpr (std::is_same_v<cs_t, c10::BFloat16>) {
            // bf16 rows on AVX512-BF16 (pairs; so BW): the lanes of bf16_interleaved_tokens straight
            // from the rows, no fp32 table (that kernel's exact redo takes the values back from the
            // lanes); where they are refused, the fp32 table below.
            uint32_t* pr = pairs ? pairs + e * 2 * half : nullptr;
            if (pr && half % 16 == 0 && bf16_interleaved_pair_table(c, sn, p.conj, half, pr)) {
              tab[e].bf16_pairs = pr;
              continue;
            }
          }
#endif
          // The fp32 table in a loop the compiler vectorises rather than the general one below:
          // Llama-3-8B q + k, 512 tokens, 1 thread, forward, fp16 0.52 -> 0.45 ms, bf16 on AVX-512F
          // without AVX512-BF16 0.475 -> 0.40-0.41, fp32 0.54 -> 0.51.
          for (int64_t i = 0; i < half; ++i) {
            const acc_t s_even = load_acc<cs_t, acc_t>(sn + 2 * i), s_odd = load_acc<cs_t, acc_t>(sn + 2 * i + 1);
            r[i] = load_acc<cs_t, acc_t>(c + 2 * i);
            r[half + i] = load_acc<cs_t, acc_t>(c + 2 * i + 1);
            r[2 * half + i] = p.conj ? -s_odd : s_even;
            r[3 * half + i] = p.conj ? -s_even : s_odd;
          }
        } else {
          for (int64_t i = 0; i < half; ++i) {  // (j1, j2: the pair's two table entries)
            const int64_t j1 = table_index(pair_first(i, interleaved), half, interleaved, p.pair_tables),
                          j2 = table_index(pair_second(i, half, interleaved), half, interleaved, p.pair_tables);
            const int x = pair_axis(p.ti, i);
            const cs_t* c = cp + cs_offset(sc, x, a, s, pos[x], 0);
            const cs_t* sn = sp + cs_offset(ss, x, a, s, pos[x], 0);
            const PairCS<acc_t> pc = make_pair_cs<acc_t>(
                load_acc<cs_t, acc_t>(c + j1 * sc.r), load_acc<cs_t, acc_t>(c + j2 * sc.r),
                load_acc<cs_t, acc_t>(sn + j1 * ss.r), load_acc<cs_t, acc_t>(sn + j2 * ss.r), p.conj);
            r[i] = pc.c1;
            r[half + i] = pc.c2;
            r[2 * half + i] = pc.s1;
            r[3 * half + i] = pc.s2;
          }
        }
        if (std::memcmp(r, r + half, half * sizeof(acc_t)) == 0 &&
            std::memcmp(r + 2 * half, r + 3 * half, half * sizeof(acc_t)) == 0) {
          tab[e].c2 = r;
          tab[e].s2 = r + 2 * half;
        } else {
          same = false;
        }
#ifdef RK_HAVE_AVX512_BF16_PATH
        if constexpr (interleaved && std::is_same_v<cs_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
          // (bf16 interleaved rows: bf16_interleaved_tokens' lanes, besides the fp32 table, for the
          // tables the plain pairs above did not try: mrope, strided rows)
          uint32_t* pr = pairs && !plain_pairs ? pairs + e * 2 * half : nullptr;
          if (pr && bf16_pair_table_from(r, half, pr)) tab[e].bf16_pairs = pr;
        }
#endif
      }
    }

    int64_t n_off = n;  // tokens with offsets: the block's, then up to `extra` past it
    for (int64_t a2 = a, s2 = s; n_off < n + extra && t0 + n_off < end && bad < 0;
         ++n_off, s2 = (s2 + 1 == p.S) ? (++a2, 0) : s2 + 1) {
      for (int k = 0; k < p.n_ops; ++k) {
        xoff[k * tbx + n_off] = offset4(p.ops[k].sx, a2, s2, 0, 0);
        yoff[k * tbx + n_off] = offset4(p.ops[k].sy, a2, s2, 0, 0);
      }
    }

    if (all_token_major && !all_at_once) {
      // Token outer, then each operand's heads (rows taken one by one, or at once for one operand
      // only); each row prefetches the same row one token ahead.
      for (int64_t b = 0; b < n; ++b) {
        const bool pf_next = prefetch && b + 1 < n;
        for (int k = 0; k < p.n_ops; ++k) {
          const Operand<scalar_t>& o = p.ops[k];
          const int64_t xo = xoff[k * tbx + b], yo = yoff[k * tbx + b];
          const int64_t xn = xoff[k * tbx + b + pf_next], yn = yoff[k * tbx + b + pf_next];
          const CSTable<acc_t>& cs = tab[p.tset[k] * tb + b];
          if (at_once[k]) {
            rotate_rows<scalar_t, acc_t, interleaved, swap>(o, o.x, o.y, &xoff[k * tbx + b], &yoff[k * tbx + b], 1, o.H,
                                                            p.D, half, &cs, same, p.isa,
                                                            WalkPrefetch{pf_next ? 1 : 0, n - b, 0, 0, row_bytes, stream[k]});
            continue;
          }
          for (int64_t h = 0; h < o.H; ++h) {
            if (pf_next) prefetch_row(o.x + xn + h * o.sx.h, o.y + yn + h * o.sy.h, row_bytes);
            rotate_row<scalar_t, acc_t, interleaved, swap>(o.x + xo + h * o.sx.h, o.y + yo + h * o.sy.h, o.sx.d, o.sy.d,
                                                           p.D, half, o.copy_pass, cs, same, p.isa);
          }
        }
      }
    } else {
      // Per operand, in its own order (token-major: the block's rows, each prefetching the row
      // kPrefetchAheadRows later in the walk where rows_ahead, else its row one token ahead).
      for (int k = 0; k < p.n_ops; ++k) {
        const Operand<scalar_t>& o = p.ops[k];
        const int64_t* xo = xoff.data() + k * tbx;
        const int64_t* yo = yoff.data() + k * tbx;
        if (!outer[k]) {
          if (at_once[k]) {
            // (m = 0: d >= 1 tokens ahead, the same row; in a walk with a head-major operand, one)
            WalkPrefetch pf{rows_ahead ? ahead_rows / o.H : (prefetch ? 1 : 0), n_off, 0, 0, row_bytes, stream[k],
                            rows_ahead ? ahead_rows % o.H : 0, prefetch_into_l2(o, p.D, false)};
            if (!prefetch && !prefetch_from_caches(o, p.D)) pf.d = pf.m = 0;
            if (stream[k] && std::is_same_v<scalar_t, float>) pf.runs = 4;  // (see WalkPrefetch::runs)
            rotate_rows<scalar_t, acc_t, interleaved, swap>(o, o.x, o.y, xo, yo, n, o.H, p.D, half,
                                                            &tab[p.tset[k] * tb], same, p.isa, pf);
            continue;
          }
          for (int64_t b = 0; b < n; ++b) {
            const CSTable<acc_t>& cs = tab[p.tset[k] * tb + b];
            for (int64_t h = 0; h < o.H; ++h) {
              rotate_row<scalar_t, acc_t, interleaved, swap>(o.x + xo[b] + h * o.sx.h, o.y + yo[b] + h * o.sy.h, o.sx.d,
                                                             o.sy.d, p.D, half, o.copy_pass, cs, same, p.isa);
            }
          }
          continue;
        }
        // `heads` heads side by side: token b's rows of heads h0, h0 + 1, ..., then b + 1's; each
        // head's run prefetches `d` rows ahead, past the block's end into the run of the head
        // `heads` further.
        const int64_t heads = at_once[k] ? kHeadsAtOnceRows : kHeadsAtOnce;
        const int64_t ahead = at_once[k] ? kPrefetchBytesRows : kPrefetchBytes;
        // From memory only (prefetch_from_caches): there the heads' runs (of x and y) are more
        // streams than the hardware prefetchers follow.
        const int64_t d = prefetch ? std::min((ahead + row_bytes - 1) / row_bytes, n) : 0;  // rows ahead, in [0, n]
        for (int64_t h0 = 0; h0 < o.H; h0 += heads) {
          const int64_t h1 = std::min(h0 + heads, o.H);
          if (at_once[k]) {
            const scalar_t* x = o.x + h0 * o.sx.h;
            scalar_t* y = o.y + h0 * o.sy.h;
            const bool unrolled = rows_unrolled(x, y, h1 - h0, half, p.isa);
            const WalkPrefetch pf{d, n, heads, std::max<int64_t>(0, std::min(h1, o.H - heads) - h0), row_bytes,
                                  stream[k], 0, prefetch_into_l2(o, p.D, true)};
            rotate_rows<scalar_t, acc_t, interleaved, swap>(o, x, y, xo, yo, n, h1 - h0, p.D, half,
                                                            &tab[p.tset[k] * tb], same, p.isa, pf, unrolled);
            continue;
          }
          for (int64_t b = 0; b < n; ++b) {
            const CSTable<acc_t>& cs = tab[p.tset[k] * tb + b];
            const int64_t b2 = b + d < n ? b + d : b + d - n, dh = b + d < n ? 0 : heads;  // (b2, h + dh): prefetched
            for (int64_t h = h0; h < h1; ++h) {
              if (d > 0 && h + dh < o.H) {
                prefetch_row(o.x + xo[b2] + (h + dh) * o.sx.h, o.y + yo[b2] + (h + dh) * o.sy.h, row_bytes);
              }
              rotate_row<scalar_t, acc_t, interleaved, swap>(o.x + xo[b] + h * o.sx.h, o.y + yo[b] + h * o.sy.h, o.sx.d,
                                                             o.sy.d, p.D, half, o.copy_pass, cs, same, p.isa);
            }
          }
        }
      }
    }
  }
  if (stream[0] || stream[1]) stream_fence();
  return bad;
}

}  // namespace

// The kernel for q/k of scalar_t and cos/sin of cs_t (scalar_t, or float for 16-bit q/k);
// instantiated per dtype (RK_CPU_TYPED: the file comment).
template <typename scalar_t, typename cs_t>
void rotary_cpu_typed(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                      const at::Tensor& sin, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out,
                      bool interleaved, bool conj, const rotary_kernels::TokenIndexArgs& ix, const at::Tensor& cos_k,
                      const at::Tensor& sin_k, bool pair_tables, bool swap_layout) {
  CpuParams<scalar_t, cs_t> p{};
  p.S = q.size(1);
  p.D = q.size(3);
  p.half = pair_tables ? cos.size(-1) : cos.size(-1) / 2;
  p.conj = conj;
#ifdef RK_HAVE_F16C_PATH
  static const CpuIsa isa = cpu_isa();
  p.isa = isa;
#endif
  p.k_tables = !(same_view(cos_k, cos) && same_view(sin_k, sin));
  p.pair_tables = pair_tables;
  auto add = [&](const at::Tensor& x, const at::Tensor& y, int tset) {
    if (x.size(2) > 0) {
      p.tset[p.n_ops] = tset;
      p.ops[p.n_ops++] = make_operand<scalar_t>(x, y, 2 * p.half);
    }
  };
  add(q, q_out, 0);
  if (k.has_value()) add(*k, *k_out, p.k_tables ? 1 : 0);
  if (p.n_ops == 2 && p.tset[1] == 0 && heads_follow(p.ops[0], p.ops[1])) {
    p.ops[0].H += p.ops[1].H;  // (the slices of a packed qkv, in place: see heads_follow)
    p.n_ops = 1;
  }
  p.sc = cs_strides(cos);
  p.ss = cs_strides(sin);
  p.ti = make_token_index(cos, ix, cos_k);
  p.cp = cos.const_data_ptr<cs_t>();
  p.sp = sin.const_data_ptr<cs_t>();
  p.sck = cs_strides(cos_k);
  p.ssk = cs_strides(sin_k);
  p.ckp = cos_k.const_data_ptr<cs_t>();
  p.skp = sin_k.const_data_ptr<cs_t>();
  int64_t row_elems = 0;
  for (int n = 0; n < p.n_ops; ++n) row_elems += p.ops[n].H * p.D;
  const int64_t tokens = q.size(0) * p.S;
  if (tokens == 0 || row_elems == 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / row_elems);
  // Below kPrefetchMin bytes of q + k the rows come from the caches (decode batches, and here,
  // with a 32 MB L3, up to ~10 MB: 512 tokens): the prefetches would only cost instructions
  // (~10% at 64 tokens, 5-20% at 512 in every layout; at 20 MB they pay, 1.4x on fp32
  // [B, H, S, D] at 1024 tokens, 2x on bf16 qkv slices at 2048).
  const int64_t bytes = tokens * row_elems * static_cast<int64_t>(sizeof(scalar_t));
  p.prefetch = bytes >= kPrefetchMin;
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    const int64_t t = swap_layout ? (interleaved ? rotate_tokens<scalar_t, cs_t, true, true>(p, begin, end)
                                                 : rotate_tokens<scalar_t, cs_t, false, true>(p, begin, end))
                                  : (interleaved ? rotate_tokens<scalar_t, cs_t, true, false>(p, begin, end)
                                                 : rotate_tokens<scalar_t, cs_t, false, false>(p, begin, end));
    if (t >= 0) bad.store(t);
  });
  const int64_t t = bad.load();
  if (t >= 0) {
    int64_t pos = 0;
    for (int x = 0; x < (p.ti.mrope ? 3 : 1); ++x) {
      pos = token_position(p.ti, t / p.S, t % p.S, x);
      if (!position_ok(p.ti, pos)) break;
    }
    RK_CHECK_INDEX(false, "rotary: token ", t, " has position ", pos, ", outside the cos/sin cache of ", p.ti.rows,
                   " rows (the output is incomplete)");
  }
}

#define RK_CPU_TYPED(scalar_t, cs_t)                                                                             \
  void rotary_cpu_typed<scalar_t, cs_t>(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,   \
                                        const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,   \
                                        bool, bool, const rotary_kernels::TokenIndexArgs&, const at::Tensor&,     \
                                        const at::Tensor&, bool, bool)
