"""Every source kind becomes the same records; bad rows are rejected with a reason."""

import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from acestep_dist.audio import write_audio
from acestep_dist.config import PrepConfig
from acestep_dist.families.ace_step_15.prompts import text_prompt
from acestep_dist.sources import SourceError, load_source
from acestep_dist.sources.base import make_key


@pytest.fixture
def songs(tmp_path, corpus):
    folder = tmp_path / "songs"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(corpus / "music" / "piano_mozart_k545_allegro.wav", folder / "a.wav")
    shutil.copy(corpus / "music" / "piano_joplin_maple_leaf_rag.mp3", folder / "sub" / "b.mp3")
    shutil.copy(corpus / "music" / "piano_joplin_maple_leaf_rag.mp3", folder / "sub" / "b.flac")  # same stem
    (folder / "a.txt").write_text("solo piano, classical\n")
    (folder / "a_lyrics.txt").write_text("[verse]\nla la\n")
    (folder / "sub" / "b.txt").write_text("ragtime piano")
    (folder / "sub" / "b.lyrics").write_text("[verse]\nshould be ignored with a custom pattern")
    (folder / "sub" / "metadata.csv").write_text("file,bpm,keyscale,timesignature,language\nb.mp3,88.0,Ab major,2/4,en\n")
    return folder


def test_folder_with_sidecars_metadata_and_custom_lyric_names(songs):
    listing = load_source(songs, PrepConfig(lyrics_file="{stem}_lyrics.txt"))
    by_file = {r.audio.split("songs/")[1]: r for r in listing.records}
    # sorted inputs; the second file with stem sub/b gets a suffix
    assert {name: r.key for name, r in by_file.items()} == {"a.wav": "a", "sub/b.flac": "sub/b", "sub/b.mp3": "sub/b_1"}
    assert by_file["a.wav"].caption == "solo piano, classical" and by_file["a.wav"].lyrics == "[verse]\nla la"
    mp3 = by_file["sub/b.mp3"]
    assert mp3.lyrics is None  # b.lyrics does not match {stem}_lyrics.txt
    assert (mp3.bpm, mp3.keyscale, mp3.timesignature, mp3.language) == (88, "Ab major", "2", "en")
    assert by_file["sub/b.flac"].bpm is None  # metadata rows belong to their own file only
    assert by_file["sub/b.flac"].caption == "ragtime piano"  # sidecars go by stem
    assert all(r.audio.startswith("/") for r in listing.records)


def test_missing_caption_is_rejected_or_warned(songs):
    (songs / "a.txt").unlink()
    listing = load_source(songs, PrepConfig())
    assert [p.reason for p in listing.rejected] == ["missing caption a.txt"]
    listing = load_source(songs, PrepConfig(allow_missing_caption=True))
    assert "a" in {r.key for r in listing.records}
    assert any("missing caption a.txt" in p.reason for p in listing.warnings)


def test_canonical_manifest_jsonl_and_csv(songs, tmp_path):
    rows = [
        {"audio": "songs/a.wav", "caption": "piano", "lyrics": "[verse]\nhi", "bpm": 120, "keyscale": "C major",
         "timesignature": 4, "language": "en", "repeat": 3, "alt_captions": ["calm piano"]},
        {"audio": str(songs / "sub" / "b.mp3"), "caption": "rag", "key": "my.key"},
        {"audio": "songs/missing.wav", "caption": "x"},
        {"audio": "songs/a.wav"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    listing = load_source(manifest, PrepConfig())
    assert [r.key for r in listing.records] == ["songs/a", "my_key"]
    assert listing.records[1].keyscale is None  # a manifest's "key" is the sample key, not the musical key
    first = listing.records[0]
    assert (first.repeat, first.alt_captions, first.timesignature, first.bpm) == (3, ("calm piano",), "4", 120)
    reasons = sorted(p.reason for p in listing.rejected)
    assert reasons[0].startswith("audio file not found") and reasons[1].startswith("missing caption")

    csv_path = tmp_path / "m.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["audio", "caption", "bpm"])
        writer.writeheader()
        writer.writerow({"audio": "songs/a.wav", "caption": "piano", "bpm": ""})
    listing = load_source(csv_path, PrepConfig())
    assert listing.records[0].bpm is None and listing.records[0].caption == "piano"


def test_diffsynth_and_acestep_json(songs, tmp_path):
    (songs / "metadata.json").write_text(json.dumps([
        {"audio": "a.wav", "prompt": "piano", "lyrics": "[verse]\nx", "vocal_language": "de", "bpm": 90},
    ]))
    listing = load_source(songs, PrepConfig(), source_type="diffsynth")
    assert listing.records[0].caption == "piano" and listing.records[0].language == "de"

    builder = tmp_path / "dataset.json"
    builder.write_text(json.dumps({"samples": [
        {"audio_path": str(songs / "a.wav"), "caption": "piano", "lyrics": "[Instrumental]", "is_instrumental": True,
         "bpm": 100, "keyscale": "G major", "timesignature": "3", "language": "en", "duration": 20.0},
    ]}))
    listing = load_source(builder, PrepConfig())
    record = listing.records[0]
    assert record.lyrics is None and record.keyscale == "G major" and record.bpm == 100


def test_bad_sources(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        load_source(tmp_path / "nope", PrepConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no audio files"):
        load_source(tmp_path / "empty", PrepConfig())
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(SourceError, match="not valid JSONL"):
        load_source(bad, PrepConfig())
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("path,text\nx,y\n")
    with pytest.raises(SourceError, match="no 'audio' or 'audio_path' column"):
        load_source(wrong, PrepConfig())


@pytest.mark.parametrize("stem, key", [("a.b/c.d", "a_b/c_d"), ("../../etc/passwd", "etc/passwd"), ("/abs/x", "abs/x"),
                                       ("sp ace", "sp_ace")])
def test_keys_are_safe_tar_names(stem, key):
    assert make_key(stem) == key


def test_hugging_face_dataset_with_an_audio_column(songs, tmp_path):
    import datasets

    wav = songs / "a.wav"
    # An Audio column as other tools write it. datasets encodes Audio values only through torchcodec
    # (not installable beside CPU torch), so build the column's Arrow storage and cast it.
    storage = datasets.Features({"bytes": datasets.Value("binary"), "path": datasets.Value("string")})
    features = datasets.Features({"audio": storage, "tags": datasets.List(datasets.Value("string")),
                                  "text_lyrics": datasets.Value("string"), "bpm": datasets.Value("int32")})
    dataset = datasets.Dataset.from_dict({
        "audio": [{"path": str(wav), "bytes": None}, {"bytes": wav.read_bytes(), "path": "inside.wav"}],
        "tags": [["piano", "classical"], ["piano"]],
        "text_lyrics": ["[verse]\nla", None],
        "bpm": [120, None],
    }, features=features).cast_column("audio", datasets.Audio(decode=False))
    assert isinstance(dataset.features["audio"], datasets.Audio)
    saved = tmp_path / "hf"
    dataset.save_to_disk(str(saved))
    config = PrepConfig(audio_caption_fields=["caption", "tags"], lyrics_column="text_lyrics")
    listing = load_source(saved, config, cache_dir=tmp_path / "cache")
    assert [r.caption for r in listing.records] == ["piano, classical", "piano"]
    assert listing.records[0].lyrics == "[verse]\nla" and listing.records[0].bpm == 120
    for record in listing.records:  # datasets may embed files on save: every record gets a readable file
        assert Path(record.audio).read_bytes() == wav.read_bytes()
    with pytest.raises(SourceError, match="no split 'test'"):
        datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "dd"))
        load_source(tmp_path / "dd", PrepConfig(dataset_split="test"))


def test_hugging_face_dataset_with_a_path_column(songs, tmp_path):
    import datasets

    dataset = datasets.Dataset.from_dict({
        "filename": ["songs/a.wav", "songs/missing.wav"], "caption": ["piano", "x"], "lyrics": [None, None],
    })
    dataset.save_to_disk(str(tmp_path / "paths"))
    listing = load_source(tmp_path / "paths", PrepConfig())  # paths resolve against the dataset's parent
    assert [Path(r.audio).name for r in listing.records] == ["a.wav"]
    assert [p.reason for p in listing.rejected] == ["audio file not found: songs/missing.wav"]


def test_manifest_key_is_the_sample_id_not_the_musical_key(tmp_path):
    audio = tmp_path / "a.wav"
    write_audio(audio, np.zeros((2, 4800), dtype=np.float32), 48000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"key": "song_one", "audio": str(audio), "caption": "c", "keyscale": "A minor"}) + "\n"
                        + json.dumps({"key": "song_two", "audio": str(audio), "caption": "c"}) + "\n")
    records = load_source(manifest, PrepConfig()).records
    assert [(r.key, r.keyscale) for r in records] == [("song_one", "A minor"), ("song_two", None)]


# ---- the ACE-Step 1.5 dataset builder's trigger word and caption rules (upstream's get_training_prompt)

def _builder_json(folder: Path, samples: list[dict], **metadata) -> Path:
    """A dataset JSON as upstream's builder saves it: top-level ``metadata`` + ``samples``."""
    audio = folder / "tone.wav"
    if not audio.exists():
        write_audio(audio, np.zeros((2, 4800), np.float32) + 0.1, 48000)
    rows = [{"id": f"s{i}", "audio_path": "tone.wav", "filename": "tone.wav", "caption": "", "genre": "",
             "lyrics": "[Instrumental]", "is_instrumental": True, "custom_tag": "", "labeled": True,
             "prompt_override": None, **sample} for i, sample in enumerate(samples)]
    path = folder / "dataset.json"
    path.write_text(json.dumps({"metadata": {"name": "t", "custom_tag": "", "tag_position": "prepend",
                                             "genre_ratio": 0, **metadata}, "samples": rows}))
    return path


@pytest.mark.parametrize("position, tagged, tag_only", [
    ("prepend", "zx8bit, calm piano", "zx8bit"),
    ("append", "calm piano, zx8bit", "zx8bit"),
    ("replace", "zx8bit", "zx8bit"),
])
def test_builder_custom_tag_in_each_position(tmp_path, position, tagged, tag_only):
    source = _builder_json(tmp_path, [
        {"caption": "calm piano", "custom_tag": "zx8bit"},
        {"caption": "", "custom_tag": "zx8bit"},  # upstream: the tag alone
        {"caption": "calm piano"},  # no tag of its own: the dataset's
        {"caption": "calm piano", "custom_tag": "other", "alt_captions": ["soft keys", "calm piano"]},
    ], custom_tag="zx8bit", tag_position=position)
    records = load_source(source, PrepConfig()).records
    assert [r.caption for r in records] == [tagged, tag_only, tagged, tagged.replace("zx8bit", "other")]
    # alternative captions (ours, not upstream's) carry the tag too; "replace" leaves none
    assert records[3].alt_captions == (() if position == "replace" else
                                       ({"prepend": "other, soft keys", "append": "soft keys, other"}[position],))
    # end to end: the string the text encoder gets carries the trigger word
    assert f"# Caption\n{tagged}\n\n# Metas\n" in text_prompt(records[0])


def test_builder_genre_ratio_and_prompt_override_follow_upstream(tmp_path):
    samples = [{"caption": f"caption {i}", "genre": f"genre {i}"} for i in range(10)]
    samples[3]["labeled"] = False  # upstream preprocesses labeled samples only: not in its draw
    source = _builder_json(tmp_path, samples, genre_ratio=30, custom_tag="zx8bit", tag_position="append")
    records = load_source(source, PrepConfig()).records
    # upstream's select_genre_indices: random.seed(42), shuffle the labeled samples' positions, the first
    # int(n * ratio / 100) take their genre
    labeled = [i for i in range(10) if i != 3]
    order = list(range(len(labeled)))
    state = random.getstate()
    random.seed(42)
    random.shuffle(order)
    random.setstate(state)
    picked = {labeled[j] for j in order[: int(len(labeled) * 30 / 100)]}
    assert len(picked) == 2
    for i, record in enumerate(records):
        source_field = "genre" if i in picked else "caption"
        assert record.caption == f"{source_field} {i}, zx8bit"
        assert record.extra == ({"prompt_from": "genre"} if i in picked else {})
    assert load_source(source, PrepConfig()).records == records  # the same draw every time

    # prompt_override beats the ratio both ways; ratio 100 gives every other sample its genre
    samples = [{"caption": "c0", "genre": "g0", "prompt_override": "caption"},
               {"caption": "c1", "genre": "g1"},
               {"caption": "c2", "genre": "g2", "prompt_override": "genre"}]
    records = load_source(_builder_json(tmp_path, samples, genre_ratio=100), PrepConfig()).records
    assert [r.caption for r in records] == ["c0", "g1", "g2"]
    records = load_source(_builder_json(tmp_path, samples, genre_ratio=0), PrepConfig()).records
    assert [r.caption for r in records] == ["c0", "c1", "g2"]

    # a sample whose prompt is its genre but which has none (and no tag) is rejected like a missing caption
    listing = load_source(_builder_json(tmp_path, [{"caption": "c", "prompt_override": "genre"}]), PrepConfig())
    assert not listing.records and "missing genre" in listing.rejected[0].reason


@pytest.mark.parametrize("metadata, message", [
    (dict(tag_position="middle"), "metadata.tag_position must be one of prepend, append, replace; got 'middle'"),
    (dict(tag_position=None), "metadata.tag_position"),
    (dict(genre_ratio=150), "metadata.genre_ratio must be a number from 0 to 100"),
    (dict(genre_ratio=-0.5), "metadata.genre_ratio"),
    (dict(genre_ratio="50"), "metadata.genre_ratio .*got '50'"),
    (dict(genre_ratio=True), "metadata.genre_ratio"),
    (dict(genre_ratio=None), "metadata.genre_ratio"),
    (dict(custom_tag=["a"]), "metadata.custom_tag must be text"),
])
def test_builder_bad_settings_name_the_field(tmp_path, metadata, message):
    with pytest.raises(SourceError, match=message):
        load_source(_builder_json(tmp_path, [{"caption": "c"}], **metadata), PrepConfig())


def test_builder_bad_prompt_override_rejects_the_sample(tmp_path):
    listing = load_source(_builder_json(tmp_path, [{"caption": "c", "prompt_override": "Genre"}, {"caption": "d"}]),
                          PrepConfig())
    assert [r.caption for r in listing.records] == ["d"]
    assert "prompt_override must be 'caption', 'genre' or null; got 'Genre'" in listing.rejected[0].reason
