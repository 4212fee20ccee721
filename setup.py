"""Build script for croc.

The package is ``croc`` (with ``croc.train`` and its DeepSpeed configs) plus the Triton kernels
shipped as ``croc.kernels``. The C++ assignment extension ``croc._C`` is built from ``csrc/*.cpp``
against the torch that is importable at build time, so build without isolation, next to the torch
you run croc with: ``pip install --no-build-isolation .``. Without torch at build time (pip's
default build isolation hides it) the build stops with that command, instead of building against
another torch. The CUDA sources ``csrc/*.cu`` are added only when torch is a CUDA build and
``nvcc`` is found. Nothing here probes for a GPU. ``croc._C`` records the torch version it was
built against; importing croc with another torch raises an ImportError that says how to rebuild.

Environment variables:
    CROC_SKIP_CUDA_BUILD=1   never build the CUDA part
    CROC_SKIP_EXT_BUILD=1    build no extension at all (croc then falls back to scipy); this is the
                             one build that needs no torch, so it also works with build isolation
    CROC_CUDA_ARCHS          semicolon-separated compute capabilities, default "8.0;9.0"
    MAX_JOBS                 parallel compile jobs (read by torch.utils.cpp_extension)
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Supported versions (the README's "Supported versions" table; CI tests both ends, see .ci/run).
TORCH_REQUIREMENT = "torch>=2.11"
TRITON_REQUIREMENT = "triton>=3.6"
TRANSFORMERS_REQUIREMENT = "transformers>=5.17"  # croc_mixed mask builder: q_length/q_offset sdpa_mask API
DEEPSPEED_REQUIREMENT = "deepspeed>=0.15"

NO_TORCH_AT_BUILD = """
croc: torch is not importable at build time. croc's C++ extension must be built against the torch
you will run it with, and pip's build isolation hides that torch. Install torch first, then build
without isolation:

    pip install "{torch}"
    pip install --no-build-isolation .          (or: pip install --no-build-isolation -e .)

To install without the extension (croc.linear_sum_assignment then falls back to scipy):

    CROC_SKIP_EXT_BUILD=1 pip install .
"""


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_toolkit_available() -> bool:
    if _flag("CROC_SKIP_CUDA_BUILD"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc"))


def _cxx_std() -> str:
    """torch >= 2.13 headers need C++20 (std::strong_ordering, requires); older ones build as C++17."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 13) else "-std=c++17"


def _extensions() -> tuple[list, dict]:
    """Return (ext_modules, cmdclass) for the assignment extension (nothing with CROC_SKIP_EXT_BUILD)."""
    if _flag("CROC_SKIP_EXT_BUILD"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        raise SystemExit(NO_TORCH_AT_BUILD.format(torch=TORCH_REQUIREMENT)) from None
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # The torch this extension is built against, checked by croc/ops/assignment.py at import.
    version_macro = [("CROC_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3", _cxx_std(), "-fopenmp"]
    link_flags = ["-fopenmp"]
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if cuda_sources and _cuda_toolkit_available():
        archs = os.environ.get("CROC_CUDA_ARCHS", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        ext = CUDAExtension(
            "croc._C",
            cpp_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("CROC_WITH_CUDA", "1"), *version_macro],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", _cxx_std(), "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "croc._C",
            cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=version_macro,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


ext_modules, cmdclass = _extensions()

setup(
    name="croc",
    version="0.1.0",
    description="Fast Croc/ViCToR cross-modal pretraining: mixed-mask flash attention and batched "
    "Hungarian assignment for LLaVA-style models",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # croc/kernels is a development symlink to kernels/ in some checkouts: the kernels are packaged
    # from kernels/ only, never twice.
    packages=[
        *find_packages(include=["croc", "croc.*"], exclude=["croc.kernels", "croc.kernels.*"]),
        "croc.kernels",
    ],
    package_dir={"croc": "croc", "croc.kernels": "kernels"},
    package_data={"croc.train": ["configs/*.json"]},
    install_requires=[TORCH_REQUIREMENT, "numpy", "scipy>=1.6"],
    extras_require={
        "triton": [TRITON_REQUIREMENT],
        "train": [
            TRANSFORMERS_REQUIREMENT,
            "accelerate>=1.0",
            "tokenizers",
            "pillow",
            "matplotlib",
            "tqdm",
        ],
        "deepspeed": [DEEPSPEED_REQUIREMENT],
        # numpy<2.4: triton 3.6's interpreter turns loop bounds into ints in a way numpy 2.4 rejects
        # (triton-lang/triton#9171, fixed after 3.6)
        "test": ["pytest", "hypothesis", "pytest-benchmark", "ruff", "numpy<2.4"],
        "bench": ["lapx", "matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["croc=croc.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
