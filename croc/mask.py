"""The mixed attention mask as data: one key interval per query.

For every mask family croc supports (causal text, bidirectional image spans, prefix-LM, packed
documents, padding) the keys visible to query ``i`` of row ``b`` form one contiguous interval
``[kv_start[b, i], kv_end[b, i])`` of absolute key positions. An empty interval
(``kv_start == kv_end``) marks a padding query: its output and gradients are zero.

Example, one row of 8 tokens: text ``t``, an image span ``I`` of 3 tokens, padding ``.``::

    tokens     t  I  I  I  t  t  .  .        key j ->  0 1 2 3 4 5 6 7
    kv_start   0  0  0  0  0  0  0  0        query 0   x . . . . . . .
    kv_end     1  4  4  4  5  6  0  0        query 1   x x x x . . . .   image tokens see
                                             query 2   x x x x . . . .   their whole span
                                             query 3   x x x x . . . .
                                             query 4   x x x x x . . .   text stays causal
                                             query 5   x x x x x x . .
                                             query 6   . . . . . . . .   padding: empty row

The dense rule (the single source of truth, used by the tests): in row ``b``, key ``j`` is
visible to query ``i`` iff ``valid[i] and valid[j] and seg[i] == seg[j] and (j <= i or
(span[i] >= 0 and span[i] == span[j]))``.
"""

from __future__ import annotations

import torch

__all__ = ["MixedMask"]


def _check_2d_int(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape [batch, seq_len], got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")


def _optional_companion(
    name: str, t: torch.Tensor | None, like: torch.Tensor, allow_bool: bool
) -> torch.Tensor | None:
    """Validate an optional [B, L] tensor that accompanies ``like`` (shape and device)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the ids are on {like.device}")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(f"{name} must be an integer or bool tensor, got dtype {t.dtype}")
    if t.dtype == torch.bool and not allow_bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    return t


def _run_starts(values: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: ``active`` positions where a new run of equal ``values`` begins."""
    starts = active.clone()
    starts[:, 1:] &= ~(active[:, :-1] & (values[:, 1:] == values[:, :-1]))
    return starts


def _repeated_run_values(values: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """bool [B]: rows in which two different runs (``starts``) carry the same value."""
    sentinel = torch.iinfo(torch.int64).max
    keyed = torch.where(starts, values.to(torch.int64), torch.full_like(values, sentinel, dtype=torch.int64))
    ordered = keyed.sort(dim=1).values
    return ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != sentinel)).any(dim=1)


def _not_monotone(start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """bool 0-d: some row's non-empty intervals ([B, L] ``start``/``end``) have a decreasing start or end."""
    nonempty = end > start

    def rising(t: torch.Tensor) -> torch.Tensor:
        kept = torch.where(nonempty, t, -1)
        return kept.cummax(dim=1).values <= kept

    return (nonempty & ~(rising(start) & rising(end))).any()


def _first_bad_row(bad: torch.Tensor) -> int:
    return int(bad.nonzero()[0, 0])


class MixedMask:
    """Per-query key intervals ``[kv_start, kv_end)`` describing an attention mask in O(L) memory.

    Build it with one of the constructors (``from_spans``, ``from_image_mask``, ``causal``,
    ``from_intervals``); do not call ``__init__`` with unchecked data.

    Attributes:
        kv_start: int32 [B, Lq], first visible key of each query (absolute key position).
        kv_end: int32 [B, Lq], one past the last visible key; ``kv_start == kv_end`` is an empty row.
        num_keys: int, the key length Lk the intervals refer to.
        monotone: bool (read-only), see :attr:`monotone`.
    """

    def __init__(
        self, kv_start: torch.Tensor, kv_end: torch.Tensor, num_keys: int, monotone: bool = False
    ) -> None:
        self.kv_start = kv_start
        self.kv_end = kv_end
        self.num_keys = int(num_keys)
        self._monotone = bool(monotone)
        self._block_cache: dict[tuple, object] = {}  # tile schedules, filled by croc.ops.schedule

    @property
    def monotone(self) -> bool:
        """True when, in every row, the non-empty intervals taken in query order have
        non-decreasing ``kv_start`` and non-decreasing ``kv_end`` (empty rows are ignored). Every
        builder's mask is; the kernels then use O(L) range schedules (``croc.ops.schedule``).
        A host-side flag: never computed from the data in a hot path."""
        return self._monotone

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_intervals(
        cls,
        kv_start: torch.Tensor,
        kv_end: torch.Tensor,
        num_keys: int,
        validate: bool = True,
        monotone: bool | None = None,
    ) -> MixedMask:
        """General constructor from explicit intervals.

        Args:
            kv_start, kv_end: integer [B, Lq] tensors on one device; ``0 <= start <= end <= num_keys``.
                ``Lq`` may be smaller than ``num_keys`` (e.g. the last Lq queries of a KV cache).
            num_keys: the key length Lk.
            validate: check the range (one host sync); skip it in hot loops with trusted data.
            monotone: the :attr:`monotone` flag. None: determined by the validation (same sync)
                when ``validate``, else False. True/False: the caller's promise, checked when
                ``validate`` (ValueError if wrong), trusted otherwise.

        Raises:
            ValueError: wrong shapes, dtypes or devices; with ``validate``, an interval outside
                ``[0, num_keys]`` or ``monotone`` that does not hold.
        """
        _check_2d_int("kv_start", kv_start)
        _check_2d_int("kv_end", kv_end)
        if kv_start.shape != kv_end.shape:
            raise ValueError(
                f"kv_end must have the shape of kv_start {tuple(kv_start.shape)}, got {tuple(kv_end.shape)}"
            )
        if kv_start.device != kv_end.device:
            raise ValueError(f"kv_start is on {kv_start.device} but kv_end is on {kv_end.device}")
        if isinstance(num_keys, bool) or not isinstance(num_keys, int) or num_keys < 0:
            raise ValueError(f"num_keys must be a non-negative int, got {num_keys!r}")
        if monotone is not None and not isinstance(monotone, bool):
            raise TypeError(f"monotone must be a bool or None, got {type(monotone).__name__}")
        if validate:
            is_monotone = cls._validate_intervals(kv_start, kv_end, num_keys)
            if monotone and not is_monotone:
                raise ValueError(
                    "monotone=True but kv_start/kv_end: the non-empty intervals of some row have a "
                    "decreasing start or end along the row"
                )
            monotone = is_monotone if monotone is None else monotone
        start, end = kv_start.to(torch.int32).contiguous(), kv_end.to(torch.int32).contiguous()
        return cls(start, end, num_keys, monotone=bool(monotone))

    @staticmethod
    def _validate_intervals(kv_start: torch.Tensor, kv_end: torch.Tensor, num_keys: int) -> bool:
        """Raise ValueError on an interval outside [0, num_keys]; return whether the mask is
        monotone. One host sync."""
        if kv_start.numel() == 0:
            return True
        start, end = kv_start.to(torch.int64), kv_end.to(torch.int64)
        bad = (start < 0) | (start > end) | (end > num_keys)
        flags = torch.stack([bad.any(), _not_monotone(start, end)]).tolist()
        if flags[0]:
            b, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"kv_start/kv_end: interval [{int(kv_start[b, i])}, {int(kv_end[b, i])}) of "
                f"query {i} in row {b} is not inside [0, num_keys={num_keys}] with start <= end"
            )
        return not flags[1]

    @classmethod
    def causal(cls, batch: int, seq_len: int, device: torch.device | str | None = None) -> MixedMask:
        """Plain causal mask: query ``i`` sees keys ``[0, i + 1)``."""
        if batch < 0 or seq_len < 0:
            raise ValueError(f"batch and seq_len must be >= 0, got {batch} and {seq_len}")
        end = torch.arange(1, seq_len + 1, dtype=torch.int32, device=device).expand(batch, seq_len)
        start = torch.zeros(batch, seq_len, dtype=torch.int32, device=device)
        return cls(start, end.contiguous(), seq_len, monotone=True)

    @classmethod
    def from_spans(
        cls,
        span_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        validate: bool = True,
    ) -> MixedMask:
        """Mask with bidirectional spans inside causal text, padding and packed documents.

        Args:
            span_ids: integer [B, L]; ``-1`` for a causal token, a non-negative id for a token of a
                bidirectional span. The tokens of one span (same id in one row) must be contiguous,
                inside one document and not padding.
            attention_mask: optional [B, L] (bool or 0/1 int); 0/False marks padding (empty rows,
                keys never seen). Within a document the valid tokens must be contiguous (left or
                right padding, not holes).
            segment_ids: optional integer [B, L]; packed-document id per token. Each document must
                be one contiguous run of valid tokens; tokens only see their own document.
            validate: run the malformed-input checks (one host sync). Turn off only for data
                already known to be well formed.

        Returns:
            MixedMask with ``num_keys == L``.

        Raises:
            ValueError: wrong shapes or dtypes, a span that is not contiguous, crosses a document
                or covers padding, a document split into several runs.
        """
        _check_2d_int("span_ids", span_ids)
        attention_mask = _optional_companion("attention_mask", attention_mask, span_ids, allow_bool=True)
        segment_ids = _optional_companion("segment_ids", segment_ids, span_ids, allow_bool=False)
        batch, seq_len = span_ids.shape
        device = span_ids.device
        span = span_ids.to(torch.int64)
        valid = torch.ones_like(span, dtype=torch.bool) if attention_mask is None else attention_mask != 0
        seg = torch.zeros_like(span) if segment_ids is None else segment_ids.to(torch.int64)
        in_span = span >= 0

        doc_starts = _run_starts(seg, valid)
        span_starts = _run_starts(span, in_span)
        if validate and span.numel() > 0:
            cls._validate_layout(span, valid, seg, in_span, doc_starts, span_starts)

        positions = torch.arange(seq_len, device=device, dtype=torch.int64).expand(batch, seq_len)
        doc_start = torch.where(doc_starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
        span_ends = in_span.clone()
        span_ends[:, :-1] &= ~(in_span[:, 1:] & (span[:, 1:] == span[:, :-1]))
        big = torch.full_like(positions, seq_len)
        span_end = torch.where(span_ends, positions + 1, big).flip(1).cummin(dim=1).values.flip(1)
        kv_end = torch.where(in_span, span_end, positions + 1)
        kv_start = torch.where(valid, doc_start, torch.zeros_like(doc_start))
        kv_end = torch.where(valid, kv_end, torch.zeros_like(kv_end))
        # documents are contiguous runs and spans lie inside one: starts and ends never decrease
        return cls(kv_start.to(torch.int32), kv_end.to(torch.int32), seq_len, monotone=True)

    @staticmethod
    def _validate_layout(
        span: torch.Tensor,
        valid: torch.Tensor,
        seg: torch.Tensor,
        in_span: torch.Tensor,
        doc_starts: torch.Tensor,
        span_starts: torch.Tensor,
    ) -> None:
        """Raise ValueError naming the argument if spans/documents/padding are malformed."""
        span_on_pad = (in_span & ~valid).any(dim=1)
        split_doc = _repeated_run_values(seg, doc_starts)
        split_span = _repeated_run_values(span, span_starts)
        continues_span = in_span[:, 1:] & (span[:, 1:] == span[:, :-1])
        crosses_doc = (continues_span & (seg[:, 1:] != seg[:, :-1])).any(dim=1)
        flags = torch.stack([span_on_pad, split_doc, split_span, crosses_doc])
        if torch.compiler.is_compiling():  # a device-side assert: no host sync, no graph break
            torch._assert_async(
                ~flags.any(),
                "span_ids/segment_ids/attention_mask: malformed layout (a split span or document, a span "
                "on padding or across documents); build the mask eagerly for the row and the reason",
            )
            return
        if not bool(flags.any()):
            return
        if bool(span_on_pad.any()):
            row = _first_bad_row(span_on_pad)
            raise ValueError(
                f"span_ids: row {row} has a span token at a padding position (attention_mask == 0)"
            )
        if bool(split_doc.any()):
            row = _first_bad_row(split_doc)
            raise ValueError(
                f"segment_ids/attention_mask: in row {row} a document's valid tokens are not one contiguous "
                "run (a document id reappears, or padding sits inside a document)"
            )
        if bool(split_span.any()):
            row = _first_bad_row(split_span)
            raise ValueError(f"span_ids: in row {row} a span id is used by tokens that are not contiguous")
        row = _first_bad_row(crosses_doc)
        raise ValueError(
            f"span_ids: in row {row} a span crosses a document boundary (segment_ids change inside it)"
        )

    @classmethod
    def from_image_mask(
        cls,
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        validate: bool = True,
    ) -> MixedMask:
        """Mask where each maximal run of image tokens inside a document is one bidirectional span.

        Args:
            image_mask: bool [B, L] (or 0/1 integers), True at image tokens.
            attention_mask, segment_ids, validate: as in :meth:`from_spans`.
        """
        if not isinstance(image_mask, torch.Tensor):
            raise TypeError(f"image_mask must be a torch.Tensor, got {type(image_mask).__name__}")
        if image_mask.dim() != 2:
            raise ValueError(f"image_mask must have shape [batch, seq_len], got {tuple(image_mask.shape)}")
        if image_mask.dtype.is_floating_point or image_mask.dtype.is_complex:
            raise ValueError(f"image_mask must be a bool tensor, got dtype {image_mask.dtype}")
        is_image = image_mask != 0
        segment_ids = _optional_companion("segment_ids", segment_ids, image_mask, allow_bool=False)
        seg = (
            torch.zeros_like(is_image, dtype=torch.int64)
            if segment_ids is None
            else segment_ids.to(torch.int64)
        )
        starts = _run_starts(seg, is_image)
        span_ids = torch.where(is_image, starts.cumsum(dim=1) - 1, torch.full_like(seg, -1))
        return cls.from_spans(span_ids, attention_mask, segment_ids, validate=validate)

    # ------------------------------------------------------------------ views
    @property
    def batch_size(self) -> int:
        return self.kv_start.shape[0]

    @property
    def num_queries(self) -> int:
        return self.kv_start.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_start.device

    def to(self, device: torch.device | str) -> MixedMask:
        """A copy of the mask on ``device`` (same ``monotone``; the schedule cache is not carried over)."""
        return MixedMask(self.kv_start.to(device), self.kv_end.to(device), self.num_keys, self.monotone)

    def to_dense(self) -> torch.Tensor:
        """bool [B, Lq, Lk]: ``True`` where query ``i`` may attend to key ``j``. O(L²) memory: tests only."""
        keys = torch.arange(self.num_keys, device=self.device, dtype=torch.int32)
        return (keys >= self.kv_start[..., None]) & (keys < self.kv_end[..., None])

    def row_is_empty(self) -> torch.Tensor:
        """bool [B, Lq]: queries that see no key (padding)."""
        return self.kv_end <= self.kv_start

    def block_metadata(self, block_q: int, block_k: int):
        """Tile classification for one tiling (:class:`croc.BlockMetadata`), cached on the mask.

        A thin delegate to :func:`croc.ops.schedule.block_metadata`, where the kernels' schedules live."""
        from croc.ops.schedule import block_metadata

        return block_metadata(self, block_q, block_k)

    def to_block_mask(self, block_size: int | tuple[int, int] = 128):
        """FlexAttention's ``BlockMask`` built from the intervals (no ``create_block_mask``, no dense
        mask, no host sync); see :func:`croc.ops.flex_attention.block_mask_from_intervals`.
        Cached per block size, like the kernels' schedules: every layer of a batch shares one."""
        from croc.ops.flex_attention import block_mask_from_intervals

        key = ("block_mask", block_size)
        if key not in self._block_cache:
            self._block_cache[key] = block_mask_from_intervals(
                self.kv_start, self.kv_end, self.num_keys, block_size
            )
        return self._block_cache[key]

    def __repr__(self) -> str:
        return (
            f"MixedMask(batch={self.batch_size}, num_queries={self.num_queries}, "
            f"num_keys={self.num_keys}, monotone={self.monotone}, device={self.device})"
        )
