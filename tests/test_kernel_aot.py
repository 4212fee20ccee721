"""Ahead-of-time compile of every kernel configuration for sm_80 and sm_90, on a machine without a GPU.

Runs ``python -m croc.kernels.aot --json`` in a subprocess with TRITON_INTERPRET removed (the
kernels must be decorated for compilation), then checks each compiled kernel with the cuobjdump
bundled with Triton: no register spills (zero stack frame and local memory), dynamic shared memory
within the architecture's limit, and HGMMA (Hopper tensor cores) on sm_90 wherever the tile allows
wgmma (a warpgroup M of at least 64 rows in the pass's first dot), for the range and the index-list
schedule alike; and the per-loop report (``--report``): the hot loops were found and read.
Marked ``matrix_kernels``: CI reruns it under the newest Triton too.
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

pytestmark = [pytest.mark.matrix_kernels, pytest.mark.slow]

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
@pytest.mark.parametrize("schedule", ["range", "index"])
def test_every_configuration_compiles_for_both_archs(reports, schedule):
    compiled = {
        (r["arch"], r["dtype"], r["kernel"], r["head_dim"]) for r in reports if r["schedule"] == schedule
    }
    for arch, head_dim, dtype, _ in config.all_configs():
        name = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}[str(dtype)]
        for kernel in ("forward", "dkdv", "dq"):
            same_tile = [h for (a, d, k, h) in compiled if (a, d, k) == (arch, name, kernel)]
            assert same_tile, (arch, name, kernel)
            assert config.padded_head_dim(head_dim) in {config.padded_head_dim(h) for h in same_tile}


def test_report_reads_every_hot_loop(reports):
    """Each kernel's tile loops were found in its SASS, named, and each runs its matmuls and exp2s."""
    for r in reports:
        expected = {"forward": 4, "dq": 3, "dkdv": 2}[r["kernel"]] if r["schedule"] == "range" else 2
        label = f"sm_{r['arch']} {r['dtype']} D={r['head_dim']} {r['kernel']} {r['schedule']}"
        assert len(r["loops"]) == expected, f"{label}: {[loop['name'] for loop in r['loops']]}"
        for loop in r["loops"]:
            assert not loop["name"].startswith("loop"), label
            assert loop["tensor_core"] > 0 and loop["exp2"] > 0, f"{label} {loop}"


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


def test_sass_loop_analysis_on_a_listing():
    """The parser on a hand-written listing: one outer loop around two inner ones."""
    line = "        /*{:04x}*/                   {} ;"
    body = [
        "MOV R1, R2", "DEPBAR.LE SB0, 0x2", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], R24",
        "MUFU.EX2 R5, R5", "LDGDEPBAR", "LDGDEPBAR", "@P0 BRA 0x10",
        "DEPBAR.LE SB0, 0x0", "HMMA.16816.F32 R4, R8, R12, R4", "LDGDEPBAR", "@P1 BRA 0x70",
        "@P2 BRA 0x0", "EXIT",
    ]  # fmt: skip
    sass = "\n".join(line.format(16 * i, text) for i, text in enumerate(body))
    first, second = aot.analyse_sass(sass, ("a", "b"))
    assert (first.name, first.instructions, first.tensor_core, first.exp2) == ("a", 6, 1, 1)
    assert (first.copy_groups, first.wait_groups, first.tiles_ahead) == (2, 2, 1.0)
    assert (second.name, second.instructions, second.copy_groups, second.tiles_ahead) == ("b", 4, 1, 0.0)
