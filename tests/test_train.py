"""`acedist train` on CPU (gloo) with the tiny model, from shards made by `acedist prep`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from acestep_dist import faults
import torch

from acestep_dist.audio import probe_audio
from acestep_dist.config import TrainConfig
from acestep_dist.errors import UserError
from acestep_dist.families.ace_step_15 import AceStep15
from acestep_dist.families.ace_step_15.lora_formats import read_lora
from acestep_dist.train.data import EpochPlan, SampleReader, open_training_data
from acestep_dist.families.ace_step_15.training import build_trainable
from pipelines.train import run_train

from conftest import TRAIN_COMMON as COMMON  # the reference_run fixture's settings
from conftest import timestep_histograms
from acestep_dist.families import get as get_family

SCHEMA = get_family("ace-step-1.5").schema

ROOT = Path(__file__).resolve().parents[1]



def _config(**overrides) -> TrainConfig:
    return TrainConfig(**{**COMMON, **overrides})


def _lora(run: Path) -> dict[str, torch.Tensor]:
    return read_lora(run / "final" / "lora.safetensors").state


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _eval_loss(model: Path, data: Path, init_lora: str | None) -> float:
    """Deterministic loss over all samples (fixed draws per sample), with or without the trained LoRA."""
    family = AceStep15.load(str(model), ("transformer", "condition_encoder", "text_encoder", "tokenizer"))
    trainable = build_trainable(family, _config(init_lora=init_lora))
    trainable.module.eval()
    refs = open_training_data(str(data)).refs
    reader, plan = SampleReader(refs, SCHEMA), EpochPlan(refs, 0, 1, 1, 1)
    losses = []
    with torch.no_grad():
        for position in range(plan.epoch_size):
            item = plan.micro_batch_items(position, 0, 0)[0]
            batch = family.collate([reader.read(item)])
            losses.append(trainable.module(batch, [torch.Generator().manual_seed(position)])[0])
    return float(torch.stack(losses).mean())


def test_training_lowers_the_loss_and_renders_validation_audio(reference_run, train_shards, prep_model):
    before = _eval_loss(prep_model, train_shards, None)
    after = _eval_loss(prep_model, train_shards, str(reference_run / "final" / "lora.safetensors"))
    assert after < 0.9 * before, (before, after)
    state = json.loads((reference_run / "final" / "acedist_state.json").read_text())
    assert state["step"] == 10 and state["variant"] == "turbo"
    assert sorted(p.name for p in (reference_run / "samples").iterdir()) == ["step-10.wav", "step-5.wav"]
    for wav in (reference_run / "samples").iterdir():
        info = probe_audio(wav)
        assert info.sample_rate == 48000 and abs(info.duration - 2.0) < 0.05
    assert list((reference_run / "tb").glob("events.out.tfevents.*"))
    # the recipe the run drew from, in the state and as a TensorBoard histogram per log window
    assert state["recipe"] == {"timestep_sampler": "discrete-turbo", "cfg_dropout": 0.0}
    histograms = timestep_histograms(reference_run)
    assert sorted(histograms) == [5, 10]
    for count, low, high, _ in histograms.values():
        assert count == 10 and 0.3 - 1e-6 <= low <= high <= 1.0  # 5 steps x batch 2, from the turbo table
    assert len([p for p in reference_run.glob("checkpoint_*") if p.is_dir()]) == 2


def test_two_workers_give_the_weights_of_one_worker(reference_run, tmp_path, train_shards, prep_model):
    # Under ZeRO-3. Two workers of batch 1 under ZeRO-2 (reference_run's stage) give its weights and
    # timestep histograms in test_train_cluster.py (one worker on each of two nodes); a ZeRO-2 run of
    # two workers with one replaced midway ends as uninterrupted in test_train_adapters.py (LoKr).
    run = tmp_path / "zero3"
    # also reads through DataLoader worker processes: the same batches either way
    run_train(_config(train_batch_size=1, zero_stage=3), str(train_shards), str(prep_model), str(run),
              workers=2, loader_workers=1, log=lambda _: None)
    assert _max_diff(_lora(run), _lora(reference_run)) <= 1e-5
    # the histogram gathers both workers' timesteps: keyed draws, so the same ones as one worker
    assert timestep_histograms(run) == timestep_histograms(reference_run)


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def test_killed_run_resumes_exactly(reference_run, tmp_path, train_shards, prep_model):
    run = tmp_path / "killed"
    overrides = [f"{k}={v}" for k, v in {**COMMON, "train_batch_size": 2, "zero_stage": 2}.items()]
    process = subprocess.Popen(
        [sys.executable, "-m", "acestep_dist.cli", "train", "--data", str(train_shards), "--model", str(prep_model),
         "--output", str(run), "--workers", "1", *overrides],
        env=_env(**{faults.VARIABLE: faults.spec("train.after_step", step=5, rank=0)}), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(run.glob("checkpoint_*/acedist_state.json")):
            assert process.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.2)
        time.sleep(3)  # the stalled worker has reported the checkpoint; Ray records it
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert not (run / "final").exists()

    with pytest.raises(UserError, match="already holds a run"):
        run_train(_config(train_batch_size=2), str(train_shards), str(prep_model), str(run), workers=1)
    lines = []
    result = run_train(_config(train_batch_size=2, zero_stage=2), str(train_shards), str(prep_model), str(run),
                       workers=1, resume=True, log=lines.append)
    assert result.steps == 10
    assert json.loads((run / "final" / "acedist_state.json").read_text())["started_at_step"] == 5
    assert _max_diff(_lora(run), _lora(reference_run)) <= 1e-6
    # ZeRO's optimizer partitions belong to the worker count that wrote them
    with pytest.raises(UserError, match="resume with the same number of workers"):
        run_train(_config(train_batch_size=1, zero_stage=2), str(train_shards), str(prep_model), str(run),
                  workers=2, resume=True, log=lambda _: None)


def test_a_batch_of_four_lengths_has_the_mean_loss_of_its_samples(train_shards, prep_model):
    family = AceStep15.load(str(prep_model), ("transformer", "condition_encoder", "text_encoder", "tokenizer"))
    trainable = build_trainable(family, _config(init_lora=None))
    with torch.no_grad():  # a non-zero adapter, so the LoRA path counts
        for name, p in family.components.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    refs = open_training_data(str(train_shards)).refs
    reader, plan = SampleReader(refs, SCHEMA), EpochPlan(refs, 0, 1, 1, 1)
    samples = []
    for position, seconds in enumerate((2, 3.5, 5, 6)):
        sample = reader.read(plan.micro_batch_items(position, 0, 0)[0])
        frames = int(seconds * 25)
        sample["latent_mean"], sample["latent_std"] = sample["latent_mean"][:frames], sample["latent_std"][:frames]
        samples.append(sample)
    assert len({s["text_states"].shape[0] for s in samples}) > 1 or len({s["lyric_ids"].shape[0] for s in samples}) > 1
    generators = lambda: [torch.Generator().manual_seed(10 + i) for i in range(4)]  # noqa: E731
    trainable.module.eval()
    with torch.no_grad():
        batch_loss, per_sample, _ = trainable.module(family.collate(samples), generators())
        alone = [trainable.module(family.collate([s]), [g])[0] for s, g in zip(samples, generators())]
    assert abs(float(batch_loss) - float(torch.stack(alone).mean())) <= 1e-5
    assert torch.allclose(per_sample, torch.stack(alone), atol=1e-5)


def test_bad_inputs_fail_clearly(tmp_path, train_shards, prep_model):
    with pytest.raises(UserError, match="not an `acedist prep` output"):
        run_train(_config(), str(tmp_path), str(prep_model), str(tmp_path / "run"))
    with pytest.raises(UserError, match="fewer than one global batch"):
        run_train(_config(train_batch_size=8), str(train_shards), str(prep_model), str(tmp_path / "run"), workers=2)
    with pytest.raises(UserError, match="holds no checkpoint"):
        run_train(_config(), str(train_shards), str(prep_model), str(tmp_path / "new"), resume=True)


def test_full_fine_tune_with_the_lyric_encoder_under_zero3(full_run, prep_model):
    from diffusers import AceStepTransformer1DModel
    from safetensors.torch import load_file

    run = full_run
    trained = AceStepTransformer1DModel.from_pretrained(run / "final" / "transformer")
    base = AceStepTransformer1DModel.from_pretrained(prep_model / "transformer")
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) > len(trained.state_dict()) // 2
    lyric = load_file(run / "final" / "lyric_encoder.safetensors")
    family = AceStep15.load(str(prep_model), ("condition_encoder",))
    original = family.components.condition_encoder.lyric_encoder.state_dict()
    assert lyric.keys() == original.keys()
    assert any(not torch.equal(lyric[k], original[k]) for k in lyric)
