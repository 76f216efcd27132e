"""The CUDA ops against the reference: every op, dtype and terms, forward and all gradients, fresh
random data of odd shapes, tolerances from the same-dtype reference's own error (the kernel's
error against float64 at most 2x it); gradcheck in float64; N = 1 and 0; opcheck;
torch.compile; CUDA graph capture; bad inputs. Skipped without a GPU and the extension."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

import polykern
from polykern import GenLoraLinear, PeraLinear
from polykern import ops
from polykern import reference as ref
from polykern.testing import gradcheck_layer, opcheck_layer
from utils import assert_within_ref_error, strided

pytestmark = pytest.mark.skipif(not polykern.cuda_available(),
                                reason="needs a CUDA GPU and the compiled extension")
DEV = "cuda"
LOW = (torch.float32, torch.bfloat16, torch.float16)
# (activation dtype, adapter dtype) pairs and input layouts of test_kernel_vs_reference
KERNEL_DTYPES = [(d, d) for d in LOW] + [(torch.bfloat16, torch.float32),
                                         (torch.float16, torch.float32)]
LAYOUTS = ("3d", "strided")


def random_layer(kind, n, m, r, dtype, bias=True, **cfg):
    """A float64 layer on the GPU with random (non-zero) adapter parameters of sensible scale."""
    torch.manual_seed(hash((kind, n, m, r, str(dtype), bias)) % 2**31)
    cls = PeraLinear if kind == "pera" else GenLoraLinear
    layer = cls(n, m, bias=bias, r=r, device=DEV, dtype=torch.float64, **cfg)
    with torch.no_grad():
        for name, p in zip(layer.adapter_parameter_names, layer.adapter_parameters()):
            if name in ("lora_A", "lora_B"):
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
            elif name == "pera_h":
                p.copy_(torch.randn_like(p) * 0.5)
            elif name.endswith(("latent", "centers")):
                p.uniform_(-1, 1)
            elif name.endswith("log_gamma"):   # widths of about the centres' spacing
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
            else:                               # mixes
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[0] * p.shape[1]) * 4)
    return layer.to(dtype)


def run(layer, x, dtype, adapter_dtype, use_ops, order=None):
    """Forward + backward of ``layer``'s math with the activations and frozen weight in
    ``dtype`` and the adapter parameters in ``adapter_dtype``, through the CUDA ops or the
    reference; returns [y, grad x, grads of the adapter parameters]. ``order`` (a permutation of
    the batch rows) runs the same math on the rows in that order and returns y and grad x in the
    original order: the sums over rows then round differently, another sample of the dtype's
    error."""
    W = layer.weight.detach().to(dtype)
    b = None if layer.bias is None else layer.bias.detach().to(dtype)
    params = [p.detach().to(adapter_dtype).requires_grad_() for p in layer.adapter_parameters()]
    n = x.shape[-1]
    xin = x.detach().to(dtype)
    if order is not None:
        xin = xin.reshape(-1, n)[order].reshape(x.shape)
    xin = xin.requires_grad_()
    if isinstance(layer, PeraLinear):
        fn = ops.pera_linear if use_ops else ref.pera_linear
        y = fn(xin, W, b, *params, layer.scaling, layer.terms)
    else:
        fn = ops.genlora_linear if use_ops else ref.genlora_linear
        y = fn(xin, W, b, *params, layer.scaling)
    gy = torch.randn(y.shape, generator=torch.Generator(DEV).manual_seed(7), device=DEV,
                     dtype=torch.float64).to(dtype)
    if order is not None:  # the gradient each original row gets is unchanged
        gy = gy.reshape(-1, y.shape[-1])[order].reshape(y.shape)
    grads = list(torch.autograd.grad(y, [xin] + params, gy, allow_unused=True))
    if order is not None:
        back = torch.argsort(order)
        y = y.reshape(-1, y.shape[-1])[back].reshape(y.shape)
        grads[0] = grads[0].reshape(-1, n)[back].reshape(x.shape)
    return [y] + grads


def same_dtype_refs(layer, x, dtype, adapter_dtype, draws=4):
    """The reference in the compute dtype, ``draws`` times (rows in order, reversed, then in
    random orders): per output, the sample ``assert_within_ref_error`` takes as the same-dtype
    error. Two draws were too few for an output of one or two scalars (pera_h at r = 1): its
    error is a sum with cancellation, whose tail a couple of draws can miss."""
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    g = torch.Generator().manual_seed(rows)
    orders = [None, torch.arange(rows - 1, -1, -1)]
    orders += [torch.randperm(rows, generator=g) for _ in range(draws - 2)]
    runs = [run(layer, x, dtype, adapter_dtype, use_ops=False,
                order=None if o is None else o.to(DEV)) for o in orders]
    return list(zip(*runs))


def run_forward(layer, x, dtype, adapter_dtype, use_ops):
    """The output alone (no autograd), as ``run`` computes it."""
    W = layer.weight.detach().to(dtype)
    b = None if layer.bias is None else layer.bias.detach().to(dtype)
    params = [p.detach().to(adapter_dtype) for p in layer.adapter_parameters()]
    xin = x.detach().to(dtype)
    if isinstance(layer, PeraLinear):
        fn = ops.pera_linear if use_ops else ref.pera_linear
        return fn(xin, W, b, *params, layer.scaling, layer.terms)
    fn = ops.genlora_linear if use_ops else ref.genlora_linear
    return fn(xin, W, b, *params, layer.scaling)


CASES = [("pera", {"terms": t}, r) for t in ("full", "square", "cross") for r in (1, 4, 9)] + \
        [("pera", {"terms": "full"}, 64), ("pera", {"terms": "none"}, 5),
         ("genlora", {"num_rbf": 7, "latent_dim": 1}, 5),
         ("genlora", {"num_rbf": 32, "latent_dim": 3}, 16),
         ("genlora", {"num_rbf": 256, "latent_dim": 8}, 128)]


@pytest.mark.parametrize("kind,cfg,r", CASES)
@pytest.mark.parametrize("dtype,adapter_dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_vs_reference(kind, cfg, r, dtype, adapter_dtype, layout):
    n, m = 37, 53
    layer = random_layer(kind, n, m, r, torch.float64, bias=(layout == "3d"), **cfg)
    x = torch.randn(3, 5, n, device=DEV, dtype=torch.float64)
    if layout == "strided":
        x = strided(torch.randn(7, n, device=DEV, dtype=torch.float64))
    fast = run(layer, x, dtype, adapter_dtype, use_ops=True)
    same = same_dtype_refs(layer, x, dtype, adapter_dtype)
    exact = run(layer, x.to(dtype).double(), torch.float64, torch.float64, use_ops=False)
    names = ["y", "x"] + list(layer.adapter_parameter_names)
    for name, f, s, e in zip(names, fast, same, exact):
        if e is None:
            continue
        assert f.dtype == s[0].dtype and f.shape == s[0].shape, name
        assert torch.isfinite(f).all(), f"{name}: non-finite values (unwritten output?)"
        assert_within_ref_error(f, s, e, what=f"{kind} {cfg} r={r} {dtype}/{adapter_dtype} {name}")


# At (64, 136), GenLoRA r = 16 (R = 16) and PERA square r = 8 (R = 16) take the fused gY pass
# (csrc/gy_pass.cu) in bf16/fp16; (37, 53) does not (m % 8 != 0): both backward paths.
MERGE_CASES = [("pera", {"terms": "full"}, 9), ("pera", {"terms": "square"}, 64),
               ("pera", {"terms": "square"}, 8),
               ("genlora", {"num_rbf": 32, "latent_dim": 3}, 16)]


@pytest.mark.parametrize("kind,cfg,r", MERGE_CASES)
@pytest.mark.parametrize("dtype,adapter_dtype", [(d, d) for d in LOW] +
                         [(torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("policy", ["always", "never"])
@pytest.mark.parametrize("layout", ["3d", "strided"])
@pytest.mark.parametrize("n,m", [(37, 53), (64, 136)])
def test_merge_policies_vs_reference(kind, cfg, r, dtype, adapter_dtype, policy, layout, n, m):
    """Both adapter-core paths (W + B A merged into one GEMM operand, or the beta = 1
    accumulation), forward and every gradient, within 2x the same-dtype reference's error; the
    merged path rounds W + B A to the compute dtype once. (64, 136) with R a multiple of 8 takes
    the merge kernel's vector path (partial tiles in both directions), (37, 53) its scalar
    path. The automatic choice is covered by the tests above (small N: unmerged) and by the benchmark
    shapes (N >= 1.5 in: merged)."""
    layer = random_layer(kind, n, m, r, torch.float64, bias=(layout == "3d"), **cfg)
    x = torch.randn(3, 5, n, device=DEV, dtype=torch.float64)
    if layout == "strided":
        x = strided(torch.randn(70, n, device=DEV, dtype=torch.float64))
    with ops.merge_policy(policy):
        fast = run(layer, x, dtype, adapter_dtype, use_ops=True)
    same = same_dtype_refs(layer, x, dtype, adapter_dtype)
    exact = run(layer, x.to(dtype).double(), torch.float64, torch.float64, use_ops=False)
    names = ["y", "x"] + list(layer.adapter_parameter_names)
    for name, f, s, e in zip(names, fast, same, exact):
        assert torch.isfinite(f).all(), f"{name}: non-finite values (unwritten output?)"
        assert_within_ref_error(f, s, e, what=f"{policy} {kind} r={r} {dtype} {name}")


@pytest.mark.parametrize("kind", ["pera", "genlora"])
@pytest.mark.parametrize("policy", ["auto", "always", "never"])
def test_forward_holds_nothing_weight_sized(kind, policy):
    """Between the forward and the backward a training layer holds only U (N, R) beyond its
    output: no merged weight, even where the forward merged (N = 600 >= 1.5 n), and no generated
    factors (the backward makes them again), so a model's peak memory grows by no weight-sized
    or factor-sized tensor per adapted layer."""
    n, m, N = 256, 512, 600
    cfg = {"terms": "full"} if kind == "pera" else {"num_rbf": 32, "latent_dim": 3}
    layer = random_layer(kind, n, m, 4, torch.float64, **cfg).to(torch.bfloat16)
    R = layer._factors()[0].shape[0]
    x = torch.randn(N, n, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    with ops.merge_policy(policy):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = layer(x)
        held = torch.cuda.memory_allocated() - before - y.untyped_storage().nbytes()
        y.backward(torch.randn_like(y))
    need = N * R * 2
    # the caching allocator rounds each block up to 512 bytes
    assert need <= held <= need + 512, (held, need)
    assert held < m * n * 2
    assert torch.isfinite(x.grad).all()


def side_stream(mode):
    """The adapter core's side stream mode (0 off, 1 auto, 2 always)."""
    return ops._option_set("side_stream", mode)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
@pytest.mark.parametrize("policy", ["always", "never"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_side_stream_steps_repeat_exactly(kind, policy, dropout):
    """The adapter core runs its skinny GEMMs on a side stream beside the base GEMM
    (adapter_core.cpp), merged path or not: the results equal those without the side stream
    bit for bit (the same kernels run); steps whose inputs and gradients are freed and
    reallocated between them (so the caching allocator hands blocks back and forth between the
    streams) repeat the first step's results bit for bit, and so does a step queued on a
    non-default stream. The no_grad forward (the inference op) is checked the same way."""
    n, m, N = 64, 136, 300
    cfg = {"terms": "full"} if kind == "pera" else {"num_rbf": 32, "latent_dim": 3}
    layer = random_layer(kind, n, m, 8, torch.float64, dropout=dropout, **cfg).to(torch.bfloat16)
    x0 = torch.randn(N, n, device=DEV, dtype=torch.bfloat16)
    gy0 = torch.randn(N, m, device=DEV, dtype=torch.bfloat16)

    def step():
        for p in layer.adapter_parameters():
            p.grad = None
        x = x0.clone().requires_grad_()
        torch.manual_seed(3)  # the same dropout mask each step
        y = layer(x)
        junk = [torch.randn(N, m, device=DEV) for _ in range(3)]  # reuse of freed blocks
        y.backward(gy0.clone())
        del junk
        with torch.no_grad():  # the inference op: the same forward core, U kept by no one
            y_inf = layer.eval()(x0)
        layer.train()
        return ([y.detach().clone(), x.grad, y_inf]
                + [p.grad.clone() for p in layer.adapter_parameters()])

    with ops.merge_policy(policy):
        with side_stream(0):
            alone = step()
        with side_stream(2):
            first = step()
            for _ in range(5):
                for a, b in zip(first, step()):
                    assert torch.equal(a, b)
            other = torch.cuda.Stream()
            other.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(other):
                on_other = step()
            torch.cuda.current_stream().wait_stream(other)
    for a, b, c in zip(first, on_other, alone):
        assert torch.isfinite(a).all() and torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m", [(37, 53), (64, 136)])
def test_merged_path_with_an_offset_weight_view(dtype, n, m):
    """The merge GEMM (cuBLASLt with C = W, D = W_m where the build has it) on a frozen weight
    that is a view at an odd offset into a larger tensor (a slice of a fused weight): the
    pointer alignment is honoured, forward and gradients match the reference."""
    layer = random_layer("pera", n, m, 9, torch.float64, bias=False, terms="full")
    big = torch.randn(m + 1, n, device=DEV, dtype=torch.float64)
    big[1:] = layer.weight.detach()
    W_view = big.to(dtype)[1:]          # starts n elements in: 2-byte aligned for odd n
    assert W_view.is_contiguous() and W_view.storage_offset() == n
    x0 = torch.randn(2, 45, n, device=DEV, dtype=torch.float64)
    params64 = [p.detach() for p in layer.adapter_parameters()]

    def run_with(W, dt, use_ops):
        xin = x0.to(dt).requires_grad_()
        params = [p.to(dt).requires_grad_() for p in params64]
        fn = ops.pera_linear if use_ops else ref.pera_linear
        y = fn(xin, W, None, *params, layer.scaling, "full")
        gy = torch.randn(y.shape, generator=torch.Generator(DEV).manual_seed(3), device=DEV,
                         dtype=torch.float64).to(dt)
        return [y] + list(torch.autograd.grad(y, [xin] + params, gy))
    with ops.merge_policy("always"):
        fast = run_with(W_view, dtype, True)
        with torch.no_grad():
            fast_inf = ops.pera_linear(x0.to(dtype), W_view, None,
                                       *[p.to(dtype) for p in params64], layer.scaling, "full")
    same = run_with(W_view.contiguous(), dtype, False)
    exact = run_with(W_view.double(), torch.float64, False)
    for name, f, s_, e in zip(["y", "x", "A", "B", "h"], fast, same, exact):
        assert torch.isfinite(f).all(), name
        assert_within_ref_error(f, s_, e, what=f"offset view {dtype} {name}")
    assert_within_ref_error(fast_inf, same[0], exact[0], what=f"offset view inference {dtype}")


@pytest.mark.parametrize("kind,cfg,r", MERGE_CASES)
@pytest.mark.parametrize("dtype,adapter_dtype", [(d, d) for d in LOW] +
                         [(torch.float16, torch.float32)])
@pytest.mark.parametrize("policy", ["always", "never", "auto"])
def test_inference_path_vs_reference(kind, cfg, r, dtype, adapter_dtype, policy):
    """Under no_grad the layer runs the inference op (no U computed or kept): same output as the
    training op and within 2x the same-dtype reference's error; 3-D and strided inputs."""
    n, m = 37, 53
    layer = random_layer(kind, n, m, r, torch.float64, **cfg)
    for x in (torch.randn(2, 41, n, device=DEV, dtype=torch.float64),
              strided(torch.randn(67, n, device=DEV, dtype=torch.float64))):
        with ops.merge_policy(policy), torch.no_grad():
            fast = run_forward(layer, x, dtype, adapter_dtype, use_ops=True)
        same = run_forward(layer, x, dtype, adapter_dtype, use_ops=False)
        exact = run_forward(layer, x.to(dtype).double(), torch.float64, torch.float64, False)
        assert fast.shape == same.shape and fast.dtype == same.dtype
        assert torch.isfinite(fast).all()
        assert_within_ref_error(fast, same, exact, what=f"{policy} {kind} {dtype}")


def test_inference_op_bad_inputs():
    layer = random_layer("pera", 37, 53, 4, torch.float64).to(torch.bfloat16)
    pi, pj = ref.pera_pairs(4, "full", DEV)
    x = torch.randn(3, 37, device=DEV, dtype=torch.bfloat16)
    A, B, h = (p.detach() for p in layer.adapter_parameters())
    op = torch.ops.polykern.pera_linear_inference
    with pytest.raises(RuntimeError, match="last dimension 36"):
        op(x[:, :36], layer.weight, None, A, B, h, pi, pj, 1.0)
    with pytest.raises(RuntimeError, match="lora_B must have shape"):
        op(x, layer.weight, None, A, B[:, :3], h, pi, pj, 1.0)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        op(x.half(), layer.weight, None, A, B, h, pi, pj, 1.0)
    g = random_layer("genlora", 37, 53, 4, torch.float64).float()
    p = [t.detach() for t in g.adapter_parameters()]
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        torch.ops.polykern.genlora_linear_inference(x.float(), g.weight, None, p[0].cpu(),
                                                    *p[1:], 1.0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("kind,cfg", [("pera", {"terms": "full"}), ("pera", {"terms": "cross"}),
                                      ("genlora", {"num_rbf": 5, "latent_dim": 2})])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_float64(kind, cfg, dropout):
    """float64 gradcheck through the CUDA ops (polykern.testing.gradcheck_layer, the check users
    run), dropout included with the same mask at every evaluation."""
    layer = random_layer(kind, 6, 5, 3, torch.float64, **cfg)
    layer.dropout = dropout
    x = torch.randn(2, 3, 6, device=DEV, dtype=torch.float64)
    assert gradcheck_layer(layer, x, randomize=False, fast_mode=False)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
@pytest.mark.parametrize("N", [0, 1])
def test_tiny_batches(kind, N):
    layer = random_layer(kind, 37, 53, 4, torch.float64).to(torch.bfloat16)
    x = torch.randn(N, 37, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.shape == (N, 53)
    y.float().sum().backward()
    assert x.grad.shape == x.shape
    for p in layer.adapter_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
        if N == 0:
            assert torch.count_nonzero(p.grad) == 0


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_frozen_input_and_frozen_h(kind):
    layer = random_layer(kind, 37, 53, 4, torch.float64).float()
    x = torch.randn(9, 37, device=DEV)
    if kind == "pera":
        layer.pera_h.requires_grad_(False)
    layer(x).sum().backward()
    if kind == "pera":
        assert layer.pera_h.grad is None and layer.lora_A.grad is not None
    with torch.no_grad():
        assert layer(x).shape == (9, 53)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("trainable", ["x", "weight", "bias", "first_param", "last_param", "all"])
def test_eager_node_gradients_for_each_requires_grad_pattern(kind, bias, dropout, trainable):
    """The C++ autograd node maps each gradient to its input whichever inputs require grad
    (absent bias / no dropout shift the edges), including an unfrozen base weight and bias;
    float64 against the reference with the same dropout mask."""
    layer = random_layer(kind, 11, 13, 3, torch.float64, bias=bias)
    x0 = torch.randn(2, 5, 11, device=DEV, dtype=torch.float64)
    names = list(layer.adapter_parameter_names)

    def grads(use_ops):
        x = x0.clone()
        W = layer.weight.detach().clone()
        b = None if layer.bias is None else layer.bias.detach().clone()
        params = [p.detach().clone() for p in layer.adapter_parameters()]
        leaves = {"x": x, "weight": W, "bias": b, "first_param": params[0],
                  "last_param": params[-1]}
        want = [t for k, t in leaves.items() if (trainable in (k, "all")) and t is not None]
        if trainable == "all":
            want += params[1:-1]
        for t in want:
            t.requires_grad_(True)
        if not want:
            pytest.skip("no bias to train")
        torch.manual_seed(5)
        xa = torch.nn.functional.dropout(x, dropout, True) if dropout else None
        if kind == "pera":
            fn = ops.pera_linear if use_ops else ref.pera_linear
            y = fn(x, W, b, *params, layer.scaling, layer.terms, xa)
        else:
            fn = ops.genlora_linear if use_ops else ref.genlora_linear
            y = fn(x, W, b, *params, layer.scaling, xa)
        gy = torch.randn(y.shape, generator=torch.Generator(DEV).manual_seed(1), device=DEV,
                         dtype=y.dtype)
        return torch.autograd.grad(y, want, gy)
    got, exp = grads(True), grads(False)
    assert len(got) == len(exp) > 0
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=f"{names} {trainable}")


def test_genlora_under_deterministic_algorithms(monkeypatch):
    """torch.use_deterministic_algorithms: the GenLoRA CUDA backward has no atomics (its sums
    over coordinates are per-block partials added in a fixed order), so the
    ops run in that mode without an alert, the module keeps the CUDA path, and its gradients
    repeat bitwise; they are within 2x the same-dtype reference's error. PERA's kernels have
    no atomics either."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # torch's own cuBLAS condition
    layer = random_layer("genlora", 37, 53, 5, torch.float64, num_rbf=7, latent_dim=2)
    layer32 = copy.deepcopy(layer).to(torch.float32)
    x = torch.randn(4, 9, 37, device=DEV, dtype=torch.float64).float().double()  # fp32 values

    def grads(lay, dt):
        xin = x.to(dt).requires_grad_()
        lay.zero_grad(set_to_none=True)
        lay(xin).sum().backward()
        return [xin.grad] + [p.grad for p in lay.adapter_parameters()]
    params = [p.detach() for p in layer32.adapter_parameters()]
    W, x32 = layer32.weight.detach(), x.float()
    _, U = torch.ops.polykern.genlora_linear(x32, W, None, *params, layer32.scaling, None)
    gy = torch.randn(4, 9, 53, device=DEV)

    def backward():
        return torch.ops.polykern.genlora_linear_backward(gy, x32, None, W, *params,
                                                          layer32.scaling, U,
                                                          [True, False, True])
    try:
        torch.use_deterministic_algorithms(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no alert, no warning
            first, second = grads(layer32, torch.float32), grads(layer32, torch.float32)
            op_first, op_second = backward(), backward()
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(list(first) + list(op_first), list(second) + list(op_second)):
        assert a is not None and torch.equal(a, b), "not bitwise reproducible"
    # the module took the CUDA path: the same values as the op outside that mode
    for a, b in zip(first, grads(layer32, torch.float32)):
        assert torch.equal(a, b)

    def ref_grads(dt, reverse=False):  # the reference, the same loss; reverse: rows reversed
        ps = [p.detach().to(dt).requires_grad_() for p in layer.adapter_parameters()]
        xin = (x.flip(0, 1) if reverse else x).to(dt).requires_grad_()
        y = ref.genlora_linear(xin, layer.weight.detach().to(dt), layer.bias.detach().to(dt),
                               *ps, layer.scaling)
        g = torch.autograd.grad(y.sum(), [xin] + ps)
        return [g[0].flip(0, 1) if reverse else g[0]] + list(g[1:])
    exact = ref_grads(torch.float64)
    same = list(zip(ref_grads(torch.float32), ref_grads(torch.float32, reverse=True)))
    for name, f, s_, e in zip(["x"] + list(layer.adapter_parameter_names), first, same, exact):
        assert_within_ref_error(f, s_, e, what=f"deterministic mode, CUDA path: {name}")


def test_dropout_mask_matches_reference():
    layer = random_layer("pera", 37, 53, 4, torch.float64).float().train()
    layer.dropout = 0.25
    x = torch.randn(6, 37, device=DEV)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    xd = torch.nn.functional.dropout(x, 0.25, True)
    A, B = layer._factors()
    torch.testing.assert_close(y, ref.adapter_linear(x, layer.weight, layer.bias, A, B,
                                                     layer.scaling, xd), rtol=1e-5, atol=1e-5)


def test_opcheck():
    """torch.library.opcheck of both forward ops, merged and unmerged, with and without gradients
    (polykern.testing.opcheck_layer, the check users run)."""
    for kind in ("pera", "genlora"):
        layer = random_layer(kind, 37, 53, 4, torch.float64)
        opcheck_layer(layer, torch.randn(2, 5, 37, device=DEV, dtype=torch.float64))


def test_steps_repeat_and_capture():
    """Training steps repeat bit for bit, on the default and on a side stream, and a whole step
    captured with torch.cuda.graph replays to the same values (N = 512 >= 1.5 n: the merged
    path, with the side stream)."""
    n, m = 256, 512
    layer = random_layer("pera", n, m, 16, torch.float64, terms="square").to(torch.bfloat16)
    params = list(layer.adapter_parameters())
    x = torch.randn(4, 128, n, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(4, 128, m, device=DEV, dtype=torch.bfloat16)

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        y = layer(x)
        y.backward(gy)
        return [y.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in params]

    results = [step() for _ in range(4)]
    for later in results[1:]:
        for a, b in zip(results[0], later):
            assert torch.equal(a, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    for p in params:
        p.grad = None
    with torch.cuda.graph(graph):
        y = layer(x)
        y.backward(gy)
    graph.replay()
    torch.cuda.synchronize()
    captured = [y, x.grad] + [p.grad for p in params]
    for a, b in zip(results[0], captured):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float16)])
def test_expand_ops_match_reference_factors(dtype, adapter_dtype):
    """The generator ops alone (pera_expand, genlora_expand): the reference's factors, scaling
    folded into B, cast to the compute dtype, within the rounding of that cast."""
    for kind, cfg in (("pera", {"terms": "full"}), ("pera", {"terms": "cross"}),
                      ("genlora", {"num_rbf": 9, "latent_dim": 2})):
        layer = random_layer(kind, 37, 53, 5, torch.float64, **cfg)
        params = [p.detach().to(adapter_dtype) for p in layer.adapter_parameters()]
        if kind == "pera":
            A, B = ops.pera_expand(*params, layer.terms, 0.7, dtype)
            A_ref = ref.pera_expand_A(params[0].double(), params[2].double(), layer.terms)
            B_ref = ref.pera_expand_B(params[1].double(), layer.terms)
        else:
            A, B = ops.genlora_expand(*params, 0.7, dtype)
            A_ref, B_ref = ref.genlora_factors(*(p.double() for p in params))
        for got, want, name in ((A, A_ref, "A"), (B, 0.7 * B_ref, "B")):
            assert got.dtype == dtype and got.shape == want.shape, name
            # one rounding to dtype plus float32 arithmetic on the way
            tol = torch.finfo(dtype).eps + (0 if adapter_dtype == torch.float64 else 1e-6)
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max(),
                                       msg=f"{kind} {cfg} {name}")


class TinyNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        cls = PeraLinear if kind == "pera" else GenLoraLinear
        self.l1 = cls(40, 64, r=4, device=DEV)
        self.l2 = cls(64, 24, r=4, device=DEV)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


@pytest.mark.parametrize("kind", ["pera", "genlora"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_fullgraph_trains(kind, mode):
    """torch.compile, and its CUDA-graph mode (the way to graph polykern's ops), train like
    eager."""
    torch.manual_seed(0)
    eager = TinyNet(kind)
    compiled_model = TinyNet(kind)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, mode=mode)
    x, t = torch.randn(16, 40, device=DEV), torch.randn(16, 24, device=DEV)
    opt_e = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=0.1)
    opt_c = torch.optim.SGD([p for p in compiled_model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(4):
        for model, opt in ((eager, opt_e), (compiled, opt_c)):
            loss = (model(x) - t).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


def perturbed_tiny_net(kind):
    """A TinyNet whose trainable parameters are moved off their init (B = 0 would hide bugs)."""
    model = TinyNet(kind)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def warm_up_on_a_side_stream(step, times):
    """torch.cuda.graphs' warm-up before a capture: ``times`` calls of ``step`` on a side
    stream (this also times the adapter GEMMs, which capture does not)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(times):
            step()
    torch.cuda.current_stream().wait_stream(s)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
@pytest.mark.parametrize("policy,side", [("auto", 1), ("always", 2), ("never", 2)])
def test_cuda_graph_capture_of_a_training_step(kind, policy, side):
    """Captured and replayed, a training step gives eager's gradients; side = 2 captures the
    adapter core's side stream (fork and join inside the graph) on the merged path (with the
    merged weight kept) and on the unmerged one."""
    with ops.merge_policy(policy), side_stream(side):
        _capture_and_replay(kind)


def _capture_and_replay(kind):
    torch.manual_seed(1)
    model = perturbed_tiny_net(kind)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(8, 40, device=DEV)
    warm_up_on_a_side_stream(lambda: model(x).square().mean().backward(), 2)
    for p in params:
        p.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss = model(x).square().mean()
        loss.backward()
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    captured = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    model(x).square().mean().backward()
    for a, b in zip(captured, [p.grad for p in params]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_captured_training_loop_matches_eager(kind):
    """The README's small-batch recipe as written: warm-up on a side stream, zero_grad, capture
    forward and backward, then per batch copy into the static input, replay and step the
    optimizer outside the graph. Four steps on fresh batches train the same parameters as
    eager training does."""
    torch.manual_seed(2)
    model = perturbed_tiny_net(kind)
    eager, start = copy.deepcopy(model), copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt_e = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=0.1)
    data = [torch.randn(8, 40, device=DEV) for _ in range(4)]
    static_x = torch.randn(8, 40, device=DEV)
    warm_up_on_a_side_stream(lambda: model(static_x).float().pow(2).mean().backward(), 3)
    opt.zero_grad(set_to_none=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_loss = model(static_x).float().pow(2).mean()
        static_loss.backward()
    for batch in data:
        static_x.copy_(batch)
        g.replay()
        opt.step()
        opt_e.zero_grad(set_to_none=True)
        loss = eager(batch).float().pow(2).mean()
        loss.backward()
        opt_e.step()
        torch.testing.assert_close(static_loss, loss, rtol=1e-5, atol=1e-6)
    for (name, a), b, a0 in zip(model.named_parameters(), eager.parameters(),
                                start.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        if a.requires_grad:  # the replays did train
            assert (a - a0).abs().max() > 0, name


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_make_graphed_callables_layer(kind):
    """A layer wrapped by torch.cuda.make_graphed_callables (the captured path for small
    batches, README) gives eager's output and gradients, replay after replay, on fresh inputs of
    the captured shape (3-D, bf16; merged path, merged weight kept, at 3 x 48 rows of width
    40)."""
    layer = random_layer(kind, 40, 24, 4, torch.bfloat16)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    params = layer.adapter_parameters()
    sample = torch.randn(3, 48, 40, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(copy.deepcopy(layer), (sample,))
    gparams = graphed.adapter_parameters()
    for step in range(3):
        x = torch.randn(3, 48, 40, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(3, 48, 24, device=DEV, dtype=torch.bfloat16)
        xg = x.detach().clone().requires_grad_()
        y = layer(x)
        want = torch.autograd.grad(y, [x] + params, gy)
        yg = graphed(xg)
        got = torch.autograd.grad(yg, [xg] + gparams, gy)
        # bf16 rounding apart (cuBLAS may pick another algorithm under capture); a replay on
        # stale inputs or buffers would be off by O(1)
        for name, a, b in zip(["y", "x"] + list(layer.adapter_parameter_names), (yg,) + got,
                              (y,) + want):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2,
                                       atol=1e-2 * b.abs().max().item(),
                                       msg=f"step {step}: {name}")


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_backward_on_the_calling_thread(kind):
    """torch.autograd.set_multithreading_enabled(False) (the engine runs the C++ node on the
    calling thread; README, small batches) gives the default engine's gradients bit for bit."""
    layer = random_layer(kind, 40, 24, 4, torch.bfloat16)
    x = torch.randn(5, 7, 40, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(5, 7, 24, device=DEV, dtype=torch.bfloat16)
    inputs = [x] + layer.adapter_parameters()
    want = torch.autograd.grad(layer(x), inputs, gy)
    with torch.autograd.set_multithreading_enabled(False):
        layer(x).backward(gy)
    for name, t, w in zip(["x"] + list(layer.adapter_parameter_names), inputs, want):
        torch.testing.assert_close(t.grad, w, rtol=0, atol=0, msg=f"grad {name}")


def test_bad_inputs_on_cuda():
    layer = random_layer("pera", 37, 53, 4, torch.float64).to(torch.bfloat16)
    pi, pj = ref.pera_pairs(4, "full", DEV)
    x = torch.randn(3, 37, device=DEV, dtype=torch.bfloat16)
    A, B, h = layer.adapter_parameters()
    op = torch.ops.polykern.pera_linear
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        op(x.half(), layer.weight, None, A, B, h, pi, pj, 1.0, None)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        op(x, layer.weight, None, A.cpu(), B, h, pi, pj, 1.0, None)
    with pytest.raises(RuntimeError, match="last dimension 36"):
        op(x[:, :36], layer.weight, None, A, B, h, pi, pj, 1.0, None)
    with pytest.raises(RuntimeError, match="lora_B must have shape"):
        op(x, layer.weight, None, A, B[:, :3], h, pi, pj, 1.0, None)
    with pytest.raises(RuntimeError, match="support r from 1 to 64"):
        big = torch.randn(65, 37, device=DEV, dtype=torch.bfloat16)
        op(x, layer.weight, None, big, torch.randn(53, 65, device=DEV, dtype=torch.bfloat16),
           h, pi, pj, 1.0, None)
    with pytest.raises(ValueError, match="input is on cpu"):
        layer(x.cpu())
    _, U = op(x, layer.weight, None, A, B, h, pi, pj, 1.0, None)
    gy = torch.randn(3, 53, device=DEV, dtype=torch.bfloat16)
    bwd = torch.ops.polykern.pera_linear_backward
    with pytest.raises(RuntimeError, match="grad_y must be a CUDA tensor"):
        bwd(gy.cpu(), x, None, layer.weight, A, B, h, pi, pj, 1.0, U, [True, True, True])
    with pytest.raises(RuntimeError, match="U must be a CUDA tensor"):
        bwd(gy, x, None, layer.weight, A, B, h, pi, pj, 1.0, U.cpu(), [True, True, True])
    g = random_layer("genlora", 37, 53, 4, torch.float64).float()
    with pytest.raises(RuntimeError, match="num_rbf from 1 to 256"):
        p = g.adapter_parameters()
        K = 300
        torch.ops.polykern.genlora_linear(
            x.float(), g.weight, None, p[0], torch.zeros(K, 1, device=DEV),
            torch.zeros(K, device=DEV), torch.zeros(4, K, device=DEV), p[4],
            torch.zeros(K, 1, device=DEV), torch.zeros(K, device=DEV),
            torch.zeros(K, 4, device=DEV), 1.0, None)
    torch.cuda.synchronize()  # no sticky launch failure behind the errors
