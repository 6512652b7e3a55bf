"""The visible attention path: an explicit softmax whose probabilities can be read (transformers' eager attention).

The encoder's and the decoder's attention modules run `scaled_dot_product_attention` by default. Setting
`module.eager = True` on one of them switches that module (and only it) to `attention_probs` below followed by
`probs @ v`, and passes the probabilities through `module.probs`, an identity module to hook for attention maps
(`inspection.capture` does this). This is the reference's `attn_implementation="eager"`, and the test oracle for
the fast path.
"""

import torch
from torch import Tensor


def attention_probs(q: Tensor, k: Tensor, mask: Tensor | None, scale: float, is_causal: bool,
                    softmax_dtype: torch.dtype | None = None) -> Tensor:
    """softmax(q k^T * scale) over the keys a query may attend to: (B, heads, T, S), in q's dtype.

    q (B, heads, T, head_dim); k (B, kv_heads, S, head_dim), its heads shared by groups of query heads as SDPA's
    enable_gqa does; mask (B or 1, 1, T, S) bool "may attend", or None with is_causal for a plain causal mask.
    Masked scores get the dtype's lowest value, as the reference's additive masks give them. softmax_dtype: the
    decoder's reference computes the softmax in fp32 (then casts back), the encoder's in the activation dtype.
    """
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, heads, S, head_dim)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, heads, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # query t sees keys 0..t + S - T
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(-1, dtype=softmax_dtype).to(q.dtype)


def attend(probs: Tensor, v: Tensor) -> Tensor:
    """probs (B, heads, T, S) @ v (B, kv_heads, S, head_dim) -> (B, heads, T, head_dim)."""
    return probs @ v.repeat_interleave(probs.shape[1] // v.shape[1], dim=1)
