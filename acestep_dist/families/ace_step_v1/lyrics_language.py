"""Language segmentation of lyrics, reproducing ACE-Step v1's bundled LangSegment.

Upstream runs LangSegment (0.3.5, a fork of juntaosun/LangSegment) with every py3langid language
enabled. Its results steer tokenisation, quirks included: a capital letter inside a word gets a space
before it, short CJK runs are resolved to ja or zh by look-around rules, some spans are dropped,
and numbers join their neighbours. This module re-implements that behaviour (not its code) so the
ids match; the rules below are upstream's, the comments say why they matter.

Outline: each text line is cut into spans by script (language tags, Hangul, Thai, Cyrillic, number
runs, Latin runs, quotes), each span is swapped for a placeholder, and the line is then walked:
placeholders go to their script's handler, the rest is split at punctuation and classified with
py3langid. Adjacent pieces of one language merge; characters are counted per language (zh twice)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from .lyrics_deps import need
from .lyrics_zh_numbers import ssml_to_chinese

# Upstream's filter list, in its order: exactly py3langid's 97 languages.
LANGUAGES = tuple("""af am an ar as az be bg bn br bs ca cs cy da de dz el en eo es et eu fa fi fo fr ga gl
    gu he hi hr ht hu hy id is it ja jv ka kk km kn ko ku ky la lb lo lt lv mg mk ml mn mr ms mt nb ne nl nn
    no oc or pa pl ps pt qu ro ru rw se si sk sl sq sr sv sw ta te th tl tr ug uk ur vi vo wa xh zh zu""".split())
_LANGUAGE_SET = frozenset(LANGUAGES)
# Upstream also tests codes as substrings of the joined list (so "" and "b" pass some checks).
_JOINED = "-".join(LANGUAGES)

# Because "fr" is in the list, upstream widens its Latin runs with French and Vietnamese letters
# (lower case only: "É" ends a run, which is how "Écoute" gets split off as its own piece).
_FRENCH = "".join(chr(c) for c in (*range(0xE0, 0xF7), *range(0xF9, 0x100)))
_VIETNAMESE = "ăđĩũơư" + "".join(chr(c) for c in range(0x1EA1, 0x1EF2, 2)) + "ỷỹ"

_KEY = re.compile(r"(⑥\$*\d+\d{6,}⑥)")  # a placeholder; "⑥" is a word character, so runs stop at it
_SIX_DIGIT_KEY = re.compile(r"⑥\d{6,}⑥")
_PUNCT_RUN = re.compile(r"([^\w\s]+)")
_SENTENCE = re.compile(r"(.*?[。.?？!！]+\n?)")
_KANA = re.compile(r"[\u3040-\u309F\u30A0-\u30FF]")


def _script_run(chars: str) -> re.Pattern:
    """Letters of one script, with the punctuation and spaces after them and opening quotes before."""
    return re.compile(rf"(([【《（(“‘\"']*[{chars}]+[\W\s]*)+)")


@dataclass
class _Piece:
    lang: str
    text: str
    score: float
    symbol: Any = None  # None: plain text; True: a <xx>…</xx> language tag; str: an SSML tag's name


@functools.cache
def _identifier():
    langid = need("py3langid.langid")
    return langid.LanguageIdentifier.from_pickled_model(langid.MODEL_FILE, norm_probs=True)


@functools.lru_cache(maxsize=8192)  # choruses repeat; the model is deterministic
def _classify(text: str) -> tuple[str, float]:
    lang, score = _identifier().classify(text)
    return lang, round(float(score), 3)


def _squeeze(text: str) -> str:
    """What upstream classifies: punctuation and spaces as one space, repeated characters as one."""
    return re.sub(r"(.)\1+", r"\1", re.sub(r"\W+", " ", text)).strip()


def _only_punctuation(text: str) -> bool:
    return not _PUNCT_RUN.sub("", re.sub(r"\n+", "", text)).strip()


def _numeric_core(text: str) -> tuple[str, bool]:
    """The text without punctuation, and whether that is only digits (or nothing)."""
    if text == "\n":
        return text, False
    core = _PUNCT_RUN.sub("", re.sub(r"\n+", "", text)).strip()
    return core, not re.sub(r"\d+", "", core)


def _has_han(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def _space_before_capitals(text: str) -> str:
    """What upstream does to every English piece: "McCartney" -> "Mc Cartney", plus a trailing space."""
    return re.sub(r"\B([A-Z])", r" \1", text).strip("-") + " "


# Span rules, applied in this order: (placeholder tag, pattern, handler). Later rules see the
# earlier spans as placeholders, so e.g. a number inside Hangul text is already gone.
_RULES = (
    ("$1", re.compile(r"(<([a-zA-Z|-]*)>(.*?)</*[a-zA-Z|-]*>)"), "tag"),
    ("$6", _script_run("\uac00-\ud7a3"), "ko"),
    ("$8", _script_run("\u0e00-\u0e7f"), "th"),
    ("$7", _script_run("А-Яа-яЁё"), "ru"),
    ("00", re.compile(r"(\W*\d+\W+\d*\W*\d*)"), "number"),
    ("$5", _script_run("a-zA-Z" + _FRENCH + _VIETNAMESE), "latin"),
    ("$3", re.compile(r"([\"'])(.*?)(\1)"), "quoted"),
    ("$4", re.compile(r"(\n*[【《（(“‘])([^【《（(“‘’”)）》】]{3,})([’”)）》】][\W\s]*\n?)"), "quoted"),
)


class _Segmenter:
    """One segmentation call's state (upstream keeps it on the LangSegment object)."""

    def __init__(self) -> None:
        self.waiting: list[_Piece] = []  # a piece whose language is still open ("zh|ja|…")
        self.counts: dict[str, int] | None = None
        self.spans: dict[str, tuple[str, tuple[str, ...]]] = {}  # placeholder -> (handler, groups)
        self.at_end = False  # walking the last part of a line

    def run(self, text: str) -> list[_Piece]:
        pieces: list[_Piece] = []
        for line in re.findall(r".*\n*", _KEY.sub("", text)):  # a line keeps its line breaks
            if not line.strip():
                continue
            self.at_end = False
            self.spans = {}
            for tag, pattern, handler in _RULES:
                line = self._mask(tag, pattern, handler, line)
            pieces += self._walk([], line, root=True)
        merged: list[_Piece] = []
        for piece in pieces:
            if merged and merged[-1].lang == piece.lang:
                merged[-1].text += piece.text
            else:
                merged.append(piece)
        return merged

    def _mask(self, tag: str, pattern: re.Pattern, handler: str, line: str) -> str:
        found = list(pattern.finditer(line))
        # a line that is one span, exactly, stays plain text (a quirk of upstream's test)
        if len(found) == 1 and "".join(found[0].groups(default="")) == line:
            return line
        keys = iter(range(len(found)))

        def stash(match: re.Match) -> str:
            key = f"⑥{tag}{next(keys):06d}⑥"
            self.spans[key] = (handler, match.groups(default=""))
            return key

        return pattern.sub(stash, line)

    def _walk(self, words: list[_Piece], text: str, root: bool) -> list[_Piece]:
        parts = _KEY.split(text)
        for i, part in enumerate(parts):
            if root:
                self.at_end = i >= len(parts) - 1
            if i % 2:
                handler, groups = self.spans[part]
                self._span(handler, words, groups)
            else:
                self._plain(words, part)
        return words

    # --- span handlers ---

    def _span(self, handler: str, words: list[_Piece], groups: tuple[str, ...]) -> None:
        if handler in ("ko", "th", "ru"):
            self._add(words, handler, groups[0], 1.0)
        else:
            getattr(self, "_" + handler)(words, groups)

    def _tag(self, words: list[_Piece], groups: tuple[str, ...]) -> None:
        tag, text = groups[1], groups[2]
        if tag in _JOINED:
            self._add(words, tag, text, 1.0, symbol=True)
            return
        chinese = ssml_to_chinese(tag, text)
        if chinese is None:
            self._add(words, tag, text, 1.0, symbol=tag)
        else:
            self._add(words, "zh", chinese, 1.0, symbol=tag)

    def _number(self, words: list[_Piece], groups: tuple[str, ...]) -> None:
        # a number takes the line's first language so far (zh on an empty line)
        self._add(words, words[0].lang if words else "zh", groups[0], 0.0)

    def _latin(self, words: list[_Piece], groups: tuple[str, ...]) -> None:
        # Every py3langid answer is in the filter list, so each sentence keeps its own guess.
        for sentence in _SENTENCE.split(groups[0]):
            if sentence.strip():
                lang, score = _classify(_squeeze(sentence))
                self._add(words, lang, sentence, score)

    def _quoted(self, words: list[_Piece], groups: tuple[str, ...]) -> None:
        whole = "".join(groups)
        if _KEY.search(whole):
            self._walk(words, whole, root=False)
            return
        probe = _squeeze(groups[1])
        if len(probe) <= 5:
            self._plain(words, whole)
        else:
            lang, score = _classify(probe)
            self._add(words, lang, whole, score)

    # --- unmarked text (CJK, other scripts, digits with letters) ---

    def _plain(self, words: list[_Piece], segment: str) -> None:
        chunks = _PUNCT_RUN.split(segment)
        last_index = len(chunks) - 1
        for i, text in enumerate(chunks):  # chunks[i + 1] grows as short chunks are pushed on
            if not text:
                continue
            last = i >= last_index
            following = "" if last else chunks[i + 1]
            if not last and (_only_punctuation(text) or _only_punctuation(following)):
                chunks[i + 1] = text + following
                continue
            probe = _squeeze(re.sub(r"\d+", "", _SIX_DIGIT_KEY.sub("", text)))
            if not last and len(probe) <= 2:  # too short to classify: classify it with what follows
                chunks[i + 1] = text + following
                continue
            lang, score = _classify(probe)
            prev_lang = words[-1].lang if words else None
            if lang != "zh" and all(_has_han(c) for c in re.sub(r"\s", "", probe)):
                lang, score = "zh", 1.0
            if len(probe) <= 5 and _has_han(probe):
                lang = self._han_language(words, text, probe, lang, score, prev_lang, last)
            self._add(words, lang, text, score)

    def _han_language(self, words: list[_Piece], text: str, probe: str, lang: str, score: float,
                      prev_lang: str | None, last: bool) -> str:
        """Short runs with Han characters: ja or zh, or left open ("zh|ja|…") until the next piece."""
        if score < 0.89:
            lang = "ja"  # an unsure guess takes the filter list's priority, and ja precedes zh there
        if _KANA.search(probe):
            return "ja"
        if len(probe) > 2 and score > 0.90:
            return lang
        if last and self.at_end:
            return "zh" if len(probe) <= 1 else lang
        guess = "zh|ja" if lang == "zh" or (len(probe) <= 2 and prev_lang == "zh") else "ja|zh"
        related = bool(prev_lang) and (prev_lang in guess or guess in prev_lang)
        if re.sub(r"\s+", "", text)[-1] in "。.":
            return prev_lang if related and words else lang
        return guess + "|…"

    # --- collecting pieces ---

    def _add(self, words: list[_Piece], lang: str | None, text: str, score: float, symbol: Any = None) -> None:
        if text != "\n" and not text.strip():
            return
        lang = (lang or "").lower()
        if lang == "en":
            text = _space_before_capitals(text)
        had_waiting = bool(self.waiting)
        prev = self.waiting.pop() if had_waiting else None
        if prev is None:
            prev = words[-1] if words else None
        if prev is not None and "|" in prev.lang:
            # an open piece is settled by its successor: to the successor's language if it was a
            # candidate ("in" is a substring test upstream), else to its first candidate
            if lang in prev.lang:
                lang = lang.split("|")[0]
                prev.lang = lang
            else:
                prev.lang = prev.lang.split("|")[0]
            if had_waiting:
                prev = self._save(words, prev.lang, prev.text, prev.score, prev.symbol)
        prev_lang = prev.lang if prev is not None else None
        if "|" in lang and prev_lang and prev_lang not in lang and "…" not in lang:
            lang = lang.split("|")[0]
        if "|" in lang:
            self.waiting.append(_Piece(lang, text, score, symbol))
        else:
            self._save(words, lang, text, score, symbol)

    def _save(self, words: list[_Piece], lang: str, text: str, score: float, symbol: Any = None) -> _Piece:
        core, numeric = _numeric_core(text)
        prev = words[-1] if words else None
        if symbol is None and prev is not None and prev.symbol is None:
            if not core or numeric:  # punctuation or digits join the previous piece's language
                lang = prev.lang
            if prev.lang == lang:
                self._count(prev.lang, text)
                prev.text += text
                return prev
            if _numeric_core(prev.text)[1]:  # a number before is absorbed into this piece
                text = prev.text + text
                words.pop()
        # (upstream's rule for numbers without a predecessor only applies when the filter list
        # starts with ja/zh/en/ko/fr/vi; it starts with af)
        piece = _Piece(lang, text, score, symbol)
        if "?" in lang or lang in _LANGUAGE_SET or lang in LANGUAGES[0]:
            words.append(piece)
            self._count(lang, text)
        return piece  # a language outside the list is dropped, text and all

    def _count(self, lang: str, text: str) -> None:
        if self.counts is None:
            self.counts = {}
        if "|" not in lang:
            self.counts[lang] = self.counts.get(lang, 0) + len(text) * (2 if lang == "zh" else 1)


def segment(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, int]]]:
    """``(segments, counts)``: ``[(lang, text), …]`` in order, and ``[(lang, characters), …]`` most
    first (upstream's ``getTexts`` and ``getCounts``)."""
    if not text.strip():
        return [], [("zh", 0)]
    segmenter = _Segmenter()
    pieces = segmenter.run(text)
    counts = segmenter.counts
    if counts is None:  # nothing was counted: upstream counts the pieces instead
        counts = {}
        for piece in pieces:
            counts[piece.lang] = counts.get(piece.lang, 0) + len(piece.text) * (2 if piece.lang == "zh" else 1)
        if not counts:
            return [], [("zh", 0)]
    ranked = sorted(counts.items(), key=lambda item: item[1], reverse=True)  # stable: ties keep first-seen order
    return [(piece.lang, piece.text) for piece in pieces], ranked


def line_language(line: str) -> str:
    """The language upstream's pipeline picks for one lyric line: the most counted one, or the
    runner-up when that is English (a rule meant for whole songs, applied per line), "en" on error."""
    _identifier()  # a missing package must raise, not read as "en"
    try:
        _, counts = segment(line)
        lang = counts[0][0]
        if len(counts) > 1 and lang == "en":
            lang = counts[1][0]
    except Exception:
        lang = "en"
    return lang
