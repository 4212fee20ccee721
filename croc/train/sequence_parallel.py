"""Sequence-parallel training steps of a Croc LLaVA (DeepSpeed Ulysses, all three stages).

With ``N = sequence_parallel_size``, the ``W`` processes form ``W / N`` groups of ``N`` consecutive
ranks (DeepSpeed's ``parallel_state_sp`` groups). Every rank of a group gets the same batch (the
training data is sharded over the ``W / N`` groups, not over the ``W`` ranks); each rank then runs
the language model on its ``L / N`` chunk of every row (rows are padded at the end to a multiple of
``N``: padding has ``attention_mask`` 0 and label -100, so it is masked out of attention and loss)
and the attention layers exchange heads for tokens through DeepSpeed's Ulysses
(:mod:`croc.integrations.sequence_parallel`), each with the whole row's :class:`croc.MixedMask`,
built on every rank from the same full-row inputs.

What each rank does in one step (:meth:`SequenceParallel.forward`):

- token embeddings and the projector's visual tokens of the whole batch (cheap next to the LLM;
  every rank needs the visual tokens of the images in its chunk and the reconstruction targets),
  the replace mask drawn on the group's first rank and broadcast, and the pool assignment of each
  image solved on exactly one rank (image ``i`` on rank ``i % N``) and shared (int64 all-reduce);
- the LLM on its chunk; the next-token targets are shifted over the whole row before the split,
  so the last token of a chunk is scored against the first label of the next chunk;
- the reconstruction head on every image's full set of hidden states: each rank contributes the
  image positions it holds, a differentiable all-reduce assembles them (an image may cross a chunk
  border) and the head and SmoothL1 loss run on the assembled images.

Reduction: rank ``r`` back-propagates ``N * ce_r / targets + w * recon`` (``ce_r`` its summed cross
entropy, ``targets`` the row batch's target count, known on every rank). Summed over the group that
is ``N`` times the unsplit loss, and data parallelism averages gradients over all ``W = N * W/N``
ranks, so the gradients equal those of the unsplit run over ``W / N`` data-parallel ranks. The
value returned (and logged) is the unsplit loss itself: ``lm_loss + w * recon_loss``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from croc.integrations.sequence_parallel import check_heads, register_ulysses, ulysses_active
from croc.model.losses import IGNORE_INDEX, reconstruction_loss
from croc.pool import random_replace_mask

__all__ = ["SequenceParallel", "pad_to_multiple", "setup_sequence_parallel", "shifted_targets"]

_ROW_KEYS = ("input_ids", "labels", "attention_mask", "segment_ids", "position_ids")


@dataclass
class SequenceParallel:
    """One rank's place in sequence parallelism.

    Attributes:
        size: N, ranks per sequence-parallel group. rank: this rank's index in its group.
        group: the process group of the N ranks. dp_size / dp_rank: the number of groups and this
            group's index (the data is sharded over the groups).
    """

    size: int
    rank: int
    group: Any
    dp_size: int
    dp_rank: int

    def forward(self, model, **inputs: Any):
        """One sequence-parallel training forward of a ``CrocLlavaForConditionalGeneration``.

        Args:
            model: the Croc model (its forward hands over here when given ``sequence_parallel=``).
            **inputs: the full (unsplit) batch: input_ids int64 [B, L], labels int64 [B, L], optional
                attention_mask [B, L], pixel_values [I, 3, H, W], segment_ids [B, L], position_ids
                [B, L], replace_mask bool [I, T].

        Returns:
            ``CrocLlavaOutput`` with ``loss`` (value: the unsplit loss; gradient: this rank's share),
            ``lm_loss``, ``recon_loss`` (unsplit values, no grad), ``logits`` [B, L'/N, V] of this
            rank's chunk (L' = L padded to a multiple of N) and ``pool_cols``.
        """
        return _forward(self, model, **inputs)

    def replace_mask(self, num_images: int, per_image: int, ratio: float, device) -> torch.Tensor:
        """bool [I, T]: :func:`croc.random_replace_mask` drawn on the group's first rank, the same on all."""
        mask = random_replace_mask(num_images, per_image, ratio, device=device).to(torch.uint8)
        dist.broadcast(mask, src=dist.get_global_rank(self.group, 0), group=self.group)
        return mask.bool()

    @contextlib.contextmanager
    def sharded_assignment(self, pool) -> Iterator[None]:
        """Within: ``pool.assign`` solves row ``i`` of a batched assignment on rank ``i % N`` only."""
        pool.assign = functools.partial(_sharded_assign, type(pool).assign.__get__(pool), self)
        try:
            yield
        finally:
            del pool.assign


def setup_sequence_parallel(model, size: int) -> SequenceParallel:
    """Create the sequence-parallel groups and switch ``model``'s text attention to Ulysses.

    Needs ``torch.distributed`` initialised (``deepspeed.init_distributed``) with a world size that
    ``size`` divides; ``size`` must suit the text model's heads (:func:`check_heads`).
    """
    from deepspeed import comm as ds_comm
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"sequence_parallel_size must be an int >= 2 here, got {size!r}")
    if not dist.is_initialized():
        raise ValueError("sequence parallelism needs torch.distributed initialised (launch with torchrun)")
    world = dist.get_world_size()
    if world % size:
        raise ValueError(f"sequence_parallel_size ({size}) must divide the number of processes ({world})")
    text_config = model.config.text_config
    check_heads(text_config, size)
    ds_comm.init_distributed(dist_backend=dist.get_backend())
    if parallel_state_sp._SEQUENCE_PARALLEL_GROUP is None:
        parallel_state_sp.initialize_sequence_parallel(size)
    group = parallel_state_sp.get_sequence_parallel_group()
    model.set_attn_implementation({"text_config": register_ulysses(text_config, group)})
    rank = dist.get_rank()
    return SequenceParallel(size, dist.get_rank(group), group, world // size, rank // size)


def pad_to_multiple(inputs: dict[str, Any], size: int, pad_token_id: int) -> dict[str, Any]:
    """The batch with its rows ([B, L] tensors of ``_ROW_KEYS``) padded at the end to a multiple of ``size``.

    Adds ``attention_mask`` (ones) and ``position_ids`` (0..L-1 per row) when absent; padding gets
    ``pad_token_id``, label -100, attention_mask 0, position 0 and the row's last segment id + 1.
    """
    out = dict(inputs)
    ids = out["input_ids"]
    batch, length = ids.shape
    if out.get("attention_mask") is None:
        out["attention_mask"] = torch.ones_like(ids)
    if out.get("position_ids") is None:
        out["position_ids"] = torch.arange(length, device=ids.device).expand(batch, length)
    extra = -length % size
    if not extra:
        return out
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}
    for key in _ROW_KEYS:
        value = out.get(key)
        if value is None:
            continue
        if key == "segment_ids":
            tail = (value[:, -1:] + 1).expand(batch, extra)
        else:
            tail = torch.full((batch, extra), fill[key], dtype=value.dtype, device=value.device)
        out[key] = torch.cat([value, tail], dim=1)
    return out


def shifted_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """int64 [B, L]: position ``i``'s next-token target ``labels[:, i + 1]`` (-100 at the end and
    where it lies in another packed document); the shift is done on whole rows, before the split."""
    targets = labels[:, 1:]
    if segment_ids is not None:
        targets = targets.masked_fill(segment_ids[:, 1:] != segment_ids[:, :-1], IGNORE_INDEX)
    return F.pad(targets, (0, 1), value=IGNORE_INDEX)


def _sharded_assign(
    assign, sp: SequenceParallel, selected: torch.Tensor, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 [R, n]: ``assign`` of the rows ``selected`` [R, n, D] owned by this rank, all-reduced.

    ``counts`` (int [R] or None) as in :meth:`croc.PromptTokenPool.assign`: row r uses its first
    counts[r] tokens, the others get -1 (from the owning rank; the other ranks add zeros)."""
    cols = torch.zeros(selected.shape[:2], dtype=torch.int64, device=selected.device)
    if sp.rank < selected.shape[0]:
        owned = slice(sp.rank, None, sp.size)
        cols[owned] = assign(selected[owned], None if counts is None else counts[owned])
    dist.all_reduce(cols, group=sp.group)
    return cols


def _local_image_hidden(
    hidden: torch.Tensor, image_index: torch.Tensor, length: int, sp: SequenceParallel
) -> torch.Tensor:
    """[I*T, H]: the hidden states at every image position, assembled from the ranks that hold them.

    ``hidden`` [B, C, H] is this rank's chunk, ``image_index`` int64 [I*T] the flat positions
    ``b * L + l`` over whole rows of ``length`` L. Differentiable (all-reduce sum; each position is
    held by exactly one rank).
    """
    chunk = hidden.shape[1]
    row, col = image_index // length, image_index % length
    start = sp.rank * chunk
    mine = (col >= start) & (col < start + chunk)
    local = (row * chunk + (col - start).clamp(0, chunk - 1)).to(torch.int64)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, local)
    picked = picked * mine.unsqueeze(-1).to(picked.dtype)
    return _SumOverGroup.apply(picked, sp.group)


class _SumOverGroup(torch.autograd.Function):
    """Differentiable sum over a process group: forward all-reduce, backward all-reduce of the grads
    (every rank's objective depends on the sum, so each input's gradient is the sum of theirs)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, chunk: slice, sp: SequenceParallel
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N * this rank's share of the LM loss, the whole LM loss without grad), float32 scalars.

    ``logits`` [B, C, V] of this rank's chunk, ``targets`` int64 [B, L] shifted on whole rows.
    """
    count = (targets != IGNORE_INDEX).sum().clamp_min(1)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    summed = F.cross_entropy(flat, targets[:, chunk].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    share = summed / count
    value = share.detach().clone()
    dist.all_reduce(value, group=sp.group)
    return sp.size * share, value


def _reconstruction_loss(
    model, hidden: torch.Tensor, embedded, length: int, sp: SequenceParallel
) -> torch.Tensor:
    """float32 scalar: the unsplit reconstruction loss, the head run on every image's whole hidden states."""
    num_images, per_image, _ = embedded.visual.shape
    image_hidden = _local_image_hidden(hidden, embedded.image_index, length, sp)
    prediction = model.reconstruction_head(image_hidden.view(num_images, per_image, -1))
    return reconstruction_loss(prediction, embedded.visual, model.config.recon_beta)


def _forward(sp: SequenceParallel, model, **inputs: Any):
    """:meth:`SequenceParallel.forward`: pad, embed and mask whole rows, the LLM on this chunk, losses."""
    from croc.model.modeling import CrocLlavaOutput

    if inputs.get("labels") is None or inputs.get("input_ids") is None:
        raise ValueError("a sequence-parallel step needs input_ids and labels")
    replace_mask = inputs.pop("replace_mask", None)
    pixel_values = inputs.pop("pixel_values", None)
    inputs.pop("num_items_in_batch", None)
    config = model.config
    pad_id = 1 if config.image_token_id == 0 else 0
    batch = pad_to_multiple(inputs, sp.size, pad_id)
    ids, labels, segment_ids = batch["input_ids"], batch["labels"], batch.get("segment_ids")
    length = ids.shape[1]
    chunk = slice(sp.rank * (length // sp.size), (sp.rank + 1) * (length // sp.size))
    croc_objective = config.stage == "croc" and pixel_values is not None
    if croc_objective and replace_mask is None:
        per_image = config.image_seq_length
        replace_mask = sp.replace_mask(pixel_values.shape[0], per_image, config.replace_ratio, ids.device)
    with sp.sharded_assignment(model.prompt_pool):
        embedded = model._embed(ids, None, pixel_values, replace_mask, croc_objective)
    attention_mask, croc_mask = model._attention_masks(
        embedded.image_mask, batch["attention_mask"], segment_ids, labels, embedded.embeds
    )
    with ulysses_active():
        lm_out = model.model.language_model(
            inputs_embeds=embedded.embeds[:, chunk],
            attention_mask=attention_mask[:, chunk],
            position_ids=batch["position_ids"][:, chunk],
            croc_mask=croc_mask,
            croc_backend=config.attention_backend,
            use_cache=False,
        )
    hidden = lm_out.last_hidden_state
    logits = model.lm_head(hidden)
    share, lm_value = _lm_loss(logits, shifted_targets(labels, segment_ids), chunk, sp)
    value, recon = lm_value, None
    if croc_objective:
        recon = _reconstruction_loss(model, hidden, embedded, length, sp)
        share = share + config.recon_loss_weight * recon
        value = value + config.recon_loss_weight * recon.detach()
    loss = share + (value - share).detach()
    return CrocLlavaOutput(
        loss=loss,
        logits=logits,
        lm_loss=lm_value,
        recon_loss=None if recon is None else recon.detach(),
        pool_cols=embedded.pool_cols,
    )


def sequence_parallel_dataloader(trainer, sp: SequenceParallel):
    """The Trainer's training DataLoader, sharded over the ``W / N`` groups instead of the W ranks.

    Same sampler, collator and workers as ``Trainer.get_train_dataloader``; accelerate's
    ``prepare_data_loader`` with ``num_processes = W / N`` and ``process_index`` = the group index,
    so every rank of a group iterates the same batches (and ``W / N = 1`` gives exactly the batches
    of a single-process run).
    """
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader
    from transformers.trainer_utils import seed_worker

    args, accelerator = trainer.args, trainer.accelerator
    loader = DataLoader(
        trainer.train_dataset,
        batch_size=trainer._train_batch_size,
        sampler=trainer._get_train_sampler(),
        collate_fn=trainer.data_collator,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        drop_last=args.dataloader_drop_last,
        # workers seeded by the group index: the ranks of a group load alike
        worker_init_fn=functools.partial(
            seed_worker, num_workers=args.dataloader_num_workers, rank=sp.dp_rank
        ),
    )
    return prepare_data_loader(
        loader,
        accelerator.device,
        num_processes=sp.dp_size,
        process_index=sp.dp_rank,
        split_batches=accelerator.split_batches,
        put_on_device=True,
        rng_types=accelerator.rng_types.copy(),
        even_batches=accelerator.even_batches,
        use_seedable_sampler=accelerator.use_seedable_sampler,
        data_seed=accelerator.dataloader_config.data_seed,
    )


def from_parallelism_config(model, args) -> SequenceParallel | None:
    """Sequence parallelism asked for through ``TrainingArguments(parallelism_config=ParallelismConfig(sp_size=N))``.

    Returns None when ``sp_size`` is unset or 1. Otherwise sets up croc's Ulysses step for ``model``
    and clears ``args.parallelism_config``: accelerate's own Ulysses path (its DataLoader adapter
    shards every tensor of a batch along dim 1, which ``pixel_values`` [I, 3, H, W] do not have, and
    its loss is the LM loss only) cannot train a Croc model, so croc's takes its place.
    """
    config = getattr(args, "parallelism_config", None)
    size = int(getattr(config, "sp_size", None) or 1)
    if size == 1:
        return None
    if model is None:
        raise ValueError("parallelism_config.sp_size > 1 needs the model passed to CrocTrainer(model=...)")
    args.device  # noqa: B018 - initialises torch.distributed, as the Trainer would
    args.parallelism_config = None
    return setup_sequence_parallel(model, size)
