"""Nothing trained on garbage: shards that do not match their markers, keys that occur twice, bad
manifest lines and a corrupt ``init_lora`` are refused on the driver with errors naming the file;
a sample that breaks during training names its shard and key; `--resume` skips damaged checkpoints."""

from __future__ import annotations

import json
import tarfile
import shutil
from pathlib import Path

import fsspec
import pytest
import torch

from acestep_dist.config import TrainConfig
from acestep_dist.errors import UserError
from acestep_dist.families.ace_step_15.lora_formats import read_lora
from acestep_dist.inspect_report import EXIT_CORRUPT, inspect_output
from acestep_dist.shards import EncodedSample, ShardMarker, file_sha256, marker_name, write_shard
from acestep_dist.train.checkpoints import choose_resume_checkpoint, list_checkpoints, verify_checkpoint
from acestep_dist.train.data import Item, SampleReader, ShardReadError, open_training_data
from pipelines.train import _publish_final, run_train

from conftest import TRAIN_COMMON
from acestep_dist.families import get as get_family

SCHEMA = get_family("ace-step-1.5").schema

def pack_tensors(latent_mean, latent_std, text_states, lyric_ids, alt_text_states=()):
    """An ACE-Step 1.5 sample blob, as its family's schema packs it."""
    return SCHEMA.pack({"latent_mean": latent_mean, "latent_std": latent_std, "text_states": text_states,
                        "lyric_ids": lyric_ids}, [{"text_states": states} for states in alt_text_states])

MODEL_STATES = "engine/mp_rank_00_model_states.pt"


def _config(**overrides) -> TrainConfig:
    """The reference_run fixture's settings."""
    settings = dict(TRAIN_COMMON, train_batch_size=2, zero_stage=2, validation_step_interval=5,
                    validation_audio_duration=2.0, validation_prompt="calm piano", validation_lyrics="[verse]\nla la")
    return TrainConfig(**{**settings, **overrides})


# ------------------------------------------------------------------ hand-made shards
def _sample(key: str, tensors: bytes | None = None) -> EncodedSample:
    generator = torch.Generator().manual_seed(len(key))
    blob = tensors if tensors is not None else pack_tensors(
        torch.randn(6, 4, generator=generator), torch.rand(6, 4, generator=generator),
        torch.randn(3, 8, generator=generator), torch.arange(2, dtype=torch.int32))
    meta = {"duration": 0.24, "frames": 6, "text_tokens": 3, "lyric_tokens": 2, "source": f"/songs/{key}.wav",
            "offset": 0.0, "caption": "a song", "lyrics": ""}
    return EncodedSample(key, meta, blob)


def _write_dataset(root: Path, shards: list[list[EncodedSample]]) -> list[ShardMarker]:
    """Shards and markers as prep writes them, and a manifest of every marker row."""
    fs = fsspec.filesystem("file")
    root.mkdir(parents=True)
    markers = [write_shard(fs, str(root), i, samples, [], [], "fingerprint", "plan", SCHEMA) for i, samples in enumerate(shards)]
    with open(root / "manifest.jsonl", "w") as f:
        for marker in markers:
            f.writelines(json.dumps(row) + "\n" for row in marker.samples)
    return markers


def _rewrite_marker(root: Path, index: int) -> None:
    """Make the marker's checksum match a shard changed after prep (what a buggy writer would leave)."""
    path = root / marker_name(index)
    marker = ShardMarker.from_json(path.read_text())
    marker.sha256, marker.bytes = file_sha256(fsspec.filesystem("file"), str(root / f"shard-{index:06d}.tar"))
    path.write_text(marker.to_json())


def _inspect(data: Path) -> tuple[int, list[str]]:
    lines: list[str] = []
    _report, code = inspect_output(str(data), log=lines.append)
    return code, lines


def _train_error(data: Path, model: Path, run: Path, **overrides) -> str:
    with pytest.raises(UserError) as error:
        run_train(_config(**overrides), str(data), str(model), str(run), workers=1, log=lambda _: None)
    return str(error.value)


# ------------------------------------------------------------------ item 1: duplicate keys
def test_a_key_in_two_shards_or_twice_in_one_is_refused(tmp_path, prep_model):
    data = tmp_path / "dup"
    _write_dataset(data, [[_sample("a"), _sample("c/dup_1")], [_sample("c/dup_1"), _sample("b")],
                          [_sample("d"), _sample("e"), _sample("d")]])
    code, lines = _inspect(data)
    assert code == EXIT_CORRUPT
    report = "\n".join(lines)
    assert "key 'c/dup_1' occurs 2 times: shard-000000.tar sample 1, shard-000001.tar sample 0" in report
    assert "shard-000002.tar: key 'd' occurs twice in the shard: samples 0 and 2" in report
    assert "all shards verified" not in report

    message = _train_error(data, prep_model, tmp_path / "run")
    assert "'c/dup_1' occurs 2 times: line 2 (shard-000000.tar), line 3 (shard-000001.tar)" in message

    # the manifest lists the key once, the tar holds it twice: the index must not pick one silently
    data = tmp_path / "dup-in-tar"
    markers = _write_dataset(data, [[_sample("d"), _sample("e"), _sample("d")]])
    (data / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in markers[0].samples[:2]))
    message = _train_error(data, prep_model, tmp_path / "run")
    assert "shard-000000.tar holds sample 'd' twice" in message


# ------------------------------------------------------------------ item 5: checksums
def test_a_shard_with_flipped_bytes_is_refused_before_training(tmp_path, train_shards, prep_model):
    data = tmp_path / "flipped"
    shutil.copytree(train_shards, data)
    ref = open_training_data(str(data)).refs[3]
    with open(ref.shard, "r+b") as f:  # inside a tensor payload: the tar and the safetensors header stay valid
        f.seek(ref.tensor_offset + ref.tensor_size - 64)
        chunk = f.read(16)
        f.seek(ref.tensor_offset + ref.tensor_size - 64)
        f.write(bytes(b ^ 0xFF for b in chunk))
    message = _train_error(data, prep_model, tmp_path / "run")
    assert "shard-000000.tar: checksum mismatch" in message and "training failed" not in message
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ item 6: bad content, bad manifest, init_lora
@pytest.mark.parametrize("bad_line, problem", [("{not json\n", "line 3: not JSON"),
                                               ('{"key": "x", "frames": 5}\n', "line 3: lacks 'shard'")])
def test_a_bad_manifest_line_is_named_by_inspect_and_train(tmp_path, train_shards, prep_model, bad_line, problem):
    data = tmp_path / "manifest"
    shutil.copytree(train_shards, data)
    lines = (data / "manifest.jsonl").read_text().splitlines(keepends=True)
    (data / "manifest.jsonl").write_text("".join(lines[:2] + [bad_line] + lines[3:]))
    code, report = _inspect(data)
    assert code == EXIT_CORRUPT
    assert any(line.startswith(f"CORRUPT manifest.jsonl: {problem}") for line in report), report
    message = _train_error(data, prep_model, tmp_path / "run")
    assert f"manifest.jsonl {problem}" in message


def _header_too_large() -> bytes:
    """A safetensors blob whose header length says 2**63 bytes."""
    return b"\xff" * 7 + b"\x7f" + b"{}"


def test_unreadable_samples_are_refused_before_training_naming_shard_and_key(tmp_path, prep_model):
    data = tmp_path / "bad-tensors"
    _write_dataset(data, [[_sample("fine"), _sample("broken/tensors", _header_too_large()), _sample("fine2")]])
    code, report = _inspect(data)
    assert code == EXIT_CORRUPT
    assert any("shard-000000.tar: cannot read: sample 'broken/tensors': tensors.safetensors is not readable" in line
               for line in report), report
    message = _train_error(data, prep_model, tmp_path / "run")
    assert "shard-000000.tar: cannot read: sample 'broken/tensors': tensors.safetensors" in message
    assert "training failed" not in message

    # a meta that is not JSON, with a marker rewritten to match (the checksum alone would not catch it)
    data = tmp_path / "bad-meta"
    _write_dataset(data, [[_sample("fine"), _sample("broken/meta"), _sample("fine2")]])
    tar = data / "shard-000000.tar"
    with tarfile.open(tar) as archive:  # training never reads the meta: find it in the tar itself
        meta_offset = archive.getmember("broken/meta.meta.json").offset_data
    with open(tar, "r+b") as f:
        f.seek(meta_offset)
        f.write(b"#")  # the opening brace
    _rewrite_marker(data, 0)
    message = _train_error(data, prep_model, tmp_path / "run")
    assert "sample 'broken/meta': meta.json is not JSON" in message and "training failed" not in message


def test_the_reader_names_shard_and_key(tmp_path):
    data = tmp_path / "reader"
    _write_dataset(data, [[_sample("fine"), _sample("broken/tensors", _header_too_large())]])
    refs = open_training_data(str(data)).refs
    reader = SampleReader(refs, SCHEMA)
    assert reader.read(Item(0, 0, 0, 0))["latent_mean"].shape == (6, 4)
    with pytest.raises(ShardReadError, match=r"shard .*shard-000000\.tar, sample 'broken/tensors': tensors\.safetensors "
                                             r"is not readable safetensors"):
        reader.read(Item(1, 0, 1, 0))
    with pytest.raises(ShardReadError, match=r"shard .*shard-000000\.tar, sample 'fine' lacks tensor "
                                             r"alt_text_states_0"):
        reader.read(Item(0, 0, 0, 1))  # a manifest claiming an alternative caption the sample lacks


def test_a_sample_broken_during_training_ends_with_one_error_naming_shard_and_key(tmp_path, train_shards,
                                                                                  prep_model):
    data = tmp_path / "breaks"
    shutil.copytree(train_shards, data)
    refs = open_training_data(str(data)).refs

    def break_every_sample_once_checked(line: str) -> None:
        if line.startswith("train: ") and "worker(s)" in line:  # the driver's checks are done: storage changes
            with open(refs[0].shard, "r+b") as f:
                for ref in refs:
                    f.seek(ref.tensor_offset)
                    f.write(b"\xff" * 7 + b"\x7f")

    with pytest.raises(UserError) as error:
        run_train(_config(validation_step_interval=0), str(data), str(prep_model), str(tmp_path / "run"), workers=1,
                  log=break_every_sample_once_checked)
    message = str(error.value)
    assert message.startswith("training failed: shard ") and "\n" not in message
    assert "shard-000000.tar, sample '" in message and "tensors.safetensors is not readable safetensors" in message


def test_a_corrupt_or_unfitting_init_lora_is_refused_before_training(tmp_path, train_shards, prep_model,
                                                                     reference_run):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2, 3" + bytes(range(200)))
    message = _train_error(train_shards, prep_model, tmp_path / "run", init_lora=str(corrupt))
    assert str(corrupt) in message and "training failed" not in message
    trained = reference_run / "final" / "lora.safetensors"
    message = _train_error(train_shards, prep_model, tmp_path / "run", init_lora=str(trained), lora_rank=4)
    assert message.startswith(f"init_lora {trained} does not fit this run: rank 8 (lora_rank is 4)"), message
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ item 7: checkpoints and resume
def _copy_run(reference_run: Path, to: Path) -> tuple[Path, list[Path]]:
    shutil.copytree(reference_run, to)
    fs = fsspec.filesystem("file")
    checkpoints = [Path(p) for p in list_checkpoints(fs, str(to))]
    assert [verify_checkpoint(fs, str(p)).step for p in checkpoints] == [10, 5]
    return to, checkpoints


@pytest.mark.parametrize("damage", [MODEL_STATES, "lora.safetensors", "flipped"])
def test_resume_chooses_the_newest_intact_checkpoint(tmp_path, reference_run, damage):
    run, (latest, previous) = _copy_run(reference_run, tmp_path / "run")
    fs = fsspec.filesystem("file")
    assert not verify_checkpoint(fs, str(latest)).problems
    if damage == "flipped":
        with open(latest / MODEL_STATES, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 1]))
        expected = f"{MODEL_STATES} changed since it was written (sha256 mismatch)"
    else:
        (latest / damage).unlink()
        expected = f"{damage} is missing"
    warnings: list[str] = []
    chosen = choose_resume_checkpoint(fs, str(run), str(run), log=warnings.append)
    assert (chosen.path, chosen.step) == (str(previous), 5)
    assert warnings[0] == f"warning: checkpoint {latest.name} is damaged and skipped: {expected}"
    assert warnings[1] == f"warning: resuming from {previous.name} (step 5), the newest intact checkpoint"


def test_resume_without_an_intact_checkpoint_is_a_clear_error(tmp_path, reference_run, train_shards, prep_model):
    run, (latest, previous) = _copy_run(reference_run, tmp_path / "run")
    (latest / MODEL_STATES).unlink()
    (previous / "acedist_files.rank0.json").unlink()  # as if its upload never finished
    with pytest.raises(UserError) as error:
        run_train(_config(), str(train_shards), str(prep_model), str(run), workers=1, resume=True, log=lambda _: None)
    assert str(error.value) == (f"--resume: no intact checkpoint in {run} ({latest.name}: {MODEL_STATES} is missing; "
                                f"{previous.name}: no file list acedist_files.rank0.json (the checkpoint was not "
                                f"completely written)); start a new run with another --output")


def test_a_final_folder_is_never_published_without_weights(tmp_path, reference_run):
    run, (latest, _previous) = _copy_run(reference_run, tmp_path / "run")
    (latest / "lora.safetensors").unlink()
    with pytest.raises(UserError, match=f"checkpoint {latest.name} \\(step 10\\) lacks lora.safetensors"):
        _publish_final(fsspec.filesystem("file"), str(run / "final"), str(latest))


def test_resume_after_a_damaged_checkpoint_equals_an_uninterrupted_run(tmp_path, reference_run, train_shards,
                                                                      prep_model):
    run, (latest, previous) = _copy_run(reference_run, tmp_path / "run")
    (latest / MODEL_STATES).unlink()
    lines: list[str] = []
    result = run_train(_config(), str(train_shards), str(prep_model), str(run), workers=1, resume=True,
                       log=lines.append)
    assert f"warning: checkpoint {latest.name} is damaged and skipped: {MODEL_STATES} is missing" in lines
    assert result.steps == 10
    assert json.loads((run / "final" / "acedist_state.json").read_text())["started_at_step"] == 5
    resumed = read_lora(run / "final" / "lora.safetensors").state
    reference = read_lora(reference_run / "final" / "lora.safetensors").state
    assert resumed.keys() == reference.keys()
    assert max(float((resumed[k] - reference[k]).abs().max()) for k in resumed) <= 1e-6


def test_a_final_folder_the_user_made_is_never_replaced(tmp_path, reference_run):
    run, (latest, _previous) = _copy_run(reference_run, tmp_path / "run")
    shutil.rmtree(run / "final")
    (run / "final").mkdir()
    (run / "final" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="was not written by acedist"):
        _publish_final(fsspec.filesystem("file"), str(run / "final"), str(latest))
    assert (run / "final" / "notes.txt").read_text() == "mine"
    # an earlier final/ of ours is replaced
    shutil.rmtree(run / "final")
    _publish_final(fsspec.filesystem("file"), str(run / "final"), str(latest))
    _publish_final(fsspec.filesystem("file"), str(run / "final"), str(latest))
    assert (run / "final" / "lora.safetensors").is_file()


# ------------------------------------------------------------ shards of earlier versions
def _set_marker_fields(root: Path, index: int, **fields) -> None:
    """Rewrite a marker's schema fields (None: drop them, as markers before families were recorded)."""
    path = root / marker_name(index)
    marker = json.loads(path.read_text())
    for name, value in fields.items():
        if value is None:
            marker.pop(name, None)
        else:
            marker[name] = value
    path.write_text(json.dumps(marker))


def test_shards_from_before_families_are_read_as_they_are_and_unknown_schemas_are_refused(tmp_path):
    """Markers without family / schema_version (written before families were recorded) are ACE-Step
    1.5's schema 1, whose tensors are unchanged: training reads them as they are. A schema version the
    family does not write is refused, naming the version and --overwrite; so is a mix of families."""
    data = tmp_path / "legacy"
    _write_dataset(data, [[_sample("a"), _sample("b")], [_sample("c")]])
    for index in (0, 1):
        _set_marker_fields(data, index, family=None, schema_version=None)
    training = open_training_data(str(data))
    assert training.family == "ace-step-1.5" and training.schema.version == 1 and len(training.refs) == 3
    assert SampleReader(training.refs, training.schema).read(Item(0, 0, 0, 0))["latent_mean"].shape == (6, 4)
    assert _inspect(data)[0] == 0

    _set_marker_fields(data, 1, family="ace-step-1.5", schema_version=7)
    with pytest.raises(UserError, match=r"schema version 7; this acedist reads version 1: rerun `acedist prep` "
                                        r"with --overwrite"):
        open_training_data(str(data))
    code, lines = _inspect(data)
    assert code == EXIT_CORRUPT and any("schema version 7" in line for line in lines)
    _set_marker_fields(data, 1, family="some-other-family", schema_version=1)
    with pytest.raises(UserError, match="unknown model family 'some-other-family'"):
        open_training_data(str(data))
