"""ACE-Step v1 music DCAE + vocoder + resampler against upstream's own outputs.

The fixtures (``shared/v1/fixtures``, set 2) were produced by running upstream ACE-Step's
``MusicDCAE`` with tiny random weights; see their README.md. Every stage of the encode chain, the
decode chain and the batched trainer-style encode are compared here."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

SHARED = Path(os.environ.get("ACESTEP_SHARED") or Path(__file__).resolve().parents[2].parent / "shared")
FIXTURES = SHARED / "v1" / "fixtures"

# Measured on the reference CPU: resample, log-mel, mel_normalized, decoder output and the
# 48 kHz reconstruction are bit-exact or within 1 ulp; the DCAE encoder (diffusers' oneDNN
# convolutions) is ~8e-6 off on an AVX2 machine. The limits leave room for other CPUs.
TOL = {
    "resampled": 1e-6,
    "log_mel": 1e-4,
    "mel_normalized": 2e-5,
    "encoder_raw": 1e-4,
    "latents": 2e-5,
    "decoder_raw": 1e-5,
    "waveform_48k": 1e-6,
    "pair_latents": 2e-5,
}


@pytest.fixture(scope="module")
def fixtures() -> Path:
    if not (FIXTURES / "dcae_cases.json").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"ACE-Step v1 fixtures missing at {FIXTURES} (CI must provide ../shared)")
        pytest.skip(f"ACE-Step v1 fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="module")
def meta(fixtures) -> dict:
    return json.loads((fixtures / "dcae_cases.json").read_text())


@pytest.fixture(scope="module")
def cases(fixtures) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    # cloned: tensors straight from the file can be misaligned, which changes MKL's rounding
    return {name: tensor.clone() for name, tensor in load_file(fixtures / "dcae_cases.safetensors").items()}


@pytest.fixture(scope="module")
def md(fixtures):
    from acestep_dist.families.ace_step_v1.dcae import MusicDCAE

    return MusicDCAE(dcae_checkpoint_path=fixtures / "dcae", vocoder_checkpoint_path=fixtures / "vocoder").eval()


@pytest.fixture(scope="module")
def encoded(md, cases) -> dict[str, torch.Tensor]:
    """Upstream's encode chain, one stage at a time, plus the one-call ``encode``."""
    from acestep_dist.families.ace_step_v1.dcae import SAMPLES_PER_LATENT

    wav = cases["chord.waveform_48k"][None]
    with torch.no_grad():
        resampled = md.to_model_rate(wav, 48000)
        padded = torch.nn.functional.pad(resampled, (0, -resampled.shape[-1] % SAMPLES_PER_LATENT))
        log_mel = md.forward_mel(padded)
        normalized = md.normalize_mel(log_mel)
        raw = md.dcae.encoder(normalized)
        latents, latent_lengths = md.encode(wav, sr=48000)
    return {"resampled": resampled[0], "padded": padded, "log_mel": log_mel[0], "mel_normalized": normalized[0],
            "encoder_raw": raw[0], "stage_latents": md.scale_latents(raw)[0], "latents": latents,
            "latent_lengths": latent_lengths}


@pytest.fixture(scope="module")
def decoded(md, cases):
    return md.decode(cases["chord.latents"][None].clone(), sr=48000)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.double() - b.double()).abs().max().item()


def check_partial(full: torch.Tensor, name: str, meta: dict, cases: dict, tol: float) -> None:
    """Compare a full tensor with the stored windows of it and with its float64 statistics."""
    info = meta["partially_stored"]["tensors"][name]
    assert list(full.shape) == info["full_shape"]
    for window, where in info["stored"].items():
        part = full[:, where["start"]:where.get("stop"):where.get("step", 1)]
        assert max_diff(part, cases[window]) <= tol, window
    stats = info["full_stats_float64"]
    f64 = full.double()
    assert f64.min().item() == pytest.approx(stats["min"], abs=tol)
    assert f64.max().item() == pytest.approx(stats["max"], abs=tol)
    assert f64.sum(-1).tolist() == pytest.approx(stats["per_channel_sum"], rel=1e-5, abs=1e-3)
    assert f64.square().sum(-1).tolist() == pytest.approx(stats["per_channel_sum_of_squares"], rel=1e-6)


# --- resampler --------------------------------------------------------------------------------

def test_resampler_alone_matches_torchaudio_windows(cases, meta):
    from acestep_dist.families.ace_step_v1.resample import Resample

    resampler = Resample(48000, 44100)
    assert resampler.kernel.dtype == torch.float32 and resampler.kernel.shape[:2] == (147, 1)
    out = resampler(cases["chord.waveform_48k"])
    check_partial(out, "chord.resampled_44k", meta, cases, TOL["resampled"])
    # leading dims are batched over
    batched = resampler(cases["chord.waveform_48k"][None, :, :48000].expand(3, 2, 48000))
    assert batched.shape == (3, 2, 44100)
    # away from the cut (the filter reaches ~7 samples), the same samples as the long signal's
    assert max_diff(batched[1, :, :44000], out[:, :44000]) < 1e-6


def _sinc_reference(x: np.ndarray, orig: int, new: int, outputs: np.ndarray) -> np.ndarray:
    """Windowed-sinc interpolation written from the formula, in float64."""
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    cutoff = min(o, n) * 0.99
    width = 6
    i = np.arange(len(x))
    y = []
    for j in outputs:
        u = (i / o - j / n) * cutoff
        inside = np.abs(u) < width
        h = np.sinc(u[inside]) * np.cos(np.pi * u[inside] / (2 * width)) ** 2
        y.append((cutoff / o) * float(np.dot(x[inside], h)))
    return np.array(y)


@pytest.mark.parametrize("orig, new", [(32000, 44100), (44100, 48000), (22050, 44100), (96000, 44100)])
def test_resampler_other_rates(orig, new):
    from acestep_dist.families.ace_step_v1.resample import Resample, resampled_length

    length = 4000 + 37
    x = torch.randn(2, length, generator=torch.Generator().manual_seed(orig + new)) * 0.3
    out = Resample(orig, new)(x)
    assert out.shape == (2, math.ceil(length * new / orig)) == (2, resampled_length(length, orig, new))
    picks = np.unique(np.r_[0, 1, 2, np.linspace(0, out.shape[-1] - 1, 60).astype(int), out.shape[-1] - 1])
    for row in range(2):
        ref = _sinc_reference(x[row].double().numpy(), orig, new, picks)
        # not tighter: like torchaudio, the kernel's output phases j / new are float32 values
        assert np.abs(out[row, picks].double().numpy() - ref).max() < 2e-5


def test_resampler_same_rate_is_identity():
    from acestep_dist.families.ace_step_v1.resample import Resample, resample

    x = torch.randn(2, 1000)
    assert Resample(44100, 44100)(x) is x
    assert resample(x, 44100, 44100) is x


# --- encode -----------------------------------------------------------------------------------

def test_encode_stages(encoded, cases, meta):
    check_partial(encoded["resampled"], "chord.resampled_44k", meta, cases, TOL["resampled"])
    assert encoded["padded"].shape[-1] == 356352  # 352800 padded to 87 * 4096
    assert max_diff(encoded["log_mel"], cases["chord.log_mel"]) <= TOL["log_mel"]
    assert max_diff(encoded["mel_normalized"], cases["chord.mel_normalized"]) <= TOL["mel_normalized"]
    assert max_diff(encoded["encoder_raw"], cases["chord.dcae_encoder_raw"]) <= TOL["encoder_raw"]
    assert max_diff(encoded["stage_latents"], cases["chord.latents"]) <= TOL["latents"]


def test_encode_latents_and_lengths(encoded, cases):
    latents, lengths = encoded["latents"], encoded["latent_lengths"]
    assert latents.shape == (1, 8, 16, 87) and latents.dtype == torch.float32
    assert torch.equal(latents[0], encoded["stage_latents"])  # encode() is exactly the stages
    assert max_diff(latents[0], cases["chord.latents"]) <= TOL["latents"]
    assert lengths.dtype == torch.int64 and lengths.tolist() == cases["chord.latent_lengths"].tolist() == [86]


def test_encode_trainer_convention(md, cases, encoded):
    # the trainer passes the lengths and no sr: the constructor's 48 kHz resampler
    latents, lengths = md.encode(cases["chord.waveform_48k"][None], torch.tensor([384000]))
    assert torch.equal(latents, encoded["latents"]) and lengths.tolist() == [86]


def test_encode_pair_with_audio_lengths(md, cases):
    latents, lengths = md.encode(cases["pair.waveforms_48k"], cases["pair.audio_lengths"])
    assert latents.shape == (2, 8, 16, 9)
    assert max_diff(latents, cases["pair.latents"]) <= TOL["pair_latents"]
    assert lengths.tolist() == cases["pair.latent_lengths"].tolist() == [8, 6]


@pytest.mark.parametrize("sr", [32000, 44100])
def test_encode_other_input_rates(md, cases, sr):
    from acestep_dist.families.ace_step_v1.dcae import latent_frames_for, latent_lengths_for

    n = int(0.8 * sr) + 3
    wav = cases["pair.waveforms_48k"][:, :, :n].contiguous()
    latents, lengths = md.encode(wav, torch.tensor([n, n - 5000]), sr=sr)
    assert latents.shape == (2, 8, 16, latent_frames_for(n, sr))
    assert latent_frames_for(n, sr) == math.ceil(math.ceil(n * 44100 / sr) / 4096)
    assert lengths.tolist() == [int(n / sr * 44100 / 4096), int((n - 5000) / sr * 44100 / 4096)]
    assert lengths.tolist() == latent_lengths_for([n, n - 5000], sr).tolist()
    assert torch.isfinite(latents).all()


# --- decode -----------------------------------------------------------------------------------

def test_decode_matches_upstream(md, cases, meta, decoded):
    sr, wavs = decoded
    assert sr == 48000 and len(wavs) == 1 and wavs[0].dtype == torch.float32
    check_partial(wavs[0], "chord.decode.waveform_48k", meta, cases, TOL["waveform_48k"])
    with torch.no_grad():
        raw = md.dcae.decoder(md.unscale_latents(cases["chord.latents"][None]))
    assert max_diff(raw[0], cases["chord.decode.dcae_decoder_raw"]) <= TOL["decoder_raw"]


def test_decode_lengths_and_native_rate(md, cases):
    from acestep_dist.families.ace_step_v1.dcae import decoded_length_for

    latents = cases["pair.latents"]
    sr, wavs = md.decode(latents)
    assert sr == 44100 and [w.shape for w in wavs] == [(2, 9 * 4096)] * 2 == [(2, decoded_length_for(9, 44100))] * 2
    sr, wavs = md.decode(latents, audio_lengths=[36000, 29111], sr=48000)
    assert sr == 48000 and [w.shape[-1] for w in wavs] == [36000, 29111]
    assert decoded_length_for(87) == 387867


def test_the_resampled_signal_is_bit_exact(encoded, meta):
    """The full resampled 44.1 kHz signal hashes as upstream's. (The decoded 48 kHz waveform is 1-2
    ulp off on some CPUs, from their convolution kernels: its windows above bound it instead.)"""
    expected = meta["partially_stored"]["tensors"]["chord.resampled_44k"]["sha256_of_full_tensor_bytes"]
    assert hashlib.sha256(encoded["resampled"].contiguous().numpy().tobytes()).hexdigest() == expected


# --- modules, loading, dtypes -----------------------------------------------------------------

def test_vocoder_checkpoint_keys_and_fresh_buffers(fixtures, md):
    from safetensors.torch import load_file

    from acestep_dist.families.ace_step_v1.vocoder import ADaMoSHiFiGANV1

    stored = load_file(fixtures / "vocoder" / "diffusion_pytorch_model.safetensors")
    assert set(md.vocoder.state_dict()) == set(stored)
    config = {k: v for k, v in json.loads((fixtures / "vocoder" / "config.json").read_text()).items()
              if not k.startswith("_")}
    fresh = ADaMoSHiFiGANV1(**config)
    assert set(fresh.state_dict()) == set(stored)
    # a new model computes the same front-end constants the checkpoint carries
    assert torch.equal(fresh.mel_transform.mel_scale.fb, stored["mel_transform.mel_scale.fb"])
    assert torch.equal(fresh.mel_transform.spectrogram.window, stored["mel_transform.spectrogram.window"])


def test_from_modules_and_bfloat16(md, cases):
    import copy

    from acestep_dist.families.ace_step_v1.dcae import MusicDCAE

    half = MusicDCAE.from_modules(copy.deepcopy(md.dcae), copy.deepcopy(md.vocoder)).to(torch.bfloat16)
    assert half.dtype == torch.bfloat16
    # the mel front end's constants stay float32 through the cast
    assert half.vocoder.mel_transform.mel_scale.fb.dtype == torch.float32
    assert half.vocoder.mel_transform.spectrogram.window.dtype == torch.float32
    latents, lengths = half.encode(cases["pair.waveforms_48k"].bfloat16(), cases["pair.audio_lengths"])
    assert latents.dtype == torch.bfloat16 and lengths.tolist() == [8, 6]
    assert max_diff(latents.float(), cases["pair.latents"]) < 0.1
    sr, wavs = half.decode(latents, sr=48000)
    assert wavs[0].dtype == torch.float32 and wavs[0].shape == (2, math.ceil(9 * 4096 * 48000 / 44100))


def test_constructor_argument_order():
    from acestep_dist.families.ace_step_v1.dcae import MusicDCAE

    with pytest.raises(TypeError, match="source_sample_rate"):
        MusicDCAE("music_dcae_f8c8", "music_vocoder")


def test_upstream_training_audio():
    from acestep_dist.families.ace_step_v1.dcae import upstream_training_audio

    short = upstream_training_audio(torch.full((1, 1000), 2.0))
    assert short.shape == (2, 3 * 48000) and short.max() == 1.0 and short[:, 1000:].abs().max() == 0
    long = upstream_training_audio(torch.zeros(3, 241 * 48000))
    assert long.shape == (2, 240 * 48000)


def test_the_mel_filterbank_is_built_on_the_cpu_under_any_device_context(md):
    """A dry run builds the vocoder under ``torch.device("meta")``: the filterbank, a constant of the
    front end, is still computed (on the CPU) and equals the checkpoint's; the module builds whole."""
    from acestep_dist.families.ace_step_v1.vocoder import ADaMoSHiFiGANV1, slaney_mel_filterbank

    stored = md.vocoder.mel_transform.mel_scale.fb
    config = md.vocoder.mel_transform.mel_scale
    with torch.device("meta"):
        filters = slaney_mel_filterbank(stored.shape[0], config.f_min, config.f_max, config.n_mels,
                                        config.sample_rate)
        skeleton = ADaMoSHiFiGANV1.from_config(md.vocoder.config)
    assert filters.device.type == "cpu" and torch.equal(filters, stored.cpu())
    assert next(skeleton.parameters()).device.type == "meta"
    assert torch.equal(skeleton.mel_transform.mel_scale.fb, stored.cpu())
