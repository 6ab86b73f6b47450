"""Windowed decoding: seeking, channel layouts, resampling, content over extension, truncation."""


import av
import numpy as np
import pytest

from acestep_dist.audio import AudioError, decode_window, probe_audio, write_audio


def _tone(seconds, rate, channels=2, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]).astype(np.float32)


def _write_layout(path, audio, rate, layout):
    """A PCM WAV with an explicit channel layout (write_audio covers mono/stereo only)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout=layout)
        data = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data.T.reshape(1, -1)), format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_window_by_seeking_equals_the_slice_of_a_full_decode(tmp_path):
    path = write_audio(tmp_path / "a.flac", _tone(12.0, 48000), 48000)
    full = decode_window(path, 0.0, None, 48000).wave
    part = decode_window(path, 5.0, 3.0, 48000).wave
    assert part.shape == (2, 3 * 48000)
    assert np.abs(part - full[:, 5 * 48000 : 8 * 48000]).max() < 1e-6


def test_resampling_keeps_length_and_pitch(corpus):
    window = decode_window(corpus / "broken" / "hires_96k_24bit.flac", 0.0, None, 48000)
    assert window.source_rate == 96000 and window.sample_rate == 48000
    assert abs(window.duration - 6.0) < 1e-3


def test_mono_is_duplicated_and_5_1_is_downmixed(tmp_path):
    mono = tmp_path / "mono.wav"
    write_audio(mono, _tone(2.0, 44100, channels=1), 44100)
    wave = decode_window(mono, 0.0, None, 48000).wave
    assert wave.shape[0] == 2 and np.allclose(wave[0], wave[1])

    surround = _tone(2.0, 48000, channels=6) * 0  # silence everywhere ...
    surround[2] = _tone(2.0, 48000, channels=1)[0]  # ... but the centre channel (FC)
    path = tmp_path / "surround.wav"
    _write_layout(path, surround, 48000, "5.1")
    assert probe_audio(path).channels == 6
    wave = decode_window(path, 0.0, None, 48000).wave
    # the centre channel goes to both sides equally (a downmix by channel names, not "first two")
    assert wave.shape[0] == 2 and np.abs(wave).max() > 0.1
    assert np.allclose(wave[0], wave[1], atol=1e-4)


def test_format_is_decided_by_content(corpus):
    info = probe_audio(corpus / "broken" / "wav_data_with_ogg_extension.ogg")
    assert info.container == "wav"
    assert info.warnings == ["extension .ogg does not match content (WAV/PCM); decoded as WAV/PCM"]
    assert abs(decode_window(info.path, 0, None, 48000).duration - 8.0) < 1e-3


def test_unreadable_files_are_errors_with_reasons(corpus, tmp_path):
    with pytest.raises(AudioError, match="empty file"):
        probe_audio(corpus / "broken" / "empty.mp3")
    with pytest.raises(AudioError, match="not a decodable audio file"):
        probe_audio(corpus / "broken" / "random_bytes.wav")


def test_a_truncated_file_yields_what_decodes(corpus, tmp_path):
    source = corpus / "music" / "piano_joplin_maple_leaf_rag.mp3"
    cut = tmp_path / "cut.mp3"
    data = source.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    window = decode_window(cut, 0.0, None, 48000)
    assert 8.0 < window.duration < 14.0  # about half of the 22.4 s


def test_long_files_are_never_decoded_whole(corpus):
    """A 240 s window of the 12-minute file: the decoded output is just the window."""
    window = decode_window(corpus / "broken" / "long_12min.mp3", 300.0, 20.0, 48000)
    assert window.wave.shape == (2, 20 * 48000)
    assert window.offset == 300.0
