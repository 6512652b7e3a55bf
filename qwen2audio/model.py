"""Qwen2-Audio: audio encoder + projector + Qwen2 decoder; matches transformers' Qwen2AudioForConditionalGeneration.

Module paths equal the Hub checkpoint keys (`audio_tower.*`, `multi_modal_projector.*`, `language_model.*`), so a
checkpoint loads with `load_state_dict(strict=True)` and no renaming.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache
from .config import Qwen2AudioConfig
from .decoder import DecoderLayer, Qwen2ForCausalLM
from .encoder import AudioEncoder, EncoderLayer, MultiModalProjector, encoder_window
from .errors import InputError
from .features import encoder_lengths


def causal_padding_mask(attention_mask: Tensor, query_slots: Tensor, n_keys: int) -> Tensor:
    """(B, 1, T, n_keys) bool "may attend" mask for queries at cache slots query_slots ((B, T), or (T,) shared).

    attention_mask (B, >= n_keys or fewer) marks real tokens (1) and padding (0) by slot. Padded query rows would
    see no key at all; they attend to their own slot instead so that no row of SDPA is empty (their outputs are
    never used).
    """
    B = attention_mask.shape[0]
    slots = query_slots.expand(B, -1)[:, :, None]  # (B, T, 1)
    keys = torch.arange(n_keys, device=query_slots.device)
    valid = torch.zeros(B, n_keys, dtype=torch.bool, device=query_slots.device)
    n = min(n_keys, attention_mask.shape[1])
    valid[:, :n] = attention_mask[:, :n].bool()
    mask = (keys <= slots) & valid[:, None, :]  # (B, T, n_keys)
    mask |= keys == slots  # parity: pad rows differ from the reference's (unused)
    return mask[:, None]


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """RoPE positions that skip left padding: cumsum(mask) - 1, pads at 0 (what transformers' generate() uses)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


IGNORE_INDEX = -100  # a label that does not count (transformers' and PyTorch's cross-entropy convention)


def counted_targets(labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """(B, T - 1) bool: which next-token targets labels[:, 1:] count in the loss.

    A target counts when it is not IGNORE_INDEX and, given an attention_mask, both it and the position predicting
    it are real tokens.
    """
    counted = labels[:, 1:] != IGNORE_INDEX
    if attention_mask is not None:
        real = attention_mask.bool()
        # parity: transformers also counts the first real token of a left-padded row, predicted from a padding
        # position whose logits are arbitrary; here it never counts, so a row's loss is the same padded or not.
        counted = counted & real[:, 1:] & real[:, :-1]
    return counted


def lm_loss(logits: Tensor, labels: Tensor, attention_mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy of logits (B, T, vocab) against labels (B, T): logits at t predict labels at t + 1;
    "mean" over the counted targets (see counted_targets), or their "sum". Computed in fp32."""
    counted = counted_targets(labels, attention_mask)
    return cross_entropy(logits[:, :-1][counted], labels[:, 1:][counted], reduction)


def cross_entropy(logits: Tensor, targets: Tensor, reduction: str) -> Tensor:
    """logits (N, vocab), targets (N,) -> the mean or sum of -log p(target), in fp32."""
    if reduction not in ("mean", "sum"):
        raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if reduction == "mean" and targets.numel() == 0:
        raise InputError("the labels count no token (all are -100 or padding), so their mean loss is undefined; "
                         "use reduction='sum' or give each row a target")
    # parity: fp32 whatever the model dtype (transformers takes the cross-entropy of bf16 logits in bf16).
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


class Qwen2AudioForConditionalGeneration(nn.Module):
    def __init__(self, cfg: Qwen2AudioConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.audio_tower = AudioEncoder(cfg.audio_config)
        self.multi_modal_projector = MultiModalProjector(cfg.audio_config.d_model, cfg.text_config.hidden_size)
        self.language_model = Qwen2ForCausalLM(cfg.text_config)
        # "fast" encodes each batch of clips up to its longest valid length; "reference" always encodes 30 s.
        self.encoder_mode = "fast"
        # The dtype of the decoder's activations and KV cache; None means the weights' dtype. float32 over bf16
        # weights keeps bf16 in memory and computes in fp32 (for CPUs without bf16 arithmetic; kernels/cpu.py).
        self.activation_dtype: torch.dtype | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the decoder computes in (its weights' dtype unless activation_dtype says otherwise)."""
        return self.activation_dtype or self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    def encode_audio(self, input_features: Tensor, feature_attention_mask: Tensor, mode: str | None = None) -> Tensor:
        """log-mel (n_audio, n_mels, 3000) + frame mask (n_audio, 3000) -> projected rows (sum of tokens, hidden),
        the rows of audio 0, then audio 1, ... : what replaces the <|AUDIO|> tokens."""
        mode = mode or self.encoder_mode
        if mode not in ("fast", "reference"):
            raise InputError(f"encoder mode must be 'fast' or 'reference', got {mode!r}")
        if feature_attention_mask is None:
            raise InputError("input_features need their feature_attention_mask (the processor returns both)")
        a = self.cfg.audio_config
        if input_features.ndim != 3 or input_features.shape[1:] != (a.num_mel_bins, a.n_frames):
            raise InputError(f"input_features must be (n_audio, {a.num_mel_bins}, {a.n_frames}) log-mels padded to "
                             f"30 s, got {tuple(input_features.shape)}; use the processor or features.extract_features")
        mel_frames = feature_attention_mask.sum(-1)  # (n_audio,)
        valid_positions, n_tokens = encoder_lengths(mel_frames)
        n_frames, n_positions = encoder_window(mel_frames, a, full=mode == "reference")
        if n_positions == 0:  # every clip too short for even one encoder position
            return input_features.new_zeros(0, self.cfg.text_config.hidden_size,
                                            dtype=self.multi_modal_projector.linear.weight.dtype)
        states = self.audio_tower(input_features[:, :, :n_frames], valid_positions, n_positions)
        rows = self.multi_modal_projector(states)  # (n_audio, n_positions // 2, hidden)
        keep = torch.arange(rows.shape[1], device=rows.device)[None, :] < n_tokens.to(rows.device)[:, None]
        return rows[keep]  # boolean indexing is row-major: audio order, then time

    def check_ids(self, input_ids: Tensor) -> Tensor:
        """input_ids as given, after checking they are a (batch, length) integer tensor of ids in the vocabulary."""
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point() or \
                input_ids.is_complex() or input_ids.dtype == torch.bool or input_ids.numel() == 0 or input_ids.is_meta:
            what = f"{input_ids.dtype} tensor of shape {tuple(input_ids.shape)} on {input_ids.device}" \
                if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise InputError(f"input_ids must be a non-empty (batch, length) tensor of integer token ids, got {what}"
                             + ("; make one with torch.tensor(ids)" if isinstance(input_ids, (list, tuple)) else ""))
        vocab = self.cfg.text_config.vocab_size
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise InputError(f"input_ids hold token id {low if low < 0 else high}, outside the vocabulary "
                             f"(0..{vocab - 1})")
        return input_ids

    def embed(self, input_ids: Tensor, input_features: Tensor | None = None,
              feature_attention_mask: Tensor | None = None) -> Tensor:
        """Token embeddings (B, T, hidden) with the audio rows scattered into the <|AUDIO|> positions."""
        self.check_ids(input_ids)
        embeds = self.language_model.model.embed_tokens(input_ids).to(self.dtype)
        is_audio = input_ids == self.cfg.audio_token_index
        n_slots = int(is_audio.sum())
        if input_features is None:
            if n_slots:
                raise InputError(f"input_ids hold {n_slots} <|AUDIO|> tokens but no input_features were given")
            return embeds
        audio = self.encode_audio(input_features, feature_attention_mask)
        if audio.shape[0] != n_slots:
            raise InputError(f"the audio gives {audio.shape[0]} audio tokens but input_ids hold {n_slots} <|AUDIO|> "
                             "tokens; expand each <|AUDIO|> to its clip's token count (the processor does this)")
        return embeds.masked_scatter(is_audio[..., None], audio.to(embeds.dtype))  # row-major fill

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, input_features: Tensor | None = None,
                feature_attention_mask: Tensor | None = None, labels: Tensor | None = None,
                reduction: str = "mean") -> Tensor:
        """Logits (B, T, vocab) for every position, without the cache (the reference's forward).

        With labels (B, T), the language-model loss instead: `lm_loss(logits, labels, attention_mask, reduction)`,
        but the lm_head runs only at the positions whose next label counts (for the 7B it is a 156032 x 4096
        product per position, the largest in the model).
        """
        x = self.embed(input_ids, input_features, feature_attention_mask)
        B, T = input_ids.shape
        if attention_mask is None or bool(attention_mask.all()):
            positions = torch.arange(T, device=x.device).expand(B, T)
            mask = None  # plain causal attention
        else:
            positions = positions_from_mask(attention_mask)
            mask = causal_padding_mask(attention_mask, torch.arange(T, device=x.device), T)
        h = self.language_model.model(x, positions, mask)  # (B, T, hidden)
        if labels is None:
            return self.language_model.lm_head(h)
        if labels.shape != input_ids.shape:
            raise InputError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(labels.shape)}")
        counted = counted_targets(labels, attention_mask)  # (B, T - 1)
        logits = self.language_model.lm_head(h[:, :-1][counted])  # (N, vocab): only where a target counts
        return cross_entropy(logits, labels[:, 1:][counted], reduction)

    def set_gradient_checkpointing(self, enabled: bool = True, encoder: bool = True, decoder: bool = True) -> None:
        """Turn activation checkpointing on or off for every layer of the encoder and/or the decoder: in training,
        each layer keeps only its input and runs again during backward (less memory, about a third more time)."""
        for module in self.modules():
            if isinstance(module, EncoderLayer) and encoder or isinstance(module, DecoderLayer) and decoder:
                module.gradient_checkpointing = enabled

    def forward_cached(self, x: Tensor, positions: Tensor, cache: KVCache, input_pos: Tensor, mask: Tensor,
                       last_only: bool = True) -> Tensor:
        """One incremental step through a static cache (made by new_cache).

        x (B, T, hidden) embeddings of new tokens, positions (B, T) RoPE positions, input_pos (B, T) the cache slots
        each row writes them to (rows may be at different slots), mask (B, 1, T, max_seq_len). Returns logits (B, 1, vocab) of the last position, or
        (B, T, vocab).
        """
        h = self.language_model.model(x, positions, mask, cache, input_pos)
        # contiguous(): a strided (B > 1, 1, hidden) slice sends F.linear down matmul's batched path, which copies
        # the (vocab, hidden) weight once per row (9.5 GB and ~100 s for the 7B's lm_head at batch 8, on CPU).
        return self.language_model.lm_head(h[:, -1:].contiguous() if last_only else h)

    def new_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        """An empty cache for batch_size sequences of up to max_seq_len tokens, on the model's device."""
        t = self.cfg.text_config
        if max_seq_len > t.max_position_embeddings:
            raise InputError(f"a cache of {max_seq_len} positions exceeds max_position_embeddings "
                             f"({t.max_position_embeddings}); shorten the prompt or max_new_tokens")
        return KVCache(t.num_hidden_layers, batch_size, t.num_key_value_heads, max_seq_len, t.head_dim, self.dtype,
                       self.device)
