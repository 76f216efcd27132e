"""polykern.testing (check_layer, gradcheck_layer, the tolerance rule) and the selftest command's
CPU path: the checks pass on correct layers, fail on deliberately broken ones, and leave the
checked layer as it was."""

import json
import math

import pytest
import torch
import torch.nn as nn

import polykern
import polykern.modules
import utils
from polykern import GenLoraLinear, PeraLinear, selftest, testing
from polykern.testing import check_layer, gradcheck_layer, rel_err, strided

N_IN, N_OUT = 41, 23  # small odd sizes: the CPU tests stay quick


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward scales the incoming gradient: a broken backward."""

    @staticmethod
    def forward(ctx, y, factor):
        ctx.factor = factor
        return y.view_as(y)

    @staticmethod
    def backward(ctx, gy):
        return gy * ctx.factor, None


class BrokenBackwardPera(PeraLinear):
    """PERA with a right forward and every gradient 1 % too large (gradcheck's rtol is 0.1 %)."""

    def _adapted(self, x, W, bias, x_adapter):
        return _ScaleGrad.apply(super()._adapted(x, W, bias, x_adapter), 1.01)


class BrokenForwardGenLora(GenLoraLinear):
    """GenLoRA whose output is 10 % too large (a wrong scaling, say: bf16's bound is about 4 %)."""

    def _adapted(self, x, W, bias, x_adapter):
        return super()._adapted(x, W, bias, x_adapter) * 1.1


def layer_and_input(cls, dtype, layout, **cfg):
    torch.manual_seed(3)
    layer = cls(N_IN, N_OUT, r=5, dtype=dtype, **cfg)
    x = torch.randn(3, 7, N_IN, dtype=dtype) if layout == "3d" else torch.randn(9, N_IN,
                                                                                dtype=dtype)
    return layer, (strided(x) if layout == "strided" else x)


def test_helpers_have_one_home():
    assert utils.rel_err is testing.rel_err
    assert utils.assert_within_ref_error is testing.assert_within_ref_error
    a = torch.randn(5, 4)
    assert rel_err(a, a) == 0
    b = a.clone()
    b[1, 2] = float("nan")
    assert rel_err(b, a) == math.inf
    assert rel_err(b, b) == 0  # NaN where the reference has NaN too
    assert not strided(a).is_contiguous() and torch.equal(strided(a), a)


@pytest.mark.parametrize("cls,cfg", [(PeraLinear, {"terms": "full"}),
                                     (PeraLinear, {"terms": "cross"}),
                                     (GenLoraLinear, {"num_rbf": 6, "latent_dim": 2})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["3d", "strided"])
def test_check_layer_passes_on_the_package_layers(cls, cfg, dtype, layout):
    layer, x = layer_and_input(cls, dtype, layout, **cfg)
    result = check_layer(layer, x)
    assert result.passed, result.summary()
    assert result.assert_passed() is result
    names = [r["name"] for r in result.rows]
    assert names == ["y", "x"] + list(layer.adapter_parameter_names) + ["y (no grad)"]
    for r in result.rows:  # a real comparison: the reference's own error is not zero
        assert 0 < r["ref_err"] and r["err"] <= r["bound"], r


def test_check_layer_fp32_adapters_and_frozen_parameter():
    layer = PeraLinear(N_IN, N_OUT, r=4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    layer.pera_h.requires_grad_(False)
    result = check_layer(layer, torch.randn(2, 9, N_IN, dtype=torch.bfloat16))
    assert result.passed, result.summary()
    assert [r["name"] for r in result.rows] == ["y", "x", "lora_A", "lora_B", "y (no grad)"]


def test_check_layer_leaves_the_layer_alone():
    torch.manual_seed(4)
    layer = PeraLinear(N_IN, N_OUT, r=4, dropout=0.2).train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(6, N_IN)
    rng = torch.get_rng_state()
    check_layer(layer, x).assert_passed()
    check_layer(layer, x, randomize=False).assert_passed()
    assert layer.training and all(p.grad is None for p in layer.parameters())
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_check_layer_fails_on_a_broken_backward():
    layer, x = layer_and_input(BrokenBackwardPera, torch.float32, "3d")
    result = check_layer(layer, x)
    assert not result.passed and not result
    failed = {r["name"] for r in result.failures()}
    assert failed == {"x", "lora_A", "lora_B", "pera_h"}  # y itself is right
    with pytest.raises(AssertionError, match=r"outside the reference's error\n  x: error"):
        result.assert_passed()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_layer_fails_on_a_broken_forward(dtype):
    layer, x = layer_and_input(BrokenForwardGenLora, dtype, "strided")
    result = check_layer(layer, x)
    assert {"y", "y (no grad)"} <= {r["name"] for r in result.failures()}
    with pytest.raises(AssertionError, match="BrokenForwardGenLora"):
        result.assert_passed()


def test_check_layer_flags_non_finite_output():
    class Unwritten(PeraLinear):  # an output element the "kernel" never wrote
        def _adapted(self, x, W, bias, x_adapter):
            y = super()._adapted(x, W, bias, x_adapter)
            return torch.where(torch.arange(y.shape[-1]) == 3, float("nan"), y)
    layer, x = layer_and_input(Unwritten, torch.float32, "3d")
    rows = {r["name"]: r for r in check_layer(layer, x).rows}
    for name in ("y", "y (no grad)"):
        assert not rows[name]["passed"] and rows[name]["problem"].startswith("non-finite")


def test_check_layer_rejects_what_it_cannot_check():
    with pytest.raises(TypeError, match="polykern adapter layer"):
        check_layer(nn.Linear(4, 3), torch.randn(2, 4))
    layer = PeraLinear(N_IN, N_OUT, r=2)
    layer.merge()
    with pytest.raises(ValueError, match="unmerged"):
        check_layer(layer, torch.randn(2, N_IN))


@pytest.mark.parametrize("cls,cfg", [(PeraLinear, {"terms": "square"}),
                                     (GenLoraLinear, {"num_rbf": 5, "latent_dim": 2})])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_layer(cls, cfg, dropout):
    layer = cls(6, 5, r=3, dropout=dropout, **cfg).train()
    assert gradcheck_layer(layer) is True
    assert layer.weight.dtype == torch.float32  # it ran on a float64 copy


def test_gradcheck_layer_fails_on_a_broken_backward():
    layer = BrokenBackwardPera(6, 5, r=3)
    assert gradcheck_layer(layer, raise_exception=False) is False
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        gradcheck_layer(layer)


def test_gradcheck_layer_fast_mode_on_a_wide_layer():
    layer = GenLoraLinear(300, 200, r=8, num_rbf=16)
    assert gradcheck_layer(layer, torch.randn(3, 300)) is True  # over 1024 elements: fast mode


def test_selftest_cpu_quick_json(tmp_path, capsys):
    path = tmp_path / "selftest.json"
    rc = selftest.main(["--quick", "--dtypes", "bfloat16/float32", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    if not torch.cuda.is_available():
        assert "no GPU found" in out and "CUDA ops are NOT checked" in out
    report = json.loads(path.read_text())
    env = report["environment"]
    assert env["polykern"] == polykern.__version__ and env["torch"] == torch.__version__
    assert {"gpu", "driver", "cuda", "capability"} <= set(env)
    assert report["summary"]["failed"] == 0 and report["summary"]["passed"] > 0
    kinds = {c["kind"] for c in report["checks"]}
    assert {"layer", "gradcheck", "opcheck", "train"} <= kinds
    layer_checks = [c for c in report["checks"] if c["kind"] == "layer"]
    assert {c["name"].split()[-2] for c in layer_checks} == {"2d", "strided", "3d"}
    assert len(out.strip().splitlines()) == len(report["checks"]) + 3  # header 2, summary 1
    if env["path"] == "reference":
        assert all(c["status"] == "SKIP" for c in report["checks"] if c["kind"] == "opcheck")


def test_selftest_exits_nonzero_on_a_failure(monkeypatch, capsys):
    """A wrong PERA forward (0.1 % too large) on whatever path serves it: FAIL lines, status 1."""
    right = polykern.modules.pera_forward
    monkeypatch.setattr(polykern.modules, "pera_forward", lambda *a: right(*a) * 1.001)
    monkeypatch.setattr(selftest, "QUICK_CASES", selftest.QUICK_CASES[:1])
    assert selftest.main(["--quick", "--dtypes", "float32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL layer     pera terms=full r=4 float32 3d" in out
    assert "\nFAILED: " in out


def test_selftest_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        selftest.main(["--dtypes", "float8"])
    assert "unknown dtype 'float8'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert selftest.main(["--device", "cuda"]) == 2
        assert "finds no GPU" in capsys.readouterr().err
