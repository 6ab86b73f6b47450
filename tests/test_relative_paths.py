"""Every path option of every command, given relative to a working directory that is neither the
repository nor where Ray runs its workers (Ray Train workers run in the run's folder inside Ray's
session directory; the shared test Ray's other workers in the directory pytest started in): the
driver resolves them all before anything reaches Ray.

The commands run in this process (click's test runner) on the session's Ray, from the test's own
working directory: the same command line and driver code as `acedist ...`, without a Python
start-up and an embedded Ray per command."""

from __future__ import annotations

import json
import os
import traceback

import pytest
import torch
from click.testing import CliRunner

from acestep_dist.audio import probe_audio
from acestep_dist.cli import cli
from acestep_dist.config import TrainConfig
from acestep_dist.demo import CLIPS, synthesize_clips
from acestep_dist.families.ace_step_15 import AceStep15
from acestep_dist.families.ace_step_15.lora_formats import read_lora, write_diffusers
from acestep_dist.families.ace_step_15.tiny import write_tiny_checkpoint
from acestep_dist.families.ace_step_15.training import build_trainable

from test_convert import save_upstream

LYRICS = "[verse]\nfrom a file, relative to where you stand"
# what the command line sets for the model libraries (`_quiet_libraries`): restored after each command
QUIET_ENV = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")


def _acedist(*args: str) -> None:
    """`acedist ARGS` in the current working directory; fails the test unless it exits with status 0."""
    result = CliRunner().invoke(cli, list(args), prog_name="acedist",
                                env={name: os.environ.get(name) for name in QUIET_ENV})
    error = result.exception if not isinstance(result.exception, SystemExit) else None
    assert result.exit_code == 0 and error is None, (
        f"acedist {' '.join(args)} -> {result.exit_code}\n{result.output[-3000:]}\n"
        + ("".join(traceback.format_exception(error))[-3000:] if error else ""))


@pytest.mark.slow
def test_every_path_option_may_be_relative_to_the_working_directory(tmp_path, monkeypatch, ray_session):
    # `work/model` reads like a hub id (org/name): the folder of that name must win
    work = tmp_path / "work"
    write_tiny_checkpoint(work / "model", variant="turbo", latent_dim=4)
    synthesize_clips(work / "audio", seconds=3.0)
    names = [name for name, *_ in CLIPS]
    save_upstream(work / "upstream", [(name, f"{name}.flac", ["demo"], "", {}) for name in names], repeat=2)
    (work / "lyrics.txt").write_text(LYRICS, encoding="utf-8")
    (work / "prep.yaml").write_text("max_duration: 2\n")
    (work / "train.yaml").write_text("max_train_steps: 2\ncheckpointing_steps: 2\ngradient_accumulation_steps: 1\n"
                                     "lr_warmup_steps: 0\nvalidation_step_interval: 2\nvalidation_audio_duration: 1\n"
                                     "validation_prompt: demo\n")
    config = TrainConfig(lora_rank=4, lora_alpha=4)
    family = AceStep15.load(str(work / "model"), ("transformer", "condition_encoder", "text_encoder", "tokenizer"))
    targets = family.lora_targets(config.lora_preset)
    init = build_trainable(family, config).lora_weights()
    write_diffusers(init, work / "init")

    monkeypatch.chdir(tmp_path)

    _acedist("convert", "work/upstream", "--out", "work/songs.jsonl", "--audio-root", "work/audio")
    _acedist("prep", "work/songs.jsonl", "--model", "work/model", "--out", "work/shards",
             "--config", "work/prep.yaml")
    _acedist("inspect", "work/shards")
    _acedist("train", "--config", "work/train.yaml", "--data", "work/shards", "--model", "work/model",
             "--output", "work/run", "--workers", "1", "lora_rank=4", "lora_alpha=4",
             "init_lora=work/init/pytorch_lora_weights.safetensors", "validation_lyrics=work/lyrics.txt")
    state = json.loads((work / "run" / "final" / "acedist_state.json").read_text())
    assert state["step"] == 2 and state["model"] == str(work / "model") and state["data"] == str(work / "shards")
    assert state["config"]["init_lora"] == str(work / "init" / "pytorch_lora_weights.safetensors")
    assert state["config"]["validation_lyrics"] == LYRICS  # read on the driver
    assert (work / "run" / "samples" / "step-2.wav").is_file()
    trained = read_lora(work / "run" / "final" / "lora.safetensors").state
    started = read_lora(work / "init" / "pytorch_lora_weights.safetensors").state
    assert trained.keys() == started.keys() and any(not torch.equal(trained[k], started[k]) for k in trained)

    _acedist("annotate", "work/audio", "--out", "work/annotations/songs.csv")
    annotated = (work / "annotations" / "songs.csv").read_text(encoding="utf-8")
    assert f"{work / 'audio' / names[0]}.flac" in annotated  # the driver resolved the folder

    _acedist("export", "work/run", "--out", "work/export")
    _acedist("generate", "--model", "work/model", "--lora", "work/export/peft", "--prompt", "demo",
             "--lyrics", "work/lyrics.txt", "--src-audio", f"work/audio/{names[0]}.flac", "--repaint", "0.5", "1.0",
             "--duration", "3", "--out", "work/out.wav")
    assert abs(probe_audio(work / "out.wav").duration - 3.0) < 0.05
