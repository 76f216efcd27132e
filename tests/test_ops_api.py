"""The CUDA extension's host-side API that needs no GPU: the merge policy, the options, and the op
schemas the modules dispatch to. Runs wherever the extension is built (CI builds it without a GPU)."""

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
                                         ("fused_gy", (0, 1)), ("poison", (0, 1))])
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
                                  "_config"])
def test_op_is_registered(name):
    schema = getattr(torch.ops.polykern, name).default._schema
    assert schema.name == f"polykern::{name}"
