"""PeraLinear and GenLoraLinear: the nn.Linear contract, LoRA equivalence, merge, dtypes, dropout,
bad input, save/load. Runs on the device each test names (CPU always; CUDA when present, where
the layers dispatch to the compiled ops)."""

import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import polykern
from polykern import GenLoraLinear, PeraLinear
from polykern import reference as ref
from utils import DTYPES, assert_verbose_allclose, eps, rel_err

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TERMS = ("full", "square", "cross")


def make(kind, n=37, m=53, **kw):
    if kind == "pera":
        return PeraLinear(n, m, r=kw.pop("r", 5), **kw)
    return GenLoraLinear(n, m, r=kw.pop("r", 5), num_rbf=kw.pop("num_rbf", 7), **kw)


@torch.no_grad()
def randomize(layer, scale=0.3):
    """Non-zero adapter parameters (a fresh layer's Delta W is 0)."""
    for p in layer.adapter_parameters():
        p.copy_(torch.randn_like(p) * scale + (0.5 if p.dim() == 1 else 0))
    return layer


@pytest.mark.parametrize("kind,init", [("pera", "lora"), ("pera", "pera"), ("genlora", None)])
@pytest.mark.parametrize("bias", [True, False])
def test_fresh_layer_equals_wrapped_linear(kind, init, bias):
    torch.manual_seed(0)
    lin = nn.Linear(37, 53, bias=bias)
    cfg = {"init": init} if kind == "pera" else {}
    layer = (PeraLinear if kind == "pera" else GenLoraLinear).from_linear(lin, r=4, **cfg)
    assert layer.weight is lin.weight and not layer.weight.requires_grad
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert torch.count_nonzero(layer.delta_weight()) == 0
    x = torch.randn(3, 7, 37)
    assert torch.equal(layer(x), lin(x))
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == set(layer.adapter_parameter_names)


def test_init_modes():
    torch.manual_seed(0)
    lo = PeraLinear(64, 32, r=8)
    assert lo.lora_A.abs().max() <= 1 / math.sqrt(64) + 1e-6  # kaiming-uniform(a=sqrt 5) bound
    assert torch.count_nonzero(lo.lora_B) == 0 and torch.count_nonzero(lo.pera_h) == 0
    pe = PeraLinear(64, 32, r=8, init="pera")
    assert torch.count_nonzero(pe.lora_A) == 0 and torch.count_nonzero(pe.pera_h) == 0
    assert abs(pe.lora_B.std().item() - 1 / 8) < 0.03
    g = GenLoraLinear(4096, 64, r=16, num_rbf=32)
    A, _ = g._factors()
    # A's rows have the variance of LoRA's kaiming-uniform A, 1 / (3 in), within sampling error
    assert abs(A.var().item() * 3 * 4096 - 1) < 0.25
    assert torch.count_nonzero(g.genlora_b_mix) == 0


@pytest.mark.parametrize("r", [1, 4, 8])
def test_pera_with_zero_h_is_peft_lora(r):
    peft = pytest.importorskip("peft")
    torch.manual_seed(r)
    base = nn.Linear(37, 53)
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(37, 53))
    holder.proj.load_state_dict(base.state_dict())
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"])
    lora = peft.get_peft_model(holder, cfg).base_model.model.proj
    pera = PeraLinear.from_linear(base, r=r, alpha=2 * r)
    pera.pera_h.requires_grad_(False)
    with torch.no_grad():
        pera.lora_A.copy_(torch.randn(r, 37))
        pera.lora_B.copy_(torch.randn(53, r))
        lora.lora_A["default"].weight.copy_(pera.lora_A)
        lora.lora_B["default"].weight.copy_(pera.lora_B)
    x = torch.randn(2, 9, 37, requires_grad=True)
    y_p, y_l = pera(x), lora(x)
    assert_verbose_allclose(y_p, y_l, 1e-5, 1e-5, "PERA(h=0) vs peft LoRA")
    gy = torch.randn_like(y_p)
    gx_p, gA_p, gB_p = torch.autograd.grad(y_p, [x, pera.lora_A, pera.lora_B], gy)
    gx_l, gA_l, gB_l = torch.autograd.grad(
        y_l, [x, lora.lora_A["default"].weight, lora.lora_B["default"].weight], gy)
    for a, b, w in [(gx_p, gx_l, "gx"), (gA_p, gA_l, "gA"), (gB_p, gB_l, "gB")]:
        assert_verbose_allclose(a, b, 1e-4, 1e-5, w)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
@pytest.mark.parametrize("device", DEVICES)
def test_module_gradcheck(kind, device):
    torch.manual_seed(1)
    layer = randomize(make(kind, 6, 5, r=3, dtype=torch.float64, device=device))
    x = torch.randn(2, 3, 6, dtype=torch.float64, device=device, requires_grad=True)
    params = layer.adapter_parameters()

    def f(x, *p):
        return torch.func.functional_call(layer, dict(zip(layer.adapter_parameter_names, p)),
                                          (x,))
    assert torch.autograd.gradcheck(f, [x] + [p.detach().clone().requires_grad_() for p in params])


@pytest.mark.parametrize("kind", ["pera", "genlora"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_unmerge(kind, dtype):
    torch.manual_seed(4)
    layer = randomize(make(kind, dtype=dtype), 0.1).eval()   # a merged layer in training warns
    x = torch.randn(4, 37, dtype=dtype)
    w0 = layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    y_m = layer(x)
    # merged vs unmerged: both round the same math to dtype in a different order
    assert rel_err(y_m, y) <= 16 * eps(dtype)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()  # merging twice does not double-add
    assert rel_err(layer(x), y_m) == 0
    layer.unmerge()
    assert not layer.merged
    assert rel_err(layer.weight, w0) <= 2 * eps(dtype)
    assert_verbose_allclose(layer(x), y, 16 * eps(dtype), 16 * eps(dtype), "after unmerge")


def test_merged_forward_is_one_linear():
    layer = randomize(make("pera")).eval()
    layer.merge()
    x = torch.randn(3, 37)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_merge_refuses_non_finite(kind):
    layer = randomize(make(kind))
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        getattr(layer, {"pera": "lora_A", "genlora": "genlora_a_mix"}[kind])[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, w0)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_state_dict_round_trip_is_bitwise(kind):
    torch.manual_seed(5)
    a = randomize(make(kind))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make(kind)
    b.load_state_dict(torch.load(buf))
    x = torch.randn(6, 37)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("kind", ["pera", "genlora"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_dtypes_against_float64(kind, dtype, device):
    """A layer in ``dtype`` is as accurate as the reference in that dtype (tested in
    test_reference); here the module path (CUDA ops on GPU) against the float64 layer."""
    torch.manual_seed(6)
    l64 = randomize(make(kind, dtype=torch.float64, device=device))
    layer = make(kind, dtype=dtype, device=device)
    layer.load_state_dict({k: v.to(dtype) for k, v in l64.state_dict().items()})
    x = torch.randn(3, 11, 37, dtype=torch.float64, device=device)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    params = [p.double() for p in layer.adapter_parameters()]
    fn = ref.pera_linear if kind == "pera" else ref.genlora_linear
    extra = (layer.terms,) if kind == "pera" else ()
    y64 = fn(x.to(dtype).double(), layer.weight.double(), layer.bias.double(),
             *params, layer.scaling, *extra)
    y_ref = fn(x.to(dtype), layer.weight, layer.bias, *layer.adapter_parameters(),
               layer.scaling, *extra)
    assert rel_err(y, y64) <= 2 * rel_err(y_ref, y64) + 4 * eps(dtype)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_fp32_adapters_with_low_precision_weight(kind, dtype, device):
    torch.manual_seed(7)
    layer = randomize(make(kind, dtype=dtype, adapter_dtype=torch.float32, device=device))
    assert layer.weight.dtype == dtype
    assert all(p.dtype == torch.float32 for p in layer.adapter_parameters())
    x = torch.randn(2, 5, 37, dtype=dtype, device=device, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype
    for p in layer.adapter_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
    # the expansion runs in fp32: the factors fed to the matmuls are the fp32 ones rounded once
    A, B = layer._factors()
    assert A.dtype == torch.float32 and B.dtype == torch.float32


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_input_dtype_mismatch_errors_like_linear(kind):
    layer = make(kind)
    x = torch.randn(2, 37, dtype=torch.float64)
    with pytest.raises(RuntimeError) as ours:
        layer(x)
    with pytest.raises(RuntimeError) as theirs:
        nn.Linear(37, 53)(x)
    assert "dtype" in str(ours.value) and "dtype" in str(theirs.value)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
@pytest.mark.parametrize("device", DEVICES)
def test_autocast(kind, device):
    torch.manual_seed(8)
    layer = randomize(make(kind, device=device))
    x = torch.randn(4, 37, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
        y_lin = F.linear(x, layer.weight, layer.bias)
    assert y.dtype == y_lin.dtype == torch.bfloat16
    y32 = layer(x)
    assert rel_err(y, y32) <= 8 * eps(torch.bfloat16)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_dropout_on_adapter_path_only(kind):
    torch.manual_seed(9)
    layer = randomize(make(kind, dropout=0.4)).train()
    x = torch.randn(8, 37)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    x_drop = F.dropout(x, 0.4, True)
    assert not torch.equal(x_drop, x)
    A, B = layer._factors()
    expected = ref.adapter_linear(x, layer.weight, layer.bias, A, B, layer.scaling, x_drop)
    assert_verbose_allclose(y, expected, 1e-6, 1e-6, "dropout")
    layer.eval()
    assert torch.equal(layer(x), ref.adapter_linear(x, layer.weight, layer.bias, A, B,
                                                    layer.scaling))


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_empty_batch_and_nan_propagation(kind):
    layer = randomize(make(kind))
    assert layer(torch.randn(0, 37)).shape == (0, 53)
    assert layer(torch.randn(2, 0, 37)).shape == (2, 0, 53)
    x = torch.randn(3, 37)
    x[1, 4] = float("nan")
    x[2, 5] = float("inf")
    y = layer(x)
    assert torch.isnan(y[1]).all() and not torch.isfinite(y[2]).all()
    assert torch.isfinite(y[0]).all()


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="r must be positive, got r=0"):
        PeraLinear(8, 8, r=0)
    with pytest.raises(ValueError, match="r must be positive, got r=-2"):
        GenLoraLinear(8, 8, r=-2)
    with pytest.raises(ValueError, match="unknown PERA terms 'quad'"):
        PeraLinear(8, 8, r=2, terms="quad")
    with pytest.raises(ValueError, match="unknown PERA init 'xavier'"):
        PeraLinear(8, 8, r=2, init="xavier")
    with pytest.raises(ValueError, match="num_rbf must be positive, got num_rbf=0"):
        GenLoraLinear(8, 8, r=2, num_rbf=0)
    with pytest.raises(ValueError, match="latent_dim must be positive, got latent_dim=-1"):
        GenLoraLinear(8, 8, r=2, latent_dim=-1)
    with pytest.raises(TypeError, match="r must be an int"):
        PeraLinear(8, 8, r=2.5)
    with pytest.raises(ValueError, match="dropout must be a probability"):
        PeraLinear(8, 8, r=2, dropout=1.0)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_bad_inputs(kind):
    layer = make(kind)
    with pytest.raises(ValueError, match=r"input of shape \(4, 36\) does not end in "
                                         r"in_features=37"):
        layer(torch.randn(4, 36))
    with pytest.raises(ValueError, match="does not end in in_features"):
        layer(torch.tensor(1.0))
    with pytest.raises(ValueError, match="input is on meta but the layer's weight is on cpu"):
        layer(torch.randn(4, 37, device="meta"))
    with pytest.raises(TypeError, match="expects a Tensor"):
        layer([1.0] * 37)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        PeraLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_extra_repr_names_the_config():
    s = repr(PeraLinear(8, 4, r=2, terms="square", alpha=4))
    assert "r=2" in s and "terms='square'" in s and "alpha=4" in s and "merged=False" in s
    s = repr(GenLoraLinear(8, 4, r=2, num_rbf=5, latent_dim=2))
    assert "num_rbf=5" in s and "latent_dim=2" in s


def test_training_step_reduces_loss():
    torch.manual_seed(10)
    layer = PeraLinear(16, 16, r=4)
    target = torch.randn(16, 16) * 0.3
    opt = torch.optim.Adam(layer.adapter_parameters(), lr=1e-2)
    x = torch.randn(64, 16)
    losses = []
    for _ in range(60):
        loss = (layer(x) - F.linear(x, layer.weight + target, layer.bias)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert layer.pera_h.abs().sum() > 0  # h does train once A and B move


def test_cuda_available_is_bool():
    assert isinstance(polykern.cuda_available(), bool)
    if not torch.cuda.is_available():
        assert polykern.cuda_available() is False


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_merged_layer_in_training_warns_once(kind):
    """A merged layer runs one plain linear: nothing reaches the adapters. Training it (training
    mode, grad enabled) warns, once per layer; eval mode and no_grad stay silent."""
    layers = [randomize(make(kind)).train() for _ in range(2)]
    x = torch.randn(3, 37)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers[0](x)                              # not merged: trains, no warning
        for layer in layers:
            layer.merge()
        layers[0].eval()(x)
        with torch.no_grad():
            layers[0].train()(x)
        assert not [w for w in caught if "merged" in str(w.message)]
        for _ in range(3):
            for layer in layers:
                layer(x)
    merged_warnings = [w for w in caught if "merged" in str(w.message)]
    assert len(merged_warnings) == 2               # one for each layer
    assert all(issubclass(w.category, UserWarning) for w in merged_warnings)
    assert "unmerge" in str(merged_warnings[0].message)


META_CASES = [("pera", {"init": "lora"}), ("pera", {"init": "pera", "terms": "cross"}),
              ("genlora", {"latent_dim": 1}), ("genlora", {"latent_dim": 3})]


@pytest.mark.parametrize("kind,cfg", META_CASES)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None),
                                                 (torch.bfloat16, torch.float32)])
def test_builds_on_meta_and_reset_parameters_matches_constructor(kind, cfg, dtype,
                                                                 adapter_dtype):
    """FSDP2's meta-device route: build on meta, ``to_empty``, ``reset_parameters()``; the
    result is the layer the constructor makes from the same seed, bit for bit."""
    with torch.device("meta"):
        layer = make(kind, dtype=dtype, adapter_dtype=adapter_dtype, **cfg)
    assert all(t.is_meta for t in layer.state_dict().values())
    layer.to_empty(device="cpu")
    torch.manual_seed(12)
    layer.reset_parameters()
    torch.manual_seed(12)
    fresh = make(kind, dtype=dtype, adapter_dtype=adapter_dtype, **cfg)
    mine, theirs = layer.state_dict(), fresh.state_dict()
    assert list(mine) == list(theirs)
    for k in mine:
        assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
    assert any(torch.count_nonzero(t) for t in layer.adapter_parameters())
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == \
        set(layer.adapter_parameter_names)


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_builds_under_accelerate_init_empty_weights(kind):
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        layer = make(kind)
    assert all(p.is_meta for p in layer.parameters())


@pytest.mark.parametrize("alpha", [0, 0.0, -2.0, float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_alpha_must_be_positive_and_finite(kind, alpha):
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        make(kind, alpha=alpha)
    assert make(kind, alpha=0.5).scaling == 0.5 / 5      # a small positive alpha is fine


@pytest.mark.parametrize("kind", ["pera", "genlora"])
def test_from_linear_wraps_gpt2_conv1d(kind):
    """transformers' Conv1D (GPT-2) holds its weight as (in, out): the layer shares it as it is
    and computes what an adapted nn.Linear with the transposed weight computes."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(13)
    conv = pytorch_utils.Conv1D(53, 37)                   # nf = out, nx = in
    with torch.no_grad():
        conv.bias.normal_()
    cls = PeraLinear if kind == "pera" else GenLoraLinear
    layer = cls.from_linear(conv, r=4)
    assert (layer.in_features, layer.out_features) == (37, 53)
    assert layer.weight is conv.weight and layer.weight.shape == (37, 53)
    x = torch.randn(2, 5, 37, requires_grad=True)
    assert torch.equal(layer(x), conv(x))                 # a fresh adapter adds nothing
    randomize(layer)
    A, B = layer._factors()
    expected = ref.adapter_linear(x, conv.weight.t(), conv.bias, A, B, layer.scaling)
    y = layer(x)
    assert_verbose_allclose(y, expected, 1e-6, 1e-6, "Conv1D-based layer")
    y.square().sum().backward()
    assert all(p.grad is not None for p in layer.adapter_parameters())
    assert conv.weight.grad is None
    w0 = conv.weight.detach().clone()
    with torch.no_grad():
        layer.merge()
        assert_verbose_allclose(conv(x), expected, 1e-5, 1e-5, "merged Conv1D weight")
        assert_verbose_allclose(layer(x), expected, 1e-5, 1e-5, "merged layer")
        layer.unmerge()
    assert_verbose_allclose(conv.weight, w0, 1e-6, 1e-6, "unmerged Conv1D weight")
