"""The resampler against analytic signals: tones and sweeps must come out as the same continuous signal read at the
new sample times (passband), and everything the new rate cannot hold must be gone (stopband)."""

import math

import numpy as np
import pytest
import torch

from qwen2audio.resample import resample

TARGET = 16000
RATES = [8000, 22050, 44100, 48000]
PASSBAND_DB = -60.0  # required error of a passband signal against the analytic one
STOPBAND_DB = -60.0  # required level of what is left of a stopband tone
EDGE_S = 0.05  # the filter fades in over its first ~50 low-rate samples: compare away from both ends


def _times(n: int, sr: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / sr


def _level_db(signal: np.ndarray, reference: np.ndarray) -> float:
    """RMS of `signal` relative to RMS of `reference`, in dB, on the part away from the edges."""
    edge = int(EDGE_S * TARGET)
    signal, reference = signal[edge:-edge], reference[edge:-edge]
    return 20 * math.log10(np.sqrt(np.mean(signal**2)) / np.sqrt(np.mean(reference**2)))


def _through(function, sr: int, seconds: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(resampled, analytic at the new times) for a continuous-time `function` of t in seconds."""
    x = torch.from_numpy(function(_times(round(seconds * sr), sr))).float()
    y = resample(x, sr, TARGET).double().numpy()
    return y, function(_times(len(y), TARGET))


@pytest.mark.parametrize("sr", RATES)
def test_tones_in_the_passband_survive_exactly(sr: int):
    top = 0.9 * min(sr, TARGET) / 2  # the passband edge: 90% of the lower Nyquist frequency
    for freq in [50.0, 440.0, 0.5 * top, 0.8 * top, top]:
        y, reference = _through(lambda t: 0.8 * np.sin(2 * np.pi * freq * t + 0.3), sr)
        assert len(y) == math.ceil(sr * 1.0 * TARGET / sr)
        assert _level_db(y - reference, reference) < PASSBAND_DB, f"{sr} Hz -> {TARGET} Hz, tone at {freq:.0f} Hz"


@pytest.mark.parametrize("sr", RATES)
def test_linear_sweep_through_the_passband(sr: int):
    f0, f1, seconds = 20.0, 0.9 * min(sr, TARGET) / 2, 2.0
    phase = lambda t: 2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t**2)  # noqa: E731
    y, reference = _through(lambda t: 0.7 * np.sin(phase(t)), sr, seconds)
    assert _level_db(y - reference, reference) < PASSBAND_DB


@pytest.mark.parametrize("sr", [22050, 44100, 48000])
def test_tones_above_the_new_nyquist_are_removed(sr: int):
    for freq in [8000.0, 8050.0, 8500.0, 10000.0, 0.99 * sr / 2]:
        # The phase matters: an 8 kHz sine with phase 0 would alias to exactly zero at 16 kHz and hide a leak.
        y, _ = _through(lambda t: np.sin(2 * np.pi * freq * t + 0.7), sr)
        edge = int(EDGE_S * TARGET)
        level_db = 20 * math.log10(np.sqrt(np.mean(y[edge:-edge] ** 2)) / np.sqrt(0.5))  # vs the input tone's RMS
        assert level_db < STOPBAND_DB, f"{sr} Hz: a {freq:.0f} Hz tone leaks through at {level_db:.1f} dB"


def test_upsampling_leaves_no_images():
    # 3 kHz at 8 kHz has a mirror image at 5 kHz once the rate is doubled; the filter must remove it.
    y, reference = _through(lambda t: np.sin(2 * np.pi * 3000 * t), 8000)
    spectrum = np.abs(np.fft.rfft((y - reference)[800:-800] * np.hanning(len(y) - 1600)))
    image = spectrum[np.fft.rfftfreq(len(y) - 1600, 1 / TARGET) > 4000].max()
    assert 20 * math.log10(image / np.abs(np.fft.rfft(reference[800:-800] * np.hanning(len(y) - 1600))).max()) < -60


def test_same_rate_is_identity():
    x = torch.randn(1234)
    assert torch.equal(resample(x, TARGET, TARGET), x)


@pytest.mark.parametrize(("orig", "new"), [(16000, 8000), (8000, 22050), (44101, 16000), (11025, 16000)])
def test_other_ratios_and_awkward_rates(orig: int, new: int):
    # 44101 Hz has gcd 1 with 16 kHz: 16000 phases, handled in groups; the tone must still come through cleanly.
    freq = 0.5 * min(orig, new) / 2
    x = torch.from_numpy(np.sin(2 * np.pi * freq * _times(orig // 2, orig))).float()
    y = resample(x, orig, new).double().numpy()
    reference = np.sin(2 * np.pi * freq * _times(len(y), new))
    assert len(y) == math.ceil(len(x) * new / orig)
    edge = int(EDGE_S * new)
    error = y[edge:-edge] - reference[edge:-edge]
    assert 20 * math.log10(np.sqrt(np.mean(error**2)) / np.sqrt(0.5)) < PASSBAND_DB


def test_leading_dimensions_are_independent_rows():
    x = torch.randn(2, 3, 4410)
    y = resample(x, 44100, TARGET)
    assert y.shape == (2, 3, 1600)
    torch.testing.assert_close(y[1, 2], resample(x[1, 2], 44100, TARGET), rtol=1e-5, atol=1e-6)


def test_dc_gain_is_one_and_lengths_are_ceil():
    for orig in [8000, 22050, 48000, 96000]:
        y = resample(torch.ones(orig), orig, TARGET)
        assert len(y) == TARGET
        torch.testing.assert_close(y[1000:-1000], torch.ones(TARGET - 2000), atol=1e-3, rtol=0)
    assert resample(torch.zeros(0), 44100, TARGET).shape == (0,)
    assert resample(torch.zeros(3), 44100, TARGET).shape == (2,)


def test_rejects_bad_rates():
    with pytest.raises(ValueError, match="positive integers"):
        resample(torch.zeros(10), 0, TARGET)
    with pytest.raises(ValueError, match="positive integers"):
        resample(torch.zeros(10), 44100.5, TARGET)
