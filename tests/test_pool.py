"""croc.PromptTokenPool and croc.random_replace_mask against brute-force references."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import croc


@pytest.mark.parametrize(
    ("batch", "num_tokens", "ratio"), [(3, 576, 0.75), (2, 7, 0.5), (4, 1, 0.75), (1, 9, 0.0), (2, 5, 1.0)]
)
def test_random_replace_mask_picks_exact_count(batch, num_tokens, ratio):
    mask = croc.random_replace_mask(batch, num_tokens, ratio)
    assert mask.dtype == torch.bool and mask.shape == (batch, num_tokens)
    assert mask.sum(dim=1).tolist() == [round(ratio * num_tokens)] * batch


def test_random_replace_mask_generator_reproducible_and_rows_differ():
    first = croc.random_replace_mask(4, 64, generator=torch.Generator().manual_seed(3))
    second = croc.random_replace_mask(4, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    assert len({tuple(row.tolist()) for row in first}) == 4


@pytest.mark.parametrize(
    ("args", "match"), [((2, 5, 1.5), "ratio"), ((-1, 5, 0.5), "batch"), ((2, 2.5, 0.5), "num_tokens")]
)
def test_random_replace_mask_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        croc.random_replace_mask(*args)


def _inputs(batch=3, length=10, dim=8, ratio=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, dim, generator=gen)
    return tokens, croc.random_replace_mask(batch, length, ratio, generator=gen)


def _selected(tokens, mask):
    return tokens[mask].view(tokens.shape[0], -1, tokens.shape[2])


@pytest.mark.parametrize("init", ["normal", "normalized"])
def test_pool_cost_is_l2_distance_of_normalised_tokens(init):
    torch.manual_seed(0)
    pool = croc.PromptTokenPool(16, 8, init=init)
    tokens, mask = _inputs()
    selected = _selected(tokens, mask)
    expected = torch.cdist(F.normalize(selected, dim=-1).double(), pool.tokens.detach().double())
    torch.testing.assert_close(pool.cost(selected).double(), expected, atol=1e-5, rtol=1e-5)
    if init == "normalized":
        torch.testing.assert_close(pool.tokens.norm(dim=-1), torch.ones(16))


@pytest.mark.parametrize("init", ["normal", "normalized"])
def test_hungarian_replacement_is_one_to_one_pool_tokens(init):
    torch.manual_seed(1)
    pool = croc.PromptTokenPool(12, 8, init=init)
    tokens, mask = _inputs(batch=4, length=15, ratio=0.6)
    new_tokens, cols = pool(tokens, mask)
    assert cols.dtype == torch.int64 and cols.shape == mask.shape
    assert bool((cols[~mask] == -1).all()) and bool((cols[mask] >= 0).all())
    for row in range(4):
        chosen = cols[row][mask[row]]
        assert chosen.unique().numel() == chosen.numel()
    torch.testing.assert_close(new_tokens[mask], pool.tokens.detach()[cols[mask]], rtol=0, atol=0)
    torch.testing.assert_close(new_tokens[~mask], tokens[~mask], rtol=0, atol=0)


def test_hungarian_total_cost_is_the_brute_force_optimum():
    torch.manual_seed(2)
    pool = croc.PromptTokenPool(6, 4)
    tokens, mask = _inputs(batch=3, length=6, dim=4, ratio=0.5)
    _, cols = pool(tokens, mask)
    cost = pool.cost(_selected(tokens, mask)).double()
    for row in range(3):
        n = cost.shape[1]
        best = min(
            sum(cost[row, i, c].item() for i, c in enumerate(perm))
            for perm in itertools.permutations(range(6), n)
        )
        got = cost[row, torch.arange(n), cols[row][mask[row]]].sum().item()
        assert got == pytest.approx(best, abs=1e-9)


def test_nearest_assignment_takes_the_argmin():
    torch.manual_seed(3)
    pool = croc.PromptTokenPool(5, 8, assignment="nearest")
    tokens, mask = _inputs(batch=2, length=12, ratio=0.75)
    _, cols = pool(tokens, mask)
    selected = F.normalize(_selected(tokens, mask), dim=-1)
    expected = torch.cdist(selected.double(), pool.tokens.detach().double()).argmin(dim=-1)
    assert torch.equal(cols[mask].view(2, -1), expected)


def test_batched_result_equals_one_row_at_a_time_and_num_replaced_path():
    torch.manual_seed(4)
    pool = croc.PromptTokenPool(20, 8)
    tokens, mask = _inputs(batch=3, length=11, ratio=0.75)
    batched, cols = pool(tokens, mask)
    given, given_cols = pool(tokens, mask, num_replaced=int(mask[0].sum()))
    assert torch.equal(batched, given) and torch.equal(cols, given_cols)
    for row in range(3):
        one, one_cols = pool(tokens[row : row + 1], mask[row : row + 1])
        assert torch.equal(one[0], batched[row]) and torch.equal(one_cols[0], cols[row])


def test_gradients_reach_the_pool_through_the_replacement_only():
    torch.manual_seed(5)
    pool = croc.PromptTokenPool(10, 8)
    tokens, mask = _inputs(batch=2, length=9, ratio=0.5)
    tokens.requires_grad_(True)
    new_tokens, cols = pool(tokens, mask)
    upstream = torch.randn_like(new_tokens)
    (new_tokens * upstream).sum().backward()
    expected = torch.zeros_like(pool.tokens)
    expected.index_add_(0, cols[mask], upstream[mask])
    torch.testing.assert_close(pool.tokens.grad, expected)
    torch.testing.assert_close(tokens.grad[~mask], upstream[~mask])
    assert bool((tokens.grad[mask] == 0).all())


def test_empty_selection_and_dtype_kept():
    pool = croc.PromptTokenPool(4, 8).to(torch.bfloat16)
    tokens = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    new_tokens, cols = pool(tokens, torch.zeros(2, 5, dtype=torch.bool))
    assert new_tokens.dtype == torch.bfloat16 and torch.equal(new_tokens, tokens)
    assert bool((cols == -1).all())


@pytest.mark.parametrize(
    ("tokens", "mask", "error", "match"),
    [
        (
            torch.randn(3, 12, 8),
            torch.tensor([[1] * 3 + [0] * 9, [1] * 9 + [0] * 3, [0] * 12], dtype=torch.bool),
            ValueError,
            r"at most num_tokens=8 replaced tokens per row, but row 1 of replace_mask selects 9",
        ),
        (torch.randn(2, 4, 7), torch.zeros(2, 4, dtype=torch.bool), ValueError, "tokens must have shape"),
        (torch.randn(2, 4, 8), torch.zeros(2, 4), TypeError, "replace_mask must be a bool"),
        (
            torch.randn(2, 4, 8),
            torch.zeros(2, 5, dtype=torch.bool),
            ValueError,
            "replace_mask must have shape",
        ),
        (torch.randn(1, 9, 8), torch.ones(1, 9, dtype=torch.bool), ValueError, "at most num_tokens"),
    ],
)
def test_pool_rejects_bad_inputs(tokens, mask, error, match):
    pool = croc.PromptTokenPool(8, 8)
    with pytest.raises(error, match=match):
        pool(tokens, mask)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"init": "xavier"}, "init"), ({"assignment": "greedy"}, "assignment")]
)
def test_pool_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        croc.PromptTokenPool(8, 8, **kwargs)


def test_ragged_rows_are_solved_in_one_call_like_each_row_alone(monkeypatch):
    """Rows selecting 0..N tokens: one batched solve (num_rows), each row as if it were alone."""
    torch.manual_seed(6)
    pool = croc.PromptTokenPool(16, 8)
    tokens = torch.randn(4, 12, 8)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    for row, count in enumerate((7, 0, 12, 3)):
        mask[row, torch.randperm(12)[:count]] = True
    calls = []
    solve = croc.pool.linear_sum_assignment
    monkeypatch.setattr(croc.pool, "linear_sum_assignment", lambda *a, **k: calls.append(k) or solve(*a, **k))
    new_tokens, cols = pool(tokens, mask)
    assert len(calls) == 1 and calls[0]["num_rows"].tolist() == [7, 0, 12, 3]
    assert torch.equal(cols >= 0, mask)
    for row in range(4):
        one, one_cols = pool(tokens[row : row + 1], mask[row : row + 1])
        assert torch.equal(one_cols[0], cols[row]) and torch.equal(one[0], new_tokens[row])
        assert len(set(cols[row][mask[row]].tolist())) == int(mask[row].sum())  # one-to-one
    torch.testing.assert_close(new_tokens[mask], pool.tokens[cols[mask]].detach())
    assert torch.equal(new_tokens[~mask], tokens[~mask])


def test_ragged_gradients_skip_the_padding_slots():
    torch.manual_seed(7)
    pool = croc.PromptTokenPool(10, 8)
    tokens = torch.randn(2, 9, 8, requires_grad=True)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :6] = True
    mask[1, 4:6] = True
    new_tokens, cols = pool(tokens, mask)
    upstream = torch.randn_like(new_tokens)
    (new_tokens * upstream).sum().backward()
    expected = torch.zeros_like(pool.tokens).index_add_(0, cols[mask], upstream[mask])
    torch.testing.assert_close(pool.tokens.grad, expected)
    torch.testing.assert_close(tokens.grad[~mask], upstream[~mask])
    assert bool((tokens.grad[mask] == 0).all())


def test_nearest_pool_accepts_rows_larger_than_the_pool():
    torch.manual_seed(8)
    pool = croc.PromptTokenPool(4, 8, assignment="nearest")
    tokens = torch.randn(2, 10, 8)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0] = True
    mask[1, :2] = True
    _, cols = pool(tokens, mask)
    assert torch.equal(cols[mask], pool.cost(tokens[mask][None])[0].argmin(-1))
    assert bool((cols[~mask] == -1).all())
