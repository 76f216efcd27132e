// The adapter core on cuBLAS (through ATen): the frozen base GEMM with the bias in its epilogue,
// the down-projection U = x_a A^T, and the up-projection accumulated into the base output with
// beta = 1 (no extra pass over y). The backward puts gY W and gU A into one buffer.
#include "common.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#ifdef POLYKERN_HAVE_CUBLASLT
#include <cublasLt.h>
#endif

#include <atomic>
#include <cstdlib>

namespace polykern {

bool poison_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("POLYKERN_POISON");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
}

void maybe_poison(const Tensor& t) {
  if (poison_enabled() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

std::string shape(c10::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

void zero_async(const Tensor& t) {
  if (t.numel() == 0) return;
  C10_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0, t.nbytes(),
                                 at::cuda::getCurrentCUDAStream()));
}

void check_cuda(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "polykern: ", name, " must be a CUDA tensor, got device ", t.device().str());
  TORCH_CHECK(t.device() == like.device(), "polykern: ", name, " is on ", t.device().str(),
              " but the input is on ", like.device().str());
}

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "polykern: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

void check_linear_inputs(const char* op, const Tensor& x, const Tensor& W,
                         const std::optional<Tensor>& bias,
                         const std::optional<Tensor>& x_adapter) {
  check_cuda(x, "x", x);
  check_cuda(W, "weight", x);
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK(W.dim() == 2, op, ": weight must be 2-D (out, in), got shape ", shape(W.sizes()));
  TORCH_CHECK(x.size(-1) == W.size(1), op, ": x has last dimension ", num(x.size(-1)),
              " but weight has in_features ", num(W.size(1)));
  TORCH_CHECK(x.scalar_type() == W.scalar_type(),
              op, ": mat1 and mat2 must have the same dtype, but got ", x.scalar_type(),
              " (x) and ", W.scalar_type(), " (weight)");
  if (bias.has_value()) {
    check_cuda(*bias, "bias", x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == W.size(0), op, ": bias must have shape (",
                num(W.size(0)), ",), got ", shape(bias->sizes()));
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ",
                bias->scalar_type(), " differs from x dtype ", x.scalar_type());
  }
  if (x_adapter.has_value()) {
    check_cuda(*x_adapter, "x_adapter", x);
    TORCH_CHECK(x_adapter->sizes() == x.sizes() &&
                    x_adapter->scalar_type() == x.scalar_type(),
                op, ": x_adapter must match x in shape and dtype, got ",
                shape(x_adapter->sizes()), " ", x_adapter->scalar_type(), " vs ", shape(x.sizes()),
                " ", x.scalar_type());
  }
}

static std::vector<int64_t> out_shape(const Tensor& x, int64_t m) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = m;
  return s;
}

// ---- the merged path ------------------------------------------------------------------------
// y = x W^T + U B^T = x (W + B A)^T. The unmerged path reads and writes the activation y (or gX)
// once more (beta = 1): 2 N m elements of traffic and 2 N m R FLOPs. The merged path instead
// builds W_m = W + B A (read W, write W_m: 2 m n elements, 2 m n R FLOPs) and runs the base GEMM
// on it, so it pays when N > n (forward; N > m for gX in the backward). A margin of 1.5x keeps
// the small merge GEMM's lower efficiency on the right side. The backward rebuilds W_m rather
// than keeping it (it is as large as the frozen weight; keeping one per layer would double the
// model's weight memory). Rounding: W_m is rounded to the compute dtype once, which adds an
// error of the size of the output's own rounding (tests/test_ops_cuda.py checks both paths).
static std::atomic<int> g_merge_policy{0};  // 0 auto, 1 always, 2 never

void set_merge_policy(int64_t policy) {
  TORCH_CHECK(policy >= 0 && policy <= 2, "polykern: merge policy must be 0 (auto), 1 (always) "
              "or 2 (never), got ", num(policy));
  g_merge_policy.store(static_cast<int>(policy));
}

int64_t get_merge_policy() { return g_merge_policy.load(); }

static bool merge_pays(int64_t rows, int64_t reduced_dim) {
  const int p = g_merge_policy.load();
  if (p != 0) return p == 1;
  return 2 * rows >= 3 * reduced_dim;
}

#ifdef POLYKERN_HAVE_CUBLASLT
// W_m = W + B A as one cuBLASLt matmul with C = W and D = W_m (separate buffers), so W is read
// once and W_m written once. at::addmm copies W into its output first and then reads it again
// as C: 19 us of the 47 us a merge cost at 4096 x 4096 on the H100 (csrc/README.md). Row-major
// (m, n) matrices are column-major (n, m) ones, so in cuBLAS's terms D^T = A^T B^T + W^T with
// A^T (n x R, ld n), B^T (R x m, ld R), W^T and D^T (n x m, ld n). Returns an undefined tensor
// when cuBLASLt finds no algorithm (the caller then uses at::addmm).
static Tensor merged_weight_lt(const Tensor& W, const Tensor& A, const Tensor& B) {
  const int64_t m = W.size(0), n = W.size(1), R = A.size(0);
  cudaDataType_t dt;
  switch (W.scalar_type()) {  // fp32 and fp64 keep at::addmm (and torch's TF32 setting)
    case at::kBFloat16: dt = CUDA_R_16BF; break;
    case at::kHalf: dt = CUDA_R_16F; break;
    default: return Tensor();
  }
  if (!W.is_contiguous() || !A.is_contiguous() || !B.is_contiguous() || R == 0) return Tensor();
  Tensor Wm = at::empty_like(W);
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  bool ok = cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) ==
                CUBLAS_STATUS_SUCCESS &&
            cublasLtMatrixLayoutCreate(&la, dt, n, R, n) == CUBLAS_STATUS_SUCCESS &&
            cublasLtMatrixLayoutCreate(&lb, dt, R, m, R) == CUBLAS_STATUS_SUCCESS &&
            cublasLtMatrixLayoutCreate(&lc, dt, n, m, n) == CUBLAS_STATUS_SUCCESS &&
            cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS;
  const size_t ws_size = 4 << 20;
  Tensor ws = at::empty({static_cast<int64_t>(ws_size)}, W.options().dtype(at::kByte));
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  // the alignment each pointer really has (W may be a view into a larger weight)
  auto align = [](const Tensor& t) {
    uint32_t a = 256;
    while (a > 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % a != 0) a /= 2;
    return a;
  };
  const uint32_t al[4] = {align(A), align(B), align(W), align(Wm)};
  const cublasLtMatmulPreferenceAttributes_t al_attr[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; ok && i < 4; ++i)
    ok = cublasLtMatmulPreferenceSetAttribute(pref, al_attr[i], &al[i], sizeof(al[i])) ==
         CUBLAS_STATUS_SUCCESS;
  if (ok) {
    ok = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                              &ws_size, sizeof(ws_size)) ==
             CUBLAS_STATUS_SUCCESS &&
         cublasLtMatmulAlgoGetHeuristic(handle, op, la, lb, lc, lc, pref, 1, &heur, &found) ==
             CUBLAS_STATUS_SUCCESS &&
         found > 0;
  }
  if (ok) {
    const float one = 1.0f;
    ok = cublasLtMatmul(handle, op, &one, A.data_ptr(), la, B.data_ptr(), lb, &one, W.data_ptr(),
                        lc, Wm.data_ptr(), lc, &heur.algo, ws.data_ptr(), ws_size,
                        at::cuda::getCurrentCUDAStream()) == CUBLAS_STATUS_SUCCESS;
  }
  if (pref) cublasLtMatmulPreferenceDestroy(pref);
  if (lc) cublasLtMatrixLayoutDestroy(lc);
  if (lb) cublasLtMatrixLayoutDestroy(lb);
  if (la) cublasLtMatrixLayoutDestroy(la);
  if (op) cublasLtMatmulDescDestroy(op);
  return ok ? Wm : Tensor();
}
#endif

static Tensor merged_weight(const Tensor& W, const Tensor& A, const Tensor& B) {
  // (m, n): W + B A, one GEMM with fp32 accumulation. A one-pass WMMA kernel was tried and
  // measured slower than cuBLAS (74 us at R = 152, 45 us at R = 16; csrc/README.md, version 5).
#ifdef POLYKERN_HAVE_CUBLASLT
  Tensor Wm = merged_weight_lt(W, A, B);
  if (Wm.defined()) return Wm;
#endif
  return at::addmm(W, B, A);
}

// y = x2 W^T + bias + U B^T for x2 (N, n): on W + B A when merging pays (and may_merge), else
// with the adapter's share added into y (beta = 1); U = x2 A^T is computed here if not given.
static Tensor base_plus_adapter(const Tensor& x2, const Tensor& W,
                                const std::optional<Tensor>& bias, const Tensor& A,
                                const Tensor& B, const Tensor& U, bool may_merge) {
  const int64_t N = x2.size(0), n = W.size(1);
  if (may_merge && N > 0 && merge_pays(N, n)) {
    const Tensor Wm = merged_weight(W, A, B);
    return bias.has_value() ? at::addmm(*bias, x2, Wm.t()) : at::mm(x2, Wm.t());
  }
  Tensor y = bias.has_value() ? at::addmm(*bias, x2, W.t()) : at::mm(x2, W.t());  // (N, m)
  y.addmm_(U.defined() ? U : at::mm(x2, A.t()), B.t());                  // beta = 1: into y
  return y;
}

Tensor adapter_linear(const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias,
                      const Tensor& A, const Tensor& B) {
  const Tensor x2 = x.reshape({-1, W.size(1)});
  return base_plus_adapter(x2, W, bias, A, B, Tensor(), true).view(out_shape(x, W.size(0)));
}

std::tuple<Tensor, Tensor> adapter_forward(const Tensor& x, const Tensor& W,
                                           const std::optional<Tensor>& bias, const Tensor& A,
                                           const Tensor& B,
                                           const std::optional<Tensor>& x_adapter) {
  const int64_t n = W.size(1), m = W.size(0);
  const Tensor x2 = x.reshape({-1, n});                                   // (N, n)
  const Tensor xa2 = x_adapter.has_value() ? x_adapter->reshape({-1, n}) : x2;
  Tensor U = at::mm(xa2, A.t());                                          // (N, R)
  // with dropout the adapter's input differs from x: no merged operand exists
  Tensor y = base_plus_adapter(x2, W, bias, A, B, U, !x_adapter.has_value());
  return {y.view(out_shape(x, m)), U};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> adapter_backward(
    const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& x_adapter,
    const Tensor& W, const Tensor& A, const Tensor& B, const Tensor& U, bool need_x,
    bool need_xa, bool need_factors) {
  const int64_t n = W.size(1), m = W.size(0);
  const Tensor gy = grad_y.reshape({-1, m});                              // (N, m)
  const bool separate = x_adapter.has_value();
  const bool merged = need_x && !separate && gy.size(0) > 0 && merge_pays(gy.size(0), m);
  const bool need_gU = need_factors || need_xa || (need_x && !separate && !merged);
  Tensor gU = need_gU ? at::mm(gy, B) : Tensor();                         // (N, R)
  Tensor gX, gXa, gA, gB;
  if (need_x) {
    if (merged) {
      gX = at::mm(gy, merged_weight(W, A, B));                            // gY (W + B A)
    } else {
      gX = at::mm(gy, W);                                                 // (N, n)
      if (!separate) gX.addmm_(gU, A);                                    // adapter share, beta=1
    }
    gX = gX.view(x.sizes());
  }
  if (need_xa && separate) gXa = at::mm(gU, A).view(x.sizes());
  if (need_factors) {
    const Tensor xa2 = separate ? x_adapter->reshape({-1, n}) : x.reshape({-1, n});
    gA = at::mm(gU.t(), xa2);                                             // (R, n)
    gB = at::mm(gy.t(), U);                                               // (m, R)
  }
  auto empty = [&](Tensor& t) { if (!t.defined()) t = at::empty({0}, x.options()); };
  empty(gX); empty(gXa); empty(gA); empty(gB);
  return {gX, gXa, gA, gB};
}

}  // namespace polykern
