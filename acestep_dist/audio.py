"""Audio in and out with PyAV (its own FFmpeg; no system FFmpeg, no torchaudio) and soxr.

Decoding is windowed: a window is reached by seeking and decoded frame by frame into a streaming
soxr resampler, so a long file is never held in memory whole. The container format is decided by
FFmpeg from the content; a file whose extension says otherwise is decoded by what it is, with a
warning. A decode error midway keeps what decoded before it, with a warning (prep compares the
decoded length with the header's to reject truncated files).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# FFmpeg demuxer names -> the extensions that name them
_FORMAT_EXTENSIONS = {
    "wav": {".wav", ".wave"},
    "flac": {".flac"},
    "mp3": {".mp3"},
    "ogg": {".ogg", ".oga", ".opus"},
    "mov,mp4,m4a,3gp,3g2,mj2": {".m4a", ".mp4", ".aac", ".alac", ".m4b"},
    "aac": {".aac"},
    "aiff": {".aif", ".aiff", ".aifc"},
    "asf": {".wma", ".asf"},
    "w64": {".w64"},
    "caf": {".caf"},
}
_FORMAT_LABELS = {"mov,mp4,m4a,3gp,3g2,mj2": "MP4/M4A", "asf": "ASF/WMA"}
# What FFmpeg logs when a container states no duration and it guesses one from the bitrate (an MP3
# without a Xing/VBRI header, raw AAC): such a guess can be far off, so it says nothing about truncation.
_ESTIMATE_LOG = "Estimating duration from bitrate"
# PyAV's log level is process-wide: probes that switch it on to hear the estimate message take turns.
_LOG_LOCK = threading.Lock()


class AudioError(Exception):
    """An input that cannot become a training window; the message is the reason users see."""


@dataclass
class AudioInfo:
    path: str
    container: str  # FFmpeg's demuxer name
    codec: str
    sample_rate: int
    channels: int
    duration: float  # seconds, from the container (decoders may differ by a few ms)
    size: int
    warnings: list[str] = field(default_factory=list)
    layout: str = ""  # FFmpeg's channel layout name: "mono", "stereo", "5.1(side)", "6 channels"
    duration_estimated: bool = False  # FFmpeg guessed the duration from the bitrate (NaN: no duration at all)

    @property
    def duration_known(self) -> bool:
        """Whether ``duration`` is what the container states, so audio ending earlier is missing."""
        return math.isfinite(self.duration) and not self.duration_estimated

    @property
    def label(self) -> str:
        name = _FORMAT_LABELS.get(self.container, self.container.upper())
        return f"{name}/PCM" if self.codec.startswith("pcm") else name


@dataclass
class DecodedWindow:
    wave: np.ndarray  # float32 [2, n] at the target rate
    sample_rate: int
    offset: float  # seconds into the source
    source_rate: int
    zero_fraction: float  # exact zeros among the decoded source samples
    warnings: list[str] = field(default_factory=list)
    stopped_by: str = ""  # the decoder error that ended decoding early, if one did

    @property
    def duration(self) -> float:
        return self.wave.shape[1] / self.sample_rate


def _open_logged(path: str):
    """``av.open`` with FFmpeg's warnings captured: (container, whether it estimated the duration)."""
    import av
    import av.logging

    with _LOG_LOCK:
        level, skip_repeated = av.logging.get_level(), av.logging.get_skip_repeated()
        if level is None or level < av.logging.WARNING:
            av.logging.set_level(av.logging.WARNING)
        av.logging.set_skip_repeated(False)  # else a second file's identical message is swallowed
        try:
            with av.logging.Capture() as logs:
                container = av.open(path)
        finally:
            av.logging.set_level(level)
            av.logging.set_skip_repeated(skip_repeated)
    return container, any(_ESTIMATE_LOG in message for _level, _name, message in logs)


def probe_audio(path: str | os.PathLike) -> AudioInfo:
    """Container facts without decoding. Raises ``AudioError`` for an empty or undecodable file."""
    import av

    path = str(path)
    size = os.path.getsize(path)
    if size == 0:
        raise AudioError("empty file")
    try:
        container, estimated = _open_logged(path)
        with container:
            if not container.streams.audio:
                raise AudioError("no audio stream")
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:
                duration = math.nan
            layout = stream.layout.name if stream.layout is not None else ""
            info = AudioInfo(path, container.format.name, stream.codec_context.name, int(stream.rate or 0),
                             int(stream.channels or 0), duration, size, layout=layout, duration_estimated=estimated)
    except (av.error.InvalidDataError, av.error.EOFError) as error:
        raise AudioError(f"not a decodable audio file ({error.strerror or error})") from None
    except av.error.FFmpegError as error:
        raise AudioError(f"not a decodable audio file ({error})") from None
    if info.sample_rate <= 0 or info.channels <= 0:
        raise AudioError("not a decodable audio file (no sample rate or channels)")
    extension = Path(path).suffix.lower()
    known = _FORMAT_EXTENSIONS.get(info.container)
    if known is not None and extension not in known:
        info.warnings.append(f"extension {extension or '(none)'} does not match content ({info.label}); decoded as {info.label}")
    if info.channels > 2:  # decode_window folds them into stereo
        named = info.layout and not info.layout.endswith("channels")  # FFmpeg's name for an unknown layout
        layout = f"{info.layout} audio ({info.channels} channels)" if named else f"{info.channels}-channel audio"
        info.warnings.append(f"{layout} downmixed to stereo")
    return info


def decode_window(
    path: str | os.PathLike,
    offset: float = 0.0,
    duration: float | None = None,
    target_rate: int = 48000,
) -> DecodedWindow:
    """Decode ``[offset, offset + duration)`` seconds as float32 stereo at ``target_rate``.

    Mono is duplicated to both channels; more than two channels are downmixed to stereo by FFmpeg's
    channel-name matrix (5.1 -> L/R with centre and surrounds folded in). Integer PCM (u8 included)
    becomes float by FFmpeg's exact scaling; 24-bit input keeps its precision until soxr resamples.
    """
    import av
    import soxr

    path = str(path)
    warnings: list[str] = []
    stopped_by = ""
    try:
        container = av.open(path)
    except av.error.FFmpegError as error:
        raise AudioError(f"not a decodable audio file ({error})") from None
    with container:
        stream = container.streams.audio[0]
        source_rate = int(stream.rate)
        channels = int(stream.channels)
        # Planar float at the source rate; FFmpeg downmixes only when there are more than 2 channels.
        converter = av.AudioResampler(format="fltp", layout="stereo" if channels > 2 else None, rate=source_rate)
        resampler = soxr.ResampleStream(source_rate, target_rate, 2, dtype="float32", quality="HQ")
        start = int(round(offset * source_rate))
        stop = None if duration is None else start + int(round(duration * source_rate))
        if offset > 0:
            container.seek(int(offset / stream.time_base), stream=stream, any_frame=False, backward=True)
        position = None  # index of the next decoded source sample
        kept, zeros = 0, 0
        out: list[np.ndarray] = []

        def take(block: np.ndarray, last: bool = False) -> None:
            nonlocal kept, zeros
            if block.shape[0] == 1:
                block = np.repeat(block, 2, axis=0)
            kept += block.shape[1]
            zeros += int(np.count_nonzero(block == 0.0))
            out.append(resampler.resample_chunk(np.ascontiguousarray(block.T), last=last))

        try:
            for packet_frame in container.decode(stream):
                if position is None:
                    pts = packet_frame.pts
                    position = int(round(float(pts * packet_frame.time_base) * source_rate)) if pts is not None else 0
                for frame in converter.resample(packet_frame):
                    block = frame.to_ndarray().astype(np.float32, copy=False)
                    begin, end = position, position + block.shape[1]
                    position = end
                    lo = max(start - begin, 0)
                    hi = block.shape[1] if stop is None else min(stop - begin, block.shape[1])
                    if hi > lo:
                        take(block[:, lo:hi])
                if stop is not None and position >= stop:
                    break
        except av.error.FFmpegError as error:
            seconds = offset + kept / source_rate  # into the file, not the window
            stopped_by = error.strerror or str(error)
            warnings.append(f"decoding stopped at {seconds:.2f} s: {stopped_by}; kept what decoded before it")
        out.append(resampler.resample_chunk(np.zeros((0, 2), np.float32), last=True))
    wave = np.concatenate(out, axis=0).T if out else np.zeros((2, 0), np.float32)
    total = max(kept * 2, 1)
    return DecodedWindow(np.ascontiguousarray(wave, dtype=np.float32), target_rate, offset, source_rate,
                         zeros / total, warnings, stopped_by)

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
