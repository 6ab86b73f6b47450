import numpy as np
import pytest

from acestep_dist.audio import read_audio_simple, write_audio


@pytest.mark.parametrize("suffix, tolerance", [(".wav", 1e-7), (".flac", 1e-6)])
def test_write_read_round_trip(tmp_path, suffix, tolerance):
    t = np.arange(24000) / 48000
    audio = 0.5 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 550 * t)]).astype(np.float32)
    path = write_audio(tmp_path / f"x{suffix}", audio, 48000)
    decoded, rate = read_audio_simple(path)
    assert rate == 48000 and decoded.shape == audio.shape
    assert np.abs(decoded - audio).max() <= tolerance


def test_bad_shapes_and_formats(tmp_path):
    with pytest.raises(ValueError, match="channels"):
        write_audio(tmp_path / "x.wav", np.zeros((3, 10)), 48000)
    with pytest.raises(ValueError, match=".mp3"):
        write_audio(tmp_path / "x.mp3", np.zeros((2, 10)), 48000)


def test_unsigned_8_bit_is_centred(corpus):
    audio, rate = read_audio_simple(corpus / "broken" / "pcm_u8.wav")
    assert rate == 44100 and audio.shape[0] == 2
    assert abs(float(audio.mean())) < 0.01
    assert 0.7 < float(np.abs(audio).max()) < 0.9
