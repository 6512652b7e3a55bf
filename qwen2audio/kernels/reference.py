"""Plain-torch kernels with the reference's precision policy (transformers' Qwen2RMSNorm, rotary embedding, MLP).

Statistics and the rotary table are computed in fp32 and cast back to the activation dtype before they meet a
weight; everything else runs in the model dtype.
"""

import torch
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * x / rms(x): normalise in fp32, cast back before the weight multiply, as the reference does."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """fp32 cos and sin (B, T, head_dim) for integer positions (B, T); half-split ("NeoX") rotary layout."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # (head_dim / 2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim): the same frequency for both halves
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, heads, T, head_dim) by cos/sin (B, 1, T, head_dim), already in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half
    return x * cos + rotated * sin


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """The gated MLP's activation: silu(gate) * up."""
    return torch.nn.functional.silu(gate) * up
