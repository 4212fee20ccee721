"""Public batched exact linear assignment: ``croc.linear_sum_assignment``."""

from __future__ import annotations

import torch

from croc.ops.assignment import solve

__all__ = ["linear_sum_assignment"]

_UPCAST = (torch.float16, torch.bfloat16)


def _validate(cost: torch.Tensor, ragged: bool) -> None:
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() not in (2, 3):
        raise ValueError(f"cost must have shape [n, m] or [batch, n, m], got {tuple(cost.shape)}")
    if not cost.dtype.is_floating_point:
        raise ValueError(f"cost must be a floating-point tensor, got {cost.dtype}")
    n, m = cost.shape[-2:]
    if n > m and not ragged:
        raise ValueError(
            f"cost must have no more rows than columns (n <= m), got n = {n} rows and m = {m} columns; "
            "transpose it to assign columns to rows"
        )


def _rows(num_rows: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """num_rows checked (an integer tensor [B] on cost's device) and made int64; values are
    checked by the backend (on CUDA inside the kernel, without a host sync)."""
    if not isinstance(num_rows, torch.Tensor):
        raise TypeError(
            f"num_rows must be an integer torch.Tensor of shape [batch], got {type(num_rows).__name__}"
        )
    if num_rows.dtype.is_floating_point or num_rows.dtype.is_complex or num_rows.dtype == torch.bool:
        raise ValueError(f"num_rows must be an integer tensor, got {num_rows.dtype}")
    if cost.dim() != 3:
        raise ValueError(
            f"num_rows needs a batched cost [batch, n, m], got cost of shape {tuple(cost.shape)}"
        )
    if tuple(num_rows.shape) != (cost.shape[0],):
        raise ValueError(
            f"num_rows must have shape [{cost.shape[0]}] (one count per problem), got {tuple(num_rows.shape)}"
        )
    if num_rows.device != cost.device:
        raise ValueError(f"num_rows is on {num_rows.device} but cost is on {cost.device}")
    return num_rows.to(torch.int64)


def linear_sum_assignment(
    cost: torch.Tensor, maximize: bool = False, backend: str = "auto", num_rows: torch.Tensor | None = None
) -> torch.Tensor:
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
        num_rows: optional integer [B] on cost's device, for a ragged batch of a batched cost:
            problem b uses only its first ``num_rows[b]`` rows (``0 <= num_rows[b] <= min(n, m)``;
            n may then exceed m), the others are padding and their entries are never read as
            costs (NaN there is fine). One launch on CUDA, whatever the counts.

    Returns:
        int64 [n] or [B, n] on cost's device: the column assigned to each row; -1 at the rows
        ``>= num_rows[b]``.

    Raises:
        TypeError: cost or num_rows is not a tensor.
        ValueError: wrong rank, non-float dtype, n > m without num_rows, NaN or the forbidden
            infinity, an infeasible problem (the message names the batch element), num_rows of
            the wrong dtype, shape or device, or a count out of range (the message names it). On
            CUDA the kernel reports the per-problem errors through a status tensor that is read
            once after the launch.
        RuntimeError: backend "cpu"/"cuda" requested but not built.
    """
    _validate(cost, num_rows is not None)
    rows = None if num_rows is None else _rows(num_rows, cost)
    batched = cost.dim() == 3
    problems = (cost if batched else cost.unsqueeze(0)).detach()
    if problems.dtype in _UPCAST:
        problems = problems.float()
    elif problems.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"cost must be float16, bfloat16, float32 or float64, got {cost.dtype}")
    cols = solve(problems, bool(maximize), backend, rows)
    return cols if batched else cols[0]
