// PERA on CUDA: the polynomial expansion (forward) and its chain rule (backward) as one kernel
// launch each, around the shared adapter core (common.h).
//
// Forward:  A (r, n), h (P,), B (m, r) -> A_gen = [a_i ; h_p a_i*a_j] (R, n),
//           B_gen = s [b_i , b_i*b_j] (m, R), written in the compute dtype T; parameters are
//           read in their own dtype P, arithmetic in W_t (float, or double for float64), in the
//           reference's order (for float32 parameters the factors match it bit for bit).
// Backward: gA_gen (R, n), gB_gen (m, R) in T -> gA (r, n), gB (m, r), gh (P,) written in P:
//           gA[i] = gA_gen[i] + sum_j c_ij h_p(i,j) gA_gen[r+p] * a_j   (c_ii = 2, else 1)
//           gB[:, i] = s (gB_gen[:, i] + sum_j c_ij gB_gen[:, r+p] * b_j)
//           gh_p = sum_k gA_gen[r+p, k] a_i[k] a_j[k]
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>

#include "common.h"
#include "cp_async.cuh"

namespace polykern {
namespace {

constexpr int kNThreads = 256;
constexpr int kMaxRank = 64;     // pair indices fit 16 bits; the lookup table is r * r shorts
constexpr int kCols = 32;        // columns of A (A_gen, gA_gen, gA) per block
constexpr int kVec = 8;          // consecutive elements a thread reads or writes at once
constexpr int kColsItem = 4;     // consecutive columns of gA per thread: r * 8 items per block
constexpr int kRowsFwdB = 32;    // rows of B_gen per forward block
constexpr int kSmemBudget = 44 * 1024;  // dynamic shared memory per block, under the 48 KB
                                        // that needs no opt-in

__host__ __device__ constexpr int64_t align16(int64_t bytes) { return (bytes + 15) & ~int64_t{15}; }

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// V consecutive elements as one aggregate (ATen's aligned_vector): a load or store of it is one
// 8- or 16-byte access (two or four for 32 or 64 bytes). Alignment capped at the 16 bytes the
// widest access needs, so that 16-byte-aligned rows are enough.
template <typename S, int V>
struct alignas(sizeof(S) * V < 16 ? sizeof(S) * V : 16) Pack {
  S v[V];
};

// p[0, V) (global or shared, aligned as Pack<S, V>) converted to Wt.
template <typename Wt, typename S, int V>
__device__ __forceinline__ void load_vec(const S* p, Wt (&v)[V]) {
  Pack<S, V> pk;
  constexpr int kBytes = sizeof(pk);
  if constexpr (kBytes % 16 == 0) {  // native vector words, as in store_vec
    uint4 w[kBytes / 16];
#pragma unroll
    for (int q = 0; q < kBytes / 16; ++q) w[q] = reinterpret_cast<const uint4*>(p)[q];
    memcpy(&pk, w, kBytes);
  } else {
    static_assert(kBytes == 8, "Pack of 8 or 16k bytes");
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    memcpy(&pk, &w, kBytes);
  }
#pragma unroll
  for (int e = 0; e < V; ++e) v[e] = static_cast<Wt>(pk.v[e]);
}

// v rounded once to S into p[0, valid): one Pack store when `whole` (valid == V and p aligned),
// else element by element.
template <typename S, typename Wt, int V>
__device__ __forceinline__ void store_vec(S* p, bool whole, int valid, const Wt (&v)[V]) {
  Pack<S, V> pk;
#pragma unroll
  for (int e = 0; e < V; ++e) pk.v[e] = static_cast<S>(v[e]);
  if (whole) {  // st.global.v4/v2: a plain store of the Pack may be split into scalar stores
    constexpr int kBytes = sizeof(pk);
    if constexpr (kBytes % 16 == 0) {
      uint4 w[kBytes / 16];
      memcpy(w, &pk, kBytes);
#pragma unroll
      for (int q = 0; q < kBytes / 16; ++q)  // no "memory" clobber: nothing here reads the output
        asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p + q * (16 / sizeof(S))),
                     "r"(w[q].x), "r"(w[q].y), "r"(w[q].z), "r"(w[q].w));
    } else {
      static_assert(kBytes == 8, "Pack of 8 or 16k bytes");
      uint2 w;
      memcpy(&w, &pk, kBytes);
      asm volatile("st.global.v2.b32 [%0], {%1, %2};\n" ::"l"(p), "r"(w.x), "r"(w.y));
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (e < valid) p[e] = pk.v[e];
  }
}

// Staging: a block issues all its cp.async copies (cp_async.cuh) at once and waits once
// (cp_async_wait_all), one memory latency in all.

// src[0, count) -> dst (16-byte aligned shared memory): cp.async where src is 16-byte aligned,
// the tail (and everything when it is not) element by element.
template <typename S>
__device__ __forceinline__ void stage_flat(S* dst, const S* __restrict__ src, int count) {
  constexpr int kE = 16 / sizeof(S);
  int done = 0;
  if (aligned16(src)) {
    done = count / kE * kE;
    for (int q = threadIdx.x; q < done / kE; q += kNThreads)
      cp_async16(dst + q * kE, src + q * kE);
  }
  for (int q = done + threadIdx.x; q < count; q += kNThreads) dst[q] = src[q];
}

// Columns [c0, c0 + kCols) of rows [0, nrows) of a row-major matrix with rows of n elements
// starting at src -> dst (16-byte aligned shared memory, row stride kCols). cp.async when every
// row is 16-byte aligned (n * sizeof(S) a multiple of 16: odd n takes the element path);
// columns past n stay unwritten and their results are never stored.
template <typename S>
__device__ __forceinline__ void stage_cols(S* dst, const S* __restrict__ src, int nrows,
                                           int64_t n, int64_t c0) {
  constexpr int kE = 16 / sizeof(S), kChunks = kCols / kE;
  if (aligned16(src) && (n * static_cast<int64_t>(sizeof(S))) % 16 == 0) {
    for (int q = threadIdx.x; q < nrows * kChunks; q += kNThreads) {
      const int row = q / kChunks, k = q % kChunks * kE;  // powers of two: shifts
      if (c0 + k < n) cp_async16(dst + row * kCols + k, src + row * n + c0 + k);
    }
  } else {
    for (int q = threadIdx.x; q < nrows * kCols; q += kNThreads) {
      const int row = q / kCols, k = q % kCols;
      if (c0 + k < n) dst[q] = src[row * n + c0 + k];
    }
  }
}

// One block per 32 columns of A_gen (all R rows; A's r rows of those columns staged in shared
// memory, so a pair row is two shared reads and a multiply) or per 32 rows of B_gen (a
// contiguous slice of it, B's rows staged likewise), the pair list staged as packed ints, 8
// elements per thread written with 16-byte stores, no 64-bit division. Why: the work is latency,
// not bytes (2.5 MiB at n = m = 4096, r = 16 full, bf16); one element per thread with int64
// division and dependent global gathers of pi/pj, then of A, measured 7.3 us.
template <typename Pt, typename Wt, typename T>
__global__ void __launch_bounds__(kNThreads)
pera_expand_kernel(const Pt* __restrict__ A, const Pt* __restrict__ B,
                   const Pt* __restrict__ h, const int64_t* __restrict__ pi,
                   const int64_t* __restrict__ pj, T* __restrict__ A_gen,
                   T* __restrict__ B_gen, int r, int P, int64_t n, int64_t m, Wt scaling,
                   int nbA) {
  extern __shared__ __align__(16) unsigned char smem[];
  int* pair = reinterpret_cast<int*>(smem);  // pi | pj << 16
  unsigned char* rest = smem + align16(P * static_cast<int64_t>(sizeof(int)));
  const int tid = threadIdx.x, R = r + P;
  const bool is_a = static_cast<int>(blockIdx.x) < nbA;
  Pt* As = reinterpret_cast<Pt*>(rest);  // A role: A[:, c0 : c0 + kCols], (r, kCols)
  Pt* hs = As + r * kCols;               // A role: h (P,)
  Pt* Bs = reinterpret_cast<Pt*>(rest);  // B role: B[u0 : u0 + nu, :], (nu, r)
  const int64_t c0 = is_a ? static_cast<int64_t>(blockIdx.x) * kCols : 0;
  const int64_t u0 = is_a ? 0 : static_cast<int64_t>(blockIdx.x - nbA) * kRowsFwdB;
  const int nu = is_a ? 0 : static_cast<int>(min(static_cast<int64_t>(kRowsFwdB), m - u0));
  if (is_a)
    stage_cols(As, A, r, n, c0);
  else
    stage_flat(Bs, B + u0 * r, nu * r);
  for (int p = tid; p < P; p += kNThreads) {
    pair[p] = static_cast<int>(pi[p]) | static_cast<int>(pj[p]) << 16;
    if (is_a) hs[p] = h[p];
  }
  cp_async_wait_all();
  __syncthreads();
  if (is_a) {  // thread: kVec columns at k of rows tid / 4, + 64, + 128, ...
    constexpr int kThreadsRow = kCols / kVec;
    const int k = tid % kThreadsRow * kVec;
    const int valid = static_cast<int>(min(static_cast<int64_t>(kVec), n - c0 - k));
    if (valid <= 0) return;
    // one 16-byte-aligned store when every row of A_gen starts 16-byte aligned
    const bool whole =
        valid == kVec && (n * static_cast<int64_t>(sizeof(T))) % 16 == 0 && aligned16(A_gen);
#pragma unroll 2
    for (int row = tid / kThreadsRow; row < R; row += kNThreads / kThreadsRow) {
      Wt v[kVec];
      if (row < r) {
        load_vec(As + row * kCols + k, v);
      } else {
        const int pr = pair[row - r];
        Wt ai[kVec], aj[kVec];
        load_vec(As + (pr & 0xffff) * kCols + k, ai);
        load_vec(As + (pr >> 16) * kCols + k, aj);
        const Wt hp = static_cast<Wt>(hs[row - r]);
#pragma unroll
        for (int e = 0; e < kVec; ++e) v[e] = hp * ai[e] * aj[e];  // (h * a_i) * a_j, as the
      }                                                             // reference
      store_vec(A_gen + row * n + c0 + k, whole, valid, v);
    }
  } else {  // thread: kVec consecutive elements of the block's slice of B_gen, (nu, R)
    const int count = nu * R;
    T* out = B_gen + u0 * R;
    const bool aligned = aligned16(out);  // each thread's 8 elements then are too
    for (int f = tid * kVec; f < count; f += kNThreads * kVec) {
      const int valid = min(kVec, count - f);
      int u = static_cast<unsigned>(f) / static_cast<unsigned>(R), c = f - u * R;
      Wt v[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        v[e] = Wt(0);
        if (e < valid) {
          const Pt* bu = Bs + u * r;
          Wt x;
          if (c < r) {
            x = static_cast<Wt>(bu[c]);
          } else {
            const int pr = pair[c - r];
            x = static_cast<Wt>(bu[pr & 0xffff]) * static_cast<Wt>(bu[pr >> 16]);
          }
          v[e] = x * scaling;
        }
        if (++c == R) c = 0, ++u;
      }
      store_vec(out + f, aligned && valid == kVec, valid, v);
    }
  }
}

// lut[i * r + j] = lut[j * r + i] = p for the pair p = (i, j), -1 where there is none. A pair
// with i > j has no entry (the spec's pairs all have i <= j, and the table is filled from
// (pi, pj) as given). Syncs once inside; the caller syncs before reading.
__device__ __forceinline__ void build_lut(short* lut, const int64_t* __restrict__ pi,
                                          const int64_t* __restrict__ pj, int r, int P) {
  const int tid = threadIdx.x;
  int64_t i0 = -1, j0 = -1;
  if (tid < P) i0 = pi[tid], j0 = pj[tid];  // in flight during the fill and the barrier
  for (int e = tid; e < r * r; e += kNThreads) lut[e] = -1;
  __syncthreads();
  auto put = [&](int p, int64_t i, int64_t j) {
    if (0 <= i && i <= j && j < r) lut[i * r + j] = lut[j * r + i] = static_cast<short>(p);
  };
  if (tid < P) put(tid, i0, j0);
  for (int p = tid + kNThreads; p < P; p += kNThreads) put(p, pi[p], pj[p]);
}

// gh_p = sum_k gA_gen[r+p, k] a_i[k] a_j[k]: one block per pair, kVec elements per thread and
// load, then a fixed-order block reduction (deterministic, no atomics).
template <typename Pt, typename Wt, typename T>
__device__ __forceinline__ void gh_block(const T* __restrict__ g, const Pt* __restrict__ A,
                                         const int64_t* __restrict__ pi,
                                         const int64_t* __restrict__ pj, Pt* __restrict__ gh,
                                         int p, int64_t n) {
  __shared__ Wt red[kNThreads / 32];
  const Pt* ai = A + pi[p] * n;
  const Pt* aj = A + pj[p] * n;
  Wt acc = 0;
  if (n % kVec == 0 && aligned16(g) && aligned16(A)) {  // every row 16-byte aligned
#pragma unroll 2
    for (int64_t k = threadIdx.x * kVec; k < n; k += kNThreads * kVec) {
      Wt gv[kVec], x[kVec], y[kVec];
      load_vec(g + k, gv);
      load_vec(ai + k, x);
      load_vec(aj + k, y);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc += gv[e] * x[e] * y[e];
    }
  } else {
#pragma unroll 4
    for (int64_t k = threadIdx.x; k < n; k += kNThreads)
      acc += static_cast<Wt>(g[k]) * static_cast<Wt>(ai[k]) * static_cast<Wt>(aj[k]);
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    Wt s = lane < kNThreads / 32 ? red[lane] : Wt(0);
    for (int o = kNThreads / 64; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    if (lane == 0) gh[p] = static_cast<Pt>(s);
  }
}

// gA for columns [c0, c0 + kCols): A's r rows and gA_gen's pair rows (in batches of `batch`
// pairs when they do not all fit: one batch for terms "full" up to r = 33 with a 16-bit compute
// dtype, r = 24 with float32) staged in shared memory; thread: kColsItem columns of one row i,
// its j loop reads shared memory only (in j order within a batch).
template <typename Pt, typename Wt, typename T>
__device__ __forceinline__ void ga_block(unsigned char* smem, const T* __restrict__ gA_gen,
                                         const Pt* __restrict__ A, const Pt* __restrict__ h,
                                         const int64_t* __restrict__ pi,
                                         const int64_t* __restrict__ pj, Pt* __restrict__ gA,
                                         int r, int P, int64_t n, int64_t c0, int batch) {
  constexpr int kItemsRow = kCols / kColsItem;
  constexpr int kSlots = kMaxRank * kItemsRow / kNThreads;  // items per thread at r = kMaxRank
  short* lut = reinterpret_cast<short*>(smem);
  unsigned char* rest = smem + align16(r * r * static_cast<int64_t>(sizeof(short)));
  Pt* As = reinterpret_cast<Pt*>(rest);  // (r, kCols)
  T* Gs = reinterpret_cast<T*>(rest + align16(r * kCols * static_cast<int64_t>(sizeof(Pt))));
  Pt* hs = reinterpret_cast<Pt*>(reinterpret_cast<unsigned char*>(Gs) +
                                 align16(batch * kCols * static_cast<int64_t>(sizeof(T))));
  const int tid = threadIdx.x;
  int pb = min(batch, P);
  stage_cols(As, A, r, n, c0);
  stage_cols(Gs, gA_gen + static_cast<int64_t>(r) * n, pb, n, c0);  // pairs [0, pb)
  for (int q = tid; q < pb; q += kNThreads) hs[q] = h[q];
  const bool rows_aligned =
      aligned16(gA) && (n * static_cast<int64_t>(sizeof(Pt))) %
                               static_cast<int64_t>(alignof(Pack<Pt, kColsItem>)) == 0;
  int staged = 0;  // the first pair of the batch in Gs
  // One item at a time (a second one only for r > 32), so that only one item's accumulators
  // and unrolled j loop are live: 59-64 registers (both slots unrolled: 64-80, with spills).
#pragma unroll 1
  for (int s = 0; s < kSlots && s * kNThreads < r * kItemsRow; ++s) {
    const int item = tid + s * kNThreads, i = item / kItemsRow;
    const int kk = item % kItemsRow * kColsItem;
    const int64_t k = c0 + kk;
    const bool mine = i < r && k < n;
    Wt g[kColsItem];  // the linear part: gA_gen[i, k ...] (loads in flight during the staging)
#pragma unroll
    for (int e = 0; e < kColsItem; ++e)
      g[e] = mine && k + e < n ? static_cast<Wt>(gA_gen[i * n + k + e]) : Wt(0);
    if (s == 0) {
      build_lut(lut, pi, pj, r, P);
      cp_async_wait_all();
      __syncthreads();
    }
    for (int p0 = 0; p0 < P; p0 += batch) {
      if (p0 != staged) {  // another batch of pair rows (uniform over the block)
        __syncthreads();
        pb = min(batch, P - p0);
        stage_cols(Gs, gA_gen + static_cast<int64_t>(r + p0) * n, pb, n, c0);
        for (int q = tid; q < pb; q += kNThreads) hs[q] = h[p0 + q];
        staged = p0;
        cp_async_wait_all();
        __syncthreads();
      }
      if (!mine) continue;
      const short* lrow = lut + i * r;
#pragma unroll 4
      for (int j = 0; j < r; ++j) {
        const int q = lrow[j] - p0;
        if (static_cast<unsigned>(q) >= static_cast<unsigned>(pb)) continue;
        const Wt c = (i == j) ? Wt(2) : Wt(1);
        const Wt ch = c * static_cast<Wt>(hs[q]);
        Wt gv[kColsItem], a[kColsItem];
        load_vec(Gs + q * kCols + kk, gv);
        load_vec(As + j * kCols + kk, a);
#pragma unroll
        for (int e = 0; e < kColsItem; ++e) g[e] += ch * gv[e] * a[e];
      }
    }
    if (mine) {
      const int valid = static_cast<int>(min(static_cast<int64_t>(kColsItem), n - k));
      store_vec(gA + i * n + k, rows_aligned && valid == kColsItem, valid, g);
    }
  }
}

// gB for rows [u0, u0 + nu): that slice of gB_gen (contiguous, (nu, R)) and of B staged in
// shared memory; thread: one (u, i).
template <typename Pt, typename Wt, typename T>
__device__ __forceinline__ void gb_block(unsigned char* smem, const T* __restrict__ gB_gen,
                                         const Pt* __restrict__ B,
                                         const int64_t* __restrict__ pi,
                                         const int64_t* __restrict__ pj, Pt* __restrict__ gB,
                                         int r, int P, int64_t m, Wt scaling, int64_t u0,
                                         int rows) {
  const int R = r + P;
  short* lut = reinterpret_cast<short*>(smem);
  unsigned char* rest = smem + align16(r * r * static_cast<int64_t>(sizeof(short)));
  T* Gs = reinterpret_cast<T*>(rest);
  Pt* Bs = reinterpret_cast<Pt*>(rest + align16(rows * R * static_cast<int64_t>(sizeof(T))));
  const int nu = static_cast<int>(min(static_cast<int64_t>(rows), m - u0));
  stage_flat(Gs, gB_gen + u0 * R, nu * R);
  stage_flat(Bs, B + u0 * r, nu * r);
  build_lut(lut, pi, pj, r, P);
  cp_async_wait_all();
  __syncthreads();
  for (int q = threadIdx.x; q < nu * r; q += kNThreads) {
    const int u = q / r, i = q - u * r;
    const T* gu = Gs + u * R;
    const Pt* bu = Bs + u * r;
    const short* lrow = lut + i * r;
    Wt g = static_cast<Wt>(gu[i]);
#pragma unroll 4
    for (int j = 0; j < r; ++j) {
      const int p = lrow[j];
      if (p < 0) continue;
      const Wt c = (i == j) ? Wt(2) : Wt(1);
      g += c * static_cast<Wt>(gu[r + p]) * static_cast<Wt>(bu[j]);
    }
    gB[u0 * r + q] = static_cast<Pt>(g * scaling);  // B_gen = s * B_gen
  }
}

// One launch, three roles by block index: [0, P) gh (one block per pair: the longest chain,
// pi -> a_i, so scheduled first), then nbA gA blocks of kCols columns, then gB blocks of
// `rows_b` rows. Why: one thread per output element, with a j loop of r dependent
// lookup-then-global-load steps and the r * r table rebuilt by every block, measured 9.1 us at
// n = m = 4096, r = 16 full, bf16, for 2.5 MiB read.
template <typename Pt, typename Wt, typename T>
__global__ void __launch_bounds__(kNThreads)
pera_expand_backward_kernel(const T* __restrict__ gA_gen, const T* __restrict__ gB_gen,
                            const Pt* __restrict__ A, const Pt* __restrict__ B,
                            const Pt* __restrict__ h, const int64_t* __restrict__ pi,
                            const int64_t* __restrict__ pj, Pt* __restrict__ gA,
                            Pt* __restrict__ gB, Pt* __restrict__ gh, int r, int P, int64_t n,
                            int64_t m, Wt scaling, int nbA, int batch, int rows_b) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int b = blockIdx.x;
  if (b < P)
    gh_block<Pt, Wt, T>(gA_gen + static_cast<int64_t>(r + b) * n, A, pi, pj, gh, b, n);
  else if (b < P + nbA)
    ga_block<Pt, Wt, T>(smem, gA_gen, A, h, pi, pj, gA, r, P, n,
                        static_cast<int64_t>(b - P) * kCols, batch);
  else
    gb_block<Pt, Wt, T>(smem, gB_gen, B, pi, pj, gB, r, P, m, scaling,
                        static_cast<int64_t>(b - P - nbA) * rows_b, rows_b);
}

void check_pera_params(const char* op, const Tensor& x, const Tensor& A, const Tensor& B,
                       const Tensor& h, const Tensor& pair_i, const Tensor& pair_j, int64_t n,
                       int64_t m) {
  check_cuda(A, "lora_A", x);
  check_cuda(B, "lora_B", x);
  check_cuda(h, "pera_h", x);
  check_cuda(pair_i, "pair_i", x);
  check_cuda(pair_j, "pair_j", x);
  check_float(A, "lora_A");
  TORCH_CHECK(A.dim() == 2 && A.size(1) == n, op, ": lora_A must have shape (r, ", num(n),
              "), got ", shape(A.sizes()));
  const int64_t r = A.size(0);
  TORCH_CHECK(r >= 1 && r <= kMaxRank, op, ": the CUDA kernels support r from 1 to ", num(kMaxRank),
              ", got r=", num(r));
  TORCH_CHECK(B.dim() == 2 && B.size(0) == m && B.size(1) == r, op, ": lora_B must have shape (",
              num(m), ", ", num(r), "), got ", shape(B.sizes()));
  TORCH_CHECK(B.scalar_type() == A.scalar_type() && h.scalar_type() == A.scalar_type(), op,
              ": lora_A, lora_B and pera_h must share a dtype, got ", A.scalar_type(), ", ",
              B.scalar_type(), ", ", h.scalar_type());
  TORCH_CHECK(pair_i.scalar_type() == at::kLong && pair_j.scalar_type() == at::kLong &&
                  pair_i.dim() == 1 && pair_i.sizes() == pair_j.sizes(),
              op, ": pair_i and pair_j must be 1-D int64 tensors of one length");
  TORCH_CHECK(pair_i.size(0) <= r * (r + 1) / 2, op, ": ", num(pair_i.size(0)),
              " pairs is more than r(r+1)/2 for r=", num(r));
  TORCH_CHECK(h.dim() == 1 && h.size(0) == pair_i.size(0), op, ": pera_h must have shape (",
              num(pair_i.size(0)), ",), got ", shape(h.sizes()));
}

std::tuple<Tensor, Tensor> expand(const Tensor& A, const Tensor& B, const Tensor& h,
                                  const Tensor& pair_i, const Tensor& pair_j, double scaling,
                                  at::ScalarType dtype) {
  POLYKERN_SCOPE("polykern::pera_expand");
  const auto pt = gen_param_dtype(A.scalar_type(), dtype);
  const Tensor Aw = as_dtype(A, pt), Bw = as_dtype(B, pt), hw = as_dtype(h, pt);
  const Tensor pi = pair_i.contiguous(), pj = pair_j.contiguous();
  const int r = static_cast<int>(A.size(0)), P = static_cast<int>(pi.size(0));
  const int64_t n = A.size(1), m = B.size(0), R = r + P;
  Tensor A_gen = at::empty({R, n}, A.options().dtype(dtype));
  Tensor B_gen = at::empty({m, R}, A.options().dtype(dtype));
  maybe_poison(A_gen);
  maybe_poison(B_gen);
  const int64_t total = R * n + m * R;
  if (total == 0) return {A_gen, B_gen};
  const int64_t nbA = (n + kCols - 1) / kCols, nbB = (m + kRowsFwdB - 1) / kRowsFwdB;
  TORCH_CHECK(nbA + nbB < (int64_t{1} << 31), "pera_expand: problem too large");
  // shared memory: the pair list, then A's chunk and h (A role) or B's rows (B role); at most
  // 41 KB (float64, r = 64, full)
  const int64_t ps = Aw.element_size();
  const int64_t smem = align16(P * 4) + std::max(align16(r * kCols * ps) + align16(P * ps),
                                                 align16(kRowsFwdB * r * ps));
  TORCH_INTERNAL_ASSERT(smem <= 48 * 1024, "pera_expand: ", num(smem), " bytes of shared memory");
  auto stream = at::cuda::getCurrentCUDAStream();
  POLYKERN_DISPATCH_GEN(pt, dtype, "pera_expand", [&] {
    pera_expand_kernel<p_t, wt_t, io_t>
        <<<static_cast<unsigned>(nbA + nbB), kNThreads, static_cast<size_t>(smem), stream>>>(
            Aw.data_ptr<p_t>(), Bw.data_ptr<p_t>(), hw.data_ptr<p_t>(), pi.data_ptr<int64_t>(),
            pj.data_ptr<int64_t>(), A_gen.data_ptr<io_t>(), B_gen.data_ptr<io_t>(), r, P, n, m,
            static_cast<wt_t>(scaling), static_cast<int>(nbA));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {A_gen, B_gen};
}

std::tuple<Tensor, Tensor, Tensor> expand_backward(const Tensor& gA_gen, const Tensor& gB_gen,
                                                   const Tensor& A, const Tensor& B,
                                                   const Tensor& h, const Tensor& pair_i,
                                                   const Tensor& pair_j, double scaling) {
  POLYKERN_SCOPE("polykern::pera_expand_backward");
  const auto pt = gen_param_dtype(A.scalar_type(), gA_gen.scalar_type());
  const Tensor Aw = as_dtype(A, pt), Bw = as_dtype(B, pt), hw = as_dtype(h, pt);
  const Tensor gAh = gA_gen.contiguous(), gBg = gB_gen.contiguous();
  const Tensor pi = pair_i.contiguous(), pj = pair_j.contiguous();
  const int r = static_cast<int>(A.size(0)), P = static_cast<int>(pi.size(0));
  const int64_t n = A.size(1), m = B.size(0), R = r + P;
  Tensor gA = at::empty({r, n}, Aw.options()), gB = at::empty({m, r}, Aw.options());
  Tensor gh = at::empty({P}, Aw.options());
  maybe_poison(gA); maybe_poison(gB); maybe_poison(gh);
  // Shared memory (one size for every block): the r x r pair table, then the larger of
  // - gA role: A's r rows of kCols columns, then `batch` pair rows of gA_gen and their h (all P
  //   at once when they fit the budget: r <= 33 full with 16-bit T, r <= 24 with float32);
  // - gB role: `rows_b` rows of gB_gen and of B, about one (u, i) per thread.
  const int64_t ps = Aw.element_size(), ts = gAh.element_size();
  const int64_t lut = align16(int64_t{r} * r * 2), fixed_a = align16(r * kCols * ps);
  const int64_t batch = std::max<int64_t>(
      1, std::min<int64_t>(P, (kSmemBudget - lut - fixed_a - 16) / (kCols * ts + ps)));
  const int64_t smem_a = fixed_a + align16(batch * kCols * ts) + align16(batch * ps);
  int64_t rows_b = std::min<int64_t>(std::max(kNThreads / r, 1),
                                     (kSmemBudget - lut - 32) / (R * ts + r * ps));
  if (rows_b >= 8) rows_b &= ~int64_t{7};  // slices start 16-byte aligned: cp.async staging
  rows_b = std::max<int64_t>(rows_b, 1);
  const int64_t smem_b = align16(rows_b * R * ts) + align16(rows_b * r * ps);
  const int64_t smem = lut + std::max(smem_a, smem_b);
  TORCH_INTERNAL_ASSERT(smem <= 48 * 1024, "pera_linear_backward: ", num(smem),
                        " bytes of shared memory");
  const int64_t nbA = (n + kCols - 1) / kCols, nbB = (m + rows_b - 1) / rows_b;
  const int64_t grid = P + nbA + nbB;
  if (grid > 0) {
    TORCH_CHECK(grid < (int64_t{1} << 31), "pera_linear_backward: problem too large");
    auto stream = at::cuda::getCurrentCUDAStream();
    POLYKERN_DISPATCH_GEN(pt, gAh.scalar_type(), "pera_linear_backward", [&] {
      pera_expand_backward_kernel<p_t, wt_t, io_t>
          <<<static_cast<unsigned>(grid), kNThreads, static_cast<size_t>(smem), stream>>>(
              gAh.data_ptr<io_t>(), gBg.data_ptr<io_t>(), Aw.data_ptr<p_t>(),
              Bw.data_ptr<p_t>(), hw.data_ptr<p_t>(), pi.data_ptr<int64_t>(),
              pj.data_ptr<int64_t>(), gA.data_ptr<p_t>(), gB.data_ptr<p_t>(),
              gh.data_ptr<p_t>(), r, P, n, m, static_cast<wt_t>(scaling),
              static_cast<int>(nbA), static_cast<int>(batch), static_cast<int>(rows_b));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {as_dtype(gA, A.scalar_type()), as_dtype(gB, B.scalar_type()),
          as_dtype(gh, h.scalar_type())};
}

// ---- ops -----------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> pera_expand_op(const Tensor& A, const Tensor& B, const Tensor& h,
                                          const Tensor& pair_i, const Tensor& pair_j,
                                          double scaling, at::ScalarType dtype) {
  check_pera_params("pera_expand", A, A, B, h, pair_i, pair_j, A.size(1), B.size(0));
  const c10::cuda::CUDAGuard guard(A.device());
  return expand(A, B, h, pair_i, pair_j, scaling, dtype);
}

std::tuple<Tensor, Tensor> pera_linear_op(
    const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias, const Tensor& A,
    const Tensor& B, const Tensor& h, const Tensor& pair_i, const Tensor& pair_j,
    double scaling, const std::optional<Tensor>& x_adapter) {
  {
    POLYKERN_SCOPE("polykern::checks");
    check_linear_inputs("pera_linear", x, W, bias, x_adapter);
    check_pera_params("pera_linear", x, A, B, h, pair_i, pair_j, W.size(1), W.size(0));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto [A_gen, B_gen] = expand(A, B, h, pair_i, pair_j, scaling, x.scalar_type());
  return adapter_forward(x, W, bias, A_gen, B_gen, x_adapter);
}

Tensor pera_linear_inference_op(const Tensor& x, const Tensor& W,
                                const std::optional<Tensor>& bias, const Tensor& A,
                                const Tensor& B, const Tensor& h, const Tensor& pair_i,
                                const Tensor& pair_j, double scaling) {
  check_linear_inputs("pera_linear_inference", x, W, bias, std::nullopt);
  check_pera_params("pera_linear_inference", x, A, B, h, pair_i, pair_j, W.size(1), W.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  auto [A_gen, B_gen] = expand(A, B, h, pair_i, pair_j, scaling, x.scalar_type());
  return adapter_linear(x, W, bias, A_gen, B_gen);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pera_linear_backward_op(
    const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& x_adapter,
    const Tensor& W, const Tensor& A, const Tensor& B, const Tensor& h, const Tensor& pair_i,
    const Tensor& pair_j, double scaling, const Tensor& U, std::array<bool, 3> output_mask) {
  check_cuda(grad_y, "grad_y", x);
  check_cuda(U, "U", x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [A_gen, B_gen] = expand(A, B, h, pair_i, pair_j, scaling, grad_y.scalar_type());
  auto [gX, gXa, gA_gen, gB_gen] = adapter_backward(grad_y, x, x_adapter, W, A_gen, B_gen, U,
                                                    output_mask[0], output_mask[1],
                                                    output_mask[2]);
  Tensor gA, gB, gh;
  if (output_mask[2]) {
    std::tie(gA, gB, gh) = expand_backward(gA_gen, gB_gen, A, B, h, pair_i, pair_j, scaling);
  } else {
    gA = at::empty({0}, A.options());
    gB = at::empty({0}, B.options());
    gh = at::empty({0}, h.options());
  }
  return {gX, gXa, gA, gB, gh};
}

}  // namespace

TORCH_LIBRARY_IMPL(polykern, CUDA, m) {
  m.impl("pera_linear", &pera_linear_op);
  m.impl("pera_linear_backward", &pera_linear_backward_op);
  m.impl("pera_linear_inference", &pera_linear_inference_op);
  m.impl("pera_expand", &pera_expand_op);
}

}  // namespace polykern
