"""The learnable prompt token pool of Croc and the random choice of the tokens it replaces.

``pool = PromptTokenPool(num_tokens=2048, dim=4096)`` holds ``pool.tokens`` [num_tokens, dim].
``new_tokens, cols = pool(tokens, replace_mask)`` replaces the selected visual tokens of every
image by pool tokens, assigned one-to-one by the Hungarian algorithm on the L2 distance between
the L2-normalised selected tokens and the pool tokens (or each to its nearest pool token). The
whole batch is handled at once (one batched :func:`croc.linear_sum_assignment` call: the CUDA
kernel for CUDA tensors, the C++ solver on the CPU); the assignment runs under ``torch.no_grad``
(it is not differentiated) and the gradient reaches the pool through the gathered replacement tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from croc.assignment import linear_sum_assignment
from croc.constants import ASSIGNMENTS as _ASSIGNMENTS
from croc.constants import POOL_INITS as _INITS

__all__ = ["PromptTokenPool", "random_replace_mask"]


def random_replace_mask(
    batch: int,
    num_tokens: int,
    ratio: float = 0.75,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Pick ``round(ratio * num_tokens)`` tokens of every row uniformly at random.

    Args:
        batch, num_tokens: the shape of the result.
        ratio: fraction to pick, in [0, 1] (Python ``round`` decides the count: 0.75 * 576 -> 432).
        generator: optional torch.Generator on ``device`` for reproducible picks.
        device: where the mask lives.

    Returns:
        bool [batch, num_tokens] with exactly ``round(ratio * num_tokens)`` True in every row.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be a non-negative int, got {batch!r}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    count = round(float(ratio) * num_tokens)
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)
    picked = noise.argsort(dim=1)[:, :count]
    mask = torch.zeros(batch, num_tokens, dtype=torch.bool, device=noise.device)
    return mask.scatter_(1, picked, True)


def _check_inputs(tokens: torch.Tensor, replace_mask: torch.Tensor, dim: int) -> None:
    if not isinstance(tokens, torch.Tensor) or not tokens.is_floating_point():
        raise TypeError(f"tokens must be a floating-point torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3 or tokens.shape[2] != dim:
        raise ValueError(f"tokens must have shape [batch, num_tokens, {dim}], got {tuple(tokens.shape)}")
    if not isinstance(replace_mask, torch.Tensor) or replace_mask.dtype != torch.bool:
        raise TypeError("replace_mask must be a bool torch.Tensor")
    if tuple(replace_mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(
            f"replace_mask must have shape {tuple(tokens.shape[:2])}, got {tuple(replace_mask.shape)}"
        )
    if replace_mask.device != tokens.device:
        raise ValueError(f"replace_mask is on {replace_mask.device} but tokens are on {tokens.device}")


class PromptTokenPool(nn.Module):
    """Learnable pool of prompt tokens that stand in for a fraction of the visual tokens.

    Args:
        num_tokens: pool size M (2048 in the paper).
        dim: token width D (the LLM hidden size).
        init: ``"normal"`` (standard normal entries, the paper) or ``"normalized"`` (normal rows
            scaled to unit L2 norm). Costs use the pool tokens as stored.
        assignment: ``"hungarian"`` (one-to-one, minimum total distance per image; needs
            ``num_replaced <= num_tokens``) or ``"nearest"`` (each token takes its nearest pool token,
            as the released code does; not one-to-one).

    Attributes:
        tokens: nn.Parameter [num_tokens, dim].
    """

    def __init__(
        self, num_tokens: int = 2048, dim: int = 4096, init: str = "normal", assignment: str = "hungarian"
    ) -> None:
        super().__init__()
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if assignment not in _ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {_ASSIGNMENTS}, got {assignment!r}")
        if num_tokens <= 0 or dim <= 0:
            raise ValueError(f"num_tokens and dim must be positive, got {num_tokens} and {dim}")
        self.init = init
        self.assignment = assignment
        # kept as ints: under DeepSpeed ZeRO-3 the parameter itself is partitioned to shape (0,)
        self._num_tokens, self._dim = int(num_tokens), int(dim)
        self.tokens = nn.Parameter(torch.empty(num_tokens, dim))
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def dim(self) -> int:
        return self._dim

    def reset_parameters(self) -> None:
        """Re-draw the pool tokens with the configured ``init``."""
        with torch.no_grad():
            self.tokens.normal_()
            if self.init == "normalized":
                self.tokens.copy_(F.normalize(self.tokens, dim=-1))

    def cost(self, selected: torch.Tensor) -> torch.Tensor:
        """float32 [B, n, M]: L2 distance of the normalised ``selected`` [B, n, D] tokens to each pool token."""
        query = F.normalize(selected.detach().float(), dim=-1)
        pool = self.tokens.detach().float()
        squared = query.pow(2).sum(-1, keepdim=True) + pool.pow(2).sum(-1) - 2.0 * query @ pool.T
        return squared.clamp_min(0.0).sqrt()

    def forward(
        self, tokens: torch.Tensor, replace_mask: torch.Tensor, num_replaced: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the selected tokens of every row by their assigned pool tokens.

        Args:
            tokens: float [B, N, D] visual tokens (any float dtype; the output keeps it).
            replace_mask: bool [B, N], True at the tokens to replace. Rows may select different
                numbers of tokens (dynamic resolution, padded rows, several images of one sample
                solved jointly): all rows are solved in one batched call. With ``"hungarian"`` a
                row may select at most ``num_tokens`` tokens.
            num_replaced: n, if every row selects exactly n tokens and n is known (e.g.
                ``round(ratio * N)``): skips reading the counts from the mask (one device-to-host
                sync) and is not checked against it.

        Returns:
            new_tokens: [B, N, D] in ``tokens.dtype``; unselected tokens unchanged, selected ones
                equal to ``self.tokens[cols]``, with the gradient flowing into ``self.tokens``
                (and into ``tokens`` at the unselected positions).
            cols: int64 [B, N]; the pool index given to each selected token, -1 elsewhere.

        Raises:
            ValueError: with ``"hungarian"``, a row selects more tokens than the pool holds (the
                message names the row).
        """
        _check_inputs(tokens, replace_mask, self.dim)
        batch, length, dim = tokens.shape
        if num_replaced is not None:
            counts, width = None, int(num_replaced)
        elif torch.compiler.is_compiling():  # no host sync: every row's slots padded to all N tokens
            counts, width = replace_mask.sum(dim=1), length
        else:
            counts = replace_mask.sum(dim=1)  # [B]
            width = int(counts.max()) if batch else 0
        if self.assignment == "hungarian" and width > self.num_tokens:
            self._check_not_too_many(counts, width)
        positions = (~replace_mask).to(torch.int8).argsort(dim=1, stable=True)[:, :width]  # [B, n]
        gather_index = positions.unsqueeze(-1).expand(batch, width, dim)
        selected = tokens.gather(1, gather_index)
        chosen = self.assign(selected, counts)  # [B, n], -1 past a row's count
        replacement = self.tokens.index_select(0, chosen.clamp_min(0).reshape(-1)).view(batch, width, dim)
        if counts is not None:  # slots past a row's count hold unselected tokens: write them back
            replacement = torch.where((chosen >= 0).unsqueeze(-1), replacement.to(tokens.dtype), selected)
        new_tokens = tokens.scatter(1, gather_index, replacement.to(tokens.dtype))
        cols = torch.full((batch, length), -1, dtype=torch.int64, device=tokens.device)
        return new_tokens, cols.scatter(1, positions, chosen)

    def assign(self, selected: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """int64 [B, n]: the pool token given to each of the ``selected`` [B, n, D] tokens (not
        differentiated); with ``counts`` (int [B]) row b uses its first counts[b] tokens and the
        others get -1. Hungarian: one batched :func:`croc.linear_sum_assignment` call."""
        with torch.no_grad():
            cost = self.cost(selected)
            if self.assignment == "nearest":
                chosen = cost.argmin(dim=-1)
            else:
                chosen = linear_sum_assignment(cost, num_rows=counts)
            if counts is None:
                return chosen
            used = torch.arange(selected.shape[1], device=selected.device) < counts.unsqueeze(1)
            return chosen.masked_fill(~used, -1)

    def _check_not_too_many(self, counts: torch.Tensor | None, width: int) -> None:
        if counts is not None and torch.compiler.is_compiling():  # a device-side assert, no sync
            torch._assert_async(
                (counts <= self.num_tokens).all(),
                f"hungarian assignment needs at most num_tokens={self.num_tokens} replaced tokens per "
                "row of replace_mask; use a larger pool, fewer replaced tokens, or assignment='nearest'",
            )
        else:
            self._raise_too_many(counts, width)

    def _raise_too_many(self, counts: torch.Tensor | None, width: int) -> None:
        row = 0 if counts is None else int((counts > self.num_tokens).nonzero()[0, 0])
        raise ValueError(
            f"hungarian assignment needs at most num_tokens={self.num_tokens} replaced tokens per row, "
            f"but row {row} of replace_mask selects {width if counts is None else int(counts[row])}; "
            "use a larger pool, fewer replaced tokens, or assignment='nearest'"
        )

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, dim={self.dim}, init={self.init!r}, assignment={self.assignment!r}"
