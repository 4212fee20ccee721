"""The ``"croc_mixed"`` attention implementation for Hugging Face transformers (5.x).

Importing this module (or calling :func:`register`) registers ``"croc_mixed"`` with transformers'
``AttentionInterface`` (the attention function) and ``AttentionMaskInterface`` (the mask builder
that gives the attention function the padding; without a registered mask builder transformers
hands a custom attention no mask at all).

Use it for the text model only; vision towers keep their own attention::

    model = LlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation={"text_config": "croc_mixed", "vision_config": "sdpa"})
    # or, on a built model:  model.set_attn_implementation({"text_config": "croc_mixed"})
    out = model(input_ids, attention_mask=am, pixel_values=px, croc_mask=croc.MixedMask...(...))

Forward kwargs read by the attention function (transformers passes a model's ``**kwargs`` down
to every attention call; checked for Llama, Qwen2 and LLaVA):

- ``croc_mask``: a :class:`croc.MixedMask` for the call's queries, ``kv_start``/``kv_end`` int32
  [B, Lq'] with ``num_keys <= Lk``. It replaces causal mask and padding in every layer, so build it
  with the same ``attention_mask`` (and ``segment_ids`` for packed rows). ``Lq' == Lq`` uses it as
  is; ``Lq' > Lq`` (a whole-sequence mask during cached decoding) uses its last ``Lq`` rows, i.e.
  the queries are the last ``Lq`` tokens. Keys past ``num_keys`` (empty static-cache slots) are
  never visible.
- ``croc_backend``: ``"auto"`` (default), ``"triton"`` or ``"reference"``, passed to
  :func:`croc.mixed_attention`.

Without ``croc_mask`` the result equals ``"sdpa"``: the mask builder runs transformers' mask
function on symbolic indices (a TorchFunctionMode turns ``ids[b, q]`` into a symbolic gather; this
also traces under torch.compile) and reads what it computes: causal, sliding windows
(``kv > q - w``), packed sequences from ``position_ids`` (``seq[q] == seq[kv]``, and the position
remapping of transformers >= 5.2x), the blockwise image overlay of Gemma-3-style models
(``(ids[q] == ids[kv]) & (ids[q] >= 0)``), padding and KV-cache offsets, composed with and/or. Each
is turned into per-query key intervals in O(L) memory, once per forward and mask type. Data
assumptions (each id one contiguous run, one run of valid tokens per row) are checked with one host
sync per forward and mask type (a device-side assert under torch.compile). A mask that is not one
interval per query (padding holes, unknown mask functions) uses the dense ``sdpa`` mask and
attention, logged once per reason.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from croc.attention import mixed_attention
from croc.mask import MixedMask, _not_monotone, _repeated_run_values

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CausalPaddingMask",
    "causal_padding_mask",
    "croc_mixed_attention",
    "croc_mixed_mask",
    "register",
]

ATTN_IMPLEMENTATION = "croc_mixed"


def causal_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> MixedMask:
    """Causal attention with padding, as key intervals, for queries that may follow a KV cache.

    Args:
        batch_size, q_length, kv_length: B, Lq and Lk of the attention call.
        q_offset: absolute position of the first query (an int, or a 0-d tensor from a static cache).
        kv_offset: absolute position of key 0.
        attention_mask: optional bool/int [B, >= kv_offset + Lk'] padding mask over absolute
            positions (True/1 = real token), shorter masks padded with False as transformers does.
            The valid keys of each row must be ONE contiguous run (left or right padding).
        device: where the intervals live.

    Returns:
        MixedMask with int32 [B, Lq] intervals and ``num_keys == kv_length``: query ``i`` (absolute
        position ``p = q_offset + i``) sees the valid keys at positions ``<= p`` — the same keys as
        ``"sdpa"``, for padding queries too. No host synchronisation.
    """
    query_keys = torch.arange(q_length, device=device) + (q_offset - kv_offset)
    end = (query_keys.to(torch.int64) + 1).expand(batch_size, q_length)
    if attention_mask is None:
        return MixedMask.from_intervals(torch.zeros_like(end), end, kv_length, validate=False)
    padded = prepare_padding_mask(attention_mask.to(device=device, dtype=torch.bool), kv_length, kv_offset)
    valid = padded[:, kv_offset : kv_offset + kv_length]
    run_start = valid.to(torch.int32).argmax(dim=1, keepdim=True).to(torch.int64)
    run_end = run_start + valid.sum(dim=1, keepdim=True)
    end = torch.maximum(torch.minimum(end, run_end), run_start)
    return MixedMask.from_intervals(run_start.expand_as(end), end, kv_length, validate=False)


_BIG = 1 << 40
_logger = logging.getLogger("croc.integrations.transformers")
_logged_fallbacks: set[str] = set()


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


def _log_fallback_once(reason: str) -> None:
    if reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        _logger.warning(
            "croc_mixed: mask not expressible as key intervals (%s); using the dense SDPA mask", reason
        )


class CausalPaddingMask:
    """What the mask builder returns; turned into a :class:`MixedMask` (or the dense mask) on first use.

    Built lazily, once per forward and mask type (every layer of that type shares it), so a call
    that brings its own ``croc_mask`` never pays for it. :meth:`resolve` runs transformers' mask
    function on symbolic indices to read what it computes (causal, sliding windows, packed
    sequences, the blockwise image overlay, and their and/or compositions), builds the key
    intervals in O(L), and checks the data assumptions (each id one contiguous run, one run of
    valid tokens per row) with one host sync (under torch.compile: a device-side assert instead).
    Anything else gives the dense ``sdpa_mask`` (logged once), so the attention equals ``"sdpa"``.

    ``generate()`` with a static cache builds the masks ahead of each step and hands them to the
    model as its ``attention_mask``; ``ndim``/``shape`` make transformers take this object for such
    a prepared mask, and :func:`croc_mixed_mask` rebuilds from the 2D padding mask it holds.
    """

    ndim = 4  # a prepared [B, 1, Lq, Lk] mask to transformers' mask preprocessing

    def __init__(self, sdpa_kwargs: dict[str, Any]) -> None:
        self.sdpa_kwargs = sdpa_kwargs
        self._resolved: MixedMask | torch.Tensor | None = None
        self._done = False

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, 1, Lq, Lk) of the mask this stands for."""
        kw = self.sdpa_kwargs
        return (kw["batch_size"], 1, kw["q_length"], kw["kv_length"])

    def resolve(self) -> MixedMask | torch.Tensor | None:
        """MixedMask (int32 [B, Lq] intervals), or the dense bool [B, 1, Lq, Lk] mask / None of ``sdpa_mask``."""
        if not self._done:
            self._resolved = self._build()
            self._done = True
        return self._resolved

    def _build(self) -> MixedMask | torch.Tensor | None:
        """The MixedMask, whose ``monotone`` flag (the kernels' range schedule) is known statically for
        and-compositions and ``causal | image blocks``; for other unions it is read from the data in
        the same sync (under torch.compile it stays False: the index schedule, same result)."""
        kw = self.sdpa_kwargs
        try:
            lo, hi, monotone, checks = self._intervals(kw)
        except _Unsupported as why:
            _log_fallback_once(str(why))
            return sdpa_mask(**kw)
        bad = torch.stack([c.any() for c in checks]).any() if checks else None
        if torch.compiler.is_compiling():  # no host sync: data-dependent monotonicity stays False
            if bad is not None:
                torch._assert_async(
                    ~bad, "croc_mixed: ids not contiguous runs or padding holes under compile"
                )
        elif bad is not None or not monotone:
            flags = [bad if bad is not None else torch.zeros((), dtype=torch.bool, device=lo.device)]
            flags += [] if monotone else [_not_monotone(lo, hi)]
            values = torch.stack(flags).tolist()  # the one host sync of this forward and mask type
            if values[0]:
                _log_fallback_once("padding holes or non-contiguous ids")
                return sdpa_mask(**kw)
            monotone = monotone or not values[1]
        return MixedMask.from_intervals(lo, hi, kw["kv_length"], validate=False, monotone=monotone)

    @staticmethod
    def _intervals(kw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, bool, list[torch.Tensor]]:
        """int64 [B, Lq] key intervals (empty ones as [0, 0)), whether they are statically known to be
        monotone, and the bool tensors of the data assumptions (True where one fails)."""
        device = kw.get("device", "cpu")
        q_offset, kv_offset, kv_length = kw.get("q_offset", 0), kw.get("kv_offset", 0), kw["kv_length"]
        q_pos = torch.arange(kw["q_length"], device=device, dtype=torch.int64) + q_offset
        builder = _Builder(q_pos)
        expr = _trace_mask_function(kw.get("mask_function", causal_mask_function))
        iv = builder.build_root(expr)
        padding = _padding_intervals(kw, builder)
        if padding is not None:
            iv = iv.and_(_Intervals(padding.lo.to(device), padding.hi.to(device), False))
        lo = (iv.lo - kv_offset).clamp(0, kv_length)
        hi = (iv.hi - kv_offset).clamp(0, kv_length)
        lo, hi = lo.expand(kw["batch_size"], -1), hi.expand(kw["batch_size"], -1)
        empty = hi <= lo
        lo, hi = torch.where(empty, 0, lo), torch.where(empty, 0, hi)
        return lo, hi, iv.monotone, builder.checks


def croc_mixed_mask(mask_function=causal_mask_function, **kwargs: Any) -> CausalPaddingMask:
    """Mask builder registered in ``AttentionMaskInterface`` for ``"croc_mixed"``.

    Takes the keyword arguments of transformers' ``sdpa_mask`` and returns a lazy
    :class:`CausalPaddingMask`, resolved once per forward (per mask type) by the first layer using it.
    An ``attention_mask`` that is itself a CausalPaddingMask (prepared by ``generate()`` for a static
    cache) stands for the 2D padding mask it was built from. That 2D mask is kept padded to
    ``kv_offset + kv_length`` keys, so every decoding step over a static cache hands a compiled
    forward the same shape (no recompilation as the sequence grows).
    """
    padding = kwargs.get("attention_mask")
    if isinstance(padding, CausalPaddingMask):
        padding = padding.sdpa_kwargs.get("attention_mask")
    elif isinstance(padding, torch.Tensor):
        padding = prepare_padding_mask(padding, kwargs["kv_length"], kwargs.get("kv_offset", 0))
    return CausalPaddingMask(dict(kwargs, attention_mask=padding, mask_function=mask_function))


def _fit_to_call(mask: MixedMask, batch: int, q_length: int, kv_length: int) -> MixedMask:
    """The ``croc_mask`` rows of this call's queries (its last ``q_length``), over ``kv_length`` keys."""
    if not isinstance(mask, MixedMask):
        raise TypeError(f"croc_mask must be a croc.MixedMask, got {type(mask).__name__}")
    if mask.kv_start.shape[0] != batch:
        raise ValueError(
            f"croc_mask has {mask.kv_start.shape[0]} rows, but this attention call has batch {batch}"
        )
    if mask.num_queries < q_length or mask.num_keys > kv_length:
        raise ValueError(
            f"croc_mask covers {mask.num_queries} queries x {mask.num_keys} keys, but this attention call "
            f"has {q_length} queries and {kv_length} keys (need >= {q_length} queries and <= {kv_length} keys)"
        )
    if mask.num_queries == q_length and mask.num_keys == kv_length:
        return mask
    start = mask.kv_start[:, mask.num_queries - q_length :]
    end = mask.kv_end[:, mask.num_queries - q_length :]
    return MixedMask.from_intervals(start, end, kv_length, validate=False, monotone=mask.monotone)


def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` in the autocast dtype when autocast is on for their device (as ``"sdpa"`` gets
    them: under ``--bf16`` over fp32 weights, RoPE leaves q/k in float32 and v in bfloat16)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def croc_mixed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: CausalPaddingMask | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    croc_mask: MixedMask | None = None,
    croc_backend: str = "auto",
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function registered in ``AttentionInterface`` as ``"croc_mixed"``.

    Args:
        module: the calling attention module (read for ``sliding_window``; Mistral and Qwen2 pass it
            as the ``sliding_window`` kwarg instead).
        query: [B, Hq, Lq, D]; key, value: [B, Hkv, Lk, D] (GQA handled by croc, no repetition).
        attention_mask: what :func:`croc_mixed_mask` built: a CausalPaddingMask, a dense bool mask or None.
        dropout: must be 0 on the croc path (no attention dropout in the kernels).
        scaling: softmax scale (default ``1 / sqrt(D)``).
        croc_mask: optional MixedMask overriding ``attention_mask`` (see the module docstring).
        croc_backend: backend of :func:`croc.mixed_attention`.

    Returns:
        ([B, Lq, Hq, D] attention output, None) — the layout transformers expects.
    """
    if croc_mask is not None:
        if getattr(module, "sliding_window", None) is not None or kwargs.get("sliding_window") is not None:
            raise ValueError("croc_mask cannot be used on a sliding-window attention layer")
        mask = _fit_to_call(croc_mask, query.shape[0], query.shape[2], key.shape[2])
    else:
        if isinstance(attention_mask, CausalPaddingMask):
            attention_mask = attention_mask.resolve()
        if isinstance(attention_mask, MixedMask):
            mask = attention_mask
        else:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
    if dropout:
        raise ValueError(f"croc_mixed attention has no attention dropout; got dropout={dropout}")
    query, key, value = _autocast_inputs(query, key, value)
    out = mixed_attention(query, key, value, mask, scale=scaling, backend=croc_backend)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"croc_mixed"`` with transformers (idempotent; done on import)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, croc_mixed_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, croc_mixed_mask)


register()
