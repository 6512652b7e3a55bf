"""Encoder, merge and full-model logits against transformers' Qwen2AudioForConditionalGeneration (fp32, bf16)."""

import pytest
import torch
from helpers import audio_prompt_ids, hf_audio_rows, left_pad, load_hf, test_signal

import qwen2audio
from qwen2audio.errors import InputError
from qwen2audio.features import audio_token_count, extract_features


def features_for(seconds: list[float]):
    return extract_features([test_signal(s, seed=i) for i, s in enumerate(seconds)])


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    return qwen2audio.load(tiny_checkpoint).model, load_hf(tiny_checkpoint)


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_encode_audio_matches_reference(models, mode):
    ours, hf = models
    feats, mask = features_for([1.0, 7.3, 0.3, 30.0, 12.0])
    with torch.no_grad():
        expected = hf_audio_rows(hf, feats, mask)
        got = ours.encode_audio(feats, mask, mode=mode)
    assert got.shape == expected.shape == (sum(audio_token_count(int(m)) for m in mask.sum(-1)), 64)
    assert (got - expected).abs().max().item() < 1e-5


def test_fast_encoder_without_a_full_clip(models):
    # No 30 s clip: the fast path really encodes fewer than 3000 frames and must still agree.
    ours, hf = models
    feats, mask = features_for([2.0, 0.5, 9.99])
    with torch.no_grad():
        assert (ours.encode_audio(feats, mask) - hf_audio_rows(hf, feats, mask)).abs().max().item() < 1e-5


def prompt(seconds: list[float], seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    texts = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in [7] + [4] * len(seconds)]
    counts = [audio_token_count(int(m)) for m in features_for(seconds)[1].sum(-1)]
    return audio_prompt_ids(counts, texts)


def compare_logits(ours, hf, ids, attention_mask, feats, mask) -> float:
    """The largest |difference| of our logits from transformers' over the real (unpadded) positions."""
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=attention_mask, input_features=feats,
                      feature_attention_mask=mask).logits
        got = ours(ids, attention_mask, feats, mask)
    assert got.shape == expected.shape
    real = attention_mask.bool()  # padded positions are undefined in both
    assert torch.isfinite(got).all()
    return (got[real].float() - expected[real].float()).abs().max().item()


def test_logits_one_audio(models):
    ours, hf = models
    feats, mask = features_for([4.2])
    ids = torch.tensor([prompt([4.2])])
    assert compare_logits(ours, hf, ids, torch.ones_like(ids), feats, mask) < 1e-4


def test_logits_two_audios_in_one_prompt(models):
    ours, hf = models
    feats, mask = features_for([1.5, 3.0])
    ids = torch.tensor([prompt([1.5, 3.0])])
    assert compare_logits(ours, hf, ids, torch.ones_like(ids), feats, mask) < 1e-4


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_gqa_checkpoint"])
def test_logits_left_padded_batch(fixture, request):
    folder = request.getfixturevalue(fixture)
    ours, hf = qwen2audio.load(folder).model, load_hf(folder)
    row0, row1 = prompt([1.0], seed=1), prompt([6.0], seed=2)
    feats0, mask0 = features_for([1.0])
    feats1, mask1 = extract_features([test_signal(6.0, seed=0)])
    feats, mask = torch.cat([feats0, feats1]), torch.cat([mask0, mask1])
    ids, attention_mask = left_pad([row0, row1])
    assert attention_mask[0, 0] == 0  # the first row really is padded
    assert compare_logits(ours, hf, ids, attention_mask, feats, mask) < 1e-4


def test_gqa_config_is_read_not_hard_coded(tiny_gqa_checkpoint):
    cfg = qwen2audio.load(tiny_gqa_checkpoint).config.text_config
    assert (cfg.num_key_value_heads, cfg.num_attention_heads, cfg.rope_theta, cfg.rms_norm_eps) == (2, 4, 123456.0, 3e-6)


def test_bf16_agreement(tiny_checkpoint):
    # Measured on this fixture (2026-11-30, torch 2.13 CPU): max |diff| 0.004 on logits of magnitude ~1, top-1
    # agreement 100%. bf16 keeps 8 bits of mantissa (ulp 2^-8 near 1), so the bound is a few ulps of the logit scale.
    ours = qwen2audio.load(tiny_checkpoint, dtype=torch.bfloat16).model
    hf = load_hf(tiny_checkpoint, dtype=torch.bfloat16)
    feats, mask = features_for([3.0])
    ids = torch.tensor([prompt([3.0], seed=5)])
    with torch.no_grad():
        expected = hf(input_ids=ids, input_features=feats, feature_attention_mask=mask).logits.float()
        got = ours(ids, None, feats, mask).float()
    assert ours.language_model.lm_head.weight.dtype == torch.bfloat16
    top1 = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"bf16: max|diff| {(got - expected).abs().max().item():.4f}, top-1 agreement {top1:.3f}")
    assert (got - expected).abs().max().item() < 0.03
    assert top1 >= 0.97


def test_audio_token_mismatch_is_a_clear_error(models):
    ours, _ = models
    feats, mask = features_for([1.0])
    ids = torch.tensor([prompt([1.0])[:-4]])  # drop the trailing text: still 25 audio tokens, fine
    ours(ids, None, feats, mask)
    short = torch.tensor([[151647] + [151646] * 24 + [151648]])
    with pytest.raises(InputError, match="25 audio tokens but input_ids hold 24"):
        ours(short, None, feats, mask)
    with pytest.raises(InputError, match="no input_features"):
        ours(short)
    with pytest.raises(InputError, match="feature_attention_mask"):
        ours(short, None, feats, None)
