"""`acedist convert`: upstream ACE-Step v1 datasets and SimpleTuner-style HF datasets -> manifest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acestep_dist.config import PrepConfig
from acestep_dist.convert import EXIT_OK, EXIT_PARTIAL, convert_dataset, report_path
from acestep_dist.errors import UserError
from acestep_dist.sources import SourceError, load_source

from conftest import samples_by_key

ROOT = Path(__file__).resolve().parents[1]

# (keys, corpus file or None for a missing one, tags, lyrics, recaption)
SONGS = [
    ("piano_mozart", "piano_mozart_k545_allegro.wav", ["classical", "solo piano"], "",
     {"simplified": "calm piano", "expanded": "a calm piano sonata", "descriptive": "calm piano"}),
    ("rag", "piano_joplin_maple_leaf_rag.mp3", ["rock, indie", "piano"], "[verse]\nla la", {}),
    ("chorale v2.1", "chorale_bwv269_aus_meines_herzens_grunde.mp3", ["chorale", "organ"], "[verse]\nnun", {}),
    ("lark", "folk_oneills1019_lark_in_the_morning.flac", [], "", {}),
    ("gone", None, ["lost"], "", {}),
    ("brass", "brass_haydn_op1no1_presto.ogg", ["brass", "classical"], "", {"simplified": "brass, classical"}),
]


def upstream_features():
    import datasets

    return datasets.Features({
        "keys": datasets.Value("string"),
        "filename": datasets.Value("string"),
        "tags": datasets.List(datasets.Value("string")),
        "speaker_emb_path": datasets.Value("string"),
        "norm_lyrics": datasets.Value("string"),
        "recaption": {name: datasets.Value("string") for name in ("simplified", "expanded", "descriptive")},
    })


def save_upstream(folder: Path, songs, repeat: int) -> Path:
    """What upstream's converter writes: every song row ``repeat`` times, paths relative to its cwd."""
    import datasets

    rows = [{"keys": key, "filename": name, "tags": tags, "speaker_emb_path": "", "norm_lyrics": lyrics,
             "recaption": recaption} for key, name, tags, lyrics, recaption in songs] * repeat
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    datasets.Dataset.from_dict(columns, features=upstream_features()).save_to_disk(str(folder))
    return folder


def spell_tags_as_sequence(folder: Path) -> None:
    """Rewrite a saved dataset as older `datasets` versions wrote it: ``tags`` as a ``Sequence``
    feature, in dataset_info.json and in the Arrow files' schema metadata."""
    import pyarrow as pa

    old = {"feature": {"dtype": "string", "_type": "Value"}, "length": -1, "id": None, "_type": "Sequence"}
    info = json.loads((folder / "dataset_info.json").read_text())
    info["features"]["tags"] = old
    (folder / "dataset_info.json").write_text(json.dumps(info))
    for arrow in folder.glob("*.arrow"):
        table = pa.ipc.open_stream(arrow.read_bytes()).read_all()
        meta = json.loads(table.schema.metadata[b"huggingface"])
        meta["info"]["features"]["tags"] = old
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
        with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)


@pytest.fixture
def workdir(tmp_path, corpus) -> Path:
    """The folder upstream's converter ran in: audio under data/, the dataset saved in ds/."""
    (tmp_path / "data").mkdir()
    songs = []
    for key, name, tags, lyrics, recaption in SONGS:
        if name is not None:
            shutil.copy(corpus / "music" / name, tmp_path / "data" / name)
        songs.append((key, f"data/{name or 'gone.mp3'}", tags, lyrics, recaption))
    save_upstream(tmp_path / "ds", songs, repeat=3)
    return tmp_path


def _manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_upstream_manifest(rows: list[dict], workdir: Path) -> None:
    by_key = {row["key"]: row for row in rows}
    assert list(by_key) == ["piano_mozart", "rag", "chorale_v2_1", "lark", "brass"]  # first-seen order, safe keys
    assert all(row["repeat"] == 3 for row in rows)
    assert all(row["audio"] == str((workdir / "data").resolve() / Path(row["audio"]).name) for row in rows)
    assert by_key["rag"]["caption"] == "rock, indie, piano"  # a tag with a comma stays whole
    assert by_key["lark"]["caption"] == "music"  # upstream's caption for no tags
    assert by_key["piano_mozart"]["alt_captions"] == ["calm piano", "a calm piano sonata"]
    assert by_key["brass"]["alt_captions"] == []  # equal to the tag caption
    assert by_key["rag"]["alt_captions"] == []
    assert by_key["rag"]["lyrics"] == "[verse]\nla la" and by_key["piano_mozart"]["lyrics"] is None


def test_upstream_dataset_collapses_repeats_and_reports_the_missing_file(workdir):
    out = workdir / "out" / "songs.jsonl"
    lines = []
    result = convert_dataset(str(workdir / "ds"), out, log=lines.append)
    assert result.exit_code == EXIT_PARTIAL
    rows = _manifest(out)
    assert len(rows) == 5
    _check_upstream_manifest(rows, workdir)
    report = json.loads(report_path(out).read_text())
    assert report == result.report
    assert (report["kind"], report["rows"], report["records"], report["duplicates_collapsed"]) == ("upstream", 18, 5, 12)
    assert [p["input"] for p in report["rejected"]] == ["data/gone.mp3"]
    assert any("data/gone.mp3: audio file not found" in line for line in lines)
    assert not list(out.parent.glob("*.tmp"))

    # the manifest is what prep reads: same keys, repeats and alternative captions come back
    records = load_source(out, PrepConfig()).records
    assert [r.to_dict() for r in records] == [r.to_dict() for r in load_source(workdir / "ds", PrepConfig()).records]
    assert [(r.key, r.repeat, r.alt_captions) for r in records][0] == (
        "piano_mozart", 3, ("calm piano", "a calm piano sonata"))


def test_no_dedupe_keeps_every_row_with_unique_keys(workdir):
    out = workdir / "all.jsonl"
    result = convert_dataset(str(workdir / "ds"), out, dedupe=False, log=lambda _: None)
    rows = _manifest(out)
    assert len(rows) == 15 and all(row["repeat"] == 1 for row in rows)
    assert len({row["key"] for row in rows}) == 15
    assert [row["key"] for row in rows][:6] == ["piano_mozart", "rag", "chorale_v2_1", "lark", "brass", "piano_mozart_1"]
    assert [p["input"] for p in result.report["rejected"]] == ["data/gone.mp3"]  # one file, not one per row


def test_old_sequence_spelling_of_tags_reads_the_same(workdir):
    spell_tags_as_sequence(workdir / "ds")
    assert '"_type": "Sequence"' in (workdir / "ds" / "dataset_info.json").read_text()
    out = workdir / "old.jsonl"
    convert_dataset(str(workdir / "ds"), out, log=lambda _: None)
    _check_upstream_manifest(_manifest(out), workdir)


def test_audio_root_and_prep_reading_the_upstream_folder(workdir, tmp_path_factory):
    moved = tmp_path_factory.mktemp("elsewhere") / "ds"
    shutil.move(workdir / "ds", moved)  # the dataset's parent no longer holds data/
    with pytest.raises(UserError, match="no row could be converted.*--audio-root"):
        convert_dataset(str(moved), workdir / "none.jsonl", log=lambda _: None)
    assert not (workdir / "none.jsonl").exists() and report_path(workdir / "none.jsonl").exists()
    result = convert_dataset(str(moved), workdir / "rooted.jsonl", audio_root=workdir, log=lambda _: None)
    assert result.report["records"] == 5
    with pytest.raises(UserError, match="is not a folder"):
        convert_dataset(str(moved), workdir / "x.jsonl", audio_root=workdir / "nope", log=lambda _: None)

    # prep's source reader: the same records (text limits aside), one rejection for the missing file
    shutil.move(moved, workdir / "ds")
    listing = load_source(workdir / "ds", PrepConfig())
    keys = ["piano_mozart", "rag", "chorale_v2_1", "lark", "brass"]
    assert [(r.key, r.repeat) for r in listing.records] == [(key, 3) for key in keys]
    assert [p.input for p in listing.rejected] == ["data/gone.mp3"]
    # forced to the generic reader: every row is its own record, a song without tags has no caption
    assert len(load_source(workdir / "ds", PrepConfig(), source_type="hf").records) == 4 * 3
    import datasets

    datasets.Dataset.from_dict({"audio": ["data/rag.mp3"], "caption": ["x"]}).save_to_disk(str(workdir / "plain"))
    with pytest.raises(SourceError, match="not an upstream ACE-Step dataset"):
        load_source(workdir / "plain", PrepConfig(), source_type="upstream")


def test_cli_exit_status_and_report(workdir, tmp_path_factory):
    """Run from the converter's folder with the dataset elsewhere: paths resolve against the cwd."""
    moved = tmp_path_factory.mktemp("cli") / "ds"
    shutil.move(workdir / "ds", moved)
    out = workdir / "cli.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "acestep_dist.cli", "convert", str(moved), "--out", str(out)],
                            cwd=workdir, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == EXIT_PARTIAL, result.stderr[-2000:]
    assert "read 18 rows" in result.stdout and "12 duplicate rows collapsed" in result.stdout
    assert "1 not converted" in result.stdout and "data/gone.mp3" in result.stdout
    assert f"wrote 5 records to {out}" in result.stdout
    assert json.loads(report_path(out).read_text())["records"] == 5
    bad = subprocess.run([sys.executable, "-m", "acestep_dist.cli", "convert", str(moved), "--out", str(workdir / "m.csv")],
                         cwd=workdir, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("Error: --out")


def test_simpletuner_style_dataset_with_configured_columns(workdir):
    import datasets

    datasets.Dataset.from_dict({
        "file_path": ["data/piano_joplin_maple_leaf_rag.mp3", "data/missing.wav"],
        "description": ["ragtime piano", "x"],
        "song_lyrics": ["[verse]\nhey", None],
        "bpm": [96, None],
    }).save_to_disk(str(workdir / "st"))
    config = PrepConfig(audio_caption_fields=["description"], lyrics_column="song_lyrics", audio_column="file_path")
    out = workdir / "st.jsonl"
    result = convert_dataset(str(workdir / "st"), out, config=config, log=lambda _: None)
    assert result.exit_code == EXIT_PARTIAL and result.report["kind"] == "hf"
    [row] = _manifest(out)
    assert (row["caption"], row["lyrics"], row["bpm"], row["repeat"], row["alt_captions"]) == (
        "ragtime piano", "[verse]\nhey", 96, 1, [])
    assert [p["reason"] for p in result.report["rejected"]] == ["audio file not found: data/missing.wav"]
    shutil.move(workdir / "st", workdir / "data" / "st")  # its parent no longer holds data/
    result = convert_dataset(str(workdir / "data" / "st"), out, config=config, audio_root=workdir, log=lambda _: None)
    assert result.report["records"] == 1


def test_prep_of_converted_manifest_equals_prep_of_the_folder(tmp_path, corpus, prep_model, ray_session):
    """The same songs as a sidecar folder and as the manifest converted from an upstream dataset."""
    from pipelines.prep import run_prep

    folder = tmp_path / "songs"
    folder.mkdir()
    names = ["chorale_bwv227_7_jesu_meine_freude", "piano_joplin_maple_leaf_rag"]  # with and without lyrics
    songs = []
    for stem in names:
        audio = next(p for p in (corpus / "music").glob(f"{stem}.*") if p.suffix not in (".txt", ".lyrics"))
        shutil.copy(audio, folder / audio.name)
        caption = (corpus / "music" / f"{stem}.txt").read_text().strip()
        shutil.copy(corpus / "music" / f"{stem}.txt", folder)
        lyrics = ""
        if (corpus / "music" / f"{stem}.lyrics").exists():
            shutil.copy(corpus / "music" / f"{stem}.lyrics", folder)
            lyrics = (corpus / "music" / f"{stem}.lyrics").read_text().strip()
        # what upstream's converter makes of NAME_prompt.txt / NAME_lyrics.txt
        songs.append((stem, f"songs/{audio.name}", caption.split(", "), lyrics, {}))
    save_upstream(tmp_path / "upstream", songs, repeat=3)
    assert convert_dataset(str(tmp_path / "upstream"), tmp_path / "songs.jsonl", log=lambda _: None).exit_code == EXIT_OK

    config = PrepConfig(max_duration=5, shard_size_mb=1)
    # prep reading the upstream folder directly lists the very records of the manifest (so, being
    # deterministic, makes the same samples: one prep run fewer)
    assert [r.to_dict() for r in load_source(tmp_path / "upstream", config).records] == [
        r.to_dict() for r in load_source(tmp_path / "songs.jsonl", config).records]
    preps = {}
    for name, source in [("folder", folder), ("manifest", tmp_path / "songs.jsonl")]:
        out = tmp_path / f"shards-{name}"
        assert run_prep(str(source), str(prep_model), str(out), config, log=lambda _: None).exit_code == 0
        preps[name] = samples_by_key(out)
    reference = preps.pop("folder")
    assert set(reference) == set(names)
    for name, samples in preps.items():
        assert set(samples) == set(reference), name
        for key, sample in samples.items():
            meta, expected = dict(sample["meta"]), dict(reference[key]["meta"])
            assert (meta.pop("repeat"), expected.pop("repeat")) == (3, 1)  # the one intended difference
            assert meta == expected, (name, key)
            for tensor in ("latent_mean", "latent_std", "text_states", "lyric_ids"):
                assert torch.equal(sample[tensor], reference[key][tensor]), (name, key, tensor)
