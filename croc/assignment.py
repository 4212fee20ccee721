"""Public batched exact linear assignment: ``croc.linear_sum_assignment``."""

from __future__ import annotations

import torch

from croc.ops.assignment import solve

__all__ = ["linear_sum_assignment"]

_UPCAST = (torch.float16, torch.bfloat16)


def _validate(cost: torch.Tensor) -> None:
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() not in (2, 3):
        raise ValueError(f"cost must have shape [n, m] or [batch, n, m], got {tuple(cost.shape)}")
    if not cost.dtype.is_floating_point:
        raise ValueError(f"cost must be a floating-point tensor, got {cost.dtype}")
    n, m = cost.shape[-2:]
    if n > m:
        raise ValueError(
            f"cost must have no more rows than columns (n <= m), got n = {n} rows and m = {m} columns; "
            "transpose it to assign columns to rows"
        )


def linear_sum_assignment(cost: torch.Tensor, maximize: bool = False, backend: str = "auto") -> torch.Tensor:
    """Exact minimum-cost (or maximum) one-to-one assignment of rows to columns, batched.

    Every row gets its own column; the total cost is optimal for the given matrix (float32 is
    solved exactly as its float64 widening, as scipy does), so it equals
    ``scipy.optimize.linear_sum_assignment``'s optimum; among tied optima another one may be
    returned.

    Args:
        cost: float [n, m] or [B, n, m] with n <= m (float16/bfloat16 are widened to float32,
            exactly). ``+inf`` forbids a pair (``-inf`` with ``maximize=True``); NaN and the
            infinity of the other sign are errors.
        maximize: maximise the total instead of minimising it.
        backend: ``"auto"`` (the CUDA kernel for CUDA tensors, the C++ solver for CPU tensors,
            scipy if the extension is not built, with one warning), ``"cuda"``, ``"cpu"`` (the C++
            solver; CUDA tensors go through a host copy) or ``"scipy"``.

    Returns:
        int64 [n] or [B, n] on cost's device: the column assigned to each row.

    Raises:
        TypeError: cost is not a tensor.
        ValueError: wrong rank, non-float dtype, n > m, NaN or the forbidden infinity, or an
            infeasible problem (the message names the batch element). On CUDA the kernel
            reports these through a status tensor that is read once after the launch.
        RuntimeError: backend "cpu"/"cuda" requested but not built.
    """
    _validate(cost)
    batched = cost.dim() == 3
    problems = (cost if batched else cost.unsqueeze(0)).detach()
    if problems.dtype in _UPCAST:
        problems = problems.float()
    elif problems.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"cost must be float16, bfloat16, float32 or float64, got {cost.dtype}")
    cols = solve(problems, bool(maximize), backend)
    return cols if batched else cols[0]
