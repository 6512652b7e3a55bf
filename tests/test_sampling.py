"""Logits processors and sampling against transformers: each processor on hand-made logits (ties included), the
whole chain in transformers' own order, and seeded sampling through the model token for token."""

import pytest
import torch
from helpers import load_hf
from test_generate import PAD, PROMPTS, make_prompt, run

import qwen2audio
from qwen2audio.generate import (GenerationOptions, apply_repetition_penalty, apply_temperature, process_logits,
                                 seen_token_mask, top_k_filter, top_p_filter)

V = 12
HAND_MADE = torch.tensor([
    [2.0, 2.0, 1.0, 1.0, 1.0, 0.0, -1.0, -1.0, -3.0, 0.5, 0.5, 2.0],  # ties at the top and in the middle
    [0.0] * V,  # everything tied
    [-1.0, 3.0, -2.0, 0.25, 0.25, 0.25, 0.25, -0.5, 8.0, -8.0, 0.0, 0.0],  # one dominant token
])


def tied_random(rows: int = 4, vocab: int = 1000) -> torch.Tensor:
    """Random logits rounded to quarters, so the vocabulary is full of ties."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, vocab, generator=g).mul(4).round().div(4)


LOGITS = [HAND_MADE, tied_random()]


@pytest.mark.parametrize("logits", LOGITS)
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.3])
def test_temperature(logits, temperature):
    from transformers import TemperatureLogitsWarper

    assert torch.equal(apply_temperature(logits, temperature), TemperatureLogitsWarper(temperature)(None, logits))


@pytest.mark.parametrize("logits", LOGITS)
@pytest.mark.parametrize("top_k", [1, 2, 3, 5, 12, 50, 2000])
def test_top_k(logits, top_k):
    from transformers import TopKLogitsWarper

    assert torch.equal(top_k_filter(logits, top_k), TopKLogitsWarper(top_k)(None, logits))


@pytest.mark.parametrize("logits", LOGITS)
@pytest.mark.parametrize("top_p", [1e-6, 0.05, 0.3, 0.5, 0.9, 0.95, 0.999999, 1.0])
def test_top_p(logits, top_p):
    from transformers import TopPLogitsWarper

    ours = top_p_filter(logits, top_p)
    assert torch.equal(ours, TopPLogitsWarper(top_p)(None, logits))
    assert (ours > -torch.inf).sum(-1).min() >= 1  # never empties a row


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = lambda p: (top_p_filter(probs.log(), p) > -torch.inf).tolist()[0]  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.96) == [True, True, True, True]


@pytest.mark.parametrize("penalty", [1.1, 1.3, 0.8])
def test_repetition_penalty_skips_left_padding(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    # Token 0 doubles as the pad: it is penalized only in the row where it is also a real token.
    ids = torch.tensor([[0, 0, 0, 3, 5, 5, 8, 1],
                        [0, 2, 2, 3, 11, 0, 4, 4],
                        [9, 10, 11, 1, 2, 3, 6, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1], [1] * 8])
    expected = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=(mask != 0).int().argmax(1))(
        ids, HAND_MADE.clone())
    assert torch.equal(apply_repetition_penalty(HAND_MADE, seen_token_mask(ids, mask, V), penalty), expected)


@pytest.mark.parametrize("n_generated", [0, 2, 3, 4])
def test_min_new_tokens(n_generated):
    from transformers import MinNewTokensLengthLogitsProcessor

    eos, prompt_len = [2, 7], 5
    ids = torch.zeros(3, prompt_len + n_generated, dtype=torch.long)
    expected = MinNewTokensLengthLogitsProcessor(prompt_len, 3, eos)(ids, HAND_MADE)
    ours = process_logits(HAND_MADE, torch.zeros(3, V, dtype=torch.bool), n_generated, torch.tensor(eos),
                          GenerationOptions(min_new_tokens=3))
    assert torch.equal(ours, expected)


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    return load_hf(tiny_checkpoint), qwen2audio.load(tiny_checkpoint).model


SAMPLING = [  # (temperature, top_k, top_p, repetition_penalty, min_new_tokens); top_k 0 = off in both
    (0.7, 20, 0.5, 1.1, 3),  # the values reported for Qwen2-Audio-7B-Instruct's generation_config
    (1.3, 0, 0.9, 1.0, 0),
    (1.0, 50, 0.999999, 1.2, 5),
]


@pytest.mark.parametrize("temperature, top_k, top_p, penalty, min_new", SAMPLING)
def test_processor_chain_in_transformers_order(models, temperature, top_k, top_p, penalty, min_new):
    """process_logits = the LogitsProcessorList transformers' generate() builds for the same options."""
    from transformers import GenerationConfig

    hf, _ = models
    ids = torch.tensor([[0, 0, 3, 5, 5, 8, 2, 1, 0, 9], [4, 6, 2, 3, 11, 1, 4, 10, 10, 5]])  # 5 prompt + 5 new
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=penalty, min_new_tokens=min_new, eos_token_id=[2, 7],
                              pad_token_id=PAD)
    hf._prepare_special_tokens(config, kwargs_has_attention_mask=True, device="cpu")
    chain = hf._get_logits_processor(config, input_ids_seq_length=5, device="cpu",
                                     model_kwargs={"attention_mask": mask})
    logits = HAND_MADE[:2] + tied_random(2, V)  # ties and variety
    for n_generated in (2, 5):
        expected = chain(ids[:, :5 + n_generated], logits.clone())
        ours = process_logits(logits, seen_token_mask(ids[:, :5 + n_generated], mask[:, :5 + n_generated], V),
                              n_generated, torch.tensor([2, 7]),
                              GenerationOptions(min_new_tokens=min_new, do_sample=True, temperature=temperature,
                                                top_k=top_k, top_p=top_p, repetition_penalty=penalty))
        assert torch.equal(ours, expected), n_generated


@pytest.fixture(scope="module")
def prompts():
    return {name: make_prompt(*PROMPTS[name]) for name in ("one_audio", "batch")}


@pytest.mark.parametrize("temperature, top_k, top_p, penalty, min_new", SAMPLING)
def test_seeded_sampling_matches_transformers(models, prompts, temperature, top_k, top_p, penalty, min_new):
    """On CPU a torch.Generator seeded with s draws what torch.manual_seed(s) makes the global RNG draw, so the
    same seed gives transformers' exact samples (any difference in logits or processing would show)."""
    hf, ours = models
    batch = prompts["batch"]
    options = dict(max_new_tokens=8, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=penalty, min_new_tokens=min_new, pad_token_id=PAD)
    torch.manual_seed(1234)
    expected = hf.generate(**batch, **options)[:, batch["input_ids"].shape[1]:]
    torch.testing.assert_close(run(ours, batch, **options, seed=1234), expected, rtol=0, atol=0)


def test_seed_repeats_and_top_k_1_is_greedy(models, prompts):
    _, ours = models
    prompt = prompts["one_audio"]
    options = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=100, pad_token_id=PAD)
    first = run(ours, prompt, **options, seed=7)
    assert torch.equal(run(ours, prompt, **options, seed=7), first)
    assert not torch.equal(run(ours, prompt, **options, seed=8), first)
    torch.manual_seed(3)  # seed=None draws from the global RNG
    unseeded = run(ours, prompt, **options)
    torch.manual_seed(3)
    assert torch.equal(run(ours, prompt, **options), unseeded)
    greedy = run(ours, prompt, max_new_tokens=8, repetition_penalty=1.1)
    assert torch.equal(run(ours, prompt, **options | {"top_k": 1}, repetition_penalty=1.1, seed=7), greedy)
