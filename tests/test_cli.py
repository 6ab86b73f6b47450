"""The `acedist` command line, run as users run it (a subprocess of the installed entry point)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import AceStepPipeline

from acestep_dist import __version__


def acedist(*args, check=True):
    exe = shutil.which("acedist") or None
    command = [exe] if exe else [sys.executable, "-m", "acestep_dist.cli"]
    result = subprocess.run(command + list(args), capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"acedist {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def test_help_and_version():
    assert "Usage: acedist" in acedist("--help").stdout  # the installed entry point
    assert __version__ in acedist("--version").stdout
    from click.testing import CliRunner

    from acestep_dist.cli import cli

    for command in (["model"], ["model", "tiny"], ["model", "info"]):  # the same commands, in this process
        result = CliRunner().invoke(cli, [*command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output


def test_model_tiny_writes_a_checkpoint_diffusers_loads(tmp_path):
    out = tmp_path / "tiny-base"
    result = acedist("model", "tiny", "--out", str(out), "--variant", "base")
    assert "base" in result.stdout
    assert (out / "model_index.json").is_file()
    pipe = AceStepPipeline.from_pretrained(out)
    assert not pipe.is_turbo
    special = pipe.tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert len(set(special)) == 3 and pipe.tokenizer.unk_token_id not in special
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    audio = pipe(prompt="calm piano", lyrics="[verse]\nla", audio_duration=1.0, num_inference_steps=2,
                 guidance_scale=3.0, generator=torch.Generator("cpu").manual_seed(0)).audios
    assert audio.shape == (1, 2, 48000) and torch.isfinite(audio).all()

    info = json.loads(acedist("model", "info", str(out)).stdout)
    assert info["variant"] == "base" and info["layout"] == "diffusers" and info["cfg_dropout"] == 0.15

    again = acedist("model", "tiny", "--out", str(out), check=False)
    assert again.returncode == 1 and "not empty" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["model", "info", "/no/such/model"], "no such folder"),
    (["model", "tiny", "--out", "x", "--variant", "huge"], "Invalid value for '--variant'"),
])
def test_user_errors_are_one_line_without_a_traceback(args, message):
    result = acedist(*args, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_demo_never_deletes_a_folder_it_did_not_make(tmp_path):
    from acestep_dist.demo import run

    mine = tmp_path / "songs"
    mine.mkdir()
    (mine / "keep.txt").write_text("a user's file")
    with pytest.raises(SystemExit, match="not a demo folder"):
        run(mine)
    assert (mine / "keep.txt").read_text() == "a user's file"
