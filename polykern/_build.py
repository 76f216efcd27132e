"""What this install can run: the archs ``polykern._C`` was compiled for (setup.py's record,
``polykern/_build_config.py``), the running GPU's arch, and which fast paths are live, with the
reason for each one that is not (``build_info``, ``python -m polykern info``).

``has_kernel_image`` is the check behind ``ops.cuda_available()``: a GPU the extension holds no code
for gets the reference path and one warning naming its arch and the rebuild command, instead of a
"no kernel image" launch failure.

Which binary a GPU of compute capability (major, minor) loads (CUDA's compatibility rules): a
cubin ``sm_XY`` runs on major X with minor >= Y; an arch-specific cubin ``sm_XYa`` on X.Y alone;
failing a cubin, PTX ``compute_XY`` is compiled by the driver for any X.Y or newer
(``compute_XYa`` for X.Y alone).
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import warnings
from typing import Optional

import torch

REBUILD = 'TORCH_CUDA_ARCH_LIST="{arch}" pip install --no-build-isolation -e .'


def build_record() -> Optional[dict]:
    """setup.py's record of the install (lower-case keys: arch_list, skipped, torch, cuda,
    cublaslt), or None when there is none (an extension built another way)."""
    try:
        mod = importlib.import_module("polykern._build_config")
    except ImportError:
        return None
    return {k.lower(): v for k, v in vars(mod).items() if k.isupper()}


def arch_targets(arch_list: str) -> list[str]:
    """The binaries a TORCH_CUDA_ARCH_LIST builds, as nvcc names them:
    "8.0;9.0;12.0+PTX" -> ["sm_80", "sm_90", "sm_120", "compute_120"] (";" or spaces between)."""
    targets = []
    for entry in (e for e in re.split(r"[;\s]+", arch_list.strip()) if e):
        m = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", entry)
        if m is None:
            raise ValueError(f"unknown CUDA arch {entry!r} in {arch_list!r}")
        num = f"{m[1]}{m[2]}{m[3]}"
        targets.append(f"sm_{num}")
        if m[4]:
            targets.append(f"compute_{num}")
    return list(dict.fromkeys(targets))


def arch_name(capability: tuple[int, int]) -> str:
    """(9, 0) -> "sm_90"."""
    return f"sm_{capability[0]}{capability[1]}"


def image_for(capability: tuple[int, int], targets: list[str]) -> Optional[str]:
    """The binary among `targets` that a GPU of `capability` loads: a cubin of its own major
    (the newest one it can run), else PTX the driver compiles (the newest that is not newer than
    the GPU); None when there is none (the launch would fail with "no kernel image")."""
    cubins, ptx = [], []
    for t in targets:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", t)
        if m is None:
            continue
        major, minor, suffix = int(m[2]), int(m[3]), m[4]
        if suffix == "a":  # arch-specific: that exact GPU only
            runs = (major, minor) == tuple(capability)
        elif m[1] == "sm":  # a cubin (or a family one, "f"): later minors of its major
            runs = major == capability[0] and minor <= capability[1]
        else:  # plain PTX: any GPU not older
            runs = (major, minor) <= tuple(capability)
        if runs:
            (cubins if m[1] == "sm" else ptx).append(((major, minor, suffix == "a"), t))
    for found in (cubins, ptx):
        if found:
            return max(found)[1]
    return None


def suggested_arch(capability: tuple[int, int]) -> str:
    """The TORCH_CUDA_ARCH_LIST entry to build for a GPU: (8, 6) -> "8.6"."""
    return f"{capability[0]}.{capability[1]}"


def _built_targets() -> Optional[list[str]]:
    rec = build_record()
    if not rec or not rec.get("arch_list"):
        return None
    try:
        return arch_targets(rec["arch_list"])
    except ValueError:  # a list torch took but this parser does not (named archs): unknown
        return None


_IMAGE_OK: dict[int, bool] = {}
_WARNED: set[tuple[int, int]] = set()


def _no_image_message(name: str, capability: tuple[int, int], targets: list[str]) -> str:
    return (f"polykern: {name} ({arch_name(capability)}) has no kernel image in polykern._C "
            f"(built for {' '.join(targets)}): the pure-PyTorch reference runs instead. "
            "For the CUDA kernels, rebuild from the source checkout: "
            + REBUILD.format(arch=suggested_arch(capability)))


@torch.compiler.assume_constant_result  # under torch.compile: evaluated once while tracing
def has_kernel_image(device: int) -> bool:
    """Whether polykern._C holds code that CUDA device `device` can run (True when the build
    left no record to tell). The first time a GPU arch without one is seen, one RuntimeWarning
    names it and the rebuild command. Cached per device."""
    ok = _IMAGE_OK.get(device)
    if ok is None:
        targets = _built_targets()
        capability = torch.cuda.get_device_capability(device)
        ok = targets is None or image_for(capability, targets) is not None
        if not ok and capability not in _WARNED:
            _WARNED.add(capability)
            warnings.warn(_no_image_message(torch.cuda.get_device_name(device), capability,
                                            targets), RuntimeWarning, stacklevel=2)
        _IMAGE_OK[device] = ok
    return ok


def _path(live: bool, why: Optional[str] = None) -> dict:
    return {"live": live, "why_not": None if live else why}


def build_info() -> dict:
    """What this install compiled and what runs here.

    Returns a dict: ``version``, ``torch``, ``torch_cuda``; ``extension`` (``loaded``, ``error``;
    ``arch_list`` and ``targets`` compiled, ``built_with`` torch and ``cublaslt``
    from the build record, ``skipped``: why no CUDA build was made); ``gpu`` (``name``, ``arch``,
    ``capability``, ``image``: the binary it runs, or None) or None without a GPU; ``paths``: for
    ``cuda_ops`` and ``cublaslt`` a dict ``live`` and ``why_not`` (None when
    live). Calling it initializes CUDA when a GPU is present.
    """
    from . import __version__, ops  # same layer; imported here since ops imports this module

    rec = build_record() or {}
    targets = _built_targets()
    ext = {"loaded": ops.extension_loaded(),
           "error": None if ops._LOAD_ERROR is None else str(ops._LOAD_ERROR),
           "arch_list": rec.get("arch_list"), "targets": targets,
           "built_with": rec.get("torch"), "cublaslt": rec.get("cublaslt"),
           "skipped": rec.get("skipped")}
    info = {"version": __version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "extension": ext, "gpu": None}

    gpu_ok = torch.cuda.is_available()
    if gpu_ok:
        dev = torch.cuda.current_device()
        cap = tuple(torch.cuda.get_device_capability(dev))
        info["gpu"] = {"name": torch.cuda.get_device_name(dev), "arch": arch_name(cap),
                       "capability": list(cap),
                       "image": None if targets is None else image_for(cap, targets)}

    # CUDA ops
    if not ext["loaded"]:
        if rec.get("skipped"):
            why = "no CUDA build: " + rec["skipped"]  # setup.py's reason
        elif not glob.glob(os.path.join(os.path.dirname(__file__), "_C.*")):
            why = "polykern._C is not built (install from the source checkout: README.md)"
        else:
            why = f"polykern._C did not import ({ext['error']})"
        ext["skipped"] = ext["skipped"] or why
        ops_path = _path(False, why)
    elif not ops._KERNELS:
        ops_path = _path(False, "polykern._C has no CUDA kernels registered")
    elif not gpu_ok:
        ops_path = _path(False, "no CUDA GPU visible (torch.cuda.is_available() is False)")
    elif targets is not None and info["gpu"]["image"] is None:
        ops_path = _path(False, f"no kernel image for {info['gpu']['arch']} (built for "
                         f"{' '.join(targets)}); rebuild: " + REBUILD.format(
                             arch=suggested_arch(cap)))
    else:
        ops_path = _path(True)
    paths = {"cuda_ops": ops_path}

    # cuBLASLt for the adapter's GEMMs and the merge (csrc/lt_gemm.cpp)
    if not ops_path["live"]:
        lt = _path(False, "the CUDA ops are not live")
    elif rec.get("cublaslt") is False:
        lt = _path(False, "no libcublasLt found at build time: the adapter GEMMs use ATen")
    else:
        lt = _path(True)
    paths["cublaslt"] = lt
    info["paths"] = paths
    return info


def format_info(info: dict) -> str:
    """build_info() as text (``python -m polykern info``)."""
    ext, gpu = info["extension"], info["gpu"]
    lines = [f"polykern {info['version']}, torch {info['torch']}"
             + (f" (CUDA {info['torch_cuda']})" if info["torch_cuda"] else " (CPU)")]
    if ext["loaded"]:
        built = " ".join(ext["targets"]) if ext["targets"] else "unknown archs (no build record)"
        lines.append(f"extension:   polykern._C loaded, built for {built}"
                     + (f" (TORCH_CUDA_ARCH_LIST={ext['arch_list']}, torch {ext['built_with']})"
                        if ext["arch_list"] else ""))
    else:
        lines.append("extension:   " + ("not built: " if ext["arch_list"] is None else
                                          "not loaded: ") + ext["skipped"])
    if gpu is None:
        lines.append("GPU:         none visible")
    else:
        image = gpu["image"] or ("no kernel image" if ext["targets"] else "unknown")
        lines.append(f"GPU:         {gpu['name']} ({gpu['arch']}), runs {image}")
    names = {"cuda_ops": "CUDA ops", "cublaslt": "cuBLASLt"}
    for key, p in info["paths"].items():
        lines.append(f"{names[key] + ':':<13}" + ("live" if p["live"]
                                                   else "not live: " + p["why_not"]))
    return "\n".join(lines)
