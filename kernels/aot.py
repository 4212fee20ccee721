"""Ahead-of-time compile of every mixed-attention kernel configuration, without a GPU.

``python -m croc.kernels.aot [--report] [--json] [--csv PATH]`` compiles each (arch, head dim,
dtype, pass, schedule) the package can launch (see :func:`croc.kernels.config.all_configs`) for its
target (sm_80 or sm_90) with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
and reads the cubin with the ``cuobjdump`` bundled with Triton: registers, stack and local-memory
bytes (spills), shared memory, whether HGMMA (Hopper warpgroup tensor-core) instructions were
emitted, and, for every innermost loop of the SASS (the hot tile loops), its instruction count,
tensor-core instructions, ``MUFU.EX2`` count and how far ahead its asynchronous copies are when it
waits (see :class:`LoopStats`). It must run with TRITON_INTERPRET unset (the kernels must be
decorated for compilation, not interpretation).

Argument specialisation mimics a real launch of contiguous or SDPA-view tensors: pointers and
strides divisible by 16, sequence lengths and block counts unspecialised.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .config import all_configs, lookup
from .mixed_attention import descriptor_blocks, kernel_launches

__all__ = ["CompileReport", "LoopStats", "analyse_sass", "compile_all", "cuobjdump_path", "iter_compile"]

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INT_POINTERS = {"KvStart", "KvEnd", "Schedule"}
_FP32_POINTERS = {"Lse", "Delta"}
_FLOAT_SCALARS = {"qk_scale", "sm_scale"}

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")
_WAIT = re.compile(r"^DEPBAR\.LE\s+SB0,\s*0x([0-9a-f]+)")
_TENSOR_CORE = re.compile(r"^(?:@!?P\w+\s+)?(HGMMA|HMMA)\b")
_TMA_COPY = re.compile(r"^(?:@!?U?P\w+\s+)?UTMALDG\b")


@dataclass
class LoopStats:
    """One innermost loop of a kernel's SASS (a tile loop).

    ``instructions``: SASS instructions in one iteration (the loop body, one per tile);
    ``tensor_core``: HGMMA/HMMA instructions in it; ``exp2``: MUFU.EX2 in it;
    ``copy_groups``: cp.async commit groups (LDGDEPBAR) issued per iteration; ``wait_groups``: the
    smallest N of the ``DEPBAR.LE SB0, N`` waits in it (the copy groups still in flight when it
    waits; -1 when it never waits on copies); ``tma_copies``: TMA tile copies (UTMALDG) issued per
    iteration; ``tiles_ahead``: the tiles whose copies are still in flight when the loop waits for
    one: ``wait_groups / copy_groups`` for cp.async copies, and for TMA copies (which a loop waits
    for on an mbarrier) the tiles its prologue issues before the loop, less the one awaited first
    (the smaller of the two when a loop has both; 0 when it issues no async copies)."""

    name: str
    instructions: int
    tensor_core: int
    exp2: int
    copy_groups: int
    wait_groups: int
    tma_copies: int
    tiles_ahead: float


@dataclass
class CompileReport:
    """Resource usage of one compiled kernel configuration."""

    arch: int
    head_dim: int
    dtype: str
    kernel: str
    schedule: str
    tma: bool  # key/value tiles through tensor descriptors (sm_90 forward; else pointer loads)
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int  # dynamic shared memory of one program
    hgmma: bool
    loops: list[LoopStats] = field(default_factory=list)


def cuobjdump_path() -> str:
    """The cuobjdump shipped in Triton's NVIDIA backend."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _signature(fn, dtype: str, constexprs: dict, descriptors: dict) -> tuple[dict, dict]:
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in descriptors:
            signature[name] = f"tensordesc<{dtype}{descriptors[name]}>"
            continue
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


def analyse_sass(sass: str, loop_names: tuple[str, ...] = ()) -> list[LoopStats]:
    """The innermost loops of one kernel's SASS listing (``cuobjdump --dump-sass``), in address order.

    A loop is a backward branch; its body is every instruction from the branch target to the
    branch. Loops that contain another loop are left out, and so are a branch from code placed
    out of line back into a loop body and the few-instruction retry loops of mbarrier waits. ``loop_names`` names them in order when
    the count matches (the kernel's tile loops in source order), else they are ``loop0``, ...
    """
    code = [(int(a, 16), text) for a, text in _SASS_LINE.findall(sass)]
    spans = []
    for address, text in code:
        match = _BRANCH.match(text)
        if match and match.group(1) is not None and int(match.group(1), 16) < address:
            spans.append((int(match.group(1), 16), address))
    # a branch from out-of-line code (a cold path, an mbarrier retry) back into a loop body is no loop
    spans = [s for s in spans if not any(o[0] < s[0] <= o[1] < s[1] for o in spans)]
    innermost = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    body_of = lambda span: [text for address, text in code if span[0] <= address <= span[1]]  # noqa: E731
    # an mbarrier wait that does not succeed at once retries in a tiny loop out of line
    innermost = sorted(
        s for s in innermost if not (len(body_of(s)) <= 4 and any("TRYWAIT" in t for t in body_of(s)))
    )
    names = loop_names if len(loop_names) == len(innermost) else [f"loop{i}" for i in range(len(innermost))]
    loops, previous_end = [], -1
    for name, (lo, hi) in zip(names, innermost):
        body = body_of((lo, hi))
        prologue = [text for address, text in code if previous_end < address < lo]
        previous_end = hi
        waits = [int(m.group(1), 16) for m in map(_WAIT.match, body) if m]
        groups = sum(text.startswith("LDGDEPBAR") for text in body)
        tma = sum(bool(_TMA_COPY.match(text)) for text in body)
        wait = min(waits) if waits else -1
        ahead = [round(max(wait, 0) / groups, 2)] if groups else []
        if tma:
            ahead.append(round(sum(bool(_TMA_COPY.match(t)) for t in prologue) / tma - 1, 2))
        loops.append(
            LoopStats(
                name,
                len(body),
                sum(bool(_TENSOR_CORE.match(t)) for t in body),
                sum("MUFU.EX2" in t for t in body),
                groups,
                wait,
                tma,
                max(min(ahead), 0.0) if ahead else 0.0,
            )
        )
    return loops


def _cuobjdump(cubin: bytes) -> tuple[str, str]:
    """(resource usage, SASS) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        outputs = [
            subprocess.run(
                [cuobjdump_path(), flag, f.name], capture_output=True, text=True, check=True
            ).stdout
            for flag in ("--dump-resource-usage", "--dump-sass")
        ]
    return outputs[0], outputs[1]


def _compile_one(job: tuple) -> CompileReport:
    arch, head_dim, dtype, name, schedule, constexprs, launch, loop_names = job
    launches = kernel_launches(head_dim, lookup(arch, head_dim, dtype), schedule, bool(constexprs.get("TMA")))
    fn = {n: f for n, f, _, _, _ in launches}[name]
    signature, attrs = _signature(fn, _TRITON_DTYPE[dtype], constexprs, descriptor_blocks(name, constexprs))
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    usage, sass = _cuobjdump(compiled.asm["cubin"])
    field_of = lambda key: int(re.search(rf"\b{key}:(\d+)", usage).group(1))  # noqa: E731
    tile = (launch.block_m, launch.block_n, launch.num_warps, launch.num_stages)
    return CompileReport(
        arch, head_dim, _TRITON_DTYPE[dtype], name, schedule, bool(constexprs.get("TMA")), *tile,
        field_of("REG"), field_of("STACK"), field_of("LOCAL"), compiled.metadata.shared,
        "HGMMA" in sass, analyse_sass(sass, loop_names),
    )  # fmt: skip


def compile_jobs(schedules: tuple[str, ...] = ("range", "index")) -> list[tuple]:
    """One job per distinct compiled kernel:
    (arch, head dim, dtype, name, schedule, constexprs, PassConfig, loop names)."""
    jobs, seen = [], set()
    for arch, head_dim, dtype, config in all_configs():
        for schedule, tma in ((s, t) for s in schedules for t in ((False, True) if arch == 90 else (False,))):
            for name, _, constexprs, launch, loop_names in kernel_launches(head_dim, config, schedule, tma):
                key = (arch, _TRITON_DTYPE[dtype], name, tuple(sorted(constexprs.items())), launch)
                if key not in seen:
                    seen.add(key)
                    jobs.append((arch, head_dim, dtype, name, schedule, constexprs, launch, loop_names))
    return jobs


def iter_compile(
    workers: int | None = None, schedules: tuple[str, ...] = ("range", "index"), only: str | None = None
):
    """Compile every distinct kernel of every configuration for its arch, in ``workers`` processes,
    yielding each :class:`CompileReport` as it is done; ``only`` (e.g. ``"90-128-bf16"``: arch,
    head dim, dtype) restricts them to one combination."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the AOT compile needs compiled, not interpreted, kernels")
    jobs = [j for j in compile_jobs(schedules) if only in (None, f"{j[0]}-{j[1]}-{_TRITON_DTYPE[j[2]]}")]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        yield from pool.map(_compile_one, jobs)


def compile_all(
    workers: int | None = None, schedules: tuple[str, ...] = ("range", "index"), only: str | None = None
) -> list[CompileReport]:
    """Every report of :func:`iter_compile`, as a list."""
    return list(iter_compile(workers, schedules, only))


_KERNEL_COLUMNS = (
    "arch", "head_dim", "dtype", "kernel", "schedule", "tma", "block_m", "block_n", "num_warps", "num_stages",
    "registers", "stack_bytes", "local_bytes", "shared_bytes", "hgmma",
)  # fmt: skip
_LOOP_COLUMNS = (
    "name", "instructions", "tensor_core", "exp2", "copy_groups", "wait_groups", "tma_copies", "tiles_ahead",
)  # fmt: skip


def report_rows(reports: list[CompileReport]) -> list[dict]:
    """One flat row per (kernel, hot loop); a kernel without loops gets one row with empty loop fields."""
    rows = []
    for r in reports:
        base = {c: getattr(r, c) for c in _KERNEL_COLUMNS} | {"triton": triton.__version__}
        for loop in r.loops or [None]:
            loop_fields = {f"loop_{c}": ("" if loop is None else getattr(loop, c)) for c in _LOOP_COLUMNS}
            rows.append(base | loop_fields)
    return rows


def _print_table(rows: list[dict]) -> None:
    print(
        f"triton {triton.__version__}\n"
        "arch dtype   D kernel sched tma BMxBN    w s  regs spill  smem hgmma | loop          "
        "instr  mma  ex2 groups wait  tma ahead"
    )
    for r in rows:
        spill = r["stack_bytes"] + r["local_bytes"]
        print(
            f"sm_{r['arch']} {r['dtype']:>5} {r['head_dim']:>3} {r['kernel']:<6} {r['schedule']:<5} "
            f"{'tma' if r['tma'] else 'ptr'} "
            f"{r['block_m']:>3}x{r['block_n']:<4} {r['num_warps']:>1} {r['num_stages']:>1} {r['registers']:>5} "
            f"{spill:>5} {r['shared_bytes']:>6} {r['hgmma']!s:>5} | {r['loop_name']!s:<13} "
            f"{r['loop_instructions']!s:>5} {r['loop_tensor_core']!s:>4} {r['loop_exp2']!s:>4} "
            f"{r['loop_copy_groups']!s:>6} {r['loop_wait_groups']!s:>4} {r['loop_tma_copies']!s:>4} "
            f"{r['loop_tiles_ahead']!s:>5}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON list of kernels (with loops)")
    parser.add_argument("--report", action="store_true", help="print one row per kernel and hot loop")
    parser.add_argument("--csv", metavar="PATH", help="also write the per-loop rows to this CSV")
    parser.add_argument("--schedule", choices=("range", "index", "both"), default="both")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--only", metavar="ARCH-D-DTYPE", help="one combination, e.g. 90-128-bf16")
    args = parser.parse_args()
    schedules = ("range", "index") if args.schedule == "both" else (args.schedule,)
    reports = []
    with open(args.csv or os.devnull, "w", newline="") as f:  # rows written as kernels finish
        writer = None
        for report in iter_compile(args.workers, schedules, args.only):
            reports.append(report)
            for row in report_rows([report]):
                writer = writer or csv.DictWriter(f, fieldnames=list(row))
                if f.tell() == 0:
                    writer.writeheader()
                writer.writerow(row)
            f.flush()
    if args.json:
        json.dump([asdict(r) for r in reports], sys.stdout)
        print()
    if args.report or not args.json:
        _print_table(report_rows(reports))


if __name__ == "__main__":
    main()
