"""Band-limited resampling between integer sample rates: a Kaiser-windowed sinc applied polyphase, in plain torch.

The ideal resampler rebuilds the continuous signal from its samples with a sinc (the perfect low-pass) and reads it
at the new sample times. A real filter has a finite length, so the sinc is cut by a Kaiser window, and its cut-off
sits a little below the lower of the two Nyquist frequencies so that nothing above the new Nyquist folds back
(downsampling) and no spectral images survive (upsampling):

    passband  0 .. 0.90 * min_nyquist    gain 1 within about -80 dB
    stopband  1.00 * min_nyquist ..      attenuated by about 80 dB

Polyphase: with g = gcd(orig, new), `up = new // g` output samples are made for every `down = orig // g` input
samples, and output n = k * up + i ("phase" i) always sits at the same fraction past an input sample. So each
phase needs one fixed set of filter taps, and applying it to every k is a strided convolution (written here as a
strided view of the input times a matrix of taps, in blocks, so memory stays bounded for long files).
"""

import functools
import math

import torch
from torch import Tensor

PASSBAND_EDGE = 0.90  # fraction of the lower Nyquist frequency kept untouched
STOPBAND_EDGE = 1.00  # from here on, everything is removed (no aliasing into the new band)
CUTOFF = (PASSBAND_EDGE + STOPBAND_EDGE) / 2  # the sinc's cut-off: the middle of the transition band
ATTENUATION_DB = 80.0  # ripple in the passband and leakage in the stopband, both about 10^(-80/20)
# Kaiser's formulas: window shape beta for the wanted attenuation, and the number of taps (counted at the lower
# rate) that reaches it across a transition band of width (STOPBAND_EDGE - PASSBAND_EDGE) * pi rad/sample.
KAISER_BETA = 0.1102 * (ATTENUATION_DB - 8.7)
HALF_WIDTH = math.ceil((ATTENUATION_DB - 7.95) / (2.285 * (STOPBAND_EDGE - PASSBAND_EDGE) * math.pi) / 2)  # 51
BLOCK_ELEMENTS = 1 << 22  # (frames x taps) per matrix product: bounds the working memory to ~16 MB


@functools.lru_cache(maxsize=8)  # the taps depend only on the rates: reuse them for the next file
def _phase_taps(first: int, last: int, up: int, down: int, reach: float, half: int, scale: float) -> Tensor:
    """Filter taps (last - first, 2 * half + 2) float32 for phases first..last-1; tap j of phase i weighs input
    sample k * down + i * down // up + j - half."""
    phases = torch.arange(first, last)
    frac = ((phases * down) % up).double() / up  # (G,) how far past its input sample each phase's output falls
    m = torch.arange(-half, half + 2, dtype=torch.float64)  # (2 * half + 2,)
    offset = frac[:, None] - m[None, :]  # (G, n_taps) distance to each input sample, in input samples
    sinc = torch.special.sinc(offset * scale)  # the ideal low-pass, cut-off `scale` x the input Nyquist
    inside = (offset / reach).clamp(-1.0, 1.0)
    window = torch.special.i0(KAISER_BETA * torch.sqrt(1.0 - inside**2)) / torch.special.i0(
        torch.tensor(KAISER_BETA, dtype=torch.float64))
    window = torch.where(offset.abs() < reach, window, torch.zeros_like(window))
    return (scale * sinc * window).float()  # times `scale` so the taps sum to 1 (unit gain at DC)


def _apply_group(x: Tensor, out: Tensor, phases: Tensor, own: Tensor, up: int, down: int) -> None:
    """Fill out[:, :, phases] (out is (rows, n_k, up)) from the padded input x (rows, n) and each phase's taps."""
    offsets = phases * down // up  # (G,) the input sample each phase starts from
    base = int(offsets[0])
    shifts = offsets - base  # the group shares one kernel; each phase's taps sit `shift` samples in
    n_taps = int(shifts[-1]) + own.shape[1]
    columns = shifts[:, None] + torch.arange(own.shape[1])  # (G, width)
    kernel = torch.zeros(len(phases), n_taps).scatter_(1, columns, own).T  # (n_taps, G)
    frames = x[:, base:].unfold(-1, n_taps, down)  # (rows, n_k, n_taps), a view: frame k starts at k * down
    block = max(1, BLOCK_ELEMENTS // n_taps)  # frames per matrix product, to bound the copy it makes
    first, last = int(phases[0]), int(phases[-1]) + 1
    for k0 in range(0, out.shape[1], block):
        out[:, k0:k0 + block, first:last] = frames[:, k0:k0 + block] @ kernel  # (rows, block, G)


def resample(waveform: Tensor, orig_sr: int, new_sr: int) -> Tensor:
    """Resample the last dimension of `waveform` (float) from `orig_sr` to `new_sr` Hz (both integers).

    The output has ceil(n * new_sr / orig_sr) samples and is aligned so that output sample 0 is input sample 0.
    Beyond the ends the signal counts as zero, so the first and last ~HALF_WIDTH low-rate samples fade.
    """
    if orig_sr <= 0 or new_sr <= 0 or int(orig_sr) != orig_sr or int(new_sr) != new_sr:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} and {new_sr}")
    if orig_sr == new_sr:
        return waveform
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    scale = CUTOFF * min(1.0, new_sr / orig_sr)  # cut-off in units of the input Nyquist frequency
    reach = HALF_WIDTH * orig_sr / min(orig_sr, new_sr)  # half the filter length, in input samples
    half = math.ceil(reach)

    # Few phases (e.g. 48 kHz -> 16 kHz has up = 1) make thin matrix products; treating `spread` consecutive
    # blocks as one bigger block (same ratio, more phases) gives the matrix product more columns to work on.
    spread = max(1, half // down)
    up, down = up * spread, down * spread

    lead = waveform.shape[:-1]
    x = waveform.reshape(math.prod(lead), waveform.shape[-1]).float()  # (rows, n)
    n_in = x.shape[-1]
    n_out = -(-n_in * new_sr // orig_sr)  # ceil
    n_k = -(-n_out // up)  # output blocks of `up` samples, one per `down` input samples
    last_offset = (up - 1) * down // up
    need = (n_k - 1) * down + last_offset + 2 * half + 2  # input samples the last output block reads (with padding)
    x = torch.nn.functional.pad(x, (half, max(0, need - half - n_in)))  # (rows, padded)

    out = torch.empty(x.shape[0], n_k, up)  # (rows, n_k, up): row-major order is output order
    # Phases are done in groups whose input offsets differ by at most `half`, so one kernel covers the group with
    # few wasted (zero) taps, and the kernel stays small even when `up` is in the thousands.
    group = max(1, min(up, half * up // down))
    width = 2 * half + 2  # taps of one phase
    chunk = group * max(1, BLOCK_ELEMENTS // (group * width))  # phases whose taps are computed in one go
    used = min(up, n_out)  # a clip shorter than one block never reaches the later phases
    for c in range(0, used, chunk):
        phases = torch.arange(c, min(c + chunk, used))
        own = _phase_taps(c, c + len(phases), up, down, reach, half, scale)  # (chunk, width)
        for a in range(0, len(phases), group):
            _apply_group(x, out, phases[a:a + group], own[a:a + group], up, down)
    return out.reshape(*lead, n_k * up)[..., :n_out]
