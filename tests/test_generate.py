"""`acedist generate` with a source: repaint and cover keep the source's length and say it in the prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from acestep_dist.audio import read_audio_simple, write_audio
from acestep_dist.cli import cli
from acestep_dist.errors import UserError
from acestep_dist.families.ace_step_15 import pipeline as row_pipeline
from acestep_dist.generate import GenerateRequest, generate

RATE = 48000


def _song(path: Path, seconds: float) -> Path:
    t = np.arange(int(round(seconds * RATE))) / RATE
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 2 * t))
    return write_audio(path, np.stack([tone, 0.8 * tone]).astype(np.float32), RATE)


@pytest.fixture
def song4s(tmp_path) -> Path:
    return _song(tmp_path / "song4s.wav", 4.0)


@pytest.fixture
def text_prompts(monkeypatch) -> list[str]:
    """Every string the pipeline tokenizes for the text encoder (lyric strings left out)."""
    seen: list[str] = []
    tokenize = row_pipeline.tokenize

    def recording(tokenizer, strings, max_length, device):
        seen.extend(s for s in strings if s.startswith("# Instruction"))
        return tokenize(tokenizer, strings, max_length, device)

    monkeypatch.setattr(row_pipeline, "tokenize", recording)
    return seen


def test_repaint_and_cover_render_the_whole_source_and_the_metas_give_its_length(prep_model, song4s, tmp_path,
                                                                                   text_prompts):
    repaint = GenerateRequest.text(prompt="calm piano", steps=2, src_audio=str(song4s), repaint=(2.5, 3.5))
    generate(str(prep_model), repaint, tmp_path / "repaint.wav", log=lambda _: None)
    repainted, rate = read_audio_simple(tmp_path / "repaint.wav")
    assert rate == RATE and repainted.shape == (2, 4 * RATE) and abs(repainted).max() > 0
    assert len(text_prompts) == 1 and "- duration: 4 seconds\n" in text_prompts[0]
    assert text_prompts[0].startswith("# Instruction\nRepaint the mask area based on the given conditions:\n")

    text_prompts.clear()
    cover = GenerateRequest.text(prompt="calm piano", steps=2, src_audio=str(song4s), cover_strength=0.5)
    generate(str(prep_model), cover, tmp_path / "cover.wav", log=lambda _: None)
    covered, _ = read_audio_simple(tmp_path / "cover.wav")
    assert covered.shape == (2, 4 * RATE) and abs(covered - repainted).max() > 1e-4
    # strength < 1 also encodes the text2music condition; both say the source's length
    assert [p.split("\n")[1] for p in text_prompts] == ["Generate audio semantic tokens based on the given conditions:",
                                                       "Fill the audio semantic mask based on the given conditions:"]
    assert all("- duration: 4 seconds\n" in p for p in text_prompts)

    # a source that is not a whole number of latent frames (1920 samples) is still covered to its last sample
    odd = _song(tmp_path / "odd.wav", 2.01)
    generate(str(prep_model), GenerateRequest.text(prompt="calm", steps=1, src_audio=str(odd), repaint=(0.5, 2.01)),
             tmp_path / "odd-out.wav", log=lambda _: None)
    assert read_audio_simple(tmp_path / "odd-out.wav")[0].shape == (2, 96480)
    # a --duration that repeats the source's length is accepted (and changes nothing)
    generate(str(prep_model), GenerateRequest.text(prompt="calm", steps=1, duration=2.0, src_audio=str(odd)),
             tmp_path / "odd-cover.wav", log=lambda _: None)
    assert read_audio_simple(tmp_path / "odd-cover.wav")[0].shape == (2, 96480)
    assert "- duration: 2 seconds\n" in text_prompts[-1]


def test_cover_without_the_audio_codec_fails_clearly(prep_model, song4s, tmp_path):
    no_codec = tmp_path / "no-codec"  # a checkpoint converted without the 5 Hz audio tokenizer
    shutil.copytree(prep_model, no_codec)
    for name in ("audio_tokenizer", "audio_token_detokenizer"):
        shutil.rmtree(no_codec / name)
    index = json.loads((no_codec / "model_index.json").read_text())
    (no_codec / "model_index.json").write_text(json.dumps({k: v for k, v in index.items()
                                                           if k not in ("audio_tokenizer", "audio_token_detokenizer")}))
    with pytest.raises(UserError, match="cover with this model failed.*audio_tokenizer"):
        generate(str(no_codec), GenerateRequest.text(prompt="calm", steps=2, src_audio=str(song4s)),
                 tmp_path / "cover2.wav", log=lambda _: None)


def test_cli_refuses_a_duration_shorter_than_the_source_with_one_error_line(prep_model, song4s, tmp_path):
    out = tmp_path / "cut.wav"
    result = CliRunner().invoke(cli, ["generate", "--model", str(prep_model), "--prompt", "calm", "--src-audio",
                                      str(song4s), "--repaint", "2.5", "3.5", "--duration", "2", "--out", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --duration 2 does not fit"), result.output
    assert "(4.00 s)" in lines[0] and "leave --duration out" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("request_args, message", [
    (dict(repaint=(2.5, 4.5)), r"--repaint 2.5 4.5 does not fit .*\(4.00 s\): need 0 <= START < END <= 4.00"),
    (dict(repaint=(-0.5, 1.0)), "--repaint -0.5 1 does not fit"),
    (dict(repaint=(3.0, 3.0)), "--repaint 3 3 does not fit"),
    (dict(repaint=(3.0, 2.0)), "--repaint 3 2 does not fit"),
    (dict(duration=30.0), "--duration 30 does not fit"),  # a cover longer than its source
    (dict(duration=3.5, repaint=(1.0, 2.0)), "--duration 3.5 does not fit"),
])
def test_a_repaint_range_or_duration_that_does_not_fit_the_source_is_refused(prep_model, song4s, tmp_path,
                                                                             request_args, message):
    with pytest.raises(UserError, match=message):
        generate(str(prep_model), GenerateRequest.text(prompt="calm", src_audio=str(song4s), **request_args),
                 tmp_path / "x.wav", log=lambda _: None)
    assert not (tmp_path / "x.wav").exists()


def test_cli_refuses_a_repaint_range_beyond_the_source(song4s, tmp_path):
    # refused before the model is read: the model path need not even exist
    result = CliRunner().invoke(cli, ["generate", "--model", str(tmp_path / "no-model"), "--prompt", "calm",
                                      "--src-audio", str(song4s), "--repaint", "3", "5", "--out", str(tmp_path / "x.wav")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: --repaint 3 5 does not fit --src-audio {song4s} (4.00 s): need 0 <= START < END <= 4.00"]


def test_repaint_needs_a_source(prep_model, tmp_path):
    with pytest.raises(UserError, match="--repaint needs --src-audio"):
        generate(str(prep_model), GenerateRequest.text(prompt="calm", duration=2.0, repaint=(0.1, 0.5)),
                 tmp_path / "x.wav", log=lambda _: None)


def test_text2music_without_a_duration_renders_30_seconds(prep_model, tmp_path, text_prompts):
    generate(str(prep_model), GenerateRequest.text(prompt="calm", steps=1), tmp_path / "t.wav", log=lambda _: None)
    assert read_audio_simple(tmp_path / "t.wav")[0].shape == (2, 30 * RATE)
    assert "- duration: 30 seconds\n" in text_prompts[0]
