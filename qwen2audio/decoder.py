"""Qwen2 decoder; matches transformers' Qwen2ForCausalLM (models/qwen2/modeling_qwen2.py).

Pre-norm layers of grouped-query attention (q/k/v with biases, half-split RoPE) and a SiLU-gated MLP, a final
RMSNorm and an untied lm_head. Attention is `scaled_dot_product_attention` with boolean "may attend" masks.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import attend, attention_probs
from .cache import KVCache
from .config import TextConfig
from .kernels import apply_rope, rms_norm, rope_cos_sin, silu_mul
from .kernels.products import MAX_SKINNY_ROWS, cached_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.eager = False  # True: explicit softmax (attention.py), probabilities passed through self.probs
        self.cpu_kernel = False  # True (set by kernels.cpu.prepare_for_cpu): few cached query rows in the C++ kernel
        self.probs = nn.Identity()  # a hook point: forward hooks on it see (B, heads, T, S) when eager

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                kv: tuple[Tensor, Tensor] | None = None, input_pos: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, kv_heads, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # keys are cached after RoPE
        if kv is not None:  # write this step at each row's cache slots input_pos (B, T), attend over the whole cache
            rows = torch.arange(B, device=x.device)[:, None]  # (B, 1), broadcast against input_pos (B, T)
            kv[0][rows, :, input_pos] = k.transpose(1, 2)  # indexed: (B, T, kv_heads, head_dim)
            kv[1][rows, :, input_pos] = v.transpose(1, 2)
            k, v = kv  # (B, kv_heads, max_seq_len, head_dim)
        if self.eager:  # the reference's eager attention: softmax in fp32, cast back to the activation dtype
            probs = attention_probs(q, k, mask, self.head_dim ** -0.5, mask is None and T > 1, torch.float32)
            out = attend(self.probs(probs), v)
        elif self.cpu_kernel and kv is not None and T <= MAX_SKINNY_ROWS and not torch.is_grad_enabled() and \
                not torch.compiler.is_compiling():
            out = cached_attention(q, k, v, mask, self.head_dim ** -0.5)  # fp32 inside, in q's dtype
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                                 scale=self.head_dim ** -0.5,
                                                 enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def extra_repr(self) -> str:
        return "cpu_kernel=True" if self.cpu_kernel else ""


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.gradient_checkpointing = False  # True: in training, keep only the input and recompute in backward

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                kv: tuple[Tensor, Tensor] | None = None, input_pos: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None, cache: KVCache | None = None,
                input_pos: Tensor | None = None) -> Tensor:
        """x (B, T, hidden) embeddings; positions (B, T) RoPE positions; mask (B, 1, T, S) bool or None (causal);
        with a cache, input_pos (B, T) are the cache slots each row writes its T new tokens to."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)  # fp32 (B, T, head_dim)
        cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]  # (B, 1, T, head_dim), activation dtype
        stop = None  # attend over the slots written so far, not the whole cache (compiled code keeps fixed shapes)
        if cache is not None and mask is not None and not torch.compiler.is_compiling():
            stop = int(input_pos.max()) + 1
            # The later slots are in no row's past: the same result. Made contiguous once, not in each layer's kernel.
            mask = mask[..., :stop].contiguous()
        for i, layer in enumerate(self.layers):
            args = (x, cos, sin, mask, None if cache is None else cache.layer(i, stop), input_pos)
            if layer.gradient_checkpointing and torch.is_grad_enabled():  # the layer runs again during backward
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
