// Shared host-side helpers of the polykern ops: input checks with messages that name the problem,
// the adapter core (base GEMM + adapter matmuls on cuBLAS through ATen), output poisoning for tests.
#pragma once

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <array>
#include <vector>
#include <optional>
#include <string>
#include <tuple>

// A named range of host time in torch.profiler's tables (bench/host_overhead.py --profile): its
// self time is what the op body spends outside ATen calls and other scopes (cuBLASLt's host
// work, launches, checks). A thread-local check when no profiler runs.
#define POLYKERN_SCOPE(name) RECORD_USER_SCOPE(name)

namespace polykern {

using at::Tensor;

// Error messages format numbers and shapes with these (std::to_string), never by streaming an
// integer into an ostream from this library: on the device image that crashed (a segfault in
// std::ostream::operator<<(long) from c10::str, seen 2026-11-24 with torch 2.11), while strings
// stream fine.
inline std::string num(int64_t v) { return std::to_string(v); }
std::string shape(c10::IntArrayRef s);

// t in dtype dt and contiguous: t itself when it already is, without a dispatcher call (a no-op
// Tensor::to still goes through the dispatcher: host time on every call of every op).
inline Tensor as_dtype(const Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt ? t.contiguous() : t.to(dt).contiguous();
}

// The process-wide switches (config.cpp): each read once from its environment variable at first
// use, changed through polykern::_config(name, value). kPoison (POLYKERN_POISON=1): fill every
// kernel output with NaN before the kernel writes it, so a test can see an unwritten element.
enum class Opt { kMerge, kSideStream, kFusedGy, kPoison, kCount };
int option(Opt which);

void maybe_poison(const Tensor& t);

void check_cuda(const Tensor& t, const char* name, const Tensor& like);
void check_float(const Tensor& t, const char* name);

// Forward core shared by both methods: y = x W^T + bias + U B^T with U = x_a A^T.
//   x (..., n), W (m, n), A (R, n), B (m, R) [scaling folded in]; returns (y (..., m), U (N, R)).
std::tuple<Tensor, Tensor> adapter_forward(const Tensor& x, const Tensor& W,
                                           const std::optional<Tensor>& bias, const Tensor& A,
                                           const Tensor& B,
                                           const std::optional<Tensor>& x_adapter);

// Backward core: returns (gX, gXa, gA, gB) where gA = dL/dA (R, n), gB = dL/dB (m, R) in the
// compute dtype; each is an empty tensor when not asked for.
//   need_x: gX (= gY W, plus gU A when there is no separate adapter input);
//   need_xa: gXa = gU A (only with x_adapter); need_factors: gA, gB.
std::tuple<Tensor, Tensor, Tensor, Tensor> adapter_backward(
    const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& x_adapter,
    const Tensor& W, const Tensor& A, const Tensor& B, const Tensor& U, bool need_x,
    bool need_xa, bool need_factors);

// Inference core (nothing saved; adapter_forward's core, U computed only where the unmerged path
// needs it): y = x W^T + bias + (x A^T) B^T, merged as W + B A when that costs fewer bytes (see
// merge_pays in adapter_core.cpp).
Tensor adapter_linear(const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias,
                      const Tensor& A, const Tensor& B);

// The adapter's GEMMs on cuBLASLt (lt_gemm.cpp), torch's row-major semantics, bf16/fp16, with
// the descriptors and the heuristic's algorithm kept per shape; other dtypes and layouts go to
// ATen. lt_gemm: D = X Y + beta C (C may be D itself); false when it cannot take the problem.
bool lt_gemm(const Tensor& X, const Tensor& Y, const Tensor& C, const Tensor& D, float beta);
Tensor fast_mm(const Tensor& X, const Tensor& Y);                    // X Y
void fast_mm_into(const Tensor& D, const Tensor& X, const Tensor& Y);  // D = X Y
void fast_addmm_(Tensor& D, const Tensor& X, const Tensor& Y);       // D += X Y
Tensor fast_addmm(const Tensor& C, const Tensor& X, const Tensor& Y);  // C + X Y

// The fused gY pass (gy_pass.cu): (gY B, gY^T U) for gY (N, m), B (m, R), U (N, R) from one read
// of gY when gy_pass_takes says the kernel takes the operands (bf16/fp16, R = 8 or 16,
// m % 8 == 0, 16-byte aligned rows), else two GEMMs. Option fused_gy 0 turns it off.
bool gy_pass_takes(const Tensor& gy, const Tensor& B, const Tensor& U);
std::tuple<Tensor, Tensor> gy_pass(const Tensor& gy, const Tensor& B, const Tensor& U);
// The same into the caller's gU (N, R) and gB (m, R), both contiguous.
void gy_pass_into(const Tensor& gy, const Tensor& B, const Tensor& U, const Tensor& gU,
                  const Tensor& gB);

// Shape and device checks common to both forward ops.
void check_linear_inputs(const char* op, const Tensor& x, const Tensor& W,
                         const std::optional<Tensor>& bias,
                         const std::optional<Tensor>& x_adapter);

}  // namespace polykern

// The dtype the generator kernels read the adapter parameters in: their own when the kernels
// have an instantiation for it (float32 with any compute dtype, or the compute dtype itself),
// else float32 (float64 when the compute dtype is float64); converting is then one small copy.
namespace polykern {
inline at::ScalarType gen_param_dtype(at::ScalarType param, at::ScalarType compute) {
  if (compute == at::kDouble) return at::kDouble;
  if (param == at::kFloat || param == compute) return param;
  return at::kFloat;
}
}  // namespace polykern

// Runs the lambda with p_t = the adapter parameters' storage type (after gen_param_dtype),
// wt_t = the generator's work type (float, or double for float64) and io_t = the compute dtype
// of the activations and generated factors.
#define POLYKERN_DISPATCH_GEN(PT, T, NAME, ...)                                               \
  [&] {                                                                                       \
    if (T == at::kDouble) {                                                                   \
      TORCH_CHECK(PT == at::kDouble, NAME, ": float64 inputs need float64 parameters");       \
      using p_t = double; using wt_t = double; using io_t = double; return __VA_ARGS__();     \
    }                                                                                         \
    using wt_t = float;                                                                       \
    if (PT == at::kFloat) {                                                                   \
      using p_t = float;                                                                      \
      switch (T) {                                                                            \
        case at::kFloat: { using io_t = float; return __VA_ARGS__(); }                        \
        case at::kHalf: { using io_t = at::Half; return __VA_ARGS__(); }                      \
        case at::kBFloat16: { using io_t = at::BFloat16; return __VA_ARGS__(); }              \
        default: TORCH_CHECK(false, NAME, ": unsupported compute dtype ", T);                 \
      }                                                                                       \
    }                                                                                         \
    TORCH_CHECK(PT == T, NAME, ": parameters of dtype ", PT, " with inputs of dtype ", T);    \
    switch (T) {                                                                              \
      case at::kHalf: { using p_t = at::Half; using io_t = at::Half; return __VA_ARGS__(); }  \
      case at::kBFloat16: {                                                                   \
        using p_t = at::BFloat16; using io_t = at::BFloat16; return __VA_ARGS__();            \
      }                                                                                       \
      default: TORCH_CHECK(false, NAME, ": unsupported compute dtype ", T);                   \
    }                                                                                         \
  }()
