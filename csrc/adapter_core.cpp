// The adapter core on cuBLAS (through ATen): the frozen base GEMM with the bias in its epilogue,
// the down-projection U = x_a A^T, and the up-projection accumulated into the base output with
// beta = 1 (no extra pass over y). The backward puts gY W and gU A into one buffer.
#include "common.h"

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

// W_m = W + B A (m, n): one cuBLASLt matmul with C = W and D = W_m as separate buffers
// (lt_gemm.cpp), so W is read once and W_m written once. at::addmm copies W into its output and
// then reads it again as C: 19 us of the 47 us a merge cost at 4096 x 4096 on the H100. A
// one-pass WMMA kernel was tried and measured slower than cuBLAS (74 us at R = 152, 45 us at
// R = 16; csrc/README.md, version 5). fp32/fp64 go to at::addmm.
static Tensor merged_weight(const Tensor& W, const Tensor& A, const Tensor& B) {
  return fast_addmm(W, B, A);
}

// y = x2 W^T + bias + U B^T for x2 (N, n): on W + B A when `merged`, else with the adapter's
// share added into y (beta = 1); U = x2 A^T is computed here if not given.
static Tensor base_plus_adapter(const Tensor& x2, const Tensor& W,
                                const std::optional<Tensor>& bias, const Tensor& A,
                                const Tensor& B, const Tensor& U, bool merged) {
  if (merged) {
    const Tensor Wm = merged_weight(W, A, B);
    return bias.has_value() ? at::addmm(*bias, x2, Wm.t()) : at::mm(x2, Wm.t());
  }
  Tensor y = bias.has_value() ? at::addmm(*bias, x2, W.t()) : at::mm(x2, W.t());  // (N, m)
  fast_addmm_(y, U.defined() ? U : fast_mm(x2, A.t()), B.t());          // beta = 1: into y
  return y;
}

Tensor adapter_linear(const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias,
                      const Tensor& A, const Tensor& B) {
  const Tensor x2 = x.reshape({-1, W.size(1)});
  const bool merged = x2.size(0) > 0 && merge_pays(x2.size(0), W.size(1));
  return base_plus_adapter(x2, W, bias, A, B, Tensor(), merged).view(out_shape(x, W.size(0)));
}

// Launch order: on the merged path the long base GEMM is queued before U = x_a A^T (and in the
// backward gX before gU), so that the GPU starts it one launch earlier; the host, which costs
// tens of microseconds per launch on the H100 machine, then queues the rest while it runs.
std::tuple<Tensor, Tensor> adapter_forward(const Tensor& x, const Tensor& W,
                                           const std::optional<Tensor>& bias, const Tensor& A,
                                           const Tensor& B,
                                           const std::optional<Tensor>& x_adapter) {
  const int64_t n = W.size(1), m = W.size(0);
  const Tensor x2 = x.reshape({-1, n});                                   // (N, n)
  const Tensor xa2 = x_adapter.has_value() ? x_adapter->reshape({-1, n}) : x2;
  // with dropout the adapter's input differs from x: no merged operand exists
  const bool merged = !x_adapter.has_value() && x2.size(0) > 0 && merge_pays(x2.size(0), n);
  Tensor U = merged ? Tensor() : fast_mm(xa2, A.t());                     // (N, R)
  Tensor y = base_plus_adapter(x2, W, bias, A, B, U, merged);
  if (merged) U = fast_mm(xa2, A.t());
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
  // gU and gB from one read of gY where the fused kernel takes the operands (small R)
  const bool fused = need_factors && gy_pass_takes(gy, B, U);
  Tensor gU, gX, gXa, gA, gB;
  auto down = [&] {
    if (fused) std::tie(gU, gB) = gy_pass(gy, B, U);                     // (N, R), (m, R)
    else gU = fast_mm(gy, B);                                             // (N, R)
  };
  if (need_gU && !merged) down();
  if (need_x) {
    if (merged) {
      gX = at::mm(gy, merged_weight(W, A, B));                            // gY (W + B A)
    } else {
      gX = at::mm(gy, W);                                                 // (N, n)
      if (!separate) fast_addmm_(gX, gU, A);                              // adapter share, beta=1
    }
    gX = gX.view(x.sizes());
  }
  if (need_gU && merged) down();                                          // after the long GEMM
  if (need_xa && separate) gXa = fast_mm(gU, A).view(x.sizes());
  if (need_factors) {
    const Tensor xa2 = separate ? x_adapter->reshape({-1, n}) : x.reshape({-1, n});
    gA = fast_mm(gU.t(), xa2);                                            // (R, n)
    if (!fused) gB = fast_mm(gy.t(), U);                                  // (m, R)
  }
  auto empty = [&](Tensor& t) { if (!t.defined()) t = at::empty({0}, x.options()); };
  empty(gX); empty(gXa); empty(gA); empty(gB);
  return {gX, gXa, gA, gB};
}

}  // namespace polykern
