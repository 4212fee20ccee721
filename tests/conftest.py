"""Shared test set-up.

Without CUDA, the Triton kernels run under the Triton interpreter: TRITON_INTERPRET must be set
before croc (and so its kernels) is imported, which is why it happens here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def croc_calls(monkeypatch):
    """The masks of the calls that reach croc.mixed_attention through the transformers integration
    (the real function still runs)."""
    integration = pytest.importorskip("croc.integrations.transformers")
    calls = []
    real = integration.mixed_attention

    def counted(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "mixed_attention", counted)
    return calls
