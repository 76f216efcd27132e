"""What PyTorch users do around a layer, on the CUDA path: backward twice with retain_graph,
saved-tensor hooks and offloading, gradient accumulation, checkpointing, outputs used on other
streams, cuBLAS workspaces cleared, inference_mode next to no_grad, the current matmul-precision
APIs, torch.func transforms and forward-mode AD, NaN and inf, ranks beyond the kernels
(torch.compile and CUDA-graph capture: tests/test_ops_cuda.py). Each result is compared with the reference or with the same
computation done plainly. Skipped without a GPU and the extension."""

import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import polykern
from polykern import ops
from test_ops_cuda import random_layer, run, same_dtype_refs
from utils import assert_within_ref_error

pytestmark = pytest.mark.skipif(not polykern.cuda_available(),
                                reason="needs a CUDA GPU and the compiled extension")
DEV = "cuda"
KINDS = [("pera", {"terms": "full"}, 4), ("genlora", {"num_rbf": 32, "latent_dim": 3}, 8)]
N_IN, N_OUT = 64, 96


def make(kind, cfg, r, dtype):
    return random_layer(kind, N_IN, N_OUT, r, torch.float64, **cfg).to(dtype)


def grads(layer, x):
    return [x.grad.clone()] + [p.grad.clone() for p in layer.adapter_parameters()]


def clear(layer, x):
    x.grad = None
    for p in layer.adapter_parameters():
        p.grad = None


def seeded_gy(shape, dtype, seed=7):
    return torch.randn(shape, generator=torch.Generator(DEV).manual_seed(seed), device=DEV,
                       dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("kind,cfg,r", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_retain_graph_backward_twice(kind, cfg, r, dtype):
    """A second backward through a retained graph adds exactly the first one's gradients again
    (the saved U and generated factors are read, never written), and the first is within the
    reference's error."""
    layer = make(kind, cfg, r, dtype)
    x0 = torch.randn(3, 37, N_IN, device=DEV, dtype=torch.float64)
    x = x0.to(dtype).requires_grad_()
    y = layer(x)
    gy = seeded_gy(y.shape, dtype)
    y.backward(gy, retain_graph=True)
    first = grads(layer, x)
    y.backward(gy)
    for a, b in zip(first, grads(layer, x)):
        assert torch.isfinite(b).all()
        assert torch.equal(b, a + a)
    same = same_dtype_refs(layer, x0, dtype, dtype)
    exact = run(layer, x0.to(dtype).double(), torch.float64, torch.float64, use_ops=False)
    for name, f, s, e in zip(["x"] + list(layer.adapter_parameter_names), first, same[1:],
                             exact[1:]):
        assert_within_ref_error(f, s, e, what=f"retain_graph {kind} {dtype} {name}")


def two_micro_batches(layer, xs, gys, around=None):
    """Gradient accumulation over two micro-batches, each forward run inside `around()`."""
    for xb, gyb in zip(xs, gys):
        if around is None:
            y = layer(xb)
        else:
            with around():
                y = layer(xb)
        y.backward(gyb)
    return [xb.grad.clone() for xb in xs] + [p.grad.clone() for p in layer.adapter_parameters()]


@pytest.mark.parametrize("kind,cfg,r", KINDS)
@pytest.mark.parametrize("hooks", ["save_on_cpu", "clone_hooks"])
def test_saved_tensor_hooks_and_accumulation(kind, cfg, r, hooks):
    """Saved activations offloaded to the CPU (save_on_cpu) or packed as copies
    (saved_tensors_hooks), over two accumulated micro-batches: the same gradients bit for bit as
    without hooks, and the accumulated adapter gradients equal the two micro-batches' sum."""
    layer = make(kind, cfg, r, torch.bfloat16)
    xs0 = [torch.randn(2, 45, N_IN, device=DEV, dtype=torch.bfloat16) for _ in range(2)]
    gys = [seeded_gy((2, 45, N_OUT), torch.bfloat16, seed=s) for s in (1, 2)]

    def fresh():
        clear(layer, xs0[0])
        return [x.clone().requires_grad_() for x in xs0]
    plain = two_micro_batches(layer, fresh(), gys)
    if hooks == "save_on_cpu":
        around = lambda: torch.autograd.graph.save_on_cpu(pin_memory=True)  # noqa: E731
    else:
        around = lambda: torch.autograd.graph.saved_tensors_hooks(  # noqa: E731
            lambda t: t.clone(), lambda t: t)
    hooked = two_micro_batches(layer, fresh(), gys, around)
    for a, b in zip(plain, hooked):
        assert torch.isfinite(b).all() and torch.equal(a, b)
    separate = []
    for xb, gyb in zip(fresh(), gys):
        clear(layer, xb)
        layer(xb).backward(gyb)
        separate.append([p.grad.clone() for p in layer.adapter_parameters()])
    for acc, g1, g2 in zip(plain[2:], *separate):
        assert torch.equal(acc, g1 + g2)


@pytest.mark.parametrize("kind,cfg,r", KINDS)
def test_checkpointing_matches_plain(kind, cfg, r):
    """torch.utils.checkpoint (non-reentrant) around the layer recomputes the forward in the
    backward: the same gradients bit for bit."""
    layer = make(kind, cfg, r, torch.bfloat16)
    x0 = torch.randn(4, 33, N_IN, device=DEV, dtype=torch.bfloat16)
    gy = seeded_gy((4, 33, N_OUT), torch.bfloat16)
    results = []
    for ckpt in (False, True):
        x = x0.clone().requires_grad_()
        clear(layer, x)
        y = checkpoint(layer, x, use_reentrant=False) if ckpt else layer(x)
        y.backward(gy)
        results.append([y.detach()] + grads(layer, x))
    for a, b in zip(*results):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("kind,cfg,r", KINDS)
@pytest.mark.parametrize("grad", [False, True])
def test_output_used_on_another_stream(kind, cfg, r, grad):
    """An output handed to another stream (record_stream) and then deleted keeps its memory until
    that stream's work is done: the next call does not overwrite what the other stream reads."""
    layer = make(kind, cfg, r, torch.bfloat16)
    x1 = torch.randn(300, N_IN, device=DEV, dtype=torch.bfloat16, requires_grad=grad)
    x2 = torch.randn(300, N_IN, device=DEV, dtype=torch.bfloat16, requires_grad=grad)
    with torch.no_grad():
        want = layer(x1.detach()).float()
    other = torch.cuda.Stream()
    y = layer(x1)
    other.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(other):
        torch.cuda._sleep(50_000_000)  # the other stream reads y well after the next call
        seen = y.detach().float() * 1.0
    y.record_stream(other)
    del y
    for _ in range(3):
        layer(x2)
    torch.cuda.current_stream().wait_stream(other)
    torch.cuda.synchronize()
    assert torch.equal(seen, want)


@pytest.mark.parametrize("kind,cfg,r", KINDS)
def test_cleared_cublas_workspaces_and_user_streams(kind, cfg, r):
    """After torch._C._cuda_clearCublasWorkspaces() (torch.compile's CUDA-graph trees call it),
    calls on a user stream neither corrupt a user tensor nor change the results."""
    layer = make(kind, cfg, r, torch.bfloat16)
    x = torch.randn(400, N_IN, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    gy = seeded_gy((400, N_OUT), torch.bfloat16)
    clear(layer, x)
    layer(x).backward(gy)
    want = grads(layer, x)
    guard = torch.randn(1 << 19, device=DEV)  # 2 MiB of a user's data
    guard_copy = guard.clone()
    torch._C._cuda_clearCublasWorkspaces()
    user = torch.cuda.Stream()
    user.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(user):
        for _ in range(3):
            clear(layer, x)
            layer(x).backward(gy)
    torch.cuda.current_stream().wait_stream(user)
    torch.cuda.synchronize()
    assert torch.equal(guard, guard_copy)
    for a, b in zip(want, grads(layer, x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind,cfg,r", KINDS)
def test_no_grad_after_inference_mode(kind, cfg, r):
    """A call under no_grad after one under inference_mode on the same input returns a normal
    tensor (usable in autograd later), equal to the inference_mode result."""
    layer = make(kind, cfg, r, torch.bfloat16)
    x = torch.randn(5, 17, N_IN, device=DEV, dtype=torch.bfloat16)
    with torch.inference_mode():
        y_inf = layer(x)
    with torch.no_grad():
        y = layer(x)
    assert y_inf.is_inference() and not y.is_inference()
    assert torch.equal(y, y_inf)
    w = torch.ones(N_OUT, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    (y * w).sum().backward()  # an inference tensor here would raise
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("kind,cfg,r", KINDS)
@pytest.mark.parametrize("api", ["cuda_tf32", "cuda_ieee", "mkldnn_bf16"])
def test_matmul_precision_apis(kind, cfg, r, api):
    """torch's per-backend precision API (torch.backends.cuda.matmul.fp32_precision and the
    mkldnn one) leaves the ops working: an fp32 layer trains, with tf32's error at most."""
    layer = make(kind, cfg, r, torch.float32)
    x0 = torch.randn(3, 41, N_IN, device=DEV, dtype=torch.float64)
    backend = torch.backends.mkldnn.matmul if api.startswith("mkldnn") else \
        torch.backends.cuda.matmul
    old = backend.fp32_precision
    try:
        backend.fp32_precision = {"cuda_tf32": "tf32", "cuda_ieee": "ieee",
                                  "mkldnn_bf16": "bf16"}[api]
        fast = run(layer, x0, torch.float32, torch.float32, use_ops=True)
    finally:
        backend.fp32_precision = old
    exact = run(layer, x0.float().double(), torch.float64, torch.float64, use_ops=False)
    for f, e in zip(fast, exact):
        assert torch.isfinite(f).all()
        err = (f.double() - e).norm() / e.norm()
        assert err < 5e-3, (api, float(err))


@pytest.mark.parametrize("kind,cfg,r", KINDS)
def test_torch_func_transforms(kind, cfg, r):
    """torch.func.jvp (checked against central differences in float64), torch.func.grad and
    vmap (checked against eager autograd and a loop) through a CUDA layer: right answers, never a
    silent zero tangent."""
    layer = make(kind, cfg, r, torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(2, 19, N_IN, device=DEV, dtype=torch.float64)
    t = torch.randn_like(x)

    def f(inp):
        return torch.func.functional_call(layer, params, (inp,))
    y, jv = torch.func.jvp(f, (x,), (t,))
    eps = 1e-6
    fd = (layer(x + eps * t) - layer(x - eps * t)) / (2 * eps)
    assert torch.allclose(y, layer(x))
    assert (jv - fd).norm() <= 1e-6 * fd.norm()

    names = list(layer.adapter_parameter_names)

    def loss(adapter, inp):
        return torch.func.functional_call(layer, {**params, **adapter}, (inp,)).square().sum()
    g = torch.func.grad(loss)({n: params[n] for n in names}, x)
    for n in names:
        getattr(layer, n).grad = None
    layer(x).square().sum().backward()
    for n in names:
        torch.testing.assert_close(g[n], getattr(layer, n).grad, rtol=1e-9, atol=1e-12)

    batched = torch.func.vmap(f)(x)
    torch.testing.assert_close(batched, torch.stack([layer(xi) for xi in x]), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("kind,cfg,r", KINDS)
def test_forward_mode_ad(kind, cfg, r):
    """torch.autograd.forward_ad dual tensors through a CUDA layer: the tangent matches central
    differences in float64."""
    import torch.autograd.forward_ad as fwAD
    layer = make(kind, cfg, r, torch.float64)
    x = torch.randn(23, N_IN, device=DEV, dtype=torch.float64)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        out = layer(fwAD.make_dual(x, t))
        jv = fwAD.unpack_dual(out).tangent
    eps = 1e-6
    with torch.no_grad():
        fd = (layer(x + eps * t) - layer(x - eps * t)) / (2 * eps)
    assert jv is not None and (jv - fd).norm() <= 1e-6 * fd.norm()


@pytest.mark.parametrize("kind,cfg,r", KINDS)
@pytest.mark.parametrize("where", ["x_nan", "x_inf", "param_nan"])
@pytest.mark.parametrize("policy", ["always", "never"])
def test_nan_and_inf_propagate(kind, cfg, r, where, policy):
    """A NaN or inf in the input or a NaN in an adapter parameter makes the same outputs and
    input gradients non-finite as in the reference (the merged path may give inf where the
    unmerged one gives NaN: both are non-finite), and leaves the other rows finite."""
    layer = make(kind, cfg, r, torch.float32)
    x = torch.randn(50, N_IN, device=DEV)
    if where == "x_nan":
        x[7, 3] = float("nan")
    elif where == "x_inf":
        x[7, 3] = float("inf")
    else:
        with torch.no_grad():
            layer.adapter_parameters()[0].view(-1)[0] = float("nan")
    with ops.merge_policy(policy):
        fast = run(layer, x.double(), torch.float32, torch.float32, use_ops=True)
    slow = run(layer, x.double(), torch.float32, torch.float32, use_ops=False)
    for name, f, s in zip(["y", "x"], fast[:2], slow[:2]):
        assert torch.equal(torch.isfinite(f), torch.isfinite(s)), (where, policy, name)
    if where != "param_nan":
        assert torch.isfinite(fast[0][:7]).all() and not torch.isfinite(fast[0][7]).all()


LIMIT_CASES = [("pera", {"terms": "square"}, 65),
               ("genlora", {"num_rbf": 8, "latent_dim": 2}, 129),
               ("genlora", {"num_rbf": 257, "latent_dim": 2}, 4),
               ("genlora", {"num_rbf": 8, "latent_dim": 9}, 4)]


@pytest.mark.parametrize("kind,cfg,r", LIMIT_CASES)
def test_beyond_kernel_limits_runs_the_reference(kind, cfg, r):
    """Ranks, RBF counts and latent sizes beyond the CUDA kernels' limits run the reference with
    one warning per configuration (not per call): the same results as the reference, bit for
    bit, instead of an error."""
    layer = random_layer(kind, 37, 53, r, torch.float64, **cfg).to(torch.bfloat16)
    x = torch.randn(2, 9, 37, device=DEV, dtype=torch.float64)
    with pytest.warns(UserWarning, match="beyond the CUDA kernels"):
        fast = run(layer, x, torch.bfloat16, torch.bfloat16, use_ops=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = run(layer, x, torch.bfloat16, torch.bfloat16, use_ops=True)
    slow = run(layer, x, torch.bfloat16, torch.bfloat16, use_ops=False)
    for a, b, c in zip(fast, again, slow):
        assert torch.equal(a, c) and torch.equal(b, c)
