// The fused gY pass: gU = gY B_gen (N, R) and gB_gen = gY^T U (m, R) from ONE read of
// gY (N, m), for bf16/fp16 and R = 8 or 16. Two cuBLASLt GEMMs read gY twice: at N = 8192,
// m = 4096 that is 2 x 64 MiB, 25-29 us each on the H100.
//
// Each CTA owns a chunk of rows of gY and a block of NC x 64 columns. It streams 64 x 64 tiles of
// gY through shared memory (cp.async, 4 deep) and, with tensor-core mma.sync, adds each tile
// into two accumulators held in registers:
//   gU rows of the tile (64 x R)  += tile   (64 x 64) . B_gen[cols] (64 x R)  over its NC columns,
//   gB_gen of the columns (64 x R) += tile^T (64 x 64) . U[rows]    (64 x R)  over all its rows.
// Both are partial sums: gU over the CTA's columns, gB_gen over its rows. They are written in
// fp32 as partials (Pu: one per column block, Pb: one per row chunk) and one small kernel sums
// them in a fixed order and rounds to the compute dtype: deterministic, no atomics.
// Partial bytes: Pu = (m / (64 NC)) N R 4, Pb = (N / rows per chunk) m R 4: 12 MiB at R = 16,
// N = 8192, m = 4096 against the 64 MiB read of gY it saves.
// R = 32 (the kernel is written for R padded to 16 or 32) was measured and left off: 38.4 us
// plus 6.4 us of summing (16 MiB of Pu, since NC halves) against about 48 us for the two GEMMs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common.h"
#include "cp_async.cuh"

namespace polykern {
namespace {

constexpr int kThreads = 128;      // 4 warps
constexpr int kTile = 64;          // gY tiles of 64 rows x 64 columns
constexpr int kLd = kTile + 8;     // padded shared row (144 B): ldmatrix rows on distinct banks
constexpr int kUBuf = 3;           // U slices in shared memory (a ring over row tiles)
constexpr int kMinChunkRows = 128;  // rows per CTA at least: bounds the Pb partials (see top)

// RP: R padded to 16 (or 32, not instantiated: see the top); NC: column tiles per CTA, so that
// the gB_gen accumulators (NC x RP / 8 x 4 floats per thread) stay at 64 registers.
// S: cp.async pipeline depth (gY tiles in flight per CTA: S - 1 while one is computed).
template <int RP, int S>
struct Cfg {
  static constexpr int NC = 128 / RP;
  static constexpr int LDR = RP + 8;  // padded shared row of the B_gen and U slices
  static constexpr size_t smem_elems =
      size_t(S) * kTile * kLd + size_t(NC) * kTile * LDR + kUBuf * size_t(kTile) * LDR;
};

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// D (+)= A B on the tensor cores, m16n8k16, fp32 accumulators, A/B in bf16 or fp16.
#define POLYKERN_MMA16816(TY)                                                                  \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY                            \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                  \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, at::Half>) POLYKERN_MMA16816("f16");
  else POLYKERN_MMA16816("bf16");
}
#undef POLYKERN_MMA16816

// A warp's m16 x (8 NT) accumulator tile into an fp32 (rows, R) partial: this lane's rows `row`
// and row + 8 (those below `rows`), columns 8 nt + 2 (lane & 3), +1 (those below R).
template <int NT>
__device__ __forceinline__ void store_acc(const float (&acc)[NT][4], float* out, int64_t row,
                                          int64_t rows, int R, int tq) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int c = 8 * nt + 2 * tq;
    if (c >= R) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (row + 8 * h < rows)
        *reinterpret_cast<float2*>(out + (row + 8 * h) * R + c) =
            make_float2(acc[nt][2 * h], acc[nt][2 * h + 1]);
  }
}

struct GyArgs {
  const void* gy;  // (N, m), row stride ldg (elements), 16-byte aligned rows
  const void* B;   // (m, R) contiguous
  const void* U;   // (N, R) contiguous
  float* Pu;       // (CB, N, R): gU partial per column block
  float* Pb;       // (RBn, m, R): gB_gen partial per row chunk
  int64_t N, m, ldg;
  int R;
  int chunk_rows;  // rows per CTA (multiple of 64)
};

// grid (CB, RBn): blockIdx.x = column block of NC x 64 columns, blockIdx.y = row chunk.
// gY's loads are marked evict-first in L2 (read once), so that the B_gen and U slices, which
// every CTA reads, and the partials stay there: 34.3 -> 29.8 us at the main case (H100).
template <typename T, int RP, int kStages>
__global__ void __launch_bounds__(kThreads)
gy_pass_kernel(const GyArgs a) {
  using C = Cfg<RP, kStages>;
  constexpr int NC = C::NC, LDR = C::LDR, NT = RP / 8;
  static_assert((kUBuf - 1) * NC >= kStages - 1, "the U ring is too short for the pipeline");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* Ts = reinterpret_cast<T*>(smem_raw);         // [kStages][64][kLd]
  T* Bs = Ts + kStages * kTile * kLd;              // [NC * 64][LDR]
  T* Us = Bs + NC * kTile * LDR;                   // [kUBuf][64][LDR]
  const T* gy = static_cast<const T*>(a.gy);
  const T* Bg = static_cast<const T*>(a.B);
  const T* Ug = static_cast<const T*>(a.U);
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const uint64_t policy = evict_first_policy();
  const int64_t col0 = int64_t(blockIdx.x) * NC * kTile;
  const int64_t row0 = int64_t(blockIdx.y) * a.chunk_rows;
  const int64_t rows_here = std::min<int64_t>(a.chunk_rows, a.N - row0);
  const int n_rt = static_cast<int>((rows_here + kTile - 1) / kTile);  // row tiles (>= 1)
  const int R = a.R, rchunks = R / 8;                                   // 16-byte chunks per row

  // The padded columns [R, RP) of the B_gen and U slices are zero once and never loaded.
  const T zero = T(0.0f);
  for (int e = tid; e < (NC * kTile + kUBuf * kTile) * (RP - R); e += kThreads) {
    const int row = e / (RP - R), c = R + e % (RP - R);
    (row < NC * kTile ? Bs[row * LDR + c] : Us[(row - NC * kTile) * LDR + c]) = zero;
  }
  // The B_gen slice of this column block (rows past m zero-filled), in the first cp.async group.
  for (int e = tid; e < NC * kTile * rchunks; e += kThreads) {
    const int row = e / rchunks, ch = e % rchunks;
    const bool ok = col0 + row < a.m;
    cp_async16(Bs + row * LDR + ch * 8, ok ? Bg + (col0 + row) * R + ch * 8 : Bg, ok);
  }

  // Step t = (row tile i, column tile j) with t = i * NC + j; its loads: the gY tile, and with
  // j == 0 the U slice of row tile i (buffer i % kUBuf; free by then, see below).
  const int steps = n_rt * NC;
  auto issue = [&](int t) {
    if (t < steps) {
      const int i = t / NC, j = t % NC;
      T* dst = Ts + (t % kStages) * kTile * kLd;
      const int64_t r_base = row0 + int64_t(i) * kTile, c_base = col0 + int64_t(j) * kTile;
#pragma unroll
      for (int q = 0; q < kTile * 8 / kThreads; ++q) {  // 512 chunks of 16 B, 4 per thread
        const int e = tid + q * kThreads, row = e >> 3, ch = e & 7;
        const int64_t gr = r_base + row, gc = c_base + ch * 8;
        const bool ok = gr < row0 + rows_here && gc < a.m;
        cp_async16(dst + row * kLd + ch * 8, ok ? gy + gr * a.ldg + gc : gy, ok, policy);
      }
      if (j == 0) {
        T* ud = Us + (i % kUBuf) * kTile * LDR;
        for (int e = tid; e < kTile * rchunks; e += kThreads) {
          const int row = e / rchunks, ch = e % rchunks;
          const bool ok = r_base + row < row0 + rows_here;
          cp_async16(ud + row * LDR + ch * 8, ok ? Ug + (r_base + row) * R + ch * 8 : Ug, ok);
        }
      }
    }
    cp_async_commit();  // one group per step, empty past the end: the wait counts stay uniform
  };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) issue(t);

  float accU[NT][4];      // gU of rows 16 w + (g, g + 8) of the current row tile
  float accB[NC][NT][4];  // gB_gen of columns 16 w + (g, g + 8) of each column tile
#pragma unroll
  for (int j = 0; j < NC; ++j)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int v = 0; v < 4; ++v) accB[j][nt][v] = 0.f;

  const int g = lane >> 2, tq = lane & 3;
  // ldmatrix lane addressing: x4 of a 16 x 16 block. Non-transposed A (rows = m, cols = k):
  // lane -> row (lane & 15), col 8 (lane >> 4). Transposed (stored [k][n]) for a B operand:
  // row k = (lane & 7) + 8 ((lane >> 3) & 1), col n = 8 (lane >> 4). Transposed for an A
  // operand stored [k][m]: row k = (lane & 7) + 8 (lane >> 4), col m = 8 ((lane >> 3) & 1).
  const int a_row = lane & 15, a_col = 8 * (lane >> 4);
  const int bt_row = (lane & 7) + 8 * ((lane >> 3) & 1), bt_col = 8 * (lane >> 4);
  const int at_row = (lane & 7) + 8 * (lane >> 4), at_col = 8 * ((lane >> 3) & 1);

  for (int i = 0; i < n_rt; ++i) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int v = 0; v < 4; ++v) accU[nt][v] = 0.f;
    const T* us = Us + (i % kUBuf) * kTile * LDR;
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      const int t = i * NC + j;
      cp_async_wait<kStages - 2>();  // step t's group (and the B_gen slice) has landed
      __syncthreads();               // ... for every thread; step t - 1's buffers are free
      // Step t + kStages - 1 reuses step t - 1's tile buffer. When it starts row tile i', its
      // U buffer (i' % kUBuf) was last read by row tile i' - kUBuf, whose last step
      // (i' - kUBuf + 1) NC - 1 = t + kStages - 2 - (kUBuf - 1) NC is at most t - 1.
      issue(t + kStages - 1);
      const T* ts = Ts + (t % kStages) * kTile * kLd;
      const T* bs = Bs + j * kTile * LDR;
#pragma unroll
      for (int kk = 0; kk < kTile / 16; ++kk) {
        uint32_t fa[4];  // gU: tile rows 16 w.. (m) x tile columns 16 kk.. (k)
        ldsm_x4(fa, ts + (16 * w + a_row) * kLd + 16 * kk + a_col);
        uint32_t ft[4];  // gB: tile^T, columns 16 w.. (m) x tile rows 16 kk.. (k)
        ldsm_x4_t(ft, ts + (16 * kk + at_row) * kLd + 16 * w + at_col);
#pragma unroll
        for (int np = 0; np < RP / 16; ++np) {
          uint32_t fb[4];
          ldsm_x4_t(fb, bs + (16 * kk + bt_row) * LDR + 16 * np + bt_col);
          mma16816<T>(accU[2 * np], fa, fb[0], fb[1]);
          mma16816<T>(accU[2 * np + 1], fa, fb[2], fb[3]);
          uint32_t fu[4];
          ldsm_x4_t(fu, us + (16 * kk + bt_row) * LDR + 16 * np + bt_col);
          mma16816<T>(accB[j][2 * np], ft, fu[0], fu[1]);
          mma16816<T>(accB[j][2 * np + 1], ft, fu[2], fu[3]);
        }
      }
    }
    // gU partial of this row tile over this column block: rows 16 w + g (+ 8).
    store_acc<NT>(accU, a.Pu + int64_t(blockIdx.x) * a.N * R,
                  row0 + int64_t(i) * kTile + 16 * w + g, a.N, R, tq);
  }
  cp_async_wait<0>();
  // gB_gen partial of this row chunk: columns col0 + 64 j + 16 w + g (+ 8).
#pragma unroll
  for (int j = 0; j < NC; ++j)
    store_acc<NT>(accB[j], a.Pb + int64_t(blockIdx.y) * a.m * R,
                  col0 + j * kTile + 16 * w + g, a.m, R, tq);
}

// gU[e] = sum_cb Pu[cb][e] (e < N R), gB[e] = sum_rb Pb[rb][e] (e < m R), in a fixed order,
// four elements per thread (N R and m R are multiples of 8).
template <typename T>
__global__ void __launch_bounds__(256)
gy_pass_sum_kernel(const float* __restrict__ Pu, const float* __restrict__ Pb, T* __restrict__ gU,
                   T* __restrict__ gB, int64_t nu, int64_t nb, int CB, int RBn) {
  const int64_t q = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  const bool is_u = q < nu;
  const int64_t e = is_u ? q : q - nu;
  if (!is_u && e >= nb) return;
  const float* src = is_u ? Pu : Pb;
  const int64_t stride = is_u ? nu : nb;
  const int parts = is_u ? CB : RBn;
  // eight independent loads in flight, then their sums in order (the order is fixed: p = 0, 1..)
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
  int p = 0;
  for (; p + 8 <= parts; p += 8) {
    float4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u)
      v[u] = __ldcs(reinterpret_cast<const float4*>(src + (p + u) * stride + e));
#pragma unroll
    for (int u = 0; u < 8; ++u) { s.x += v[u].x; s.y += v[u].y; s.z += v[u].z; s.w += v[u].w; }
  }
  for (; p < parts; ++p) {
    const float4 v = __ldcs(reinterpret_cast<const float4*>(src + p * stride + e));
    s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
  }
  T* dst = (is_u ? gU : gB) + e;
  dst[0] = T(s.x); dst[1] = T(s.y); dst[2] = T(s.z); dst[3] = T(s.w);
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

template <typename T, int RP, int S>
void launch_s(const GyArgs& a, dim3 grid, cudaStream_t stream) {
  const size_t smem = Cfg<RP, S>::smem_elems * sizeof(T);
  static const bool attr = [&] {  // above the 48 KB default: opt in once per instantiation
    C10_CUDA_CHECK(cudaFuncSetAttribute(gy_pass_kernel<T, RP, S>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    return true;
  }();
  (void)attr;
  gy_pass_kernel<T, RP, S><<<grid, kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pipeline depth 4: 6 and 8 measured the same on the H100 (N = 8192, m = 4096: 44-45 us a call
// at R = 16 for 4, 6 and 8 stages), so the depth is not what bounds the kernel. Also measured
// and not kept: 8 warps (4 for gU, 4 for gB_gen) instead of 4 doing both, 34.8 against 34.3 us.
template <typename T>
void launch(const GyArgs& a, dim3 grid, cudaStream_t stream) {
  launch_s<T, 16, 4>(a, grid, stream);
}

}  // namespace

bool gy_pass_takes(const Tensor& gy, const Tensor& B, const Tensor& U) {
  if (option(Opt::kFusedGy) == 0) return false;
  const auto dt = gy.scalar_type();
  if (dt != at::kBFloat16 && dt != at::kHalf) return false;
  if (B.scalar_type() != dt || U.scalar_type() != dt) return false;
  if (gy.dim() != 2 || B.dim() != 2 || U.dim() != 2) return false;
  const int64_t N = gy.size(0), m = gy.size(1), R = B.size(1);
  if (N < 1 || m < 1 || B.size(0) != m || U.size(0) != N || U.size(1) != R) return false;
  if ((R != 8 && R != 16) || m % 8 != 0) return false;
  if (gy.stride(1) != 1 || gy.stride(0) % 8 != 0 || gy.stride(0) < m) return false;
  if (!B.is_contiguous() || !U.is_contiguous()) return false;
  return aligned16(gy) && aligned16(B) && aligned16(U);
}

std::tuple<Tensor, Tensor> gy_pass(const Tensor& gy, const Tensor& B, const Tensor& U) {
  const int64_t N = gy.size(0), m = gy.size(1), R = B.size(1);
  // one allocation for both outputs (the host pays per call)
  Tensor out = at::empty({(N + m) * R}, gy.options());
  Tensor gU = out.narrow(0, 0, N * R).view({N, R}), gB = out.narrow(0, N * R, m * R).view({m, R});
  gy_pass_into(gy, B, U, gU, gB);
  return {gU, gB};
}

void gy_pass_into(const Tensor& gy, const Tensor& B, const Tensor& U, const Tensor& gU,
                  const Tensor& gB) {
  POLYKERN_SCOPE("polykern::gy_pass");
  if (!gy_pass_takes(gy, B, U)) {
    fast_mm_into(gU, gy, B);
    fast_mm_into(gB, gy.t(), U);
    return;
  }
  TORCH_INTERNAL_ASSERT(gU.is_contiguous() && gB.is_contiguous() &&
                        gU.scalar_type() == gy.scalar_type() &&
                        gB.scalar_type() == gy.scalar_type());
  const int64_t N = gy.size(0), m = gy.size(1), R = B.size(1);
  constexpr int NC = Cfg<16, 4>::NC;
  const int64_t CB = (m + NC * kTile - 1) / (NC * kTile);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // about two CTAs per SM, each on at least kMinChunkRows rows
  const int64_t want = std::max<int64_t>(1, (2 * sms + CB - 1) / CB);
  int64_t chunk = ((N + want - 1) / want + kTile - 1) / kTile * kTile;
  chunk = std::max<int64_t>(chunk, kMinChunkRows);
  const int64_t RBn = (N + chunk - 1) / chunk;
  TORCH_CHECK(CB < 65536 && RBn < 65536, "polykern: gY pass grid too large");
  auto f32 = gy.options().dtype(at::kFloat);
  // one allocation for both partials (the host pays per call)
  Tensor parts = at::empty({(CB * N + RBn * m) * R}, f32);
  maybe_poison(parts); maybe_poison(gU); maybe_poison(gB);
  float* Pu = parts.data_ptr<float>();
  float* Pb = Pu + CB * N * R;
  GyArgs a{gy.data_ptr(), B.data_ptr(), U.data_ptr(), Pu, Pb, N, m, gy.stride(0),
           static_cast<int>(R), static_cast<int>(chunk)};
  const dim3 grid(static_cast<unsigned>(CB), static_cast<unsigned>(RBn));
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t nu = N * R, nb = m * R, threads = (nu + nb) / 4;
  const unsigned sum_blocks = static_cast<unsigned>((threads + 255) / 256);
  if (gy.scalar_type() == at::kBFloat16) {
    launch<at::BFloat16>(a, grid, stream);
    gy_pass_sum_kernel<at::BFloat16><<<sum_blocks, 256, 0, stream>>>(
        Pu, Pb, gU.data_ptr<at::BFloat16>(),
        gB.data_ptr<at::BFloat16>(), nu, nb, static_cast<int>(CB), static_cast<int>(RBn));
  } else {
    launch<at::Half>(a, grid, stream);
    gy_pass_sum_kernel<at::Half><<<sum_blocks, 256, 0, stream>>>(
        Pu, Pb, gU.data_ptr<at::Half>(),
        gB.data_ptr<at::Half>(), nu, nb, static_cast<int>(CB), static_cast<int>(RBn));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {
// polykern::_gy_pass (tests): (gY B, gY^T U) through the helper above; _gy_pass_takes: whether
// the fused kernel takes these operands (else the helper runs two GEMMs).
std::tuple<Tensor, Tensor> gy_pass_op(const Tensor& gy, const Tensor& B, const Tensor& U) {
  check_cuda(gy, "grad_y", gy);
  check_cuda(B, "B", gy);
  check_cuda(U, "U", gy);
  TORCH_CHECK(gy.dim() == 2 && B.dim() == 2 && U.dim() == 2 && B.size(0) == gy.size(1) &&
                  U.size(0) == gy.size(0) && U.size(1) == B.size(1),
              "polykern::_gy_pass: grad_y (N, m), B (m, R) and U (N, R) expected, got ",
              shape(gy.sizes()), ", ", shape(B.sizes()), ", ", shape(U.sizes()));
  TORCH_CHECK(B.scalar_type() == gy.scalar_type() && U.scalar_type() == gy.scalar_type(),
              "polykern::_gy_pass: grad_y, B and U must share a dtype, got ", gy.scalar_type(),
              ", ", B.scalar_type(), ", ", U.scalar_type());
  const c10::cuda::CUDAGuard guard(gy.device());
  return gy_pass(gy, B, U);
}

bool gy_pass_takes_op(const Tensor& gy, const Tensor& B, const Tensor& U) {
  return gy.is_cuda() && gy_pass_takes(gy, B, U);
}
}  // namespace

TORCH_LIBRARY_IMPL(polykern, CUDA, m) {
  m.impl("_gy_pass", &gy_pass_op);
  m.impl("_gy_pass_takes", &gy_pass_takes_op);
}

}  // namespace polykern
