"""``acedist train --dry-run``: every driver check, the run's parameter counts (exact: the model is
built on the meta device from its configs) and one worker's estimated memory, which follows the
settings it depends on; nothing is trained, read beyond configs and one sample, or written. (Its
accuracy against a measured step at the real 2B sizes is a benchmark: bench/README.md.)"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from acestep_dist.config import TrainConfig
from acestep_dist.families import get
from conftest import TRAIN_COMMON

torch.set_num_threads(1)

FAMILY = get("ace-step-1.5")


def _counts(model, config: TrainConfig) -> dict[str, tuple[int, int]]:
    """Parameters and trained parameters per part of the trainable, built with real weights."""
    loaded = FAMILY.load(FAMILY.describe(str(model)), "train")
    module = loaded.trainable(config, FAMILY.options(config)).module
    return {name: (sum(p.numel() for p in child.parameters()),
                   sum(p.numel() for p in child.parameters() if p.requires_grad))
            for name, child in module.named_children() if list(child.parameters())}


@pytest.mark.slow
def test_the_command_prints_the_runs_exact_counts_and_writes_nothing(train_shards, prep_model, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "acestep_dist.cli", "train", "--data", str(train_shards), "--model",
               str(prep_model), "--output", str(run), "--workers", "2", "--dry-run", "lora_rank=4", "zero_stage=3",
               "gradient_checkpointing=true"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = result.stdout
    assert "dry run: ACE-Step 1.5 turbo, lora r4 (attention), 2 worker(s) on CPU, ZeRO-3" in report
    expected = _counts(prep_model, TrainConfig(lora_rank=4, gradient_checkpointing=True))
    for name, (total, trained) in expected.items():
        assert re.search(rf"^\s+{name}\s+{total:,}\s+{trained:,}$", report, re.MULTILINE), (name, report)
    assert "frozen weights (split over workers)" in report and "activations:" in report
    assert "MB per sample-second (batch 1 x 6.0 s, the data's longest sample)" in report
    assert not run.exists()  # nothing written, nothing trained


def _estimate(train_shards, prep_model, tmp_path, workers: int = 1, **settings):
    from pipelines.train import run_train

    config = TrainConfig(**{**TRAIN_COMMON, "lora_rank": 4, **settings})
    result = run_train(config, str(train_shards), str(prep_model), str(tmp_path / "run"), workers=workers,
                       dry_run=True, log=lambda _: None)
    assert result.steps == 0 and not (tmp_path / "run").exists()
    return dict(result.estimate.gpu), result.estimate


def test_the_estimate_follows_the_settings(train_shards, prep_model, tmp_path):
    plain, estimate = _estimate(train_shards, prep_model, tmp_path, train_batch_size=2)
    trained = sum(t for _, _, t in estimate.parameters)
    frozen = sum(total - t for _, total, t in estimate.parameters)
    # on CPU the model is float32: the frozen weights are 4 bytes each; AdamW keeps 8 per trained one
    assert plain["frozen weights"] == 4 * frozen
    assert plain["optimizer states (adamw)"] == 8 * trained
    assert estimate.peak >= estimate.start_up and estimate.activations > 0

    checkpointed, _ = _estimate(train_shards, prep_model, tmp_path, train_batch_size=2, gradient_checkpointing=True)
    single, _ = _estimate(train_shards, prep_model, tmp_path, train_batch_size=1)
    key = "activations and temporaries of a step"
    # (on 6 s clips the tiny DiT's activations are not the peak: checkpointing is measured below)
    assert checkpointed[key] <= plain[key] and single[key] < plain[key]

    quantized, _ = _estimate(train_shards, prep_model, tmp_path, train_batch_size=2, base_model_precision="int8-torchao")
    # the frozen linear weights in one byte (plus a few per row) instead of four; the rest stays
    assert quantized["frozen weights, int8-torchao"] + quantized["frozen weights"] < 0.5 * plain["frozen weights"]

    split, _ = _estimate(train_shards, prep_model, tmp_path, workers=2, zero_stage=3)
    assert split["frozen weights (split over workers)"] == plain["frozen weights"] / 2
    assert split["optimizer states (adamw, split)"] == plain["optimizer states (adamw)"] / 2

    validating, with_validation = _estimate(train_shards, prep_model, tmp_path, train_batch_size=2,
                                            validation_step_interval=5)
    parts = FAMILY.load(FAMILY.describe(str(prep_model)), "validate").parts()
    # rank 0 also holds the VAE and the text encoder, but for the token table the trained module has
    text_encoder = parts["text_encoder"]
    held = sum(t.numel() * t.element_size() for part in (parts["vae"], text_encoder)
               for t in (*part.parameters(), *part.buffers())) - 4 * text_encoder.embed_tokens.weight.numel()
    assert validating["validation parts, rank 0 only (vae, text_encoder)"] == held
    assert with_validation.start_up == estimate.start_up + held

    _, offloaded = _estimate(train_shards, prep_model, tmp_path, offload_optimizer=True)
    assert dict(offloaded.host)["optimizer states (adamw)"] == 8 * trained
    assert not [name for name, _ in offloaded.gpu if name.startswith("optimizer")]


def test_activations_grow_with_the_clip_and_checkpointing_cuts_them(prep_model):
    """One fake step of the family's loss: longer clips keep more, and gradient checkpointing keeps
    only the blocks' inputs (the tiny DiT's share dominates from about a minute of audio)."""
    from safetensors.torch import load as load_safetensors

    from acestep_dist.flow import per_sample_generators
    from acestep_dist.records import Record
    from acestep_dist.train.memory_estimate import step_activation_bytes

    description = FAMILY.describe(str(prep_model))
    record = Record(key="a", caption="calm piano", lyrics="[verse]\nla la la", duration=60.0)
    text = FAMILY.load(description, "encode-text").encode_text([record], FAMILY.prep_options())[0]

    def activations(seconds: float, checkpointing: bool) -> int:
        frames = int(seconds * description.frames_per_second)
        mean = torch.zeros(frames, description.dimensions["latent_dim"])
        sample = FAMILY.schema.for_caption(load_safetensors(FAMILY.schema.pack(
            {"latent_mean": mean, "latent_std": torch.ones_like(mean), **text})), 0)
        config = TrainConfig(lora_rank=4, gradient_checkpointing=checkpointing)
        loaded = FAMILY.load(description, "train", device="meta")
        module = loaded.trainable(config, FAMILY.options(config)).module
        assert all(p.is_meta for p in module.parameters())  # built without weights
        return step_activation_bytes(module, loaded.collate([sample]), per_sample_generators([0]), torch.float32)

    short, long, checkpointed = activations(10, False), activations(60, False), activations(60, True)
    assert short < long and checkpointed < 0.8 * long, (short, long, checkpointed)


def test_a_failed_fake_step_is_said_and_the_rest_still_printed(train_shards, prep_model, tmp_path, monkeypatch):
    from acestep_dist.train import memory_estimate

    def fails(*args, **kwargs):
        raise RuntimeError("an op fake tensors cannot run")

    monkeypatch.setattr(memory_estimate, "step_activation_bytes", fails)
    lines: list[str] = []
    from pipelines.train import run_train

    result = run_train(TrainConfig(**{**TRAIN_COMMON, "lora_rank": 4}), str(train_shards), str(prep_model),
                       str(tmp_path / "run"), dry_run=True, log=lines.append)
    assert result.estimate.activations == 0 and "frozen weights" in dict(result.estimate.gpu)
    assert "activations NOT estimated (the fake step failed: RuntimeError: an op fake tensors cannot run)" in lines[-1]
