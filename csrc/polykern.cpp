// Op schemas of polykern: the one TORCH_LIBRARY(polykern, m). CUDA kernels register their
// implementations in csrc/*.cu with TORCH_LIBRARY_IMPL(polykern, CUDA, m); fake (meta) kernels and
// autograd formulas are registered in Python (polykern/ops.py).
//
// Shapes: x (..., n), weight (m, n), bias (m,); N = prod(x.shape[:-1]).
// PERA:    A (r, n), B (m, r), h (P,), pair_i/pair_j (P,) int64; R = r + P.
// GenLoRA: Z_A (n, d), C_A (K, d), g_A (K,), M_A (r, K), Z_B (m, d), C_B (K, d), g_B (K,),
//          M_B (K, r); R = r.
// Forward ops return (y, U, A_gen, B_gen, W_merged): y (..., m); U = x_a A_gen^T (N, R); the
// generated factors A_gen (R, n) and B_gen = scaling * B_hat (m, R) in the compute dtype (x's),
// saved for the backward; W_merged = W + B_gen A_gen (m, n) when keep_merged is set and the
// forward merged and the keep policy says keeping pays (else an empty tensor), which the backward
// then takes instead of merging again. x_adapter (the adapter path's input after dropout)
// defaults to x.
// Backward ops take output_mask = [grad x, grad x_adapter, grads of the adapter parameters] and
// return empty tensors for what is not asked.
#include <Python.h>
#include <torch/library.h>

#include "common.h"

extern "C" {
// Importing polykern._C runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(polykern, m) {
  m.def(
      "pera_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor h, "
      "Tensor pair_i, Tensor pair_j, float scaling, Tensor? x_adapter, bool keep_merged=False) "
      "-> (Tensor y, Tensor U, Tensor A_hat, Tensor B_hat, Tensor W_merged)");
  m.def(
      "pera_linear_backward(Tensor grad_y, Tensor x, Tensor? x_adapter, Tensor weight, Tensor A, "
      "Tensor B, Tensor h, Tensor pair_i, Tensor pair_j, float scaling, Tensor U, Tensor A_hat, "
      "Tensor B_hat, bool[3] output_mask, Tensor? W_merged=None) "
      "-> (Tensor grad_x, Tensor grad_x_adapter, Tensor grad_A, Tensor grad_B, Tensor grad_h)");
  m.def(
      "genlora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor Z_A, Tensor C_A, Tensor g_A, "
      "Tensor M_A, Tensor Z_B, Tensor C_B, Tensor g_B, Tensor M_B, float scaling, "
      "Tensor? x_adapter, bool keep_merged=False) "
      "-> (Tensor y, Tensor U, Tensor A, Tensor B, Tensor W_merged)");
  m.def(
      "genlora_linear_backward(Tensor grad_y, Tensor x, Tensor? x_adapter, Tensor weight, "
      "Tensor Z_A, Tensor C_A, Tensor g_A, Tensor M_A, Tensor Z_B, Tensor C_B, Tensor g_B, "
      "Tensor M_B, float scaling, Tensor U, Tensor A, Tensor B, bool[3] output_mask, "
      "Tensor? W_merged=None) "
      "-> (Tensor grad_x, Tensor grad_x_adapter, Tensor grad_Z_A, Tensor grad_C_A, "
      "Tensor grad_g_A, Tensor grad_M_A, Tensor grad_Z_B, Tensor grad_C_B, Tensor grad_g_B, "
      "Tensor grad_M_B)");
  // Eager training entry points: y only, with a C++ autograd node (csrc/autograd.cpp) whose
  // backward calls the *_backward op; same arguments as the forward ops.
  m.def(
      "pera_linear_eager(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor h, "
      "Tensor pair_i, Tensor pair_j, float scaling, Tensor? x_adapter) -> Tensor");
  m.def(
      "genlora_linear_eager(Tensor x, Tensor weight, Tensor? bias, Tensor Z_A, Tensor C_A, "
      "Tensor g_A, Tensor M_A, Tensor Z_B, Tensor C_B, Tensor g_B, Tensor M_B, float scaling, "
      "Tensor? x_adapter) -> Tensor");
  // Inference (nothing needs a gradient): y only, no U computed or kept; W + B_gen A_gen merged
  // into one GEMM operand when that costs fewer bytes (common.h).
  m.def(
      "pera_linear_inference(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, "
      "Tensor h, Tensor pair_i, Tensor pair_j, float scaling) -> Tensor");
  m.def(
      "genlora_linear_inference(Tensor x, Tensor weight, Tensor? bias, Tensor Z_A, Tensor C_A, "
      "Tensor g_A, Tensor M_A, Tensor Z_B, Tensor C_B, Tensor g_B, Tensor M_B, float scaling) "
      "-> Tensor");
  // Path choice of the adapter core (see common.h): 0 auto, 1 always merge, 2 never merge.
  m.def("set_merge_policy(int policy) -> ()", &polykern::set_merge_policy);
  m.def("get_merge_policy() -> int", &polykern::get_merge_policy);
  // Whether a merged forward keeps W + B_gen A_gen for the backward: 0 auto, 1 always, 2 never.
  m.def("set_keep_policy(int policy) -> ()", &polykern::set_keep_policy);
  m.def("get_keep_policy() -> int", &polykern::get_keep_policy);
  // The keep decision under the current policies (the fake kernels' W_merged shape).
  m.def("_keeps_merged(int rows, int n, int m) -> bool", &polykern::keeps_merged);
  // The side stream of the adapter core, for tests: 0 off, 1 auto, 2 always; returns the old.
  m.def("_set_side_stream(int mode) -> int", &polykern::set_side_stream_mode);
  // The fused adapter GEMMs (lora_gemm.cu, version 12): 0 off, 1 auto, 2 wherever the tiles fit
  // (returns the old mode); the shape, dtype and mode rule; whether they can serve layers on a
  // device (mode on, an sm_90 device, a binary for it).
  m.def("_set_fused_gemm(int mode) -> int", &polykern::set_fused_gemm_mode);
  m.def("_fused_gemm_fits(int rows, int n, int m, int R, ScalarType dtype, "
        "ScalarType? bias_dtype) -> bool", &polykern::fused_gemm_fits);
  m.def("_fused_gemm_on(int device) -> bool", &polykern::fused_gemm_on);
  // Op graphs (adapter_core.cpp, version 11): 0 off, 1 on; the pools' budget in MiB (both
  // return the old value); destroy them all; (graphs, pool bytes, replays, captures).
  m.def("_set_op_graphs(int mode) -> int", &polykern::set_op_graph_mode);
  m.def("_set_op_graph_budget(int mb) -> int", &polykern::set_op_graph_budget_mb);
  m.def("_clear_op_graphs() -> ()", &polykern::clear_op_graphs);
  m.def("_op_graph_stats() -> int[]", &polykern::op_graph_stats);
  // The adapter core's GEMM helper (csrc/lt_gemm.cpp) by itself, for tests: X Y (+ C).
  m.def("_adapter_gemm(Tensor X, Tensor Y, Tensor? C=None) -> Tensor");
  // The fused gY pass (csrc/gy_pass.cu) by itself, for tests: (grad_y B, grad_y^T U), and
  // whether the fused kernel takes these operands (else two GEMMs run).
  m.def("_gy_pass(Tensor grad_y, Tensor B, Tensor U) -> (Tensor, Tensor)");
  m.def("_gy_pass_takes(Tensor grad_y, Tensor B, Tensor U) -> bool");
  // The generators alone (merge, delta_weight, tests): A_hat (R, n), scaling * B_hat (m, R).
  m.def(
      "pera_expand(Tensor A, Tensor B, Tensor h, Tensor pair_i, Tensor pair_j, float scaling, "
      "ScalarType dtype) -> (Tensor A_hat, Tensor B_hat)");
  m.def(
      "genlora_expand(Tensor Z_A, Tensor C_A, Tensor g_A, Tensor M_A, Tensor Z_B, Tensor C_B, "
      "Tensor g_B, Tensor M_B, float scaling, ScalarType dtype) -> (Tensor A, Tensor B)");
}
