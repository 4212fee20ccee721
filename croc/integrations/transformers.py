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

Without ``croc_mask`` the result equals ``"sdpa"``: the mask builder turns causal + padding (+ the
KV-cache offsets) into per-query key intervals in O(L) memory, no [B, 1, L, L] tensor, when each
row's valid tokens are one contiguous run (left or right padding; checked with one host sync per
forward, only when no ``croc_mask`` is given). Rows with padding holes, and layers whose mask is
not plain causal (sliding windows, packed sequences detected from ``position_ids``,
bidirectional models), use the dense ``"sdpa"`` mask and attention.
Static (compileable) caches are not supported with ``"croc_mixed"``: use the default dynamic cache.
"""

from __future__ import annotations

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
from croc.mask import MixedMask

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


class CausalPaddingMask:
    """What the mask builder returns for a plain causal layer; turned into a mask on first use.

    Built lazily so that a call that brings its own ``croc_mask`` never pays for it (nor for the
    host synchronisation below). :meth:`resolve` gives the :func:`causal_padding_mask` intervals
    when every row's valid tokens form at most one contiguous run (left or right padding: one
    device-to-host sync to check), and otherwise the dense ``sdpa_mask`` (padding holes, e.g.
    generation after right padding), so the attention always equals ``"sdpa"``. The result is
    cached: one object serves every layer of a forward pass.
    """

    def __init__(self, sdpa_kwargs: dict[str, Any]) -> None:
        self.sdpa_kwargs = sdpa_kwargs
        self._resolved: MixedMask | torch.Tensor | None = None
        self._done = False

    def resolve(self) -> MixedMask | torch.Tensor | None:
        """MixedMask (int32 [B, Lq] intervals), or the dense bool [B, 1, Lq, Lk] mask / None of ``sdpa_mask``."""
        if not self._done:
            self._resolved = self._build()
            self._done = True
        return self._resolved

    def _build(self) -> MixedMask | torch.Tensor | None:
        kw = self.sdpa_kwargs
        attention_mask = kw.get("attention_mask")
        if attention_mask is not None:
            valid = attention_mask.to(torch.bool)
            runs = valid[:, :1].to(torch.int32).sum(1) + (valid[:, 1:] & ~valid[:, :-1]).sum(1)
            if bool((runs > 1).any()):
                return sdpa_mask(**kw)
        return causal_padding_mask(
            kw["batch_size"],
            kw["q_length"],
            kw["kv_length"],
            kw.get("q_offset", 0),
            kw.get("kv_offset", 0),
            attention_mask,
            kw.get("device", "cpu"),
        )


def croc_mixed_mask(
    mask_function=causal_mask_function, **kwargs: Any
) -> CausalPaddingMask | torch.Tensor | None:
    """Mask builder registered in ``AttentionMaskInterface`` for ``"croc_mixed"``.

    Takes the keyword arguments of transformers' ``sdpa_mask``. For the plain causal mask
    function it returns a :class:`CausalPaddingMask` (O(L) intervals, built on first use); for
    anything else (sliding window, packed sequences, bidirectional, overlays) the dense bool
    [B, 1, Lq, Lk] mask (or None) of ``sdpa_mask``, which :func:`croc_mixed_attention` hands to the
    SDPA path.
    """
    if mask_function is causal_mask_function:
        return CausalPaddingMask(dict(kwargs, mask_function=mask_function))
    return sdpa_mask(mask_function=mask_function, **kwargs)


def _fit_to_call(mask: MixedMask, q_length: int, kv_length: int) -> MixedMask:
    """The ``croc_mask`` rows of this call's queries (its last ``q_length``), over ``kv_length`` keys."""
    if not isinstance(mask, MixedMask):
        raise TypeError(f"croc_mask must be a croc.MixedMask, got {type(mask).__name__}")
    if mask.num_queries < q_length or mask.num_keys > kv_length:
        raise ValueError(
            f"croc_mask covers {mask.num_queries} queries x {mask.num_keys} keys, but this attention call "
            f"has {q_length} queries and {kv_length} keys (need >= {q_length} queries and <= {kv_length} keys)"
        )
    if mask.num_queries == q_length and mask.num_keys == kv_length:
        return mask
    start = mask.kv_start[:, mask.num_queries - q_length :]
    end = mask.kv_end[:, mask.num_queries - q_length :]
    return MixedMask.from_intervals(start, end, kv_length, validate=False)


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
        module: the calling attention module (read for ``sliding_window``).
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
        if getattr(module, "sliding_window", None) is not None:
            raise ValueError("croc_mask cannot be used on a sliding-window attention layer")
        mask = _fit_to_call(croc_mask, query.shape[2], key.shape[2])
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
