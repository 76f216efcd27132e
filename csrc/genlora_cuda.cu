// GenLoRA on CUDA: the RBF synthesis of both factors (forward) and its chain rule (backward), one
// launch each, around the shared adapter core (common.h).
//
// For a generator X (A or B): Phi[t, k] = exp(-gamma_k ||Z[t] - C[k]||^2), gamma = exp(g),
// t < L (L = n for A, m for B), k < K, d latent dims. Both factors are "out[i, t] = scale *
// sum_k M[i, k] Phi[t, k]" with strides: A (r, n) = M_A Phi_A^T; B (m, r): B[t, i] = s * sum_k
// Phi_B[t, k] M_B[k, i], i.e. M = M_B^T. A job describes one generator; blocks [0, nbA) run A's
// job and the rest B's, each on a tile of coordinates t, Phi's tile in shared memory.
//
// Backward (SPEC-GENLORA.md): with G[i, t] = dL/dout[i, t] * scale,
//   gM[i, k] = sum_t G[i, t] Phi[t, k];  E[t, k] = Phi[t, k] sum_i G[i, t] M[i, k];
//   gZ[t] = sum_k E (-2 gamma_k) D[t, k];  gC[k] = sum_t E (2 gamma_k) D;  gg[k] = sum_t E
//   (-gamma_k ||D||^2). gZ is complete inside a tile; gM, gC, gg are sums over t, added across
//   tiles with atomics into kSlots copies, then summed by one small kernel (their cost is
//   O((n + m) K (d + r)), independent of N).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"

namespace polykern {
namespace {

constexpr int kNThreads = 256;
constexpr int kMaxK = 256;
constexpr int kMaxD = 8;
constexpr int kMaxR = 128;
// Blocks spread their atomic adds over kSlots copies of the summed gradients, summed afterwards
// by one small kernel: 512 blocks adding into the same few hundred addresses serialised in L2
// (the backward kernel took 82 us per step at n = m = 4096, r = 16, K = 32; profile 2026-11-24).
constexpr int kSlots = 16;

template <typename P, typename Wt>
struct Job {
  const P* Z;         // (L, d)   parameters in their storage dtype P
  const P* C;         // (K, d)
  const P* g;         // (K,)
  const P* M;         // M[i * sMi + k * sMk], i < r, k < K
  int64_t sMi, sMk;
  int64_t L;
  int64_t so_i, so_t;  // out / grad-of-out layout: [i * so_i + t * so_t]
  Wt scale;
  int64_t nblocks;
  // backward only
  P* gZ;               // (L, d)
  Wt* gC;              // (K, d)  in slot 0 of the zeroed work-dtype workspace (atomics)
  Wt* gg;              // (K,)
  Wt* gM;              // gM[i * sMi + k * sMk]
  int64_t slot_stride;  // block b adds into slot b % kSlots: slot s is at gC + s * slot_stride
};

// Tile sizes keep the shared memory of each kernel under the 48 KB static limit.
template <typename Wt> struct Tiles;
template <> struct Tiles<float> { static constexpr int fwd = 32; };
template <> struct Tiles<double> { static constexpr int fwd = 8; };
constexpr int kMaxBwdTile = 32;
constexpr int64_t kSmemBudget = 48 * 1024;  // no opt-in needed below this

// Loads gamma, the centres and this tile's latent coordinates, then Phi for the tile:
// z[t * kMaxD + c], phi[t * ldp + k] for t < tile.
template <typename P, typename Wt>
__device__ __forceinline__ void load_tile(const Job<P, Wt>& job, int K, int d, int64_t t0,
                                          int tile, Wt* gam, Wt* Cs, Wt* z, Wt* phi, int ldp) {
  for (int k = threadIdx.x; k < K; k += blockDim.x) gam[k] = exp(static_cast<Wt>(job.g[k]));
  for (int e = threadIdx.x; e < K * d; e += blockDim.x) Cs[e] = static_cast<Wt>(job.C[e]);
  for (int e = threadIdx.x; e < tile * d; e += blockDim.x) {
    const int t = e / d, c = e - t * d;
    z[t * kMaxD + c] = (t0 + t < job.L) ? static_cast<Wt>(job.Z[(t0 + t) * d + c]) : Wt(0);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < tile * K; e += blockDim.x) {
    const int t = e / K, k = e - t * K;
    Wt s = 0;
    for (int c = 0; c < d; ++c) {
      const Wt diff = z[t * kMaxD + c] - Cs[k * d + c];
      s += diff * diff;
    }
    phi[t * ldp + k] = exp(-gam[k] * s);
  }
  __syncthreads();
}

template <typename P, typename Wt, typename T>
__global__ void __launch_bounds__(kNThreads)
genlora_synth_kernel(Job<P, Wt> ja, Job<P, Wt> jb, T* __restrict__ outA, T* __restrict__ outB,
                     int r, int K, int d) {
  constexpr int kTile = Tiles<Wt>::fwd;
  __shared__ Wt gam[kMaxK], Cs[kMaxK * kMaxD], z[kTile][kMaxD], phi[kTile][kMaxK + 1];
  const bool is_a = blockIdx.x < ja.nblocks;
  const Job<P, Wt>& job = is_a ? ja : jb;
  T* out = is_a ? outA : outB;
  const int64_t t0 = (is_a ? blockIdx.x : blockIdx.x - ja.nblocks) * (int64_t)kTile;
  load_tile<P, Wt>(job, K, d, t0, kTile, gam, Cs, &z[0][0], &phi[0][0], kMaxK + 1);
  for (int e = threadIdx.x; e < r * kTile; e += blockDim.x) {
    const int i = e / kTile, t = e - i * kTile;  // t fastest: coalesced writes of A
    if (t0 + t >= job.L) continue;
    Wt acc = 0;
    for (int k = 0; k < K; ++k)
      acc += static_cast<Wt>(job.M[i * job.sMi + k * job.sMk]) * phi[t][k];
    out[i * job.so_i + (t0 + t) * job.so_t] = static_cast<T>(acc * job.scale);
  }
}

// Shared memory of the backward kernel for a tile of `tile` coordinates, in work-dtype elements:
// gamma (K), centres (K d), z (tile x kMaxD), Phi and E (tile x (K + 1) each), G (r x tile).
inline int64_t backward_smem_elems(int64_t tile, int64_t r, int64_t K, int64_t d) {
  return K + K * d + tile * kMaxD + 2 * tile * (K + 1) + r * tile;
}

// Version 2 (2026-11-24): the tile is chosen on the host, as large as 48 KB of dynamic shared
// memory allows (up to 32 coordinates), instead of 8 fixed by the largest K and r. ncu on
// version 1 at n = m = 4096, r = 16, K = 32: 1024 blocks of 8 coordinates, latency-bound
// (30% of stalls at barriers) with 590 K atomic adds, 41 us a step where the work is a few us.
template <typename P, typename Wt, typename T>
__global__ void __launch_bounds__(kNThreads)
genlora_synth_backward_kernel(Job<P, Wt> ja, Job<P, Wt> jb, const T* __restrict__ gA,
                              const T* __restrict__ gB, int r, int K, int d, int tile) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ldp = K + 1;
  Wt* gam = reinterpret_cast<Wt*>(smem_raw);
  Wt* Cs = gam + K;
  Wt* z = Cs + K * d;           // [tile][kMaxD]
  Wt* phi = z + tile * kMaxD;   // [tile][ldp]
  Wt* E = phi + tile * ldp;     // [tile][ldp]
  Wt* G = E + tile * ldp;       // [r][tile]
  const bool is_a = blockIdx.x < ja.nblocks;
  const Job<P, Wt>& job = is_a ? ja : jb;
  const T* gout = is_a ? gA : gB;
  const int64_t t0 = (is_a ? blockIdx.x : blockIdx.x - ja.nblocks) * (int64_t)tile;
  const int64_t slot = (blockIdx.x % kSlots) * job.slot_stride;
  load_tile<P, Wt>(job, K, d, t0, tile, gam, Cs, z, phi, ldp);
  for (int e = threadIdx.x; e < r * tile; e += blockDim.x) {
    const int i = e / tile, t = e - i * tile;
    G[i * tile + t] = (t0 + t < job.L)
                          ? static_cast<Wt>(gout[i * job.so_i + (t0 + t) * job.so_t]) * job.scale
                          : Wt(0);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < tile * K; e += blockDim.x) {
    const int t = e / K, k = e - t * K;
    Wt gphi = 0;
    for (int i = 0; i < r; ++i)
      gphi += G[i * tile + t] * static_cast<Wt>(job.M[i * job.sMi + k * job.sMk]);
    E[t * ldp + k] = gphi * phi[t * ldp + k];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < tile * d; e += blockDim.x) {  // gZ: complete in this tile
    const int t = e / d, c = e - t * d;
    if (t0 + t >= job.L) continue;
    Wt acc = 0;
    for (int k = 0; k < K; ++k)
      acc += E[t * ldp + k] * (-2 * gam[k]) * (z[t * kMaxD + c] - Cs[k * d + c]);
    job.gZ[(t0 + t) * d + c] = static_cast<P>(acc);
  }
  for (int k = threadIdx.x; k < K; k += blockDim.x) {  // gC, g(log gamma): partial sums over t
    Wt acc_g = 0;
    for (int t = 0; t < tile; ++t) {  // padded t have G = 0, so E = 0
      Wt s = 0;
      for (int c = 0; c < d; ++c) {
        const Wt diff = z[t * kMaxD + c] - Cs[k * d + c];
        s += diff * diff;
      }
      acc_g += E[t * ldp + k] * (-gam[k]) * s;
    }
    atomicAdd(job.gg + slot + k, acc_g);
    for (int c = 0; c < d; ++c) {
      Wt acc = 0;
      for (int t = 0; t < tile; ++t)
        acc += E[t * ldp + k] * (2 * gam[k]) * (z[t * kMaxD + c] - Cs[k * d + c]);
      atomicAdd(job.gC + slot + k * d + c, acc);
    }
  }
  for (int e = threadIdx.x; e < r * K; e += blockDim.x) {  // gM: partial sums over t
    const int i = e / K, k = e - i * K;
    Wt acc = 0;
    for (int t = 0; t < tile; ++t) acc += G[i * tile + t] * phi[t * ldp + k];
    atomicAdd(job.gM + slot + i * job.sMi + k * job.sMk, acc);
  }
}

// Sums the kSlots copies of the workspace (6 segments: gC_A, gg_A, gM_A, gC_B, gg_B, gM_B)
// into the six gradients, written in the parameters' dtype.
template <typename P, typename Wt>
struct SlotOutputs {
  P* out[6];
  int64_t end[6];  // exclusive end offset of each segment in a slot
};

template <typename P, typename Wt>
__global__ void __launch_bounds__(kNThreads)
genlora_slot_sum_kernel(const Wt* __restrict__ ws, int64_t total, SlotOutputs<P, Wt> o) {
  const int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (e >= total) return;
  Wt s = 0;
  for (int k = 0; k < kSlots; ++k) s += ws[k * total + e];
  int seg = 0;
  while (e >= o.end[seg]) ++seg;
  const int64_t start = seg == 0 ? 0 : o.end[seg - 1];
  o.out[seg][e - start] = static_cast<P>(s);
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
                    bool is_a, int64_t r, double scale, int tile) {
  Job<P, Wt> j{};
  j.Z = Z.data_ptr<P>(); j.C = C.data_ptr<P>(); j.g = g.data_ptr<P>(); j.M = M.data_ptr<P>();
  j.L = Z.size(0);
  const int64_t K = C.size(0);
  if (is_a) {  // M_A (r, K): M[i, k] at i * K + k; A (r, n): out[i, t] at i * n + t
    j.sMi = K; j.sMk = 1; j.so_i = j.L; j.so_t = 1;
  } else {     // M_B (K, r) read as M_B^T: M[i, k] at k * r + i; B (m, r): out[i, t] at t * r + i
    j.sMi = 1; j.sMk = r; j.so_i = 1; j.so_t = r;
  }
  j.scale = static_cast<Wt>(scale);
  j.nblocks = (j.L + tile - 1) / tile;
  return j;
}

GenParams to_dtype(const GenParams& p, at::ScalarType wt) {
  auto w = [&](const Tensor& t) { return t.to(wt).contiguous(); };
  return {w(p.Z_A), w(p.C_A), w(p.g_A), w(p.M_A), w(p.Z_B), w(p.C_B), w(p.g_B), w(p.M_B)};
}

std::tuple<Tensor, Tensor> synth(const GenParams& p, double scaling, at::ScalarType dtype) {
  const auto pt = gen_param_dtype(p.M_A.scalar_type(), dtype);
  const GenParams w = to_dtype(p, pt);  // no copy in the supported dtype pairs
  const int64_t r = p.M_A.size(0), K = p.M_A.size(1), d = p.Z_A.size(1);
  const int64_t n = p.Z_A.size(0), m = p.Z_B.size(0);
  Tensor A = at::empty({r, n}, p.M_A.options().dtype(dtype));
  Tensor B = at::empty({m, r}, p.M_A.options().dtype(dtype));
  maybe_poison(A); maybe_poison(B);
  auto stream = at::cuda::getCurrentCUDAStream();
  POLYKERN_DISPATCH_GEN(pt, dtype, "genlora_expand", [&] {
    constexpr int tile = Tiles<wt_t>::fwd;
    auto ja = make_job<p_t, wt_t>(w.Z_A, w.C_A, w.g_A, w.M_A, true, r, 1.0, tile);
    auto jb = make_job<p_t, wt_t>(w.Z_B, w.C_B, w.g_B, w.M_B, false, r, scaling, tile);
    const int64_t grid = ja.nblocks + jb.nblocks;
    genlora_synth_kernel<p_t, wt_t, io_t><<<static_cast<unsigned>(grid), kNThreads, 0, stream>>>(
        ja, jb, A.data_ptr<io_t>(), B.data_ptr<io_t>(), static_cast<int>(r),
        static_cast<int>(K), static_cast<int>(d));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {A, B};
}

std::vector<Tensor> synth_backward(const Tensor& gA, const Tensor& gB, const GenParams& p,
                                   double scaling) {
  // The sums over coordinates use atomics: not bitwise reproducible. Under
  // torch.use_deterministic_algorithms(True) this raises (warns with warn_only=True), as
  // PyTorch's own such ops do; the modules take the reference path in that mode instead.
  at::globalContext().alertNotDeterministic(
      "polykern::genlora_linear_backward (gradients of the generator parameters)");
  const auto pt = gen_param_dtype(p.M_A.scalar_type(), gA.scalar_type());
  const auto wt = pt == at::kDouble ? at::kDouble : at::kFloat;
  const GenParams w = to_dtype(p, pt);
  const int64_t r = p.M_A.size(0), K = p.M_A.size(1), d = p.Z_A.size(1);
  const Tensor gAc = gA.contiguous(), gBc = gB.contiguous();
  const auto po = w.M_A.options();  // the gradients, in the (generator) parameter dtype
  Tensor gZ_A = at::empty_like(w.Z_A), gZ_B = at::empty_like(w.Z_B);
  Tensor gC_A = at::empty({K, d}, po), gg_A = at::empty({K}, po), gM_A = at::empty({r, K}, po);
  Tensor gC_B = at::empty({K, d}, po), gg_B = at::empty({K}, po), gM_B = at::empty({K, r}, po);
  for (const Tensor* t : {&gZ_A, &gZ_B, &gC_A, &gg_A, &gM_A, &gC_B, &gg_B, &gM_B})
    maybe_poison(*t);
  // The sums over coordinates go through a zeroed work-dtype workspace of kSlots copies.
  const int64_t seg[6] = {K * d, K, r * K, K * d, K, r * K};
  int64_t end[6], total = 0;
  for (int s = 0; s < 6; ++s) end[s] = (total += seg[s]);
  Tensor ws = at::empty({kSlots * total}, po.dtype(wt));
  zero_async(ws);
  auto stream = at::cuda::getCurrentCUDAStream();
  POLYKERN_DISPATCH_GEN(pt, gAc.scalar_type(), "genlora_linear_backward", [&] {
    int tile = kMaxBwdTile;
    while (tile > 1 && static_cast<int64_t>(sizeof(wt_t)) * backward_smem_elems(tile, r, K, d) >
                           kSmemBudget)
      tile /= 2;
    const size_t smem = sizeof(wt_t) * backward_smem_elems(tile, r, K, d);
    auto ja = make_job<p_t, wt_t>(w.Z_A, w.C_A, w.g_A, w.M_A, true, r, 1.0, tile);
    auto jb = make_job<p_t, wt_t>(w.Z_B, w.C_B, w.g_B, w.M_B, false, r, scaling, tile);
    wt_t* base = ws.data_ptr<wt_t>();
    ja.gZ = gZ_A.data_ptr<p_t>(); jb.gZ = gZ_B.data_ptr<p_t>();
    ja.gC = base; ja.gg = base + end[0]; ja.gM = base + end[1];
    jb.gC = base + end[2]; jb.gg = base + end[3]; jb.gM = base + end[4];
    ja.slot_stride = jb.slot_stride = total;
    const int64_t grid = ja.nblocks + jb.nblocks;
    genlora_synth_backward_kernel<p_t, wt_t, io_t>
        <<<static_cast<unsigned>(grid), kNThreads, smem, stream>>>(
            ja, jb, gAc.data_ptr<io_t>(), gBc.data_ptr<io_t>(), static_cast<int>(r),
            static_cast<int>(K), static_cast<int>(d), tile);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    SlotOutputs<p_t, wt_t> outs{{gC_A.data_ptr<p_t>(), gg_A.data_ptr<p_t>(), gM_A.data_ptr<p_t>(),
                                 gC_B.data_ptr<p_t>(), gg_B.data_ptr<p_t>(), gM_B.data_ptr<p_t>()},
                                {end[0], end[1], end[2], end[3], end[4], end[5]}};
    genlora_slot_sum_kernel<p_t, wt_t>
        <<<static_cast<unsigned>((total + kNThreads - 1) / kNThreads), kNThreads, 0, stream>>>(
            ws.data_ptr<wt_t>(), total, outs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto pd = p.M_A.scalar_type();  // .to() is a no-op where the dtypes already agree
  return {gZ_A.to(pd), gC_A.to(pd), gg_A.to(pd), gM_A.to(pd),
          gZ_B.to(pd), gC_B.to(pd), gg_B.to(pd), gM_B.to(pd)};
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

std::tuple<Tensor, Tensor, Tensor, Tensor> genlora_linear_op(
    const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias, const Tensor& Z_A,
    const Tensor& C_A, const Tensor& g_A, const Tensor& M_A, const Tensor& Z_B, const Tensor& C_B,
    const Tensor& g_B, const Tensor& M_B, double scaling, const std::optional<Tensor>& x_adapter) {
  check_linear_inputs("genlora_linear", x, W, bias, x_adapter);
  GenParams p{Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B};
  check_genlora_params("genlora_linear", x, p, W.size(1), W.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  auto [A, B] = synth(p, scaling, x.scalar_type());
  auto [y, U] = adapter_forward(x, W, bias, A, B, x_adapter);
  return {y, U, A, B};
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
  auto [A, B] = synth(p, scaling, x.scalar_type());
  return adapter_linear(x, W, bias, A, B);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
genlora_linear_backward_op(const Tensor& grad_y, const Tensor& x,
                           const std::optional<Tensor>& x_adapter, const Tensor& W,
                           const Tensor& Z_A, const Tensor& C_A, const Tensor& g_A,
                           const Tensor& M_A, const Tensor& Z_B, const Tensor& C_B,
                           const Tensor& g_B, const Tensor& M_B, double scaling, const Tensor& U,
                           const Tensor& A, const Tensor& B, std::array<bool, 3> output_mask) {
  check_cuda(grad_y, "grad_y", x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [gX, gXa, gA, gB] = adapter_backward(grad_y, x, x_adapter, W, A, B, U, output_mask[0],
                                            output_mask[1], output_mask[2]);
  GenParams p{Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B};
  std::vector<Tensor> g;
  if (output_mask[2]) {
    g = synth_backward(gA, gB, p, scaling);
  } else {
    for (const Tensor* t : {&Z_A, &C_A, &g_A, &M_A, &Z_B, &C_B, &g_B, &M_B})
      g.push_back(at::empty({0}, t->options()));
  }
  return {gX, gXa, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
}

}  // namespace

TORCH_LIBRARY_IMPL(polykern, CUDA, m) {
  m.impl("genlora_linear", &genlora_linear_op);
  m.impl("genlora_linear_backward", &genlora_linear_backward_op);
  m.impl("genlora_linear_inference", &genlora_linear_inference_op);
  m.impl("genlora_expand", &genlora_expand_op);
}

}  // namespace polykern
