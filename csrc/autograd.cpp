// Eager-mode autograd of the two methods in C++: `pera_linear_eager` / `genlora_linear_eager`
// return y alone and record one C++ autograd node, whose backward calls the backward op. The
// registered Python autograd (polykern/ops.py) stays what torch.compile, torch.func, opcheck and
// direct callers of `pera_linear` / `genlora_linear` use; the modules take these ops in plain
// eager mode because the host path is what limits small N (bench/host_overhead.py: about 25 us
// per ATen call and as much again for each Python autograd.Function step on the H100's host).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "common.h"

namespace polykern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = std::optional<Tensor>;
using Mask = std::array<bool, 3>;

// ---- typed handles of the ops the nodes call (looked up once) ------------------------------
using PeraFwdSig = std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, double, const OptT&);
using PeraBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, double, const Tensor&, Mask);
using GenFwdSig = std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
    const OptT&);
using GenBwdSig =
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, double, const Tensor&, Mask);

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Graph edge of each tensor argument: AutogradContext::needs_input_grad numbers the defined
// tensor arguments in order, and an absent optional (bias, x_adapter) has none (-1 here).
// Arguments: x, weight, bias?, n_params adapter parameters, n_const index tensors, x_adapter?.
struct EdgeMap {
  int64_t x = -1, W = -1, b = -1, xa = -1;
  std::array<int64_t, 8> p{};
  Mask mask{};  // what the backward op is asked for: grad x, grad x_adapter, parameter grads
};

bool needs(AutogradContext* ctx, int64_t edge) {
  return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge));
}

EdgeMap edge_map(AutogradContext* ctx, int n_params, int n_const, bool has_xa) {
  EdgeMap e;
  int64_t next = 0;
  e.x = next++;
  e.W = next++;
  if (ctx->saved_data["has_bias"].toBool()) e.b = next++;
  bool any_param = false;
  for (int k = 0; k < n_params; ++k) {
    e.p[k] = next++;
    any_param = any_param || needs(ctx, e.p[k]);
  }
  next += n_const;
  if (has_xa) e.xa = next++;
  e.mask = {needs(ctx, e.x), needs(ctx, e.xa), any_param};
  return e;
}

// Gradients of the frozen base, only when a caller unfroze the weight or the bias.
void base_grads(const Tensor& gy, const Tensor& x, bool need_w, bool need_b, Tensor& gW,
                Tensor& gb) {
  const Tensor g2 = gy.reshape({-1, gy.size(-1)});
  if (need_w) gW = at::mm(g2.t(), x.reshape({-1, x.size(-1)}));
  if (need_b) gb = g2.sum(0);
}

bool present(const OptT& t) { return t.has_value() && t->defined(); }

struct PeraFunction : public torch::autograd::Function<PeraFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& W, const OptT& bias,
                        const Tensor& A, const Tensor& B, const Tensor& h, const Tensor& pair_i,
                        const Tensor& pair_j, double scaling, const OptT& x_adapter) {
    static const auto op = handle<PeraFwdSig>("polykern::pera_linear");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, U] = op.call(x, W, bias, A, B, h, pair_i, pair_j, scaling, x_adapter);
    ctx->save_for_backward({x, W, U, A, B, h, pair_i, pair_j,
                            present(x_adapter) ? *x_adapter : Tensor()});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["has_bias"] = present(bias);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = handle<PeraBwdSig>("polykern::pera_linear_backward");
    const auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &W = s[1], &U = s[2];
    const Tensor &A = s[3], &B = s[4], &h = s[5], &pi = s[6], &pj = s[7], &xa = s[8];
    const bool has_xa = xa.defined();
    const EdgeMap e = edge_map(ctx, 3, 2, has_xa);  // A, B, h; pair_i, pair_j
    const Mask& mask = e.mask;
    Tensor gx, gxa, gA, gB, gh, gW, gb;
    if (mask[0] || mask[1] || mask[2]) {
      std::tie(gx, gxa, gA, gB, gh) =
          op.call(grads[0], x, has_xa ? OptT(xa) : OptT(), W, A, B, h, pi, pj,
                  ctx->saved_data["scaling"].toDouble(), U, mask);
    }
    base_grads(grads[0], x, needs(ctx, e.W), needs(ctx, e.b), gW, gb);
    auto keep = [&](const Tensor& g, int64_t edge) { return needs(ctx, edge) ? g : Tensor(); };
    return {keep(gx, e.x), gW, gb, keep(gA, e.p[0]), keep(gB, e.p[1]), keep(gh, e.p[2]),
            Tensor(), Tensor(), Tensor(), keep(gxa, e.xa)};
  }
};

struct GenLoraFunction : public torch::autograd::Function<GenLoraFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& W, const OptT& bias,
                        const Tensor& Z_A, const Tensor& C_A, const Tensor& g_A,
                        const Tensor& M_A, const Tensor& Z_B, const Tensor& C_B,
                        const Tensor& g_B, const Tensor& M_B, double scaling,
                        const OptT& x_adapter) {
    static const auto op = handle<GenFwdSig>("polykern::genlora_linear");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, U] = op.call(x, W, bias, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, scaling,
                          x_adapter);
    ctx->save_for_backward({x, W, U, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B,
                            present(x_adapter) ? *x_adapter : Tensor()});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["has_bias"] = present(bias);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = handle<GenBwdSig>("polykern::genlora_linear_backward");
    const auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &W = s[1], &U = s[2], &xa = s[11];
    const bool has_xa = xa.defined();
    const EdgeMap e = edge_map(ctx, 8, 0, has_xa);
    const Mask& mask = e.mask;
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> g;
    if (mask[0] || mask[1] || mask[2]) {
      g = op.call(grads[0], x, has_xa ? OptT(xa) : OptT(), W, s[3], s[4], s[5], s[6], s[7],
                  s[8], s[9], s[10], ctx->saved_data["scaling"].toDouble(), U, mask);
    }
    Tensor gW, gb;
    base_grads(grads[0], x, needs(ctx, e.W), needs(ctx, e.b), gW, gb);
    auto keep = [&](const Tensor& t, int64_t edge) { return needs(ctx, edge) ? t : Tensor(); };
    auto& [gx, gxa, g0, g1, g2, g3, g4, g5, g6, g7] = g;
    return {keep(gx, e.x), gW, gb, keep(g0, e.p[0]), keep(g1, e.p[1]), keep(g2, e.p[2]),
            keep(g3, e.p[3]), keep(g4, e.p[4]), keep(g5, e.p[5]), keep(g6, e.p[6]),
            keep(g7, e.p[7]), Tensor(), keep(gxa, e.xa)};
  }
};

Tensor pera_linear_eager(const Tensor& x, const Tensor& W, const OptT& bias, const Tensor& A,
                         const Tensor& B, const Tensor& h, const Tensor& pair_i,
                         const Tensor& pair_j, double scaling, const OptT& x_adapter) {
  return PeraFunction::apply(x, W, bias, A, B, h, pair_i, pair_j, scaling, x_adapter);
}

Tensor genlora_linear_eager(const Tensor& x, const Tensor& W, const OptT& bias, const Tensor& Z_A,
                            const Tensor& C_A, const Tensor& g_A, const Tensor& M_A,
                            const Tensor& Z_B, const Tensor& C_B, const Tensor& g_B,
                            const Tensor& M_B, double scaling, const OptT& x_adapter) {
  return GenLoraFunction::apply(x, W, bias, Z_A, C_A, g_A, M_A, Z_B, C_B, g_B, M_B, scaling,
                                x_adapter);
}

}  // namespace

TORCH_LIBRARY_IMPL(polykern, Autograd, m) {
  m.impl("pera_linear_eager", &pera_linear_eager);
  m.impl("genlora_linear_eager", &genlora_linear_eager);
}

}  // namespace polykern
