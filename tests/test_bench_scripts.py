"""The GPU-only scripts on a machine without a GPU: they say what they need and exit non-zero,
never a traceback with exit 0 (and gpu_check.sh never rebuilds the package there)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def test_gpu_check_needs_a_gpu(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)}, timeout=60)
    assert r.returncode != 0
    assert "needs an NVIDIA GPU" in r.stderr
    assert not (tmp_path / "build.log").exists()  # stopped before building anything


def test_bench_e2e_needs_a_gpu():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_e2e.py"), "--layers", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "needs" in r.stderr and "Traceback" not in r.stderr
