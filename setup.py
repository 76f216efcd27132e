"""Build polykern: the Python package, plus the ``polykern._C`` CUDA extension whenever torch has
CUDA and nvcc is found (no GPU is needed at build time).

Environment:
  POLYKERN_SKIP_CUDA_BUILD=1   install the pure-Python package only (reference path).
  TORCH_CUDA_ARCH_LIST         target archs (default "8.0;9.0a").
  CUDA_HOME                    the toolkit (default /usr/local/cuda when it holds nvcc).
  MAX_JOBS                     parallel compile jobs (default: the number of cores).
"""

import glob
import os
import re
import shutil

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


def _sm90a_only(arch_list):
    """Whether the arch list builds Hopper's code as sm_90a alone ("9.0a", "9.0a+PTX"): the fused
    adapter GEMMs (csrc/lora_gemm.cu) need the arch-specific instructions (wgmma, setmaxnreg) and
    compile to a trap for any other target, and a device cannot tell an sm_90 cubin from an
    sm_90a one, so they are switched on (POLYKERN_SM90A) only when no plain 9.0 entry is built."""
    entries = [e for e in re.split(r"[;\s]+", arch_list.strip()) if e]
    return any(e.startswith("9.0a") for e in entries) and not any(
        e in ("9.0", "9.0+PTX") for e in entries)


def _extensions():
    if os.environ.get("POLYKERN_SKIP_CUDA_BUILD", "0") == "1":
        print("polykern: POLYKERN_SKIP_CUDA_BUILD=1, installing the pure-Python package")
        return [], {}
    import torch
    home = _cuda_home()
    if torch.version.cuda is None or home is None:
        print(f"polykern: torch.version.cuda={torch.version.cuda}, CUDA_HOME={home}: "
              "no CUDA build, installing the pure-Python package")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when imported; without it, it guesses /usr/local.
    os.environ["CUDA_HOME"] = home
    # A builder has no GPU, so torch cannot detect the arch: default the list.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
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
    if _sm90a_only(os.environ["TORCH_CUDA_ARCH_LIST"]):
        defines.append("-DPOLYKERN_SM90A")
    else:
        print("polykern: no sm_90a-only Hopper build in TORCH_CUDA_ARCH_LIST="
              f"{os.environ['TORCH_CUDA_ARCH_LIST']!r}: the fused adapter GEMMs stay off")
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
