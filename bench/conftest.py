"""pytest-benchmark set-up for bench/: every case skips, with the reason, where the CUDA
benchmarks cannot run, and each results file records the GPU, torch and CUDA it ran on."""
from __future__ import annotations

import datetime

import pytest

import timing  # bench/ is on sys.path: pytest inserts a test file's folder (no __init__.py)


def pytest_collection_modifyitems(config, items):
    reason = timing.gpu_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "bench" in item.nodeid.split("/")[0]:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(timing.environment())
    machine_info["date"] = datetime.date.today().isoformat()
