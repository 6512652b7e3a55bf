"""Reuse across turns: what a one-row KV cache already holds, and how much of a new prompt it covers.

A multi-turn chat sends the whole history again every turn; the keys and values of a prefix depend only on that
prefix (attention is causal), so a cache that holds the previous turn's prompt and reply can serve the next prompt
from where the two part. Token ids alone do not say whether two prompts agree: every clip is written as the same
<|AUDIO|> id, so each audio window's features are compared too.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .features import audio_token_count


@dataclass
class CachedPrefix:
    """Slots 0..len(ids)-1 of a one-row cache: these ids, with each audio window's first position and features."""
    ids: Tensor  # (L,) int64
    windows: list[tuple[int, Tensor]]  # (position of its first audio token, its log-mel (n_mels, n_frames))


def window_spans(ids: Tensor, audio_token_id: int, feature_attention_mask: Tensor | None) -> list[tuple[int, int]]:
    """(first position, number of tokens) of each audio window in a one-row prompt (ids (T,)): windows fill the
    runs of <|AUDIO|> tokens in order, each with as many tokens as its valid frames give."""
    if feature_attention_mask is None:
        return []
    audio_positions = (ids == audio_token_id).nonzero().flatten().tolist()
    spans, used = [], 0
    for frames in feature_attention_mask.sum(-1).tolist():
        n = audio_token_count(int(frames))
        spans.append((audio_positions[used] if used < len(audio_positions) else len(ids), n))
        used += n
    return spans


def reusable_length(prefix: CachedPrefix | None, ids: Tensor, spans: list[tuple[int, int]],
                    features: Tensor | None) -> int:
    """How many leading tokens of the new prompt (ids (T,)) the cache holds already: the common prefix of the ids,
    cut back to the start of the first audio window in it whose features differ or that it holds only in part.
    At least one token is left to prefill, which gives the next token's logits."""
    if prefix is None:
        return 0
    n = min(len(prefix.ids), len(ids) - 1)
    differs = (prefix.ids[:n] != ids[:n]).nonzero()
    common = int(differs[0]) if len(differs) else n
    cached = dict(prefix.windows)
    for i, (start, length) in enumerate(spans):
        if start >= common:
            break
        if length == 0:  # no tokens: nothing of it is in the cache
            continue
        if start + length > common or start not in cached or not torch.equal(cached[start], features[i]):
            return start
    return common


def audio_after(inputs: dict, spans: list[tuple[int, int]], cached: int) -> dict:
    """The prompt's audio inputs (input_features, feature_attention_mask) for its tokens from `cached` on: windows
    that start before `cached` are in the cache whole (reusable_length sees to that) and are left out; None where no
    window is left."""
    skip = sum(1 for start, _ in spans if start < cached)
    return {k: inputs[k][skip:] if skip < len(spans) else None for k in ("input_features", "feature_attention_mask")
            if k in inputs}


def held_prefix(prompt_ids: Tensor, fed: list[int], spans: list[tuple[int, int]],
                features: Tensor | None) -> CachedPrefix:
    """What a one-row cache holds after a generation: the prompt (ids (T,)) and every token fed back (all generated
    tokens but the last), with the prompt's audio windows."""
    ids = torch.cat([prompt_ids, torch.tensor(fed, dtype=torch.long, device=prompt_ids.device)])
    return CachedPrefix(ids, [(start, features[i]) for i, (start, n) in enumerate(spans) if n])
