"""Per-language text cleaning before BPE, as ACE-Step v1's VoiceBpeTokenizer does it (the XTTS-v2
cleaners): lower case, numbers/abbreviations/symbols spelled out, then pinyin for zh, romaja for ko
and Hepburn romaji for ja."""

from __future__ import annotations

import functools
import re

from .lyrics_deps import need
from .lyrics_zh_numbers import normalize_chinese

# Languages the multilingual cleaner handles (ja and hi have their own; anything else is an error).
MULTILINGUAL = frozenset("ar cs de en es fr hu it nl pl pt ru tr zh ko".split())

# "abbreviation=expansion;…", tried in order (so "mrs" before "mr"); an abbreviation matches at a
# word start and needs its dot, except in Russian, which matches whole words without one.
_ABBREVIATIONS = {
    "en": "mrs=misess;mr=mister;dr=doctor;st=saint;co=company;jr=junior;maj=major;gen=general;drs=doctors;"
          "rev=reverend;lt=lieutenant;hon=honorable;sgt=sergeant;capt=captain;esq=esquire;ltd=limited;"
          "col=colonel;ft=fort",
    "es": "sra=señora;sr=señor;dr=doctor;dra=doctora;st=santo;co=compañía;jr=junior;ltd=limitada",
    "fr": "mme=madame;mr=monsieur;dr=docteur;st=saint;co=compagnie;jr=junior;ltd=limitée",
    "de": "fr=frau;dr=doktor;st=sankt;co=firma;jr=junior",
    "pt": "sra=senhora;sr=senhor;dr=doutor;dra=doutora;st=santo;co=companhia;jr=júnior;ltd=limitada",
    "it": "sig=signore;dr=dottore;st=santo;co=compagnia;jr=junior;ltd=limitata",
    "pl": "p=pani;m=pan;dr=doktor;sw=święty;jr=junior",
    "cs": "dr=doktor;ing=inženýr;p=pan",
    "ru": "г-жа=госпожа;г-н=господин;д-р=доктор",
    "nl": "dhr=de heer;mevr=mevrouw;dr=dokter;jhr=jonkheer",
    "tr": "b=bay;byk=büyük;dr=doktor",
    "hu": "dr=doktor;b=bácsi;nőv=nővér",
    "ar": "", "zh": "", "ko": "",
}
_ABBREVIATION_RULES = {
    lang: [(re.compile(rf"\b{short}\b" if lang == "ru" else rf"\b{short}\.", re.IGNORECASE), long)
           for short, long in (pair.split("=") for pair in table.split(";") if pair)]
    for lang, table in _ABBREVIATIONS.items()
}

# The words for & @ % # $ £ °, in that order, each read with spaces around it.
_SYMBOLS = "&@%#$£°"
_SYMBOL_WORDS = {
    "en": "and|at|percent|hash|dollar|pound|degree",
    "es": "y|arroba|por ciento|numeral|dolar|libra|grados",
    "fr": "et|arobase|pour cent|dièse|dollar|livre|degrés",
    "de": "und|at|prozent|raute|dollar|pfund|grad",
    "pt": "e|arroba|por cento|cardinal|dólar|libra|graus",
    "it": "e|chiocciola|per cento|cancelletto|dollaro|sterlina|gradi",
    "pl": "i|małpa|procent|krzyżyk|dolar|funt|stopnie",
    "ar": "و|على|في المئة|رقم|دولار|جنيه|درجة",
    "zh": "和|在|百分之|号|美元|英镑|度",
    "cs": "a|na|procento|křížek|dolar|libra|stupně",
    "ru": "и|собака|процентов|номер|доллар|фунт|градус",
    "nl": "en|bij|procent|hekje|dollar|pond|graden",
    "tr": "ve|at|yüzde|diyez|dolar|sterlin|derece",
    "hu": "és|kukac|százalék|kettőskereszt|dollár|font|fok",
    "ko": "그리고|에|퍼센트|번호|달러|파운드|도",
}

# Ordinal endings per language; alternation order matters ("2os" reads as "2o" + "s" in Spanish).
_ORDINAL_ENDINGS = {
    "en": "st|nd|rd|th", "es": "º|ª|er|o|a|os|as", "fr": "º|ª|er|re|e|ème",
    "de": r"st|nd|rd|th|º|ª|\.(?=\s|$)", "pt": "º|ª|o|a|os|as", "it": "º|°|ª|o|a|i|e",
    "pl": "º|ª|st|nd|rd|th", "ar": "ون|ين|ث|ر|ى", "ru": "-й|-я|-е|-ое|-ье|-го", "nl": "de|ste|e",
    "tr": r"\.|inci|nci|uncu|üncü|\.", "hu": r"\.|adik|edik|odik|edik|ödik|ödike|ik", "ko": "번째|번|차|째",
}
_ORDINALS = {lang: re.compile(rf"([0-9]+)({endings})") for lang, endings in _ORDINAL_ENDINGS.items()}
_ORDINALS["cs"] = re.compile(r"([0-9]+)\.(?=\s|$)")  # Czech marks ordinals with a dot alone

_COMMA_GROUPED = re.compile(r"\b\d{1,3}(,\d{3})*(\.\d+)?\b")  # en/ru: 1,000.5
_DOT_GROUPED = re.compile(r"\b\d{1,3}(.\d{3})*(\,\d+)?\b")  # others: 1.000,5 (the unescaped "." is upstream's)
_CURRENCIES = (  # tried in this order; the first failure skips the rest
    ("GBP", re.compile(r"((£[0-9\.\,]*[0-9]+)|([0-9\.\,]*[0-9]+£))")),
    ("USD", re.compile(r"((\$[0-9\.\,]*[0-9]+)|([0-9\.\,]*[0-9]+\$))")),
    ("EUR", re.compile(r"(([0-9\.\,]*[0-9]+€)|((€[0-9\.\,]*[0-9]+)))")),
)
_CURRENCY_AND = {"es": " con ", "fr": " et ", "de": " und ", "pt": " e ", "it": " e "}  # others: ", "
_DECIMAL = re.compile(r"([0-9]+[.,][0-9]+)")
_INTEGER = re.compile(r"[0-9]+")


def _num2words_code(lang: str) -> str:
    return "cz" if lang == "cs" else lang


def _currency(amount_text: str, lang: str, currency: str) -> str:
    num2words = need("num2words").num2words
    amount = float(re.sub(r"[^\d.]", "", amount_text.replace(",", ".")))
    words = num2words(amount, to="currency", currency=currency, lang=_num2words_code(lang))
    if amount.is_integer():  # drop the ", zero cents" part
        cut = words.rfind(_CURRENCY_AND.get(lang, ", "))
        if cut != -1:
            words = words[:cut]
    return words


def expand_numbers(text: str, lang: str) -> str:
    """Digits as words: grouped thousands, currencies, decimals, ordinals, then plain numbers."""
    if lang == "zh":
        return normalize_chinese(text)
    num2words = need("num2words").num2words
    code = _num2words_code(lang)
    if lang in ("en", "ru"):
        text = _COMMA_GROUPED.sub(lambda m: m.group(0).replace(",", ""), text)
    else:
        text = _DOT_GROUPED.sub(lambda m: m.group(0).replace(".", ""), text)
    try:
        for currency, pattern in _CURRENCIES:
            text = pattern.sub(lambda m: _currency(m.group(0), lang, currency), text)
    except Exception:
        pass  # num2words lacks some currencies in some languages; upstream then keeps the digits
    if lang != "tr":
        text = _DECIMAL.sub(lambda m: num2words(float(m.group(1).replace(",", ".")), lang=code), text)
    text = _ORDINALS[lang].sub(lambda m: num2words(int(m.group(1)), ordinal=True, lang=code), text)
    return _INTEGER.sub(lambda m: num2words(int(m.group(0)), lang=code), text)


def expand_abbreviations(text: str, lang: str) -> str:
    for pattern, expansion in _ABBREVIATION_RULES[lang]:
        text = pattern.sub(expansion, text)
    return text


def expand_symbols(text: str, lang: str) -> str:
    for symbol, word in zip(_SYMBOLS, _SYMBOL_WORDS[lang].split("|")):
        text = text.replace(symbol, f" {word} ").replace("  ", " ")
    return text.strip()


def multilingual_clean(text: str, lang: str) -> str:
    """Upstream's multilingual_cleaners: a stage that raises is skipped, keeping its input."""
    text = text.replace('"', "")
    if lang == "tr":
        text = text.replace("İ", "i").replace("Ö", "ö").replace("Ü", "ü")
    text = text.lower()
    for stage in (expand_numbers, expand_abbreviations, expand_symbols):
        try:
            text = stage(text, lang)
        except Exception:
            pass
    return re.sub(r"\s+", " ", text)


def pinyin(text: str) -> str:
    """Numbered-tone pinyin, syllables run together ("ni3hao3"), other characters kept."""
    pypinyin = need("pypinyin")
    syllables = pypinyin.pinyin(text, style=pypinyin.Style.TONE3, heteronym=False, neutral_tone_with_five=True)
    return "".join(choices[0] for choices in syllables)


@functools.cache
def _hangul_transliter():
    return need("hangul_romanize").Transliter(need("hangul_romanize.rule").academic)


@functools.cache
def _cutlet():
    # building Cutlet loads MeCab with unidic-lite: once per process
    return need("cutlet").Cutlet()


def clean(text: str, lang: str) -> str:
    """The text BPE sees for ``lang`` (upstream's ``VoiceBpeTokenizer.preprocess_text``)."""
    if lang in MULTILINGUAL:
        text = multilingual_clean(text, lang)
        if lang == "zh":
            text = pinyin(text)
        elif lang == "ko":
            text = _hangul_transliter().translit(text)
        return text
    if lang == "ja":
        return _cutlet().romaji(text).lower()
    if lang == "hi":
        return re.sub(r"\s+", " ", text.lower())
    raise NotImplementedError(f"Language '{lang}' is not supported.")
