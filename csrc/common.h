// Shared host-side helpers of the polykern ops: input checks with messages that name the problem,
// the adapter core (base GEMM + adapter matmuls on cuBLAS through ATen), output poisoning for tests.
#pragma once

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <array>
#include <functional>
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

// POLYKERN_POISON=1: fill every kernel output with NaN before the kernel writes it, so a test can
// see an element that was never written.
bool poison_enabled();
void maybe_poison(const Tensor& t);

void check_cuda(const Tensor& t, const char* name, const Tensor& like);
void check_float(const Tensor& t, const char* name);

// Forward core shared by both methods: y = x W^T + bias + U B^T with U = x_a A^T.
//   x (..., n), W (m, n), A (R, n), B (m, R) [scaling folded in]; returns (y (..., m), U (N, R),
//   W_m): W_m = W + B A (m, n) when `keep_merged` is asked, the forward took the merged path and
//   the keep policy (set_keep_policy) says keeping pays; else an empty tensor.
std::tuple<Tensor, Tensor, Tensor> adapter_forward(const Tensor& x, const Tensor& W,
                                                   const std::optional<Tensor>& bias,
                                                   const Tensor& A, const Tensor& B,
                                                   const std::optional<Tensor>& x_adapter,
                                                   bool keep_merged);

// Backward core: returns (gX, gXa, gA, gB) where gA = dL/dA (R, n), gB = dL/dB (m, R) in the
// compute dtype; each is an empty tensor when not asked for.
//   need_x: gX (= gY W, plus gU A when there is no separate adapter input);
//   need_xa: gXa = gU A (only with x_adapter); need_factors: gA, gB.
//   W_merged: the forward's kept W_m (or absent / empty): gX = gY W_m without a merge.
std::tuple<Tensor, Tensor, Tensor, Tensor> adapter_backward(
    const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& x_adapter,
    const Tensor& W, const Tensor& A, const Tensor& B, const Tensor& U, bool need_x,
    bool need_xa, bool need_factors, const std::optional<Tensor>& W_merged);

// Inference core (nothing saved; adapter_forward's core, U computed only where the unmerged path
// needs it): y = x W^T + bias + (x A^T) B^T, merged as W + B A when that costs fewer bytes (see
// merge_pays in adapter_core.cpp).
Tensor adapter_linear(const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias,
                      const Tensor& A, const Tensor& B);

// The fused adapter GEMMs (lora_gemm.cu, versions 12-13; sm_90a, bf16, R = 32): whether they can
// run on CUDA device `device`, and the forward (y, U) = (x W^T + bias + U B^T, x A^T) and
// backward (gX, gU) = (gY W + gU A, gY Bt^T) with Bt = B^T (32, m), A (32, n). Shapes, dtypes
// and layouts are the caller's to check (adapter_core.cpp's fused_takes).
bool lora_gemm_available(int device);
std::tuple<Tensor, Tensor> lora_gemm_forward(const Tensor& x, const Tensor& W, const Tensor& A,
                                             const Tensor& B, const std::optional<Tensor>& bias);
std::tuple<Tensor, Tensor> lora_gemm_backward(const Tensor& gy, const Tensor& W, const Tensor& Bt,
                                              const Tensor& A);
// 0: never take the fused GEMMs; 1 (default; POLYKERN_FUSED_GEMM=0 at start gives 0): take them
// where they fit and the layer is large enough; 2: wherever they fit (tests). Returns the old mode.
int64_t set_fused_gemm_mode(int64_t mode);
// The shape, dtype and mode rule (adapter_core.cpp), and whether they can run on CUDA device
// `device` (mode on, an sm_90 device, a binary for it).
bool fused_gemm_fits(int64_t N, int64_t n, int64_t m, int64_t R, at::ScalarType dt,
                     std::optional<at::ScalarType> bias_dt);
bool fused_gemm_on(int64_t device);

// Which path the adapter core takes for y (forward) and gX (backward): 0 = auto (merge W + B A
// into one GEMM operand when the rows exceed 1.5x the reduced dimension), 1 = always merge,
// 2 = never (the beta = 1 accumulation of the adapter's share).
void set_merge_policy(int64_t policy);
int64_t get_merge_policy();
// Whether a merged forward keeps W_m for the backward (adapter_core.cpp): 0 = auto (when W_m is
// at most half the size of x and y together: 2 m n <= N (n + m)), 1 = always, 2 = never.
void set_keep_policy(int64_t policy);
int64_t get_keep_policy();
// Whether a forward of `rows` rows, (rows, n) -> (rows, m), asked to keep W_m merges and keeps it.
bool keeps_merged(int64_t rows, int64_t n, int64_t m);
// Whether the adapter's skinny GEMMs run on a side stream beside the base GEMM (adapter_core.cpp):
// 0 = never, 1 = auto (beside base GEMMs of N n m >= 2^36), 2 = always; returns the old mode.
int64_t set_side_stream_mode(int64_t mode);

// The adapter's GEMMs on cuBLASLt (lt_gemm.cpp), torch's row-major semantics, bf16/fp16 with a
// plan (descriptors, algorithm timed once) per shape; other dtypes and layouts go to ATen.
// lt_gemm: D = X Y + beta C (C may be D itself); false when it cannot take the problem.
bool lt_gemm(const Tensor& X, const Tensor& Y, const Tensor& C, const Tensor& D, float beta);
Tensor fast_mm(const Tensor& X, const Tensor& Y);                    // X Y
void fast_mm_into(const Tensor& D, const Tensor& X, const Tensor& Y);  // D = X Y, D (M, N) given
void fast_addmm_(Tensor& D, const Tensor& X, const Tensor& Y);       // D += X Y
Tensor fast_addmm(const Tensor& C, const Tensor& X, const Tensor& Y);  // C + X Y, C (M, N)

// The fused gY pass (gy_pass.cu): (gY B, gY^T U) for gY (N, m), B (m, R), U (N, R) from one read
// of gY when gy_pass_takes says the kernel takes the operands (bf16/fp16, R = 8 or 16,
// m % 8 == 0, 16-byte aligned rows), else two GEMMs. POLYKERN_FUSED_GY=0 turns it off.
bool gy_pass_takes(const Tensor& gy, const Tensor& B, const Tensor& U);
std::tuple<Tensor, Tensor> gy_pass(const Tensor& gy, const Tensor& B, const Tensor& U);
// The same into the caller's gU (N, R) and gB (m, R), both contiguous.
void gy_pass_into(const Tensor& gy, const Tensor& B, const Tensor& U, const Tensor& gU,
                  const Tensor& gB);

// ---- op graphs (version 11, adapter_core.cpp) ------------------------------------------------
// An eager op's GPU work replayed as one CUDA graph: the host cost of a call is then one graph
// launch instead of one ATen/cuBLAS/kernel call per GPU step (tens of microseconds each on the
// H100 machine's host). The key of a call is every input's address, shape, strides and dtype,
// the scalars, the policies, the GEMMs' math modes and the caller's stream: a call whose key
// was seen before is captured (outputs and temporaries in the graph's private memory pool) and
// replayed from then on. A replay writes its outputs into the memory of the previous replay's
// outputs, so it is taken only when nothing outside the cache still holds those (their
// storages' use counts, and their memory as captured); otherwise a second graph is captured
// for the key, or the op runs as usual.
class GraphKey {
 public:
  GraphKey() { v_.reserve(192); }  // the largest key (GenLoRA backward): about 150 values
  GraphKey& add(int64_t v) {
    v_.push_back(v);
    return *this;
  }
  GraphKey& add(double d);
  GraphKey& add(const Tensor& t);
  GraphKey& add(const std::optional<Tensor>& t) { return t.has_value() ? add(*t) : add(int64_t{-2}); }
  std::vector<int64_t>& values() { return v_; }

 private:
  std::vector<int64_t> v_;
};
// Runs body (GPU work on the current stream; returns the op's outputs) directly, or through a
// cached graph of it. `work`: the base GEMM's multiply-adds (0: nothing to run, never graphed).
std::vector<Tensor> run_graphed(GraphKey key, double work,
                                const std::function<std::vector<Tensor>()>& body);
// The multiply-adds of the base GEMM of x (..., n) and W (m, n), run_graphed's `work`.
inline double graph_work(const Tensor& x, const Tensor& W) {
  return static_cast<double>(x.numel()) * static_cast<double>(W.size(0));
}
// 0 = off, 1 = on (default; POLYKERN_OP_GRAPHS=0 at start turns it off); returns the old mode.
int64_t set_op_graph_mode(int64_t mode);
// Graphs hold at most this much GPU memory (their private pools) together; more are not made.
// POLYKERN_OP_GRAPH_MB at start, default 1024. Returns the old budget.
int64_t set_op_graph_budget_mb(int64_t mb);
// Destroys every cached graph (after a device synchronisation); outputs still held stay valid.
void clear_op_graphs();
// (graphs, bytes their pools reserved, replays so far, captures so far)
std::vector<int64_t> op_graph_stats();

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
