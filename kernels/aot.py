"""Ahead-of-time compile of every mixed-attention kernel configuration, without a GPU.

``python -m croc.kernels.aot [--json]`` compiles each (arch, head dim, dtype, pass) the package
can launch (see :func:`croc.kernels.config.all_configs`) for its target (sm_80 or sm_90) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads the cubin with
the ``cuobjdump`` bundled with Triton: registers, local-memory bytes (spills) and whether HGMMA
(Hopper warpgroup tensor-core) instructions were emitted. It must run with TRITON_INTERPRET unset
(the kernels must be decorated for compilation, not interpretation).

Argument specialisation mimics a real launch of contiguous or SDPA-view tensors: pointers and
strides divisible by 16, sequence lengths and block counts unspecialised.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .config import all_configs, lookup
from .mixed_attention import kernel_launches

__all__ = ["CompileReport", "compile_all", "cuobjdump_path"]

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INT_POINTERS = {"KvStart", "KvEnd", "BlockList", "PartialCount", "TotalCount"}
_FP32_POINTERS = {"Lse", "Delta"}
_FLOAT_SCALARS = {"qk_scale", "sm_scale"}


@dataclass
class CompileReport:
    """Resource usage of one compiled kernel configuration."""

    arch: int
    head_dim: int
    dtype: str
    kernel: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int  # dynamic shared memory of one program
    hgmma: bool


def cuobjdump_path() -> str:
    """The cuobjdump shipped in Triton's NVIDIA backend."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _INT_POINTERS:
            signature[name] = "*i32"
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name[0].isupper():
            signature[name] = f"*{dtype}"
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*") or name.startswith("stride_") or name == "head_dim":
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _resource_usage(cubin: bytes) -> tuple[int, int, int, bool]:
    """(registers, stack bytes, local bytes, HGMMA present) of a cubin, read by cuobjdump.

    Register spills show up as a non-zero stack frame (STACK) or local memory (LOCAL)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [cuobjdump_path(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [cuobjdump_path(), "--dump-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    field = lambda key: int(re.search(rf"\b{key}:(\d+)", usage).group(1))  # noqa: E731
    return field("REG"), field("STACK"), field("LOCAL"), "HGMMA" in sass


def _compile_one(job: tuple) -> CompileReport:
    arch, head_dim, dtype, name, constexprs, launch = job
    fn = dict((n, f) for n, f, _, _ in kernel_launches(head_dim, lookup(arch, head_dim, dtype)))[name]
    signature, attrs = _signature(fn, _TRITON_DTYPE[dtype], constexprs)
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    regs, stack, local, hgmma = _resource_usage(compiled.asm["cubin"])
    tile = (launch.block_m, launch.block_n, launch.num_warps, launch.num_stages)
    shared = compiled.metadata.shared
    return CompileReport(arch, head_dim, _TRITON_DTYPE[dtype], name, *tile, regs, stack, local, shared, hgmma)


def compile_jobs() -> list[tuple]:
    """One job per distinct compiled kernel: (arch, head dim, dtype, name, constexprs, PassConfig)."""
    jobs, seen = [], set()
    for arch, head_dim, dtype, config in all_configs():
        for name, _, constexprs, launch in kernel_launches(head_dim, config):
            key = (arch, _TRITON_DTYPE[dtype], name, tuple(sorted(constexprs.items())), launch)
            if key not in seen:
                seen.add(key)
                jobs.append((arch, head_dim, dtype, name, constexprs, launch))
    return jobs


def compile_all(workers: int | None = None) -> list[CompileReport]:
    """Compile every distinct kernel of every configuration for its arch, in ``workers`` processes."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the AOT compile needs compiled, not interpreted, kernels")
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(_compile_one, compile_jobs()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args()
    reports = compile_all()
    if args.json:
        print(json.dumps([asdict(r) for r in reports]))
        return
    print("arch head_dim dtype kernel  BMxBN    warps stages  regs stack local shared hgmma")
    for r in reports:
        tile = f"{r.block_m}x{r.block_n}"
        print(
            f"sm_{r.arch} {r.head_dim:>8} {r.dtype:>5} {r.kernel:<7} {tile:<8} {r.num_warps:>5} "
            f"{r.num_stages:>6} {r.registers:>5} {r.stack_bytes:>5} {r.local_bytes:>5} {r.shared_bytes:>6} {r.hgmma!s:>5}"
        )


if __name__ == "__main__":
    main()
