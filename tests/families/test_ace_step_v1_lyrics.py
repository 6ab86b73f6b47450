"""ACE-Step v1 lyric tokenisation: ids equal upstream's on its training and inference paths.

The reference ids were made by running upstream ACE-Step (d612523) on 12 lyric strings
(../shared/v1/fixtures/lyrics_cases.json); the vocabulary is upstream's vocab.json (../shared/v1)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from acestep_dist.errors import UserError
from acestep_dist.families.ace_step_v1 import lyrics
from acestep_dist.families.ace_step_v1.lyrics import (LyricsVocabError, UnsupportedLyricsLanguage,
                                                      find_lyrics_vocab, lyric_ids_and_mask, tokenize_lyrics)
from acestep_dist.families.ace_step_v1.lyrics_deps import LyricsDependencyError, need

SHARED = Path(os.environ.get("ACESTEP_SHARED") or Path(__file__).resolve().parents[2].parent / "shared")
VOCAB = SHARED / "v1" / "vocab.json"
CASES_FILE = SHARED / "v1" / "fixtures" / "lyrics_cases.json"
LANGUAGE_PACKAGES = ("pypinyin", "hangul_romanize", "num2words", "py3langid", "cutlet")


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _cases() -> list[dict]:
    if not CASES_FILE.is_file():
        return []
    return json.loads(CASES_FILE.read_text(encoding="utf-8"))["cases"]


CASES = _cases()
CASE_IDS = [case["name"] for case in CASES]


@pytest.fixture(scope="module")
def vocab() -> Path:
    if not (VOCAB.is_file() and CASES_FILE.is_file()):
        _unavailable(f"ACE-Step v1 lyric fixtures not found under {SHARED / 'v1'} (set ACESTEP_SHARED)")
    missing = [name for name in LANGUAGE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        _unavailable(f"missing {', '.join(missing)}: pip install 'acestep-dist[v1]'")
    return VOCAB


def test_fixture_set_is_complete(vocab):
    assert len(CASES) == 12 and "empty" in CASE_IDS and "song_60_lines" in CASE_IDS


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_training_ids_equal_upstream(vocab, case):
    expected = case["training"]
    assert tokenize_lyrics(case["lyrics"], vocab, "training") == expected["tokenize_lyrics"]
    ids, mask = lyric_ids_and_mask(case["lyrics"], vocab, "training", max_tokens=4096)
    assert ids == expected["dataset_lyric_token_id"]
    assert mask == expected["dataset_lyric_mask"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_inference_ids_equal_upstream(vocab, case):
    expected = case["inference"]
    assert tokenize_lyrics(case["lyrics"], vocab, "inference") == expected["tokenize_lyrics"]
    ids, mask = lyric_ids_and_mask(case["lyrics"], vocab, "inference")
    assert ids == expected["call_lyric_token_idx"]
    assert mask == expected["call_lyric_mask"]


def test_empty_lyrics_rules(vocab):
    # training: empty, blank and upstream's prompt-like "lyrics" train as id 0 with mask 1
    for text in ("", None, "  \n\t", "write a happy pop song that genre is disco"):
        assert lyric_ids_and_mask(text, vocab, "training") == ([0], [1])
    # inference: only "" is no lyrics (id 0, mask 0); blank text is tokenised
    assert lyric_ids_and_mask("", vocab, "inference") == ([0], [0])
    assert lyric_ids_and_mask(" ", vocab, "inference") == ([261, 2], [1, 1])
    assert tokenize_lyrics("", vocab, "training") == [261]
    assert tokenize_lyrics("", vocab, "inference") == [261, 2]


def test_max_tokens_cuts_ids(vocab):
    ids, mask = lyric_ids_and_mask("[verse]\nhold me close tonight", vocab, "training", max_tokens=3)
    assert ids == [261, 259, 6683] and mask == [1, 1, 1]


def test_unsupported_main_language_is_an_error_in_training_only(vocab):
    # upstream's trainer raises (its dataset then skips the sample); py3langid reads "hello world" as Xhosa
    for text, lang in (("Καλημέρα αγάπη μου, σε σκέφτομαι", "el"), ("[verse]\nhello world", "xh")):
        with pytest.raises(UnsupportedLyricsLanguage, match=f"'{lang}'"):
            tokenize_lyrics(text, vocab, "training")
        ids = tokenize_lyrics(text, vocab, "inference")  # unsupported line languages read as English
        assert ids[:2] == [261, 259] and ids[-1] == 2
    assert tokenize_lyrics("[verse]\nhold me close tonight", vocab, "training") == [
        261, 259, 6683, 2, 259, 510, 79, 2, 80, 2, 1095, 439, 18, 2, 1007, 343, 583, 2]  # upstream's ids


def test_bad_path_name(vocab):
    with pytest.raises(UserError, match="training, inference"):
        tokenize_lyrics("hello", vocab, "train")


# --- vocabulary location ---------------------------------------------------------------------------

def _says_where_and_how(message: str) -> None:
    assert "lyrics_vocab=PATH" in message
    assert "acestep/models/lyrics_utils/vocab.json" in message


def test_missing_vocab_path(tmp_path):
    missing = tmp_path / "nowhere" / "vocab.json"
    with pytest.raises(LyricsVocabError) as error:
        find_lyrics_vocab(missing)
    assert isinstance(error.value, UserError)
    assert str(missing) in str(error.value)
    _says_where_and_how(str(error.value))
    with pytest.raises(LyricsVocabError, match="folder"):
        find_lyrics_vocab(tmp_path)


def test_vocab_that_is_not_a_bpe_vocabulary(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import BPE, WordLevel

    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"hello": 1}', encoding="utf-8")
    word_level = tmp_path / "word_level.json"
    Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(str(word_level))
    other_bpe = tmp_path / "other_bpe.json"
    Tokenizer(BPE({"a": 0, "b": 1}, [])).save(str(other_bpe))
    for path, reason in ((garbage, "not a tokenizers vocabulary"), (word_level, "not a BPE"),
                         (other_bpe, "not ACE-Step v1's")):
        with pytest.raises(LyricsVocabError, match=reason) as error:
            find_lyrics_vocab(path)
        _says_where_and_how(str(error.value))


def test_no_installed_acestep(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(LyricsVocabError) as error:
        find_lyrics_vocab()
    message = str(error.value)
    assert "not found" in message
    _says_where_and_how(message)
    assert "github.com/ace-step/ACE-Step" in message


def test_installed_acestep_is_found_without_importing_it(vocab, tmp_path, monkeypatch):
    package = tmp_path / "acestep"
    (package / "models" / "lyrics_utils").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('acestep must not be imported')\n")
    (package / "models" / "lyrics_utils" / "vocab.json").symlink_to(vocab)
    monkeypatch.delitem(sys.modules, "acestep", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    found = find_lyrics_vocab()
    assert found == package / "models" / "lyrics_utils" / "vocab.json"
    assert "acestep" not in sys.modules
    assert tokenize_lyrics("[chorus]", None, "inference") == [261, 259, 6684, 2]


def test_tokenizer_is_loaded_once_per_file(vocab):
    resolved = str(vocab.resolve())
    assert lyrics._tokenizer(resolved) is lyrics._tokenizer(resolved)


def test_missing_language_package_names_the_extra():
    with pytest.raises(LyricsDependencyError, match=r"pip install 'acestep-dist\[v1\]'"):
        need("acestep_dist_no_such_package")
