"""Prep loses nothing, deletes nothing it did not write, and trains on no garbage (issue #11).

Unit tests of the stages run without Ray; two preps on the shared Ray session cover the rest: one
with hand-built records (a bad field, a truncated file, 5.1 audio, rows sharing a file), one over
every file of the corpus's broken/ set mixed with good songs, judged by broken/EXPECTED.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from acestep_dist import faults

from acestep_dist.audio import probe_audio, write_audio
from acestep_dist.config import PrepConfig
from acestep_dist.errors import UserError
from acestep_dist.prep import OK, REJECTED, ROW_DEFAULTS, TextEncoder, decode_row, expand_windows, plan_input
from acestep_dist.records import Record
from acestep_dist.sources import Problem, SourceListing
from pipelines.prep import EXIT_FATAL, EXIT_PARTIAL, run_prep

from conftest import samples_by_key

ROOT = Path(__file__).resolve().parents[1]
RATE = 48000


def _music(seconds: float, seed: int, channels: int = 2) -> np.ndarray:
    """A tone over noise: nothing silent, different per seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)
    return np.stack([tone + 0.05 * rng.standard_normal(t.size) for _ in range(channels)]).astype(np.float32)


def _write_surround(path: Path, seconds: float) -> Path:
    """A 5.1 WAV (write_audio writes mono and stereo only)."""
    audio = _music(seconds, seed=7, channels=6)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=RATE, layout="5.1")
        data = (audio * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data.T.reshape(1, -1)), format="s16", layout="5.1")
        frame.sample_rate = RATE
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _truncated_flac(path: Path, seconds: float, keep: float) -> Path:
    """A FLAC whose header (STREAMINFO) states ``seconds`` but whose bytes stop at ``keep`` of them."""
    write_audio(path, _music(seconds, seed=3), RATE)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _vbr_mp3_without_header(path: Path) -> Path:
    """A VBR MP3 without a Xing/VBRI header: FFmpeg guesses its duration from the first frames' bitrate
    (here a quiet start, so the guess is far too long), yet nothing is missing."""
    t = np.arange(10 * RATE) / RATE
    quiet_then_loud = np.where(t < 3, 0.3 * np.sin(2 * np.pi * 220 * t), np.random.default_rng(1).standard_normal(t.size) * 0.3)
    audio = np.stack([quiet_then_loud, quiet_then_loud]).astype(np.float32)
    with av.open(str(path), "w", options={"write_xing": "0"}) as container:
        stream = container.add_stream("libmp3lame", rate=RATE, layout="stereo")
        stream.codec_context.qscale = 4
        stream.codec_context.flags |= 2  # AV_CODEC_FLAG_QSCALE: variable bitrate
        frame = av.AudioFrame.from_ndarray(audio, format="fltp", layout="stereo")
        frame.sample_rate = RATE
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _planned_and_decoded(path: Path, config: PrepConfig) -> list[dict]:
    record = Record(key=path.stem, audio=str(path), caption="test")
    rows = expand_windows(plan_input(record, config))
    return [decode_row(row, config, RATE) for row in rows]


def _warnings(row: dict) -> list[str]:
    return [message for _stage, message in json.loads(row["warnings"])]




def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# ----------------------------------------------------------------------------- stages, no Ray
def test_a_truncated_file_is_rejected_unless_allowed(tmp_path):
    cut = _truncated_flac(tmp_path / "cut.flac", seconds=19.8, keep=0.37)
    assert abs(probe_audio(cut).duration - 19.8) < 0.01  # the header still says 19.8 s

    (row,) = _planned_and_decoded(cut, PrepConfig(max_duration=30))
    assert row["status"] == REJECTED and row["stage"] == "decode" and row["whole_input"]
    assert re.match(r"truncated file: its header says 19\.80 s, but the audio ends at [67]\.\d\d s", row["reason"])

    (kept,) = _planned_and_decoded(cut, PrepConfig(max_duration=30, allow_truncated=True))
    assert kept["status"] == OK and 6.0 < kept["duration"] < 8.0
    assert any(w.startswith("truncated file: its header says 19.80 s") and "kept what decodes" in w
               for w in _warnings(kept))


def test_a_guessed_duration_is_not_truncation(tmp_path):
    mp3 = _vbr_mp3_without_header(tmp_path / "vbr.mp3")
    info = probe_audio(mp3)
    assert info.duration_estimated and info.duration > 15  # FFmpeg's guess; 10 s decode
    (row,) = _planned_and_decoded(mp3, PrepConfig(max_duration=60))
    assert row["status"] == OK and abs(row["duration"] - 10.0) < 0.1


def test_surround_audio_is_downmixed_with_a_warning(tmp_path):
    (row,) = _planned_and_decoded(_write_surround(tmp_path / "surround.wav", 2.0), PrepConfig())
    assert row["status"] == OK
    assert "5.1 audio (6 channels) downmixed to stereo" in _warnings(row)


def _encoder_batch(records: list[Record]) -> dict[str, np.ndarray]:
    """The rows the text encoder receives from the VAE stage, as Ray Data's numpy batch."""
    from safetensors.torch import save as save_safetensors

    frames, dim = 50, 4
    rows = []
    for record in records:
        latent = torch.full((frames, dim), float(sum(map(ord, record.key)) % 97))  # the row's own
        audio = save_safetensors({"latent_mean": latent, "latent_std": latent.clone()})
        rows.append({**ROW_DEFAULTS, "record": json.dumps(record.to_dict()), "key": record.key, "duration": 2.0,
                     "audio_tensors": audio, "sha256": "0" * 64})
    # bytes as objects (a fixed-width bytes array drops trailing zero bytes); text as fixed-width strings
    return {name: np.array([row[name] for row in rows], dtype=object if isinstance(rows[0][name], bytes) else None)
            for name in rows[0]}


def test_one_bad_row_costs_only_itself_in_a_text_encoder_batch(prep_model):
    good = [Record(key=f"good{i}", audio=f"/x/{i}.wav", caption=f"folk {i}", lyrics="[verse]\nla la") for i in range(4)]
    bad = Record(key="bad", audio="/x/bad.wav", caption="folk", lyrics=123)  # not text: the lyric template fails
    config = PrepConfig()
    encoder = TextEncoder("ace-step-1.5", str(prep_model), config, {})
    mixed = encoder(_encoder_batch(good[:2] + [bad] + good[2:]))
    assert list(mixed["status"]) == [OK, OK, REJECTED, OK, OK]
    assert mixed["stage"][2] == "encode_text" and mixed["reason"][2].startswith("AttributeError")
    alone = encoder(_encoder_batch(good))
    assert list(alone["status"]) == [OK] * 4
    # the good rows come out exactly as in a batch without the bad one
    assert list(np.delete(mixed["tensors"], 2)) == list(alone["tensors"])
    assert list(np.delete(mixed["meta"], 2)) == list(alone["meta"])


# ------------------------------------------------------------------------ the output folder
def _one_song(folder: Path) -> str:
    folder.mkdir()
    write_audio(folder / "song.wav", _music(2.0, seed=1), RATE)
    (folder / "song.txt").write_text("folk, guitar")
    return str(folder)


def _nothing_to_encode(folder: Path) -> str:
    """A source whose only file is rejected by the source (no caption): a prep run without Ray."""
    folder.mkdir()
    write_audio(folder / "uncaptioned.wav", _music(2.0, seed=1), RATE)
    return str(folder)


def test_a_folder_prep_did_not_make_is_refused_and_left_alone(tmp_path, prep_model):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("notes.tmp", "shard-000005.bak", "shard-foo.txt"):
        (out / name).write_text(f"the user's {name}")
    before = _snapshot(out)
    with pytest.raises(UserError, match=r"not an `acedist prep` output and is not empty .*--overwrite"):
        run_prep(_one_song(tmp_path / "songs"), str(prep_model), str(out), PrepConfig(), log=lambda _: None)
    assert _snapshot(out) == before  # nothing deleted, nothing added (not even the lock)

    # --overwrite writes beside them; nothing to encode here, so no Ray
    nothing = _nothing_to_encode(tmp_path / "nothing")
    result = run_prep(nothing, str(prep_model), str(out), PrepConfig(), overwrite=True, log=lambda _: None)
    assert result.exit_code == EXIT_FATAL  # no samples
    after = _snapshot(out)
    assert {name: after[name] for name in before} == before
    assert {"prep_state.json", "manifest.jsonl", "errors.jsonl", "prep_report.json"} <= set(after)

    # a file named like one of prep's own that prep did not write is never replaced, even with --overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.jsonl").write_text('{"audio": "mine.wav"}\n')
    with pytest.raises(UserError, match=r"holds manifest\.jsonl, named like prep's own files but not written by"):
        run_prep(nothing, str(prep_model), str(foreign), PrepConfig(), overwrite=True, log=lambda _: None)
    assert (foreign / "manifest.jsonl").read_text() == '{"audio": "mine.wav"}\n'


def test_a_second_prep_on_the_same_out_stops_while_the_first_runs(tmp_path, prep_model):
    out = tmp_path / "out"
    nothing = _nothing_to_encode(tmp_path / "nothing")
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_DATA_DISABLE_PROGRESS_BARS="1",
               **{faults.VARIABLE: faults.spec("prep.before_shard", shards_written=0)})  # hangs before its first shard
    env.pop("RAY_ADDRESS", None)
    songs = _one_song(tmp_path / "songs")
    first = subprocess.Popen([sys.executable, "-m", "acestep_dist.cli", "prep", songs, "--model",
                              str(prep_model), "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "prep_state.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert (out / "prep_state.json").exists(), "the first prep did not start"
        with pytest.raises(UserError, match=rf"is in use by another acedist prep \(pid {first.pid} on "
                                            rf"{re.escape(socket.gethostname())}\)"):
            run_prep(nothing, str(prep_model), str(out), PrepConfig(), log=lambda _: None)
        # the state is still the first run's (the first run may still be writing it: no byte comparison)
        assert json.loads((out / "prep_state.json").read_text())["source"] == songs
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the first run and the embedded cluster it started
        first.wait(timeout=60)
    # it died without releasing: its lock is stale (pid dead on this host), and the next run takes it over
    assert (out / ".acedist-prep.lock").exists()
    result = run_prep(nothing, str(prep_model), str(out), PrepConfig(), log=lambda _: None)
    assert result.exit_code == EXIT_FATAL  # ran (nothing to encode)
    assert not (out / ".acedist-prep.lock").exists()


def test_the_lock_on_an_object_store_is_a_lease(tmp_path):
    import fsspec

    from acestep_dist.prep_output import LOCK_FILE, OutputInUse, OutputLock

    fs, root, out = fsspec.filesystem("memory"), f"/lease-{os.getpid()}", f"memory://lease-{os.getpid()}"
    lease = f"{root}/{LOCK_FILE}"
    with OutputLock(fs, root, out):
        holder = json.loads(fs.cat_file(lease))
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
        assert holder["expires"] > time.time() + 60
        with pytest.raises(OutputInUse, match=rf"pid {os.getpid()} on {re.escape(socket.gethostname())}"):
            OutputLock(fs, root, out).__enter__()
    assert not fs.exists(lease)

    def lease_of(host: str, pid: int, expires_in: float) -> None:
        fs.pipe_file(lease, json.dumps({"host": host, "pid": pid, "token": "x", "expires": time.time() + expires_in}).encode())

    lease_of("elsewhere", 4242, 600)  # live on another host: wait for it
    with pytest.raises(OutputInUse, match="pid 4242 on elsewhere"):
        OutputLock(fs, root, out).__enter__()
    lease_of("elsewhere", 4242, -1)  # expired: taken over
    with OutputLock(fs, root, out):
        assert json.loads(fs.cat_file(lease))["pid"] == os.getpid()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease_of(socket.gethostname(), dead.pid, 600)  # unexpired, but its holder is dead on this host
    with OutputLock(fs, root, out):
        assert json.loads(fs.cat_file(lease))["pid"] == os.getpid()


# --------------------------------------------------- a prep of hand-built records, with Ray
@pytest.fixture(scope="module")
def mixed(tmp_path_factory, prep_model, ray_session):
    """Six records in segments mode (3 s windows of 5 s files, one input per shard): two rows naming one
    file, one whose lyrics are not text (the text encoder fails on it), 5.1 audio, a truncated FLAC;
    and one row the source rejected."""
    folder = tmp_path_factory.mktemp("mixed")
    song = write_audio(folder / "song.wav", _music(5.0, seed=1), RATE)
    other = write_audio(folder / "other.wav", _music(5.0, seed=2), RATE)
    records = [
        Record(key="song", audio=str(song), caption="folk, guitar", lyrics="[verse]\nla la"),
        Record(key="song_again", audio=str(song), caption="calm folk"),
        Record(key="bad_lyrics", audio=str(other), caption="folk", lyrics=123),
        Record(key="surround", audio=str(_write_surround(folder / "surround.wav", 5.0)), caption="film score"),
        Record(key="truncated", audio=str(_truncated_flac(folder / "truncated.flac", 6.0, 0.4)), caption="piano"),
        Record(key="other", audio=str(other), caption="folk, fiddle"),
    ]
    listing = SourceListing(records=records, rejected=[Problem(str(song), "source", "a row the source rejected")])
    config = PrepConfig(crop="segments", max_duration=3, shard_size_mb=0.001)
    out = folder / "out"
    result = run_prep(listing, str(prep_model), str(out), config, log=lambda _: None)
    return out, result, listing, config


def test_only_the_guilty_rows_are_rejected_and_counted_per_row(mixed):
    out, result, _, _ = mixed
    assert result.exit_code == EXIT_PARTIAL
    assert set(samples_by_key(out)) == {f"{key}__seg{i:03d}" for key in ("song", "song_again", "surround", "other") for i in (0, 1)}
    errors = {e.get("key", "(source)"): e for e in _lines(out / "errors.jsonl")}
    assert set(errors) == {"bad_lyrics", "truncated", "(source)"}  # one line per rejected input
    assert errors["bad_lyrics"]["stage"] == "encode_text" and errors["bad_lyrics"]["reason"].startswith("AttributeError")
    assert errors["truncated"]["reason"].startswith("truncated file: its header says 6.00 s, but the audio ends at ")
    warnings = _lines(out / "warnings.jsonl")
    assert [w["reason"] for w in warnings if w["input"].endswith("surround.wav")].count(
        "5.1 audio (6 channels) downmixed to stereo") == 1  # once per input, not per window
    # 6 listed + 1 rejected by the source; 4 written (2 windows each), 3 rejected; two rows name song.wav
    report = json.loads((out / "prep_report.json").read_text())
    assert (report["inputs"], report["accepted"], report["rejected"], report["samples"]) == (7, 4, 3, 8)
    assert result.report["accepted"] == 4


def test_reruns_and_overwrite_delete_only_what_prep_wrote(mixed, tmp_path, prep_model):
    original, _, listing, config = mixed
    out = tmp_path / "out"
    shutil.copytree(original, out)
    theirs = {"notes.tmp": b"mine", "shard-000005.bak": b"backup", "shard-foo.txt": b"?", "shard-000002.tar.orig": b"x"}
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    (out / "shard-000001.tar.tmp").write_bytes(b"a write cut short")  # prep listed it before writing

    def shards() -> set[str]:
        return {p.name for p in out.iterdir() if re.fullmatch(r"shard-\d{6}\.(tar|json)", p.name)}

    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    quiet = lambda _: None  # noqa: E731
    assert run_prep(listing, str(prep_model), str(out), config, log=quiet).exit_code == EXIT_PARTIAL  # all finished
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == finished
    assert not (out / "shard-000001.tar.tmp").exists()
    assert all((out / name).read_bytes() == data for name, data in theirs.items())

    shrunk = SourceListing(records=listing.records[:-1], rejected=listing.rejected)  # the last shard goes
    assert run_prep(shrunk, str(prep_model), str(out), config, log=quiet).exit_code == EXIT_PARTIAL
    assert shards() == {f"shard-{i:06d}.{ext}" for i in range(5) for ext in ("tar", "json")}

    other_config = PrepConfig(**{**config.model_dump(), "text_max_tokens": 100})
    with pytest.raises(UserError, match="another model or prep config.*--overwrite"):
        run_prep(shrunk, str(prep_model), str(out), other_config, log=quiet)
    assert run_prep(SourceListing(), str(prep_model), str(out), other_config, overwrite=True,
                    log=quiet).exit_code == EXIT_FATAL
    assert shards() == set()  # prep's own, all gone ...
    assert all((out / name).read_bytes() == data for name, data in theirs.items())  # ... theirs all kept
    summaries = ("manifest.jsonl", "errors.jsonl", "warnings.jsonl")
    assert set(json.loads((out / "prep_state.json").read_text())["files"]) == \
        {*summaries, *(f"{name}.tmp" for name in summaries), "prep_report.json"}


# --------------------------------------------------- the acceptance test: broken/EXPECTED.md
def _expected(table: str) -> dict[str, tuple[str, str | None]]:
    """file -> (REJECT | WARN | ACCEPT, the reason's gist: the first quoted phrase of its check)."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.lstrip().startswith("|")]
    header = [cell.lower() for cell in rows[0]]
    file_col = header.index("file")
    expected_col = header.index("expected")
    check_col = next(i for i, cell in enumerate(header) if "check" in cell)
    expected = {}
    for row in rows[2:]:  # after the header and its --- line
        name = re.search(r"`([^`]+)`", row[file_col]).group(1)
        kind = re.search(r"\*\*(REJECT|WARN|ACCEPT)\*\*", row[expected_col]).group(1)
        gist = re.search(r'"([^"]+)"', row[check_col])
        expected[name] = (kind, gist.group(1) if gist else None)
    return expected


def _gist_words(gist: str) -> list[str]:
    """The words a reason must contain: the gist without asides in parentheses, numbers, units and
    placeholders (the corpus states its own limits: "240 s", "truncated to N")."""
    words = [word.strip(".,;:()<>\"'").lower() for word in re.sub(r"\([^)]*\)", " ", gist).split()]
    return [word for word in words if len(word) > 1 and not re.fullmatch(r"[\d.]+", word)]


def test_every_broken_input_is_handled_as_expected_md_says(tmp_path, corpus, prep_model, ray_session):
    """Through the command line, on the test session's cluster (`--address`): each file as EXPECTED.md
    says (rejected or warned with the reason it gives), the good files beside them kept, exit status
    3 (partial)."""
    expected = _expected((corpus / "broken" / "EXPECTED.md").read_text(encoding="utf-8"))
    source = tmp_path / "songs"
    source.mkdir()
    good = ["folk_oneills1019_lark_in_the_morning.flac", "chorale_bwv386_nun_danket_alle_gott.m4a",
            "lied_schumann_dichterliebe_2.opus"]
    copies = [p for p in (corpus / "broken").iterdir() if p.suffix != ".md"]
    copies += [p for name in good for p in (corpus / "music").glob(Path(name).stem + ".*")]  # with sidecars
    for path in copies:
        shutil.copyfile(path, source / path.name)  # the corpus is read-only and stays untouched
    # windows hold every file expected to pass quietly (a crop would warn), and no more: fast
    accept = [source / name for name, (kind, _) in expected.items() if kind == "ACCEPT"]
    max_duration = max([8.0] + [float(np.ceil(probe_audio(path).duration)) for path in accept])

    out = tmp_path / "out"
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    address = ray_session.get_runtime_context().gcs_address
    result = subprocess.run([sys.executable, "-m", "acestep_dist.cli", "prep", str(source), "--model", str(prep_model),
                             "--out", str(out), "--address", address, f"max_duration={max_duration}"],
                            capture_output=True, text=True, env=env, timeout=600)

    assert result.returncode == EXIT_PARTIAL, result.stderr[-3000:]
    assert "summary" in result.stdout and "rejected" in result.stdout
    errors = {Path(e["input"]).name: e["reason"] for e in _lines(out / "errors.jsonl")}
    warnings: dict[str, list[str]] = {}
    for w in _lines(out / "warnings.jsonl"):
        warnings.setdefault(Path(w["input"]).name, []).append(w["reason"])
    written = {Path(sample["meta"]["source"]).name: sample for sample in samples_by_key(out).values()}
    for name in good:
        assert name in written and name not in errors, name
    for name, (kind, gist) in expected.items():
        if kind == "REJECT":
            assert name in errors and name not in written, (name, warnings.get(name))
            reasons = [errors[name]]
        elif kind == "WARN":
            assert name in written and name not in errors and warnings.get(name), (name, errors.get(name))
            reasons = warnings[name]
        else:
            assert name in written and name not in errors and name not in warnings, (name, errors.get(name), warnings.get(name))
            continue
        words = _gist_words(gist)
        assert any(all(word in reason.lower() for word in words) for reason in reasons), (name, words, reasons)
    # the 12-minute file is cropped to one window, never decoded whole
    long_file = written.get("long_12min.mp3")
    if long_file is not None:
        assert abs(long_file["meta"]["duration"] - max_duration) < 0.05
    report = json.loads((out / "prep_report.json").read_text())
    rejected = sum(1 for kind, _ in expected.values() if kind == "REJECT")
    assert (report["inputs"], report["rejected"]) == (len(expected) + len(good), rejected)
    assert report["accepted"] == len(expected) + len(good) - rejected
