"""Audio in and out with PyAV (its own FFmpeg; no system FFmpeg, no torchaudio)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_WRITE_CODECS = {".wav": ("pcm_f32le", "flt"), ".flac": ("flac", "s32")}


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write ``audio [channels, n]`` (float in [-1, 1]) as float WAV, or 24-bit FLAC for ``.flac``."""
    import av

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _WRITE_CODECS:
        raise ValueError(f"{path}: write .wav or .flac, not {suffix or 'no extension'}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 2 or audio.shape[0] not in (1, 2):
        raise ValueError(f"expected [channels, n] audio with 1 or 2 channels, got shape {audio.shape}")
    codec, sample_format = _WRITE_CODECS[suffix]
    layout = "stereo" if audio.shape[0] == 2 else "mono"
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=sample_rate, layout=layout)
        if codec == "flac":
            stream.codec_context.format = "s32"  # FLAC stores 24 of these bits
            data = (np.clip(audio, -1.0, 1.0 - 2**-23) * 2**31).astype(np.int32)
        else:
            data = audio
        # packed (interleaved) frames: [1, n * channels]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data.T.reshape(1, -1)), format=sample_format, layout=layout)
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def read_audio_simple(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode a whole (short) file to float32 ``[channels, n]`` at its own rate. Prep uses the
    windowed decoder; this is for tests and small checks."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        # FFmpeg's own conversion to planar float: scales every integer format (u8's offset included)
        to_float = av.AudioResampler(format="fltp")
        chunks = [f.to_ndarray() for frame in container.decode(stream) for f in to_float.resample(frame)]
        chunks += [f.to_ndarray() for f in to_float.resample(None)]
        rate = stream.rate
    audio = np.concatenate(chunks, axis=1) if chunks else np.zeros((1, 0), np.float32)
    return audio.astype(np.float32, copy=False), rate
