"""``"croc_mixed"`` attention under DeepSpeed Ulysses sequence parallelism.

:func:`register_ulysses` registers the attention implementation ``"croc_mixed_ulysses"``: DeepSpeed's
``UlyssesSPAttentionHF`` (the ALST implementation, ``deepspeed.runtime.sequence_parallel``) wrapped
around :func:`croc.integrations.transformers.croc_mixed_attention`. Each rank of the
sequence-parallel group holds a chunk of ``L / N`` tokens of every row; DeepSpeed's all-to-all gives
each rank the whole row for ``H / N`` query heads (and ``Hkv / N`` kv heads, or one kv head
replicated when ``N > Hkv``), the croc kernel runs there with the whole row's ``croc_mask``
(a :class:`croc.MixedMask` [B, L], the same on every rank), and the reverse all-to-all returns each
rank its chunk for all heads. No all-to-all of croc's own.

The Ulysses path is taken only inside :func:`ulysses_active` (the sequence-parallel training step
opens it); any other call (evaluation, generation, a plain forward) runs ``"croc_mixed"`` unsplit,
so a model switched to ``"croc_mixed_ulysses"`` stays usable outside the step. Needs deepspeed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from croc.integrations.transformers import croc_mixed_attention, croc_mixed_mask

__all__ = ["ULYSSES_ATTN_IMPLEMENTATION", "check_heads", "register_ulysses", "ulysses_active"]

ULYSSES_ATTN_IMPLEMENTATION = "croc_mixed_ulysses"
_ACTIVE = {"on": False}


def check_heads(text_config: Any, size: int) -> None:
    """Raise ValueError unless Ulysses can split ``text_config``'s heads over ``size`` ranks.

    ``size`` must divide the number of attention heads, and either divide the number of kv heads
    or be a multiple of it (DeepSpeed then replicates each kv head ``size / Hkv`` times).
    """
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    if heads % size:
        raise ValueError(
            f"sequence_parallel_size ({size}) must divide the number of attention heads ({heads})"
        )
    if kv_heads % size and size % kv_heads:
        raise ValueError(
            f"sequence_parallel_size ({size}) must divide the number of kv heads ({kv_heads}) or be a multiple of it"
        )


@contextlib.contextmanager
def ulysses_active() -> Iterator[None]:
    """Inside this context ``"croc_mixed_ulysses"`` layers run through DeepSpeed's Ulysses."""
    previous = _ACTIVE["on"]
    _ACTIVE["on"] = True
    try:
        yield
    finally:
        _ACTIVE["on"] = previous


def register_ulysses(text_config: Any, group: Any) -> str:
    """Register ``"croc_mixed_ulysses"`` for the sequence-parallel process ``group``; returns the name.

    Args:
        text_config: the text model's config (heads, kv heads, head_dim, layers).
        group: the torch/deepspeed process group of one sequence-parallel group (N ranks).
    """
    from deepspeed import comm as ds_comm

    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    except ImportError as err:
        raise ImportError("sequence parallelism needs deepspeed>=0.18.2 (UlyssesSPAttentionHF)") from err

    size = ds_comm.get_world_size(group)
    check_heads(text_config, size)
    heads = int(text_config.num_attention_heads)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    by_batch: dict[int, UlyssesSPAttentionHF] = {}

    def ulysses(batch: int) -> UlyssesSPAttentionHF:
        if batch not in by_batch:  # DeepSpeed's module fixes the batch size; one per size seen
            by_batch[batch] = UlyssesSPAttentionHF(
                attn=croc_mixed_attention,
                batch_size=batch,
                attn_head_count=heads,
                attn_head_size=head_dim,
                kv_head_count=int(getattr(text_config, "num_key_value_heads", None) or heads),
                num_hidden_layers=int(text_config.num_hidden_layers),
                process_group=group,
                seq_length_is_variable=True,
            )
        return by_batch[batch]

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        """q [B, Hq, L/N, D], k/v [B, Hkv, L/N, D] (this rank's chunk) -> ([B, L/N, Hq, D], None)."""
        if not _ACTIVE["on"]:
            return croc_mixed_attention(module, query, key, value, attention_mask, **kwargs)
        if kwargs.get("croc_mask") is None:
            raise ValueError("croc_mixed_ulysses needs the whole row's croc_mask (a croc.MixedMask)")
        out, weights = ulysses(query.shape[0])(module, query, key, value, None, **kwargs)
        return out.view(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), weights

    AttentionInterface.register(ULYSSES_ATTN_IMPLEMENTATION, attention)
    AttentionMaskInterface.register(ULYSSES_ATTN_IMPLEMENTATION, croc_mixed_mask)
    return ULYSSES_ATTN_IMPLEMENTATION
