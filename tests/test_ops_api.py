"""The CUDA extension's host-side API that needs no GPU: the merge policy, the options, and the op
schemas the modules dispatch to. Runs wherever the extension is built (CI builds it without a GPU)."""

import os
import re
from pathlib import Path

import pytest
import torch

from polykern import ops

pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="needs the compiled extension")


def test_merge_policy_roundtrip_and_errors():
    assert ops.get_merge_policy() == "auto"
    with ops.merge_policy("never"):
        assert ops.get_merge_policy() == "never"
        with ops.merge_policy("always"):
            assert ops.get_merge_policy() == "always"
        assert ops.get_merge_policy() == "never"
    assert ops.get_merge_policy() == "auto"
    with pytest.raises(ValueError, match="unknown merge policy 'sometimes'"):
        ops.set_merge_policy("sometimes")
    assert ops.get_merge_policy() == "auto"


@pytest.mark.parametrize("name,values", [("merge", (0, 1, 2)), ("side_stream", (0, 1, 2)),
                                         ("fused_gemm", (0, 1, 2)), ("fused_gy", (0, 1)),
                                         ("gemm_tune", (0, 1)), ("poison", (0, 1))])
def test_config_roundtrip_and_errors(name, values):
    """polykern::_config (csrc/config.cpp), the one place that holds the ops' switches: each value
    round-trips and the call returns the old one; a value out of range and an unknown name are
    refused by name, with nothing changed."""
    old = torch.ops.polykern._config(name, -1)
    try:
        for v in values:
            torch.ops.polykern._config(name, v)
            assert torch.ops.polykern._config(name, -1) == v
        with pytest.raises(RuntimeError, match=f"option '{name}' takes .*, got {values[-1] + 1}"):
            torch.ops.polykern._config(name, values[-1] + 1)
        assert torch.ops.polykern._config(name, -1) == values[-1]
    finally:
        torch.ops.polykern._config(name, old)
    with pytest.raises(RuntimeError, match="unknown option 'merg': expected one of merge, "):
        torch.ops.polykern._config("merg", 1)


@pytest.mark.parametrize("name", ["pera_linear", "pera_linear_backward", "pera_linear_eager",
                                  "pera_linear_inference", "pera_expand", "genlora_linear",
                                  "genlora_linear_backward", "genlora_linear_eager",
                                  "genlora_linear_inference", "genlora_expand",
                                  "_adapter_gemm", "_gy_pass", "_gy_pass_takes",
                                  "_config", "_fused_gemm_fits", "_fused_gemm_on"])
def test_op_is_registered(name):
    schema = getattr(torch.ops.polykern, name).default._schema
    assert schema.name == f"polykern::{name}"


def test_fused_gemm_off_serves_no_device():
    """Off (option fused_gemm 0), the fused adapter GEMMs serve no device, and none that does not
    exist."""
    old = torch.ops.polykern._config("fused_gemm", 1)
    try:
        assert torch.ops.polykern._fused_gemm_on(torch.cuda.device_count()) is False
        assert torch.ops.polykern._fused_gemm_on(-1) is False
        torch.ops.polykern._config("fused_gemm", 0)
        assert all(torch.ops.polykern._fused_gemm_on(d) is False
                   for d in range(torch.cuda.device_count()))
    finally:
        torch.ops.polykern._config("fused_gemm", old)


BF, HALF = torch.bfloat16, torch.float16


@pytest.mark.parametrize("mode,N,n,m,R,dtype,bias_dtype,expected", [
    (1, 8192, 4096, 4096, 32, BF, BF, True),      # the main case: N n m = 2^37
    (1, 8192, 4096, 4096, 32, BF, None, True),
    (1, 8192, 4096, 14336, 32, BF, BF, True),
    (1, 4096, 4096, 4096, 32, BF, BF, False),     # below 2^37: the merged path (faster there)
    (2, 4096, 4096, 4096, 32, BF, BF, True),      # mode 2: wherever the tiles fit
    (2, 512, 256, 512, 32, BF, None, True),
    (2, 8192, 4096, 4096, 16, BF, BF, False),     # R must be 32
    (2, 8192, 4096, 4096, 32, HALF, HALF, False),  # bf16 only
    (2, 8192, 4096, 4096, 32, BF, torch.float32, False),  # a bias in another dtype
    (2, 8000, 4096, 4096, 32, BF, None, False),   # N % 128
    (2, 8192, 4000, 4096, 32, BF, None, False),   # n % 256
    (2, 8192, 4096, 4000, 32, BF, None, False),   # m % 256
    (2, 0, 4096, 4096, 32, BF, None, False),
    (0, 8192, 4096, 4096, 32, BF, BF, False)])
def test_fused_gemm_rule(mode, N, n, m, R, dtype, bias_dtype, expected):
    """The shape, dtype and mode rule of the fused adapter GEMMs (adapter_core.cpp's
    fused_gemm_fits, which the forward, the backward and the fake kernels all use)."""
    old = torch.ops.polykern._config("fused_gemm", mode)
    try:
        assert torch.ops.polykern._fused_gemm_fits(N, n, m, R, dtype, bias_dtype) is expected
    finally:
        torch.ops.polykern._config("fused_gemm", old)


def _setup_function(name):
    """A function of setup.py, without running setup() (the file's top level calls it)."""
    import ast
    path = Path(__file__).resolve().parent.parent / "setup.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = {"re": re, "os": os}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)
    return scope[name]


@pytest.mark.parametrize("arch_list,expected", [
    ("8.0;9.0a", True), ("9.0a", True), ("9.0a+PTX", True), ("8.0 9.0a", True),
    ("8.6;9.0a;10.0", True), ("9.0", False), ("8.0;9.0", False), ("9.0+PTX", False),
    ("8.0+PTX", False), ("9.0;9.0a", False), ("", False)])
def test_fused_gemm_build_gate(arch_list, expected):
    """setup.py defines POLYKERN_SM90A (the fused GEMMs' availability) only for an arch list with
    sm_90a and no plain sm_90: a plain sm_90 build compiles lora_gemm.cu's kernels to a trap and
    reports the same binary version 90 as an sm_90a one, so without the gate such a build on an
    H100 would launch the trap."""
    assert _setup_function("_sm90a_only")(arch_list) is expected
