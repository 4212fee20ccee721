"""Launch configurations of the mixed-attention kernels: the one place that picks tile sizes.

Each of the three passes (forward; backward dK/dV over query blocks; backward dQ over key blocks)
has its own ``PassConfig``. The table is keyed by GPU generation (``80``: Ampere/Ada and anything
before Hopper, ``90``: Hopper and later), the padded head dim (64 or 128; head dims 80 and 96
run in 128-wide tiles with masked loads) and whether the inputs are fp32 (TF32 dots). The Triton interpreter uses one fixed small config so
that short test sequences still span several tiles.

Every configuration listed here is compiled ahead of time for sm_80 and sm_90 by
``tests/test_kernel_aot.py`` (no register spills, shared memory within the
limit, HGMMA on sm_90 where the tiles allow it).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch

__all__ = [
    "INTERPRET",
    "SUPPORTED_HEAD_DIMS",
    "AttentionConfig",
    "PassConfig",
    "all_configs",
    "attention_config",
    "padded_head_dim",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)


@dataclass(frozen=True)
class PassConfig:
    """Tile of one pass: ``block_m`` query rows × ``block_n`` key rows, and Triton launch knobs."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AttentionConfig:
    """The three passes of one (arch, head dim, dtype) combination.

    ``forward`` is the forward's tile when it reads K/V through TMA tensor descriptors (sm_90,
    16-byte aligned strides), ``forward_pointer`` (if set) its tile when it reads them through
    pointers (sm_80, or strides a descriptor cannot take), whose registers may not fit the same tile."""

    forward: PassConfig
    dkdv: PassConfig
    dq: PassConfig
    forward_pointer: PassConfig | None = None

    def for_loads(self, tma: bool) -> AttentionConfig:
        """This config with ``forward`` the tile of the given load path (``tma``: descriptors)."""
        if tma or self.forward_pointer is None:
            return self
        return replace(self, forward=self.forward_pointer)


def _cfg(forward: tuple, dkdv: tuple, dq: tuple, forward_pointer: tuple | None = None) -> AttentionConfig:
    pointer = None if forward_pointer is None else PassConfig(*forward_pointer)
    return AttentionConfig(PassConfig(*forward), PassConfig(*dkdv), PassConfig(*dq), pointer)


# (arch, padded head dim, fp32 inputs) -> (block_m, block_n, num_warps, num_stages) per pass.
# Picked on a CPU machine from candidate lists by `python -m croc.kernels.aot` (no register spills,
# dynamic shared memory <= 227 KiB on sm_90 and <= 99 KiB on sm_80, so that sm_86/sm_89 fit too),
# preferring large tiles and 8 warps with M >= 64 (Hopper wgmma). Not yet tuned for speed on a GPU.
# sm_90, D = 128, fp16/bf16 (issue 10, by `python -m croc.kernels.aot --report` on Triton 3.6 and 3.9):
# forward 128x128x8x3 reading K/V through TMA descriptors (0 spill, copies one tile ahead; full
# tiles 489/519 SASS instructions on 3.6/3.9, start- or end-cut tiles 622-652); through pointers
# (sm_90 inputs whose strides a descriptor cannot take) 128x128 spills at every stage count on
# 3.9 (3.6: index schedule), so that path keeps 128x64x8x3; dK/dV 64x128 spills once the range
# loop is software-pipelined (any stage count), 16x128x8x3 does not and keeps one tile in
# flight (Q/dO through descriptors instead: 255 registers, 40 B spill, so dK/dV stays on
# pointers); dQ reads K/V through descriptors where tma_ready allows (188 registers against 243
# through pointers) and at 4 stages keeps two tiles in flight on both paths.
# sm_90 backward, the other rows: D = 64 dK/dV 64x128x8x2 did not prefetch and spills at 3 stages,
# 32x128x8x3 keeps one tile in flight; dQ 4 stages (D = 64 half) / 3 (fp32) where 2 did not
# prefetch; fp32 D = 128 dK/dV stays 32x32x4x1 (not prefetching): every 3-stage tile tried
# (32x32 and 16x32 at 4 or 8 warps, 16x64) spills or takes a stack frame on 3.6 or 3.9.
# sm_80 backward: D = 128 half dQ 64x32x8x3 and fp32 dQ/dK/dV at 8 warps and 3 stages prefetch a
# tile (0 spill on 3.6 and 3.9); half dK/dV 32x64 spills at 3 stages (D = 80), D = 64 at 2 or 3.
# sm_80 with the range kernels (Triton 3.6): forward 128x64 and 64x64 spill for D = 128 (56 and 8 B),
# 128x32x8x3 does not; dK/dV needs 8 warps at 32x64; fp32 D = 128 dQ needs 8 warps; fp32 D = 128
# forward: 64x32x4x1 spills with the four tile loops (0.5-1.3 KiB), 32x32x4x3 on 3.9 and
# 64x32x8x3 exceeds 99 KiB, so 64x32x8x2 (0 spill, but its copies are not ahead when it waits).
# fp32 inputs run TF32 dots, whose register footprint forces smaller tiles.
_TABLE: dict[tuple[int, int, bool], AttentionConfig] = {
    (90, 64, False): _cfg(forward=(128, 128, 8, 3), dkdv=(32, 128, 8, 3), dq=(128, 64, 8, 4)),
    (90, 128, False): _cfg(
        forward=(128, 128, 8, 3), dkdv=(16, 128, 8, 3), dq=(128, 64, 8, 4), forward_pointer=(128, 64, 8, 3)
    ),
    (80, 64, False): _cfg(forward=(128, 64, 8, 3), dkdv=(32, 64, 8, 1), dq=(128, 32, 8, 3)),
    (80, 128, False): _cfg(forward=(128, 32, 8, 3), dkdv=(32, 64, 8, 2), dq=(64, 32, 8, 3)),
    # fp32 D = 64: the pointer forward at 64x64x8x3 spills 24 B on 3.9 (the TMA one does not)
    (90, 64, True): _cfg(
        forward=(64, 64, 8, 3), dkdv=(32, 128, 8, 3), dq=(128, 64, 8, 3), forward_pointer=(64, 32, 8, 3)
    ),
    # fp32 D = 128: forward 64x32 spilled; dq at 4 warps spilled 8 B at D = 80/96 under Triton 3.9
    (90, 128, True): _cfg(forward=(32, 32, 4, 3), dkdv=(32, 32, 4, 1), dq=(16, 32, 8, 3)),
    (80, 64, True): _cfg(forward=(128, 64, 8, 3), dkdv=(16, 32, 8, 3), dq=(64, 32, 8, 3)),
    (80, 128, True): _cfg(forward=(64, 32, 8, 2), dkdv=(32, 32, 8, 3), dq=(32, 32, 8, 3)),
}

_INTERPRET_PASS = PassConfig(16, 16, 4, 1)
_INTERPRET_CONFIG = AttentionConfig(_INTERPRET_PASS, _INTERPRET_PASS, _INTERPRET_PASS)


def padded_head_dim(head_dim: int) -> int:
    """The power-of-two tile width used for ``head_dim`` (64 -> 64; 80, 96, 128 -> 128)."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim must be one of {SUPPORTED_HEAD_DIMS} for backend='triton', got {head_dim}"
        )
    return 1 << (head_dim - 1).bit_length()


@torch.compiler.assume_constant_result
@functools.cache
def arch_of(device: torch.device) -> int:
    """Config generation for a device: 90 for compute capability >= 9.0, else 80.

    Cached, and a constant for ``torch.compile`` (queried once at trace time, no graph break)."""
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def lookup(arch: int, head_dim: int, dtype: torch.dtype) -> AttentionConfig:
    """Config for a GPU generation (80 or 90), head dim and input dtype (both forward tiles)."""
    return _TABLE[(arch, padded_head_dim(head_dim), dtype == torch.float32)]


def attention_config(
    head_dim: int, dtype: torch.dtype, device: torch.device, tma: bool = False
) -> AttentionConfig:
    """The config the package launches for inputs of this head dim, dtype and device, with
    ``forward`` the tile of the forward's load path (``tma``: K/V through tensor descriptors, see
    :func:`croc.kernels.mixed_attention.tma_ready`)."""
    padded_head_dim(head_dim)  # validates
    if device.type != "cuda":
        return _INTERPRET_CONFIG
    return lookup(arch_of(device), head_dim, dtype).for_loads(tma)


def all_configs() -> list[tuple[int, int, torch.dtype, AttentionConfig]]:
    """Every (arch, head dim, dtype, config) the package can launch on a GPU (for the AOT test)."""
    return [
        (arch, head_dim, dtype, lookup(arch, head_dim, dtype))
        for arch in (90, 80)
        for head_dim in SUPPORTED_HEAD_DIMS
        for dtype in (torch.float16, torch.bfloat16, torch.float32)
    ]
