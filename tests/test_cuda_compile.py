"""The CUDA sources compile for sm_80 and sm_90 on machines without a GPU (nvcc -c), so that a CUDA
error fails CI here. Skipped when nvcc is not installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
ARCHS = ("80", "90")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def _cuobjdump(nvcc: str) -> str | None:
    """cuobjdump from the CUDA toolkit, else the one triton bundles."""
    beside = Path(nvcc).parent / "cuobjdump"
    if beside.exists():
        return str(beside)
    try:
        import triton
    except ImportError:
        return shutil.which("cuobjdump")
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


def _compile(args: list[str], cwd: Path) -> None:
    """nvcc with args in cwd; fails the test with nvcc's output."""
    done = subprocess.run([NVCC, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def test_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    args = ["-c", "-std=c++17", "-O3", "--threads", "2", "-Werror", "all-warnings", *gencode]
    _compile([*args, f"-I{CSRC}", str(CSRC / "lsap_cuda.cu"), "-o", "kernel.o"], tmp_path)
    cuobjdump = _cuobjdump(NVCC)
    if cuobjdump is None:
        return
    usage = subprocess.run(
        [cuobjdump, "--dump-resource-usage", "kernel.o"], cwd=tmp_path, capture_output=True, text=True
    ).stdout
    assert {f"sm_{a}" for a in ARCHS} <= set(re.findall(r"arch = (sm_\d+)", usage)), usage
    kernels = re.findall(r"Function (\S*lsap_kernel\S*):\s*\n\s*(.*)", usage)
    assert len(kernels) == 2 * len(ARCHS), usage
    for name, resources in kernels:
        assert "LOCAL:0" in resources, f"{name} spills to local memory: {resources}"


def test_torch_glue_compiles_against_the_installed_torch():
    """lsap_cuda_ops.cpp (host code, torch API) as the CUDA build compiles it, syntax only."""
    from torch.utils.cpp_extension import CUDA_HOME, include_paths

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    homes = [CUDA_HOME, os.environ.get("CUDA_PATH"), "/usr/local/cuda", Path(NVCC).resolve().parent.parent]
    found = [
        Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()
    ]
    if not found:
        pytest.skip("the CUDA toolkit headers (cuda_runtime_api.h) are not found")
    cuda_include = found[0]
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"], cuda_include, CSRC]]
    args = ["-std=c++17", "-fsyntax-only", "-DCROC_WITH_CUDA=1", *includes, str(CSRC / "lsap_cuda_ops.cpp")]
    done = subprocess.run([compiler, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
