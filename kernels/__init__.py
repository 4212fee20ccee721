"""Triton kernels of croc (shipped as ``croc.kernels``); importing this needs ``triton``.

Under ``TRITON_INTERPRET=1`` (set before import) the kernels run on CPU tensors in the Triton
interpreter, with one small fixed tile config (see :mod:`croc.kernels.config`).
"""

from .config import INTERPRET, SUPPORTED_HEAD_DIMS, AttentionConfig, PassConfig, attention_config
from .mixed_attention import attention_backward, attention_forward

__all__ = [
    "INTERPRET",
    "SUPPORTED_HEAD_DIMS",
    "AttentionConfig",
    "PassConfig",
    "attention_backward",
    "attention_config",
    "attention_forward",
]
