"""croc.linear_sum_assignment against scipy's optimum: shapes, cost families, ties, forbidden
pairs, maximisation, errors, threads, tracing, the fallback, and the CUDA kernel's block
algorithm driven on the host (lsap_block_harness)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment as scipy_lsa

import croc
from croc.ops import assignment as assignment_ops

needs_ext = pytest.mark.skipif(not assignment_ops.EXTENSION_AVAILABLE, reason="croc._C is not built")
CPU_BACKENDS = ["cpu", "scipy"] if assignment_ops.EXTENSION_AVAILABLE else ["scipy"]
HARNESS_THREADS = (1, 7, 32, 256)


def croc_costs(batch: int, n: int, m: int, dim: int, raw_pool: bool, seed: int) -> torch.Tensor:
    """float32 [batch, n, m]: L2 distances from normalised features to a pool (normalised or raw randn)."""
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(batch, n, dim, generator=g), dim=-1)
    pool = torch.randn(m, dim, generator=g)
    if not raw_pool:
        pool = F.normalize(pool, dim=-1)
    return torch.cdist(feats, pool[None].expand(batch, m, dim))


def assert_optimal(
    cost: torch.Tensor, cols: torch.Tensor, maximize: bool = False, exact: bool = False
) -> None:
    """Every problem of cost [B, n, m] gets a valid assignment cols [B, n] with scipy's optimal total."""
    assert cols.dtype == torch.int64 and cols.shape == cost.shape[:2]
    problems = cost.detach().cpu().double().numpy()
    for b, (problem, chosen) in enumerate(zip(problems, cols.cpu().numpy())):
        n = problem.shape[0]
        assert len(set(chosen.tolist())) == n, f"problem {b}: a column is used twice"
        assert ((chosen >= 0) & (chosen < problem.shape[1])).all()
        rows, ref_cols = scipy_lsa(problem, maximize=maximize)
        total = problem[rows, chosen].sum()
        ref = problem[rows, ref_cols].sum()
        assert np.isfinite(total), f"problem {b}: a forbidden pair was assigned"
        tol = 0.0 if exact else 4 * max(n, 1) * np.spacing(abs(ref))
        assert abs(total - ref) <= tol, f"problem {b}: total {total!r} vs scipy's optimum {ref!r}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1), (2, 1, 9), (3, 5, 5), (4, 6, 11), (2, 17, 17), (3, 33, 100), (1, 64, 1000), (20, 3, 4)],
)
def test_uniform_costs_match_scipy(backend, shape):
    cost = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    assert_optimal(cost, croc.linear_sum_assignment(cost, backend=backend))


@needs_ext
@pytest.mark.parametrize(
    ("batch", "n", "m", "dim", "raw_pool"),
    [
        (3, 96, 512, 64, True),
        (3, 96, 512, 64, False),
        (2, 150, 301, 32, True),
        (2, 432, 2048, 4096, False),
        (1, 432, 2048, 4096, True),
    ],
)
def test_croc_cost_families_match_scipy(batch, n, m, dim, raw_pool):
    cost = croc_costs(batch, n, m, dim, raw_pool, seed=n + m + raw_pool)
    assert_optimal(cost, croc.linear_sum_assignment(cost, backend="cpu"))


@needs_ext
@pytest.mark.parametrize(("n", "m", "levels"), [(40, 40, 3), (50, 120, 4), (7, 300, 2), (200, 210, 5)])
def test_integer_costs_with_ties_are_exact(n, m, levels):
    cost = torch.randint(0, levels, (3, n, m), generator=torch.Generator().manual_seed(n * m)).float()
    assert_optimal(cost, croc.linear_sum_assignment(cost, backend="cpu"), exact=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("maximize", [False, True])
def test_forbidden_pairs_and_maximize(backend, maximize):
    g = torch.Generator().manual_seed(5)
    cost = torch.randn(4, 30, 45, generator=g, dtype=torch.float64)
    forbidden = torch.rand(cost.shape, generator=g) < 0.6
    cost[forbidden] = float("-inf") if maximize else float("inf")
    cols = croc.linear_sum_assignment(cost, maximize=maximize, backend=backend)
    assert_optimal(cost, cols, maximize=maximize)


def competing_rows(other: float) -> torch.Tensor:
    """float64 [1, 8, 64] where every row wants columns 0-3, columns 4-11 look cheap (col_min = 1)
    but only suit row 0, and the rows left over are better off in columns 12-63 (cost 50) than in
    4-11 (cost `other`, 100 or +inf). Column pruning keeps 0-11 first, so its duals must pull in
    outside columns (other = 100) or fall back to the whole matrix (other = inf)."""
    cost = torch.full((8, 64), 50.0, dtype=torch.float64)
    cost[:, :4] = 0.0
    cost[:, 4:12] = other
    cost[0, 4:12] = 1.0
    return cost[None]


def discount_left_free() -> torch.Tensor:
    """float64 [1, 8, 16] on which the warm start discounts column 1 (row 0 finds it cheap) while the
    optimum leaves it free (row 0 takes column 2), so the warm start's duals fail to certify and
    the solve is redone from v = 0."""
    cost = torch.full((8, 16), 10.0, dtype=torch.float64)
    cost[1:, 0] = 0.0
    cost[0, :] = 100.0
    cost[0, 1] = -100.0
    cost[0, 2] = -1000.0
    return cost[None]


HANDMADE = {
    "pruning-adds-columns": competing_rows(100.0),
    "pruning-infeasible-subset": competing_rows(float("inf")),
    "warm-start-not-certified": discount_left_free(),
}


@needs_ext
@pytest.mark.parametrize("name", sorted(HANDMADE))
def test_handmade_paths_of_the_solver(name):
    cost = HANDMADE[name]
    assert_optimal(cost, croc.linear_sum_assignment(cost, backend="cpu"), exact=True)
    for threads in HARNESS_THREADS:
        assert_optimal(cost, torch.ops.croc.lsap_block_harness(cost, False, threads), exact=True)


@needs_ext
@pytest.mark.parametrize(
    ("family", "maximize"),
    [("uniform", False), ("uniform", True), ("raw", False), ("normalised", False), ("ties", False)],
)
def test_block_harness_is_optimal_and_independent_of_thread_count(family, maximize):
    """The CUDA kernel's phases, run on the host with 1..256 simulated threads per block."""
    if family == "uniform":
        cost = torch.rand(2, 37, 70, generator=torch.Generator().manual_seed(1))
    elif family == "ties":
        cost = torch.randint(0, 3, (2, 40, 45), generator=torch.Generator().manual_seed(2)).float()
    else:
        cost = croc_costs(2, 60, 200, 32, raw_pool=family == "raw", seed=3)
    results = [torch.ops.croc.lsap_block_harness(cost, maximize, t) for t in HARNESS_THREADS]
    for cols in results[1:]:
        assert torch.equal(cols, results[0])
    assert_optimal(cost, results[0], maximize=maximize, exact=family == "ties")


@needs_ext
def test_block_harness_reports_errors():
    cost = torch.rand(3, 4, 6)
    cost[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"cost \(batch element 1\) contains NaN"):
        torch.ops.croc.lsap_block_harness(cost, False, 32)
    cost = torch.rand(3, 4, 6)
    cost[2, :2, :] = float("inf")
    cost[2, :2, 5] = 1.0
    with pytest.raises(ValueError, match=r"cost \(batch element 2\) is infeasible"):
        torch.ops.croc.lsap_block_harness(cost, False, 32)


@needs_ext
def test_result_does_not_depend_on_the_number_of_threads():
    cost = torch.cat([croc_costs(3, 80, 300, 32, raw, seed=9) for raw in (False, True)])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = croc.linear_sum_assignment(cost, backend="cpu")
        torch.set_num_threads(2)
        double = croc.linear_sum_assignment(cost, backend="cpu")
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(single, double)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dtypes_layouts_and_unbatched_input(backend):
    base = torch.rand(3, 12, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for cost in (base, base.float(), base.half(), base.transpose(1, 2).contiguous().transpose(1, 2)):
        assert_optimal(cost, croc.linear_sum_assignment(cost, backend=backend))
    single = croc.linear_sum_assignment(base[0], backend=backend)
    assert single.shape == (12,)
    assert_optimal(base[:1], single[None])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 0, 5), (0, 0), (0, 4), (3, 0, 0)])
def test_empty_problems(backend, shape):
    cols = croc.linear_sum_assignment(torch.rand(shape), backend=backend)
    assert cols.dtype == torch.int64 and cols.shape == shape[:-1]


def infeasible_batch() -> torch.Tensor:
    cost = torch.rand(3, 4, 6)
    cost[2, :3, :] = float("inf")
    cost[2, :3, :2] = 1.0  # three rows share two columns
    return cost


def with_entry(value: float) -> torch.Tensor:
    cost = torch.rand(3, 4, 6)
    cost[1, 3, 0] = value
    return cost


ERRORS = [
    (lambda: torch.rand(2, 7, 5), {}, r"no more rows than columns \(n <= m\)"),
    (lambda: with_entry(float("nan")), {}, r"cost \(batch element 1\) contains NaN or -inf"),
    (lambda: with_entry(float("-inf")), {}, r"cost \(batch element 1\) contains NaN or -inf"),
    (lambda: with_entry(float("inf")), {"maximize": True}, r"cost \(batch element 1\) contains NaN or \+inf"),
    (infeasible_batch, {}, r"cost \(batch element 2\) is infeasible"),
    (lambda: torch.randint(0, 5, (2, 3, 4)), {}, r"cost must be a floating-point tensor"),
    (lambda: torch.rand(2, 3, 4) > 0.5, {}, r"cost must be a floating-point tensor"),
    (lambda: torch.rand(5), {}, r"cost must have shape \[n, m\] or \[batch, n, m\]"),
    (lambda: torch.rand(2, 2, 3, 4), {}, r"cost must have shape \[n, m\] or \[batch, n, m\]"),
    (lambda: torch.rand(2, 3, 4, dtype=torch.complex64), {}, r"cost must be a floating-point tensor"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("make", "kwargs", "message"), ERRORS)
def test_errors_name_cost(backend, make, kwargs, message):
    with pytest.raises(ValueError, match=message):
        croc.linear_sum_assignment(make(), backend=backend, **kwargs)


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"cost must be a torch\.Tensor"):
        croc.linear_sum_assignment(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="backend must be one of"):
        croc.linear_sum_assignment(torch.rand(2, 3), backend="gpu")
    if not assignment_ops.EXTENSION_HAS_CUDA:
        with pytest.raises(RuntimeError, match=r"backend=.cuda. needs croc\._C built with CUDA"):
            croc.linear_sum_assignment(torch.rand(2, 3), backend="cuda")


@needs_ext
def test_direct_op_checks_its_arguments():
    with pytest.raises(ValueError, match="cost must have shape"):
        torch.ops.croc.linear_sum_assignment(torch.rand(3, 4), False)
    with pytest.raises(ValueError, match="cost must be float32 or float64"):
        torch.ops.croc.linear_sum_assignment(torch.rand(1, 3, 4).half(), False)


@needs_ext
@pytest.mark.parametrize(("dtype", "maximize"), [(torch.float32, False), (torch.float64, True)])
def test_op_passes_opcheck(dtype, maximize):
    cost = torch.rand(3, 5, 9, dtype=dtype, generator=torch.Generator().manual_seed(8))
    results = torch.library.opcheck(torch.ops.croc.linear_sum_assignment.default, (cost, maximize))
    assert set(results.values()) == {"SUCCESS"}, results


@needs_ext
def test_torch_compile_traces_without_graph_breaks():
    def step(cost: torch.Tensor) -> torch.Tensor:
        return croc.linear_sum_assignment(cost * 2.0) + 1

    cost = torch.rand(3, 9, 14, generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(step, fullgraph=True, backend="eager", dynamic=False)
    assert torch.equal(compiled(cost), step(cost))


def test_missing_extension_falls_back_to_scipy_with_one_warning(monkeypatch):
    monkeypatch.setattr(assignment_ops, "EXTENSION_AVAILABLE", False)
    monkeypatch.setattr(assignment_ops, "EXTENSION_HAS_CUDA", False)
    monkeypatch.setattr(assignment_ops, "_warned_fallbacks", set())
    cost = torch.rand(2, 6, 9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = croc.linear_sum_assignment(cost)
        second = croc.linear_sum_assignment(cost)
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == [
        "croc._C (the C++ assignment extension) is not built: croc.linear_sum_assignment falls back to "
        "scipy in a loop, which is much slower"
    ]
    assert torch.equal(first, second)
    assert_optimal(cost, first)
    for backend in ("cpu", "cuda"):
        with pytest.raises(RuntimeError, match=f"backend='{backend}' needs the C\\+\\+ extension"):
            croc.linear_sum_assignment(cost, backend=backend)


def test_croc_imports_and_solves_when_the_extension_cannot_be_loaded():
    """A fresh interpreter in which importing croc._C fails (as after CROC_SKIP_EXT_BUILD=1)."""
    script = (
        "import sys, warnings; sys.modules['croc._C'] = None\n"
        "import torch, croc\n"
        "from croc.ops import assignment as a\n"
        "assert not a.EXTENSION_AVAILABLE\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    cols = croc.linear_sum_assignment(torch.tensor([[3.0, 1.0, 2.0], [1.0, 5.0, 9.0]]))\n"
        "    croc.linear_sum_assignment(torch.rand(4, 5))\n"
        "assert cols.tolist() == [1, 0], cols\n"
        "assert sum('falls back to scipy' in str(x.message) for x in w) == 1\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maximize", [False, True])
def test_cuda_kernel_matches_scipy(dtype, maximize):
    costs = [
        torch.rand(5, 37, 70, dtype=dtype),
        torch.randint(0, 3, (4, 40, 45)).to(dtype),
        croc_costs(4, 432, 2048, 256, raw_pool=False, seed=11).to(dtype),
        croc_costs(2, 432, 2048, 256, raw_pool=True, seed=12).to(dtype),
        HANDMADE["warm-start-not-certified"].to(dtype),
    ]
    for cost in costs:
        cols = croc.linear_sum_assignment(cost.cuda(), maximize=maximize, backend="cuda")
        assert cols.device.type == "cuda"
        assert_optimal(cost, cols, maximize=maximize)


@pytest.mark.gpu
def test_cuda_kernel_errors_and_empty_inputs():
    for make, kwargs, message in ERRORS[:5]:
        with pytest.raises(ValueError, match=message):
            croc.linear_sum_assignment(make().cuda(), backend="cuda", **kwargs)
    for shape in [(0, 3, 5), (2, 0, 5)]:
        assert croc.linear_sum_assignment(torch.rand(shape, device="cuda")).shape == shape[:-1]
    forbidden = torch.rand(3, 20, 30, dtype=torch.float64)
    forbidden[torch.rand(forbidden.shape) < 0.5] = float("inf")
    assert_optimal(forbidden, croc.linear_sum_assignment(forbidden.cuda()))


# ----------------------------------------------------------------------------- ragged batches
def ragged_batch(
    n: int, m: int, counts: list[int], raw_pool: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cost float32 [B, n, m], num_rows int64 [B]): Croc-like costs whose padding rows are NaN,
    so a solver that reads a padding row fails."""
    cost = croc_costs(len(counts), n, m, 16, raw_pool, seed)
    num_rows = torch.tensor(counts, dtype=torch.int64)
    cost[torch.arange(n)[None, :] >= num_rows[:, None]] = float("nan")
    return cost, num_rows


def assert_ragged_optimal(
    cost: torch.Tensor, num_rows: torch.Tensor, cols: torch.Tensor, maximize=False
) -> None:
    """Rows past num_rows[b] are -1, the first num_rows[b] rows reach scipy's optimum of their sub-problem."""
    assert cols.dtype == torch.int64 and cols.shape == cost.shape[:2]
    for b, count in enumerate(num_rows.tolist()):
        assert (cols[b, count:] == -1).all(), f"problem {b}: padding rows got columns"
        if count:
            assert_optimal(cost[b : b + 1, :count], cols[b : b + 1, :count], maximize=maximize)


RAGGED = [
    # (n, m, counts, raw_pool): easy and hard (raw pool: warm start, pruning) problems, empty
    # ones, full ones, and n > m where every count fits m
    (12, 40, [12, 0, 5, 1, 9], False),
    (48, 160, [48, 20, 33, 0], True),
    (30, 20, [20, 7, 0, 13], False),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("n", "m", "counts", "raw_pool"), RAGGED)
@pytest.mark.parametrize("maximize", [False, True])
def test_ragged_batches_match_scipy(backend, n, m, counts, raw_pool, maximize):
    cost, num_rows = ragged_batch(n, m, counts, raw_pool, seed=n + m)
    cols = croc.linear_sum_assignment(cost, maximize=maximize, backend=backend, num_rows=num_rows)
    assert_ragged_optimal(cost, num_rows, cols, maximize)


@needs_ext
@pytest.mark.parametrize(("n", "m", "counts", "raw_pool"), RAGGED)
def test_block_harness_solves_ragged_batches(n, m, counts, raw_pool):
    """The kernel's driver on a ragged batch, with 1, 7 and 32 simulated threads: same result."""
    cost, num_rows = ragged_batch(n, m, counts, raw_pool, seed=n * m)
    results = [torch.ops.croc.lsap_block_harness(cost, False, t, num_rows) for t in (1, 7, 32)]
    for cols in results[1:]:
        assert torch.equal(cols, results[0])
    assert_ragged_optimal(cost, num_rows, results[0])


@needs_ext
def test_ragged_equals_solving_each_problem_alone():
    cost, num_rows = ragged_batch(20, 50, [20, 3, 11], raw_pool=True, seed=5)
    cols = croc.linear_sum_assignment(cost, backend="cpu", num_rows=num_rows)
    for b, count in enumerate(num_rows.tolist()):
        assert torch.equal(cols[b, :count], croc.linear_sum_assignment(cost[b, :count], backend="cpu"))


RAGGED_ERRORS = [
    (torch.rand(3, 6, 4), torch.tensor([1, 5, 2]), r"num_rows\[1\] = 5 is out of range: .*min\(n, m\) = 4"),
    (torch.rand(3, 4, 6), torch.tensor([1, 2, 5]), r"num_rows\[2\] = 5 is out of range: .*min\(n, m\) = 4"),
    (torch.rand(3, 4, 6), torch.tensor([-1, 2, 3]), r"num_rows\[0\] = -1 is out of range"),
    (torch.rand(3, 4, 6), torch.tensor([1.0, 2.0, 3.0]), r"num_rows must be an integer tensor"),
    (torch.rand(3, 4, 6), torch.tensor([True, False, True]), r"num_rows must be an integer tensor"),
    (torch.rand(3, 4, 6), torch.tensor([1, 2]), r"num_rows must have shape \[3\]"),
    (torch.rand(3, 4, 6), torch.tensor([[1, 2, 3]]), r"num_rows must have shape \[3\]"),
    (torch.rand(4, 6), torch.tensor([1]), r"num_rows needs a batched cost"),
    (torch.rand(3, 4, 6), torch.zeros(3, dtype=torch.int64, device="meta"), r"num_rows is on meta"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("cost", "num_rows", "message"), RAGGED_ERRORS)
def test_ragged_errors_name_num_rows(backend, cost, num_rows, message):
    with pytest.raises(ValueError, match=message):
        croc.linear_sum_assignment(cost, backend=backend, num_rows=num_rows)
    with pytest.raises(TypeError, match=r"num_rows must be an integer torch\.Tensor"):
        croc.linear_sum_assignment(torch.rand(2, 3, 4), backend=backend, num_rows=[1, 2])


@needs_ext
def test_ragged_op_passes_opcheck_and_traces():
    cost, num_rows = ragged_batch(6, 9, [6, 2, 0], raw_pool=False, seed=3)
    results = torch.library.opcheck(torch.ops.croc.linear_sum_assignment.default, (cost, False, num_rows))
    assert set(results.values()) == {"SUCCESS"}, results
    compiled = torch.compile(
        lambda c, r: croc.linear_sum_assignment(c, num_rows=r), fullgraph=True, backend="eager"
    )
    assert torch.equal(compiled(cost, num_rows), croc.linear_sum_assignment(cost, num_rows=num_rows))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_kernel_solves_ragged_batches_in_one_launch(dtype):
    cases = [ragged_batch(*case, seed=i) for i, case in enumerate(RAGGED)]
    cases.append(ragged_batch(432 * 2, 2048, [432, 864, 100, 0], raw_pool=True, seed=7))
    for cost, num_rows in cases:
        cost = cost.to(dtype)
        cols = croc.linear_sum_assignment(cost.cuda(), backend="cuda", num_rows=num_rows.cuda())
        assert cols.device.type == "cuda"
        assert_ragged_optimal(cost, num_rows, cols.cpu())
    for cost, num_rows, message in RAGGED_ERRORS[:3]:
        with pytest.raises(ValueError, match=message):
            croc.linear_sum_assignment(cost.cuda(), backend="cuda", num_rows=num_rows.cuda())
    with pytest.raises(ValueError, match="num_rows is on cpu"):
        croc.linear_sum_assignment(
            torch.rand(2, 3, 4, device="cuda"), backend="cuda", num_rows=torch.ones(2, dtype=torch.long)
        )
