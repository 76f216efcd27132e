"""The CUDA extension's host-side API that needs no GPU: the merge policy and the op schemas the
modules dispatch to. Runs wherever the extension is built (CI builds it without a GPU)."""

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
    with pytest.raises(RuntimeError, match="merge policy must be 0"):
        torch.ops.polykern.set_merge_policy(-1)
    assert ops.get_merge_policy() == "auto"


def test_keep_policy_roundtrip_and_errors():
    assert ops.get_keep_policy() == "auto"
    with ops.merge_policy("always", keep="never"):
        assert (ops.get_merge_policy(), ops.get_keep_policy()) == ("always", "never")
        with ops.merge_policy("never"):  # keep left as it is
            assert (ops.get_merge_policy(), ops.get_keep_policy()) == ("never", "never")
        assert (ops.get_merge_policy(), ops.get_keep_policy()) == ("always", "never")
    assert (ops.get_merge_policy(), ops.get_keep_policy()) == ("auto", "auto")
    with pytest.raises(ValueError, match="unknown keep policy 'often'"):
        ops.set_merge_policy("auto", keep="often")
    with pytest.raises(RuntimeError, match="keep policy must be 0"):
        torch.ops.polykern.set_keep_policy(3)
    assert (ops.get_merge_policy(), ops.get_keep_policy()) == ("auto", "auto")


def test_side_stream_mode_roundtrip_and_errors():
    old = torch.ops.polykern._set_side_stream(2)
    try:
        assert old in (0, 1)  # 0 only under POLYKERN_OVERLAP=0
        assert torch.ops.polykern._set_side_stream(0) == 2
        with pytest.raises(RuntimeError, match="side stream mode must be 0"):
            torch.ops.polykern._set_side_stream(3)
        assert torch.ops.polykern._set_side_stream(old) == 0
    finally:
        torch.ops.polykern._set_side_stream(old)


def test_op_graph_switch_roundtrip_and_errors():
    """The op graphs' switch and budget (csrc/adapter_core.cpp): values round-trip, bad ones are
    refused before anything changes, the statistics have their four fields."""
    old = ops.set_op_graphs(False)
    old_budget = torch.ops.polykern._set_op_graph_budget(256)
    try:
        assert ops.set_op_graphs(True, 512) is False
        assert torch.ops.polykern._set_op_graph_budget(512) == 512
        with pytest.raises(TypeError, match="enabled must be a bool"):
            ops.set_op_graphs(1, 64)
        with pytest.raises(ValueError, match="budget_mb must be a non-negative int"):
            ops.set_op_graphs(False, -1)
        assert torch.ops.polykern._set_op_graph_budget(512) == 512  # unchanged by the errors
        assert ops.set_op_graphs(True) is True
        with pytest.raises(RuntimeError, match="op graph mode must be 0"):
            torch.ops.polykern._set_op_graphs(2)
        with pytest.raises(RuntimeError, match="budget must be >= 0"):
            torch.ops.polykern._set_op_graph_budget(-5)
        assert set(ops.op_graph_stats()) == {"graphs", "bytes", "replays", "captures"}
        ops.clear_op_graphs()  # nothing captured on the CPU: no synchronisation needed
        assert ops.op_graph_stats()["graphs"] == 0
    finally:
        ops.set_op_graphs(old, old_budget)


@pytest.mark.parametrize("merge,keep,N,n,m,expected", [
    # n = m = 4096: the forward merges from N = 1.5 n = 6144, where the copy (m n) is already
    # under half of x and y together (2 m n <= N (n + m) from N = 4096)
    ("auto", "auto", 8192, 4096, 4096, True), ("auto", "auto", 6144, 4096, 4096, True),
    ("auto", "auto", 6143, 4096, 4096, False), ("auto", "auto", 100000, 4096, 4096, True),
    ("auto", "never", 8192, 4096, 4096, False),
    ("auto", "always", 6144, 4096, 4096, True), ("auto", "always", 6143, 4096, 4096, False),
    ("always", "auto", 4096, 4096, 4096, True), ("always", "auto", 4095, 4096, 4096, False),
    ("always", "auto", 64, 4096, 4096, False), ("always", "always", 64, 4096, 4096, True),
    ("never", "always", 8192, 4096, 4096, False), ("auto", "auto", 0, 4096, 4096, False),
    # a wide output, 4096 -> 14336 (the benchmark's out = 14336 row at N = 8192): the copy is
    # kept from 2 m n / (n + m) = 6371.6 rows; version 11's rule (N >= 2 m) did not keep it
    ("auto", "auto", 8192, 4096, 14336, True), ("auto", "auto", 6372, 4096, 14336, True),
    ("auto", "auto", 6371, 4096, 14336, False),
    # a wide input, 14336 -> 4096: the forward merges only from N = 1.5 n = 21504
    ("auto", "auto", 21504, 14336, 4096, True), ("auto", "auto", 21503, 14336, 4096, False),
    ("always", "auto", 6372, 14336, 4096, True), ("always", "auto", 6371, 14336, 4096, False)])
def test_keep_decision(merge, keep, N, n, m, expected):
    """The C++ keep decision (polykern::_keeps_merged, which adapter_forward and the fake kernels
    both use): the forward merges and the kept copy of the (m, n) merged weight is at most half
    the size of the layer's input and output together; that the forward holds the weight
    exactly then is checked on the GPU: tests/test_ops_cuda.py::test_kept_merged_weight."""
    with ops.merge_policy(merge, keep=keep):
        assert torch.ops.polykern._keeps_merged(N, n, m) is expected


@pytest.mark.parametrize("name", ["pera_linear", "pera_linear_backward", "pera_linear_eager",
                                  "pera_linear_inference", "pera_expand", "genlora_linear",
                                  "genlora_linear_backward", "genlora_linear_eager",
                                  "genlora_linear_inference", "genlora_expand",
                                  "_adapter_gemm", "_gy_pass", "_gy_pass_takes",
                                  "_set_fused_gemm", "_fused_gemm_fits", "_fused_gemm_on"])
def test_op_is_registered(name):
    schema = getattr(torch.ops.polykern, name).default._schema
    assert schema.name == f"polykern::{name}"


def test_fused_gemm_mode_and_errors():
    """The fused adapter GEMMs' switch (csrc/adapter_core.cpp): 0, 1 and 2 are its modes, the
    call returns the old one, anything else is refused by name; off, they serve no device, and
    no device that does not exist."""
    old = torch.ops.polykern._set_fused_gemm(0)
    try:
        assert torch.ops.polykern._set_fused_gemm(1) == 0
        with pytest.raises(RuntimeError, match=r"fused GEMM mode must be 0 \(off\), 1 \(auto\) "
                           r"or 2 \(wherever the tiles fit\), got 3"):
            torch.ops.polykern._set_fused_gemm(3)
        assert torch.ops.polykern._fused_gemm_on(torch.cuda.device_count()) is False
        assert torch.ops.polykern._fused_gemm_on(-1) is False
        torch.ops.polykern._set_fused_gemm(0)
        assert all(torch.ops.polykern._fused_gemm_on(d) is False
                   for d in range(torch.cuda.device_count()))
    finally:
        torch.ops.polykern._set_fused_gemm(old)


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
    old = torch.ops.polykern._set_fused_gemm(mode)
    try:
        assert torch.ops.polykern._fused_gemm_fits(N, n, m, R, dtype, bias_dtype) is expected
    finally:
        torch.ops.polykern._set_fused_gemm(old)


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
