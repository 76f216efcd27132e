"""The CUDA extension's host-side API that needs no GPU: the merge policy and the op schemas the
modules dispatch to. Runs wherever the extension is built (CI builds it without a GPU)."""

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


@pytest.mark.parametrize("name", ["pera_linear", "pera_linear_backward", "pera_linear_eager",
                                  "pera_linear_inference", "pera_expand", "genlora_linear",
                                  "genlora_linear_backward", "genlora_linear_eager",
                                  "genlora_linear_inference", "genlora_expand",
                                  "_adapter_gemm", "_gy_pass", "_gy_pass_takes"])
def test_op_is_registered(name):
    schema = getattr(torch.ops.polykern, name).default._schema
    assert schema.name == f"polykern::{name}"
