"""ACE-Step v1's optional SSL targets (upstream's MERT / mHuBERT alignment loss), end to end: the
schema's optional tensors, prep storing them by upstream's recipe, the driver's trust_remote_code
refusal, and the training loss (per sample, exact under batching).

No real MERT-v1-330M / mHuBERT-147 weights exist here: both are tiny random ``HubertModel``s of the
real feature extractor (stride 320, receptive field 400) at the released widths (1024 / 768, what
the DiT's projectors predict), saved with ``save_pretrained``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from acestep_dist.config import PrepConfig, TrainConfig
from acestep_dist.errors import UserError
from acestep_dist.families import get as get_family
from acestep_dist.families.base import SampleSchema, TensorSpec

from conftest import samples_by_key

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("ACESTEP_SHARED") or ROOT.parent / "shared")
VOCAB = SHARED / "v1" / "vocab.json"
FAMILY = get_family("ace-step-v1")
CLIPS = {"long": 6.0, "mid": 4.0, "short": 2.0}  # seconds; "short" is padded to upstream's 3 s
TRAIN = dict(max_train_steps=2, checkpointing_steps=2, learning_rate=5e-3, lr_warmup_steps=1, lora_dropout=0.0,
             gradient_accumulation_steps=1, log_interval=1, seed=3, lora_rank=4, lora_alpha=8.0, use_rslora=True,
             lora_preset="upstream", lyrics_vocab=str(VOCAB))


# ----------------------------------------------------------------------------- schema (no data)
SCHEMA = SampleSchema("test", 1, (
    TensorSpec("latent", "float32", "frames", axis=1),
    TensorSpec("text", "bfloat16", "tokens", per_caption=True),
    TensorSpec("extra", "bfloat16", "extra_frames", optional=True),
))


def test_an_optional_tensor_may_be_absent_and_is_checked_when_present():
    plain = {"latent": torch.zeros(2, 5), "text": torch.zeros(3, 4)}
    full = {**plain, "extra": torch.ones(7, 4)}
    alt = [{"text": torch.zeros(2, 4)}]
    assert SCHEMA.lengths_of(plain, alt) == {"frames": 5, "tokens": 3, "alt_tokens": [2]}
    assert SCHEMA.lengths_of(full) == {"frames": 5, "tokens": 3, "extra_frames": 7, "alt_tokens": []}
    assert set(SCHEMA.expected(SCHEMA.lengths_of(plain, alt))) == {"latent", "text", "alt_text_0"}
    assert set(SCHEMA.expected(SCHEMA.lengths_of(full))) == {"latent", "text", "extra"}
    from safetensors.torch import load

    assert set(load(SCHEMA.pack(plain))) == {"latent", "text"}
    packed = load(SCHEMA.pack(full))
    assert packed["extra"].dtype == torch.bfloat16 and SCHEMA.problems(packed, SCHEMA.lengths_of(full)) == []
    assert SCHEMA.problems(load(SCHEMA.pack(plain)), SCHEMA.lengths_of(plain)) == []
    assert SCHEMA.problems(packed, {"frames": 5, "tokens": 3, "extra_frames": 6}) == [
        "extra is [7, 4] torch.bfloat16, the manifest says 6 along axis 0 of bfloat16"]
    assert SCHEMA.problems(packed, {"frames": 5, "tokens": 3}) == ["holds extra, but the manifest gives no extra_frames"]
    assert SCHEMA.problems(load(SCHEMA.pack(plain)), SCHEMA.lengths_of(full)) == ["lacks tensor extra"]
    assert set(SCHEMA.for_caption(packed, 0)) == {"latent", "text", "extra"}
    assert set(SCHEMA.for_caption(load(SCHEMA.pack(plain)), 0)) == {"latent", "text"}
    with pytest.raises(ValueError, match="missing \\['latent'\\]"):  # required ones stay required
        SCHEMA.pack({"text": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="count of its own"):
        SampleSchema("bad", 1, (TensorSpec("latent", "float32", "frames"), TensorSpec("x", "float32", "frames", optional=True)))
    with pytest.raises(ValueError, match="not optional"):
        SampleSchema("bad", 1, (TensorSpec("latent", "float32", "frames", optional=True),))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def shared_data():
    if not VOCAB.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"ACE-Step v1 test data missing at {SHARED / 'v1'} (CI must provide ../shared)")
        pytest.skip(f"ACE-Step v1 test data not found at {SHARED / 'v1'}")


def _tiny_hubert(out: Path, hidden: int, norm: str, seed: int) -> Path:
    """A random HubertModel: the real conv feature extractor (kernels 10,3,3,3,3,2,2, strides
    5,2,2,2,2,2,2: 320 samples a frame) with 16 channels, one transformer layer of ``hidden``."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(seed)
    config = HubertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                          conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16,
                          feat_extract_norm=norm, conv_bias=norm == "layer", do_stable_layer_norm=norm == "layer")
    HubertModel(config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def ssl_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ssl-models")
    mert = _tiny_hubert(root / "mert", 1024, "layer", 1)  # MERT-330M: layer-norm extractor, stable layer norm
    mhubert = _tiny_hubert(root / "mhubert", 768, "group", 2)  # mHuBERT-147: HuBERT base's group norm
    remote = root / "mert-remote-code"  # MERT's real config names its own code
    remote.mkdir()
    config = json.loads((mert / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"}
    (remote / "config.json").write_text(json.dumps(config))
    return {"mert": mert, "mhubert": mhubert, "remote": remote}


@pytest.fixture(scope="module")
def v1_model(tmp_path_factory) -> Path:
    return FAMILY.write_tiny(tmp_path_factory.mktemp("v1-ssl-model") / "tiny-v1", "base", seed=0)


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> Path:
    from acestep_dist.audio import write_audio

    folder = tmp_path_factory.mktemp("ssl-songs")
    rng = np.random.default_rng(0)
    for index, (name, seconds) in enumerate(CLIPS.items()):
        t = np.arange(int(seconds * 48000)) / 48000
        tone = 0.3 * np.sin(2 * np.pi * (220 + 110 * index) * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.7 * t))
        wave = np.stack([tone, 0.8 * tone]) + 0.05 * rng.standard_normal((2, len(t)))
        write_audio(folder / f"{name}.wav", wave.astype(np.float32), 48000)
        (folder / f"{name}.txt").write_text("piano, calm, a minor\n")
    (folder / "long.lyrics").write_text("[verse]\nla la la\n")
    return folder


def _prep(songs: Path, model: Path, out: Path, **options) -> Path:
    from pipelines.prep import EXIT_OK, run_prep

    result = run_prep(str(songs), str(model), str(out), PrepConfig(lyrics_vocab=str(VOCAB), **options),
                      log=lambda _: None)
    assert result.exit_code == EXIT_OK
    return out


@pytest.fixture(scope="module")
def ssl_shards(tmp_path_factory, songs, v1_model, ssl_models, ray_session) -> Path:
    return _prep(songs, v1_model, tmp_path_factory.mktemp("ssl-shards") / "shards",
                 ssl_mert=str(ssl_models["mert"]), ssl_mhubert=str(ssl_models["mhubert"]))


@pytest.fixture(scope="module")
def plain_shards(tmp_path_factory, songs, v1_model, ray_session) -> Path:
    return _prep(songs, v1_model, tmp_path_factory.mktemp("plain-shards") / "shards")


# ------------------------------------------------------------------- upstream's recipe, rewritten
def _upstream_ssl(model, wave: torch.Tensor, rate: int, chunk_seconds: int) -> torch.Tensor:
    """Upstream trainer.py's infer_mert_ssl / infer_mhubert_ssl for a batch of one clip (torchaudio's
    Resample replaced by our torchaudio-equal one): mono, resample, normalise over the clip's
    ``len // (48000 / rate)`` samples (unbiased var + 1e-7), zero-padded chunks in one forward, the
    first (len + 319) // 320 frames of each chunk, concatenated."""
    from acestep_dist.families.ace_step_v1.resample import Resample

    target_wavs, wav_lengths = wave[None], torch.tensor([wave.shape[-1]])
    mono = Resample(48000, rate)(target_wavs.mean(dim=1))
    actual_lengths = wav_lengths // (48000 // rate)
    means = torch.stack([mono[i, : actual_lengths[i]].mean() for i in range(1)])
    variances = torch.stack([mono[i, : actual_lengths[i]].var() for i in range(1)])
    mono = (mono - means.view(-1, 1)) / torch.sqrt(variances.view(-1, 1) + 1e-7)
    chunk_size = rate * chunk_seconds
    chunks, lengths = [], []
    for start in range(0, int(actual_lengths[0]), chunk_size):
        end = min(start + chunk_size, int(actual_lengths[0]))
        chunk = mono[0, start:end]
        chunks.append(F.pad(chunk, (0, chunk_size - len(chunk))))
        lengths.append(end - start)
    with torch.no_grad():
        states = model(torch.stack(chunks)).last_hidden_state
    return torch.cat([states[i, : (length + 319) // 320] for i, length in enumerate(lengths)])


def _decoded(path: Path) -> torch.Tensor:
    """The clip as prep's decoder and upstream's dataset give it to the encoders (>= 3 s)."""
    from acestep_dist.audio import decode_window
    from acestep_dist.families.ace_step_v1.dcae import upstream_training_audio

    return upstream_training_audio(torch.from_numpy(decode_window(str(path), 0.0, None, 48000).wave.copy()))


# ------------------------------------------------------------------------------------- prep
def test_prep_stores_upstreams_ssl_states_of_the_cropped_audio(ssl_shards, plain_shards, ssl_models, songs):
    from transformers import HubertModel

    samples, plain = samples_by_key(ssl_shards), samples_by_key(plain_shards)
    assert sorted(samples) == sorted(CLIPS)
    models = {name: HubertModel.from_pretrained(str(ssl_models[name])).eval() for name in ("mert", "mhubert")}
    for key, seconds in CLIPS.items():
        sample, meta = samples[key], samples[key]["meta"]
        n = max(seconds, 3.0) * 48000  # upstream pads to 3 s
        # upstream's arithmetic: (len + 319) // 320 frames per chunk, but no more than the model
        # gives (a full 5-s MERT chunk yields 374 of 375): 6 s = 5 s (374) + 1 s (75)
        mert = {6.0: 374 + 75, 4.0: 300, 2.0: 225}[seconds]
        mhubert = int(n // 3 + 319) // 320
        assert list(sample["mert_states"].shape) == [mert, 1024] and meta["mert_frames"] == mert
        assert list(sample["mhubert_states"].shape) == [mhubert, 768] and meta["mhubert_frames"] == mhubert
        assert sample["mert_states"].dtype == sample["mhubert_states"].dtype == torch.bfloat16
        wave = _decoded(songs / f"{key}.wav")
        for name, rate, chunk in (("mert", 24000, 5), ("mhubert", 16000, 30)):
            reference = _upstream_ssl(models[name], wave, rate, chunk)
            stored = sample[f"{name}_states"].float()
            torch.testing.assert_close(stored, reference, rtol=1e-2, atol=1e-2 * float(reference.abs().max()))
        # the same latent as without SSL; the plain output has neither tensor nor count
        assert torch.equal(sample["latent"], plain[key]["latent"])
        assert not {"mert_states", "mhubert_states"} & set(plain[key])
        assert not {"mert_frames", "mhubert_frames"} & set(plain[key]["meta"])


def test_long_clips_chunk_and_batch_as_upstream(ssl_models):
    """50 s: 10 MERT chunks (two forwards of at most 8) and 2 mHuBERT chunks (30 s + 20 s)."""
    from transformers import HubertModel

    from acestep_dist.families.ace_step_v1.ssl import MERT, MHUBERT, hidden_states

    wave = 0.1 * torch.randn(2, 50 * 48000, generator=torch.Generator().manual_seed(3))
    for kind, name, frames in ((MERT, "mert", 10 * 374), (MHUBERT, "mhubert", 1499 + 1000)):
        model = HubertModel.from_pretrained(str(ssl_models[name])).eval()
        ours = hidden_states(model, wave, kind)
        assert list(ours.shape) == [frames, kind.hidden]
        reference = _upstream_ssl(model, wave, kind.rate, kind.chunk_seconds)
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_inspect_summarises_the_ssl_lengths(ssl_shards, plain_shards):
    from acestep_dist.inspect_report import inspect_output

    lines: list[str] = []
    report, code = inspect_output(str(ssl_shards), log=lines.append)
    assert code == 0 and report["problems"] == {}
    assert report["mert_frames"] == {"min": 225.0, "median": 300.0, "mean": pytest.approx((449 + 300 + 225) / 3),
                                     "max": 449.0, "samples": 3}
    assert report["mhubert_frames"]["max"] == 300.0 and report["mhubert_frames"]["samples"] == 3
    assert any(line.startswith("mert frames") and "(3 samples)" in line for line in lines)
    report, code = inspect_output(str(plain_shards), log=lambda _: None)
    assert code == 0 and "mert_frames" not in report and "mhubert_frames" not in report


def test_remote_code_needs_trust_remote_code_and_is_refused_before_the_pipeline(ssl_models, songs, v1_model,
                                                                                 tmp_path):
    from pipelines.prep import run_prep

    remote = str(ssl_models["remote"])
    config = PrepConfig(lyrics_vocab=str(VOCAB), ssl_mert=remote)
    with pytest.raises(UserError, match="ssl_mert .*ships its own model code.*Set trust_remote_code: true"):
        FAMILY.options(config)
    with pytest.raises(UserError, match="trust_remote_code"):
        run_prep(str(songs), str(v1_model), str(tmp_path / "out"), config, log=lambda _: None)
    assert not list((tmp_path / "out").glob("shard-*"))
    # allowed: passed on as an absolute folder (nothing is loaded on the driver)
    options = FAMILY.options(PrepConfig(lyrics_vocab=str(VOCAB), ssl_mert=remote, trust_remote_code=True))
    assert options.ssl_mert == remote and options.trust_remote_code
    with pytest.raises(UserError, match="ssl_mhubert .*no such folder"):
        FAMILY.options(PrepConfig(lyrics_vocab=str(VOCAB), ssl_mhubert=str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="no config.json"):
        FAMILY.options(PrepConfig(lyrics_vocab=str(VOCAB), ssl_mhubert=str(tmp_path)))


def test_shard_planning_counts_the_ssl_states(v1_model):
    description = FAMILY.describe(str(v1_model))
    plain = FAMILY.sample_bytes(description, 60.0, FAMILY.prep_options())
    both = FAMILY.sample_bytes(description, 60.0, FAMILY.prep_options(ssl_mert="m", ssl_mhubert="h"))
    assert both - plain == pytest.approx(2 * 60 * (75 * 1024 + 50 * 768))


# --------------------------------------------------------------------------------- training
def _trainable(v1_model: Path, **overrides):
    model = FAMILY.load(FAMILY.describe(str(v1_model)), "train")
    config = TrainConfig(**{**TRAIN, "train_batch_size": 2, **overrides})
    trainable = model.trainable(config, FAMILY.options(config))
    with torch.no_grad():  # a non-zero adapter, so the LoRA path counts
        for name, p in trainable.module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    trainable.module.eval()
    return model, trainable


def _read(shards: Path) -> dict[str, dict]:
    from acestep_dist.train.data import EpochPlan, SampleReader, open_training_data

    refs = open_training_data(str(shards)).refs
    reader, plan = SampleReader(refs, FAMILY.schema), EpochPlan(refs, 0, 1, 1, 1)
    samples = [reader.read(plan.micro_batch_items(position, 0, 0)[0]) for position in range(len(refs))]
    return {s["key"]: s for s in samples}


def _losses(model, trainable, samples, seeds) -> torch.Tensor:
    with torch.no_grad():
        return trainable.module(model.collate(samples), [torch.Generator().manual_seed(s) for s in seeds])[1]


def test_the_ssl_term_is_per_sample_and_weighted(ssl_shards, v1_model):
    read = _read(ssl_shards)
    long, short = read["long"], read["short"]
    bare = {k: v for k, v in long.items() if k not in ("mert_states", "mhubert_states")}
    model, trainable = _trainable(v1_model)
    batch = model.collate([long, short])
    assert sorted(batch.ssl_states) == ["mert_states", "mhubert_states"]
    # a padded batch: each sample's loss is its loss alone (its SSL terms over its own frames)
    together = _losses(model, trainable, [long, short], (20, 21))
    alone = torch.cat([_losses(model, trainable, [long], (20,)), _losses(model, trainable, [short], (21,))])
    assert torch.allclose(together, alone, atol=1e-5), (together, alone)
    with torch.no_grad():
        mean = trainable.module(batch, [torch.Generator().manual_seed(s) for s in (20, 21)])[0]
    assert abs(float(mean) - float(alone.mean())) <= 1e-5
    # a batch mixing samples with and without SSL states: each gets the terms it carries
    mixed = _losses(model, trainable, [bare, short], (20, 21))
    assert torch.allclose(mixed, torch.cat([_losses(model, trainable, [bare], (20,)), alone[1:]]), atol=1e-5)
    # weight 0: the denoising loss alone (as without SSL states); the term adds linearly
    _, off = _trainable(v1_model, ssl_loss_weight=0.0)
    _, double = _trainable(v1_model, ssl_loss_weight=2.0)
    denoising = _losses(model, off, [long, short], (20, 21))
    assert torch.allclose(denoising[:1], _losses(model, trainable, [bare], (20,)), atol=1e-5)
    term = together - denoising
    assert bool((term > 0).all()) and bool((term <= 2).all())  # mean of (1 - cos) terms
    torch.testing.assert_close(_losses(model, double, [long, short], (20, 21)) - denoising, 2 * term)


def test_the_per_sample_term_is_upstreams_for_an_unpadded_sample(v1_model):
    """mask_padding's per-sample projection loss of a batch of one equals upstream's batch mean."""
    from acestep_dist.families.ace_step_v1.transformer import ACEStepTransformer2DModel

    transformer = ACEStepTransformer2DModel.from_pretrained(str(v1_model / "ace_step_transformer")).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 8, 16, 30, generator=generator), attention_mask=torch.ones(1, 30),
                  encoder_text_hidden_states=torch.randn(1, 4, 32, generator=generator),
                  text_attention_mask=torch.ones(1, 4, dtype=torch.long), speaker_embeds=torch.zeros(1, 512),
                  lyric_token_idx=torch.tensor([[261, 30, 2]]), lyric_mask=torch.ones(1, 3, dtype=torch.long),
                  timestep=torch.tensor([400.0]))
    targets = [torch.randn(1, 210, 1024, generator=generator), torch.randn(1, 140, 768, generator=generator)]
    with torch.no_grad():
        upstream = dict(transformer(**inputs, ssl_hidden_states=targets).proj_losses)
        transformer.mask_padding = True
        ours = dict(transformer(**inputs, ssl_hidden_states=[[targets[0][0]], [targets[1][0]]]).proj_losses)
    for name in ("mert", "m-hubert"):
        losses, present = ours[name]
        assert present.tolist() == [True]
        torch.testing.assert_close(losses[0], upstream[name], rtol=1e-6, atol=1e-6)


def test_training_with_ssl_states_runs(ssl_shards, v1_model, tmp_path):
    from pipelines.train import run_train

    lines: list[str] = []
    config = TrainConfig(**{**TRAIN, "train_batch_size": 2, "zero_stage": 2, "ssl_loss_weight": 0.1})
    result = run_train(config, str(ssl_shards), str(v1_model), str(tmp_path / "run"), workers=1, log=lines.append)
    assert result.steps == 2
    assert any("SSL alignment weight 0.1" in line for line in lines)
    state = json.loads((tmp_path / "run" / "final" / "acedist_state.json").read_text())
    assert state["recipe"]["ssl_weight"] == 0.1
