"""Token generation as free functions: prefill, a fixed-shape decode step, logits processors, sampling.

Matches transformers' `GenerationMixin.generate` (greedy and multinomial sampling, 5.24): fp32 logits, the
processors in its order (repetition penalty, min-new-tokens, then for sampling temperature, top-k, top-p), per-row
stopping on eos with finished rows padded, left-padded batches positioned by `cumsum(attention_mask) - 1`.
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .cache import KVCache
from .errors import InputError, WeightsError
from .model import Qwen2AudioForConditionalGeneration, causal_padding_mask, positions_from_mask


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate: one typed home for the options, shared by `generate`, the pipeline, the CLI and the server.
    Defaults are transformers' (the pipeline fills them from the checkpoint's generation_config.json); every value
    is checked here, once, so a bad one is an InputError naming it wherever it came from."""
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None  # None or 0: no top-k
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1.0: off; applied when greedy too, as in transformers
    seed: int | None = None  # a private generator: sampling repeats; None draws from torch's global RNG
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0  # what a row that has stopped is filled with
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", _token_ids(self.eos_token_ids))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        problems = [
            (self.max_new_tokens < 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (self.min_new_tokens < 0, f"min_new_tokens must be >= 0, got {self.min_new_tokens}"),
            (self.do_sample and not 0 < self.temperature < math.inf, f"temperature must be > 0 when sampling, got "
             f"{self.temperature}; use do_sample=False for greedy decoding"),
            (self.top_k is not None and self.top_k < 0, f"top_k must be >= 0 (0 or None turns it off), got {self.top_k}"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (not 0 < self.repetition_penalty < math.inf,
             f"repetition_penalty must be > 0 (1.0 turns it off), got {self.repetition_penalty}"),
            (self.seed is not None and not 0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}"),
            (self.pad_token_id < 0, f"pad_token_id must be >= 0, got {self.pad_token_id}"),
        ]
        for bad, message in problems:
            if bad:
                raise InputError(message)

    def replace(self, **changes) -> "GenerationOptions":
        """A copy with some options changed; unknown names are an InputError listing the known ones."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise InputError(f"unknown generation option(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(f.name for f in fields(self))}")
        return GenerationOptions(**{f.name: getattr(self, f.name) for f in fields(self)} | changes)


def _token_ids(ids: object) -> tuple[int, ...]:
    ids = (ids,) if isinstance(ids, int) and not isinstance(ids, bool) else ids
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                     for i in ids):
        raise InputError(f"eos_token_ids must be token ids (non-negative integers), got {ids!r:.80}")
    return tuple(ids)


_TYPES = {"int": ((int,), "an integer"), "int | None": ((int, type(None)), "an integer or None"),
          "float": ((int, float), "a number"), "bool": ((bool,), "True or False")}


def _check_type(name: str, value: object, annotation: object) -> None:
    """Strict types: 5.5 or "5" is no max_new_tokens, "0.7" no temperature (bool is not an int here either)."""
    key = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    if key not in _TYPES:
        return  # eos_token_ids: checked by _token_ids
    kinds, expected = _TYPES[key]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise InputError(f"{name} must be {expected}, got {value!r:.40} ({type(value).__name__})")
    if isinstance(value, float) and math.isnan(value):
        raise InputError(f"{name} must be a number, got NaN")

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


def process_logits(logits: Tensor, seen: Tensor, n_generated: int, eos_ids: Tensor,
                   o: GenerationOptions) -> Tensor:
    """All processors in transformers' order (`_get_logits_processor`); a processor left at its neutral value is
    skipped, as there."""
    if o.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, o.repetition_penalty)
    if n_generated < o.min_new_tokens and eos_ids.numel():
        logits = suppress_tokens(logits, eos_ids)
    if o.do_sample:
        if o.temperature != 1.0:
            logits = apply_temperature(logits, o.temperature)
        if o.top_k:  # None and 0 both mean "no top-k"
            logits = top_k_filter(logits, o.top_k)
        if o.top_p < 1.0:
            logits = top_p_filter(logits, o.top_p)
    return logits


def all_finite(logits: Tensor) -> bool:
    """No NaN or infinity in logits (argmax of NaN would answer silently wrong). The smallest and largest value are
    finite exactly when all are (a NaN anywhere makes both NaN): 0.04 ms for a row of the 7B's vocabulary, against
    0.37 for torch.isfinite(logits).all(), which builds a mask first (2-core AMD EPYC Zen 4)."""
    low, high = torch.aminmax(logits)
    return bool(low.isfinite() & high.isfinite())


def sample(scores: Tensor, generator: torch.Generator | None) -> Tensor:
    """(B, V) processed logits -> (B,) token ids drawn from softmax(scores)."""
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# The model side: one prefill over the prompt, then fixed-shape single-token steps through the static cache.


def prefill(model: Qwen2AudioForConditionalGeneration, input_ids: Tensor, slot_mask: Tensor, cache: KVCache,
            input_features: Tensor | None = None, feature_attention_mask: Tensor | None = None,
            start: int = 0) -> Tensor:
    """Write prompt tokens (B, n) into cache slots start..start+n-1 (slots 0..start-1 hold the prompt's beginning
    already); returns the last position's logits (B, V) in fp32. The audio given is that of these n tokens.

    slot_mask (B, max_seq_len) marks real tokens per cache slot: the prompt's attention_mask, then ones.
    """
    T = start + input_ids.shape[1]
    x = model.embed(input_ids, input_features, feature_attention_mask)  # (B, n, hidden)
    input_pos = torch.arange(start, T, device=x.device).expand(x.shape[0], -1)  # (B, n): the same slots per row
    mask = causal_padding_mask(slot_mask, input_pos, slot_mask.shape[1])  # (B, 1, n, max_seq_len)
    positions = positions_from_mask(slot_mask[:, :T])[:, start:]
    return model.forward_cached(x, positions, cache, input_pos, mask)[:, -1].float()


def decode_step(model: Qwen2AudioForConditionalGeneration, token_ids: Tensor, positions: Tensor, cache: KVCache,
                input_pos: Tensor, mask: Tensor) -> Tensor:
    """token_ids (B, 1) at RoPE positions (B, 1), written to cache slots input_pos (B, 1), mask (B, 1, 1, max_seq_len)
    -> next-token logits (B, V) in fp32. Shapes never change between steps, so this can be torch.compile'd."""
    x = model.language_model.model.embed_tokens(token_ids).to(model.dtype)  # (B, 1, hidden)
    return model.forward_cached(x, positions, cache, input_pos, mask)[:, -1].float()


def check_prompt(model: Qwen2AudioForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor | None,
                 o: GenerationOptions) -> Tensor:
    """The attention mask (ones when None), after checking that the prompt is a left-padded batch that fits and
    that the options' token ids exist."""
    B, T, max_new_tokens, vocab = *input_ids.shape, o.max_new_tokens, model.cfg.text_config.vocab_size
    if any(i >= vocab for i in o.eos_token_ids) or o.pad_token_id >= vocab:
        raise InputError(f"eos_token_ids {o.eos_token_ids} and pad_token_id {o.pad_token_id} must be below the "
                         f"vocabulary size {vocab}")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask must be a tensor of input_ids' shape {(B, T)}, got "
                         f"{tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}")
    if not bool(attention_mask[:, -1].all()):
        raise InputError("a prompt ends in padding; batch prompts with left padding (padding_side='left')")
    limit = model.cfg.text_config.max_position_embeddings
    if T + max_new_tokens > limit:
        raise InputError(f"the prompt ({T} tokens, audio included) plus max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's max_position_embeddings ({limit}); shorten the prompt or max_new_tokens")
    return attention_mask.to(input_ids.device)


@torch.no_grad()
def generate_stream(model: Qwen2AudioForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor | None = None,
                    input_features: Tensor | None = None, feature_attention_mask: Tensor | None = None,
                    options: GenerationOptions = GenerationOptions(), *, cache: KVCache | None = None,
                    decode_fn: Callable[..., Tensor] | None = None, cached: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (tokens (B,), live (B,) bool) at each step: every row's next token, and whether the row was still
    generating (a row that has stopped gets pad_token_id). See `generate`.

    cached > 0: the cache holds the keys and values of the prompt's first `cached` tokens already (an earlier turn
    of the conversation); only the rest is prefilled, and the audio given is that of the rest.
    """
    o = options
    input_ids = model.check_ids(input_ids).to(model.device)
    attention_mask = check_prompt(model, input_ids, attention_mask, o)
    B, T = input_ids.shape
    fits = cache is not None and cache.batch_size == B and cache.max_seq_len >= T + o.max_new_tokens
    if cached and not (fits and 0 < cached < T):
        raise InputError(f"cached={cached} needs the cache holding those tokens, with room for the prompt ({T}) and "
                         f"max_new_tokens ({o.max_new_tokens}), and at least one token after them")
    cache = cache if fits else model.new_cache(B, T + o.max_new_tokens)
    S, device = cache.max_seq_len, input_ids.device
    # (B, S): the prompt's padding by slot; every slot after the prompt holds a real (generated) token.
    slot_mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(B, S - T, dtype=torch.bool)], dim=1)
    eos_ids = torch.tensor(o.eos_token_ids, dtype=torch.long, device=device)
    # parity: transformers samples from the global RNG; on CPU a generator seeded with s draws exactly what
    # torch.manual_seed(s) would, so seeded runs reproduce its samples.
    generator = None if o.seed is None else torch.Generator(device=device).manual_seed(o.seed)

    logits = prefill(model, input_ids[:, cached:], slot_mask, cache, input_features, feature_attention_mask, cached)
    seen = seen_token_mask(input_ids, attention_mask, logits.shape[-1])  # for the repetition penalty
    next_position = attention_mask.long().sum(-1, keepdim=True)  # (B, 1): real tokens so far
    live = torch.ones(B, dtype=torch.bool, device=device)
    for step in range(o.max_new_tokens):
        if not all_finite(logits):
            raise WeightsError("the model computed NaN or infinite logits: its weights hold NaN/inf values, or "
                               "float16 overflowed (use bfloat16 or float32)")
        scores = process_logits(logits, seen, step, eos_ids, o)
        token = sample(scores, generator) if o.do_sample else scores.argmax(dim=-1)  # (B,)
        token = token.masked_fill(~live, o.pad_token_id)
        seen[torch.arange(B, device=device), token] = True
        yield token, live.clone()
        if not o.ignore_eos and eos_ids.numel():
            live &= ~torch.isin(token, eos_ids)
        if step + 1 == o.max_new_tokens or not bool(live.any()):
            break
        input_pos = torch.full((B, 1), T + step, device=device)
        mask = causal_padding_mask(slot_mask, input_pos, S)  # (B, 1, 1, S)
        logits = (decode_fn or decode_step)(model, token[:, None], next_position + step, cache, input_pos, mask)


def generate(model: Qwen2AudioForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor | None = None,
             input_features: Tensor | None = None, feature_attention_mask: Tensor | None = None,
             options: GenerationOptions = GenerationOptions(), *, cache: KVCache | None = None,
             decode_fn: Callable[..., Tensor] | None = None) -> Tensor:
    """Generate up to options.max_new_tokens for a left-padded batch; returns only the new ids (B, n), n = the
    longest row.

    A row stops after its first eos (unless ignore_eos) and is filled with pad_token_id from then on; the loop ends
    when every row has stopped. `cache` (from model.new_cache) is used when it is large enough, else a new one is
    made; decode_fn replaces decode_step, e.g. torch.compile(decode_step, fullgraph=True) (a cache of unchanged
    size, reused across calls, then needs no recompilation).
    """
    steps = generate_stream(model, input_ids, attention_mask, input_features, feature_attention_mask, options,
                            cache=cache, decode_fn=decode_fn)
    return torch.stack([token for token, _ in steps], dim=1)
