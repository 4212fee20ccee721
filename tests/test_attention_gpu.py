"""GPU checks of the Triton mixed attention (skipped without CUDA).

Accuracy follows flash-attention's rule: against an fp32 reference, our max error must be at most
twice the error of the same math done by PyTorch in the same low precision (SDPA with the dense
mask on bf16/fp16 inputs), plus a small absolute slack. Memory: a fwd+bwd at B=2, H=32, L=8192,
D=128 must peak no higher than SDPA's flash backend with ``is_causal=True`` plus O(L) bytes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mask_cases import croc_layout, random_layout
from torch.nn.attention import SDPBackend, sdpa_kernel

import croc
from croc.ops.reference_attention import reference_mixed_attention

pytestmark = pytest.mark.gpu

ABS_SLACK = 1e-4


def _mask(kind: str, batch: int, seq_len: int) -> croc.MixedMask:
    if kind == "causal":
        return croc.MixedMask.causal(batch, seq_len, device="cuda")
    if kind == "croc":
        layout = croc_layout(batch, seq_len, image_tokens=576, text_tokens=100, pad=37)
    else:
        layout = random_layout(batch, seq_len, seed=seq_len, max_docs=4, max_spans=4)
    tensors = (layout.span_ids, layout.attention_mask, layout.segment_ids)
    return croc.MixedMask.from_spans(*(t.cuda() for t in tensors))


def _fwd_bwd(q, k, v, dout, fn):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, dout))


BF16, FP16 = torch.bfloat16, torch.float16
CASES = [  # every head-dim class in bf16, two in fp16 (each new (dtype, tile) compiles 3 kernels)
    # mask kind, batch, heads_q, heads_kv, seq_len, head_dim, dtype
    ("random", 2, 4, 2, 1023, 64, BF16),
    ("random", 2, 4, 2, 1023, 64, FP16),
    ("random", 1, 2, 1, 777, 80, BF16),
    ("causal", 1, 2, 2, 2048, 96, BF16),
    ("croc", 1, 4, 4, 4096, 128, FP16),
    ("croc", 1, 2, 1, 8192, 128, BF16),
]


SCHEDULE_CASES = [(*case, "range") for case in CASES] + [(*CASES[0], "index"), (*CASES[4], "index")]


@pytest.mark.parametrize("kind,batch,heads_q,heads_kv,seq_len,head_dim,dtype,schedule", SCHEDULE_CASES)
def test_flash_attention_error_rule(kind, batch, heads_q, heads_kv, seq_len, head_dim, dtype, schedule):
    """Both tile schedules: range (the builders' monotone masks) and index lists (the same mask
    handed over with ``monotone=False``)."""
    torch.manual_seed(seq_len + head_dim)
    mask = _mask(kind, batch, seq_len)
    assert mask.monotone
    if schedule == "index":
        mask = croc.MixedMask(mask.kv_start, mask.kv_end, mask.num_keys, monotone=False)
    shape_q, shape_kv = (batch, heads_q, seq_len, head_dim), (batch, heads_kv, seq_len, head_dim)
    q, dout = (torch.randn(shape_q, device="cuda", dtype=dtype) for _ in range(2))
    k, v = (torch.randn(shape_kv, device="cuda", dtype=dtype) for _ in range(2))
    _assert_error_rule(q, k, v, dout, mask, "triton")


def _assert_error_rule(q, k, v, dout, mask: croc.MixedMask, backend: str) -> None:
    """Outputs and the three gradients of ``backend`` against fp32, within 2x PyTorch's own error."""
    scale = q.shape[-1] ** -0.5

    def reference(*qkv):
        return reference_mixed_attention(*qkv, mask.kv_start, mask.kv_end, scale)

    ours = _fwd_bwd(q, k, v, dout, lambda *qkv: croc.mixed_attention(*qkv, mask, backend=backend))
    exact = _fwd_bwd(*(t.float() for t in (q, k, v, dout)), reference)
    torch_low = _fwd_bwd(q, k, v, dout, reference)
    for name, a, ref, low in zip(("out", "dq", "dk", "dv"), ours, exact, torch_low):
        assert torch.isfinite(a).all(), name
        our_err = (a.float() - ref).abs().max().item()
        torch_err = (low.float() - ref).abs().max().item()
        assert our_err <= 2 * torch_err + ABS_SLACK, f"{name}: ours {our_err:.3g} vs torch {torch_err:.3g}"


@pytest.mark.parametrize("kind,batch,heads_q,heads_kv,seq_len,head_dim,dtype", [CASES[0], CASES[5]])
def test_flex_backend_error_rule(kind, batch, heads_q, heads_kv, seq_len, head_dim, dtype):
    """backend="flex" (compiled FlexAttention on our BlockMask), forward and backward: the GPU
    backward that the CPU cannot run. Empty rows must come out zero with zero gradients."""
    torch.manual_seed(seq_len)
    mask = _mask(kind, batch, seq_len)
    shape_q, shape_kv = (batch, heads_q, seq_len, head_dim), (batch, heads_kv, seq_len, head_dim)
    q, dout = (torch.randn(shape_q, device="cuda", dtype=dtype) for _ in range(2))
    k, v = (torch.randn(shape_kv, device="cuda", dtype=dtype) for _ in range(2))
    _assert_error_rule(q, k, v, dout, mask, "flex")


def test_auto_backend_uses_triton_on_cuda(monkeypatch):
    calls = []
    from croc import attention

    original = attention.triton_mixed_attention
    monkeypatch.setattr(attention, "triton_mixed_attention", lambda *a: calls.append(1) or original(*a))
    q = torch.randn(1, 2, 130, 64, device="cuda", dtype=torch.bfloat16)
    croc.mixed_attention(q, q, q, croc.MixedMask.causal(1, 130, device="cuda"))
    assert calls == [1]


def test_backward_is_deterministic_on_gpu():
    mask = _mask("croc", 1, 4096)
    q, k, v, dout = (torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    k, v = k[:, :2], v[:, :2]
    run = lambda: _fwd_bwd(q, k, v, dout, lambda *qkv: croc.mixed_attention(*qkv, mask))  # noqa: E731
    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_public_path_has_no_host_sync():
    mask = _mask("croc", 2, 2048)  # built (and validated) before the check; its block metadata is not
    q, k, v, dout = (torch.randn(2, 4, 2048, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # cold (metadata computed and cached on the mask), then warm
            _fwd_bwd(q, k, v, dout, lambda *qkv: croc.mixed_attention(*qkv, mask))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _peak_fwd_bwd_bytes(fn, q, k, v, dout) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _fwd_bwd(q, k, v, dout, fn)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_memory_is_flash_like_no_quadratic_buffer():
    batch, heads, seq_len, head_dim = 2, 32, 8192, 128
    q, k, v, dout = (
        torch.randn(batch, heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4)
    )
    mask = _mask("croc", batch, seq_len)
    croc.mixed_attention(q, k, v, mask)  # compile the kernels; the mask's block metadata is cached per batch

    def sdpa_causal(*qkv):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(*qkv, is_causal=True)

    ours = _peak_fwd_bwd_bytes(lambda *qkv: croc.mixed_attention(*qkv, mask), q, k, v, dout)
    flash = _peak_fwd_bwd_bytes(sdpa_causal, q, k, v, dout)
    linear_slack = 64 * batch * heads * seq_len  # e.g. lse + delta in fp32 and block lists, with room
    assert ours <= flash + linear_slack, f"ours {ours / 2**20:.0f} MiB vs SDPA flash {flash / 2**20:.0f} MiB"
