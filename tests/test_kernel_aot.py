"""Ahead-of-time compile of every kernel configuration for sm_80 and sm_90, on a machine without a GPU.

Runs ``python -m croc.kernels.aot --json`` in a subprocess with TRITON_INTERPRET removed (the
kernels must be decorated for compilation), then checks each compiled kernel with the cuobjdump
bundled with Triton: no register spills (zero stack frame and local memory), dynamic shared memory
within the architecture's limit, and HGMMA (Hopper tensor cores) on sm_90 wherever the tile allows
wgmma (a warpgroup M of at least 64 rows in the pass's first dot).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
config = pytest.importorskip("croc.kernels.config")
aot = pytest.importorskip("croc.kernels.aot")

# sm_90: 227 KiB per block; sm_80 table also serves sm_86/sm_89, which allow 99 KiB.
SHARED_LIMIT = {80: 99 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    if not os.path.exists(aot.cuobjdump_path()):
        pytest.skip("Triton's bundled cuobjdump is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "croc.kernels.aot", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.matrix_kernels
def test_every_configuration_compiles_for_both_archs(reports):
    compiled = {(r["arch"], r["dtype"], r["kernel"], r["head_dim"]) for r in reports}
    for arch, head_dim, dtype, _ in config.all_configs():
        name = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}[str(dtype)]
        for kernel in ("forward", "dkdv", "dq"):
            same_tile = [h for (a, d, k, h) in compiled if (a, d, k) == (arch, name, kernel)]
            assert same_tile, (arch, name, kernel)
            assert config.padded_head_dim(head_dim) in {config.padded_head_dim(h) for h in same_tile}


@pytest.mark.parametrize("arch", [80, 90])
def test_no_spills_and_shared_memory_fits(reports, arch):
    for r in (r for r in reports if r["arch"] == arch):
        label = f"sm_{arch} {r['dtype']} D={r['head_dim']} {r['kernel']} {r['block_m']}x{r['block_n']}"
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, f"{label} spills: {r}"
        assert r["shared_bytes"] <= SHARED_LIMIT[arch], (
            f"{label} needs {r['shared_bytes']} B of shared memory"
        )


def test_hopper_matmul_loops_use_hgmma(reports):
    for r in reports:
        if r["arch"] != 90:
            continue
        rows = r["block_n"] if r["kernel"] == "dkdv" else r["block_m"]  # M of the pass's first dot
        if rows >= 64:
            assert r["hgmma"], f"no HGMMA in sm_90 {r['dtype']} D={r['head_dim']} {r['kernel']}: {r}"
    half = [r for r in reports if r["arch"] == 90 and r["dtype"] != "fp32"]
    assert half and all(r["hgmma"] for r in half), "every fp16/bf16 matmul kernel on sm_90 must use HGMMA"
