"""Band-limited (windowed-sinc) resampling that reproduces ``torchaudio.transforms.Resample``.

Upstream ACE-Step v1 resamples with torchaudio's transform at its defaults: a Hann-windowed sinc,
6 zero crossings, cutoff at 99 % of the lower Nyquist. The rates are reduced by their gcd (48000 ->
44100 becomes 160 -> 147) and the signal is convolved with ``new`` polyphase filters at stride
``orig``. The transform builds its kernel in float64 and keeps it as float32, which is what the
released latents were computed with, so this module does the same.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor, nn

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99


def reduced_rates(orig_freq: int, new_freq: int) -> tuple[int, int]:
    """``(orig, new)`` divided by their greatest common divisor."""
    if int(orig_freq) != orig_freq or int(new_freq) != new_freq:
        raise ValueError(f"sample rates must be integers, got {orig_freq} and {new_freq}")
    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_freq} and {new_freq}")
    divisor = math.gcd(int(orig_freq), int(new_freq))
    return int(orig_freq) // divisor, int(new_freq) // divisor


def resampled_length(length: int, orig_freq: int, new_freq: int) -> int:
    """Samples out for ``length`` samples in: ``ceil(length * new / orig)``."""
    orig, new = reduced_rates(orig_freq, new_freq)
    return -(-int(length) * new // orig)


@lru_cache(maxsize=16)
def _kernel64(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> tuple[Tensor, int]:
    # cached data: built on the CPU whatever the default device (a model built on the meta device
    # must not leave a kernel without data behind for the next one)
    with torch.device("cpu"):
        return _build_kernel64(orig, new, lowpass_filter_width, rolloff)


def _build_kernel64(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> tuple[Tensor, int]:
    cutoff = min(orig, new) * rolloff  # in units of the reduced rates
    width = math.ceil(lowpass_filter_width * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    # torchaudio divides the output phases in the default dtype (float32) before adding the float64
    # tap positions; matching that keeps the kernel bit-identical to the one the fixtures used
    phases = torch.arange(0, -new, -1)[:, None, None] / new
    t = (phases + taps) * cutoff
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones((), dtype=t.dtype), t.sin() / t)
    kernel = sinc * (window * (cutoff / orig))
    return kernel, width


def sinc_kernel(orig_freq: int, new_freq: int, lowpass_filter_width: int = LOWPASS_FILTER_WIDTH,
                rolloff: float = ROLLOFF, dtype: torch.dtype = torch.float32) -> tuple[Tensor, int]:
    """The polyphase kernel ``[new, 1, 2 * width + orig]`` (reduced rates) and ``width``.

    Built in float64 and then cast, as the torchaudio transform does."""
    if lowpass_filter_width <= 0:
        raise ValueError("lowpass_filter_width must be positive")
    orig, new = reduced_rates(orig_freq, new_freq)
    kernel, width = _kernel64(orig, new, int(lowpass_filter_width), float(rolloff))
    return kernel.to(dtype), width


def apply_kernel(waveform: Tensor, kernel: Tensor, width: int, orig_freq: int, new_freq: int) -> Tensor:
    """Resample ``waveform [..., time]`` with a kernel from :func:`sinc_kernel`."""
    if not waveform.is_floating_point():
        raise TypeError(f"waveform must be floating point, got {waveform.dtype}")
    orig, new = reduced_rates(orig_freq, new_freq)
    *lead, length = waveform.shape
    flat = waveform.reshape(-1, length)
    flat = nn.functional.pad(flat, (width, width + orig))
    kernel = kernel.to(device=waveform.device, dtype=waveform.dtype)
    # one output per phase and stride: [rows, new, frames] interleaved back to time order
    out = nn.functional.conv1d(flat[:, None], kernel, stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    out = out[:, :resampled_length(length, orig, new)]
    return out.reshape(*lead, out.shape[-1])


def resample(waveform: Tensor, orig_freq: int, new_freq: int) -> Tensor:
    """``torchaudio.transforms.Resample(orig_freq, new_freq)(waveform)`` at its defaults."""
    if orig_freq == new_freq:
        return waveform
    kernel, width = sinc_kernel(orig_freq, new_freq)
    return apply_kernel(waveform, kernel, width, orig_freq, new_freq)


class Resample(nn.Module):
    """Module form with the kernel as a (non-persistent) float32 buffer, like torchaudio's."""

    def __init__(self, orig_freq: int = 16000, new_freq: int = 16000,
                 lowpass_filter_width: int = LOWPASS_FILTER_WIDTH, rolloff: float = ROLLOFF):
        super().__init__()
        reduced_rates(orig_freq, new_freq)  # validates
        self.orig_freq = int(orig_freq)
        self.new_freq = int(new_freq)
        self.width = 0
        if self.orig_freq != self.new_freq:
            kernel, self.width = sinc_kernel(orig_freq, new_freq, lowpass_filter_width, rolloff)
            self.register_buffer("kernel", kernel, persistent=False)

    def output_length(self, length: int) -> int:
        return resampled_length(length, self.orig_freq, self.new_freq)

    def forward(self, waveform: Tensor) -> Tensor:
        if self.orig_freq == self.new_freq:
            return waveform
        return apply_kernel(waveform, self.kernel, self.width, self.orig_freq, self.new_freq)

    def extra_repr(self) -> str:
        return f"orig_freq={self.orig_freq}, new_freq={self.new_freq}"
