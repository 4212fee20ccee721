"""Reading transformers' mask functions: what they compute, as one key interval per query.

transformers describes a layer's mask as a Python function of ``(batch_idx, head_idx, q_idx,
kv_idx)`` composed from small pieces (causal, sliding window, packed sequences, the blockwise image
overlay, padding) with and/or. :func:`_trace_mask_function` calls it on symbolic indices
(:class:`_Sym`; a TorchFunctionMode turns tensor lookups such as ``ids[b, q]`` into symbolic
gathers, which also traces under torch.compile) and returns the expression it computed;
:class:`_Builder` turns that expression into per-query key intervals ``[lo, hi)`` (int64 [B, Lq])
with O(B · L) tensors, raising :class:`_Unsupported` for anything that is not one interval per
query. Used by the ``"croc_mixed"`` mask builder in :mod:`croc.integrations.transformers`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from transformers.masking_utils import prepare_padding_mask

from croc.mask import _repeated_run_values

_BIG = 1 << 40


class _Unsupported(Exception):
    """The mask function computes something that is not one key interval per query."""


class _Sym:
    """A symbolic index: transformers' mask functions run on it and return the expression they compute."""

    device = None

    def __init__(self, expr: Any) -> None:
        self.expr = expr

    def _op(self, name: str, other: Any) -> _Sym:
        return _Sym((name, self.expr, other.expr if isinstance(other, _Sym) else other))

    def __le__(self, o):
        return self._op("le", o)

    def __lt__(self, o):
        return self._op("lt", o)

    def __ge__(self, o):
        return self._op("ge", o)

    def __gt__(self, o):
        return self._op("gt", o)

    def __eq__(self, o):
        return self._op("eq", o)

    def __sub__(self, o):
        return self._op("sub", o)

    def __add__(self, o):
        return self._op("add", o)

    def __and__(self, o):
        return self._op("and", o)

    def __or__(self, o):
        return self._op("or", o)

    __hash__ = None

    def new_ones(self, *args: Any, **kwargs: Any) -> _Sym:
        return _Sym(True)

    def new_zeros(self, *args: Any, **kwargs: Any) -> _Sym:
        return _Sym(False)

    def to(self, *args: Any, **kwargs: Any) -> _Sym:
        return self


class _GatherMode(TorchFunctionMode):
    """Turns ``tensor[batch_idx, q_idx]`` with symbolic indices into a symbolic gather (traceable by dynamo)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        index = args[1] if func is torch.Tensor.__getitem__ and len(args) == 2 else None
        if isinstance(index, tuple) and any(isinstance(i, _Sym) for i in index):
            return _Sym(("gather", args[0], tuple(i.expr if isinstance(i, _Sym) else i for i in index)))
        return func(*args, **(kwargs or {}))


def _trace_mask_function(mask_function) -> Any:
    """The expression tree ``mask_function`` computes, over the symbols "b", "h", "q", "kv"."""
    try:
        with _GatherMode():
            out = mask_function(_Sym("b"), _Sym("h"), _Sym("q"), _Sym("kv"))
    except (TypeError, AttributeError, IndexError, RuntimeError, ValueError) as error:
        raise _Unsupported(f"mask function not traceable symbolically ({error})") from error
    if isinstance(out, _Sym):
        return out.expr
    if isinstance(out, bool):
        return out
    raise _Unsupported(f"mask function returned {type(out).__name__}")


class _Intervals:
    """Per-query key sets as intervals [lo, hi) of absolute key positions, int64 [B or 1, Lq].

    ``diag``: statically known to contain the query's own position whenever non-empty (what makes a
    union of two intervals an interval). ``monotone``: statically known that the non-empty intervals
    have non-decreasing ``lo`` and ``hi`` along the queries (true of every leaf; kept by ``and_``,
    max/min of non-decreasing sequences; by ``or_`` only for a causal band with blocks, see there).
    ``shape``: ``"causal"`` (every key up to ``q + s``, ``s >= 0``) or ``"block"`` (the contiguous
    run holding the query, empty outside runs), else None.
    """

    def __init__(
        self, lo: torch.Tensor, hi: torch.Tensor, diag: bool, monotone: bool = True, shape: str | None = None
    ) -> None:
        self.lo, self.hi, self.diag, self.monotone, self.shape = lo, hi, diag, monotone, shape

    def empty(self) -> torch.Tensor:
        return self.hi <= self.lo

    def and_(self, o: _Intervals) -> _Intervals:
        lo, hi = torch.maximum(self.lo, o.lo), torch.minimum(self.hi, o.hi)
        return _Intervals(lo, hi, self.diag and o.diag, self.monotone and o.monotone)

    def or_(self, o: _Intervals) -> _Intervals:
        if not (self.diag and o.diag):
            raise _Unsupported("union of intervals that need not overlap")
        lo, hi = torch.minimum(self.lo, o.lo), torch.maximum(self.hi, o.hi)
        lo = torch.where(self.empty(), o.lo, torch.where(o.empty(), self.lo, lo))
        hi = torch.where(self.empty(), o.hi, torch.where(o.empty(), self.hi, hi))
        # causal | blocks: lo stays -inf, hi is q + 1 + s outside the runs and max(q + 1 + s, run end)
        # inside, non-decreasing as the runs are disjoint and ordered; any other union: the data decide
        return _Intervals(lo, hi, True, monotone={self.shape, o.shape} == {"causal", "block"})


class _Builder:
    """Turns an expression tree into :class:`_Intervals` for the queries at absolute positions ``q_pos``."""

    def __init__(self, q_pos: torch.Tensor) -> None:
        self.q_pos = q_pos[None, :]  # int64 [1, Lq]
        self.checks: list[torch.Tensor] = []  # bool tensors, True where an assumption fails
        self.remapped = False
        self.packed = False
        self.segments: torch.Tensor | None = None  # [B, N] packed-sequence ids ANDed over the whole mask
        self._composed: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def build_root(self, e: Any) -> _Intervals:
        """:meth:`build` for the whole mask, first noting a top-level ``X & (S[q] == S[kv])`` (packed
        sequences): inside ``X``, values need to form one run per value only within each sequence."""
        if isinstance(e, tuple) and e[0] == "and" and isinstance(e[2], tuple) and e[2][0] == "eq":
            segments = self._gathered(e[2][1], "q")
            if segments is not None and segments is self._gathered(e[2][2], "kv"):
                self.segments = segments
        return self.finish(self.build(e))

    def const(self, value: bool) -> _Intervals:
        lo = torch.full_like(self.q_pos, -_BIG if value else 0)
        return _Intervals(lo, torch.full_like(self.q_pos, _BIG if value else 0), True)

    def build(self, e: Any) -> _Intervals:
        if isinstance(e, bool):
            return self.const(e)
        if not isinstance(e, tuple):
            raise _Unsupported(f"leaf {e!r}")
        op = e[0]
        if op == "and" and self._is_block(e):
            block = self._same_run(e[1][1], e[1][2], nonnegative=True).and_(self.build(e[2]))
            return _Intervals(block.lo, block.hi, block.diag, shape="block")
        if op in ("and", "or"):
            for side, other in ((e[1], e[2]), (e[2], e[1])):
                if isinstance(side, bool) and side == (op == "and"):  # and_masks / or_masks start from it
                    return self.build(other)
            a, b = self.build(e[1]), self.build(e[2])
            return a.and_(b) if op == "and" else a.or_(b)
        if op in ("le", "lt", "gt", "ge") and self._is_band(e):
            return self._band(e)
        if op in ("le", "lt", "gt", "ge") and self._remapped_band(e) is not None:
            return self._remapped_band(e)
        if op == "eq":
            return self._same_run(e[1], e[2])
        if op == "ge" and isinstance(e[2], int):
            return self._query_predicate(e[1], e[2])
        raise _Unsupported(f"expression {op!r}")

    @staticmethod
    def _offset(e: Any, sym: str) -> int | None:
        """``c`` if ``e`` is ``sym + c`` (ints only), else None."""
        if isinstance(e, str):
            return 0 if e == sym else None
        if isinstance(e, tuple) and e[0] in ("add", "sub") and isinstance(e[2], int) and e[1] == sym:
            return e[2] if e[0] == "add" else -e[2]
        return None

    def _is_band(self, e: Any) -> bool:
        return (self._offset(e[1], "kv") is not None and self._offset(e[2], "q") is not None) or (
            self._offset(e[1], "q") is not None and self._offset(e[2], "kv") is not None
        )

    def _band(self, e: Any) -> _Intervals:
        """``kv + a  OP  q + c`` (or mirrored): keys in a band around the query."""
        op = e[0]
        if self._offset(e[1], "q") is not None:  # q + c OP kv + a  ->  kv + a  OP'  q + c
            op = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt"}[op]
            e = (op, e[2], e[1])
        shift = self._offset(e[2], "q") - self._offset(e[1], "kv")  # kv OP q + shift
        q = self.q_pos
        big = torch.full_like(q, _BIG)
        bounds = {
            "le": (-big, q + shift + 1),
            "lt": (-big, q + shift),
            "ge": (q + shift, big),
            "gt": (q + shift + 1, big),
        }[op]
        diag = (op == "le" and shift >= 0) or (op == "lt" and shift > 0) or (op == "ge" and shift <= 0)
        causal = (op == "le" and shift >= 0) or (op == "lt" and shift > 0)
        return _Intervals(*bounds, diag or (op == "gt" and shift < 0), shape="causal" if causal else None)

    def _remapped_band(self, e: Any) -> _Intervals | None:
        """A band over positions ``P[b, kv] + a OP P[b, q] + c`` (packed rows, transformers >= 5.2x; a
        sliding window remapped too): the index band inside the query's segment of consecutive
        positions; exact once ANDed with the packed same-sequence mask transformers adds (required
        in :meth:`finish`)."""
        for mirrored, (kv_side, q_side) in ((False, (e[1], e[2])), (True, (e[2], e[1]))):
            kv_positions, kv_band = self._positions(kv_side, "kv")
            q_positions, q_band = self._positions(q_side, "q")
            if kv_positions is not None and kv_positions is q_positions:
                positions = kv_positions
                band = self._band((e[0], q_band, kv_band) if mirrored else (e[0], kv_band, q_band))
                self.remapped = True
                segment = self._runs(torch.diff(positions, prepend=positions[:, :1] - 1) != 1, False)
                return band.and_(segment)
        return None

    def _positions(self, e: Any, sym: str) -> tuple[torch.Tensor | None, Any]:
        """``(P, sym + c)`` if ``e`` is ``P[b, sym] + c`` (or ``- c``, or no offset), else ``(None, None)``."""
        if isinstance(e, tuple) and e[0] in ("add", "sub") and isinstance(e[2], int):
            positions = self._gathered(e[1], sym)
            return (positions, (e[0], sym, e[2])) if positions is not None else (None, None)
        positions = self._gathered(e, sym)
        return (positions, sym) if positions is not None else (None, None)

    def finish(self, iv: _Intervals) -> _Intervals:
        if self.remapped and not self.packed:
            raise _Unsupported("positions remapped without the packed same-sequence mask")
        return iv

    def _runs(self, starts: torch.Tensor, check_values: torch.Tensor | bool) -> _Intervals:
        """The run (bool [B, N] ``starts``) holding each query; checks each value has one run."""
        n = starts.shape[1]
        pos = torch.arange(n, device=starts.device).expand_as(starts)
        starts = starts.clone()
        starts[:, 0] = True
        ends = torch.ones_like(starts)
        ends[:, :-1] = starts[:, 1:]
        run_start = torch.where(starts, pos, 0).cummax(1).values
        run_end = torch.where(ends, pos + 1, n).flip(1).cummin(1).values.flip(1)
        if isinstance(check_values, torch.Tensor):
            self.checks.append(_repeated_run_values(check_values, starts))
        return _Intervals(self._at_queries(run_start), self._at_queries(run_end), True)

    def _gathered(self, e: Any, sym: str) -> torch.Tensor | None:
        """The [B, N] tensor ``T`` if ``e`` is ``T[b, sym]``; ``T[b, P[b, sym]]`` (``T`` read at the
        remapped positions ``P`` of packed rows) gives the gathered tensor, one object per (T, P)."""
        if not (isinstance(e, tuple) and e[0] == "gather" and isinstance(e[1], torch.Tensor)):
            return None
        if len(e[2]) != 2 or e[2][0] != "b":
            return None
        if e[2][1] == sym:
            return e[1]
        index = self._gathered(e[2][1], sym)
        if index is None:
            return None
        key = (id(e[1]), id(index))
        if key not in self._composed:  # the tensors are kept with the result, so the ids stay unique
            read = e[1].gather(1, index.to(torch.int64).clamp(0, e[1].shape[1] - 1))
            self._composed[key] = (e[1], index, read)
        return self._composed[key][2]

    def _at_queries(self, t: torch.Tensor) -> torch.Tensor:
        index = self.q_pos.clamp(0, t.shape[1] - 1).expand(t.shape[0], -1)
        return t.gather(1, index)

    def _is_block(self, e: Any) -> bool:
        """``(T[q] == T[kv]) & (T[q] >= 0)``: transformers' blockwise overlay (image blocks)."""
        eq, ge = e[1], e[2]
        return (
            isinstance(eq, tuple) and isinstance(ge, tuple) and eq[0] == "eq" and ge[0] == "ge"
            and ge[2] == 0 and self._gathered(eq[1], "q") is not None
            and self._gathered(eq[1], "q") is self._gathered(ge[1], "q")
        )  # fmt: skip

    def _same_run(self, a: Any, b: Any, nonnegative: bool = False) -> _Intervals:
        """``T[b, q] == T[b, kv]``: the run of equal values holding the query (each value one run)."""
        t = self._gathered(a, "q")
        if t is None or t is not self._gathered(b, "kv"):
            raise _Unsupported("equality that is not T[q] == T[kv]")
        values = t.to(torch.int64)
        starts = torch.ones_like(values, dtype=torch.bool)
        starts[:, 1:] = values[:, 1:] != values[:, :-1]
        self.packed = self.packed or not nonnegative
        if not nonnegative:
            return self._runs(starts, values)
        checked = torch.where(
            values >= 0, values, torch.arange(values.shape[1], device=values.device) - values.shape[1]
        )
        if self.segments is not None:  # one run per value and packed sequence: key (sequence, value)
            segments = self.segments.to(torch.int64)
            starts[:, 1:] |= segments[:, 1:] != segments[:, :-1]
            low = checked.min()
            checked = segments * (checked.max() - low + 1) + (checked - low)
        return self._runs(starts, checked)

    def _query_predicate(self, a: Any, c: int) -> _Intervals:
        """``T[b, q] >= c``: every key or none."""
        t = self._gathered(a, "q")
        if t is None:
            raise _Unsupported("comparison that is not T[q] >= c")
        keep = self._at_queries(t) >= c
        full = self.const(True)
        return _Intervals(torch.where(keep, full.lo, 0), torch.where(keep, full.hi, 0), True)


def _padding_intervals(kw: dict[str, Any], builder: _Builder) -> _Intervals | None:
    """The valid keys of each row as one interval [run start, run end) (absolute positions)."""
    attention_mask = kw.get("attention_mask")
    if attention_mask is None:
        return None
    kv_offset, kv_length = kw.get("kv_offset", 0), kw["kv_length"]
    valid = prepare_padding_mask(attention_mask.to(torch.bool), kv_length, kv_offset)
    runs = valid[:, :1].to(torch.int64).sum(1) + (valid[:, 1:] & ~valid[:, :-1]).sum(1)
    builder.checks.append(runs > 1)
    start = valid.to(torch.int32).argmax(dim=1, keepdim=True).to(torch.int64)
    end = start + valid.sum(dim=1, keepdim=True)
    return _Intervals(start, end, False)
