"""polykern.testing on CUDA layers (the CUDA ops against the reference through the users' entry
points) and `python -m polykern selftest --quick` on the GPU. Skipped without a GPU and the
extension."""

import json

import pytest
import torch

import polykern
from polykern import ops, selftest
from polykern.testing import check_layer, gradcheck_layer, opcheck_layer, strided

pytestmark = pytest.mark.skipif(not polykern.cuda_available(),
                                reason="needs a CUDA GPU and the compiled extension")
DEV = "cuda"
IN, OUT = 259, 131
CASES = [("pera", {"terms": "full"}, 9), ("pera", {"terms": "square"}, 16),
         ("pera", {"terms": "cross"}, 5), ("genlora", {"num_rbf": 32, "latent_dim": 3}, 16)]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float16), (torch.bfloat16, torch.float32)]
LAYOUTS = {"2d": (37,), "strided": (37,), "3d": (5, 83)}  # 5 x 83 = 415 rows: the merged path


@pytest.mark.parametrize("method,cfg,r", CASES)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "/".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_check_layer_cuda(method, cfg, r, dtypes, layout, monkeypatch):
    layer = selftest.make_layer(method, cfg, r, IN, OUT, DEV, dtypes, seed=r)
    x = torch.randn(*LAYOUTS[layout], IN, device=DEV, dtype=dtypes[0])
    if layout == "strided":
        x = strided(x)
    calls = []  # the layer's path really is the CUDA ops (modules -> ops.*_linear)
    op = getattr(ops, f"{method}_linear")
    monkeypatch.setattr(ops, f"{method}_linear", lambda *a: calls.append(1) or op(*a))
    result = check_layer(layer, x, randomize=False)
    assert result.passed, "\n".join(f"{r}" for r in result.rows)
    assert len(calls) == 2  # the training forward and the no-grad one


@pytest.mark.parametrize("method,cfg", [("pera", {"terms": "full"}),
                                        ("genlora", {"num_rbf": 5, "latent_dim": 2})])
def test_check_layer_cuda_fresh_layer_and_own_values(method, cfg):
    """A user's layer as made (Delta W = 0): check_layer checks a randomised copy by default,
    and the layer's own values with randomize=False; the layer itself is not modified."""
    cls = polykern.PeraLinear if method == "pera" else polykern.GenLoraLinear
    layer = cls(IN, OUT, r=8, device=DEV, dtype=torch.bfloat16, **cfg)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 29, IN, device=DEV, dtype=torch.bfloat16)
    check_layer(layer, x).assert_passed()
    check_layer(layer, x, randomize=False).assert_passed()
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("method,cfg", selftest.GRADCHECK_CASES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_layer_cuda(method, cfg, dropout):
    layer = selftest.make_layer(method, cfg, 3, 6, 5, DEV, (torch.float32, torch.float32),
                                seed=1, dropout=dropout).train()
    assert gradcheck_layer(layer)


@pytest.mark.parametrize("method,cfg", [("pera", {"terms": "full"}),
                                        ("genlora", {"num_rbf": 5, "latent_dim": 2})])
def test_opcheck_layer_cuda(method, cfg):
    layer = selftest.make_layer(method, cfg, 4, 37, 53, DEV, (torch.float64, torch.float64),
                                seed=2)
    opcheck_layer(layer, torch.randn(2, 5, 37, device=DEV, dtype=torch.float64))


def test_selftest_quick_on_the_gpu(tmp_path, capsys):
    path = tmp_path / "selftest.json"
    rc = selftest.main(["--quick", "--json", str(path)])
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    env = report["environment"]
    print(out)  # shown with -rA / on failure: the per-check lines and the time
    assert rc == 0, "\n".join(line for line in out.splitlines() if line.startswith("FAIL"))
    assert env["path"] == "cuda-ops" and env["gpu"] == torch.cuda.get_device_name()
    assert env["capability"].startswith("sm_") and env["cuda"] == torch.version.cuda
    statuses = {c["kind"]: set() for c in report["checks"]}
    for c in report["checks"]:
        statuses[c["kind"]].add(c["status"])
    assert statuses == {"extension": {"PASS"}, "layer": {"PASS"}, "gradcheck": {"PASS"},
                        "opcheck": {"PASS"}, "train": {"PASS"}}
