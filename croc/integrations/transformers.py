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
function on symbolic indices (:mod:`croc.integrations.mask_functions`: a TorchFunctionMode turns ``ids[b, q]`` into a symbolic gather; this
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
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from croc.attention import mixed_attention
from croc.integrations.mask_functions import (
    _Builder,
    _Intervals,
    _padding_intervals,
    _trace_mask_function,
    _Unsupported,
)
from croc.mask import MixedMask, _not_monotone

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


_logger = logging.getLogger("croc.integrations.transformers")
_logged_fallbacks: set[str] = set()


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
