"""`acedist prep` end to end on the shared corpus with a tiny model on an embedded Ray cluster."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from acestep_dist import faults
import torch

from acestep_dist.config import PrepConfig
from acestep_dist.errors import UserError
from acestep_dist.shards import iter_samples
from pipelines.prep import EXIT_OK, run_prep

from conftest import samples_by_key

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def music(tmp_path_factory, corpus, prep_model, ray_session):
    out = tmp_path_factory.mktemp("music") / "shards"
    result = run_prep(str(corpus / "music"), str(prep_model), str(out), PrepConfig(shard_size_mb=0.05), log=lambda _: None)
    return out, result


def test_all_music_tracks_become_samples_with_their_metadata(music, corpus):
    out, result = music
    assert result.exit_code == EXIT_OK
    with open(corpus / "music" / "metadata.csv", newline="") as f:
        truth = {Path(row["file"]).stem: row for row in csv.DictReader(f)}
    samples = samples_by_key(out)
    assert set(samples) == set(truth) and len(samples) == 12
    for key, sample in samples.items():
        meta, row = sample["meta"], truth[key]
        assert meta["caption"] == row["caption"]
        assert meta["bpm"] == int(row["bpm"])
        assert meta["keyscale"] == row["keyscale"]
        assert meta["timesignature"] == row["timesignature"]
        assert (meta["language"] or "") == row["language"]
        assert bool(meta["lyrics"]) == (row["has_lyrics"] == "true")
        assert abs(meta["duration"] - float(row["duration_s"])) <= 0.05, key
        assert len(meta["sha256"]) == 64 and meta["offset"] == 0.0 and meta["crop"] == "start"
        assert "estimated" not in meta  # estimate_missing is off by default
        frames = sample["latent_mean"].shape[0]
        assert abs(frames - meta["duration"] * 25) <= 1
        assert sample["latent_mean"].shape == sample["latent_std"].shape == (frames, 4)
        assert sample["latent_mean"].dtype == torch.bfloat16 and sample["lyric_ids"].dtype == torch.int32
        assert sample["text_states"].shape == (meta["text_tokens"], 64)
        assert (sample["latent_std"] > 0).all()
    report = json.loads((out / "prep_report.json").read_text())
    assert (report["inputs"], report["accepted"], report["rejected"], report["samples"]) == (12, 12, 0, 12)
    assert report["shards"] > 1 and report["bytes"] == sum(p.stat().st_size for p in out.glob("shard-*.tar"))
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {row["key"] for row in manifest} == set(samples)
    assert (out / "errors.jsonl").read_text() == ""


def test_rerun_keeps_finished_shards_and_refuses_another_config(music, prep_model, corpus):
    out, _ = music
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    lines = []
    result = run_prep(str(corpus / "music"), str(prep_model), str(out), PrepConfig(shard_size_mb=0.05), log=lines.append)
    assert result.exit_code == EXIT_OK
    assert f"({len(before)} already finished)" in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == before
    with pytest.raises(UserError, match="another model or prep config.*--overwrite"):
        run_prep(str(corpus / "music"), str(prep_model), str(out), PrepConfig(shard_size_mb=0.05, max_duration=30))


def _complete(tar: Path) -> bool:
    try:
        with open(tar, "rb") as f:
            return sum(1 for _ in iter_samples(f)) > 0
    except (tarfile.TarError, ValueError, OSError):
        return False


def test_killed_prep_resumes_to_the_same_samples(tmp_path, corpus, prep_model, train_shards):
    settings = ["max_duration=6", "shard_size_mb=0.001"]  # one song per shard
    config = PrepConfig(max_duration=6, shard_size_mb=0.001)
    # the reference: train_shards, the same songs prepared with the same settings but for the shard size
    # (one big shard; a sample does not depend on its shard)
    same = {k: v for k, v in config.model_dump().items() if k != "shard_size_mb"}
    prepared_with = json.loads((train_shards / "prep_report.json").read_text())["config"]
    assert {k: prepared_with[k] for k in same} == same

    out = tmp_path / "killed"
    env = {**_env(), faults.VARIABLE: faults.spec("prep.before_shard", shards_written=5)}  # hangs before its 6th shard
    process = subprocess.Popen(
        [sys.executable, "-m", "acestep_dist.cli", "prep", str(corpus / "music"), "--model", str(prep_model), "--out", str(out),
         *settings], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(list(out.glob("shard-*.json"))) < 5:
            for tar in out.glob("shard-*.tar"):  # a visible shard is always complete
                assert _complete(tar), tar
            time.sleep(0.05)
        assert len(list(out.glob("shard-*.json"))) == 5, "prep did not get going"
        time.sleep(1)  # encoders keep working on later shards while the driver hangs
        os.kill(process.pid, signal.SIGKILL)  # the driver
        process.wait(timeout=30)
    finally:
        time.sleep(1)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the embedded cluster it started
        except ProcessLookupError:
            pass
    assert len(list(out.glob("shard-*.json"))) == 5
    for tar in out.glob("shard-*.tar"):
        assert _complete(tar), tar
    # a kill during a write leaves only a temporary file, never a visible shard
    shutil.copy(out / "shard-000000.tar", out / "shard-000005.tar.tmp")
    (out / "shard-000005.tar.tmp").write_bytes((out / "shard-000005.tar.tmp").read_bytes()[:3000])
    finished = 5

    lines = []
    assert run_prep(str(corpus / "music"), str(prep_model), str(out), config, log=lines.append).exit_code == EXIT_OK
    assert f"({finished} already finished)" in lines[0]
    assert not list(out.glob("*.tmp"))
    expected, got = samples_by_key(train_shards), samples_by_key(out)
    assert set(got) == set(expected) and len(got) == 12
    for key in expected:
        assert got[key]["meta"] == expected[key]["meta"]
        for tensor in ("latent_mean", "latent_std", "text_states", "lyric_ids"):
            assert torch.equal(got[key][tensor], expected[key][tensor]), (key, tensor)


def test_inspect_verifies_and_detects_a_flipped_byte(music, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(music[0], out)
    command = [sys.executable, "-m", "acestep_dist.cli", "inspect", str(out)]
    ok = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "12 samples" in ok.stdout and "all shards verified" in ok.stdout
    assert (out / "inspect_report.png").stat().st_size > 1000
    report = json.loads((out / "inspect_report.json").read_text())
    assert report["samples"] == 12 and report["languages"]["de"] == 7

    victim = sorted(out.glob("shard-*.tar"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    bad = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert bad.returncode == 2
    assert f"CORRUPT {victim.name}: checksum mismatch" in bad.stdout


@pytest.mark.parametrize("cpus", [2.0, 8.0, 64.0])
@pytest.mark.parametrize("actors", [None, 2, 8])
def test_encoder_actors_leave_cpus_for_decoding(monkeypatch, cpus, actors):
    import ray

    from pipelines.prep import _plan_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus})
    plan = _plan_resources(PrepConfig(encoder_actors=actors))
    reserved = (plan.vae_actors + plan.text_actors) * plan.cpus_per_actor
    assert reserved <= cpus / 2 and plan.cpus_per_actor > 0
    assert plan.cpus_per_task <= cpus - reserved
    assert plan.gpus_per_actor == 0


def test_alternative_captions_are_encoded_beside_the_caption(tmp_path, corpus, prep_model, ray_session):
    song = corpus / "music" / sorted(p.name for p in (corpus / "music").glob("*.txt"))[0].replace(".txt", "")
    audio = next(p for p in (corpus / "music").iterdir() if p.stem == song.name and p.suffix not in (".txt", ".lyrics"))
    manifest = tmp_path / "songs.jsonl"
    rows = [
        {"key": "with_alt", "audio": str(audio), "caption": "folk, guitar", "alt_captions": ["calm piano ballad", "a"]},
        {"key": "alt_as_caption", "audio": str(audio), "caption": "calm piano ballad"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert run_prep(str(manifest), str(prep_model), str(out), PrepConfig(max_duration=4),
                    log=lambda _: None).exit_code == EXIT_OK
    samples = samples_by_key(out)
    with_alt, plain = samples["with_alt"], samples["alt_as_caption"]
    assert with_alt["meta"]["alt_captions"] == ["calm piano ballad", "a"]
    assert torch.equal(with_alt["alt_text_states_0"], plain["text_states"])  # as if it were the caption
    assert with_alt["alt_text_states_1"].shape[0] < with_alt["alt_text_states_0"].shape[0]
    assert not torch.equal(with_alt["text_states"][:10], plain["text_states"][:10]) or \
        with_alt["text_states"].shape != plain["text_states"].shape
    assert "alt_text_states_0" not in plain
    check = subprocess.run([sys.executable, "-m", "acestep_dist.cli", "inspect", str(out)], capture_output=True,
                           text=True, env=_env(), timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr


def test_segments_mode_sizes_shards_by_windows_not_inputs(corpus):
    from acestep_dist.records import Record
    from pipelines.prep import _pack_shards, _plan_inputs
    from acestep_dist.prep import window_count

    long = corpus / "broken" / "long_12min.mp3"  # 720 s: twelve 60 s segments
    short = sorted((corpus / "music").glob("*.wav"))[0]
    records = [Record(key=f"k{i}", audio=str(p)) for i, p in enumerate([short, short, long, short, short, short])]
    segments = PrepConfig(crop="segments", max_duration=60)
    def shard_sizes(config):
        return [len(s) for s in _pack_shards([window_count(row) for row in _plan_inputs(records, config)], 5)]

    assert shard_sizes(segments) == [2, 1, 3]  # the long file fills a shard alone
    assert shard_sizes(PrepConfig(max_duration=60)) == [5, 1]
