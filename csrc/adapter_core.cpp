// The adapter core on cuBLAS (through ATen): the frozen base GEMM with the bias in its epilogue,
// the down-projection U = x_a A^T, and the adapter's share either merged into the weight
// (W + B A, one GEMM) or accumulated into the base output with beta = 1 (no extra output
// buffer). The skinny GEMMs run on a side stream beside the long base GEMM.
#include "common.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <mutex>
#include <vector>

namespace polykern {

void maybe_poison(const Tensor& t) {
  if (option(Opt::kPoison) == 1 && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
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
// (tests/test_ops_cuda.py checks both paths). W_m lives only inside the op that built it: the
// backward builds its own, so nothing weight-sized is held from the forward to the backward.
static bool merge_pays(int64_t rows, int64_t reduced_dim) {
  const int p = option(Opt::kMerge);
  if (p != 0) return p == 1;
  return 2 * rows >= 3 * reduced_dim;
}

// W_m = W + B A (m, n): one cuBLASLt matmul with C = W and D = W_m as separate buffers
// (lt_gemm.cpp), so W is read once and W_m written once. at::addmm copies W into its output and
// then reads it again as C: 19 us of the 47 us a merge cost at 4096 x 4096 on the H100. A
// one-pass WMMA kernel measured slower than cuBLAS (74 us at R = 152, 45 us at R = 16).
// fp32/fp64 go to at::addmm.
static Tensor merged_weight(const Tensor& W, const Tensor& A, const Tensor& B) {
  return fast_addmm(W, B, A);
}

// ---- the side stream -------------------------------------------------------------
// The long base GEMM (compute-bound) and the adapter's skinny GEMMs (memory-bound: U = x_a A^T
// in the forward; the gY pass, gA_gen = gU^T x_a and gB_gen in the backward) do not depend on
// each other, so the skinny ones run on a second stream, forked from the caller's stream (after
// the merge on the merged path) and joined back before the op returns; on the unmerged path the
// beta = 1 accumulation that needs both follows the join. The base GEMM does not
// fill every SM for all of its time (its last wave is partial), and the skinny GEMMs fill the
// gaps: measured on the H100 (torch's GEMMs, N = 8192,
// n = m = 4096), U at R = 16 next to the base GEMM saved 14-16 of its 27 us, at R = 152 6-8 of
// 30 us. Results are the same bit for bit (the same kernels run). Outputs of the side work are
// allocated on the caller's stream before the fork, so the caching allocator ties
// their memory to the caller's stream, whose later work follows the join: no record_stream,
// whose events the allocator records and polls on every later allocation (host time, 4 per
// step). Temporaries made and freed inside the side work stay on the side stream.
// CUDA graph capture follows the fork and join (events). Option side_stream 1 (default) forks
// only beside a base GEMM of at least 2^36 multiply-adds (N n m; N = 4096 at 4096 x 4096, about
// 90 us on the H100), where there is time to fill; below that the fork and join are host time
// for nothing. 0 never forks, 2 always (tests: small shapes through the same code).
static bool side_pays(bool has_side_work, int64_t rows, int64_t n, int64_t m) {
  const int mode = option(Opt::kSideStream);
  if (!has_side_work || mode == 0) return false;
  return mode == 2 || static_cast<double>(rows) * n * m >= 68719476736.0;  // 2^36
}

// One low-priority stream per device from torch's pool, taken on first use and kept, so that
// cuBLASLt's per-stream workspace is allocated once.
static c10::cuda::CUDAStream side_stream(c10::DeviceIndex device) {
  static std::mutex mu;
  static std::vector<std::optional<c10::cuda::CUDAStream>> streams;
  std::lock_guard<std::mutex> lock(mu);
  if (streams.size() <= static_cast<size_t>(device)) streams.resize(device + 1);
  auto& s = streams[device];
  if (!s.has_value()) s = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device);
  return *s;
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

// The forward core of training and inference: y = x2 W^T + bias + U B^T for x2 (N, n), on
// W_m = W + B A when `merged`, else with the adapter's share added into y (beta = 1). U = xa2 A^T
// is computed when `need_U` (training keeps it for the backward) or when the unmerged path needs
// it, beside the base GEMM on the side stream where that pays. Returns (y (N, m), U or
// undefined); W_m is freed here.
// Launch order: on the merged path the long base GEMM is queued before U (and in the backward
// gX before gU), so that the GPU starts it one launch earlier; the host, which costs tens of
// microseconds per launch on the H100 machine, then queues the rest while it runs.
static std::tuple<Tensor, Tensor> forward_core(const Tensor& x2, const Tensor& xa2,
                                               const Tensor& W, const std::optional<Tensor>& bias,
                                               const Tensor& A, const Tensor& B, bool merged,
                                               bool need_U) {
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
    side.run([&] { fast_mm_into(U, xa2, A.t()); });           // (N, R), beside y
  }
  side.join();
  if (!merged) fast_addmm_(y, U, B.t());                      // beta = 1: into y
  return {y, U};
}

Tensor adapter_linear(const Tensor& x, const Tensor& W, const std::optional<Tensor>& bias,
                      const Tensor& A, const Tensor& B) {
  const Tensor x2 = x.reshape({-1, W.size(1)});
  const bool merged = x2.size(0) > 0 && merge_pays(x2.size(0), W.size(1));
  return std::get<0>(forward_core(x2, x2, W, bias, A, B, merged, /*need_U=*/false))
      .view(out_shape(x, W.size(0)));
}

std::tuple<Tensor, Tensor> adapter_forward(const Tensor& x, const Tensor& W,
                                           const std::optional<Tensor>& bias, const Tensor& A,
                                           const Tensor& B,
                                           const std::optional<Tensor>& x_adapter) {
  const int64_t n = W.size(1), m = W.size(0);
  const Tensor x2 = x.reshape({-1, n});                                   // (N, n)
  const Tensor xa2 = x_adapter.has_value() ? x_adapter->reshape({-1, n}) : x2;
  // with dropout the adapter's input differs from x: no merged operand exists
  const bool merged = !x_adapter.has_value() && x2.size(0) > 0 && merge_pays(x2.size(0), n);
  auto [y, U] = forward_core(x2, xa2, W, bias, A, B, merged, /*need_U=*/true);
  return {y.view(out_shape(x, m)), U};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> adapter_backward(
    const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& x_adapter,
    const Tensor& W, const Tensor& A, const Tensor& B, const Tensor& U, bool need_x,
    bool need_xa, bool need_factors) {
  POLYKERN_SCOPE("polykern::adapter_backward");
  const int64_t n = W.size(1), m = W.size(0);
  const Tensor gy = grad_y.reshape({-1, m});                              // (N, m)
  const bool separate = x_adapter.has_value();
  const bool merged = need_x && !separate && gy.size(0) > 0 && merge_pays(gy.size(0), m);
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
    else fast_mm_into(gU, gy, B);                                       // (N, R)
  };
  auto factors = [&] {
    if (!need_factors) return;
    const Tensor xa2 = separate ? x_adapter->reshape({-1, n}) : x.reshape({-1, n});
    fast_mm_into(gA, gU.t(), xa2);                                      // (R, n)
    if (!fused) fast_mm_into(gB, gy.t(), U);                            // (m, R)
  };
  // gU and the factor gradients beside the base GEMM gX = gY W (or gY W_m) when there is one
  Tensor Wm;
  if (merged) Wm = merged_weight(W, A, B);
  SideStream side(side_pays(need_x && need_gU, gy.size(0), m, n));       // forks after the merge
  if (need_x) gX = at::mm(gy, merged ? Wm : W);                           // (N, n)
  side.run([&] {
    if (need_gU) down();
    factors();
  });
  side.join();
  if (need_x && !separate && !merged) fast_addmm_(gX, gU, A);           // adapter share, beta=1
  if (need_x) gX = gX.view(x.sizes());
  if (need_xa && separate) gXa = fast_mm(gU, A).view(x.sizes());
  auto empty = [&](Tensor& t) { if (!t.defined()) t = at::empty({0}, x.options()); };
  empty(gX); empty(gXa); empty(gA); empty(gB);
  return {gX, gXa, gA, gB};
}

}  // namespace polykern
