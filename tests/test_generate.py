"""The decode loop against transformers' generate(): greedy tokens, per-row stopping and padding, the static cache
against a full recompute, batch against one-by-one, and the errors a caller can cause."""

import math

import pytest
import torch
from helpers import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, load_hf, test_signal

import qwen2audio
import qwen2audio.generate as gen
from qwen2audio.errors import InputError
from qwen2audio.features import audio_token_count, extract_features
from qwen2audio.generate import GenerationOptions, generate

PAD = 151643  # <|endoftext|>
N_NEW = 20


def run(model, prompt: dict, decode_fn=None, cache=None, **options) -> torch.Tensor:
    """Our generate() on a prompt dict, with N_NEW new tokens and PAD unless the options say otherwise."""
    options = {"max_new_tokens": N_NEW, "pad_token_id": PAD, **options}
    return generate(model, **prompt, options=GenerationOptions(**options), decode_fn=decode_fn, cache=cache)


def audio_ids(frames: int) -> list[int]:
    return [AUDIO_BOS] + [AUDIO_TOKEN] * audio_token_count(frames) + [AUDIO_EOS]


def make_prompt(rows: list[list[float]], texts: list[list[int]]) -> dict[str, torch.Tensor]:
    """One row per entry: a text prefix, then each clip (its length in seconds) as <|audio_bos|> N x <|AUDIO|>
    <|audio_eos|> followed by a little text; rows are left-padded. Returns the four model inputs."""
    clips = [test_signal(s, seed=i + 3 * r) for r, row in enumerate(rows) for i, s in enumerate(row)]
    features, frame_mask = extract_features(clips)
    frames = iter(frame_mask.sum(-1).tolist())
    ids = []
    for row, text in zip(rows, texts):
        ids.append(text + [t for _ in row for t in audio_ids(next(frames)) + [13, 1234 + len(row)]])
    T = max(map(len, ids))
    return {"input_ids": torch.tensor([[PAD] * (T - len(r)) + r for r in ids]),
            "attention_mask": torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in ids]),
            "input_features": features, "feature_attention_mask": frame_mask}


PROMPTS = {
    "one_audio": ([[3.0]], [[9707, 11, 3555, 374]]),
    "two_audios": ([[1.0, 5.0]], [[785, 1156]]),
    "batch": ([[1.0], [3.0], [5.0]], [[9707, 11, 3555, 374, 419], [785], [1156, 2086]]),  # left-padded
}


@pytest.fixture(scope="module")
def prompts() -> dict[str, dict[str, torch.Tensor]]:
    return {name: make_prompt(*spec) for name, spec in PROMPTS.items()}


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    return load_hf(tiny_checkpoint), qwen2audio.load(tiny_checkpoint).model


def hf_generate(hf, prompt: dict, **kwargs) -> torch.Tensor:
    """transformers' greedy generate; only the new tokens (B, n)."""
    out = hf.generate(**prompt, max_new_tokens=N_NEW, do_sample=False, pad_token_id=PAD, **kwargs)
    return out[:, prompt["input_ids"].shape[1]:]


def stop_lengths(tokens: torch.Tensor, eos: list[int]) -> list[int]:
    """Per row: tokens up to and including the first eos (the row's length before padding)."""
    hits = torch.isin(tokens, torch.tensor(eos))
    return [int(h.nonzero()[0]) + 1 if h.any() else tokens.shape[1] for h in hits]


@pytest.mark.parametrize("penalty", [1.0, 1.1])
@pytest.mark.parametrize("case", list(PROMPTS))
def test_greedy_matches_transformers(models, prompts, case, penalty):
    hf, ours = models
    prompt = prompts[case]
    free = run(ours, prompt, repetition_penalty=penalty)
    # Random tiny models rarely say eos: promote tokens that greedy decoding emits, so rows stop at different steps.
    eos = [int(free[0, 5])] + ([int(free[2, 12])] if case == "batch" else [])
    expected = hf_generate(hf, prompt, repetition_penalty=penalty, eos_token_id=eos)
    lengths = stop_lengths(expected, eos)
    assert min(lengths) <= 6 and (case != "batch" or len(set(lengths)) == 3), "eos choice no longer stops rows"

    out = run(ours, prompt, repetition_penalty=penalty, eos_token_ids=eos)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for row, n in zip(out, lengths):
        assert (row[n:] == PAD).all()  # the pad fill after a row stopped


def test_greedy_matches_transformers_gqa(tiny_gqa_checkpoint, prompts):
    hf, ours = load_hf(tiny_gqa_checkpoint), qwen2audio.load(tiny_gqa_checkpoint).model
    expected = hf_generate(hf, prompts["batch"], repetition_penalty=1.1)
    out = run(ours, prompts["batch"], repetition_penalty=1.1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_min_new_tokens_and_ignore_eos(models, prompts):
    hf, ours = models
    prompt = prompts["one_audio"]
    free = run(ours, prompt)
    eos = [int(free[0, 1])]  # greedy would stop after 2 tokens
    expected = hf_generate(hf, prompt, eos_token_id=eos, min_new_tokens=8)
    out = run(ours, prompt, eos_token_ids=eos, min_new_tokens=8)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert stop_lengths(out, eos)[0] > 8
    assert torch.equal(run(ours, prompt, eos_token_ids=eos, ignore_eos=True), free)


def test_batch_rows_equal_single_runs(models, prompts):
    _, ours = models
    batch = prompts["batch"]
    out = run(ours, batch, repetition_penalty=1.1)
    for i in range(3):
        real = batch["attention_mask"][i].bool()
        single = {"input_ids": batch["input_ids"][i:i + 1, real], "input_features": batch["input_features"][i:i + 1],
                  "feature_attention_mask": batch["feature_attention_mask"][i:i + 1]}
        alone = run(ours, single, repetition_penalty=1.1)
        assert torch.equal(out[i:i + 1], alone), f"row {i}"


def test_cached_steps_equal_full_recompute(models, prompts, monkeypatch):
    """Logits of every step through the static cache = the logits of one forward over the whole sequence without
    a cache (causal, so position T-1+k sees exactly what step k saw), ours and transformers', left-padded batch."""
    hf, ours = models
    batch = prompts["batch"]
    step_logits = []

    def recording(fn):
        def wrapped(*args, **kwargs):
            step_logits.append(fn(*args, **kwargs))
            return step_logits[-1]
        return wrapped

    monkeypatch.setattr(gen, "prefill", recording(gen.prefill))
    out = run(ours, batch, decode_fn=recording(gen.decode_step))
    assert len(step_logits) == N_NEW
    ids = torch.cat([batch["input_ids"], out[:, :-1]], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out[:, :-1])], dim=1)
    audio = {k: batch[k] for k in ("input_features", "feature_attention_mask")}
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        full = ours(ids, mask, **audio)[:, T - 1:]  # (B, N_NEW, V)
        reference = hf(input_ids=ids, attention_mask=mask, **audio).logits[:, T - 1:]
    cached = torch.stack(step_logits, dim=1)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-5)
    print(f"cached steps vs full recompute, max |diff|: ours {float((cached - full).abs().max()):.1e}, "
          f"transformers {float((cached - reference).abs().max()):.1e}")


def test_reused_cache_and_streaming(models, prompts):
    """A larger cache used by an earlier, longer run is reused as it is, and its stale slots change nothing; the
    stream yields the same tokens as generate(), with `live` false exactly where a stopped row is padded."""
    _, ours = models
    batch = prompts["batch"]
    cache = ours.new_cache(3, batch["input_ids"].shape[1] + N_NEW + 10)
    longer = run(ours, batch, cache=cache, max_new_tokens=N_NEW + 10)
    keys = cache.keys[0].clone()
    out = run(ours, batch, cache=cache)
    assert not torch.equal(cache.keys[0], torch.zeros_like(keys))
    assert torch.equal(out, longer[:, :N_NEW])
    eos = [int(out[1, 3])]
    options = GenerationOptions(max_new_tokens=N_NEW, pad_token_id=PAD, eos_token_ids=eos)
    steps = list(gen.generate_stream(ours, **batch, options=options))
    tokens, live = (torch.stack(parts, dim=1) for parts in zip(*steps))
    assert torch.equal(tokens, run(ours, batch, eos_token_ids=eos))
    stopped = torch.cumsum(torch.isin(tokens, torch.tensor(eos)), dim=1).roll(1, dims=1)
    stopped[:, 0] = 0
    assert torch.equal(live, stopped == 0) and not bool(live[1, 4:].any()) and bool(live[1, :4].all())


def test_too_long_for_the_model(models):
    _, ours = models
    limit = ours.cfg.text_config.max_position_embeddings
    ids = torch.full((1, limit - 10), 100)
    with pytest.raises(InputError, match="max_position_embeddings"):
        run(ours, {"input_ids": ids}, max_new_tokens=11)


@pytest.mark.parametrize("option, value", [
    ("max_new_tokens", 0), ("min_new_tokens", -1), ("temperature", 0.0), ("temperature", -1.0), ("top_k", -1),
    ("top_p", 0.0), ("top_p", 1.5), ("repetition_penalty", 0.0), ("repetition_penalty", -1.1),
])
def test_bad_options(models, option, value):
    _, ours = models
    options = {"max_new_tokens": 4, "do_sample": True, option: value}
    with pytest.raises(InputError, match=option):
        run(ours, {"input_ids": torch.tensor([[100, 200]])}, **options)


def test_right_padding_is_refused(models):
    _, ours = models
    with pytest.raises(InputError, match="left padding"):
        run(ours, {"input_ids": torch.tensor([[100, 200, PAD]]), "attention_mask": torch.tensor([[1, 1, 0]])})


def test_rows_at_different_cache_slots_decode_as_if_alone(models, prompts):
    """Each row writes at its own slots: two prompts of different lengths prefilled into rows of one cache, then
    decoded in one batch step, give exactly the logits each gives alone (what a server batching requests needs)."""
    from qwen2audio.model import causal_padding_mask

    _, ours = models
    singles = []
    for name in ("one_audio", "two_audios"):
        p = prompts[name]
        singles.append({k: v for k, v in p.items() if k != "attention_mask"})
    cache, S = ours.new_cache(2, 400), 400
    lengths = [s["input_ids"].shape[1] for s in singles]
    slot_mask = torch.zeros(2, S, dtype=torch.bool)
    with torch.no_grad():
        for row, (single, T) in enumerate(zip(singles, lengths)):
            slot_mask[row, :T + 1] = True
            alone = torch.ones(1, S, dtype=torch.bool)
            gen.prefill(ours, single["input_ids"], alone, cache.rows(row, row + 1), single["input_features"],
                        single["feature_attention_mask"])
        tokens = torch.tensor([[1234], [4321]])
        input_pos = torch.tensor([[lengths[0]], [lengths[1]]])
        batch = gen.decode_step(ours, tokens, input_pos, cache, input_pos, causal_padding_mask(slot_mask, input_pos, S))
        for row, (single, T) in enumerate(zip(singles, lengths)):
            ids = torch.cat([single["input_ids"], tokens[row:row + 1]], dim=1)
            full = ours(ids, None, single["input_features"], single["feature_attention_mask"])[:, -1]
            torch.testing.assert_close(batch[row:row + 1], full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_all_finite_finds_one_bad_value_anywhere(bad):
    logits = torch.randn(3, 1000)
    assert gen.all_finite(logits) and bool(torch.isfinite(logits).all())
    for row, column in [(0, 0), (1, 517), (2, 999)]:
        spoiled = logits.clone()
        spoiled[row, column] = bad
        assert not gen.all_finite(spoiled) and not gen.all_finite(spoiled[row:row + 1])
        assert gen.all_finite(spoiled[(row + 1) % 3:(row + 1) % 3 + 1])  # the other rows are still finite
