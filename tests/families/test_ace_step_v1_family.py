"""ACE-Step v1 as a family: tiny checkpoints, prep (the fixture's latent), training (workers and
resume exact), export in upstream's and ComfyUI's keys, generation; each through the real stages."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from acestep_dist.config import PrepConfig, TrainConfig
from acestep_dist.errors import UserError
from acestep_dist.families import get as get_family, family_of
from conftest import timestep_histograms, train_scalars, train_with_a_killed_worker

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("ACESTEP_SHARED") or ROOT.parent / "shared")
VOCAB = SHARED / "v1" / "vocab.json"
FIXTURES = SHARED / "v1" / "fixtures"
FAMILY = get_family("ace-step-v1")
COMMON = dict(max_train_steps=6, checkpointing_steps=3, learning_rate=5e-3, lr_warmup_steps=1, lora_dropout=0.0,
              gradient_accumulation_steps=1, log_interval=3, seed=3, lora_rank=4, lora_alpha=8.0, use_rslora=True,
              lora_preset="upstream", lyrics_vocab=str(VOCAB))


@pytest.fixture(scope="module", autouse=True)
def shared_data():
    if not VOCAB.is_file() or not FIXTURES.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"ACE-Step v1 test data missing at {SHARED / 'v1'} (CI must provide ../shared)")
        pytest.skip(f"ACE-Step v1 test data not found at {SHARED / 'v1'}")


@pytest.fixture(scope="module")
def v1_model(tmp_path_factory) -> Path:
    return FAMILY.write_tiny(tmp_path_factory.mktemp("v1-model") / "tiny-v1", "base", seed=0)


@pytest.fixture(scope="module")
def v1_shards(tmp_path_factory, corpus, v1_model, ray_session) -> Path:
    """The 12 corpus songs (7 with lyrics in several languages), 6 s each."""
    from pipelines.prep import EXIT_OK, run_prep

    out = tmp_path_factory.mktemp("v1-shards") / "shards"
    result = run_prep(str(corpus / "music"), str(v1_model), str(out), PrepConfig(max_duration=6, lyrics_vocab=str(VOCAB)),
                      log=lambda _: None)
    assert result.exit_code == EXIT_OK
    return out


def _config(**overrides) -> TrainConfig:
    return TrainConfig(**{**COMMON, **overrides})


@pytest.fixture(scope="module")
def v1_run(tmp_path_factory, v1_shards, v1_model) -> Path:
    """1 worker x batch 2, ZeRO-2, a validation render at the end."""
    from pipelines.train import run_train

    run = tmp_path_factory.mktemp("v1-train") / "reference"
    config = _config(train_batch_size=2, zero_stage=2, validation_step_interval=6, validation_audio_duration=2.0,
                     validation_steps=4, validation_prompt="calm piano", validation_lyrics="[verse]\nla la la")
    assert run_train(config, str(v1_shards), str(v1_model), str(run), workers=1, log=lambda _: None).steps == 6
    return run


def _lora(run: Path) -> dict[str, torch.Tensor]:
    from acestep_dist.families.ace_step_v1.lora_formats import read_lora

    return read_lora(run / "final" / "pytorch_lora_weights.safetensors").state


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _acedist(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                       HF_HUB_OFFLINE="1", **(env or {}))
    environment.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "acestep_dist.cli", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=900)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{result.args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


# ------------------------------------------------------------------------------ checkpoints
def test_tiny_checkpoints_have_upstreams_layout_and_are_described(v1_model, tmp_path):
    assert sorted(p.name for p in v1_model.iterdir()) == ["ace_step_transformer", "music_dcae_f8c8", "music_vocoder",
                                                           "umt5-base"]
    assert family_of(str(v1_model)) is FAMILY
    assert family_of("ACE-Step/ACE-Step-v1-3.5B") is FAMILY  # the hub id: claimed without a download
    info = json.loads(_ok(_acedist("model", "info", str(v1_model))))
    assert info["family"] == "ace-step-v1" and info["layout"] == "upstream" and info["sample_rate"] == 48000
    assert abs(info["frames_per_second"] - 44100 / 4096) < 1e-9
    assert info["dimensions"]["latent_channels"] == 8 and info["dimensions"]["latent_height"] == 16
    assert info["dimensions"]["lyric_vocab"] == 6693
    # not a v1 checkpoint: named
    broken = tmp_path / "broken"
    (broken / "ace_step_transformer").mkdir(parents=True)
    (broken / "ace_step_transformer" / "config.json").write_text(json.dumps({"_class_name": "ACEStepTransformer2DModel"}))
    with pytest.raises(Exception, match="missing: music_dcae_f8c8, music_vocoder, umt5-base"):
        FAMILY.describe(str(broken))


def test_prep_stores_upstreams_latent_of_the_fixture_signal(tmp_path, ray_session):
    """The fixture's 8-s signal as a float WAV, prepared with a tiny v1 model built from the fixture's
    DCAE and vocoder: the stored latent is upstream's."""
    from safetensors.torch import load_file

    from acestep_dist.audio import write_audio
    from acestep_dist.shards import iter_samples
    from pipelines.prep import EXIT_OK, run_prep

    cases = load_file(str(FIXTURES / "dcae_cases.safetensors"))
    model = FAMILY.write_tiny(tmp_path / "model", "base", dcae=FIXTURES / "dcae", vocoder=FIXTURES / "vocoder")
    songs = tmp_path / "songs"
    songs.mkdir()
    write_audio(songs / "arpeggio.wav", cases["chord.waveform_48k"].clone().numpy(), 48000)
    (songs / "arpeggio.txt").write_text("piano, arpeggio, a minor\n")
    result = run_prep(str(songs), str(model), str(tmp_path / "shards"), PrepConfig(lyrics_vocab=str(VOCAB)),
                      log=lambda _: None)
    assert result.exit_code == EXIT_OK
    [tar] = sorted((tmp_path / "shards").glob("shard-*.tar"))
    with open(tar, "rb") as f:
        [sample] = list(iter_samples(f))
    latent = sample["latent"]
    assert latent.dtype == torch.float32 and list(latent.shape) == [8, 16, 87] and sample["meta"]["frames"] == 87
    assert float((latent - cases["chord.latents"].clone()).abs().max()) <= 1e-4
    assert sample["lyric_ids"].tolist() == [0]  # no lyrics: upstream's training rule (one pad id, attended)


def test_prep_stores_caption_states_and_lyric_ids(v1_shards, v1_model, corpus):
    from acestep_dist.families.ace_step_v1.lyrics import tokenize_lyrics
    from acestep_dist.shards import iter_samples

    samples = {}
    for tar in sorted(v1_shards.glob("shard-*.tar")):
        with open(tar, "rb") as f:
            samples.update({s["key"]: s for s in iter_samples(f)})
    assert len(samples) == 12
    with_lyrics = [s for s in samples.values() if s["meta"]["lyrics"]]
    assert len(with_lyrics) == 7
    for sample in with_lyrics:
        assert sample["lyric_ids"].dtype == torch.int32
        assert sample["lyric_ids"].tolist() == tokenize_lyrics(sample["meta"]["lyrics"], VOCAB, "training")
    for sample in samples.values():
        meta = sample["meta"]
        assert (meta["family"], meta["schema_version"]) == ("ace-step-v1", 1)
        assert sample["text_states"].dtype == torch.bfloat16 and sample["text_states"].shape[1] == 32
        assert list(sample["latent"].shape[:2]) == [8, 16] and sample["latent"].shape[2] == meta["frames"]
        assert meta["frames"] == math.ceil(math.ceil(6 * 48000 * 147 / 160) / 4096)
    from acestep_dist.inspect_report import inspect_output

    report, code = inspect_output(str(v1_shards), log=lambda _: None)
    assert code == 0 and report["problems"] == {} and report["samples"] == 12
    assert report["families"] == {"ace-step-v1 v1": len(list(v1_shards.glob("shard-*.tar")))}


def test_prep_without_a_lyric_vocabulary_fails_clearly(tmp_path, v1_model, corpus):
    from acestep_dist.families.ace_step_v1.lyrics import find_lyrics_vocab

    with pytest.raises(UserError, match="lyrics_vocab"):
        find_lyrics_vocab(tmp_path / "nowhere.json")


# --------------------------------------------------------------------------------- training
def test_a_batch_of_lengths_has_the_mean_loss_of_its_samples(v1_shards, v1_model):
    from acestep_dist.train.data import EpochPlan, SampleReader, open_training_data

    model = FAMILY.load(FAMILY.describe(str(v1_model)), "train")
    config = _config(train_batch_size=4)
    trainable = model.trainable(config, FAMILY.options(config))
    with torch.no_grad():  # a non-zero adapter, so the LoRA path counts
        for name, p in trainable.module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    refs = open_training_data(str(v1_shards)).refs
    reader, plan = SampleReader(refs, FAMILY.schema), EpochPlan(refs, 0, 1, 1, 1)
    samples = []
    for position, frames in enumerate((33, 40, 52, 65)):
        sample = reader.read(plan.micro_batch_items(position, 0, 0)[0])
        sample["latent"] = sample["latent"][..., :frames]
        samples.append(sample)
    generators = lambda: [torch.Generator().manual_seed(20 + i) for i in range(4)]  # noqa: E731
    trainable.module.eval()
    with torch.no_grad():
        _, per_sample, _ = trainable.module(model.collate(samples), generators())
        alone = torch.stack([trainable.module(model.collate([s]), [g])[0] for s, g in zip(samples, generators())])
    assert torch.allclose(per_sample, alone, atol=1e-5), (per_sample, alone)


@pytest.mark.parametrize("adapter,precision", [("dora", "no_change"), ("lokr", "no_change"), ("loha", "no_change"),
                                               ("lora", "int8-torchao")])
def test_every_adapter_kind_learns_from_the_loss_and_saves_as_trained(adapter, precision, v1_shards, v1_model,
                                                                       tmp_path):
    """The trainable of each kind (the stage's DeepSpeed steps run the same module; the 1.5 stage
    tests train each kind through Ray): gradients reach every adapter tensor, a step lowers the
    loss of its batch, and the saved file reads back as the trained adapter. A LoRA also on an int8
    base: the training stage quantizes every frozen linear layer of v1's modules (its own DiT with
    linear attention, the lyric encoder, the speaker and genre projections), family-blind."""
    from acestep_dist.families.ace_step_v1.lora_formats import read_lora
    from acestep_dist.families.common import adapter_parameters
    from acestep_dist.train.data import EpochPlan, SampleReader, open_training_data
    from acestep_dist.train.frozen_precision import FrozenQuantizedLinear, quantize_frozen_base

    model = FAMILY.load(FAMILY.describe(str(v1_model)), "train")
    settings = {k: v for k, v in COMMON.items() if k not in ("lora_dropout", "use_rslora")}
    config = TrainConfig(**{**settings, "adapter": adapter, "lora_alpha": 4.0, "lora_rank": 2 if adapter == "lokr" else 4,
                            "base_model_precision": precision})
    trainable = model.trainable(config, FAMILY.options(config))
    if precision != "no_change":
        report = quantize_frozen_base(trainable.module, precision)
        quantized = [name for name, m in trainable.module.named_modules() if isinstance(m, FrozenQuantizedLinear)]
        assert report.layers == len(quantized) and any("lyric" in name for name in quantized)
        assert not [name for name, m in trainable.module.named_modules()
                    if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    parameters = adapter_parameters(trainable.module)
    assert parameters and all(p.requires_grad for p in parameters)
    refs = open_training_data(str(v1_shards)).refs
    reader, plan = SampleReader(refs, FAMILY.schema), EpochPlan(refs, 0, 1, 1, 1)
    batch = model.collate([reader.read(plan.micro_batch_items(i, 0, 0)[0]) for i in range(2)])
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    losses = []
    for _ in range(2):
        loss = trainable.module(batch, generators())[0]
        optimizer.zero_grad()
        loss.backward()
        if not losses:  # some adapter parts start at zero (no change): every part still gets a gradient
            assert all(p.grad is not None for p in parameters)
        optimizer.step()
        losses.append(float(loss))
    with torch.no_grad():
        losses.append(float(trainable.module(batch, generators())[0]))
    assert losses[-1] < losses[0], losses
    written = trainable.save(tmp_path)
    saved = read_lora(tmp_path / written[0])
    assert saved.spec == trainable.lora_weights().spec and saved.spec.kind == adapter
    for key, value in trainable.lora_weights().state.items():
        torch.testing.assert_close(saved.state[key], value, rtol=1e-6, atol=1e-7)


def test_dry_run_counts_v1s_parameters_without_reading_weights(v1_shards, v1_model, tmp_path):
    from pipelines.train import run_train

    config = _config(validation_step_interval=3)
    result = run_train(config, str(v1_shards), str(v1_model), str(tmp_path / "run"), dry_run=True, log=lambda _: None)
    loaded = FAMILY.load(FAMILY.describe(str(v1_model)), "validate")
    module = loaded.trainable(config, FAMILY.options(config)).module
    expected = [(name, sum(p.numel() for p in child.parameters()),
                 sum(p.numel() for p in child.parameters() if p.requires_grad))
                for name, child in module.named_children() if list(child.parameters())]
    assert result.estimate.parameters == expected and result.estimate.activations > 0
    # rank 0 renders validation audio: it also holds the DCAE with its vocoder, and UMT5 (float32 here)
    parts = loaded.parts()
    held = sum(t.numel() * t.element_size() for name in ("dcae", "text_encoder")
               for t in (*parts[name].parameters(), *parts[name].buffers()))
    assert dict(result.estimate.gpu)["validation parts, rank 0 only (dcae, text_encoder)"] == held
    assert not (tmp_path / "run").exists()


def test_training_adapts_upstreams_modules_and_renders_validation_audio(v1_run):
    from acestep_dist.audio import probe_audio

    state = json.loads((v1_run / "final" / "acedist_state.json").read_text())
    assert (state["family"], state["step"], state["weights"]) == ("ace-step-v1", 6, ["pytorch_lora_weights.safetensors"])
    assert state["recipe"]["shift"] == 3.0 and state["recipe"]["speaker_dropout"] == 0.5
    lora = _lora(v1_run)
    assert "lyric_encoder.encoders.0.self_attn.linear_q.lora_A.weight" in lora
    assert "speaker_embedder.lora_B.weight" in lora and "transformer_blocks.0.attn.to_out.0.lora_A.weight" in lora
    assert all(float(v.abs().max()) > 0 for k, v in lora.items() if "to_q.lora_B" in k)  # B starts at 0: it trained
    [wav] = list((v1_run / "samples").iterdir())
    info = probe_audio(wav)
    assert info.sample_rate == 48000 and abs(info.duration - 2.0) < 0.05


def test_two_workers_give_the_weights_of_one_worker(v1_run, tmp_path, v1_shards, v1_model):
    from pipelines.train import run_train

    run = tmp_path / "two"
    run_train(_config(train_batch_size=1, zero_stage=2), str(v1_shards), str(v1_model), str(run), workers=2,
              log=lambda _: None)
    # the same samples, timesteps and noise: the gathered draws, the mean loss and the gradient norm
    # (sensitive to how the workers' gradients are combined: Adam's steps are not)
    assert timestep_histograms(run) == timestep_histograms(v1_run)
    for name in ("loss", "grad_norm"):
        two, one = train_scalars(run, name), train_scalars(v1_run, name)
        assert two.keys() == one.keys() == {3, 6}
        assert all(abs(two[step] - one[step]) <= 1e-5 * abs(one[step]) for step in one), (name, two, one)
    # Weights: a wrong sample, draw or gradient moves them by about the learning rate per step (5e-3).
    # Summing in another order (two workers' gradients all-reduced) differs by rounding, which Adam's
    # normalisation amplifies where a gradient is near zero: 1.3e-6 measured here, 3e-5 on CI's CPU.
    assert _max_diff(_lora(run), _lora(v1_run)) <= 1e-4


def test_a_killed_worker_resumes_exactly(v1_run, tmp_path, v1_shards, v1_model, monkeypatch):
    # v1's trained state (adapter, optimiser, data position, generators) through a checkpoint and back:
    # the worker SIGKILLs itself at step 4, after checkpoint 3 (8 s: Ray's controller registers a
    # reported checkpoint by polling), and Ray Train restarts it from there. The same restore path as
    # `--resume` after a killed driver, which tests/test_train.py covers for every family.
    run = tmp_path / "killed"
    train_with_a_killed_worker(monkeypatch, _config(train_batch_size=2, zero_stage=2), v1_shards, v1_model, run,
                               workers=1, rank=0, step=4)
    assert _max_diff(_lora(run), _lora(v1_run)) <= 1e-6


def test_settings_of_another_recipe_are_refused(v1_model):
    description = FAMILY.describe(str(v1_model))
    for overrides, message in ((dict(cfg_dropout=0.1), "cfg_dropout_text"),
                               (dict(timestep_sampler="discrete-turbo"), "logit-normal"),
                               (dict(lora_preset="attention+mlp"), "not one of ACE-Step v1's")):
        config = _config(**overrides)
        with pytest.raises(UserError, match=message):
            FAMILY.check_training(description, config, FAMILY.options(config))


# ------------------------------------------------------------------------- export, generate
def test_export_writes_upstreams_and_comfyuis_keys_that_load_and_change_the_output(v1_run, v1_model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from acestep_dist.families.ace_step_v1.lora_formats import load_lora_into, read_lora
    from acestep_dist.families.ace_step_v1.transformer import ACEStepTransformer2DModel

    out = tmp_path / "export"
    _ok(_acedist("export", str(v1_run), "--out", str(out), "--format", "all", "--name", "v1-lora"))
    upstream_file = out / "upstream" / "pytorch_lora_weights.safetensors"
    comfy_file = out / "comfyui" / "v1-lora.safetensors"
    trained = read_lora(v1_run / "final" / "pytorch_lora_weights.safetensors")
    upstream = load_file(str(upstream_file))
    # upstream's key names, no prefix, no alpha: the trained scale (alpha 8 / sqrt(4) = 4) baked in
    assert sorted(upstream) == sorted(trained.state)
    for key, value in trained.state.items():
        torch.testing.assert_close(upstream[key], value * 2.0)
    comfy = load_file(str(comfy_file))
    modules = trained.modules
    assert sorted(comfy) == sorted([f"diffusion_model.{k}" for k in trained.state] +
                                   [f"diffusion_model.{m}.alpha" for m in modules])
    assert {float(comfy[f"diffusion_model.{m}.alpha"]) for m in modules} == {16.0}  # scale 4 x rank 4
    assert "upstream/pytorch_lora_weights.safetensors" in (out / "README.txt").read_text()

    transformer_dir = v1_model / "ace_step_transformer"
    inputs = _dit_inputs()
    base = ACEStepTransformer2DModel.from_pretrained(str(transformer_dir)).eval()
    with torch.no_grad():
        plain = base(**inputs).sample
    # upstream's load_lora: diffusers' load_lora_adapter with prefix None reads the file by its key names
    upstream_model = ACEStepTransformer2DModel.from_pretrained(str(transformer_dir)).eval()
    upstream_model.load_lora_adapter(str(upstream_file), adapter_name="ace_step_lora", prefix=None)
    ours = ACEStepTransformer2DModel.from_pretrained(str(transformer_dir)).eval()
    load_lora_into(ours, comfy_file)
    with torch.no_grad():
        with_upstream, with_ours = upstream_model(**inputs).sample, ours(**inputs).sample
    assert float((with_upstream - plain).abs().max()) > 1e-4  # the adapter changes the output
    assert float((with_upstream - with_ours).abs().max()) <= 1e-5  # the same adapter through both files
    with safe_open(str(upstream_file), "pt") as f:
        assert json.loads(f.metadata()["acedist"])["family"] == "ace-step-v1"


def _dit_inputs(frames: int = 24) -> dict:
    generator = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 8, 16, frames, generator=generator),
                attention_mask=torch.ones(1, frames), encoder_text_hidden_states=torch.randn(1, 5, 32, generator=generator),
                text_attention_mask=torch.ones(1, 5, dtype=torch.long), speaker_embeds=torch.zeros(1, 512),
                lyric_token_idx=torch.tensor([[261, 30, 40, 2]]), lyric_mask=torch.ones(1, 4, dtype=torch.long),
                timestep=torch.tensor([500.0]))


def test_generate_renders_with_the_exported_lora(v1_run, v1_model, tmp_path):
    from acestep_dist.audio import decode_window, probe_audio

    from acestep_dist.families import RenderRequest
    from acestep_dist.records import Record

    out = tmp_path / "export"
    _ok(_acedist("export", str(v1_run), "--out", str(out), "--format", "upstream"))
    wav = tmp_path / "lora.wav"
    _ok(_acedist("generate", "--model", str(v1_model), "--lora", str(out / "upstream"), "--prompt", "calm piano",
                 "--lyrics", "[verse]\nla la la", "--duration", "2", "--steps", "4", "--seed", "1", "--lyrics-vocab",
                 str(VOCAB), "--out", str(wav)))
    info = probe_audio(wav)
    assert info.sample_rate == 48000 and abs(info.duration - 2.0) < 1e-3
    rendered = decode_window(str(wav), 0.0, None, 48000).wave
    # the same request in this process: the same audio; and the sampled latents with and without
    # the LoRA differ (the tiny random vocoder's audio barely depends on them)
    from acestep_dist.families.ace_step_v1.generation import SamplerSettings, lyric_tensors, sample_latents

    request = RenderRequest(Record(key="g", caption="calm piano", lyrics="[verse]\nla la la"), 2.0, seed=1, steps=4,
                            options={"lyrics_vocab": str(VOCAB)})
    description = FAMILY.describe(str(v1_model))
    lyrics = lyric_tensors("[verse]\nla la la", VOCAB)
    latents = {}
    for name, lora in (("base", None), ("lora", str(out / "upstream"))):
        model = FAMILY.load(description, "generate")
        audio = model.generate(request, lora=lora, log=lambda _: None)
        if lora:
            assert np.abs(audio.numpy()[..., : rendered.shape[-1]] - rendered).max() <= 1e-5
        latents[name] = sample_latents(model.operations, "calm piano", *lyrics, 22, 1, SamplerSettings(steps=4))
    assert float((latents["lora"] - latents["base"]).abs().max()) > 1e-4


def test_init_lora_continues_from_upstream_simpletuner_and_comfyui_files(v1_run, v1_model, tmp_path):
    """Any spelling continues training with the adapter's effect kept: our export (scale baked in),
    a SimpleTuner / old-upstream file (bare keys, no alpha: scale 1), ComfyUI's (.alpha)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from acestep_dist.families.ace_step_v1.lora_formats import read_lora

    out = tmp_path / "export"
    _ok(_acedist("export", str(v1_run), "--out", str(out), "--format", "all", "--name", "x"))
    trained = read_lora(v1_run / "final" / "pytorch_lora_weights.safetensors")  # rank 4, alpha 8, rsLoRA: scale 4
    bare = tmp_path / "simpletuner" / "pytorch_lora_weights.safetensors"
    bare.parent.mkdir()
    save_file({k: v.contiguous() for k, v in trained.state.items()}, str(bare))  # read as scale 1
    description = FAMILY.describe(str(v1_model))
    for source, effect in ((out / "upstream", 4.0), (out / "comfyui" / "x.safetensors", 4.0), (bare, 1.0)):
        # the run's own setting differs from the file's (alpha 2, no rsLoRA: scale 0.5)
        config = _config(init_lora=str(source), lora_alpha=2.0, use_rslora=False)
        FAMILY.check_training(description, config, FAMILY.options(config))
        model = FAMILY.load(description, "train")
        model.trainable(config, FAMILY.options(config))
        loaded = get_peft_model_state_dict(model.operations.components.transformer, adapter_name="default")
        for key, value in trained.state.items():
            # the same delta: scale 0.5 x B' A' == effect x B A, each factor sqrt(effect / 0.5)
            torch.testing.assert_close(loaded[key], value * math.sqrt(effect / 0.5))
    with pytest.raises(UserError, match="rank 4 \\(lora_rank is 8\\)"):
        config = _config(init_lora=str(out / "upstream"), lora_rank=8)
        FAMILY.check_training(description, config, FAMILY.options(config))
    with pytest.raises(UserError, match="outside lora_preset 'attention'"):
        config = _config(init_lora=str(out / "upstream"), lora_preset="attention")
        FAMILY.check_training(description, config, FAMILY.options(config))


def test_full_fine_tune_with_the_lyric_encoder_exports_a_checkpoint_that_renders(tmp_path, v1_shards, v1_model):
    """Full DiT + lyric embedder in full with its own rate, ZeRO-3 (parameters partitioned and
    gathered to save), gradient checkpointing."""
    from safetensors.torch import load_file

    from acestep_dist.families.ace_step_v1.transformer import ACEStepTransformer2DModel
    from pipelines.train import run_train

    run = tmp_path / "full"
    config = _config(model_type="full", lyrics_embedder_train=True, lyrics_embedder_lr=1e-3, zero_stage=3,
                     gradient_checkpointing=True, train_batch_size=2, max_train_steps=2, checkpointing_steps=2,
                     learning_rate=1e-3)
    run_train(config, str(v1_shards), str(v1_model), str(run), workers=1, log=lambda _: None)
    state = json.loads((run / "final" / "acedist_state.json").read_text())
    assert state["weights"] == ["ace_step_transformer"] and state["config"]["zero_stage"] == 3
    base = load_file(str(v1_model / "ace_step_transformer" / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(run / "final" / "ace_step_transformer" / "diffusion_pytorch_model.safetensors"))
    assert sorted(trained) == sorted(base)  # upstream's keys, nothing added
    for part in ("transformer_blocks.0.attn.to_q.weight", "lyric_encoder.encoders.0.self_attn.linear_q.weight",
                 "lyric_embs.weight"):
        assert float((trained[part] - base[part]).abs().max()) > 0, part
    out = tmp_path / "export"
    _ok(_acedist("export", str(run), "--out", str(out)))
    exported = out / "upstream"
    assert sorted(p.name for p in exported.iterdir()) == ["ace_step_transformer", "music_dcae_f8c8", "music_vocoder",
                                                          "umt5-base"]
    reloaded = ACEStepTransformer2DModel.from_pretrained(str(exported / "ace_step_transformer"))
    assert reloaded.config.lyric_encoder_config["num_blocks"] == 1
    wav = tmp_path / "full.wav"
    _ok(_acedist("generate", "--model", str(exported), "--prompt", "calm piano", "--duration", "1", "--steps", "2",
                 "--out", str(wav)))
    assert wav.is_file()


def test_a_lora_run_that_trains_the_lyric_encoder_exports_and_renders_it(tmp_path, v1_shards, v1_model):
    from safetensors.torch import load_file

    from acestep_dist.families.ace_step_v1.lora_formats import load_lora_into
    from acestep_dist.families.ace_step_v1.transformer import ACEStepTransformer2DModel
    from pipelines.train import run_train

    run = tmp_path / "lyric-lora"
    config = _config(lyrics_embedder_train=True, lyrics_embedder_lr=1e-2, train_batch_size=2, max_train_steps=1,
                     checkpointing_steps=1, lora_preset="attention")
    run_train(config, str(v1_shards), str(v1_model), str(run), workers=1, log=lambda _: None)
    state = json.loads((run / "final" / "acedist_state.json").read_text())
    assert state["weights"] == ["pytorch_lora_weights.safetensors", "lyric_encoder.safetensors"]
    lyric = load_file(str(run / "final" / "lyric_encoder.safetensors"))
    assert "lyric_embs.weight" in lyric and not any("lora_" in k or "base_layer" in k for k in lyric)
    out = tmp_path / "export"
    _ok(_acedist("export", str(run), "--out", str(out), "--format", "upstream"))
    assert (out / "upstream" / "lyric_encoder.safetensors").is_file()
    transformer = ACEStepTransformer2DModel.from_pretrained(str(v1_model / "ace_step_transformer"))
    load_lora_into(transformer, out / "upstream")
    torch.testing.assert_close(transformer.lyric_embs.weight.detach(), lyric["lyric_embs.weight"])


def test_the_hub_id_loads_from_the_hugging_face_cache(tmp_path, monkeypatch, v1_model):
    """The hub code path, with the cache filled by hand (tests cannot reach the hub)."""
    import shutil

    import huggingface_hub.constants

    from acestep_dist.errors import ModelLoadError

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--ACE-Step--ACE-Step-v1-3.5B"
    shutil.copytree(v1_model, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    description = FAMILY.describe("ACE-Step/ACE-Step-v1-3.5B")
    assert description.source == str((repo / "snapshots" / revision).resolve())
    assert description.fingerprint == FAMILY.describe(str(v1_model)).fingerprint
    model = FAMILY.load(description, "train")
    assert model.operations.components.transformer.config.num_layers == 2
    with pytest.raises(ModelLoadError, match="ACE-Step/ACE-Step-v1-other"):
        FAMILY.describe("ACE-Step/ACE-Step-v1-other")  # not in the cache, hub unreachable: named
