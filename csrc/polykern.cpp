// Op schemas of polykern: the one TORCH_LIBRARY(polykern, m). CUDA kernels register their
// implementations in csrc/*.cu with TORCH_LIBRARY_IMPL(polykern, CUDA, m); fake (meta) kernels and
// autograd formulas are registered in Python (polykern/ops.py).
//
// Shapes: x (..., n), weight (m, n), bias (m,); N = prod(x.shape[:-1]).
// PERA:    A (r, n), B (m, r), h (P,), pair_i/pair_j (P,) int64; R = r + P.
// GenLoRA: Z_A (n, d), C_A (K, d), g_A (K,), M_A (r, K), Z_B (m, d), C_B (K, d), g_B (K,),
//          M_B (K, r); R = r.
// Forward ops return (y, U): y (..., m) and U = x_a A_gen^T (N, R), saved for the backward, with
// A_gen (R, n) and B_gen = scaling * B_hat (m, R) the generated factors in the compute dtype
// (x's). The backward generates the factors again (one small launch) rather than keep them from
// the forward: 200 MB over 8 Llama-3-8B-shaped layers with PERA full r = 16. x_adapter (the
// adapter path's input after dropout) defaults to x.
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
      "Tensor pair_i, Tensor pair_j, float scaling, Tensor? x_adapter) -> (Tensor y, Tensor U)");
  m.def(
      "pera_linear_backward(Tensor grad_y, Tensor x, Tensor? x_adapter, Tensor weight, Tensor A, "
      "Tensor B, Tensor h, Tensor pair_i, Tensor pair_j, float scaling, Tensor U, "
      "bool[3] output_mask) "
      "-> (Tensor grad_x, Tensor grad_x_adapter, Tensor grad_A, Tensor grad_B, Tensor grad_h)");
  m.def(
      "genlora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor Z_A, Tensor C_A, Tensor g_A, "
      "Tensor M_A, Tensor Z_B, Tensor C_B, Tensor g_B, Tensor M_B, float scaling, "
      "Tensor? x_adapter) -> (Tensor y, Tensor U)");
  m.def(
      "genlora_linear_backward(Tensor grad_y, Tensor x, Tensor? x_adapter, Tensor weight, "
      "Tensor Z_A, Tensor C_A, Tensor g_A, Tensor M_A, Tensor Z_B, Tensor C_B, Tensor g_B, "
      "Tensor M_B, float scaling, Tensor U, bool[3] output_mask) "
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
  // The adapter core's GEMM helper (csrc/lt_gemm.cpp) by itself, for tests: X Y (+ C).
  m.def("_adapter_gemm(Tensor X, Tensor Y, Tensor? C=None) -> Tensor");
  // The fused gY pass (csrc/gy_pass.cu) by itself, for tests: (grad_y B, grad_y^T U), and
  // whether the fused kernel takes these operands (else two GEMMs run).
  m.def("_gy_pass(Tensor grad_y, Tensor B, Tensor U) -> (Tensor, Tensor)");
  m.def("_gy_pass_takes(Tensor grad_y, Tensor B, Tensor U) -> bool");
  // The generators alone (merge, delta_weight, tests): A_gen (R, n), B_gen (m, R) with the
  // scaling folded in.
  m.def(
      "pera_expand(Tensor A, Tensor B, Tensor h, Tensor pair_i, Tensor pair_j, float scaling, "
      "ScalarType dtype) -> (Tensor A_gen, Tensor B_gen)");
  m.def(
      "genlora_expand(Tensor Z_A, Tensor C_A, Tensor g_A, Tensor M_A, Tensor Z_B, Tensor C_B, "
      "Tensor g_B, Tensor M_B, float scaling, ScalarType dtype) -> (Tensor A_gen, Tensor B_gen)");
}
