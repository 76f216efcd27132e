"""The build's arch list and what an install reports about itself (CPU only): setup.py's default
TORCH_CUDA_ARCH_LIST, which binary a GPU runs (polykern._build), build_info() on real and faked
machines, and `python -m polykern info`."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import polykern
from polykern import _build, ops

ROOT = Path(__file__).resolve().parent.parent
NVCC_13_0 = {"7.5", "8.0", "8.6", "8.7", "8.8", "8.9", "9.0", "10.0", "11.0", "10.3", "12.0",
             "12.1"}
NVCC_12_6 = {"5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0"}
DEFAULT = "8.0;9.0;10.0;12.0+PTX"


def _setup_scope(*names):
    """setup.py's module constants and the named functions, without running setup()."""
    import subprocess as sp
    tree = ast.parse((ROOT / "setup.py").read_text())
    scope = {"re": re, "os": os, "subprocess": sp}
    body = [n for n in tree.body
            if (isinstance(n, ast.FunctionDef) and n.name in names)
            or (isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper()
                                                  and t.id != "HERE" for t in n.targets))]
    exec(compile(ast.Module(body=body, type_ignores=[]), "setup.py", "exec"), scope)
    return scope


@pytest.mark.parametrize("nvcc_archs,expected", [
    (NVCC_13_0, DEFAULT),            # CUDA 12.8 and later: Blackwell natively
    (NVCC_12_6, "8.0;9.0+PTX"),      # no sm_100/sm_120 in nvcc: compute_90 PTX serves them
    (None, "8.0;9.0+PTX"),           # nvcc could not be asked
])
def test_default_arch_list(nvcc_archs, expected):
    s = _setup_scope("_default_arch_list")
    assert s["_default_arch_list"](nvcc_archs) == expected


def test_nvcc_archs(tmp_path):
    """setup.py asks nvcc --list-gpu-arch (a fake nvcc here) and reads "compute_120" as 12.0."""
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\nprintf 'compute_75\\ncompute_80\\ncompute_90\\ncompute_100\\n"
                    "compute_120\\ncompute_121\\n'\n")
    nvcc.chmod(0o755)
    s = _setup_scope("_nvcc_archs", "_default_arch_list")
    assert s["_nvcc_archs"](str(tmp_path)) == {"7.5", "8.0", "9.0", "10.0", "12.0", "12.1"}
    assert s["_default_arch_list"](s["_nvcc_archs"](str(tmp_path))) == DEFAULT
    assert s["_nvcc_archs"](str(tmp_path / "missing")) is None


@pytest.mark.parametrize("arch_list,targets", [
    (DEFAULT, ["sm_80", "sm_90", "sm_100", "sm_120", "compute_120"]),
    ("8.0 9.0a+PTX", ["sm_80", "sm_90a", "compute_90a"]),
    ("8.0+PTX", ["sm_80", "compute_80"]),
    ("9.0;9.0", ["sm_90"]),
])
def test_arch_targets(arch_list, targets):
    assert _build.arch_targets(arch_list) == targets


def test_arch_targets_rejects_unknown():
    with pytest.raises(ValueError, match="Ampere"):
        _build.arch_targets("Ampere")


@pytest.mark.parametrize("arch_list,capability,image", [
    (DEFAULT, (8, 0), "sm_80"), (DEFAULT, (8, 6), "sm_80"), (DEFAULT, (8, 9), "sm_80"),
    (DEFAULT, (9, 0), "sm_90"), (DEFAULT, (10, 0), "sm_100"), (DEFAULT, (10, 3), "sm_100"),
    (DEFAULT, (12, 0), "sm_120"), (DEFAULT, (12, 1), "sm_120"),
    (DEFAULT, (13, 0), "compute_120"),   # a GPU to come: the driver compiles the PTX
    (DEFAULT, (11, 0), None),            # older than the PTX, no cubin of its major
    (DEFAULT, (7, 5), None),
    ("8.0;9.0a", (10, 0), None), ("8.0;9.0a", (12, 0), None),  # no Blackwell cubin, no PTX
    ("8.0;9.0a", (8, 9), "sm_80"),
    ("8.0;9.0+PTX", (12, 0), "compute_90"),  # nvcc < 12.8: Blackwell through the PTX
    ("8.0+PTX", (9, 0), "compute_80"), ("8.0+PTX", (12, 0), "compute_80"),
    ("8.0+PTX;9.0a", (9, 0), "sm_90a"),  # a cubin before PTX
    ("9.0a+PTX", (10, 0), None),         # arch-specific PTX: sm_90 only
    ("9.0a", (9, 1), None),
    ("8.6", (8, 0), None),               # a cubin never runs on an older minor
])
def test_image_for(arch_list, capability, image):
    assert _build.image_for(capability, _build.arch_targets(arch_list)) == image


@pytest.fixture
def fake_gpus(monkeypatch):
    """Fake CUDA devices, by capability, and a build record; has_kernel_image's caches reset."""
    def install(capabilities, arch_list, loaded=True):
        monkeypatch.setattr(_build, "_IMAGE_OK", {})
        monkeypatch.setattr(_build, "_WARNED", set())
        monkeypatch.setattr(_build, "build_record", lambda: {
            "arch_list": arch_list, "skipped": None, "torch": "2.14.1+cu130", "cuda": "13.0",
            "cublaslt": True})
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=0: capabilities[d])
        monkeypatch.setattr(torch.cuda, "get_device_name",
                            lambda d=0: f"Fake GPU {capabilities[d]}")
        monkeypatch.setattr(ops, "extension_loaded", lambda: loaded)
        monkeypatch.setattr(ops, "_KERNELS", loaded)
    return install


def test_no_kernel_image_warns_once(fake_gpus):
    fake_gpus([(12, 0), (12, 0), (8, 6)], "8.0;9.0a")
    with pytest.warns(RuntimeWarning) as rec:
        assert not _build.has_kernel_image(0)
        assert not _build.has_kernel_image(1)   # same arch: no second warning
        assert _build.has_kernel_image(2)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "sm_120" in msg and "sm_80 sm_90a" in msg and "reference" in msg
    assert 'TORCH_CUDA_ARCH_LIST="12.0" pip install --no-build-isolation -e .' in msg


def test_cuda_available_takes_reference_without_image(fake_gpus):
    """ops.cuda_available() (the modules' choice) is False on a GPU with no kernel image."""
    fake_gpus([(10, 0)], "8.0;9.0a")
    with pytest.warns(RuntimeWarning, match="sm_100"):
        assert ops.cuda_available() is False


def test_has_kernel_image_without_record(fake_gpus, monkeypatch):
    """A build that left no record (CMake, an older setup.py) is trusted: no warning."""
    fake_gpus([(12, 0)], None)
    monkeypatch.setattr(_build, "build_record", lambda: None)
    assert _build.has_kernel_image(0)


def _check_structure(info):
    assert set(info) == {"version", "torch", "torch_cuda", "extension", "gpu", "paths"}
    assert set(info["extension"]) == {"loaded", "error", "arch_list", "targets", "built_with",
                                      "cublaslt", "skipped"}
    assert set(info["paths"]) == {"cuda_ops", "cublaslt"}
    for p in info["paths"].values():
        assert set(p) == {"live", "why_not"}
        assert (p["why_not"] is None) == p["live"]
        assert p["live"] or p["why_not"]
    json.dumps(info)


def test_build_info_here():
    info = polykern.build_info()
    _check_structure(info)
    assert info["extension"]["loaded"] == ops.extension_loaded()
    if not torch.cuda.is_available():
        assert info["gpu"] is None
        assert not any(p["live"] for p in info["paths"].values())
        assert info["paths"]["cublaslt"]["why_not"] == "the CUDA ops are not live"


@pytest.mark.parametrize("capability", [(10, 0), (12, 0)])
def test_build_info_blackwell(fake_gpus, capability):
    """The default build on Blackwell: the CUDA ops and cuBLASLt live."""
    fake_gpus([capability], DEFAULT)
    info = polykern.build_info()
    _check_structure(info)
    arch = f"sm_{capability[0]}{capability[1]}"
    assert info["gpu"]["arch"] == arch and info["gpu"]["image"] == arch
    assert info["paths"]["cuda_ops"]["live"] and info["paths"]["cublaslt"]["live"]


def test_build_info_no_image(fake_gpus):
    fake_gpus([(12, 0)], "8.0;9.0a")
    info = polykern.build_info()
    _check_structure(info)
    assert info["gpu"]["image"] is None
    why = info["paths"]["cuda_ops"]["why_not"]
    assert "no kernel image for sm_120" in why and 'TORCH_CUDA_ARCH_LIST="12.0"' in why
    assert "no kernel image" in _build.format_info(info)


def test_build_info_skipped_build(fake_gpus, monkeypatch):
    fake_gpus([(9, 0)], None, loaded=False)
    monkeypatch.setattr(_build, "build_record", lambda: {
        "arch_list": None, "skipped": "POLYKERN_SKIP_CUDA_BUILD=1 at install"})
    info = polykern.build_info()
    _check_structure(info)
    assert info["paths"]["cuda_ops"]["why_not"] == (
        "no CUDA build: POLYKERN_SKIP_CUDA_BUILD=1 at install")


def _run_module(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "polykern", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_module_info():
    r = _run_module("info")
    assert r.returncode == 0, r.stderr
    for label in ("extension:", "GPU:", "CUDA ops:", "cuBLASLt:"):
        assert label in r.stdout
    r = _run_module("info", "--json")
    assert r.returncode == 0, r.stderr
    _check_structure(json.loads(r.stdout))


def test_module_usage_errors():
    assert _run_module().returncode == 2
    assert _run_module("info", "--bogus").returncode == 2


def test_module_selftest_dispatch():
    """`selftest` hands its arguments to polykern.selftest.main, or says it is missing."""
    if (ROOT / "polykern" / "selftest.py").exists():
        r = _run_module("selftest", "--help")   # selftest's own argparse answers
        assert r.returncode == 0 and "selftest" in r.stdout, r.stderr
    else:
        r = _run_module("selftest", "--quick")
        assert r.returncode == 2 and "no selftest" in r.stderr
