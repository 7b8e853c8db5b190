"""Build curvkern._C: CPU kernels always, CUDA kernels when asked for or possible.

Switches (environment variables):
  FORCE_CUDA=1            build the CUDA kernels even with no GPU visible (CI does this so that a
                          broken .cu file fails the build).
  CURVKERN_CPU_ONLY=1     never build the CUDA kernels.
  TORCH_CUDA_ARCH_LIST    CUDA architectures, e.g. "9.0" (default: the visible GPUs' when there
                          are any, else DEFAULT_CUDA_ARCHS below).
  CUDA_HOME               the CUDA toolkit (default: the first of $CUDA_PATH, /usr/local/cuda and
                          the folder above `nvcc` that holds include/cuda_runtime.h).
  DEBUG=1                 -O0 -g, and device-side assertions.
  CURVKERN_LINEINFO=1     nvcc -lineinfo: source lines in compute-sanitizer and profiler reports
                          (line tables only, the optimization is unchanged; gpu_check.sh sets it).
"""

import glob
import importlib.util
import os
import shutil

from setuptools import setup

# sm_90 (Hopper) is the architecture this project is tuned for; the rest cover the GPUs that
# CUDA 13 supports. "+PTX" on the newest lets the driver JIT-compile for later chips.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _cuda_home() -> str | None:
    """The CUDA toolkit folder: one that holds include/cuda_runtime.h.

    torch.utils.cpp_extension guesses the toolkit from the `nvcc` on PATH, which is wrong when that
    `nvcc` is a wrapper script outside the toolkit (the link step then cannot find -lcudart).
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")):
            return path
    return None


def _wheel_cuda_includes() -> list[str]:
    """CUDA library headers (cublas_v2.h, cusparse.h, ...) that torch's CUDA headers include.

    A pip-installed CUDA build of torch ships them in site-packages/nvidia/<pkg>/include rather
    than in the toolkit; a minimal toolkit lacks them.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    return dirs


def _extensions():
    cuda_home = _cuda_home()
    if cuda_home is not None:
        # Must precede the import of torch.utils.cpp_extension, which reads it once.
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = _env_flag("DEBUG")
    if _env_flag("CURVKERN_CPU_ONLY"):
        with_cuda = False
    elif _env_flag("FORCE_CUDA"):
        if cuda_home is None:
            raise RuntimeError(
                "FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the folder that "
                "holds bin/nvcc and include/cuda_runtime.h"
            )
        if torch.version.cuda is None:
            raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch; this one is CPU-only")
        with_cuda = True
    else:
        with_cuda = cuda_home is not None and torch.cuda.is_available()

    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS

    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -std or Py_LIMITED_API flag: torch.utils.cpp_extension adds what its headers need.
    # No contraction of a * b + c into one FMA where a build for an FMA-capable CPU would allow
    # it: the masked perturb kernels round h * m before adding it to x, as the twin does
    # (csrc/mask.h), and the CUDA kernels do with __fmul_rn.
    cxx = [*opt, "-ffp-contract=off"]
    if torch._C.has_openmp:
        # at::parallel_for is an inline template: without -fopenmp here it runs serially. The
        # OpenMP runtime itself is the one torch already loaded.
        cxx.append("-fopenmp")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(HERE, "csrc")]
    kwargs = {}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        cxx.append("-DCURVKERN_WITH_CUDA")
        nvcc = [*opt, "-DCURVKERN_WITH_CUDA"]
        if debug:
            nvcc += ["-G", "-DTORCH_USE_CUDA_DSA"]
        elif _env_flag("CURVKERN_LINEINFO"):
            nvcc.append("-lineinfo")
        # After the toolkit's own folder, so that its cuda_runtime.h wins.
        for inc in _wheel_cuda_includes():
            cxx.append(f"-idirafter{inc}")
            nvcc.append(f"-Xcompiler=-idirafter{inc}")
        ext_cls = CUDAExtension
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
    else:
        ext_cls = CppExtension
        kwargs["extra_compile_args"] = {"cxx": cxx}
    print(f"curvkern: building {'CPU + CUDA' if with_cuda else 'CPU-only'} kernels")
    return [
        ext_cls(
            "curvkern._C",
            sources,
            include_dirs=include_dirs,
            py_limited_api=True,
            **kwargs,
        )
    ]


def _main():
    ext_modules = _extensions()
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


if __name__ == "__main__":
    _main()
