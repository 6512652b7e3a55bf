"""The log-mel frontend against transformers' WhisperFeatureExtractor (bit-exact target)."""

import numpy as np
import pytest
import torch
from helpers import test_signal

from qwen2audio.features import N_FRAMES, audio_token_count, extract_features, mel_filters

DURATIONS = [0.3, 1.0, 7.3, 30.0, 45.0]


def reference(waves):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128)
    out = fe(waves, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    return out.input_features, out.attention_mask


@pytest.mark.parametrize("seconds", DURATIONS)
def test_single_clip_matches_whisper_feature_extractor(seconds):
    wave = test_signal(seconds, seed=3)
    ref_feat, ref_mask = reference([wave])
    feat, mask = extract_features([wave])
    assert feat.shape == (1, 128, N_FRAMES) and mask.dtype == torch.int32
    assert (feat - ref_feat).abs().max().item() <= 1e-6
    assert torch.equal(mask, ref_mask.to(torch.int32))


def test_batch_matches_and_equals_one_by_one():
    waves = [test_signal(s, seed=i) for i, s in enumerate(DURATIONS)]
    ref_feat, ref_mask = reference(waves)
    feat, mask = extract_features(waves)
    assert (feat - ref_feat).abs().max().item() <= 1e-6
    assert torch.equal(mask, ref_mask.to(torch.int32))
    for i, w in enumerate(waves):  # a clip's features do not depend on its batch mates (per-clip max)
        alone, _ = extract_features([w])
        assert torch.equal(alone[0], feat[i])


def test_mel_filters_match_transformers():
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0, max_frequency=8000.0,
                          sampling_rate=16000, norm="slaney", mel_scale="slaney")
    assert np.abs(mel_filters().double().numpy() - ref).max() < 1e-7


@pytest.mark.parametrize("samples,frames,tokens", [(16000, 100, 25), (16001, 101, 25), (480000, 3000, 750),
                                                   (320, 2, 0), (8000, 50, 12), (160000, 1000, 250)])
def test_frame_and_token_counts(samples, frames, tokens):
    _, mask = extract_features([np.zeros(samples, dtype=np.float32) + 0.1])
    assert int(mask.sum()) == frames
    assert audio_token_count(frames) == tokens


@pytest.mark.parametrize("form", ["list of floats", "bare array", "bare tensor"])
def test_one_bare_clip_is_taken_as_transformers_takes_it(form):
    wave = test_signal(1.3, seed=5)
    given = {"list of floats": wave.tolist(), "bare array": wave, "bare tensor": torch.from_numpy(wave)}[form]
    ref_feat, ref_mask = reference(wave.tolist() if form == "list of floats" else wave)
    feat, mask = extract_features(given)
    assert feat.shape == (1, 128, N_FRAMES) and torch.equal(mask, ref_mask.to(torch.int32))
    assert (feat - ref_feat).abs().max().item() <= 1e-6


def test_a_clip_that_is_not_mono_says_what_was_wrong():
    from qwen2audio.errors import InputError

    with pytest.raises(InputError, match=r"clip 0 has shape \(2, 16000\).*mono"):
        extract_features([np.zeros((2, 16000), dtype=np.float32)])
    with pytest.raises(InputError, match="clip 1 is not a sequence of numbers"):
        extract_features([np.zeros(16000, dtype=np.float32), ["a", "b"]])
