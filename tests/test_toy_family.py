"""The family boundary holds: a toy family that lives only under tests/ (``toy_family.py``: latent
``[8, 16, T]``, no posterior std, its own text-states width, no lyrics) is registered through
``ACEDIST_FAMILIES`` and runs prep -> inspect -> train (2 workers, ZeRO-2) -> export -> generate
through the real command line; the library itself never names it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
RATE = 16000  # the toy checkpoint's sample rate
PROMPT_MAX_TOKENS = 24  # the toy's own prep key, given on the command line
# (name, seconds, caption): four lengths, so batches pad frames; one caption longer than the token limit
CLIPS = [("low", 1.3, "low drone"), ("mid", 1.7, "a mid hum with a slow pulse, longer than the token limit"),
         ("high", 2.1, "high whistle"), ("two", 2.5, "two tones")]
TRAIN = ["--workers", "2", "zero_stage=2", "max_train_steps=2", "checkpointing_steps=2", "train_batch_size=2",
         "gradient_accumulation_steps=1", "lr_warmup_steps=0", "learning_rate=0.01", "log_interval=1",
         "lora_preset=mlp", "lora_rank=4", "lora_alpha=8", "velocity_loss=huber", "validation_step_interval=2",
         "validation_audio_duration=1", "validation_prompt=calm hum"]


def toy_env(**changes: str | None) -> dict[str, str]:
    """The environment of every command: the toy family registered, tests/ importable (also by Ray's
    workers, which inherit it), and no Ray cluster to join but the command's own."""
    env = {**os.environ, "ACEDIST_FAMILIES": "toy_family:FAMILY",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def acedist(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # -v: without it every command imports diffusers and transformers only to quiet them (~5 s of
    # CPU each); the toy family uses neither
    return subprocess.run([sys.executable, "-m", "acestep_dist.cli", "-v", *args], cwd=cwd, env=env or toy_env(),
                          capture_output=True, text=True, timeout=600)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (f"acedist {' '.join(result.args[4:])} exited {result.returncode}\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def refused(result: subprocess.CompletedProcess) -> str:
    """The one ``Error:`` line of a command that must fail as a user error."""
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert lines, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def read_wave(path: Path) -> np.ndarray:
    from acestep_dist.audio import decode_window, probe_audio

    assert probe_audio(str(path)).sample_rate == RATE
    return decode_window(str(path), 0.0, None, RATE).wave


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """The whole chain on the toy family, each stage a real `acedist` command in a folder of its own."""
    from acestep_dist.audio import write_audio

    work = tmp_path_factory.mktemp("toy")
    clips = work / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    for index, (name, seconds, caption) in enumerate(CLIPS):
        t = np.arange(int(seconds * 22050)) / 22050  # decoded at the toy's 16 kHz by prep
        tone = 0.3 * np.sin(2 * np.pi * 110 * (index + 1) * t) + 0.01 * rng.standard_normal(t.size)
        write_audio(clips / f"{name}.wav", np.stack([tone, 0.5 * tone]), 22050)
        (clips / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    found: dict = {"work": work, "clips": clips, "model": work / "M", "shards": work / "S", "run": work / "R",
                   "export": work / "E", "wav": work / "x.wav", "seconds": {}, "out": {}}

    def stage(name: str, *args: str) -> None:
        started = time.perf_counter()
        found["out"][name] = ok(acedist(work, *args)).stdout
        found["seconds"][name] = round(time.perf_counter() - started, 1)

    stage("list", "model", "list")
    stage("tiny", "model", "tiny", "--family", "toy-mlp", "--variant", "small", "--out", "M")
    stage("prep", "prep", "clips", "--model", "M", "--out", "S", f"prompt_max_tokens={PROMPT_MAX_TOKENS}")
    stage("inspect", "inspect", "S")
    stage("train", "train", "--data", "S", "--model", "M", "--output", "R", *TRAIN)
    stage("export", "export", "R", "--out", "E", "--format", "all", "--name", "toy-lora")
    stage("generate", "generate", "--model", "M", "--lora", "E/safetensors/toy-lora.safetensors", "--prompt",
          "calm hum", "--duration", "1", "--steps", "4", "--seed", "5", "--out", "x.wav")
    print("toy chain stage seconds:", found["seconds"])
    return found


@pytest.mark.slow
def test_the_command_line_lists_and_builds_the_registered_family(chain):
    listing = chain["out"]["list"]
    assert re.search(r"^toy-mlp\n  variants +small\n  lora presets +mlp, mlp-in\n  adapters +lora\n  lora formats +safetensors\n"
                     r"  full formats +safetensors\n  tasks +text2music$", listing, re.M), listing
    assert "ace-step-1.5" in listing  # the built-in family is still there
    config = json.loads((chain["model"] / "toy_family.json").read_text())
    assert config["family"] == "toy-mlp" and config["variant"] == "small"
    assert (chain["model"] / "model.safetensors").is_file()


@pytest.mark.slow
def test_prep_writes_the_toy_schema_encoded_by_the_toy_encoders(chain):
    from acestep_dist.audio import decode_window
    from acestep_dist.shards import ShardMarker, iter_samples

    import toy_family

    shards = chain["shards"]
    report = json.loads((shards / "prep_report.json").read_text())
    assert (report["family"], report["schema_version"], report["samples"]) == ("toy-mlp", 1, len(CLIPS))
    assert report["config"]["prompt_max_tokens"] == PROMPT_MAX_TOKENS
    state = json.loads((shards / "prep_state.json").read_text())
    assert (state["family"], state["schema_version"]) == ("toy-mlp", 1)
    markers = [ShardMarker.from_json(p.read_text()) for p in sorted(shards.glob("shard-*.json"))]
    assert markers and {(m.family, m.schema_version) for m in markers} == {("toy-mlp", 1)}
    model = toy_family.FAMILY.load(toy_family.FAMILY.describe(str(chain["model"])), "encode-audio")
    samples = {}
    for tar in sorted(shards.glob("shard-*.tar")):
        with open(tar, "rb") as f:
            samples.update({sample["key"]: sample for sample in iter_samples(f)})
    assert sorted(samples) == sorted(name for name, *_ in CLIPS)
    for name, seconds, caption in CLIPS:
        sample = samples[name]
        meta, latent, states = sample["meta"], sample["latent"], sample["prompt_states"]
        assert set(sample) == {"key", "meta", "latent", "prompt_states"}  # no std, no lyrics
        assert (meta["family"], meta["schema_version"]) == ("toy-mlp", 1)
        frames = int(seconds * RATE) // 320
        assert latent.dtype == torch.float32 and list(latent.shape) == [8, 16, frames] == [8, 16, meta["frames"]]
        tokens = min(len(caption.encode()) + 1, PROMPT_MAX_TOKENS)
        assert states.dtype == torch.bfloat16 and list(states.shape) == [tokens, 12] == [meta["prompt_tokens"], 12]
        # the toy's own encoder made the latent: encoding the clip here gives the same tensor
        wave = torch.from_numpy(decode_window(str(chain["clips"] / f"{name}.wav"), 0.0, None, RATE).wave.copy())
        torch.testing.assert_close(latent, model.encode_audio(wave)["latent"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inspect_verifies_the_toy_shards(chain):
    report = json.loads((chain["shards"] / "inspect_report.json").read_text())
    assert report["problems"] == {} and report["samples"] == len(CLIPS)
    assert report["families"] == {"toy-mlp v1": 1}
    assert report["prompt_tokens"]["max"] == PROMPT_MAX_TOKENS  # the toy's own length, summarised
    assert "all shards verified" in chain["out"]["inspect"]


@pytest.mark.slow
def test_two_workers_train_a_toy_lora_under_zero2(chain):
    from safetensors.torch import load_file

    final = chain["run"] / "final"
    state = json.loads((final / "acedist_state.json").read_text())
    assert (state["family"], state["variant"], state["model_type"]) == ("toy-mlp", "small", "lora")
    assert state["schema_version"] == 1
    assert (state["step"], state["world_size"], state["config"]["zero_stage"]) == (2, 2, 2)
    assert state["weights"] == ["lora.safetensors"]
    # the toy's own train key reached the workers: the trainable recorded it
    assert state["family_options"] == {"velocity_loss": "huber"} and state["velocity_loss"] == "huber"
    lora = load_file(str(final / "lora.safetensors"))
    assert sorted(lora) == ["fc1.lora_A.weight", "fc1.lora_B.weight", "fc2.lora_A.weight", "fc2.lora_B.weight"]
    assert lora["fc1.lora_A.weight"].shape[0] == 4
    assert all(lora[f"{layer}.lora_B.weight"].abs().max() > 0 for layer in ("fc1", "fc2"))  # B starts at 0: it trained
    assert re.search(r"step 2/2  loss \d+\.\d+", chain["out"]["train"]), chain["out"]["train"]
    validation = read_wave(chain["run"] / "samples" / "step-2.wav")  # rendered by the trainable
    assert validation.shape == (2, RATE) and np.abs(validation).max() > 0


@pytest.mark.slow
def test_export_and_generate_use_the_toy_lora(chain):
    import toy_family
    from acestep_dist.families import RenderRequest
    from acestep_dist.records import Record

    exported = chain["export"] / "safetensors" / "toy-lora.safetensors"
    readme = (chain["export"] / "README.txt").read_text()
    assert "toy-mlp small" in readme and "safetensors/toy-lora.safetensors" in readme
    info = toy_family.FAMILY.lora_info(str(exported))
    assert info["rank"] == 4 and info["alpha"] == 8.0
    assert info["provenance"] == {"family": "toy-mlp", "variant": "small", "model": str(chain["model"].resolve()),
                                  "step": 2}
    audio = read_wave(chain["wav"])
    assert audio.shape == (2, RATE) and np.isfinite(audio).all() and np.abs(audio).max() > 0
    # the file is the toy's render with the LoRA merged; without it the render differs
    family = toy_family.FAMILY
    description = family.describe(str(chain["model"]))
    request = RenderRequest(Record("x", caption="calm hum"), 1.0, steps=4, seed=5)
    with_lora = family.load(description, "generate").generate(request, lora=str(exported), log=lambda _: None)
    plain = family.load(description, "generate").generate(request)
    np.testing.assert_allclose(audio, with_lora[:, :RATE].numpy(), atol=1e-5)
    assert np.abs(plain[:, :RATE].numpy() - audio).max() > 1e-3


def test_the_library_does_not_know_the_toy_family():
    hits = [f"{path.relative_to(ROOT)}:{number}" for folder in ("acestep_dist", "pipelines")
            for path in sorted((ROOT / folder).rglob("*")) if path.is_file() and "__pycache__" not in path.parts
            for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1) if "toy" in line.lower()]
    assert hits == []


@pytest.mark.slow
def test_training_toy_shards_with_an_ace_step_model_names_both_families(chain, prep_model):
    line = refused(acedist(chain["work"], "train", "--data", "S", "--model", str(prep_model), "--output", "R2",
                           "max_train_steps=1"))
    assert "toy-mlp" in line and "ace-step-1.5" in line and not (chain["work"] / "R2").exists()


@pytest.mark.slow
def test_an_adapter_kind_the_family_does_not_train_is_refused_before_training(chain):
    line = refused(acedist(chain["work"], "train", "--data", "S", "--model", "M", "--output", "R3", "adapter=dora"))
    assert "adapter 'dora'" in line and "trains lora adapters" in line and not (chain["work"] / "R3").exists()


@pytest.mark.slow
def test_one_prep_output_holds_one_family(chain, prep_model):
    before = {p.name: p.read_bytes() for p in chain["shards"].iterdir() if p.is_file()}
    line = refused(acedist(chain["work"], "prep", "clips", "--model", str(prep_model), "--out", "S"))
    assert "toy-mlp" in line and "one output holds one family" in line
    assert {p.name: p.read_bytes() for p in chain["shards"].iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_family_keys_are_validated_by_the_family_and_registration_comes_from_the_environment(chain):
    # an ACE-Step 1.5 key is a known key, but not the toy's
    line = refused(acedist(chain["work"], "prep", "clips", "--model", "M", "--out", "S3", "text_max_tokens=8"))
    assert "text_max_tokens" in line and "toy-mlp" in line and "prompt_max_tokens" in line
    # without the variable no family claims the toy checkpoint
    line = refused(acedist(chain["work"], "model", "info", "M", env=toy_env(ACEDIST_FAMILIES=None)))
    assert "no model family recognises it" in line and "toy-mlp" not in line
