"""`acedist generate` and `acedist export` refuse what they cannot use, naming it: a lyrics file that
is not there, a file that is not a LoRA, a corrupt or incomplete run, a duration the model cannot
render. And PEFT's adapter file works like its folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from acestep_dist.audio import read_audio_simple
from acestep_dist.cli import cli
from acestep_dist.config import TrainConfig
from acestep_dist.errors import UserError
from acestep_dist.export import export
from acestep_dist.families.ace_step_15 import AceStep15
from acestep_dist.families.adapters import AdapterSpec, AdapterWeights
from acestep_dist.families.ace_step_15.lora_formats import read_lora, write_diffusers, write_peft
from acestep_dist.paths import existing_file_text
from acestep_dist.families.ace_step_15.training import LORA_FILE, TRANSFORMER_DIR
from acestep_dist.train.layout import FINAL_DIR, STATE_FILE


@pytest.fixture(scope="module")
def lora(tiny_turbo) -> AdapterWeights:
    """A LoRA on the tiny DiT's attention, as PEFT builds it, with random (non-zero) matrices: no training."""
    from peft import LoraConfig, get_peft_model_state_dict

    family = AceStep15.load(str(tiny_turbo), ("transformer",))
    transformer, targets = family.components.transformer, family.lora_targets("attention")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8.0, target_modules=list(targets), init_lora_weights=True))
    generator = torch.Generator().manual_seed(5)
    state = {key: 0.2 * torch.randn(value.shape, generator=generator)
             for key, value in get_peft_model_state_dict(transformer).items()}
    return AdapterWeights(AdapterSpec("lora", 4, 8.0), state, targets)


@pytest.fixture(scope="module")
def lora_files(lora, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {"diffusers": write_diffusers(lora, root / "diffusers"), "peft": write_peft(lora, root / "peft")}


def _acedist(*args: str):
    return CliRunner().invoke(cli, list(args))


def _one_error_line(result) -> str:
    """The message of a user error: exit 1 and one `Error: ...` line, no traceback."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # click's exit, not a crash
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


# --------------------------------------------------------------- item 8: lyrics that name a missing file
@pytest.mark.parametrize("value", ["missing.txt", "words/verse one", "song.LRC", "notes.md", "x.lyrics"])
def test_a_lyrics_value_that_looks_like_a_file_must_exist(tiny_turbo, tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.wav"
    line = _one_error_line(_acedist("generate", "--model", str(tiny_turbo), "--prompt", "calm", "--lyrics", value,
                                    "--duration", "1", "--steps", "1", "--out", str(out)))
    assert f"--lyrics file {value} does not exist" in line
    assert not out.exists()


def test_the_lyrics_rule_is_shared_with_trainings_validation_lyrics(tmp_path, monkeypatch):
    from pipelines.train import resolve_config_paths

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="lyrics file lyrics/verse.txt does not exist"):
        resolve_config_paths(TrainConfig(validation_lyrics="lyrics/verse.txt"))
    Path("lyrics").mkdir()
    with pytest.raises(UserError, match="lyrics file lyrics/ is a folder"):
        existing_file_text("lyrics/")
    Path("lyrics/verse.txt").write_text("[verse]\nhello", encoding="utf-8")
    assert resolve_config_paths(TrainConfig(validation_lyrics="lyrics/verse.txt")).validation_lyrics == "[verse]\nhello"
    Path("latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="lyrics file latin1.txt: not readable as UTF-8"):
        existing_file_text("latin1.txt")
    # lyrics proper are kept as given: several lines (even with a slash), or one line that names no file
    for text in ("[verse]\nlove/hate", "la la la", "It was the end. Of the day", "song.txt\n"):
        assert existing_file_text(text) == text
        assert resolve_config_paths(TrainConfig(validation_lyrics=text)).validation_lyrics == text


# --------------------------------------------------------------- item 10: not a LoRA, a corrupt run
def _corruptions(lora_files: dict[str, Path], tiny_turbo: Path, root: Path) -> list[tuple[Path, str]]:
    """(a LoRA argument, what the error must say) for files that are not usable LoRAs."""
    good = lora_files["diffusers"].read_bytes()
    cases = []
    random_bytes = root / "random.safetensors"
    random_bytes.write_bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1),
                                           dtype=torch.uint8).numpy().tobytes())
    cases.append((random_bytes, "not a readable safetensors file"))
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    cases.append((truncated, "not a readable safetensors file"))
    # the tiny model's whole DiT: a valid safetensors file, but no LoRA
    cases.append((next((tiny_turbo / "transformer").glob("*.safetensors")), "not a LoRA of the ACE-Step DiT"))
    full_names = root / "full_names.safetensors"  # diffusers' prefix, but a plain weight
    save_file({"transformer.layers.0.self_attn.to_q.weight": torch.zeros(4, 4)}, full_names)
    cases.append((full_names, "'transformer.layers.0.self_attn.to_q.weight' is not a LoRA matrix"))
    half = root / "half.safetensors"  # lora_A without its lora_B
    tensors = load_file(lora_files["diffusers"])
    save_file({k: v for k, v in tensors.items() if not k.endswith("to_q.lora_B.weight")}, half)
    cases.append((half, "to_q: a LoRA module needs lora_A.weight, lora_B.weight; missing lora_B.weight"))
    empty = root / "empty.safetensors"
    save_file({}, empty)
    cases.append((empty, "holds no tensors"))
    bad_header = root / "bad_header.safetensors"
    save_file(tensors, bad_header, metadata={"lora_adapter_metadata": '{"r": 4, "lora_al'})
    cases.append((bad_header, "lora_adapter_metadata header entry: not valid JSON"))
    bad_config = root / "bad_config"
    shutil.copytree(lora_files["peft"], bad_config)
    (bad_config / "adapter_config.json").write_text('{"r": 4, ')
    cases.append((bad_config, "adapter_config.json: not valid JSON"))
    return cases


def test_a_file_that_is_not_a_usable_lora_is_refused_naming_it(lora_files, tiny_turbo, tmp_path):
    for path, reason in _corruptions(lora_files, tiny_turbo, tmp_path):
        with pytest.raises(UserError) as raised:
            read_lora(path)
        assert str(path) in str(raised.value) and reason in str(raised.value), (path, str(raised.value))
    # on the command line: one line, before the model is even loaded
    out = tmp_path / "out.wav"
    line = _one_error_line(_acedist("generate", "--model", str(tiny_turbo), "--lora", str(tmp_path / "random.safetensors"),
                                    "--prompt", "calm", "--duration", "1", "--steps", "1", "--out", str(out)))
    assert line.startswith(f"Error: LoRA {tmp_path / 'random.safetensors'}: not a readable safetensors file")
    assert not out.exists()


def _lora_run(root: Path, lora_files: dict[str, Path], tiny_turbo: Path) -> Path:
    """A finished LoRA run as train/loop.py leaves it: final/acedist_state.json + final/lora.safetensors."""
    final = root / FINAL_DIR
    final.mkdir(parents=True)
    shutil.copy(lora_files["diffusers"], final / LORA_FILE)
    state = {"step": 10, "total_steps": 10, "model": str(tiny_turbo), "data": str(root / "shards"), "variant": "turbo",
             "model_type": "lora", "config": TrainConfig().model_dump(), "world_size": 1, "started_at_step": 0}
    (final / STATE_FILE).write_text(json.dumps(state, indent=1))
    return root


def test_export_of_a_corrupt_or_incomplete_run_names_the_file(lora, lora_files, tiny_turbo, tmp_path):
    good = _lora_run(tmp_path / "good", lora_files, tiny_turbo)
    export(good, tmp_path / "good-export", "peft", log=lambda _: None)  # the hand-made run is a valid one
    exported = read_lora(tmp_path / "good-export" / "peft")
    assert all(torch.equal(exported.state[k], v) for k, v in lora.state.items())

    def broken(name: str, change) -> Path:
        run = tmp_path / name
        shutil.copytree(good, run)
        change(run / FINAL_DIR)
        return run

    state_file = good / FINAL_DIR / STATE_FILE
    state = json.loads(state_file.read_text())
    cases = [
        (broken("cut-state", lambda f: (f / STATE_FILE).write_text(state_file.read_text()[:40])),
         f"{STATE_FILE} is unreadable"),
        (broken("no-variant", lambda f: (f / STATE_FILE).write_text(json.dumps({k: v for k, v in state.items()
                                                                                if k != "variant"}))),
         f"{STATE_FILE} lacks the field 'variant'"),
        (broken("odd-type", lambda f: (f / STATE_FILE).write_text(json.dumps({**state, "model_type": "qlora"}))),
         "model_type is 'qlora'"),
        (broken("a-list", lambda f: (f / STATE_FILE).write_text("[]")), "holds a JSON list"),
        (broken("cut-lora", lambda f: (f / LORA_FILE).write_bytes((f / LORA_FILE).read_bytes()[:1000])),
         f"{LORA_FILE}: not a readable safetensors file"),
    ]
    for run, reason in cases:
        out = tmp_path / f"{run.name}-export"
        line = _one_error_line(_acedist("export", str(run), "--out", str(out)))
        assert str(run / FINAL_DIR) in line and reason in line, line
        assert not out.exists()  # nothing half-written


def test_export_of_a_full_run_with_a_corrupt_dit_names_it(tiny_turbo, tmp_path):
    final = tmp_path / "run" / FINAL_DIR
    shutil.copytree(tiny_turbo / "transformer", final / TRANSFORMER_DIR)
    weights = next((final / TRANSFORMER_DIR).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:5000])
    state = {"step": 10, "model": str(tiny_turbo), "variant": "turbo", "model_type": "full"}
    (final / STATE_FILE).write_text(json.dumps(state))
    out = tmp_path / "export"
    line = _one_error_line(_acedist("export", str(tmp_path / "run"), "--out", str(out)))
    assert line.startswith(f"Error: {final / TRANSFORMER_DIR}: the trained DiT does not load"), line
    assert not out.exists()


# --------------------------------------------------------------- item 11: durations the model cannot render
@pytest.mark.parametrize("duration, reason", [
    ("inf", "give a number of seconds above 0 and at most 600"),
    ("nan", "give a number of seconds above 0 and at most 600"),
    ("-3", "give a number of seconds above 0 and at most 600"),
    ("0", "give a number of seconds above 0 and at most 600"),
    ("100000", "ACE-Step 1.5 generates at most 600 s (10 minutes)"),
    ("600.5", "ACE-Step 1.5 generates at most 600 s (10 minutes)"),
])
def test_a_duration_the_model_cannot_render_is_refused(tiny_turbo, tmp_path, duration, reason):
    out = tmp_path / "out.wav"
    line = _one_error_line(_acedist("generate", "--model", str(tiny_turbo), "--prompt", "calm", "--duration", duration,
                                    "--steps", "1", "--out", str(out)))
    assert line.startswith("Error: --duration ") and reason in line, line
    assert not out.exists()


# --------------------------------------------------------------- item 17: PEFT's weights file works like its folder
def test_the_peft_weights_file_works_like_its_folder(lora, lora_files, tiny_turbo, tmp_path):
    folder = lora_files["peft"]
    from_file, from_folder = read_lora(folder / "adapter_model.safetensors"), read_lora(folder)
    assert (from_file.spec.rank, from_file.spec.alpha, from_file.targets) == (from_folder.spec.rank, from_folder.spec.alpha,
                                                                     from_folder.targets) == (4, 8.0, tuple(sorted(lora.targets)))
    assert from_file.state.keys() == lora.state.keys()
    assert all(torch.equal(from_file.state[k], v) for k, v in lora.state.items())

    def render(name: str, *lora_args: str) -> torch.Tensor:
        result = _acedist("generate", "--model", str(tiny_turbo), *lora_args, "--prompt", "calm", "--duration", "1",
                          "--steps", "2", "--out", str(tmp_path / name))
        assert result.exit_code == 0, (result.output, result.exception)
        return torch.from_numpy(read_audio_simple(tmp_path / name)[0])

    with_file = render("file.wav", "--lora", str(folder / "adapter_model.safetensors"))
    assert torch.equal(with_file, render("folder.wav", "--lora", str(folder)))
    assert (with_file - render("base.wav")).abs().max() > 1e-4  # the LoRA was applied

    # the weights alone, without their config, cannot say the alpha: refused, naming what is missing
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / "adapter_model.safetensors", alone)
    with pytest.raises(UserError, match="PEFT weights need their adapter_config.json"):
        read_lora(alone / "adapter_model.safetensors")


def test_export_writes_only_into_a_new_empty_or_earlier_export_folder(lora_files, tiny_turbo, tmp_path):
    run = _lora_run(tmp_path / "run", lora_files, tiny_turbo)
    mine = tmp_path / "mine"
    (mine / "diffusers").mkdir(parents=True)
    (mine / "diffusers" / "notes.txt").write_text("a user's file")
    with pytest.raises(UserError, match="not an acedist export"):
        export(run, mine, "all", log=lambda _: None)
    assert (mine / "diffusers" / "notes.txt").read_text() == "a user's file"
    assert sorted(p.name for p in mine.iterdir()) == ["diffusers"]
    # an earlier export of ours is replaced in place
    export(run, tmp_path / "export", "all", log=lambda _: None)
    export(run, tmp_path / "export", "all", log=lambda _: None)
    assert read_lora(tmp_path / "export" / "peft").spec == read_lora(lora_files["diffusers"]).spec
