"""Builds molkernels._C: the C++ CPU kernels always; the CUDA kernels when torch is a CUDA build and
nvcc is found (a GPU is not needed to compile).

Environment overrides:
  MOLKERNELS_SKIP_CUDA=1   build without the CUDA kernels
  MOLKERNELS_FORCE_CUDA=1  fail instead of falling back when the CUDA kernels cannot be built
  MOLKERNELS_MARCH=...     -march for all CPU code (default: none, a portable build whose kernels pick their
                           AVX-512 / AVX2 + FMA / baseline variant at run time; e.g. native)
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default: the visible GPUs', else 9.0)
  MAX_JOBS                 parallel compile jobs
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    return os.environ.get(name, "") not in ("", "0", "false", "False")


def cuda_toolkit_root():
    """The toolkit root of the nvcc on PATH, also when that nvcc is a symlink or a wrapper script."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # nvcc reports the directory it really runs from; resolving links alone misses wrapper scripts.
    try:
        dryrun = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True,
                                timeout=60)
        match = re.search(r"^#\$ _HERE_=(.+)$", dryrun.stderr + dryrun.stdout, re.MULTILINE)
        if match:
            return os.path.dirname(match.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def nvidia_pip_include_dirs():
    """Headers (cuBLAS, cuSPARSE, ...) that torch includes, from torch's nvidia pip packages, for
    toolkits that lack them."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


toolkit = None if env_flag("MOLKERNELS_SKIP_CUDA") else cuda_toolkit_root()
if toolkit:
    os.environ["CUDA_HOME"] = toolkit  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = toolkit is not None and torch.version.cuda is not None
if env_flag("MOLKERNELS_FORCE_CUDA") and not with_cuda:
    sys.exit("MOLKERNELS_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
             + ("torch is not a CUDA build" if torch.version.cuda is None else "nvcc was not found"))
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    if torch.cuda.is_available():
        archs = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"

march = os.environ.get("MOLKERNELS_MARCH", "")
# -fno-math-errno: sqrt in a loop vectorises (no errno branch); nothing here reads errno.
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-DMOLKERNELS_VERSION=\"%s\"" % VERSION] + (
    ["-march=" + march] if march else [])
# The torch-free core (CMakeLists.txt's molkernels_core): each cpu_variant_<isa>.cpp / fl_variant_<isa>.cpp
# compiles the hot loops for one instruction set through its own #pragma GCC target, so every source
# takes the same flags here.
MOLKERNELS_CORE_SOURCES = [
    "csrc/core/cpu_isa.cpp", "csrc/core/cpu_kernels.cpp", "csrc/core/mol_cpu_kernels.cpp",
    "csrc/core/fl_cpu_kernels.cpp", "csrc/core/cpu_variant_baseline.cpp", "csrc/core/cpu_variant_avx2.cpp",
    "csrc/core/cpu_variant_avx512.cpp", "csrc/core/fl_variant_baseline.cpp", "csrc/core/fl_variant_avx2.cpp",
    "csrc/core/fl_variant_avx512.cpp"]
sources = ["csrc/module.cpp", "csrc/ops.cpp", "csrc/mol_ops.cpp", "csrc/fl_ops.cpp"] + MOLKERNELS_CORE_SOURCES
include_dirs = [os.path.join(ROOT, "csrc")]
extra_link_args = ["-fopenmp"]

if with_cuda:
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    cxx_flags += ["-DMOLKERNELS_WITH_CUDA", "-DMOLKERNELS_CUDA_ARCHS=\"%s\"" % archs]
    include_dirs += nvidia_pip_include_dirs()
    extension = CUDAExtension(
        "molkernels._C",
        sources + ["csrc/ops_cuda.cpp", "csrc/mol_ops_cuda.cpp", "csrc/core/cuda_kernels.cu",
                   "csrc/core/mol_cuda_kernels.cu", "csrc/fl_ops_cuda.cpp", "csrc/core/fl_cuda_kernels.cu"],
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
        extra_link_args=extra_link_args,
    )
else:
    extension = CppExtension("molkernels._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx_flags}, extra_link_args=extra_link_args)

print("molkernels: building %s CUDA kernels%s" % ("with" if with_cuda else "without",
                                                   " (toolkit %s, archs %s)" % (toolkit, os.environ.get("TORCH_CUDA_ARCH_LIST")) if with_cuda else ""))

setup(
    name="molkernels",
    version=VERSION,
    packages=find_packages(include=["molkernels", "molkernels.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
