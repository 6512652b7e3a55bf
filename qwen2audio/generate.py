"""Token generation as free functions: prefill, a fixed-shape decode step, logits processors, sampling.

Matches transformers' `GenerationMixin.generate` (greedy and multinomial sampling, 5.24): fp32 logits, the
processors in its order (repetition penalty, min-new-tokens, then for sampling temperature, top-k, top-p), per-row
stopping on eos with finished rows padded, left-padded batches positioned by `cumsum(attention_mask) - 1`.
"""

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .errors import InputError
from .model import Qwen2AudioForConditionalGeneration, causal_padding_mask, positions_from_mask

# ---------------------------------------------------------------------------------------------------------------
# Logits processors: pure functions on fp32 logits (B, V), each equal to the transformers class named in it.


def seen_token_mask(input_ids: Tensor, attention_mask: Tensor, vocab_size: int) -> Tensor:
    """(B, vocab_size) bool: the ids present in each row, left padding excluded (audio tokens included)."""
    ids = input_ids.masked_fill(attention_mask == 0, vocab_size)  # pads go to a spare column, dropped below
    seen = torch.zeros(input_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    return seen.scatter_(1, ids.clamp(max=vocab_size), True)[:, :vocab_size]


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """RepetitionPenaltyLogitsProcessor: each seen token becomes less likely (x penalty if its logit < 0, else / it)."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def suppress_tokens(logits: Tensor, token_ids: Tensor) -> Tensor:
    """MinNewTokensLengthLogitsProcessor while too few tokens are out: the eos ids (1-D) can't be picked."""
    return logits.index_fill(-1, token_ids, -torch.inf)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """TemperatureLogitsWarper."""
    return logits / temperature


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """TopKLogitsWarper: keep the logits >= the k-th largest (ties at the boundary all stay)."""
    k = min(max(top_k, 1), logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, -torch.inf)


def top_p_filter(logits: Tensor, top_p: float, min_tokens_to_keep: int = 1) -> Tensor:
    """TopPLogitsWarper: keep the most likely tokens whose probabilities reach top_p, at least min_tokens_to_keep.

    parity: transformers sorts ascending and drops the tokens whose cumulative probability stays <= 1 - top_p; the
    same unstable sort decides which of tied tokens go, so it is reproduced call for call.
    """
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -min_tokens_to_keep:] = False  # the most likely tokens are at the end
    return logits.masked_fill(remove.scatter(-1, order, remove), -torch.inf)


def process_logits(logits: Tensor, seen: Tensor, n_generated: int, eos_ids: Tensor, *, min_new_tokens: int,
                   do_sample: bool, temperature: float, top_k: int | None, top_p: float,
                   repetition_penalty: float) -> Tensor:
    """All processors in transformers' order (`_get_logits_processor`); a processor left at its neutral value is
    skipped, as there."""
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if n_generated < min_new_tokens and eos_ids.numel():
        logits = suppress_tokens(logits, eos_ids)
    if do_sample:
        if temperature != 1.0:
            logits = apply_temperature(logits, temperature)
        if top_k:  # None and 0 both mean "no top-k"
            logits = top_k_filter(logits, top_k)
        if top_p < 1.0:
            logits = top_p_filter(logits, top_p)
    return logits


def sample(scores: Tensor, generator: torch.Generator | None) -> Tensor:
    """(B, V) processed logits -> (B,) token ids drawn from softmax(scores)."""
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# The model side: one prefill over the prompt, then fixed-shape single-token steps through the static cache.


def prefill(model: Qwen2AudioForConditionalGeneration, input_ids: Tensor, slot_mask: Tensor,
            input_features: Tensor | None = None, feature_attention_mask: Tensor | None = None) -> Tensor:
    """Write the prompt (B, T) into cache slots 0..T-1; returns the last position's logits (B, V) in fp32.

    slot_mask (B, max_seq_len) marks real tokens per cache slot: the prompt's attention_mask, then ones.
    """
    T = input_ids.shape[1]
    x = model.embed(input_ids, input_features, feature_attention_mask)  # (B, T, hidden)
    input_pos = torch.arange(T, device=x.device)
    mask = causal_padding_mask(slot_mask, input_pos, slot_mask.shape[1])  # (B, 1, T, max_seq_len)
    positions = positions_from_mask(slot_mask[:, :T])
    return model.forward_cached(x, positions, input_pos, mask)[:, -1].float()


def decode_step(model: Qwen2AudioForConditionalGeneration, token_ids: Tensor, positions: Tensor, input_pos: Tensor,
                mask: Tensor) -> Tensor:
    """token_ids (B, 1) at RoPE positions (B, 1), written to cache slot input_pos (1,), mask (B, 1, 1, max_seq_len)
    -> next-token logits (B, V) in fp32. Shapes never change between steps, so this can be torch.compile'd."""
    x = model.language_model.model.embed_tokens(token_ids)  # (B, 1, hidden)
    return model.forward_cached(x, positions, input_pos, mask)[:, -1].float()


def _check_options(max_new_tokens: int, min_new_tokens: int, do_sample: bool, temperature: float,
                   top_k: int | None, top_p: float, repetition_penalty: float) -> None:
    problems = [
        (max_new_tokens < 1, f"max_new_tokens must be at least 1, got {max_new_tokens}"),
        (min_new_tokens < 0, f"min_new_tokens must be >= 0, got {min_new_tokens}"),
        (do_sample and not temperature > 0,
         f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy decoding"),
        (top_k is not None and top_k < 0, f"top_k must be >= 0 (0 or None turns it off), got {top_k}"),
        (not 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (not repetition_penalty > 0, f"repetition_penalty must be > 0 (1.0 turns it off), got {repetition_penalty}"),
    ]
    for bad, message in problems:
        if bad:
            raise InputError(message)


@torch.no_grad()
def generate_stream(model: Qwen2AudioForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor | None = None,
             input_features: Tensor | None = None, feature_attention_mask: Tensor | None = None, *,
             max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
             eos_token_ids: int | Sequence[int] = (), pad_token_id: int, ignore_eos: bool = False,
             decode_fn: Callable[..., Tensor] | None = None) -> Iterator[Tensor]:
    """Yield the next token of every row (B,) at each step, up to max_new_tokens; see `generate`."""
    _check_options(max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty)
    device = model.language_model.lm_head.weight.device
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.to(device)
    if input_features is not None:
        input_features, feature_attention_mask = input_features.to(device), feature_attention_mask.to(device)
    B, T = input_ids.shape
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape {(B, T)}")
    if not bool(attention_mask[:, -1].all()):
        raise InputError("a prompt ends in padding; batch prompts with left padding (padding_side='left')")
    limit = model.cfg.text_config.max_position_embeddings
    if T + max_new_tokens > limit:
        raise InputError(f"the prompt ({T} tokens, audio included) plus max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's max_position_embeddings ({limit}); shorten the prompt or max_new_tokens")

    cache = model.language_model.cache_size
    if cache is None or cache[0] != B or cache[1] < T + max_new_tokens:
        model.setup_cache(B, T + max_new_tokens)
    S = model.language_model.cache_size[1]
    # (B, S): the prompt's padding by slot; every slot after the prompt holds a real (generated) token.
    slot_mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(B, S - T, dtype=torch.bool)], dim=1)
    eos_ids = torch.tensor([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids),
                           dtype=torch.long, device=device)
    # parity: transformers samples from the global RNG; on CPU a generator seeded with s draws exactly what
    # torch.manual_seed(s) would, so seeded runs reproduce its samples.
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    logits = prefill(model, input_ids, slot_mask, input_features, feature_attention_mask)
    seen = seen_token_mask(input_ids, attention_mask, logits.shape[-1])  # for the repetition penalty
    next_position = attention_mask.long().sum(-1, keepdim=True)  # (B, 1): real tokens so far
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        scores = process_logits(logits, seen, step, eos_ids, min_new_tokens=min_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty)
        token = sample(scores, generator) if do_sample else scores.argmax(dim=-1)  # (B,)
        token = token.masked_fill(done, pad_token_id)
        seen[torch.arange(B, device=device), token] = True
        yield token
        if not ignore_eos and eos_ids.numel():
            done |= torch.isin(token, eos_ids)
            if bool(done.all()):
                break
        if step + 1 == max_new_tokens:
            break
        input_pos = torch.tensor([T + step], device=device)
        mask = causal_padding_mask(slot_mask, input_pos, S)  # (B, 1, 1, S)
        logits = (decode_fn or decode_step)(model, token[:, None], next_position + step, input_pos, mask)


def generate(model: Qwen2AudioForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor | None = None,
             input_features: Tensor | None = None, feature_attention_mask: Tensor | None = None, *,
             on_token: Callable[[int, Tensor], None] | None = None, **options) -> Tensor:
    """Generate up to max_new_tokens for a left-padded batch; returns only the new ids (B, n), n = longest row.

    Options (keyword only): max_new_tokens, min_new_tokens=0, do_sample=False, temperature=1.0, top_k=None,
    top_p=1.0, repetition_penalty=1.0, seed=None, eos_token_ids=(), pad_token_id, ignore_eos=False, decode_fn=None.
    A row stops after its first eos (unless ignore_eos) and is filled with pad_token_id from then on; the loop ends
    when every row has stopped. on_token(step, tokens (B,)) sees each step's tokens (pad for stopped rows) as they
    come. seed makes sampling repeatable (a private torch.Generator); seed=None draws from torch's global RNG.
    decode_fn replaces decode_step, e.g. with torch.compile(decode_step, fullgraph=True) (a cache of unchanged
    size, reused across calls, then needs no recompilation).
    """
    tokens = []
    for step, token in enumerate(generate_stream(model, input_ids, attention_mask, input_features,
                                                 feature_attention_mask, **options)):
        tokens.append(token)
        if on_token is not None:
            on_token(step, token)
    return torch.stack(tokens, dim=1)
