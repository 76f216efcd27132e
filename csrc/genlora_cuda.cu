// GenLoRA on CUDA: the RBF synthesis of both factors (forward) and its chain rule (backward), one
// launch each (plus one small summing kernel in the backward), around the shared adapter core
// (common.h).
//
// For a generator X (A or B): Phi[t, k] = exp(-gamma_k ||Z[t] - C[k]||^2), gamma = exp(g),
// t < L (L = n for A, m for B), k < K, d latent dims. Both factors are "out[i, t] = scale *
// sum_k M[i, k] Phi[t, k]" with strides: A (r, n) = M_A Phi_A^T; B (m, r): B[t, i] = s * sum_k
// Phi_B[t, k] M_B[k, i], i.e. M = M_B^T. A job describes one generator; blocks [0, nbA) run A's
// job and the rest B's.
//
// Backward (SPEC-GENLORA.md): with G[i, t] = dL/dout[i, t] * scale,
//   gM[i, k] = sum_t G[i, t] Phi[t, k];  E[t, k] = Phi[t, k] sum_i G[i, t] M[i, k];
//   gZ[t] = sum_k E (-2 gamma_k) D[t, k];  gC[k] = sum_t E (2 gamma_k) D;  gg[k] = sum_t E
//   (-gamma_k ||D||^2). gZ is complete inside a tile of coordinates. gM, gC, gg are sums over t:
//   each block adds the shares of its tiles into its own row of a work-dtype workspace (no
//   atomics, no zeroing: a block's first tile stores), and one small kernel sums the rows in a
//   fixed order, so the gradients repeat bitwise on a given GPU (the number of rows follows its
//   SM count). Their cost is O((n + m) K (d + r)), independent of N.
//
// At n = m = 4096, r = 16, K = 32, d = 1 the work is a few microseconds and latency decides
// (a profile of simpler kernels: synthesis 10.2 us, backward 18.6 + 1.9 us + a memset):
// - Fields of the two jobs are picked one by one (`pick`): a reference to one of two by-value
//   parameters (`const Job& job = is_a ? ja : jb`) copies both structs to local memory (ptxas:
//   256 bytes of stack frame); picked fields stay in registers.
// - Each kernel reads global memory in one staging step whose loads are all in flight at once
//   (`stage`), not one dependent round trip per array.
// - Synthesis: one thread per (coordinate, 8 rows of the factor) computes its own Phi[t, :] in
//   registers, 4 centres (4 independent exps) at a time, into 8 independent accumulators; M
//   staged once per block in shared memory; one barrier; B's rows stored as 16-byte vectors.
//   128 blocks of 128 threads at the main case.
// - Backward: tiles of 64 coordinates (128 blocks of 256 threads at the main case; at most 2
//   blocks per SM, several tiles each, for larger L), register-tiled inner loops (2 coordinates
//   x 4 centres per thread for gPhi, 4 centres per thread for gM), 2 barriers per tile, and one
//   row of partial sums per block instead of 576 atomics per 32 coordinates: no memset, and the
//   gradients repeat bitwise.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common.h"

namespace polykern {
namespace {

constexpr int kNThreads = 256;      // backward and summing kernels
constexpr int kSynthThreads = 128;  // synthesis: 128 blocks at the main case fill one wave
constexpr int kRC = 8;              // rows i of the factor per synthesis thread (accumulators)
constexpr int kMaxK = 256;
constexpr int kMaxD = 8;
constexpr int kMaxR = 128;
constexpr int kMaxBwdTile = 64;     // coordinates per backward tile
constexpr int kMinSmemMTile = 16;   // smaller tiles read M from global memory instead
constexpr int kSumRows = kNThreads / 32;  // warps of the summing kernel, each adding every 8th row
constexpr int64_t kSmemBudget = 48 * 1024;  // no opt-in needed below this

template <typename P, typename Wt>
struct Job {
  const P* Z;         // (L, d)   parameters in their storage dtype P
  const P* C;         // (K, d)
  const P* g;         // (K,)
  const P* M;         // M[i * sMi + k * sMk], i < r, k < K
  int64_t sMi, sMk;
  int64_t L;
  Wt scale;
  int64_t nblocks;
  // backward only
  P* gZ;              // (L, d)
  Wt* part;           // this generator's block rows (nblocks x S): [gC (K d) | gg (K) | gM], gM
                      // at i * sMi + k * sMk, the layout of the gradient tensor
};

// The job of this block, field by field: selecting a whole by-value kernel parameter by
// reference (is_a ? ja : jb) makes the compiler copy both to local memory.
template <typename P, typename Wt>
__device__ __forceinline__ Job<P, Wt> pick(const Job<P, Wt>& a, const Job<P, Wt>& b, bool is_a) {
  Job<P, Wt> j;
  j.Z = is_a ? a.Z : b.Z; j.C = is_a ? a.C : b.C; j.g = is_a ? a.g : b.g; j.M = is_a ? a.M : b.M;
  j.sMi = is_a ? a.sMi : b.sMi; j.sMk = is_a ? a.sMk : b.sMk;
  j.L = is_a ? a.L : b.L; j.scale = is_a ? a.scale : b.scale;
  j.nblocks = is_a ? a.nblocks : b.nblocks;
  j.gZ = is_a ? a.gZ : b.gZ; j.part = is_a ? a.part : b.part;
  return j;
}

// Four consecutive work-dtype values in shared memory (16-byte aligned for float, 32 for double).
__device__ __forceinline__ void ld4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
__device__ __forceinline__ void ld4(const double* p, double (&v)[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ void st4(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void st4(double* p, const double (&v)[4]) {
  reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
}

// dst[j] = v[j] * scale, j < kRC, as 16-byte stores (dst 16-byte aligned).
template <typename T, typename Wt>
__device__ __forceinline__ void store_rc(T* dst, const Wt (&v)[kRC], Wt scale) {
  static_assert(kRC * sizeof(T) % 16 == 0, "whole 16-byte vectors");
  if constexpr (sizeof(T) == 2) {  // at::Half, at::BFloat16: the raw bits, two per word
    uint32_t w[kRC / 2];
#pragma unroll
    for (int j = 0; j < kRC / 2; ++j)
      w[j] = static_cast<uint32_t>(static_cast<T>(v[2 * j] * scale).x) |
             (static_cast<uint32_t>(static_cast<T>(v[2 * j + 1] * scale).x) << 16);
#pragma unroll
    for (int j = 0; j < kRC / 8; ++j)
      reinterpret_cast<uint4*>(dst)[j] = make_uint4(w[4 * j], w[4 * j + 1], w[4 * j + 2],
                                                    w[4 * j + 3]);
  } else if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int j = 0; j < kRC / 4; ++j)
      reinterpret_cast<float4*>(dst)[j] = make_float4(
          static_cast<float>(v[4 * j] * scale), static_cast<float>(v[4 * j + 1] * scale),
          static_cast<float>(v[4 * j + 2] * scale), static_cast<float>(v[4 * j + 3] * scale));
  } else {
    static_assert(std::is_same_v<T, double>, "float64, float32, bfloat16 or float16 outputs");
#pragma unroll
    for (int j = 0; j < kRC / 2; ++j)
      reinterpret_cast<double2*>(dst)[j] = make_double2(v[2 * j] * scale, v[2 * j + 1] * scale);
  }
}

// n / d for n, d < 2^16 by one multiply-high (m = ceil(2^32 / d); exact since n d < 2^32), for
// the index arithmetic of the staging, where a generic integer division (~20 instructions per
// element) would sit on the path to the loads.
struct FastDiv {
  uint32_t d, m;  // m = 0 stands for d = 1
};
inline FastDiv fast_div(int64_t d) {
  TORCH_INTERNAL_ASSERT(d >= 1 && d < (1 << 16));
  const uint64_t m = d == 1 ? 0 : ((uint64_t{1} << 32) + d - 1) / d;
  return {static_cast<uint32_t>(d), static_cast<uint32_t>(m)};
}
__device__ __forceinline__ int fdiv(int n, FastDiv f) {
  return f.m == 0 ? n : static_cast<int>(__umulhi(static_cast<uint32_t>(n), f.m));
}

// Copies `count` values into shared memory with up to kStage global loads in flight per thread:
// ld(e, off) returns the e-th value and sets off, its index in `base` (or leaves it -1 to skip);
// fix(off, v) is stored. The kernels read global memory only here, and these loads, if one
// waited for the other, would cost a round trip (0.5-1 us) each: all the staged arrays share
// one index space so that at the main case each thread issues all of its loads at once.
constexpr int kStage = 8;

template <typename Wt, typename Ld, typename Fix>
__device__ __forceinline__ void stage(Wt* base, int count, Ld ld, Fix fix) {
  for (int e0 = threadIdx.x; e0 < count; e0 += kStage * blockDim.x) {
    Wt v[kStage];
    int off[kStage];
#pragma unroll
    for (int u = 0; u < kStage; ++u) {
      const int e = e0 + u * blockDim.x;
      off[u] = -1;
      v[u] = 0;
      if (e < count) v[u] = ld(e, off[u]);
    }
#pragma unroll
    for (int u = 0; u < kStage; ++u)
      if (off[u] >= 0) base[off[u]] = fix(off[u], v[u]);
  }
}

// Synthesis. Thread (t, ch) computes out[i, t0 + t] for the kRC rows i in chunk ch, with its own
// Phi[t, k] (recomputed per chunk: nch = ceil(r / kRC) times, 2 at r = 16, against kRC
// multiply-adds per exp) and kRC independent accumulators. A block covers `tile` = blockDim / nch
// coordinates. The centres go 4 at a time (K padded to Kp with gamma = 0 and M = 0), so that 4
// exps are independent of each other inside one basic block. Shared memory: Ms[k][i] (rows
// i >= r zero, pitch rp: 8 rows are two broadcast 16-byte loads), the centres as Cs[c][k] (4
// centres one 16-byte load) and gamma; where Kp rp does not fit (K r > ~11 K floats), M is read
// from global memory (L1) instead.
template <typename P, typename Wt, typename T>
__global__ void __launch_bounds__(kSynthThreads, 4)
genlora_synth_kernel(Job<P, Wt> ja, Job<P, Wt> jb, T* __restrict__ outA, T* __restrict__ outB,
                     int r, int K, int d, int tile, bool m_smem, bool vec_b, FastDiv div_rp,
                     FastDiv div_Kp) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int nch = (r + kRC - 1) / kRC, rp = nch * kRC, Kp = (K + 3) / 4 * 4;
  Wt* Ms = reinterpret_cast<Wt*>(smem_raw);  // [Kp][rp] where m_smem
  Wt* Cs = Ms + (m_smem ? Kp * rp : 0);      // [d][Kp]
  Wt* gam = Cs + d * Kp;                     // [Kp]
  const bool is_a = blockIdx.x < ja.nblocks;
  const Job<P, Wt> job = pick(ja, jb, is_a);
  const int64_t t0 = (is_a ? blockIdx.x : blockIdx.x - ja.nblocks) * static_cast<int64_t>(tile);
  // A: t fastest, so that a warp stores 32 consecutive elements of each row of A; B: the chunk
  // fastest, so that a warp stores whole rows of B, contiguous. The latent coordinates go to
  // registers, loaded before the staging so that both round trips overlap.
  const int e = threadIdx.x;
  const int t = is_a ? e % tile : e / nch, ch = is_a ? e / tile : e % nch;
  const int64_t tg = t0 + t;
  const bool active = t < tile && ch < nch && tg < job.L;
  Wt z[kMaxD];
#pragma unroll
  for (int c = 0; c < kMaxD; ++c)
    z[c] = (active && c < d) ? static_cast<Wt>(job.Z[tg * d + c]) : Wt(0);
  {  // one index space [Ms | Cs | gamma], zero past K and r
    const int nMs = m_smem ? Kp * rp : 0, oCs = nMs, oGam = oCs + d * Kp;
    auto ld = [&](int e, int& off) -> Wt {
      off = e;
      if (e < nMs) {
        const int k = fdiv(e, div_rp), i = e - k * rp;
        return i < r && k < K ? static_cast<Wt>(job.M[i * job.sMi + k * job.sMk]) : Wt(0);
      }
      if (e < oGam) {
        const int c = fdiv(e - oCs, div_Kp), k = e - oCs - c * Kp;
        return k < K ? static_cast<Wt>(job.C[k * d + c]) : Wt(0);
      }
      return e - oGam < K ? static_cast<Wt>(job.g[e - oGam]) : Wt(0);
    };
    auto fix = [&](int off, Wt v) { return off < oGam ? v : (off - oGam < K ? exp(v) : Wt(0)); };
    stage(Ms, oGam + Kp, ld, fix);
  }
  __syncthreads();
  if (!active) return;
  const int i0 = ch * kRC;
  Wt acc[kRC];
#pragma unroll
  for (int j = 0; j < kRC; ++j) acc[j] = 0;
  if (m_smem) {
    for (int k0 = 0; k0 < Kp; k0 += 4) {
      Wt s[4] = {0, 0, 0, 0};
#pragma unroll
      for (int c = 0; c < kMaxD; ++c) {
        if (c == d) break;
        Wt cv[4];
        ld4(Cs + c * Kp + k0, cv);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
          const Wt diff = z[c] - cv[l];
          s[l] += diff * diff;
        }
      }
      Wt gm[4], phi[4];
      ld4(gam + k0, gm);
#pragma unroll
      for (int l = 0; l < 4; ++l) phi[l] = exp(-gm[l] * s[l]);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        Wt m0[4], m1[4];
        ld4(Ms + (k0 + l) * rp + i0, m0);
        ld4(Ms + (k0 + l) * rp + i0 + 4, m1);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc[j] += m0[j] * phi[l];
          acc[j + 4] += m1[j] * phi[l];
        }
      }
    }
  } else {  // M too large for shared memory (K r > ~11 K floats): from global memory (L1)
    for (int k = 0; k < K; ++k) {
      Wt s = 0;
#pragma unroll
      for (int c = 0; c < kMaxD; ++c) {
        if (c == d) break;
        const Wt diff = z[c] - Cs[c * Kp + k];
        s += diff * diff;
      }
      const Wt phi = exp(-gam[k] * s);
#pragma unroll
      for (int j = 0; j < kRC; ++j)
        if (i0 + j < r) acc[j] += static_cast<Wt>(job.M[(i0 + j) * job.sMi + k * job.sMk]) * phi;
    }
  }
  const Wt sc = job.scale;
  if (is_a) {
#pragma unroll
    for (int j = 0; j < kRC; ++j)
      if (i0 + j < r) outA[(i0 + j) * job.L + tg] = static_cast<T>(acc[j] * sc);
  } else {
    T* o = outB + tg * r + i0;
    if (vec_b && i0 + kRC <= r) {
      store_rc(o, acc, sc);
    } else {
#pragma unroll
      for (int j = 0; j < kRC; ++j)
        if (i0 + j < r) o[j] = static_cast<T>(acc[j] * sc);
    }
  }
}

// Shape of the backward's shared-memory tile, chosen on the host (backward_layout).
struct BwdShape {
  int r, K, d;
  int Kp;       // K rounded up to a multiple of 4: columns of Phi, E gamma, Ms, Cs (zero past K)
  int ldp;      // row pitch of Phi and E gamma: Kp, plus 4 where Kp / 4 is even, so that 8
                // consecutive rows fall in 8 distinct 16-byte bank groups (conflict-free 16-byte
                // accesses by lanes on consecutive coordinates)
  int tile;     // coordinates per tile, a multiple of 4
  bool m_smem;  // M staged in shared memory (else read from global memory)
  int64_t S;    // one block row of partial sums: K d + K + r K
  FastDiv div_tile, div_Kp;
};

// Shared memory of the backward kernel, in work-dtype elements: Phi and E gamma (tile x ldp
// each), Ms (r x Kp, where m_smem), centres (d x Kp), gamma (Kp), G (r x (tile + 4)): all read
// as 16-byte vectors, so first; then z (tile x d). At the main case (tile 64): 6.5 K floats.
inline int64_t backward_smem_elems(int64_t tile, int64_t r, int64_t Kp, int64_t ldp, int64_t d,
                                   bool m_smem) {
  return 2 * tile * ldp + (m_smem ? r * Kp : 0) + d * Kp + Kp + r * (tile + 4) + tile * d;
}

// Backward. Each block runs tiles bid, bid + nblocks, ... of its generator; per tile:
//   staging: G[i][t] (scaled gradient of the factor, zero past L) and z[t][c];
//   phase 1: item (p, q) = coordinates p and p + tile / 2, centres 4q .. 4q + 3: gPhi by an
//            r-long loop of 8 independent multiply-adds (G from shared memory, M as a broadcast
//            16-byte load), then 8 independent exps, Phi and E gamma = gPhi Phi gamma;
//   phase 2: items gM (i, 4 centres), gC (k, c), gg (k): sums over the tile's t, 4 t at a time
//            (rows past L have G = 0, so E = 0), into this block's row (stored by the block's
//            first tile, added by later ones; each entry always by the same thread); and gZ
//            (t, c), complete, stored.
// Centres k >= K (padding to Kp) have gamma = 0 and M = 0, so E gamma = 0 there.
// The minimum blocks per SM in the launch bounds keep ptxas from spilling a few registers to
// reach an occupancy it picks itself (seen at 64 registers); 2 blocks of the backward per SM is
// what the host's grid assumes (float64: 1, it needs ~140 registers).
template <typename P, typename Wt, typename T>
__global__ void __launch_bounds__(kNThreads, sizeof(Wt) == 8 ? 1 : 2)
genlora_synth_backward_kernel(Job<P, Wt> ja, Job<P, Wt> jb, const T* __restrict__ gA,
                              const T* __restrict__ gB, BwdShape sh) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int r = sh.r, K = sh.K, d = sh.d, Kp = sh.Kp, ldp = sh.ldp, tile = sh.tile;
  const int Kq = Kp / 4, half = tile / 2, ldg = tile + 4;  // ldg: G's pitch, see phase 2
  Wt* phi = reinterpret_cast<Wt*>(smem_raw);  // [tile][ldp]
  Wt* Eg = phi + tile * ldp;                   // [tile][ldp]  E gamma
  Wt* Ms = Eg + tile * ldp;                    // [r][Kp]      where m_smem
  Wt* Cs = Ms + (sh.m_smem ? r * Kp : 0);      // [d][Kp]
  Wt* gam = Cs + d * Kp;                       // [Kp]
  Wt* G = gam + Kp;                            // [r][ldg]     16-byte rows
  Wt* z = G + r * ldg;                         // [tile][d]
  const bool is_a = blockIdx.x < ja.nblocks;
  const Job<P, Wt> job = pick(ja, jb, is_a);
  const T* __restrict__ gout = is_a ? gA : gB;
  const int64_t bid = is_a ? blockIdx.x : blockIdx.x - ja.nblocks;
  const int64_t L = job.L, ntiles = (L + tile - 1) / tile;
  Wt* row = job.part + bid * sh.S;
  Wt* rowM = row + K * d + K;
  const int tid = threadIdx.x, nt = blockDim.x;
  // Staging, one index space [G | z | Ms | Cs | gamma]: every tile stages G and z, the first
  // also the rest (padding past L and K is zero, gamma there too).
  const int nG = r * tile, nZ = tile * d, nMs = sh.m_smem ? r * Kp : 0, nCs = d * Kp;
  const int oG = static_cast<int>(G - phi), oZ = static_cast<int>(z - phi);
  const int oMs = static_cast<int>(Ms - phi), oCs = static_cast<int>(Cs - phi);
  const int oGam = static_cast<int>(gam - phi);
  auto fix = [&](int off, Wt v) {
    const int k = off - oGam;
    return k < 0 || k >= Kp ? v : (k < K ? exp(v) : Wt(0));
  };
  // A value of a sum over t into this block's row: the first tile stores, later ones add.
  auto put = [](Wt* dst, bool first, Wt v) {
    if (first) *dst = v; else *dst += v;
  };
  // Phase 2 items, in this order: gM (i, 4 centres), gC (k, c), gg (k), gZ (t, c).
  const int nM = r * Kq, nMC = nM + K * d, nMCg = nMC + K, n2 = nMCg + tile * d;
  for (int64_t tix = bid; tix < ntiles; tix += job.nblocks) {
    const bool first = tix == bid;
    const int64_t t0 = tix * tile;
    const int tl = static_cast<int>(std::min<int64_t>(tile, L - t0));
    const int tl4 = (tl + 3) / 4 * 4;  // <= tile; rows tl .. tl4 - 1 add zeros
    if (!first) __syncthreads();  // the previous tile's phase 2 is done with G, z, Phi, E
    auto ld = [&](int e, int& off) -> Wt {
      if (e < nG) {  // lanes on consecutive t: gA (r, n) coalesced, gB (m, r) r apart (L1)
        const int i = fdiv(e, sh.div_tile), t = e - i * tile;
        off = oG + i * ldg + t;
        if (t >= tl) return Wt(0);
        return static_cast<Wt>(gout[is_a ? i * L + t0 + t : (t0 + t) * r + i]) * job.scale;
      }
      e -= nG;
      if (e < nZ) {
        off = oZ + e;
        return e < tl * d ? static_cast<Wt>(job.Z[t0 * d + e]) : Wt(0);
      }
      e -= nZ;
      if (e < nMs) {
        const int i = fdiv(e, sh.div_Kp), k = e - i * Kp;
        off = oMs + e;
        return k < K ? static_cast<Wt>(job.M[i * job.sMi + k * job.sMk]) : Wt(0);
      }
      e -= nMs;
      if (e < nCs) {
        const int c = fdiv(e, sh.div_Kp), k = e - c * Kp;
        off = oCs + e;
        return k < K ? static_cast<Wt>(job.C[k * d + c]) : Wt(0);
      }
      e -= nCs;
      off = oGam + e;
      return e < K ? static_cast<Wt>(job.g[e]) : Wt(0);
    };
    stage(phi, nG + nZ + (first ? nMs + nCs + Kp : 0), ld, fix);
    __syncthreads();

    // Phase 1: lanes on consecutive p (G loads contiguous, Phi / E rows stored conflict-free).
    auto phase1 = [&](auto m_in_smem) {
      for (int e = tid; e < half * Kq; e += nt) {
        const int p = e % half, q = e / half, k0 = 4 * q;
        Wt a0[4] = {0, 0, 0, 0}, a1[4] = {0, 0, 0, 0};  // gPhi at coordinates p, p + half
#pragma unroll 4
        for (int i = 0; i < r; ++i) {
          const Wt g0 = G[i * ldg + p], g1 = G[i * ldg + p + half];
          Wt mv[4];
          if constexpr (decltype(m_in_smem)::value) {
            ld4(Ms + i * Kp + k0, mv);
          } else {
#pragma unroll
            for (int l = 0; l < 4; ++l)
              mv[l] = k0 + l < K ? static_cast<Wt>(job.M[i * job.sMi + (k0 + l) * job.sMk])
                                 : Wt(0);
          }
#pragma unroll
          for (int l = 0; l < 4; ++l) {
            a0[l] += g0 * mv[l];
            a1[l] += g1 * mv[l];
          }
        }
        Wt s0[4] = {0, 0, 0, 0}, s1[4] = {0, 0, 0, 0};
#pragma unroll
        for (int c = 0; c < kMaxD; ++c) {
          if (c == d) break;
          Wt cv[4];
          ld4(Cs + c * Kp + k0, cv);
          const Wt z0 = z[p * d + c], z1 = z[(p + half) * d + c];
#pragma unroll
          for (int l = 0; l < 4; ++l) {
            const Wt d0 = z0 - cv[l], d1 = z1 - cv[l];
            s0[l] += d0 * d0;
            s1[l] += d1 * d1;
          }
        }
        Wt gm[4], f0[4], f1[4];
        ld4(gam + k0, gm);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
          f0[l] = exp(-gm[l] * s0[l]);
          f1[l] = exp(-gm[l] * s1[l]);
          a0[l] = a0[l] * f0[l] * gm[l];  // E gamma
          a1[l] = a1[l] * f1[l] * gm[l];
        }
        st4(phi + p * ldp + k0, f0);
        st4(phi + (p + half) * ldp + k0, f1);
        st4(Eg + p * ldp + k0, a0);
        st4(Eg + (p + half) * ldp + k0, a1);
      }
    };
    if (sh.m_smem) phase1(std::true_type{}); else phase1(std::false_type{});
    __syncthreads();

    // Phase 2. gM items: lanes on consecutive q read one Phi row contiguously, and the few rows
    // i of a warp read G[i][t .. t + 3] from distinct 16-byte bank groups (pitch tile + 4, an
    // odd number of 16-byte units for tiles >= 8).
    for (int e = tid; e < n2; e += nt) {
      if (e < nM) {
        const int i = e / Kq, q = e - i * Kq, k0 = 4 * q;
        const Wt* Gi = G + i * ldg;
        Wt a[4] = {0, 0, 0, 0};
        for (int t = 0; t < tl4; t += 4) {
          Wt gi[4];
          ld4(Gi + t, gi);
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            Wt f[4];
            ld4(phi + (t + u) * ldp + k0, f);
#pragma unroll
            for (int l = 0; l < 4; ++l) a[l] += gi[u] * f[l];
          }
        }
#pragma unroll
        for (int l = 0; l < 4; ++l)
          if (k0 + l < K) put(rowM + i * job.sMi + (k0 + l) * job.sMk, first, a[l]);
      } else if (e < nMC) {  // gC[k, c] = 2 sum_t E gamma D: lanes on consecutive k
        const int e2 = e - nM, k = e2 / d, c = e2 - k * d;
        const Wt ck = Cs[c * Kp + k];
        Wt ac = 0;
#pragma unroll 4
        for (int t = 0; t < tl4; ++t) ac += Eg[t * ldp + k] * (z[t * d + c] - ck);
        put(row + k * d + c, first, 2 * ac);
      } else if (e < nMCg) {  // gg[k] = -sum_t E gamma ||D||^2, 4 t at a time
        const int k = e - nMC;
        Wt ck[kMaxD];
#pragma unroll
        for (int c = 0; c < kMaxD; ++c) ck[c] = c < d ? Cs[c * Kp + k] : Wt(0);
        Wt ag = 0;
        for (int t = 0; t < tl4; t += 4) {
          Wt s[4] = {0, 0, 0, 0};
#pragma unroll
          for (int c = 0; c < kMaxD; ++c) {
            if (c == d) break;
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              const Wt diff = z[(t + u) * d + c] - ck[c];
              s[u] += diff * diff;
            }
          }
#pragma unroll
          for (int u = 0; u < 4; ++u) ag += Eg[(t + u) * ldp + k] * s[u];
        }
        put(row + K * d + k, first, -ag);
      } else {  // gZ[t, c], complete: lanes on consecutive t read E rows conflict-free
        const int e2 = e - nMCg, t = e2 / d, c = e2 - t * d;
        if (t >= tl) continue;
        const Wt zc = z[t * d + c];
        Wt acc = 0;
#pragma unroll 2
        for (int q = 0; q < Kq; ++q) {
          Wt eg[4], cv[4];
          ld4(Eg + t * ldp + 4 * q, eg);
          ld4(Cs + c * Kp + 4 * q, cv);
#pragma unroll
          for (int l = 0; l < 4; ++l) acc += eg[l] * (zc - cv[l]);
        }
        job.gZ[(t0 + t) * d + c] = static_cast<P>(-2 * acc);
      }
    }
  }
}

// Sums the block rows of the workspace into the six gradients (gC, gg, gM of A, then of B),
// written in the parameters' dtype. Block (generator, 32 entries): warp w adds rows w, w + 8, ...
// of that generator, then warp 0 adds the 8 sums; a fixed order, so the result is reproducible.
template <typename P>
struct GradOutputs {
  P* gC_a; P* gg_a; P* gM_a;
  P* gC_b; P* gg_b; P* gM_b;
};

template <typename P, typename Wt>
__global__ void __launch_bounds__(kNThreads)
genlora_partial_sum_kernel(const Wt* __restrict__ ws, int64_t S, int64_t nbA, int64_t nbB,
                           int64_t chunks, int64_t Kd, int64_t K, GradOutputs<P> o) {
  __shared__ Wt red[kSumRows][32];
  const bool is_b = blockIdx.x >= chunks;
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  const int64_t e = (blockIdx.x - (is_b ? chunks : 0)) * 32 + lane;
  const int64_t nb = is_b ? nbB : nbA;
  const Wt* rows = ws + (is_b ? nbA : 0) * S;
  Wt s = 0;
  if (e < S) {
#pragma unroll 8
    for (int64_t b = w; b < nb; b += kSumRows) s += rows[b * S + e];
  }
  red[w][lane] = s;
  __syncthreads();
  if (w != 0 || e >= S) return;
  Wt total = red[0][lane];
#pragma unroll
  for (int v = 1; v < kSumRows; ++v) total += red[v][lane];
  const P val = static_cast<P>(total);
  if (e < Kd) (is_b ? o.gC_b : o.gC_a)[e] = val;
  else if (e < Kd + K) (is_b ? o.gg_b : o.gg_a)[e - Kd] = val;
  else (is_b ? o.gM_b : o.gM_a)[e - Kd - K] = val;
}

struct GenParams {
  Tensor Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B;
};

void check_genlora_params(const char* op, const Tensor& like, const GenParams& p, int64_t n,
                          int64_t m) {
  const std::pair<const Tensor*, const char*> all[] = {
      {&p.Z_A, "genlora_a_latent"}, {&p.C_A, "genlora_a_centers"},
      {&p.g_A, "genlora_a_log_gamma"}, {&p.M_A, "genlora_a_mix"}, {&p.Z_B, "genlora_b_latent"},
      {&p.C_B, "genlora_b_centers"}, {&p.g_B, "genlora_b_log_gamma"}, {&p.M_B, "genlora_b_mix"}};
  for (const auto& [t, name] : all) {
    check_cuda(*t, name, like);
    check_float(*t, name);
    TORCH_CHECK(t->scalar_type() == p.M_A.scalar_type(), op, ": ", name, " has dtype ",
                t->scalar_type(), " but genlora_a_mix has ", p.M_A.scalar_type());
  }
  TORCH_CHECK(p.M_A.dim() == 2, op, ": genlora_a_mix must be (r, K), got ", shape(p.M_A.sizes()));
  const int64_t r = p.M_A.size(0), K = p.M_A.size(1);
  TORCH_CHECK(p.Z_A.dim() == 2, op, ": genlora_a_latent must be (in, d), got ", shape(p.Z_A.sizes()));
  const int64_t d = p.Z_A.size(1);
  TORCH_CHECK(r >= 1 && r <= kMaxR, op, ": the CUDA kernels support r from 1 to ", num(kMaxR),
              ", got r=", num(r));
  TORCH_CHECK(K >= 1 && K <= kMaxK, op, ": the CUDA kernels support num_rbf from 1 to ", num(kMaxK),
              ", got ", num(K));
  TORCH_CHECK(d >= 1 && d <= kMaxD, op, ": the CUDA kernels support latent_dim from 1 to ",
              num(kMaxD), ", got ", num(d));
  auto shape_is = [&](const Tensor& t, std::initializer_list<int64_t> s, const char* name) {
    TORCH_CHECK(t.sizes() == c10::IntArrayRef(s), op, ": ", name, " must have shape ",
                shape(c10::IntArrayRef(s)), ", got ", shape(t.sizes()));
  };
  shape_is(p.Z_A, {n, d}, "genlora_a_latent");
  shape_is(p.C_A, {K, d}, "genlora_a_centers");
  shape_is(p.g_A, {K}, "genlora_a_log_gamma");
  shape_is(p.Z_B, {m, d}, "genlora_b_latent");
  shape_is(p.C_B, {K, d}, "genlora_b_centers");
  shape_is(p.g_B, {K}, "genlora_b_log_gamma");
  shape_is(p.M_B, {K, r}, "genlora_b_mix");
}

template <typename P, typename Wt>
Job<P, Wt> make_job(const Tensor& Z, const Tensor& C, const Tensor& g, const Tensor& M,
                    bool is_a, int64_t r, double scale) {
  Job<P, Wt> j{};
  j.Z = Z.data_ptr<P>(); j.C = C.data_ptr<P>(); j.g = g.data_ptr<P>(); j.M = M.data_ptr<P>();
  j.L = Z.size(0);
  const int64_t K = C.size(0);
  if (is_a) {  // M_A (r, K): M[i, k] at i * K + k
    j.sMi = K; j.sMk = 1;
  } else {     // M_B (K, r) read as M_B^T: M[i, k] at k * r + i
    j.sMi = 1; j.sMk = r;
  }
  j.scale = static_cast<Wt>(scale);
  return j;
}

GenParams to_dtype(const GenParams& p, at::ScalarType wt) {
  auto w = [&](const Tensor& t) { return as_dtype(t, wt); };
  return {w(p.Z_A), w(p.C_A), w(p.g_A), w(p.M_A), w(p.Z_B), w(p.C_B), w(p.g_B), w(p.M_B)};
}

std::tuple<Tensor, Tensor> synth(const GenParams& p, double scaling, at::ScalarType dtype) {
  POLYKERN_SCOPE("polykern::genlora_synth");
  const auto pt = gen_param_dtype(p.M_A.scalar_type(), dtype);
  const GenParams w = to_dtype(p, pt);  // no copy in the supported dtype pairs
  const int64_t r = p.M_A.size(0), K = p.M_A.size(1), d = p.Z_A.size(1);
  const int64_t n = p.Z_A.size(0), m = p.Z_B.size(0);
  Tensor A = at::empty({r, n}, p.M_A.options().dtype(dtype));
  Tensor B = at::empty({m, r}, p.M_A.options().dtype(dtype));
  maybe_poison(A); maybe_poison(B);
  auto stream = at::cuda::getCurrentCUDAStream();
  POLYKERN_DISPATCH_GEN(pt, dtype, "genlora_expand", [&] {
    // nch threads per coordinate (kRC rows each); M staged in shared memory where it fits.
    const int64_t nch = (r + kRC - 1) / kRC, tile = kSynthThreads / nch, Kp = (K + 3) / 4 * 4;
    const int64_t ms_elems = Kp * nch * kRC, rest = d * Kp + Kp;
    const bool m_smem = static_cast<int64_t>(sizeof(wt_t)) * (ms_elems + rest) <= kSmemBudget;
    const size_t smem = sizeof(wt_t) * ((m_smem ? ms_elems : 0) + rest);
    auto ja = make_job<p_t, wt_t>(w.Z_A, w.C_A, w.g_A, w.M_A, true, r, 1.0);
    auto jb = make_job<p_t, wt_t>(w.Z_B, w.C_B, w.g_B, w.M_B, false, r, scaling);
    ja.nblocks = (n + tile - 1) / tile;
    jb.nblocks = (m + tile - 1) / tile;
    io_t* b_ptr = B.data_ptr<io_t>();
    const bool vec_b = (r * static_cast<int64_t>(sizeof(io_t))) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(b_ptr) % 16 == 0;
    const int64_t grid = ja.nblocks + jb.nblocks;
    if (grid == 0) return;
    genlora_synth_kernel<p_t, wt_t, io_t>
        <<<static_cast<unsigned>(grid), kSynthThreads, smem, stream>>>(
            ja, jb, A.data_ptr<io_t>(), b_ptr, static_cast<int>(r), static_cast<int>(K),
            static_cast<int>(d), static_cast<int>(tile), m_smem, vec_b, fast_div(nch * kRC),
            fast_div(Kp));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {A, B};
}

// The backward's tile: the largest up to kMaxBwdTile whose shared memory (with M staged) fits
// in 48 KB, down to kMinSmemMTile; below that M is read from global memory and the tile is the
// largest that fits without it (float: 8 at K = 256, r = 128, d = 8; float64: 4, the least:
// the kernel's t loops go 4 at a time).
template <typename Wt>
BwdShape backward_layout(int64_t r, int64_t K, int64_t d) {
  BwdShape sh{};
  sh.r = static_cast<int>(r); sh.K = static_cast<int>(K); sh.d = static_cast<int>(d);
  const int64_t Kp = (K + 3) / 4 * 4, ldp = (Kp / 4) % 2 == 0 ? Kp + 4 : Kp;
  sh.Kp = static_cast<int>(Kp); sh.ldp = static_cast<int>(ldp);
  auto fits = [&](int64_t tile, bool m_smem) {
    return static_cast<int64_t>(sizeof(Wt)) * backward_smem_elems(tile, r, Kp, ldp, d, m_smem) <=
           kSmemBudget;
  };
  int64_t tile = kMaxBwdTile;
  while (tile > kMinSmemMTile && !fits(tile, true)) tile /= 2;
  sh.m_smem = fits(tile, true);
  if (!sh.m_smem) {
    tile = kMaxBwdTile;
    while (tile > 4 && !fits(tile, false)) tile /= 2;
  }
  TORCH_INTERNAL_ASSERT(fits(tile, sh.m_smem), "genlora backward: no tile fits (K ", num(K),
                        ", r ", num(r), ", d ", num(d), ")");
  sh.tile = static_cast<int>(tile);
  sh.S = K * d + K + r * K;
  sh.div_tile = fast_div(tile);
  sh.div_Kp = fast_div(Kp);
  return sh;
}

std::vector<Tensor> synth_backward(const Tensor& gA, const Tensor& gB, const GenParams& p,
                                   double scaling) {
  POLYKERN_SCOPE("polykern::genlora_synth_backward");
  // The sums over coordinates are per-block partials added in a fixed order (no atomics): the
  // gradients repeat bitwise, so there is no alertNotDeterministic here.
  const auto pt = gen_param_dtype(p.M_A.scalar_type(), gA.scalar_type());
  const auto wt = pt == at::kDouble ? at::kDouble : at::kFloat;
  const GenParams w = to_dtype(p, pt);
  const int64_t r = p.M_A.size(0), K = p.M_A.size(1), d = p.Z_A.size(1);
  const int64_t n = p.Z_A.size(0), m = p.Z_B.size(0);
  const Tensor gAc = gA.contiguous(), gBc = gB.contiguous();
  const auto po = w.M_A.options();  // the gradients, in the (generator) parameter dtype
  Tensor gZ_A = at::empty_like(w.Z_A), gZ_B = at::empty_like(w.Z_B);
  Tensor gC_A = at::empty({K, d}, po), gg_A = at::empty({K}, po), gM_A = at::empty({r, K}, po);
  Tensor gC_B = at::empty({K, d}, po), gg_B = at::empty({K}, po), gM_B = at::empty({K, r}, po);
  for (const Tensor* t : {&gZ_A, &gZ_B, &gC_A, &gg_A, &gM_A, &gC_B, &gg_B, &gM_B})
    maybe_poison(*t);
  auto stream = at::cuda::getCurrentCUDAStream();
  POLYKERN_DISPATCH_GEN(pt, gAc.scalar_type(), "genlora_linear_backward", [&] {
    const BwdShape sh = backward_layout<wt_t>(r, K, d);
    const size_t smem =
        sizeof(wt_t) * backward_smem_elems(sh.tile, r, sh.Kp, sh.ldp, d, sh.m_smem);
    // One wave: up to 2 blocks per SM (2 x 8 warps), each running several tiles where there
    // are more; every block row costs S work-dtype values of workspace and of summing.
    const int64_t tilesA = (n + sh.tile - 1) / sh.tile, tilesB = (m + sh.tile - 1) / sh.tile;
    const int64_t cap = 2 * static_cast<int64_t>(
                                at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    const int64_t total_tiles = tilesA + tilesB;
    auto blocks = [&](int64_t tiles) {  // this generator's share of the cap, at least one block
      if (total_tiles <= cap || tiles == 0) return tiles;
      return std::min(tiles, std::max<int64_t>(1, (tiles * cap + total_tiles - 1) / total_tiles));
    };
    auto ja = make_job<p_t, wt_t>(w.Z_A, w.C_A, w.g_A, w.M_A, true, r, 1.0);
    auto jb = make_job<p_t, wt_t>(w.Z_B, w.C_B, w.g_B, w.M_B, false, r, scaling);
    ja.nblocks = blocks(tilesA);
    jb.nblocks = blocks(tilesB);
    // Every entry of every block row is written by that block's first tile: no zeroing.
    Tensor ws = at::empty({(ja.nblocks + jb.nblocks) * sh.S}, po.dtype(wt));
    wt_t* base = ws.data_ptr<wt_t>();
    ja.gZ = gZ_A.data_ptr<p_t>(); jb.gZ = gZ_B.data_ptr<p_t>();
    ja.part = base; jb.part = base + ja.nblocks * sh.S;
    const int64_t grid = ja.nblocks + jb.nblocks;
    if (grid > 0) {
      genlora_synth_backward_kernel<p_t, wt_t, io_t>
          <<<static_cast<unsigned>(grid), kNThreads, smem, stream>>>(
              ja, jb, gAc.data_ptr<io_t>(), gBc.data_ptr<io_t>(), sh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const GradOutputs<p_t> outs{gC_A.data_ptr<p_t>(), gg_A.data_ptr<p_t>(), gM_A.data_ptr<p_t>(),
                                gC_B.data_ptr<p_t>(), gg_B.data_ptr<p_t>(), gM_B.data_ptr<p_t>()};
    const int64_t chunks = (sh.S + 31) / 32;
    genlora_partial_sum_kernel<p_t, wt_t>
        <<<static_cast<unsigned>(2 * chunks), kNThreads, 0, stream>>>(
            base, sh.S, ja.nblocks, jb.nblocks, chunks, K * d, K, outs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto pd = p.M_A.scalar_type();  // no copy where the dtypes already agree
  return {as_dtype(gZ_A, pd), as_dtype(gC_A, pd), as_dtype(gg_A, pd), as_dtype(gM_A, pd),
          as_dtype(gZ_B, pd), as_dtype(gC_B, pd), as_dtype(gg_B, pd), as_dtype(gM_B, pd)};
}

// ---- ops -----------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> genlora_expand_op(const Tensor& Z_A, const Tensor& C_A,
                                             const Tensor& g_A, const Tensor& M_A,
                                             const Tensor& Z_B, const Tensor& C_B,
                                             const Tensor& g_B, const Tensor& M_B, double scaling,
                                             at::ScalarType dtype) {
  GenParams p{Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B};
  check_genlora_params("genlora_expand", M_A, p, Z_A.size(0), Z_B.size(0));
  const c10::cuda::CUDAGuard guard(M_A.device());
  return synth(p, scaling, dtype);
}

std::tuple<Tensor, Tensor> genlora_linear_op(
    const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias, const Tensor& Z_A,
    const Tensor& C_A, const Tensor& g_A, const Tensor& M_A, const Tensor& Z_B, const Tensor& C_B,
    const Tensor& g_B, const Tensor& M_B, double scaling,
    const std::optional<Tensor>& x_adapter) {
  GenParams p{Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B};
  {
    POLYKERN_SCOPE("polykern::checks");
    check_linear_inputs("genlora_linear", x, W, bias, x_adapter);
    check_genlora_params("genlora_linear", x, p, W.size(1), W.size(0));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto [A_gen, B_gen] = synth(p, scaling, x.scalar_type());
  return adapter_forward(x, W, bias, A_gen, B_gen, x_adapter);
}

Tensor genlora_linear_inference_op(const Tensor& x, const Tensor& W,
                                   const std::optional<Tensor>& bias, const Tensor& Z_A,
                                   const Tensor& C_A, const Tensor& g_A, const Tensor& M_A,
                                   const Tensor& Z_B, const Tensor& C_B, const Tensor& g_B,
                                   const Tensor& M_B, double scaling) {
  check_linear_inputs("genlora_linear_inference", x, W, bias, std::nullopt);
  GenParams p{Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B};
  check_genlora_params("genlora_linear_inference", x, p, W.size(1), W.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  auto [A_gen, B_gen] = synth(p, scaling, x.scalar_type());
  return adapter_linear(x, W, bias, A_gen, B_gen);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
genlora_linear_backward_op(const Tensor& grad_y, const Tensor& x,
                           const std::optional<Tensor>& x_adapter, const Tensor& W,
                           const Tensor& Z_A, const Tensor& C_A, const Tensor& g_A,
                           const Tensor& M_A, const Tensor& Z_B, const Tensor& C_B,
                           const Tensor& g_B, const Tensor& M_B, double scaling, const Tensor& U,
                           std::array<bool, 3> output_mask) {
  check_cuda(grad_y, "grad_y", x);
  check_cuda(U, "U", x);
  const c10::cuda::CUDAGuard guard(x.device());
  GenParams p{Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B};
  auto [A_gen, B_gen] = synth(p, scaling, grad_y.scalar_type());
  auto [gX, gXa, gA_gen, gB_gen] = adapter_backward(grad_y, x, x_adapter, W, A_gen, B_gen, U,
                                                    output_mask[0], output_mask[1],
                                                    output_mask[2]);
  if (output_mask[2]) {
    auto g = synth_backward(gA_gen, gB_gen, p, scaling);
    return {gX, gXa, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
  }
  auto none = [](const Tensor& t) { return at::empty({0}, t.options()); };
  return {gX,       gXa,       none(Z_A), none(C_A), none(g_A),
          none(M_A), none(Z_B), none(C_B), none(g_B), none(M_B)};
}

}  // namespace

TORCH_LIBRARY_IMPL(polykern, CUDA, m) {
  m.impl("genlora_linear", &genlora_linear_op);
  m.impl("genlora_linear_backward", &genlora_linear_backward_op);
  m.impl("genlora_linear_inference", &genlora_linear_inference_op);
  m.impl("genlora_expand", &genlora_expand_op);
}

}  // namespace polykern
