"""The reconstruction head and the two loss terms of the Croc stage.

Total loss of stage "croc": ``lm_loss + recon_loss_weight * recon_loss`` with
``lm_loss = causal_lm_loss(logits, labels, segment_ids)`` and
``recon_loss = reconstruction_loss(head(hidden at image positions), normalize(visual tokens))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from croc.constants import IGNORE_INDEX
from croc.model.config import RECON_HEADS

__all__ = ["IGNORE_INDEX", "ReconstructionHead", "causal_lm_loss", "reconstruction_loss"]

__all__ = ["IGNORE_INDEX", "ReconstructionHead", "causal_lm_loss", "reconstruction_loss"]


class ReconstructionHead(nn.Module):
    """The reconstruction head: ``"transformer"`` (one transformer encoder layer with learned
    positions, then a linear map; the paper) or ``"linear"`` (one linear map; released ViCToR).

    Args:
        hidden_size: width H of the LLM hidden states it reads.
        out_dim: width of the predicted visual tokens.
        num_positions: most tokens per image (learned position embeddings of the transformer head).
        num_heads: attention heads; default ``max(1, hidden_size // 64)`` (must divide hidden_size).
        kind: ``"transformer"`` or ``"linear"``.

    Shapes: forward(hidden float [I, T, H], T <= num_positions, valid optional bool [I, T]: False at
    padding, which the encoder layer does not attend to) -> float [I, T, out_dim].
    Dropout is 0 (deterministic training steps).
    """

    def __init__(
        self,
        hidden_size: int,
        out_dim: int,
        num_positions: int,
        num_heads: int | None = None,
        kind: str = "transformer",
    ) -> None:
        super().__init__()
        if kind not in RECON_HEADS:
            raise ValueError(f"kind must be one of {RECON_HEADS}, got {kind!r}")
        self.kind = kind
        self.num_positions = int(num_positions)
        if kind == "transformer":
            heads = num_heads or max(1, hidden_size // 64)
            if hidden_size % heads:
                raise ValueError(f"num_heads ({heads}) must divide hidden_size ({hidden_size})")
            self.positions = nn.Embedding(num_positions, hidden_size)
            self.encoder = nn.TransformerEncoderLayer(
                hidden_size,
                heads,
                dim_feedforward=4 * hidden_size,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
            )
        self.output = nn.Linear(hidden_size, out_dim)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[1] > self.num_positions:
            raise ValueError(
                f"hidden must have shape [images, <= {self.num_positions}, width] (max_image_tokens), "
                f"got {tuple(hidden.shape)}"
            )
        if self.kind == "linear":
            return self.output(hidden)
        x = hidden + self.positions.weight[: hidden.shape[1]].to(hidden.dtype)
        padding = None if valid is None else ~valid
        return self.output(self.encoder(x, src_key_padding_mask=padding))


def reconstruction_loss(
    prediction: torch.Tensor,
    visual_tokens: torch.Tensor,
    beta: float = 0.01,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SmoothL1(beta) between the prediction and the L2-normalised original visual tokens.

    Args:
        prediction: float [I, T, D] from the reconstruction head.
        visual_tokens: float [I, T, D] original (unreplaced) visual tokens; normalised here and
            detached (they are the target).
        beta: SmoothL1 beta.
        mask: optional bool [I, T]: only these tokens count (padding of ragged images, or
            ``recon_tokens="replaced"``).

    Returns:
        float32 scalar, the mean over all elements of the counted tokens (0 when none counts).
    """
    target = F.normalize(visual_tokens.detach().float(), dim=-1)
    if mask is None:
        return F.smooth_l1_loss(prediction.float(), target, beta=beta)
    per_token = F.smooth_l1_loss(prediction.float(), target, beta=beta, reduction="none").mean(-1)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross entropy; position ``i`` predicts ``labels[:, i + 1]``.

    Args:
        logits: float [B, L, V].
        labels: int64 [B, L], ``-100`` where nothing is predicted.
        segment_ids: optional int [B, L] packed-document ids; a target in another document than
            the position predicting it is ignored.
        num_items_in_batch: if given, the loss is the summed cross entropy divided by it (the
            gradient-accumulation normalisation of the HF Trainer); otherwise the mean over targets.

    Returns:
        float32 scalar (0 when there is no target and ``num_items_in_batch`` is None: NaN-free).
    """
    targets = labels[:, 1:]
    if segment_ids is not None:
        targets = targets.masked_fill(segment_ids[:, 1:] != segment_ids[:, :-1], IGNORE_INDEX)
    flat_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    summed = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is not None:
        return summed / num_items_in_batch
    return summed / (targets != IGNORE_INDEX).sum().clamp_min(1)
