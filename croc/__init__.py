"""croc: fast Croc/ViCToR cross-modal pretraining for LLaVA-style models.

Importing croc needs neither a GPU nor transformers/DeepSpeed.
"""

from croc.assignment import linear_sum_assignment
from croc.attention import mixed_attention
from croc.mask import MixedMask
from croc.ops.schedule import BlockMetadata
from croc.pool import PromptTokenPool, random_replace_mask

__version__ = "0.1.0"

__all__ = [
    "BlockMetadata",
    "MixedMask",
    "PromptTokenPool",
    "__version__",
    "linear_sum_assignment",
    "mixed_attention",
    "random_replace_mask",
]
