"""Op layer of the batched assignment: ``torch.ops.croc.linear_sum_assignment`` and its fallback.

The op is defined in C++ (``csrc/``, built into ``croc._C``): schema, CPU implementation (problems
of a batch in parallel on torch's thread pool) and, when built with CUDA, the CUDA implementation
(one launch for the batch). Its fake function is registered here, so ``torch.compile`` traces a
call without a graph break. The op is not differentiable (it returns indices).

When ``croc._C`` is missing (installed with ``CROC_SKIP_EXT_BUILD=1``), :func:`solve` falls back to
scipy, with a single warning per process. When it is present but was built against another torch
release (major.minor), importing croc raises an ImportError that gives the rebuild command: never a
crash later, never a silent fallback.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = [
    "EXTENSION_AVAILABLE",
    "EXTENSION_HAS_CUDA",
    "check_built_against",
    "scipy_linear_sum_assignment",
    "solve",
]

REBUILD_HINT = (
    "rebuild croc next to the torch you run, without build isolation: "
    "`pip install --no-build-isolation .` (or `-e .`; in a checkout `python setup.py build_ext --inplace`)"
)


def _release(version: str) -> tuple[str, ...]:
    """'2.13.0+cpu' -> ('2', '13'): the part of a torch version that fixes its C++ ABI."""
    return tuple(version.split("+")[0].split(".")[:2])


def check_built_against(built: str, running: str) -> None:
    """Raise ImportError unless croc._C was built against the torch minor release that is running.

    Args:
        built: the torch version croc._C was compiled against (``croc._C.torch_version()``).
        running: ``torch.__version__``.
    """
    if _release(built) != _release(running):
        raise ImportError(
            f"croc._C was built against torch {built}, but torch {running} is running; an extension "
            f"built against another torch release crashes or misbehaves, so croc refuses it: {REBUILD_HINT}"
        )


def _load_extension():
    """croc._C, checked against the running torch; None if croc was installed without it."""
    try:
        from croc import _C
    except ModuleNotFoundError as error:
        if error.name != "croc._C":
            raise
        return None  # built without the extension (CROC_SKIP_EXT_BUILD=1)
    except ImportError as error:  # present but unloadable: typically undefined torch symbols
        raise ImportError(
            f"croc._C is installed but does not load with torch {torch.__version__} ({error}); it was "
            f"probably built against another torch: {REBUILD_HINT}"
        ) from error
    if not hasattr(_C, "torch_version"):
        raise ImportError(
            f"croc._C predates the torch version check (built by an older croc): {REBUILD_HINT}"
        )
    check_built_against(_C.torch_version(), torch.__version__)
    return _C


_C = _load_extension()

EXTENSION_AVAILABLE: bool = _C is not None
EXTENSION_HAS_CUDA: bool = _C is not None and bool(_C.has_cuda())

_BACKENDS = ("auto", "cuda", "cpu", "scipy")
_warned_fallbacks: set[str] = set()

if EXTENSION_AVAILABLE:

    @torch.library.register_fake("croc::linear_sum_assignment")
    def _linear_sum_assignment_fake(
        cost: torch.Tensor, maximize: bool, num_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        return cost.new_empty(cost.shape[:2], dtype=torch.int64)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned_fallbacks:
        _warned_fallbacks.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _forbidden_entries(cost: torch.Tensor, maximize: bool) -> torch.Tensor:
    """bool [B]: problems holding NaN, or the infinity of the wrong sign (-inf, or +inf to maximise)."""
    wrong_inf = float("inf") if maximize else float("-inf")
    return (torch.isnan(cost) | (cost == wrong_inf)).flatten(1).any(1)


def _check_counts(num_rows: torch.Tensor, n: int, m: int) -> None:
    """ValueError naming the first problem whose row count is outside [0, min(n, m)]."""
    bad = (num_rows < 0) | (num_rows > min(n, m))
    if bad.any():
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"num_rows[{b}] = {int(num_rows[b])} is out of range: expected 0 <= num_rows[b] <= min(n, m) = "
            f"{min(n, m)} (cost has n = {n} rows and m = {m} columns)"
        )


def scipy_linear_sum_assignment(
    cost: torch.Tensor, maximize: bool, num_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """scipy's solver in a loop over the batch, with croc's error messages.

    Args:
        cost: float [B, n, m], any device (copied to the host as float64); n <= m unless num_rows.
        maximize: maximise the total instead of minimising it.
        num_rows: optional int64 [B] on cost's device: problem b uses its first num_rows[b] rows.

    Returns:
        int64 [B, n] on cost's device: the column assigned to each row, -1 past num_rows[b].
    """
    from scipy.optimize import linear_sum_assignment

    batch, n, m = cost.shape
    host = cost.detach().to("cpu", torch.float64)
    rows = torch.full((batch,), n, dtype=torch.int64) if num_rows is None else num_rows.cpu()
    _check_counts(rows, n, m)
    used = torch.arange(n).unsqueeze(0) < rows.unsqueeze(1)  # [B, n]
    bad = _forbidden_entries(host.masked_fill(~used.unsqueeze(-1), 0.0), maximize)
    if bad.any():
        element = int(bad.nonzero()[0, 0])
        allowed = "use -inf to forbid a pair" if maximize else "use +inf to forbid a pair"
        raise ValueError(
            f"cost (batch element {element}) contains NaN or {'+inf' if maximize else '-inf'}; {allowed}"
        )
    out = np.full((batch, n), -1, dtype=np.int64)
    for b, (problem, count) in enumerate(zip(host.numpy(), rows.tolist(), strict=True)):
        try:
            out[b, :count] = linear_sum_assignment(problem[:count], maximize=maximize)[1]
        except ValueError as error:
            raise ValueError(
                f"cost (batch element {b}) is infeasible: its forbidden ({'-inf' if maximize else '+inf'}) "
                "entries leave no assignment of every row to its own column"
            ) from error
    return torch.from_numpy(out).to(cost.device)


def _resolve(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend in ("cpu", "cuda") and not EXTENSION_AVAILABLE:
        raise RuntimeError(
            f"backend={backend!r} needs the C++ extension croc._C, which is not built; reinstall croc "
            "with `pip install --no-build-isolation -e .` (without CROC_SKIP_EXT_BUILD), or use "
            "backend='scipy'"
        )
    if backend == "cuda":
        if not EXTENSION_HAS_CUDA:
            raise RuntimeError(
                "backend='cuda' needs croc._C built with CUDA (a CUDA build of torch and nvcc at install "
                "time, without CROC_SKIP_CUDA_BUILD); use backend='cpu' or 'scipy'"
            )
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs cost on a CUDA device, got {device}")
    if backend != "auto":
        return backend
    if not EXTENSION_AVAILABLE:
        _warn_once(
            "scipy",
            "croc._C (the C++ assignment extension) is not built: croc.linear_sum_assignment falls "
            "back to scipy in a loop, which is much slower",
        )
        return "scipy"
    if device.type == "cuda" and not EXTENSION_HAS_CUDA:
        _warn_once(
            "cpu",
            "croc._C was built without CUDA: croc.linear_sum_assignment solves CUDA tensors with the C++ "
            "CPU solver on a host copy",
        )
        return "cpu"
    return "cuda" if device.type == "cuda" else "cpu"


def solve(
    cost: torch.Tensor, maximize: bool, backend: str, num_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Solves a batch of validated problems with the chosen backend.

    Args:
        cost: float32 or float64 [B, n, m], n <= m unless num_rows is given (validated by the caller).
        maximize: maximise the total instead of minimising it.
        backend: "auto" | "cuda" | "cpu" | "scipy" (see :func:`croc.linear_sum_assignment`).
        num_rows: optional int64 [B] on cost's device (ragged batch; counts checked by the backend).

    Returns:
        int64 [B, n] on cost's device, -1 past num_rows[b].
    """
    chosen = _resolve(backend, cost.device)
    if chosen == "scipy":
        return scipy_linear_sum_assignment(cost, maximize, num_rows)
    if chosen == "cpu" and cost.device.type != "cpu":
        rows = None if num_rows is None else num_rows.cpu()
        return torch.ops.croc.linear_sum_assignment(cost.cpu(), maximize, rows).to(cost.device)
    return torch.ops.croc.linear_sum_assignment(cost, maximize, num_rows)
