"""The attention slot: every attention in the model calls a function `(q, k, v, key_mask) -> out`.

Tensors are [B, L, heads, head_dim]; `key_mask` is [B, L_k] bool (True = a real token) or None. `parallel/` wraps the slot
(Ulysses all-to-all around it); the model itself only picks a local backend.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionFn = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
    """PyTorch SDPA; masked keys get zero weight.

    A sample with no visible key at all (its only modality dropped, in a video-only layer) attends to all of its keys
    instead, so its values stay finite: masked values still enter the matmul with weight 0, and 0 * NaN would poison
    the other modality. Callers discard those outputs.
    """
    mask = None if key_mask is None else visible_keys(key_mask)[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def visible_keys(key_mask: Tensor) -> Tensor:
    """The key mask with all-masked rows opened up (see sdpa_attention)."""
    return key_mask | ~key_mask.any(dim=1, keepdim=True)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
    """flash-attn varlen on CUDA: keys (and queries) unpadded with `key_mask`; padded query rows come back as zeros."""
    from flash_attn import flash_attn_varlen_func  # imported lazily: GPU-only extra

    b, lq, n, d = q.shape
    lk = k.shape[1]
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    key_mask = torch.ones(b, lk, dtype=torch.bool, device=q.device) if key_mask is None else visible_keys(key_mask)
    k_lens = key_mask.sum(1, dtype=torch.int32)
    k_idx = key_mask.flatten().nonzero().squeeze(1)
    cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))
    q_mask = key_mask if lq == lk else torch.ones(b, lq, dtype=torch.bool, device=q.device)
    q_lens = q_mask.sum(1, dtype=torch.int32)
    q_idx = q_mask.flatten().nonzero().squeeze(1)
    cu_q = F.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(
        q.flatten(0, 1)[q_idx].to(dtype),
        k.flatten(0, 1)[k_idx].to(dtype),
        v.flatten(0, 1)[k_idx].to(dtype),
        cu_q,
        cu_k,
        int(q_lens.max()),
        int(k_lens.max()),
    )
    full = out.new_zeros(b * lq, n, d)
    full[q_idx] = out
    return full.view(b, lq, n, d).to(q.dtype)


def get_attention(backend: str) -> AttentionFn:
    """The local attention function for `model.attention_backend`; "flash" stops with a clear error where it cannot run."""
    if backend == "sdpa":
        return sdpa_attention
    if backend == "flash":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "model.attention_backend=flash needs a CUDA GPU, and none is visible; use model.attention_backend=sdpa on CPU"
            )
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "model.attention_backend=flash needs flash-attn: pip install 'echomotion[gpu]' on a CUDA machine, "
                "or use model.attention_backend=sdpa"
            ) from e
        return flash_attention
    raise ValueError(f"unknown attention backend {backend!r}: choose 'sdpa' or 'flash'")
