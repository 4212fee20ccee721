"""What does the Croc-stage assignment cost per training step?

Batches of B rectangular problems n x m (432 selected visual tokens to a pool of 2048 prompt
tokens), float32 cost = L2 distance (torch.cdist) between L2-normalised 4096-d features and
(a) an L2-normalised pool, (b) the raw randn pool of the paper. Every provider solves the same
inputs in the same run; the times are medians (the slowest providers run once):

    croc-cpu           croc.linear_sum_assignment, the C++ solver (torch's thread pool)
    croc-cuda          the CUDA kernel, one launch for the batch (--device cuda)
    scipy-loop         scipy.optimize.linear_sum_assignment in a Python loop (the reference code)
    lapx-lapjvr        lapx's lapjvr in a loop (native float32), when lapx is installed
    lapx-lapjvr-batch  lapx's lapjvr_batch on all cores, when lapx is installed

On --device cuda the peers get the host copy of the cost included (what the reference code
pays) and run at B = 32 only, to stay within gpu_check.sh's time limit. Each row says how many
problems the provider solved to the optimum ("optimal": scipy's totals where scipy ran, else
those of croc's CPU solver, which the tests hold to scipy's optimum).

Usage: python benchmarks/assignment.py --out DIR [--quick] [--device cpu|cuda]
Writes DIR/assignment_<device>.csv (after every case) and DIR/assignment_<device>.png.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment as scipy_lsa

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

import croc

try:
    import lap
except ImportError:
    lap = None

POOLS = ("normalised", "raw")
SLOW_S = 2.0  # a provider stops repeating once its calls add up to this many seconds
PEER_BATCH_ON_CUDA = 32  # with --device cuda the CPU peers run at this batch only (time limit)


def make_costs(batch: int, n: int, m: int, dim: int, pool: str, device: str, seed: int) -> torch.Tensor:
    """float32 [batch, n, m]: L2 distances from normalised features to the pool, on device."""
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(batch * n, dim, generator=g), dim=-1).to(device)
    prompt = torch.randn(m, dim, generator=g).to(device)
    if pool == "normalised":
        prompt = F.normalize(prompt, dim=-1)
    return torch.cdist(feats, prompt).reshape(batch, n, m).contiguous()


def _host(cost: torch.Tensor) -> np.ndarray:
    return cost.cpu().numpy()


def providers(device: str, with_peers: bool) -> dict[str, Callable]:
    """name -> fn(cost) returning int64 columns [B, n] (numpy or torch)."""
    found: dict[str, Callable] = {}
    if device == "cuda":
        found["croc-cuda"] = lambda c: croc.linear_sum_assignment(c, backend="cuda")
    else:
        found["croc-cpu"] = lambda c: croc.linear_sum_assignment(c, backend="cpu")
    if not with_peers:
        return found
    found["scipy-loop"] = lambda c: np.stack([scipy_lsa(p)[1] for p in _host(c)])
    if lap is not None:
        found["lapx-lapjvr"] = lambda c: np.stack(
            [lap.lapjvr(p, extend_cost=True, return_cost=False)[1] for p in _host(c)]
        )
        found["lapx-lapjvr-batch"] = lambda c: np.stack(
            lap.lapjvr_batch(_host(c), extend_cost=True, return_cost=False)[1]
        )
    return found


def timed(fn: Callable[[], object], device: str, reps: int) -> tuple[float, object]:
    """Median ms of fn over reps calls (fewer once they add up to SLOW_S) and its result."""
    samples = []
    result = None
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(1e3 * (time.perf_counter() - start))
        if sum(samples) > 1e3 * SLOW_S:
            break
    return statistics.median(samples), result


def optimal_count(cost: np.ndarray, cols: np.ndarray, optimum: np.ndarray) -> int:
    """Problems whose total (float64) equals the optimum within a few ulps per row."""
    rows = np.arange(cost.shape[1])
    totals = np.array([cost[b][rows, cols[b]].astype(np.float64).sum() for b in range(cost.shape[0])])
    unique = [len(set(c.tolist())) == cost.shape[1] for c in cols]
    tol = 4 * cost.shape[1] * np.spacing(np.abs(optimum))
    return int(sum(u and abs(t - o) <= e for u, t, o, e in zip(unique, totals, optimum, tol)))


def reference_totals(host: np.ndarray, solved: dict[str, np.ndarray]) -> np.ndarray:
    """float64 [B]: scipy's optimal totals (from its run when it ran, else croc's CPU solver, which
    the tests hold to scipy's optimum)."""
    cols = solved.get("scipy-loop")
    if cols is None:
        cols = croc.linear_sum_assignment(torch.from_numpy(host), backend="cpu").numpy()
    rows = np.arange(host.shape[1])
    return np.array([problem[rows, c].sum() for problem, c in zip(host, cols)])


def bench_case(batch: int, n: int, m: int, dim: int, pool: str, args) -> list[dict]:
    cost = make_costs(batch, n, m, dim, pool, args.device, seed=batch * 7 + POOLS.index(pool))
    host = cost.cpu().double().numpy()
    with_peers = args.device == "cpu" or args.quick or batch == PEER_BATCH_ON_CUDA
    results, solved = [], {}
    for name, fn in providers(args.device, with_peers).items():
        row = {"pool": pool, "batch": batch, "n": n, "m": m, "dim": dim, "provider": name}
        try:
            if name.startswith("croc"):
                fn(cost)  # warm-up (thread pool, CUDA context, first-call allocations)
            ms, cols = timed(lambda fn=fn: fn(cost), args.device, args.reps)
            solved[name] = cols.cpu().numpy() if isinstance(cols, torch.Tensor) else np.asarray(cols)
            row.update(ms=round(ms, 3), status="ok")
        except Exception as error:  # a failing peer is recorded, not dropped
            row.update(ms=float("nan"), status=f"error: {type(error).__name__}: {error}"[:200])
        results.append(row)
    optimum = reference_totals(host, solved)
    reference = {r["provider"]: r["ms"] for r in results}
    for row in results:
        if row["status"] != "ok":
            continue
        row["optimal"] = f"{optimal_count(host, solved[row['provider']], optimum)}/{batch}"
        for peer, column in (("scipy-loop", "x_vs_scipy"), ("lapx-lapjvr", "x_vs_lapx")):
            if peer in reference:
                row[column] = round(reference[peer] / row["ms"], 2)
    return results


def plot(rows: list[dict], path: Path) -> Path | None:
    plt = common.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(POOLS), figsize=(11, 4.2), squeeze=False)
    for ax, pool in zip(axes[0], POOLS):
        for name in dict.fromkeys(r["provider"] for r in rows):
            points = [(r["batch"], r["ms"]) for r in rows if r["pool"] == pool and r["provider"] == name]
            points = [(b, ms) for b, ms in points if ms == ms]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(title=f"{pool} pool", xlabel="batch (problems of 432 x 2048)", ylabel="ms (median)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    env = common.environment(rows[0]["device_kind"]) if rows else {}
    fig.suptitle(f"croc.linear_sum_assignment — {env.get('device', '')}, {env.get('date', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None):
    parser = common.base_parser(__doc__, "tiny sizes, a few seconds (CI smoke test)")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--pools", nargs="+", choices=POOLS, default=list(POOLS))
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    n, m, dim = (48, 160, 64) if args.quick else (432, 2048, 4096)
    batches = [2, 4] if args.quick else args.batches
    reps = 2 if args.quick else args.reps
    args.reps = reps
    env = common.environment(args.device)
    env["cpu"] = common.device_name("cpu")
    stem = f"assignment_{args.device}"
    cases = [(b, pool) for pool in args.pools for b in batches]
    rows: list[dict] = []
    tqdm = common.progress_bar()
    for batch, pool in tqdm(cases, desc="assignment", disable=args.quick):
        for row in bench_case(batch, n, m, dim, pool, args):
            rows.append({**row, **env, "device_kind": args.device})
        common.write_csv(
            args.out / f"{stem}.csv", [{k: v for k, v in r.items() if k != "device_kind"} for r in rows]
        )
    plot(rows, args.out / f"{stem}.png")
    columns = ["pool", "batch", "provider", "ms", "x_vs_scipy", "x_vs_lapx", "optimal", "status"]
    print(f"assignment on {env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date']}")
    common.print_table(rows, columns)
    return rows


if __name__ == "__main__":
    main()
