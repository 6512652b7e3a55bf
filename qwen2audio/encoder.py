"""Audio encoder and projector; matches transformers' Qwen2AudioEncoder and Qwen2AudioMultiModalProjector.

A Whisper-large-v3-shaped encoder (two convolutions, sinusoidal positions, pre-LN transformer layers), followed by
a 2x average pool over time, a final LayerNorm and a linear projector to the decoder width.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import attend, attention_probs
from .config import AudioConfig
from .features import encoder_lengths


class EncoderAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.scaling = (d_model // n_heads) ** -0.5
        self.k_proj = nn.Linear(d_model, d_model, bias=False)  # Whisper's key projection has no bias
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.eager = False  # True: explicit softmax (attention.py), probabilities passed through self.probs
        self.probs = nn.Identity()  # a hook point: forward hooks on it see (B, heads, S, S) when eager

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        B, S, D = x.shape
        # The scale is applied to q after its bias, then SDPA runs with scale 1, in the reference's order.
        q = (self.q_proj(x) * self.scaling).view(B, S, self.n_heads, -1).transpose(1, 2)  # (B, heads, S, head_dim)
        k = self.k_proj(x).view(B, S, self.n_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_heads, -1).transpose(1, 2)
        if self.eager:  # the reference's eager attention: softmax in the activation dtype (Whisper's)
            out = attend(self.probs(attention_probs(q, k, key_mask, 1.0, is_causal=False)), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=1.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, D))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.self_attn = EncoderAttention(cfg.d_model, cfg.encoder_attention_heads)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.gradient_checkpointing = False  # True: in training, keep only the input and recompute in backward

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))  # exact (erf) GELU
        if x.dtype == torch.float16:  # the reference clamps in fp16 only, to keep activations finite
            bound = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-bound, bound)
        return x


class AudioEncoder(nn.Module):
    """log-mel (B, n_mels, frames) -> pooled, normed states (B, positions // 2, d_model)."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        # Loaded from the checkpoint (Whisper's sinusoids there); never regenerated.
        self.embed_positions = nn.Embedding(cfg.max_source_positions, cfg.d_model)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, features: Tensor, valid_positions: Tensor, n_positions: int) -> Tensor:
        """features (B, n_mels, F) with F >= 2 * n_positions - 1 frames; valid_positions (B,) post-conv lengths.

        Only the first `n_positions` conv outputs are kept; keys past each clip's own length are masked.
        """
        x = features.to(self.conv1.weight.dtype)  # bf16 models see bf16-rounded features, as in the reference
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))  # (B, d_model, ceil(F / 2))
        x = x[:, :, :n_positions].transpose(1, 2)  # (B, S, d_model)
        x = x + self.embed_positions.weight[:n_positions]
        key_mask = None
        if bool((valid_positions < n_positions).any()):  # as SDPA in the reference: no mask when nothing is padded
            key_mask = torch.arange(n_positions, device=x.device)[None, :] < valid_positions[:, None]  # (B, S)
            key_mask = key_mask[:, None, None, :]  # (B, 1, 1, S): key padding only; padded queries are computed
        for layer in self.layers:
            if layer.gradient_checkpointing and torch.is_grad_enabled():  # the layer runs again during backward
                x = checkpoint(layer, x, key_mask, use_reentrant=False)
            else:
                x = layer(x, key_mask)
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)  # (B, S // 2, d_model)
        return self.layer_norm(x)  # pool first, then norm (the order matters)


class MultiModalProjector(nn.Module):
    def __init__(self, d_audio: int, d_text: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_audio, d_text)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def encoder_window(mel_frames: Tensor, cfg: AudioConfig, full: bool) -> tuple[int, int]:
    """(mel frames to feed, conv positions to keep) for a batch with `mel_frames` valid frames per clip.

    Conv2 output j sees conv1 outputs 2j-1..2j+1, which see mel frames 2j-2..2j+2. The last valid output of a clip,
    j = L1 - 1, therefore needs mel frames up to 2 * L1: feeding 2 * L1 + 1 frames of the same 30 s-padded
    features gives exactly the reference's valid outputs, at a cost that grows with the clip, not with 30 s.
    """
    if full:
        return cfg.n_frames, cfg.max_source_positions
    # parity: the reference always encodes all 3000 frames; the valid tokens are the same either way (tested).
    longest = int(encoder_lengths(mel_frames)[0].max())  # conv positions of the longest clip
    return min(cfg.n_frames, 2 * longest + 1), longest
