// PERA on CUDA: the polynomial expansion (forward) and its chain rule (backward) as one kernel
// launch each, around the shared adapter core (common.h).
//
// Forward:  A (r, n), h (P,), B (m, r) -> A_hat = [a_i ; h_p a_i*a_j] (R, n),
//           B_gen = s [b_i , b_i*b_j] (m, R), written in the compute dtype T; parameters are
//           read in their own dtype P, arithmetic in W_t (float, or double for float64), in the
//           reference's order (for float32 parameters the factors match it bit for bit).
// Backward: gA_hat (R, n), gB_gen (m, R) in T -> gA (r, n), gB (m, r), gh (P,) written in P:
//           gA[i] = gA_hat[i] + sum_j c_ij h_p(i,j) gA_hat[r+p] * a_j   (c_ii = 2, else 1)
//           gB[:, i] = s (gB_gen[:, i] + sum_j c_ij gB_gen[:, r+p] * b_j)
//           gh_p = sum_k gA_hat[r+p, k] a_i[k] a_j[k]
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"

namespace polykern {
namespace {

constexpr int kNThreads = 256;
constexpr int kMaxRank = 64;  // the pair lookup table lives in shared memory: r * r ints

template <typename T>
__device__ __forceinline__ float to_acc(T v, float) { return static_cast<float>(v); }
template <typename T>
__device__ __forceinline__ double to_acc(T v, double) { return static_cast<double>(v); }

template <typename Pt, typename Wt, typename T>
__global__ void pera_expand_kernel(const Pt* __restrict__ A, const Pt* __restrict__ B,
                                   const Pt* __restrict__ h, const int64_t* __restrict__ pi,
                                   const int64_t* __restrict__ pj, T* __restrict__ A_hat,
                                   T* __restrict__ B_gen, int r, int P, int64_t n, int64_t m,
                                   Wt scaling) {
  const int64_t R = r + P, total_a = R * n, total = total_a + m * R;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    if (e < total_a) {
      const int64_t row = e / n, k = e - row * n;
      Wt v;
      if (row < r) {
        v = static_cast<Wt>(A[row * n + k]);
      } else {
        const int64_t p = row - r;  // (h * a_i) * a_j, the reference's order
        v = static_cast<Wt>(h[p]) * static_cast<Wt>(A[pi[p] * n + k]) *
            static_cast<Wt>(A[pj[p] * n + k]);
      }
      A_hat[e] = static_cast<T>(v);
    } else {
      const int64_t f = e - total_a, u = f / R, c = f - u * R;
      const Wt v = c < r ? static_cast<Wt>(B[u * r + c])
                         : static_cast<Wt>(B[u * r + pi[c - r]]) *
                               static_cast<Wt>(B[u * r + pj[c - r]]);
      B_gen[f] = static_cast<T>(v * scaling);
    }
  }
}

// One launch, three roles by block index: [0, nbA) gA, [nbA, nbA + nbB) gB, then one block per
// pair for gh (a block reduction over n, deterministic).
template <typename Pt, typename Wt, typename T>
__global__ void __launch_bounds__(kNThreads)
pera_expand_backward_kernel(const T* __restrict__ gA_hat, const T* __restrict__ gB_gen,
                            const Pt* __restrict__ A, const Pt* __restrict__ B,
                            const Pt* __restrict__ h, const int64_t* __restrict__ pi,
                            const int64_t* __restrict__ pj, Pt* __restrict__ gA,
                            Pt* __restrict__ gB, Pt* __restrict__ gh, int r, int P, int64_t n,
                            int64_t m, Wt scaling, int64_t nbA, int64_t nbB) {
  __shared__ int lut[kMaxRank * kMaxRank];
  __shared__ Wt red[kNThreads / 32];
  const int64_t R = r + P;
  const int64_t b = blockIdx.x;
  if (b < nbA + nbB) {
    for (int e = threadIdx.x; e < r * r; e += blockDim.x) lut[e] = -1;
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) lut[pi[p] * r + pj[p]] = p;
    __syncthreads();
  }
  if (b < nbA) {  // gA: one thread per (i, k)
    const int64_t e = b * kNThreads + threadIdx.x;
    if (e >= (int64_t)r * n) return;
    const int i = static_cast<int>(e / n);
    const int64_t k = e - (int64_t)i * n;
    Wt g = to_acc(gA_hat[(int64_t)i * n + k], Wt(0));
    for (int j = 0; j < r; ++j) {
      const int p = i <= j ? lut[i * r + j] : lut[j * r + i];
      if (p < 0) continue;
      const Wt c = (i == j) ? Wt(2) : Wt(1);
      g += c * static_cast<Wt>(h[p]) * to_acc(gA_hat[(r + p) * n + k], Wt(0)) *
           static_cast<Wt>(A[(int64_t)j * n + k]);
    }
    gA[e] = static_cast<Pt>(g);
  } else if (b < nbA + nbB) {  // gB: one thread per (u, i)
    const int64_t e = (b - nbA) * kNThreads + threadIdx.x;
    if (e >= m * r) return;
    const int64_t u = e / r;
    const int i = static_cast<int>(e - u * r);
    Wt g = to_acc(gB_gen[u * R + i], Wt(0));
    for (int j = 0; j < r; ++j) {
      const int p = i <= j ? lut[i * r + j] : lut[j * r + i];
      if (p < 0) continue;
      const Wt c = (i == j) ? Wt(2) : Wt(1);
      g += c * to_acc(gB_gen[u * R + r + p], Wt(0)) * static_cast<Wt>(B[u * r + j]);
    }
    gB[e] = static_cast<Pt>(g * scaling);  // B_gen = s * B_hat
  } else {  // gh_p
    const int64_t p = b - nbA - nbB;
    const Pt* ai = A + pi[p] * n;
    const Pt* aj = A + pj[p] * n;
    const T* g = gA_hat + (r + p) * n;
    Wt acc = 0;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x)
      acc += to_acc(g[k], Wt(0)) * static_cast<Wt>(ai[k]) * static_cast<Wt>(aj[k]);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      Wt s = 0;
      for (int w = 0; w < kNThreads / 32; ++w) s += red[w];
      gh[p] = static_cast<Pt>(s);
    }
  }
}

int64_t blocks_for(int64_t work) { return (work + kNThreads - 1) / kNThreads; }

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
  const auto pt = gen_param_dtype(A.scalar_type(), dtype);
  const Tensor Aw = A.to(pt).contiguous(), Bw = B.to(pt).contiguous(), hw = h.to(pt).contiguous();
  const Tensor pi = pair_i.contiguous(), pj = pair_j.contiguous();
  const int r = static_cast<int>(A.size(0)), P = static_cast<int>(pi.size(0));
  const int64_t n = A.size(1), m = B.size(0), R = r + P;
  Tensor A_hat = at::empty({R, n}, A.options().dtype(dtype));
  Tensor B_gen = at::empty({m, R}, A.options().dtype(dtype));
  maybe_poison(A_hat);
  maybe_poison(B_gen);
  const int64_t total = R * n + m * R;
  if (total == 0) return {A_hat, B_gen};
  const int grid = static_cast<int>(std::min<int64_t>(blocks_for(total), 65535));
  auto stream = at::cuda::getCurrentCUDAStream();
  POLYKERN_DISPATCH_GEN(pt, dtype, "pera_expand", [&] {
    pera_expand_kernel<p_t, wt_t, io_t><<<grid, kNThreads, 0, stream>>>(
        Aw.data_ptr<p_t>(), Bw.data_ptr<p_t>(), hw.data_ptr<p_t>(), pi.data_ptr<int64_t>(),
        pj.data_ptr<int64_t>(), A_hat.data_ptr<io_t>(), B_gen.data_ptr<io_t>(), r, P, n, m,
        static_cast<wt_t>(scaling));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {A_hat, B_gen};
}

std::tuple<Tensor, Tensor, Tensor> expand_backward(const Tensor& gA_hat, const Tensor& gB_gen,
                                                   const Tensor& A, const Tensor& B,
                                                   const Tensor& h, const Tensor& pair_i,
                                                   const Tensor& pair_j, double scaling) {
  const auto pt = gen_param_dtype(A.scalar_type(), gA_hat.scalar_type());
  const Tensor Aw = A.to(pt).contiguous(), Bw = B.to(pt).contiguous(), hw = h.to(pt).contiguous();
  const Tensor gAh = gA_hat.contiguous(), gBg = gB_gen.contiguous();
  const Tensor pi = pair_i.contiguous(), pj = pair_j.contiguous();
  const int r = static_cast<int>(A.size(0)), P = static_cast<int>(pi.size(0));
  const int64_t n = A.size(1), m = B.size(0);
  Tensor gA = at::empty({r, n}, Aw.options()), gB = at::empty({m, r}, Aw.options());
  Tensor gh = at::empty({P}, Aw.options());
  maybe_poison(gA); maybe_poison(gB); maybe_poison(gh);
  const int64_t nbA = blocks_for(r * n), nbB = blocks_for(m * r);
  const int64_t grid = nbA + nbB + P;
  if (grid > 0) {
    TORCH_CHECK(grid < (int64_t{1} << 31), "pera_linear_backward: problem too large");
    auto stream = at::cuda::getCurrentCUDAStream();
    POLYKERN_DISPATCH_GEN(pt, gAh.scalar_type(), "pera_linear_backward", [&] {
      pera_expand_backward_kernel<p_t, wt_t, io_t><<<static_cast<unsigned>(grid), kNThreads, 0,
                                                     stream>>>(
          gAh.data_ptr<io_t>(), gBg.data_ptr<io_t>(), Aw.data_ptr<p_t>(), Bw.data_ptr<p_t>(),
          hw.data_ptr<p_t>(), pi.data_ptr<int64_t>(), pj.data_ptr<int64_t>(),
          gA.data_ptr<p_t>(), gB.data_ptr<p_t>(), gh.data_ptr<p_t>(), r, P, n, m,
          static_cast<wt_t>(scaling), nbA, nbB);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {gA.to(A.scalar_type()), gB.to(B.scalar_type()), gh.to(h.scalar_type())};
}

// ---- ops -----------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> pera_expand_op(const Tensor& A, const Tensor& B, const Tensor& h,
                                          const Tensor& pair_i, const Tensor& pair_j,
                                          double scaling, at::ScalarType dtype) {
  check_pera_params("pera_expand", A, A, B, h, pair_i, pair_j, A.size(1), B.size(0));
  const c10::cuda::CUDAGuard guard(A.device());
  return expand(A, B, h, pair_i, pair_j, scaling, dtype);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pera_linear_op(
    const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias, const Tensor& A,
    const Tensor& B, const Tensor& h, const Tensor& pair_i, const Tensor& pair_j,
    double scaling, const std::optional<Tensor>& x_adapter) {
  check_linear_inputs("pera_linear", x, W, bias, x_adapter);
  check_pera_params("pera_linear", x, A, B, h, pair_i, pair_j, W.size(1), W.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  auto [A_hat, B_gen] = expand(A, B, h, pair_i, pair_j, scaling, x.scalar_type());
  auto [y, U] = adapter_forward(x, W, bias, A_hat, B_gen, x_adapter);
  return {y, U, A_hat, B_gen};
}

Tensor pera_linear_inference_op(const Tensor& x, const Tensor& W,
                                const std::optional<Tensor>& bias, const Tensor& A,
                                const Tensor& B, const Tensor& h, const Tensor& pair_i,
                                const Tensor& pair_j, double scaling) {
  check_linear_inputs("pera_linear_inference", x, W, bias, std::nullopt);
  check_pera_params("pera_linear_inference", x, A, B, h, pair_i, pair_j, W.size(1), W.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  auto [A_hat, B_gen] = expand(A, B, h, pair_i, pair_j, scaling, x.scalar_type());
  return adapter_linear(x, W, bias, A_hat, B_gen);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pera_linear_backward_op(
    const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& x_adapter,
    const Tensor& W, const Tensor& A, const Tensor& B, const Tensor& h, const Tensor& pair_i,
    const Tensor& pair_j, double scaling, const Tensor& U, const Tensor& A_hat,
    const Tensor& B_gen, std::array<bool, 3> output_mask) {
  check_cuda(grad_y, "grad_y", x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [gX, gXa, gA_hat, gB_gen] = adapter_backward(grad_y, x, x_adapter, W, A_hat, B_gen, U,
                                                    output_mask[0], output_mask[1],
                                                    output_mask[2]);
  Tensor gA, gB, gh;
  if (output_mask[2]) {
    std::tie(gA, gB, gh) = expand_backward(gA_hat, gB_gen, A, B, h, pair_i, pair_j, scaling);
  } else {
    gA = at::empty({0}, A.options()); gB = at::empty({0}, B.options());
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
