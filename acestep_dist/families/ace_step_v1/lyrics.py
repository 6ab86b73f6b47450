"""ACE-Step v1's lyric tokenisation, id for id with upstream on both of its paths.

* ``"training"``: upstream's trainer (``Text2MusicDataset.tokenize_lyrics``). The whole text is
  segmented by language; each segment's lines are encoded in the song's most counted language,
  or in the segment's own when that gives an unknown token.
* ``"inference"``: upstream's pipeline (``ACEStepPipeline.tokenize_lyrics``). Each stripped line is
  encoded in its own detected language.

Both start with ``[START]`` (261), end every line with ``[SPACE]`` (2), encode lines that start with a
``[tag]`` as English, and BPE-encode ``"[lang]" + cleaned text`` with spaces as ``[SPACE]``. A line
whose encoding fails is left out, as upstream does (with a warning here). ``lyric_ids_and_mask`` adds
what each caller does with empty lyrics. The vocabulary is upstream's ``vocab.json``
(``find_lyrics_vocab``); the language packages come with ``pip install 'acestep-dist[v1]'``."""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
from pathlib import Path
from typing import Callable

from ...errors import UserError
from .lyrics_cleaners import clean
from .lyrics_deps import LyricsDependencyError, need
from .lyrics_language import line_language, segment

log = logging.getLogger(__name__)

START, LINE_BREAK, UNKNOWN, EMPTY = 261, 2, 1, 0
PATHS = ("training", "inference")
# languages with a [lang] token; others are encoded as English
SUPPORTED_LANGUAGES = frozenset("en de fr es it pt pl tr ru cs nl ar zh ja hu ko hi".split())
_STRUCTURE = re.compile(r"\[.*?\]")  # tested at a line's start: [verse], [chorus], …
_PROMPT_LIKE = re.compile(r"write a .* song that genre is")  # upstream's dataset treats these as no lyrics
_VOCAB_IN_PACKAGE = Path("models", "lyrics_utils", "vocab.json")
_WHERE = ("get it from https://github.com/ace-step/ACE-Step (file acestep/models/lyrics_utils/vocab.json) "
          "and pass it with the option lyrics_vocab=PATH")
_EXPECTED_IDS = {"[START]": START, "[SPACE]": LINE_BREAK, "[UNK]": UNKNOWN, "[STOP]": EMPTY, "[en]": 259}


class LyricsVocabError(UserError):
    """The lyric vocabulary is missing or is not ACE-Step v1's."""


class UnsupportedLyricsLanguage(UserError, ValueError):
    """Training path: the lyrics' main language has no language token (upstream raises and its
    dataset skips the sample)."""


# --- vocabulary ---------------------------------------------------------------------------------

def _installed_vocab() -> Path | None:
    """vocab.json inside an installed ``acestep`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec("acestep")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / _VOCAB_IN_PACKAGE
        if candidate.is_file():
            return candidate
    return None


def find_lyrics_vocab(explicit: str | Path | None = None) -> Path:
    """The lyric vocab.json: ``explicit`` if given (checked), else an installed ACE-Step v1's."""
    if explicit is not None and str(explicit) != "":
        path = Path(explicit).expanduser()
        if path.is_dir():
            raise LyricsVocabError(f"lyrics_vocab {str(explicit)!r} is a folder, not the vocab.json file; {_WHERE}")
        if not path.is_file():
            raise LyricsVocabError(f"lyrics_vocab {str(explicit)!r}: no such file; {_WHERE}")
        _tokenizer(str(path.resolve()))
        return path
    installed = _installed_vocab()
    if installed is None:
        raise LyricsVocabError("ACE-Step v1's lyric vocabulary (vocab.json) was not found: no installed "
                               f"ACE-Step v1 package (acestep) ships acestep/{_VOCAB_IN_PACKAGE.as_posix()}; {_WHERE}")
    return installed


@functools.lru_cache(maxsize=8)
def _tokenizer(resolved: str):
    """The BPE tokenizer of a vocab file, loaded once per process and path."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    try:
        tokenizer = Tokenizer.from_file(resolved)
    except Exception as error:
        raise LyricsVocabError(f"{resolved} is not a tokenizers vocabulary ({error}); {_WHERE}") from None
    if not isinstance(tokenizer.model, BPE):
        raise LyricsVocabError(f"{resolved} is a {type(tokenizer.model).__name__} vocabulary, not a BPE one; {_WHERE}")
    wrong = {token: tokenizer.token_to_id(token) for token, expected in _EXPECTED_IDS.items()
             if tokenizer.token_to_id(token) != expected}
    if wrong:
        raise LyricsVocabError(f"{resolved} is not ACE-Step v1's lyric vocabulary (token ids {wrong}); {_WHERE}")
    return tokenizer


def _encoder(vocab_path: str | Path | None) -> Callable[[str, str], tuple[int, ...]]:
    resolved = str(find_lyrics_vocab(vocab_path).resolve())
    _tokenizer(resolved)
    return functools.partial(_encode, resolved)


@functools.lru_cache(maxsize=65536)  # lines repeat (choruses), and cleaning is the slow part
def _encode(resolved: str, line: str, lang: str) -> tuple[int, ...]:
    """Upstream's ``VoiceBpeTokenizer.encode``: ``[lang]`` + cleaned text, spaces as ``[SPACE]``."""
    text = clean(line, lang)
    tag = "zh-cn" if lang == "zh" else lang
    return tuple(_tokenizer(resolved).encode(f"[{tag}]{text}".replace(" ", "[SPACE]")).ids)


def _try_encode(encode: Callable[[str, str], tuple[int, ...]], line: str, lang: str, main: str | None = None
                ) -> tuple[int, ...] | None:
    """A line's ids, or None when encoding fails (upstream logs the line and leaves it out)."""
    try:
        if _STRUCTURE.match(line):
            return encode(line, "en")
        if main is None:
            return encode(line, lang)
        ids = encode(line, main)
        return encode(line, lang) if UNKNOWN in ids else ids
    except LyricsDependencyError:
        raise
    except Exception as error:
        log.warning("lyrics line %r (language %s) could not be tokenised and is left out: %s", line, lang, error)
        return None


# --- the two paths ------------------------------------------------------------------------------

def _training_ids(encode: Callable[[str, str], tuple[int, ...]], lyrics: str) -> list[int]:
    segments, counts = segment(lyrics)
    main = (counts[0][0] if counts else "") or "en"
    if main not in SUPPORTED_LANGUAGES:
        raise UnsupportedLyricsLanguage(f"lyrics in an unsupported language ({main!r}); ACE-Step v1 reads "
                                        f"{', '.join(sorted(SUPPORTED_LANGUAGES))} (upstream's trainer skips such "
                                        f"songs; lyrics_tokenizer=inference reads them as English)")
    ids = [START]
    for lang, text in segments:
        lang = lang if lang in SUPPORTED_LANGUAGES else "en"
        # segment texts keep upstream's inserted spaces: " [chorus]" is no tag line here
        for line in text.split("\n"):
            if not line.strip():
                ids.append(LINE_BREAK)
                continue
            piece = _try_encode(encode, line, lang, main)
            if piece is not None:
                ids += piece
                ids.append(LINE_BREAK)
    return ids


def _inference_ids(encode: Callable[[str, str], tuple[int, ...]], lyrics: str) -> list[int]:
    ids = [START]
    for line in lyrics.split("\n"):
        line = line.strip()
        if not line:
            ids.append(LINE_BREAK)
            continue
        lang = line_language(line)
        piece = _try_encode(encode, line, lang if lang in SUPPORTED_LANGUAGES else "en")
        if piece is not None:
            ids += piece
            ids.append(LINE_BREAK)
    return ids


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise UserError(f"lyrics tokenizer path {path!r} is not one of {', '.join(PATHS)}")


def tokenize_lyrics(text: str | None, vocab_path: str | Path | None = None, path: str = "training") -> list[int]:
    """Upstream's ids for ``text`` on ``path`` ("training" or "inference"), empty lyrics included
    (``[261]`` / ``[261, 2]``); ``vocab_path`` None finds an installed ACE-Step's vocabulary."""
    _check_path(path)
    encode = _encoder(vocab_path)
    text = text or ""
    return _training_ids(encode, text) if path == "training" else _inference_ids(encode, text)


def lyric_ids_and_mask(text: str | None, vocab_path: str | Path | None = None, path: str = "training",
                       max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """``(ids, mask)`` as the model receives them. No lyrics: ``[0]`` with mask ``[1]`` in training
    (whitespace-only text too, and upstream's ``write a … song that genre is`` prompts), ``[0]`` with
    mask ``[0]`` at inference (only for ``""``). ``max_tokens`` cuts the ids (upstream's trainer: 4096)."""
    _check_path(path)
    text = text or ""
    if path == "training":
        if _PROMPT_LIKE.search(text) or not text.strip():
            ids = [EMPTY]
        else:
            ids = tokenize_lyrics(text, vocab_path, path)
        ids = ids[:max_tokens] if max_tokens is not None else ids
        return ids, [1] * len(ids)
    if len(text) == 0:
        return [EMPTY], [0]
    ids = tokenize_lyrics(text, vocab_path, path)
    ids = ids[:max_tokens] if max_tokens is not None else ids
    return ids, [1] * len(ids)


def warm_up(vocab_path: str | Path | None = None) -> None:
    """Load the vocabulary and the language packages now (e.g. in a Ray actor's constructor)."""
    _encoder(vocab_path)
    need("num2words")
    need("pypinyin")
    line_language("warm up")
