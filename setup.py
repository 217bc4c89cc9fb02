"""Builds lightning_hw._C: the C++ kernels always, the CUDA kernels when asked for.

CUDA is built when FORCE_CUDA=1, or when the installed torch has CUDA and nvcc
is found. FORCE_CUDA=1 without a usable toolkit is an error, never a silent
CPU-only build; FORCE_CUDA=0 builds the C++ kernels only.
"""

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _find_cuda_home():
    """The toolkit root that holds bin/nvcc.

    torch's own guess goes wrong when `nvcc` on the PATH is a wrapper script
    (it then takes /usr/local), so follow the real path of nvcc.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home)
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve())
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for candidate in candidates:
        if candidate.exists() and candidate.parent.name == "bin":
            home = candidate.parent.parent
            if (home / "include" / "cuda_runtime.h").exists():
                return home
    return None


def _nvidia_include_dirs():
    """Headers of the pip-installed CUDA libraries (cublas, cusparse, ...) that
    torch's headers include but a bare toolkit may lack."""
    dirs = []
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        if base.is_dir():
            dirs += sorted(str(p) for p in base.glob("*/include") if p.is_dir())
    return dirs


def _cublaslt_library(cuda_home):
    """The cuBLASLt shared library to link (linear_relu's GEMMs): the toolkit's,
    else the one of the pip-installed nvidia packages that torch itself loads."""
    dirs = [cuda_home / "lib64", cuda_home / "lib"]
    for entry in sys.path:
        dirs += sorted((Path(entry) / "nvidia").glob("*/lib"))
    for directory in dirs:
        found = sorted(directory.glob("libcublasLt.so*"), key=lambda p: len(p.name))
        if found:
            return str(found[0])
    return None


def _sources(pattern):
    # setuptools wants paths relative to setup.py.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(CSRC / pattern)))


def _build_config():
    import torch

    force = _env_flag("FORCE_CUDA")
    cuda_sources = _sources("cuda/*.cu")
    cuda_home = _find_cuda_home()
    torch_has_cuda = torch.version.cuda is not None
    if force:
        problems = []
        if not torch_has_cuda:
            problems.append(f"the installed torch {torch.__version__} is a CPU-only build")
        if cuda_home is None:
            problems.append("nvcc was not found (set CUDA_HOME or put nvcc on the PATH)")
        if not cuda_sources:
            problems.append("csrc/cuda/ has no .cu sources")
        if problems:
            sys.exit("FORCE_CUDA=1 but CUDA cannot be built: " + "; ".join(problems))
        with_cuda = True
    elif force is False:
        with_cuda = False
    else:
        with_cuda = bool(torch_has_cuda and cuda_home is not None and cuda_sources)
    return torch, with_cuda, cuda_home, cuda_sources


def _extensions():
    torch, with_cuda, cuda_home, cuda_sources = _build_config()
    import torch.utils.cpp_extension as cpp_extension

    cpu_sources = ["csrc/lightning_hw.cpp", "csrc/autocast.cpp"] + _sources("cpu/*.cpp")
    debug = _env_flag("DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # -fopenmp at compile and link: without it at::parallel_for runs on one thread.
    cxx_flags = opt + ["-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    extra_link_args = ["-fopenmp"]
    include_dirs = [str(CSRC)]

    print("lightning_hw build configuration:")
    print(f"  torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  C++ sources: {cpu_sources}")
    print(f"  C++ flags: {' '.join(cxx_flags)}")
    if not with_cuda:
        reason = (
            "FORCE_CUDA=0"
            if _env_flag("FORCE_CUDA") is False
            else "torch has no CUDA"
            if torch.version.cuda is None
            else "nvcc not found"
            if cuda_home is None
            else "no CUDA sources"
        )
        print(f"  CUDA kernels: not built ({reason})")
        return [
            cpp_extension.CppExtension(
                "lightning_hw._C",
                cpu_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=extra_link_args,
            )
        ]

    # torch reads CUDA_HOME at import of cpp_extension; point it at the real toolkit.
    os.environ["CUDA_HOME"] = str(cuda_home)
    cpp_extension.CUDA_HOME = str(cuda_home)
    # Without a GPU torch cannot guess the architectures: default to Ampere and Hopper.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    include_dirs += _nvidia_include_dirs()
    nvcc_flags = (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + [
        "--expt-relaxed-constexpr",
        "-Xcompiler=-Wall",
    ]
    cublaslt = _cublaslt_library(cuda_home)
    if cublaslt is None:
        sys.exit(f"CUDA build: libcublasLt.so not found under {cuda_home} or the nvidia pip packages")
    print(f"  CUDA kernels: built with {cuda_home}/bin/nvcc for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    print(f"  CUDA sources: {cuda_sources}")
    print(f"  nvcc flags: {' '.join(nvcc_flags)}")
    print(f"  cuBLASLt: {cublaslt}")
    return [
        cpp_extension.CUDAExtension(
            "lightning_hw._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("LIGHTNING_HW_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link_args + [cublaslt],
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
