"""Static key/value cache: fixed-size buffers written at explicit slots, so decode steps have fixed shapes.

A cache is an object of its own, passed to the decoder with each call, never stored inside the model: two
generations (two threads, or two interleaved streams) each hold their own cache and cannot disturb each other, and
whoever runs generation (the pipeline, the server's batch scheduler) decides which cache serves which sequences.
"""

import torch
from torch import Tensor


class KVCache:
    """Keys (after RoPE) and values of every decoder layer, each (batch, kv_heads, max_seq_len, head_dim)."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        # Zeros, not empty: unused slots are masked, but a masked NaN would still poison attention (0 * NaN).
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        if torch.device(device).type == "cuda":  # fixed addresses let CUDA graphs replay without copying the cache
            for buffer in self.keys + self.values:
                torch._dynamo.mark_static_address(buffer)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def max_seq_len(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def dtype(self) -> torch.dtype | None:
        return self.keys[0].dtype if self.keys else None

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of sequences start:stop: writing through it writes this cache (e.g. one request's prefill into
        its row of a batch that a server decodes together)."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        return view

    def grown(self, max_seq_len: int, keep: int) -> "KVCache":
        """A longer cache of the same rows holding this one's first `keep` slots (a conversation outgrew it)."""
        k = self.keys[0] if self.keys else None
        bigger = KVCache(len(self.keys), self.batch_size, k.shape[1], max_seq_len, k.shape[3], k.dtype, k.device)
        for old, new in zip(self.keys + self.values, bigger.keys + bigger.values):
            new[:, :, :keep] = old[:, :, :keep]
        return bigger

    def layer(self, index: int, stop: int | None = None) -> tuple[Tensor, Tensor]:
        """(keys, values) of one decoder layer, which its attention writes in place: slots :stop (views), or all."""
        return self.keys[index][:, :, :stop], self.values[index][:, :, :stop]
