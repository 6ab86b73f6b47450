"""Issue #11, the sources' part: bad rows, bad values, bad encodings and bad paths are caught where
they enter, each named by its row; keys are unique by construction. Sources never decode audio,
so the fixtures' audio files are a few placeholder bytes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from acestep_dist.config import PrepConfig
from acestep_dist.convert import EXIT_OK, EXIT_PARTIAL, convert_dataset
from acestep_dist.families.ace_step_15.prompts import lyric_prompt, text_prompt
from acestep_dist.sources import load_source
from acestep_dist.sources.base import make_key
from acestep_dist.families import get as get_family

SCHEMA = get_family("ace-step-1.5").schema

def pack_tensors(latent_mean, latent_std, text_states, lyric_ids, alt_text_states=()):
    """An ACE-Step 1.5 sample blob, as its family's schema packs it."""
    return SCHEMA.pack({"latent_mean": latent_mean, "latent_std": latent_std, "text_states": text_states,
                        "lyric_ids": lyric_ids}, [{"text_states": states} for states in alt_text_states])

AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt "  # never decoded here


def _audio(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(AUDIO)
    return path


def _song(folder: Path, name: str, caption: str = "a caption") -> Path:
    audio = _audio(folder / name)
    audio.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return audio


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _write_format(folder: Path, fmt: str, rows: list[dict]) -> Path:
    """``rows`` in canonical manifest spelling, written as ``fmt`` spells them."""
    if fmt == "jsonl":
        return _jsonl(folder / "m.jsonl", rows)
    if fmt == "csv":
        columns = sorted({name for row in rows for name in row})
        with open(folder / "m.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return folder / "m.csv"
    if fmt == "diffsynth":
        renamed = [{{"caption": "prompt", "language": "vocal_language"}.get(k, k): v for k, v in row.items()}
                   for row in rows]
        (folder / "metadata.json").write_text(json.dumps(renamed, ensure_ascii=False), encoding="utf-8")
        return folder / "metadata.json"
    assert fmt == "acestep-json"
    samples = [{{"audio": "audio_path"}.get(k, k): v for k, v in row.items()} for row in rows]
    (folder / "dataset.json").write_text(json.dumps({"metadata": {}, "samples": samples}, ensure_ascii=False),
                                         encoding="utf-8")
    return folder / "dataset.json"


def _save_dataset(folder: Path, columns: dict) -> Path:
    import datasets

    datasets.Dataset.from_dict(columns).save_to_disk(str(folder))
    return folder


def _save_upstream(folder: Path, rows: list[tuple[str, str]]) -> Path:
    """An upstream convert2hf dataset: (keys, filename) rows."""
    import datasets

    n = len(rows)
    features = datasets.Features({
        "keys": datasets.Value("string"), "filename": datasets.Value("string"),
        "tags": datasets.List(datasets.Value("string")), "speaker_emb_path": datasets.Value("string"),
        "norm_lyrics": datasets.Value("string"),
    })
    datasets.Dataset.from_dict({"keys": [k for k, _ in rows], "filename": [f for _, f in rows],
                                "tags": [["piano"]] * n, "speaker_emb_path": [""] * n, "norm_lyrics": [""] * n},
                               features=features).save_to_disk(str(folder))
    return folder


def _manifest_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- item 1: keys are unique by construction, in every source; non-Latin names stay readable

def test_folder_keys_stay_unique_when_a_suffix_is_a_real_stem(tmp_path):
    for name in ("c/dup.flac", "c/dup.wav", "c/dup_1.wav"):
        _song(tmp_path / "songs", name)
    records = load_source(tmp_path / "songs", PrepConfig()).records
    keys = {Path(r.audio).relative_to(tmp_path / "songs").as_posix(): r.key for r in records}
    assert keys == {"c/dup.flac": "c/dup", "c/dup.wav": "c/dup_2", "c/dup_1.wav": "c/dup_1"}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "diffsynth", "acestep-json"])
def test_manifest_keys_stay_unique_when_a_suffix_is_a_real_key(tmp_path, fmt):
    _audio(tmp_path / "a.wav")
    rows = [{"audio": "a.wav", "caption": f"take {i}", "key": key} for i, key in enumerate(["song", "song_1", "song_1"])]
    listing = load_source(_write_format(tmp_path, fmt, rows), PrepConfig())
    assert [r.key for r in listing.records] == ["song", "song_1", "song_1_1"]
    # the changed key the user gave is a warning naming the row
    [warning] = [w for w in listing.warnings if "key 'song_1'" in w.reason]
    assert "already used" in warning.reason and "'song_1_1'" in warning.reason and warning.row.endswith(
        {"jsonl": "m.jsonl:3", "csv": "m.csv:4", "diffsynth": "metadata.json sample 3",
         "acestep-json": "dataset.json sample 3"}[fmt])


def test_hf_dataset_and_convert_keys_stay_unique(tmp_path):
    _audio(tmp_path / "data" / "a.wav")
    _save_dataset(tmp_path / "ds", {"audio": ["data/a.wav"] * 3, "caption": ["x", "y", "z"], "key": ["k", "k", "k_1"]})
    assert [r.key for r in load_source(tmp_path / "ds", PrepConfig()).records] == ["k", "k_2", "k_1"]
    convert_dataset(str(tmp_path / "ds"), tmp_path / "m.jsonl", log=lambda _: None)
    assert [row["key"] for row in _manifest_rows(tmp_path / "m.jsonl")] == ["k", "k_2", "k_1"]


def test_upstream_no_dedupe_keys_stay_unique(tmp_path):
    _audio(tmp_path / "data" / "a.wav")
    _audio(tmp_path / "data" / "b.wav")
    _save_upstream(tmp_path / "ds", [("k", "data/a.wav"), ("k_1", "data/b.wav")] * 2)
    convert_dataset(str(tmp_path / "ds"), tmp_path / "all.jsonl", dedupe=False, log=lambda _: None)
    keys = [row["key"] for row in _manifest_rows(tmp_path / "all.jsonl")]
    assert keys == ["k", "k_1", "k_2", "k_1_1"] and len(set(keys)) == 4


def test_non_latin_file_names_keep_readable_unique_keys(tmp_path):
    for name in ("歌.flac", "曲.flac", "Noël/café.wav", "песня.mp3"):
        _song(tmp_path / "songs", name)
    keys = sorted(r.key for r in load_source(tmp_path / "songs", PrepConfig()).records)
    assert keys == sorted(["歌", "曲", "Noël/café", "песня"])
    # decomposed accents (as macOS names files) give the same key as composed ones
    assert make_key("Noe\u0308l/cafe\u0301") == "Noël/café"
    # keys are tar member names: they survive a shard (written and read by our shard code) unchanged
    import fsspec
    import torch

    from acestep_dist.shards import EncodedSample, iter_samples, shard_name, write_shard

    meta = {"duration": 1.0, "frames": 1, "text_tokens": 1, "lyric_tokens": 1, "source": "s", "offset": 0.0}
    blob = pack_tensors(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.int32))
    write_shard(fsspec.filesystem("file"), str(tmp_path), 0, [EncodedSample(key, meta, blob) for key in keys],
                [], [], "fingerprint", "plan", SCHEMA)
    with open(tmp_path / shard_name(0), "rb") as f:
        assert [sample["key"] for sample in iter_samples(f)] == keys


@pytest.mark.parametrize("stem, key", [
    ("a..b", "a_b"), ("x__seg000", "x_seg000"), ("../../etc/passwd", "etc/passwd"), ("a./b", "a/b"),
    ("歌 (live).mp3", "歌_live_mp3"), ("", "sample"),
])
def test_keys_are_webdataset_safe_and_never_spell_a_segment(stem, key):
    assert make_key(stem) == key
    assert make_key(key) == key  # a converted manifest's keys come back unchanged


# ---- items 2 and 14: every metadata field is checked at the source, warnings name row and field

BAD_ROWS = [
    {"audio": "a.wav", "caption": "good", "bpm": 120, "keyscale": "c# MIN", "timesignature": "3/4", "language": "EN"},
    {"audio": "b.wav", "caption": "bad meta", "keyscale": 7, "bpm": "fast", "timesignature": "banana", "language": "xx"},
    {"audio": "c.wav", "caption": "negative", "bpm": -5},
    {"audio": "d.wav", "caption": "fractional repeat", "repeat": 1.7},
]


def _check_bad_rows(listing, rows: dict[str, str]) -> None:
    """``rows``: audio name -> the row id its problems must name."""
    by_name = {Path(r.audio).name: r for r in listing.records}
    assert set(by_name) == {"a.wav", "b.wav", "c.wav"}
    a, b, c = by_name["a.wav"], by_name["b.wav"], by_name["c.wav"]
    assert (a.bpm, a.keyscale, a.timesignature, a.language) == (120, "C# minor", "3", "en")
    assert (b.bpm, b.keyscale, b.timesignature, b.language) == (None, None, None, None)
    assert c.bpm is None
    for record in listing.records:  # what used to fail the text encoder's whole batch
        assert "- keyscale: " in text_prompt(record) and "# Languages" in lyric_prompt(record)

    def warned(name, field):
        return [w for w in listing.warnings if w.reason.startswith(f"{field} ") and rows[name] in w.reason
                and w.row == rows[name]]
    for field in ("bpm", "keyscale", "timesignature", "language"):
        assert warned("b.wav", field), (field, [w.reason for w in listing.warnings])
    assert "is outside ACE-Step's range 30-300" in warned("c.wav", "bpm")[0].reason
    assert "'xx' is not a language code" in warned("b.wav", "language")[0].reason
    assert not [w for w in listing.warnings if w.row == rows["a.wav"]]
    [rejected] = listing.rejected
    assert rejected.row == rows["d.wav"] and rejected.reason.startswith("repeat must be a whole number")
    assert "1.7" in rejected.reason


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "diffsynth", "acestep-json"])
def test_bad_metadata_values_in_manifests(tmp_path, fmt):
    for row in BAD_ROWS:
        _audio(tmp_path / row["audio"])
    path = _write_format(tmp_path, fmt, BAD_ROWS)
    line = {"jsonl": lambda i: f"{path}:{i + 1}", "csv": lambda i: f"{path}:{i + 2}"}.get(
        fmt, lambda i: f"{path} sample {i + 1}")
    _check_bad_rows(load_source(path, PrepConfig()), {row["audio"]: line(i) for i, row in enumerate(BAD_ROWS)})


def test_bad_metadata_values_in_a_folder_metadata_table(tmp_path):
    songs = tmp_path / "songs"
    for row in BAD_ROWS:
        _song(songs, row["audio"], row["caption"])
    with open(songs / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "bpm", "keyscale", "timesignature", "language"])
        writer.writeheader()
        writer.writerows({"file": r["audio"], **{k: r.get(k, "") for k in writer.fieldnames[1:]}} for r in BAD_ROWS)
    listing = load_source(songs, PrepConfig())
    b = next(r for r in listing.records if r.audio.endswith("b.wav"))
    assert (b.bpm, b.keyscale, b.timesignature, b.language) == (None, None, None, None)
    reasons = [w.reason for w in listing.warnings]
    for field, value in (("bpm", "fast"), ("keyscale", "7"), ("timesignature", "banana"), ("language", "xx")):
        assert any(r.startswith(f"{field} '{value}'") and f"metadata.csv:3" in r for r in reasons), (field, reasons)
    assert any(r.startswith("bpm '-5'") and "metadata.csv:4" in r for r in reasons)


def test_bad_metadata_values_in_a_hf_dataset(tmp_path):
    for name in ("a.wav", "b.wav"):
        _audio(tmp_path / "data" / name)
    _save_dataset(tmp_path / "ds", {"audio": ["data/a.wav", "data/b.wav"], "caption": ["x", "y"],
                                    "keyscale": [7, 3], "bpm": ["120", "fast"], "language": ["de", "klingon"]})
    listing = load_source(tmp_path / "ds", PrepConfig())
    assert [(r.keyscale, r.bpm, r.language) for r in listing.records] == [(None, 120, "de"), (None, None, None)]
    assert sorted(w.reason.split(" ")[0] + "@" + w.row.rsplit("[", 1)[1] for w in listing.warnings) == [
        "bpm@1]", "keyscale@0]", "keyscale@1]", "language@1]"]


def test_non_text_caption_or_lyrics_reject_the_row_and_bad_alt_captions_are_dropped(tmp_path):
    _audio(tmp_path / "a.wav")
    path = _jsonl(tmp_path / "m.jsonl", [
        {"audio": "a.wav", "caption": 5},
        {"audio": "a.wav", "caption": "ok", "lyrics": ["not", "text"]},
        {"audio": "a.wav", "caption": "nul\u0000byte"},
        {"audio": "a.wav", "caption": "kept", "alt_captions": ["fine", 3], "key": "kept"},
        {"audio": "a.wav", "caption": "kept too", "alt_captions": 3},
    ])
    listing = load_source(path, PrepConfig())
    assert [(r.caption, r.alt_captions) for r in listing.records] == [("kept", ("fine",)), ("kept too", ())]
    assert [(p.row.rsplit(":", 1)[1], p.reason.split(" ")[0]) for p in listing.rejected] == [
        ("1", "caption"), ("2", "lyrics"), ("3", "caption")]
    assert "caption must be text; got 5" in listing.rejected[0].reason
    assert {w.row.rsplit(":", 1)[1] for w in listing.warnings if w.reason.startswith("alt_captions")} == {"4", "5"}


# ---- item 9: a manifest line that is not an object is one rejected row, named by its line

def test_manifest_line_that_is_not_an_object_is_rejected_naming_the_line(tmp_path):
    _audio(tmp_path / "a.wav")
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([
        json.dumps({"audio": "a.wav", "caption": "first"}),
        "",
        json.dumps(["a.wav", "a list"]),
        "5",
        "{not json",
        json.dumps({"audio": "a.wav", "caption": "last"}),
    ]) + "\n")
    listing = load_source(path, PrepConfig())
    assert [r.caption for r in listing.records] == ["first", "last"]
    assert [p.row for p in listing.rejected] == [f"{path}:3", f"{path}:4", f"{path}:5"]
    assert "not an object but list" in listing.rejected[0].reason and f"{path}:3" in listing.rejected[0].reason
    assert "line 5 is not valid JSON" in listing.rejected[2].reason


# ---- item 12: texts in a legacy encoding are read with a warning, garbage still fails

TEXT = "Größe, Ärger, Übermut, Ñandú, café"


def test_legacy_encoded_sidecars_and_metadata_are_decoded_with_a_warning(tmp_path):
    songs = tmp_path / "songs"
    _audio(songs / "a.wav")
    (songs / "a.txt").write_bytes(TEXT.encode("cp1252"))  # Notepad's "ANSI"
    (songs / "a.lyrics").write_bytes(("[verse]\n" + TEXT).encode("cp1252"))
    _audio(songs / "b.wav")
    (songs / "b.txt").write_bytes(TEXT.encode("utf-16"))  # Notepad's "Unicode": with a BOM
    _audio(songs / "c.wav")
    (songs / "metadata.csv").write_bytes(f"file,caption,keyscale\nc.wav,{TEXT.replace(',', ';')},A minor\n".encode("cp1252"))
    _audio(songs / "d.wav")
    (songs / "d.txt").write_bytes(bytes(range(0x80, 0xA0)) * 4)  # undefined in Windows-1252: not text
    _audio(songs / "e.wav")
    (songs / "e.txt").write_bytes(b"\x00\x01\x02binary\x00")
    listing = load_source(songs, PrepConfig())
    by_name = {Path(r.audio).name: r for r in listing.records}
    assert by_name["a.wav"].caption == TEXT and by_name["a.wav"].lyrics == "[verse]\n" + TEXT
    assert TEXT in text_prompt(by_name["a.wav"]) and TEXT in lyric_prompt(by_name["a.wav"])
    assert by_name["b.wav"].caption == TEXT
    assert by_name["c.wav"].caption == TEXT.replace(",", ";") and by_name["c.wav"].keyscale == "A minor"
    warned = {Path(w.reason.split(" ")[0]).name: w.reason for w in listing.warnings}
    assert set(warned) == {"a.txt", "a.lyrics", "metadata.csv"}
    assert all("read as Windows-1252" in reason for reason in warned.values())
    rejected = {Path(p.input).name: p.reason for p in listing.rejected}
    assert set(rejected) == {"d.wav", "e.wav"}
    assert "d.txt is not text in UTF-8, UTF-16 (with BOM) or Windows-1252" in rejected["d.wav"]
    assert "e.txt is not text" in rejected["e.wav"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_legacy_encoded_manifest_is_decoded_with_a_warning(tmp_path, suffix):
    _audio(tmp_path / "a.wav")
    path = tmp_path / f"m{suffix}"
    if suffix == ".jsonl":
        text = json.dumps({"audio": "a.wav", "caption": TEXT, "lyrics": TEXT}, ensure_ascii=False) + "\n"
    else:
        text = f'audio,caption,lyrics\na.wav,"{TEXT}","{TEXT}"\n'
    path.write_bytes(text.encode("cp1252"))
    listing = load_source(path, PrepConfig())
    [record] = listing.records
    assert record.caption == TEXT and record.lyrics == TEXT
    [warning] = listing.warnings
    assert warning.input == str(path) and "read as Windows-1252" in warning.reason


# ---- item 15: a dataset's audio paths stay inside its folders unless the user allows otherwise

@pytest.fixture
def outside(tmp_path) -> dict:
    """A dataset whose rows name a file inside its audio root, one through ../ and one by absolute path."""
    _audio(tmp_path / "root" / "data" / "ok.wav")
    secret = _audio(tmp_path / "secret" / "key.wav")
    paths = ["data/ok.wav", "../secret/key.wav", str(secret)]
    return {"tmp": tmp_path, "paths": paths, "secret": secret}


def test_hf_dataset_paths_outside_the_audio_root_are_refused(outside):
    tmp = outside["tmp"]
    _save_dataset(tmp / "elsewhere" / "ds", {"audio": outside["paths"], "caption": ["a", "b", "c"]})
    out = tmp / "m.jsonl"
    result = convert_dataset(str(tmp / "elsewhere" / "ds"), out, audio_root=tmp / "root", log=lambda _: None)
    assert result.exit_code == EXIT_PARTIAL
    assert [Path(row["audio"]).name for row in _manifest_rows(out)] == ["ok.wav"]
    assert len(result.report["rejected"]) == 2
    assert all("leads outside" in p["reason"] and "--allow-outside-paths" in p["reason"]
               for p in result.report["rejected"])
    result = convert_dataset(str(tmp / "elsewhere" / "ds"), out, audio_root=tmp / "root", allow_outside_paths=True,
                             log=lambda _: None)
    assert result.exit_code == EXIT_OK
    assert [row["audio"] for row in _manifest_rows(out)][1:] == [str(outside["secret"])] * 2

    # prep reading a dataset directly: its folder, its parent and the cwd are the roots; never outside
    _save_dataset(tmp / "root" / "ds", {"audio": outside["paths"] + ["/etc/passwd"], "caption": ["a", "b", "c", "d"]})
    listing = load_source(tmp / "root" / "ds", PrepConfig())
    assert [Path(r.audio).name for r in listing.records] == ["ok.wav"]
    assert len(listing.rejected) == 3 and all("acedist convert" in p.reason for p in listing.rejected)


def test_upstream_dataset_paths_outside_the_audio_root_are_refused(outside):
    from click.testing import CliRunner

    from acestep_dist.cli import cli

    tmp = outside["tmp"]
    _save_upstream(tmp / "root" / "ds", [(f"k{i}", path) for i, path in enumerate(outside["paths"] + ["/etc/passwd"])])
    listing = load_source(tmp / "root" / "ds", PrepConfig())  # prep: upstream's converter ran in root/
    assert [r.key for r in listing.records] == ["k0"]
    assert [p.input for p in listing.rejected] == outside["paths"][1:] + ["/etc/passwd"]
    assert all("leads outside" in p.reason and "--allow-outside-paths" in p.reason for p in listing.rejected)

    out = tmp / "m.jsonl"
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(tmp / "root" / "ds"), "--out", str(out)])
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert [row["key"] for row in _manifest_rows(out)] == ["k0"]
    result = runner.invoke(cli, ["convert", str(tmp / "root" / "ds"), "--out", str(out), "--allow-outside-paths"])
    assert [row["key"] for row in _manifest_rows(out)] == ["k0", "k1", "k2", "k3"]


def test_a_users_own_manifest_may_still_name_audio_anywhere(outside):
    tmp = outside["tmp"]
    path = _jsonl(tmp / "root" / "m.jsonl", [{"audio": p, "caption": "c"} for p in outside["paths"]])
    assert len(load_source(path, PrepConfig()).records) == 3


# ---- item 16: one listing entry per row, rejected rows included, each naming its row

def test_listing_has_one_entry_per_row_even_when_rows_share_a_file(tmp_path):
    _audio(tmp_path / "a.wav")
    path = _jsonl(tmp_path / "m.jsonl", [
        {"audio": "a.wav", "caption": "one"}, {"audio": "a.wav", "caption": "two"},
        {"audio": "gone.wav", "caption": "x"}, {"audio": "gone.wav", "caption": "y"}, [1],
    ])
    listing = load_source(path, PrepConfig())
    rows = [r.row for r in listing.records] + [p.row for p in listing.rejected]
    assert sorted(rows) == [f"{path}:{line}" for line in range(1, 6)]
    assert all(p.to_dict()["row"] == p.row for p in listing.rejected)  # errors.jsonl carries it

    _save_dataset(tmp_path / "ds", {"audio": ["a.wav", "a.wav", "gone.wav", "gone.wav"], "caption": ["1", "2", "3", "4"]})
    listing = load_source(tmp_path / "ds", PrepConfig())
    rows = [r.row for r in listing.records] + [p.row for p in listing.rejected]
    assert sorted(rows) == [f"{tmp_path / 'ds'}[{i}]" for i in range(4)]

    songs = tmp_path / "songs"
    _song(songs, "a.wav")
    _audio(songs / "b.wav")  # no caption: rejected
    listing = load_source(songs, PrepConfig())
    assert [r.row for r in listing.records] + [p.row for p in listing.rejected] == [
        str(songs / "a.wav"), str(songs / "b.wav")]
