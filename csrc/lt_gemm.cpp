// The adapter's own GEMMs (the skinny ones and the merge) on cuBLASLt: descriptors built once
// per shape, and the algorithm picked by timing cuBLASLt's candidates once per shape class, the
// shape with the token count N left out (common.h, Tokens), instead of taking the heuristic's
// first answer.
//
// Why timing: on the H100 the heuristic's picks for the adapter's shapes ran at 1.3-2.3x their
// bandwidth floor (at::mm's `U = x A^T` at N = 8192, n = 4096, R = 152: a 96 x 64 tile that
// reads x twice, 49.7 us against a 22 us floor). Why per class and not per shape: fine-tuning
// pads each batch to its longest sequence, so N changes every step; timing each new N cost up
// to 57 ms per layer (bench/bench_e2e.py's varlen workloads). A new N in a known class builds
// its descriptors and checks the class's algorithm (cublasLtMatmulAlgoCheck): host work of a
// few microseconds, no GPU work.
//
// Timing: one spin kernel, each candidate run six times, one synchronisation: a few ms, once per
// class, at most kMaxTuned classes per process (later ones take the heuristic's first pick).
// Skipped, with the heuristic's first candidate used, while the stream is being captured into a
// CUDA graph, under torch.use_deterministic_algorithms(True), and with option gemm_tune 0.
//
// Semantics are torch's row-major ones: D (M, N) = X (M, K) Y (K, N) + beta C, fp32
// accumulation, bf16/fp16 only (fp32 and fp64 stay on ATen with torch's TF32 settings). Split-K
// candidates may only reduce in fp32 (CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE).
#include "common.h"

#include <torch/library.h>

#ifdef POLYKERN_HAVE_CUBLASLT
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cublasLt.h>

#include <limits>
#include <map>
#include <mutex>
#include <vector>
#endif

namespace polykern {

#ifdef POLYKERN_HAVE_CUBLASLT
namespace {

// One operand of cuBLAS's column-major problem D^T = Y^T X^T: a torch matrix T (rows, cols) that
// is row-major (stride(1) == 1) is T^T in column-major with no transpose; one that is
// column-major (stride(0) == 1, e.g. W.t()) needs CUBLAS_OP_T. Anything else is not handled.
struct Operand {
  cublasOperation_t op;
  uint64_t rows, cols;
  int64_t ld;
};

bool describe(const Tensor& t, Operand& o) {
  const int64_t r = t.size(0), c = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  if (s1 == 1 && s0 >= std::max<int64_t>(c, 1)) {
    o = {CUBLAS_OP_N, static_cast<uint64_t>(c), static_cast<uint64_t>(r), s0};
    return true;
  }
  if (s0 == 1 && s1 >= std::max<int64_t>(r, 1)) {
    o = {CUBLAS_OP_T, static_cast<uint64_t>(r), static_cast<uint64_t>(c), s1};
    return true;
  }
  return false;
}

uint32_t alignment(const Tensor& t) {
  uint32_t a = 256;
  while (a > 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % a != 0) a /= 2;
  return a;
}

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr, ld = nullptr;
  std::vector<cublasLtMatmulHeuristicResult_t> candidates;  // the heuristic's, in its order
  int chosen = 0;
  bool tuned = false;
};

// key: device, dtype, M, N, K, both ops, four leading dimensions, C aliasing D, beta != 0,
// the four pointers' alignments (they decide which kernels are legal) and the gemm_tune option
// (so that a benchmark can compare both in one process). A class key is the same with the
// token count (M or K, as the caller says) set to -1.
using Key = std::array<int64_t, 18>;

constexpr int kMaxTuned = 64;
constexpr size_t kMaxPlans = 4096;
std::mutex g_mutex;
int g_tuned = 0;  // classes timed so far (under g_mutex)
std::map<Key, Plan>& plans() {
  static auto* p = new std::map<Key, Plan>();  // never destroyed: outlives the CUDA context
  return *p;
}
// the algorithm chosen for each class (timed, or the heuristic's first where not timed)
std::map<Key, cublasLtMatmulAlgo_t>& class_algos() {
  static auto* c = new std::map<Key, cublasLtMatmulAlgo_t>();
  return *c;
}

// Takes the class's algorithm for plan p when cuBLASLt accepts it for p's exact shape.
bool adopt(Plan& p, const cublasLtMatmulAlgo_t& algo, size_t ws_size) {
  cublasLtMatmulHeuristicResult_t r{};
  if (cublasLtMatmulAlgoCheck(at::cuda::getCurrentCUDABlasLtHandle(), p.desc, p.la, p.lb, p.lc,
                              p.ld, &algo, &r) != CUBLAS_STATUS_SUCCESS ||
      r.workspaceSize > ws_size)
    return false;
  r.algo = algo;
  r.state = CUBLAS_STATUS_SUCCESS;
  p.candidates.assign(1, r);
  p.chosen = 0;
  p.tuned = true;
  return true;
}

void destroy(Plan& p) {  // descriptors are host objects; no launch keeps them after enqueue
  if (p.ld) cublasLtMatrixLayoutDestroy(p.ld);
  if (p.lc) cublasLtMatrixLayoutDestroy(p.lc);
  if (p.lb) cublasLtMatrixLayoutDestroy(p.lb);
  if (p.la) cublasLtMatrixLayoutDestroy(p.la);
  if (p.desc) cublasLtMatmulDescDestroy(p.desc);
  p = Plan();
}

bool describe_plan(Plan& p, cudaDataType_t dt, const Operand& a, const Operand& b,
                   uint64_t n_rows, uint64_t n_cols, int64_t ldc, int64_t ldd) {
  const cublasOperation_t ta = a.op, tb = b.op;
  bool ok =
      cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)) ==
          CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)) ==
          CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&p.la, dt, a.rows, a.cols, a.ld) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&p.lb, dt, b.rows, b.cols, b.ld) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&p.lc, dt, n_rows, n_cols, ldc) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&p.ld, dt, n_rows, n_cols, ldd) == CUBLAS_STATUS_SUCCESS;
  return ok;
}

// The heuristic's candidates for a described plan (those that fit the workspace).
bool query_candidates(Plan& p, const uint32_t al[4], size_t ws_size) {
  cublasLtMatmulPreference_t pref = nullptr;
  bool ok = cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS;
  const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;  // split-K sums in fp32
  ok = ok &&
       cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                            &ws_size, sizeof(ws_size)) ==
           CUBLAS_STATUS_SUCCESS &&
       cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                            &reduction, sizeof(reduction)) ==
           CUBLAS_STATUS_SUCCESS;
  const cublasLtMatmulPreferenceAttributes_t al_attr[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; ok && i < 4; ++i)
    ok = cublasLtMatmulPreferenceSetAttribute(pref, al_attr[i], &al[i], sizeof(al[i])) ==
         CUBLAS_STATUS_SUCCESS;
  if (ok) {
    constexpr int kMaxCandidates = 16;
    p.candidates.resize(kMaxCandidates);
    int found = 0;
    ok = cublasLtMatmulAlgoGetHeuristic(at::cuda::getCurrentCUDABlasLtHandle(), p.desc, p.la,
                                        p.lb, p.lc, p.ld, pref, kMaxCandidates,
                                        p.candidates.data(), &found) == CUBLAS_STATUS_SUCCESS;
    p.candidates.resize(ok ? found : 0);
    std::vector<cublasLtMatmulHeuristicResult_t> usable;
    for (const auto& c : p.candidates)
      if (c.state == CUBLAS_STATUS_SUCCESS && c.workspaceSize <= ws_size) usable.push_back(c);
    p.candidates.swap(usable);
  }
  if (pref) cublasLtMatmulPreferenceDestroy(pref);
  return ok && !p.candidates.empty();
}

cublasStatus_t run(const Plan& p, int i, const void* a, const void* b, float beta,
                   const void* c, void* d, void* ws, size_t ws_size, cudaStream_t stream) {
  const float one = 1.0f;
  return cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), p.desc, &one, a, p.la, b, p.lb,
                        &beta, c, p.lc, d, p.ld, &p.candidates[i].algo, ws, ws_size, stream);
}

// Time every candidate once on this shape: a spin kernel holds the GPU while the host enqueues
// them all, so the events time the GPU and not the host's launch rate. The scratch output keeps
// the caller's D (which may also be C) untouched.
void tune(Plan& p, const Tensor& X, const Tensor& Y, float beta, const Tensor& C,
          const Tensor& D, void* ws, size_t ws_size) {
  const int n = static_cast<int>(p.candidates.size());
  p.tuned = true;
  if (n <= 1) return;
  const Tensor scratch = at::empty_strided(D.sizes(), D.strides(), D.options());
  const void* c_ptr = C.defined() ? C.data_ptr() : scratch.data_ptr();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int kReps = 5;
  std::vector<cudaEvent_t> ev(2 * n);
  for (auto& e : ev) C10_CUDA_CHECK(cudaEventCreate(&e));
  // long enough for the host to enqueue 6 launches per candidate at up to ~40 us each
  at::cuda::sleep(static_cast<int64_t>(n) * 500 * 1000);
  std::vector<bool> ok(n, true);
  for (int i = 0; i < n; ++i) {
    ok[i] = run(p, i, Y.data_ptr(), X.data_ptr(), beta, c_ptr, scratch.data_ptr(), ws, ws_size,
                stream) == CUBLAS_STATUS_SUCCESS;  // warm-up
    C10_CUDA_CHECK(cudaEventRecord(ev[2 * i], stream));
    for (int k = 0; ok[i] && k < kReps; ++k)
      run(p, i, Y.data_ptr(), X.data_ptr(), beta, c_ptr, scratch.data_ptr(), ws, ws_size, stream);
    C10_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1], stream));
  }
  C10_CUDA_CHECK(cudaEventSynchronize(ev[2 * n - 1]));
  float best = std::numeric_limits<float>::infinity();
  for (int i = 0; i < n; ++i) {
    float ms = 0.f;
    C10_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
    const float us = ok[i] ? 1000.f * ms / kReps : std::numeric_limits<float>::infinity();
    if (us < best) { best = us; p.chosen = i; }
  }
  for (auto& e : ev) C10_CUDA_CHECK(cudaEventDestroy(e));
}

}  // namespace

bool lt_gemm(const Tensor& X, const Tensor& Y, const Tensor& C, const Tensor& D, float beta,
             Tokens tokens) {
  POLYKERN_SCOPE("polykern::lt_gemm");
  const at::ScalarType st = D.scalar_type();
  cudaDataType_t dt;
  switch (st) {
    case at::kBFloat16: dt = CUDA_R_16BF; break;
    case at::kHalf: dt = CUDA_R_16F; break;
    default: return false;
  }
  if (X.dim() != 2 || Y.dim() != 2 || D.dim() != 2 || X.scalar_type() != st ||
      Y.scalar_type() != st)
    return false;
  const int64_t M = X.size(0), K = X.size(1), N = Y.size(1);
  if (M == 0 || N == 0 || K == 0 || Y.size(0) != K || D.size(0) != M || D.size(1) != N)
    return false;
  const bool has_c = beta != 0.0f;
  if (has_c && (!C.defined() || C.scalar_type() != st || C.sizes() != D.sizes())) return false;
  // D^T (N, M) = op(Y^T) op(X^T) in column-major terms; D and C must be row-major
  Operand a, b;
  if (!describe(Y, a) || !describe(X, b)) return false;
  if (D.stride(1) != 1 || D.stride(0) < std::max<int64_t>(N, 1)) return false;
  if (has_c && (C.stride(1) != 1 || C.stride(0) < std::max<int64_t>(N, 1))) return false;
  const Tensor& Cm = has_c ? C : D;
  const uint32_t al[4] = {alignment(Y), alignment(X), alignment(Cm), alignment(D)};
  const bool c_is_d = has_c && C.data_ptr() == D.data_ptr();
  const Key key = {D.get_device(), static_cast<int64_t>(st), M, N, K, a.op, b.op, a.ld, b.ld,
                   Cm.stride(0), D.stride(0), c_is_d, has_c, al[0], al[1], al[2], al[3],
                   option(Opt::kGemmTune)};

  Key class_key = key;
  if (tokens == Tokens::kM) class_key[2] = -1;
  if (tokens == Tokens::kK) class_key[4] = -1;

  void* ws = at::cuda::getCUDABlasLtWorkspace();
  const size_t ws_size = at::cuda::getCUDABlasLtWorkspaceSize();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = plans().find(key);
  if (it == plans().end()) {
    if (plans().size() >= kMaxPlans) {
      for (auto& kv : plans()) destroy(kv.second);
      plans().clear();
    }
    Plan p;
    if (!describe_plan(p, dt, a, b, static_cast<uint64_t>(N), static_cast<uint64_t>(M),
                       Cm.stride(0), D.stride(0))) {
      destroy(p);  // remembered with no candidates, so the caller falls back
    } else {
      const auto known = class_algos().find(class_key);
      if (known == class_algos().end() || !adopt(p, known->second, ws_size)) {
        if (!query_candidates(p, al, ws_size)) destroy(p);
      }
    }
    it = plans().emplace(key, std::move(p)).first;
  }
  Plan& p = it->second;
  if (p.candidates.empty()) return false;
  if (!p.tuned) {
    const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() !=
                           c10::cuda::CaptureStatus::None;
    if (!capturing) {
      if (option(Opt::kGemmTune) == 0 || at::globalContext().deterministicAlgorithms() ||
          g_tuned >= kMaxTuned) {
        p.tuned = true;  // the heuristic's first candidate
      } else {
        ++g_tuned;
        tune(p, X, Y, beta, has_c ? C : Tensor(), D, ws, ws_size);
      }
      class_algos().emplace(class_key, p.candidates[p.chosen].algo);
    }
  }
  return run(p, p.chosen, Y.data_ptr(), X.data_ptr(), beta, Cm.data_ptr(), D.data_ptr(), ws,
             ws_size, stream) == CUBLAS_STATUS_SUCCESS;
}

#else
bool lt_gemm(const Tensor&, const Tensor&, const Tensor&, const Tensor&, float, Tokens) {
  return false;
}
#endif

// lt_gemm declines what it cannot take (dtypes other than bf16/fp16, empty or mismatched
// shapes, unsupported layouts); at::mm_out serves those, with its own error messages.
void fast_mm_into(const Tensor& D, const Tensor& X, const Tensor& Y, Tokens tokens) {
  maybe_poison(D);
  if (!lt_gemm(X, Y, Tensor(), D, 0.0f, tokens)) at::mm_out(const_cast<Tensor&>(D), X, Y);
}

Tensor fast_mm(const Tensor& X, const Tensor& Y, Tokens tokens) {
  TORCH_CHECK(X.dim() == 2 && Y.dim() == 2, "polykern: fast_mm takes 2-D operands");
  Tensor D = at::empty({X.size(0), Y.size(1)}, X.options());
  fast_mm_into(D, X, Y, tokens);
  return D;
}

void fast_addmm_(Tensor& D, const Tensor& X, const Tensor& Y, Tokens tokens) {
  if (!lt_gemm(X, Y, D, D, 1.0f, tokens)) D.addmm_(X, Y);
}

Tensor fast_addmm(const Tensor& C, const Tensor& X, const Tensor& Y, Tokens tokens) {
  if (C.dim() == 2 && X.dim() == 2 && Y.dim() == 2 && X.size(0) > 0 && Y.size(1) > 0 &&
      X.size(1) > 0 && C.size(0) == X.size(0) && C.size(1) == Y.size(1) &&
      (C.scalar_type() == at::kBFloat16 || C.scalar_type() == at::kHalf)) {
    Tensor D = at::empty({X.size(0), Y.size(1)}, C.options());
    maybe_poison(D);
    if (lt_gemm(X, Y, C, D, 1.0f, tokens)) return D;
  }
  return at::addmm(C, X, Y);
}

// polykern::_adapter_gemm: the helper above as an op, so that tests can check its layouts
// (transposed and sliced operands, odd shapes) against float64 directly.
static Tensor adapter_gemm_op(const Tensor& X, const Tensor& Y, const std::optional<Tensor>& C) {
  check_cuda(X, "X", X);
  check_cuda(Y, "Y", X);
  TORCH_CHECK(X.dim() == 2 && Y.dim() == 2 && X.size(1) == Y.size(0),
              "polykern::_adapter_gemm: X ", shape(X.sizes()), " and Y ", shape(Y.sizes()),
              " cannot be multiplied");
  TORCH_CHECK(X.scalar_type() == Y.scalar_type(), "polykern::_adapter_gemm: X is ",
              X.scalar_type(), " but Y is ", Y.scalar_type());
  if (!C.has_value()) return fast_mm(X, Y, Tokens::kNone);
  check_cuda(*C, "C", X);
  TORCH_CHECK(C->dim() == 2 && C->size(0) == X.size(0) && C->size(1) == Y.size(1) &&
                  C->scalar_type() == X.scalar_type(),
              "polykern::_adapter_gemm: C must be ", X.scalar_type(), " of shape (",
              num(X.size(0)), ", ", num(Y.size(1)), "), got ", C->scalar_type(), " ",
              shape(C->sizes()));
  return fast_addmm(*C, X, Y, Tokens::kNone);
}

TORCH_LIBRARY_IMPL(polykern, CUDA, m) { m.impl("_adapter_gemm", &adapter_gemm_op); }

}  // namespace polykern
