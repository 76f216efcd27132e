// The adapter core on cuBLAS (through ATen): the frozen base GEMM with the bias in its epilogue,
// the down-projection U = x_a A^T, and the adapter's share either merged into the weight
// (W + B A, one GEMM) or accumulated into the base output with beta = 1 (no extra output
// buffer). The skinny GEMMs run on a side stream beside the long base GEMM (version 8).
#include "common.h"

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

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
// the small merge GEMM's lower efficiency on the right side. Rounding: W_m is rounded to the
// compute dtype once, which adds an error of the size of the output's own rounding
// (tests/test_ops_cuda.py checks both paths).
//
// Keeping W_m for the backward (version 8) saves the backward's own work on the adapter's share
// of gX: its merge (one more read of W and write of W_m, 22 us at 4096 x 4096 on the H100) where
// the backward would merge, else the beta = 1 pass gX += gU A (a read and a write of gX, 2 N n
// elements: 60 us at N = 8192, n = 4096). It costs holding an (m, n) copy from the forward to the
// backward. `auto` keeps it when that copy is at most half the size of the layer's input and
// output together, 2 m n <= N (n + m) (version 12; up to version 11 half of x alone, N >= 2 m,
// which left wide-output layers such as 4096 -> 14336 at N = 8192 rebuilding). The kept weight
// gives the same gradients bit for bit where the backward would merge too; elsewhere gX is
// gY W_m instead of gY W + gU A, which rounds differently and is tested against the reference
// (tests/test_ops_cuda.py::test_kept_merged_weight). Only the eager autograd node asks for it
// (the `keep_merged` argument); the registered autograd formula rebuilds.
static std::atomic<int> g_merge_policy{0};  // 0 auto, 1 always, 2 never
static std::atomic<int> g_keep_policy{0};   // 0 auto, 1 always (when merged), 2 never

void set_merge_policy(int64_t policy) {
  TORCH_CHECK(policy >= 0 && policy <= 2, "polykern: merge policy must be 0 (auto), 1 (always) "
              "or 2 (never), got ", num(policy));
  g_merge_policy.store(static_cast<int>(policy));
}

int64_t get_merge_policy() { return g_merge_policy.load(); }

void set_keep_policy(int64_t policy) {
  TORCH_CHECK(policy >= 0 && policy <= 2, "polykern: keep policy must be 0 (auto), 1 (always) "
              "or 2 (never), got ", num(policy));
  g_keep_policy.store(static_cast<int>(policy));
}

int64_t get_keep_policy() { return g_keep_policy.load(); }

static bool merge_pays(int64_t rows, int64_t reduced_dim) {
  const int p = g_merge_policy.load();
  if (p != 0) return p == 1;
  return 2 * rows >= 3 * reduced_dim;
}

// Whether a forward over (rows, n) -> (rows, m) that took the merged path keeps W_m (m, n) for
// the backward.
static bool keep_pays(int64_t rows, int64_t n, int64_t m) {
  const int p = g_keep_policy.load();
  if (p != 0) return p == 1;
  return 2 * m * n <= rows * (n + m);
}

// Whether a forward without a separate adapter input over (rows, n) -> (rows, m) that was asked
// to keep W_m merges and keeps it: the decision adapter_forward takes, and the shape of the
// fake kernels' W_merged output (polykern/ops.py calls it as polykern::_keeps_merged).
bool keeps_merged(int64_t rows, int64_t n, int64_t m) {
  return rows > 0 && merge_pays(rows, n) && keep_pays(rows, n, m);
}

// W_m = W + B A (m, n): one cuBLASLt matmul with C = W and D = W_m as separate buffers
// (lt_gemm.cpp), so W is read once and W_m written once. at::addmm copies W into its output and
// then reads it again as C: 19 us of the 47 us a merge cost at 4096 x 4096 on the H100. A
// one-pass WMMA kernel was tried and measured slower than cuBLAS (74 us at R = 152, 45 us at
// R = 16; csrc/README.md, version 5). fp32/fp64 go to at::addmm.
static Tensor merged_weight(const Tensor& W, const Tensor& A, const Tensor& B) {
  return fast_addmm(W, B, A);
}

// ---- the side stream (version 8) -------------------------------------------------------------
// The long base GEMM (compute-bound) and the adapter's skinny GEMMs (memory-bound: U = x_a A^T
// in the forward; the gY pass, gA_gen = gU^T x_a and gB_gen in the backward) do not depend on
// each other, so the skinny ones run on a second stream, forked from the caller's stream (after
// the merge on the merged path) and joined back before the op returns; on the unmerged path the
// beta = 1 accumulation that needs both follows the join. The base GEMM does not
// fill every SM for all of its time (its last wave is partial), and the skinny GEMMs fill the
// gaps: measured with bench/overlap_probe.py on the H100 (torch's GEMMs, N = 8192,
// n = m = 4096), U at R = 16 next to the base GEMM saved 14-16 of its 27 us, at R = 152 6-8 of
// 30 us. Results are the same bit for bit (the same kernels run). Outputs of the side work are
// allocated on the caller's stream before the fork (version 10), so the caching allocator ties
// their memory to the caller's stream, whose later work follows the join: no record_stream,
// whose events the allocator records and polls on every later allocation (host time, 4 per
// step). Temporaries made and freed inside the side work stay on the side stream.
// CUDA graph capture follows the fork and join (events). Mode 1 (default) forks only beside a
// base GEMM of at least 2^36 multiply-adds (N n m; N = 4096 at 4096 x 4096, about 90 us on the
// H100), where there is time to fill; below that the fork and join are host time for nothing.
// Mode 0 (POLYKERN_OVERLAP=0 at start, or polykern::_set_side_stream) never forks, mode 2
// always (tests: small shapes through the same code).
static std::atomic<int> g_side_mode{-1};

// The mode held in `slot`, set on first use from the environment: 0 when `name` is "0", else 1
// (the side stream's POLYKERN_OVERLAP, the op graphs' POLYKERN_OP_GRAPHS).
static int env_mode(std::atomic<int>& slot, const char* name) {
  int mode = slot.load();
  if (mode < 0) {
    const char* v = std::getenv(name);
    mode = (v != nullptr && std::string(v) == "0") ? 0 : 1;
    slot.store(mode);
  }
  return mode;
}

static int side_mode() { return env_mode(g_side_mode, "POLYKERN_OVERLAP"); }

// Sets a mode of 0, 1 or 2 held in `slot` (whose current value is `old`, read through its
// env_mode getter); `what` names the switch and its modes in the error. Returns the old mode.
static int64_t swap_mode(std::atomic<int>& slot, int old, int64_t mode, const char* what) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "polykern: ", what, ", got ", num(mode));
  slot.store(static_cast<int>(mode));
  return old;
}

int64_t set_side_stream_mode(int64_t mode) {
  return swap_mode(g_side_mode, side_mode(), mode,
                   "side stream mode must be 0 (off), 1 (auto) or 2 (always)");
}

// Whether work that could run beside a base GEMM over (rows, n) x (n, m) should.
static bool side_pays(bool has_side_work, int64_t rows, int64_t n, int64_t m) {
  const int mode = side_mode();
  if (!has_side_work || mode == 0) return false;
  return mode == 2 || static_cast<double>(rows) * n * m >= 68719476736.0;  // 2^36
}

// One stream per device and priority from torch's pool, taken on first use and kept, so that
// cuBLASLt's per-stream workspace is allocated once: the side stream (low priority) and the op
// graphs' capture stream (high priority, so never the side stream).
static c10::cuda::CUDAStream kept_stream(c10::DeviceIndex device, bool high_priority) {
  static std::mutex mu;
  static std::vector<std::optional<c10::cuda::CUDAStream>> streams[2];
  std::lock_guard<std::mutex> lock(mu);
  auto& per_device = streams[high_priority ? 1 : 0];
  if (per_device.size() <= static_cast<size_t>(device)) per_device.resize(device + 1);
  auto& s = per_device[device];
  if (!s.has_value()) s = c10::cuda::getStreamFromPool(high_priority, device);
  return *s;
}

static c10::cuda::CUDAStream side_stream(c10::DeviceIndex device) {
  return kept_stream(device, /*high_priority=*/false);
}

// The fork and join events, one pair per device and host thread (the autograd engine runs
// backward ops on its own device thread), created once and re-recorded: a cudaStreamWaitEvent
// waits for the record made before it, so recording again later does not touch queued waits.
// This saves creating and destroying two events per op (at::cuda::CUDAEvent creates on first
// record), a few microseconds of host time per op on the H100 machine.
struct ForkJoinEvents {
  cudaEvent_t fork = nullptr, join = nullptr;
};

static const ForkJoinEvents& fork_join_events(c10::DeviceIndex device) {
  thread_local std::vector<ForkJoinEvents> events;  // never destroyed: a few bytes per thread
  if (events.size() <= static_cast<size_t>(device)) events.resize(device + 1);
  ForkJoinEvents& e = events[device];
  if (e.fork == nullptr) {
    const c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&e.fork, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&e.join, cudaEventDisableTiming));
  }
  return e;
}

class SideStream {
 public:
  // Forks here: work run() queues waits for everything queued on the caller's stream so far.
  explicit SideStream(bool wanted) : main_(c10::cuda::getCurrentCUDAStream()), on_(wanted) {
    if (!on_) return;
    POLYKERN_SCOPE("polykern::side_fork");
    side_ = side_stream(main_.device_index());
    events_ = &fork_join_events(main_.device_index());
    C10_CUDA_CHECK(cudaEventRecord(events_->fork, main_.stream()));
    C10_CUDA_CHECK(cudaStreamWaitEvent(side_->stream(), events_->fork, 0));
  }
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  // an error between fork and join (a failed check inside run()) still joins: the caller's
  // stream must not free and reuse inputs that queued side work still reads
  ~SideStream() {
    try {
      join();
    } catch (...) {  // a destructor must not throw; the error that unwound us is reported
    }
  }
  template <typename F>
  void run(F&& f) {
    if (!on_) return f();
    const c10::cuda::CUDAStreamGuard guard(*side_);
    f();
  }
  void join() {
    if (!on_ || joined_) return;
    POLYKERN_SCOPE("polykern::side_join");
    joined_ = true;
    C10_CUDA_CHECK(cudaEventRecord(events_->join, side_->stream()));
    C10_CUDA_CHECK(cudaStreamWaitEvent(main_.stream(), events_->join, 0));
  }

 private:
  c10::cuda::CUDAStream main_;
  std::optional<c10::cuda::CUDAStream> side_;
  const ForkJoinEvents* events_ = nullptr;
  bool on_;
  bool joined_ = false;
};

// ---- the fused adapter GEMMs (version 12, lora_gemm.cu) -------------------------------------
// On an sm_90 device, for bf16 layers with R = 32 (PERA square r = 16) and shapes that fit the
// kernel's tiles (N % 128, n % 256, m % 256) and are large enough (fused_gemm_fits), the
// forward computes y = x W^T + bias + U B^T and U
// in one kernel (no merged weight, no side stream) and the backward gX = gY W + gU A and gU the
// same way (W and A read in place), then gA = gU^T x and gB = gY^T U. Why: PERA square's merged
// path spends the merge (22.8 us at 4096 x 4096) and U beside the base GEMM (22 us of stretch)
// in the forward. Measured per PERA square step: -12.5 us in version 12, -29 to -39 us and
// -32 MiB of peak memory in version 13 (csrc/README.md). Both directions take the same
// decision, so a fused forward never leaves a backward without the merged weight it would have
// kept; a weight the forward did keep (a forward that did not fit, e.g. an fp32 bias) is used.
static std::atomic<int> g_fused_mode{-1};

static int fused_mode() { return env_mode(g_fused_mode, "POLYKERN_FUSED_GEMM"); }

int64_t set_fused_gemm_mode(int64_t mode) {
  return swap_mode(g_fused_mode, fused_mode(), mode,
                   "fused GEMM mode must be 0 (off), 1 (auto) or 2 (wherever the tiles fit)");
}

// Whether the fused kernels fit N rows of a layer (m, n) with R adapter rows in dtype dt (and a
// bias of bias_dt): shapes, dtypes and mode only, no device (layouts are made to fit, tma_fit),
// so that the fake kernels take the same decision (polykern/ops.py) and CPU tests can check it.
// Mode 1 takes them from N n m >= 2^37 (the main benchmark case, N = 8192 at 4096 x 4096, and
// larger), where they were measured; below that the kernel's tiles leave SMs idle (its GEMM took
// 2.4x cuBLAS's time at 1024 x 1024 x 4096) and the merged path stays. Mode 2 (tests) takes
// them wherever the tiles fit.
bool fused_gemm_fits(int64_t N, int64_t n, int64_t m, int64_t R, at::ScalarType dt,
                     std::optional<at::ScalarType> bias_dt) {
  const int mode = fused_mode();
  if (mode == 0 || dt != at::kBFloat16 || R != 32) return false;
  if (N <= 0 || N % 128 != 0 || n % 256 != 0 || m % 256 != 0) return false;
  if (bias_dt.has_value() && *bias_dt != at::kBFloat16) return false;
  return mode == 2 || static_cast<double>(N) * n * m >= 137438953472.0;  // 2^37
}

static bool fused_takes(int64_t N, int64_t n, int64_t m, int64_t R, at::ScalarType dt,
                        const std::optional<Tensor>& bias, const Tensor& like) {
  const auto bias_dt = bias.has_value() ? std::optional<at::ScalarType>(bias->scalar_type())
                                        : std::nullopt;
  return fused_gemm_fits(N, n, m, R, dt, bias_dt) && like.is_cuda() &&
         lora_gemm_available(like.get_device());
}

bool fused_gemm_on(int64_t device) {
  if (fused_mode() == 0 || device < 0 || device >= c10::cuda::device_count()) return false;
  return lora_gemm_available(static_cast<int>(device));
}

// t itself when TMA can read it (unit stride along rows, rows 16-byte multiples apart, a 16-byte
// aligned start), else a contiguous copy (a fresh block is 512-byte aligned).
static Tensor tma_fit(const Tensor& t) {
  const bool ok = t.stride(-1) == 1 && (t.stride(0) * t.element_size()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

static std::optional<Tensor> fused_bias(const std::optional<Tensor>& bias) {
  if (!bias.has_value()) return bias;
  const bool ok = bias->stride(0) == 1 && reinterpret_cast<uintptr_t>(bias->data_ptr()) % 4 == 0;
  return ok ? *bias : bias->clone(at::MemoryFormat::Contiguous);
}

// The fused forward (y, U) for x2 (N, n), in the layouts the kernel reads.
static std::tuple<Tensor, Tensor> fused_forward(const Tensor& x2, const Tensor& W, const Tensor& A,
                                                const Tensor& B,
                                                const std::optional<Tensor>& bias) {
  return lora_gemm_forward(tma_fit(x2), tma_fit(W), A.contiguous(), B.contiguous(),
                           fused_bias(bias));
}

// The forward core of training and inference: y = x2 W^T + bias + U B^T for x2 (N, n), on
// W_m = W + B A when `merged`, else with the adapter's share added into y (beta = 1). U = xa2 A^T
// is computed when `need_U` (training keeps it for the backward) or when the unmerged path needs
// it, beside the base GEMM on the side stream where that pays. Returns (y (N, m), U or undefined,
// W_m or undefined).
// Launch order: on the merged path the long base GEMM is queued before U (and in the backward
// gX before gU), so that the GPU starts it one launch earlier; the host, which costs tens of
// microseconds per launch on the H100 machine, then queues the rest while it runs.
static std::tuple<Tensor, Tensor, Tensor> forward_core(const Tensor& x2, const Tensor& xa2,
                                                       const Tensor& W,
                                                       const std::optional<Tensor>& bias,
                                                       const Tensor& A, const Tensor& B,
                                                       bool merged, bool need_U) {
  POLYKERN_SCOPE("polykern::forward_core");
  const int64_t N = x2.size(0), n = W.size(1), m = W.size(0);
  const bool want_U = need_U || !merged;
  Tensor U, Wm;
  if (merged) Wm = merged_weight(W, A, B);
  const Tensor& Wb = merged ? Wm : W;
  SideStream side(side_pays(want_U && N > 0, N, n, m));                   // forks after the merge
  Tensor y = bias.has_value() ? at::addmm(*bias, x2, Wb.t()) : at::mm(x2, Wb.t());  // (N, m)
  if (want_U) {
    U = at::empty({N, A.size(0)}, xa2.options());                        // on the caller's stream
    side.run([&] { fast_mm_into(U, xa2, A.t()); });                       // (N, R), beside y
  }
  side.join();
  if (!merged) fast_addmm_(y, U, B.t());                                  // beta = 1: into y
  return {y, U, Wm};
}

Tensor adapter_linear(const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias,
                      const Tensor& A, const Tensor& B) {
  const Tensor x2 = x.reshape({-1, W.size(1)});
  if (fused_takes(x2.size(0), W.size(1), W.size(0), A.size(0), x2.scalar_type(), bias, x2))
    return std::get<0>(fused_forward(x2, W, A, B, bias)).view(out_shape(x, W.size(0)));
  const bool merged = x2.size(0) > 0 && merge_pays(x2.size(0), W.size(1));
  return std::get<0>(forward_core(x2, x2, W, bias, A, B, merged, /*need_U=*/false))
      .view(out_shape(x, W.size(0)));
}

std::tuple<Tensor, Tensor, Tensor> adapter_forward(const Tensor& x, const Tensor& W,
                                                   const std::optional<Tensor>& bias,
                                                   const Tensor& A, const Tensor& B,
                                                   const std::optional<Tensor>& x_adapter,
                                                   bool keep_merged) {
  const int64_t n = W.size(1), m = W.size(0);
  const Tensor x2 = x.reshape({-1, n});                                   // (N, n)
  const Tensor xa2 = x_adapter.has_value() ? x_adapter->reshape({-1, n}) : x2;
  if (!x_adapter.has_value() &&
      fused_takes(x2.size(0), n, m, A.size(0), x2.scalar_type(), bias, x2)) {  // no merged W
    auto [y, U] = fused_forward(x2, W, A, B, bias);
    return {y.view(out_shape(x, m)), U, at::empty({0}, x.options())};
  }
  // with dropout the adapter's input differs from x: no merged operand exists
  const bool merged = !x_adapter.has_value() && x2.size(0) > 0 && merge_pays(x2.size(0), n);
  const bool keep = keep_merged && !x_adapter.has_value() && keeps_merged(x2.size(0), n, m);
  auto [y, U, Wm] = forward_core(x2, xa2, W, bias, A, B, merged, /*need_U=*/true);
  if (!keep || !Wm.defined()) Wm = at::empty({0}, x.options());
  return {y.view(out_shape(x, m)), U, Wm};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> adapter_backward(
    const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& x_adapter,
    const Tensor& W, const Tensor& A, const Tensor& B, const Tensor& U, bool need_x,
    bool need_xa, bool need_factors, const std::optional<Tensor>& W_merged) {
  POLYKERN_SCOPE("polykern::adapter_backward");
  const int64_t n = W.size(1), m = W.size(0);
  const Tensor gy = grad_y.reshape({-1, m});                              // (N, m)
  const bool separate = x_adapter.has_value();
  // W_m kept by the forward (an empty tensor when it was not): gY W_m costs no merge
  const bool kept = W_merged.has_value() && W_merged->numel() > 0;
  if (kept) {
    check_cuda(*W_merged, "W_merged", x);
    TORCH_CHECK(!separate, "polykern: W_merged was given with a separate adapter input "
                "(dropout): the merged weight does not apply there");
    TORCH_CHECK(W_merged->sizes() == W.sizes() && W_merged->scalar_type() == grad_y.scalar_type(),
                "polykern: W_merged must have the weight's shape ", shape(W.sizes()),
                " and grad_y's dtype ", grad_y.scalar_type(), ", got ", shape(W_merged->sizes()),
                " ", W_merged->scalar_type());
  }
  if (need_x && !separate && !kept &&
      fused_takes(gy.size(0), n, m, A.size(0), gy.scalar_type(), std::nullopt, gy)) {
    // gX = gY W + gU A and gU = gY B in one kernel (W and A read in place), then the factors
    POLYKERN_SCOPE("polykern::fused_backward");
    auto [gX, gU] = lora_gemm_backward(tma_fit(gy), tma_fit(W), B.t().contiguous(),
                                       A.contiguous());
    Tensor gA, gB;
    if (need_factors) {
      // in series: beside each other on the side stream they took as long (version 13's trial)
      gA = fast_mm(gU.t(), x.reshape({-1, n}));                           // (R, n)
      gB = fast_mm(gy.t(), U);                                            // (m, R)
    } else {
      gA = at::empty({0}, x.options());
      gB = at::empty({0}, x.options());
    }
    return {gX.view(x.sizes()), at::empty({0}, x.options()), gA, gB};
  }
  const bool merged =
      need_x && !separate && gy.size(0) > 0 && (kept || merge_pays(gy.size(0), m));
  const bool need_gU = need_factors || need_xa || (need_x && !separate && !merged);
  // gU and gB from one read of gY where the fused kernel takes the operands (small R)
  const bool fused = need_factors && gy_pass_takes(gy, B, U);
  Tensor gU, gX, gXa, gA, gB;
  // the side work's outputs, on the caller's stream (see SideStream)
  const int64_t R = B.size(1);
  if (need_gU) gU = at::empty({gy.size(0), R}, gy.options());
  if (need_factors) {
    gA = at::empty({R, n}, gy.options());
    gB = at::empty({m, R}, gy.options());
  }
  auto down = [&] {
    if (fused) gy_pass_into(gy, B, U, gU, gB);                            // (N, R), (m, R)
    else fast_mm_into(gU, gy, B);                                         // (N, R)
  };
  auto factors = [&] {
    if (!need_factors) return;
    const Tensor xa2 = separate ? x_adapter->reshape({-1, n}) : x.reshape({-1, n});
    fast_mm_into(gA, gU.t(), xa2);                                        // (R, n)
    if (!fused) fast_mm_into(gB, gy.t(), U);                              // (m, R)
  };
  // gU and the factor gradients beside the base GEMM gX = gY W (or gY W_m) when there is one
  Tensor Wm;
  if (merged) Wm = kept ? *W_merged : merged_weight(W, A, B);
  SideStream side(side_pays(need_x && need_gU, gy.size(0), m, n));       // forks after the merge
  if (need_x) gX = at::mm(gy, merged ? Wm : W);                           // (N, n)
  side.run([&] {
    if (need_gU) down();
    factors();
  });
  side.join();
  if (need_x && !separate && !merged) fast_addmm_(gX, gU, A);             // adapter share, beta=1
  if (need_x) gX = gX.view(x.sizes());
  if (need_xa && separate) gXa = fast_mm(gU, A).view(x.sizes());
  auto empty = [&](Tensor& t) { if (!t.defined()) t = at::empty({0}, x.options()); };
  empty(gX); empty(gXa); empty(gA); empty(gB);
  return {gX, gXa, gA, gB};
}

// ---- op graphs (version 11) ------------------------------------------------------------------
// See common.h. Why: an eager PERA step at N = 2048 made about ten GPU calls (the base GEMMs,
// six cuBLASLt matmuls, the generator kernels) at 10-60 us of host time each on the lent H100
// machine's host, so the step ran at the host's pace (2.0-2.9x the frozen layer eager against
// 1.4x captured; csrc/README.md). Replaying the op's work as one graph leaves one launch.
//
// Safety, in order of the ways a replay could go wrong:
// - Inputs: the graph reads the addresses it was captured with. The key holds every input's
//   address, shape, strides and dtype, so a replay happens only when this call's inputs sit at
//   those addresses in that layout; what they hold now is what the graph reads.
// - Outputs: allocated during capture, in the graph's private pool, so a replay rewrites the
//   memory of the outputs it handed out before. A slot replays only when the cache's own tensors
//   are the only holders of those storages (the use counts noted at capture); callers get fresh
//   tensors on the same storages (shallow copies, own version counters, no autograd history).
// - Temporaries: in the private pool too, used by nothing but the graph; replays of one graph
//   are ordered on the caller's stream (the stream is part of the key).
// - Capture: on the caller's stream, or on a dedicated one when the caller is on the default
//   stream (graphs cannot be captured there); thread-local capture mode, so other threads'
//   CUDA calls are not affected. Never inside a capture of the caller's (torch.cuda.graph):
//   the body then runs as usual and becomes part of that graph. A capture that fails leaves the
//   key to the plain path for good.
// - Memory: each graph keeps its pool (outputs and temporaries) until clear_op_graphs(); new
//   graphs are made only while the pools' total stays under the budget (default 1 GiB).
namespace {

constexpr int kSlotsPerKey = 2;       // a caller holding the last outputs gets a second graph
constexpr size_t kMaxGraphs = 256;    // graphs in all
constexpr size_t kMaxKeys = 8192;     // keys remembered (seen once, or graphed)

std::atomic<int> g_graph_mode{-1};
std::atomic<int64_t> g_graph_budget{-1};  // bytes

int graph_mode() { return env_mode(g_graph_mode, "POLYKERN_OP_GRAPHS"); }

int64_t graph_budget() {
  int64_t b = g_graph_budget.load();
  if (b < 0) {
    const char* v = std::getenv("POLYKERN_OP_GRAPH_MB");
    int64_t mb = 1024;
    if (v != nullptr && *v != '\0') mb = std::max<int64_t>(0, std::atoll(v));
    b = mb << 20;
    g_graph_budget.store(b);
  }
  return b;
}

struct GraphSlot {
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  std::vector<Tensor> outputs;    // in the graph's pool
  std::vector<size_t> expected;   // each output storage's use count when only the cache holds it
  std::vector<const void*> where;  // each output storage's memory as captured
  int64_t bytes = 0;              // the pool's reserved bytes
};

struct GraphEntry {
  std::vector<std::unique_ptr<GraphSlot>> slots;
  int sightings = 0;
  bool plain_only = false;  // a capture failed: never again for this key
};

struct GraphCache {
  std::mutex mu;
  std::map<std::vector<int64_t>, GraphEntry> entries;
  size_t graphs = 0;
  int64_t bytes = 0, replays = 0, captures = 0;
};

GraphCache& graph_cache() {
  static auto* c = new GraphCache();  // never destroyed: graphs outlive no CUDA context
  return *c;
}

// Free: the cache holds each output storage alone, and each still has the memory the graph
// writes (a caller's resize_ of a returned tensor would have moved it).
bool slot_free(const GraphSlot& s) {
  for (size_t i = 0; i < s.outputs.size(); ++i) {
    const Tensor& t = s.outputs[i];
    if (t.defined() && (t.storage().use_count() != s.expected[i] ||
                        t.storage().data() != s.where[i]))
      return false;
  }
  return true;
}

std::vector<Tensor> hand_out(const GraphSlot& s) {
  std::vector<Tensor> out;
  out.reserve(s.outputs.size());
  for (const Tensor& t : s.outputs) {
    if (!t.defined()) {
      out.emplace_back();
      continue;
    }
    out.push_back(Tensor::wrap_tensor_impl(t.unsafeGetTensorImpl()->shallow_copy_and_detach(
        /*version_counter=*/c10::VariableVersion(0), /*allow_tensor_metadata_change=*/true)));
  }
  return out;
}

int64_t reserved_bytes(c10::DeviceIndex device) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  return stats.reserved_bytes[0].current;  // StatType::AGGREGATE
}

// The stream a call on `caller` is captured on: the caller's own, or, beside the default stream
// (where graphs cannot be captured), the device's kept high-priority stream.
c10::cuda::CUDAStream capture_stream_for(const c10::cuda::CUDAStream& caller) {
  const c10::DeviceIndex dev = caller.device_index();
  if (caller != c10::cuda::getDefaultCUDAStream(dev)) return caller;
  return kept_stream(dev, /*high_priority=*/true);
}

// Captures body into slot; false when the capture failed (nothing ran: the caller runs body).
bool capture(GraphSlot& slot, const c10::cuda::CUDAStream& caller,
             const std::function<std::vector<Tensor>()>& body) {
  const c10::cuda::CUDAStream cs = capture_stream_for(caller);
  const int64_t before = reserved_bytes(caller.device_index());
  auto graph = std::make_unique<at::cuda::CUDAGraph>();
  std::vector<Tensor> outs;
  {
    const c10::cuda::CUDAStreamGuard guard(cs);
    try {
      graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    } catch (...) {
      (void)cudaGetLastError();
      return false;
    }
    try {
      outs = body();
    } catch (...) {
      outs.clear();
      try {
        graph->capture_end();
      } catch (...) {
      }
      (void)cudaGetLastError();  // a capture error is not sticky; leave no trace of it
      return false;
    }
    try {
      graph->capture_end();
    } catch (...) {
      outs.clear();
      (void)cudaGetLastError();
      return false;
    }
  }
  slot.graph = std::move(graph);
  slot.outputs = std::move(outs);
  slot.expected.clear();
  slot.where.clear();
  for (const Tensor& t : slot.outputs) {
    slot.expected.push_back(t.defined() ? t.storage().use_count() : 0);
    slot.where.push_back(t.defined() ? t.storage().data() : nullptr);
  }
  slot.bytes = std::max<int64_t>(0, reserved_bytes(caller.device_index()) - before);
  return true;
}

}  // namespace

GraphKey& GraphKey::add(double d) {
  int64_t bits = 0;
  std::memcpy(&bits, &d, sizeof(bits));
  return add(bits);
}

GraphKey& GraphKey::add(const Tensor& t) {
  if (!t.defined()) return add(int64_t{-1});
  add(static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())));
  add(static_cast<int64_t>(t.scalar_type()));
  add(static_cast<int64_t>(t.device().index()));
  add(t.dim());
  for (int64_t d = 0; d < t.dim(); ++d) {
    add(t.size(d));
    add(t.stride(d));
  }
  return *this;
}

std::vector<Tensor> run_graphed(GraphKey key, double work,
                                const std::function<std::vector<Tensor>()>& body) {
  if (graph_mode() == 0 || !(work > 0)) return body();
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return body();  // inside the caller's own capture
  const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream();
  // the math modes that ATen's and cuBLAS's GEMMs read at call time (TF32 for fp32, reduced
  // precision reductions and accumulation for bf16/fp16, the BLAS backend): a graph keeps the
  // mode it was captured under, so a toggled mode is a new key
  const at::Context& ctx = at::globalContext();
  key.add(caller.id())
      .add(static_cast<int64_t>(caller.device_index()))
      .add(get_merge_policy())
      .add(get_keep_policy())
      .add(static_cast<int64_t>(side_mode()))
      .add(static_cast<int64_t>(fused_mode()))
      .add(static_cast<int64_t>(ctx.deterministicAlgorithms()))
      .add(static_cast<int64_t>(ctx.float32MatmulPrecision()))
      .add(static_cast<int64_t>(ctx.allowBF16ReductionCuBLAS()))
      .add(static_cast<int64_t>(ctx.allowFP16ReductionCuBLAS()))
      .add(static_cast<int64_t>(ctx.allowFP16AccumulationCuBLAS()))
      .add(static_cast<int64_t>(const_cast<at::Context&>(ctx).blasPreferredBackend()));
  GraphCache& c = graph_cache();
  std::unique_lock<std::mutex> lock(c.mu);
  auto it = c.entries.find(key.values());
  if (it == c.entries.end()) {
    if (c.entries.size() >= kMaxKeys) {  // forget the keys seen once; graphed ones stay
      for (auto e = c.entries.begin(); e != c.entries.end();)
        e = e->second.slots.empty() ? c.entries.erase(e) : std::next(e);
      if (c.entries.size() >= kMaxKeys) {
        lock.unlock();
        return body();
      }
    }
    it = c.entries.emplace(std::move(key.values()), GraphEntry()).first;
  }
  GraphEntry& e = it->second;
  if (e.plain_only) {
    lock.unlock();
    return body();
  }
  for (const auto& s : e.slots) {
    if (slot_free(*s)) {
      POLYKERN_SCOPE("polykern::graph_replay");
      s->graph->replay();
      ++c.replays;
      return hand_out(*s);
    }
  }
  // first sighting: the plain path (it also times the cuBLASLt plans, which a capture cannot)
  if (++e.sightings < 2 || e.slots.size() >= static_cast<size_t>(kSlotsPerKey) ||
      c.graphs >= kMaxGraphs || c.bytes >= graph_budget()) {
    lock.unlock();
    return body();
  }
  POLYKERN_SCOPE("polykern::graph_capture");
  auto slot = std::make_unique<GraphSlot>();
  if (!capture(*slot, caller, body)) {
    e.plain_only = true;
    lock.unlock();
    return body();
  }
  slot->graph->replay();
  std::vector<Tensor> out = hand_out(*slot);
  c.bytes += slot->bytes;
  ++c.graphs;
  ++c.captures;
  ++c.replays;
  e.slots.push_back(std::move(slot));
  return out;
}

int64_t set_op_graph_mode(int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1, "polykern: op graph mode must be 0 (off) or 1 (on), got ",
              num(mode));
  const int64_t old = graph_mode();
  g_graph_mode.store(static_cast<int>(mode));
  return old;
}

int64_t set_op_graph_budget_mb(int64_t mb) {
  TORCH_CHECK(mb >= 0, "polykern: the op graph budget must be >= 0 MiB, got ", num(mb));
  const int64_t old = graph_budget() >> 20;
  g_graph_budget.store(mb << 20);
  return old;
}

void clear_op_graphs() {
  GraphCache& c = graph_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  if (c.graphs > 0) {  // no replay may still be running when the pools are released
    for (c10::DeviceIndex d = 0; d < c10::cuda::device_count(); ++d) {
      const c10::cuda::CUDAGuard guard(d);
      C10_CUDA_CHECK(cudaDeviceSynchronize());
    }
  }
  c.entries.clear();
  c.graphs = 0;
  c.bytes = 0;
}

std::vector<int64_t> op_graph_stats() {
  GraphCache& c = graph_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return {static_cast<int64_t>(c.graphs), c.bytes, c.replays, c.captures};
}

}  // namespace polykern
