"""Build polykern: the Python package, plus the ``polykern._C`` CUDA extension whenever torch has
CUDA and nvcc is found (no GPU is needed at build time).

A CPU torch (torch.version.cuda is None), or no nvcc, installs the pure-Python package: the
reference path, which needs neither the CUDA torch nor a toolkit. Either way setup.py writes
polykern/_build_config.py, the record that polykern.build_info() reads.

Environment:
  POLYKERN_SKIP_CUDA_BUILD=1   install the pure-Python package only (reference path); torch is
                               not imported, so this works under pip's build isolation.
  TORCH_CUDA_ARCH_LIST         target archs (default: _default_arch_list, "8.0;9.0;10.0;12.0+PTX"
                               with nvcc >= 12.8).
  CUDA_HOME                    the toolkit (default /usr/local/cuda when it holds nvcc).
  MAX_JOBS                     parallel compile jobs (default: the number of cores).
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


# The default targets, oldest first. sm_80: A100, and RTX 30/40 (sm_86, sm_89) run its cubin (a
# cubin runs on its major's later minors). sm_90: H100/H200. sm_100: B200/GB200 (B300's sm_103
# runs it). sm_120: RTX 50, RTX PRO 6000 (DGX Spark's sm_121 runs it). Each where nvcc knows it
# (10.0 and 12.0 from CUDA 12.8); PTX of the newest, which the driver compiles for GPUs to come.
_DEFAULT_ARCHS = ("8.0", "9.0", "10.0", "12.0")


def _nvcc_archs(home):
    """The virtual archs nvcc in `home` can compile ("8.0", "9.0", "10.0", ...), from
    `nvcc --list-gpu-arch` (CUDA >= 11.0); None if it cannot be asked."""
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--list-gpu-arch"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    nums = re.findall(r"compute_(\d+)", out)
    return {f"{n[:-1]}.{n[-1]}" for n in nums} or None


def _default_arch_list(nvcc_archs):
    """TORCH_CUDA_ARCH_LIST's default: the _DEFAULT_ARCHS that nvcc knows (all but 8.0 and 9.0
    dropped when it cannot be asked), with +PTX on the newest."""
    known = nvcc_archs if nvcc_archs is not None else {"8.0", "9.0"}
    archs = [a for a in _DEFAULT_ARCHS if a in known]
    archs[-1] += "+PTX"
    return ";".join(archs)


def _write_build_config(**record):
    """polykern/_build_config.py (not in git): what this build compiled, for build_info()."""
    lines = ["# Written by setup.py when polykern was built; read by polykern.build_info()."]
    lines += [f"{k.upper()} = {v!r}" for k, v in record.items()]
    with open(os.path.join(HERE, "polykern", "_build_config.py"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _extensions():
    if os.environ.get("POLYKERN_SKIP_CUDA_BUILD", "0") == "1":
        print("polykern: POLYKERN_SKIP_CUDA_BUILD=1, installing the pure-Python package")
        _write_build_config(arch_list=None, skipped="POLYKERN_SKIP_CUDA_BUILD=1 at install")
        return [], {}
    try:
        import torch
    except ImportError:
        raise SystemExit(
            "polykern: setup.py needs torch installed to choose between the CUDA build and pure "
            "Python: install torch first, then `pip install --no-build-isolation -e .` (README.md); "
            "or `POLYKERN_SKIP_CUDA_BUILD=1 pip install -e .` for the pure-Python package") from None
    home = _cuda_home()
    if torch.version.cuda is None or home is None:
        why = (f"torch {torch.__version__} has no CUDA" if torch.version.cuda is None
               else "no CUDA toolkit (nvcc) found at install (set CUDA_HOME)")
        print(f"polykern: {why}: installing the pure-Python package")
        _write_build_config(arch_list=None, skipped=why)
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when imported; without it, it guesses /usr/local.
    os.environ["CUDA_HOME"] = home
    # A builder has no GPU, so torch cannot detect the arch: default the list.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list(_nvcc_archs(home)))
    print(f"polykern: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # ATen's CUDA headers include cuBLAS/cuSPARSE headers that a bare toolkit may lack; torch's
    # wheel ships them under site-packages/nvidia/cu*/include.
    nvidia_root = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    includes = [os.path.join(HERE, "csrc")]
    includes += sorted(glob.glob(os.path.join(nvidia_root, "cu*", "include")))
    sources = [os.path.relpath(p, HERE) for p in
               sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(HERE, "csrc", "*.cu")))]
    # cuBLASLt, for the merge GEMM with separate C and D (adapter_core.cpp): linked against the
    # copy torch itself loads (the pip wheel's nvidia/cu*/lib, else the toolkit's); without one
    # the merge falls back to at::addmm.
    lt = (sorted(glob.glob(os.path.join(nvidia_root, "cu*", "lib", "libcublasLt.so*")))
          + sorted(glob.glob(os.path.join(home, "lib64", "libcublasLt.so*"))))
    defines, link_args, lib_dirs = [], [], []
    if lt:
        defines = ["-DPOLYKERN_HAVE_CUBLASLT"]
        lib_dirs = [os.path.dirname(lt[0])]
        # torch has loaded this soname by the time polykern._C loads; the rpath is a fallback
        link_args = [f"-l:{os.path.basename(lt[0])}", f"-Wl,-rpath,{lib_dirs[0]}"]
    else:
        print("polykern: no libcublasLt found; the merge GEMM uses at::addmm")
    _write_build_config(arch_list=os.environ["TORCH_CUDA_ARCH_LIST"], skipped=None,
                        torch=torch.__version__, cuda=torch.version.cuda, cublaslt=bool(lt))
    ext = CUDAExtension(
        name="polykern._C",
        sources=sources,
        include_dirs=includes,
        library_dirs=lib_dirs,
        extra_link_args=link_args,
        extra_compile_args={
            "cxx": ["-O3", "-DNDEBUG"] + defines,
            "nvcc": ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
                     "-lineinfo"] + defines,
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

# Name, version, dependencies and packages live in pyproject.toml.
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
