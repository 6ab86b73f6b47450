"""Chinese number reading for ACE-Step v1's lyric cleaners.

Two readers, as upstream has two: ``normalize_chinese`` is what its zh cleaner runs before pinyin
(the TextNorm of coqui's XTTS, defaults only), and ``ssml_to_chinese`` is what its language
segmenter does with ``<number>``/``<telephone>``/``<currency>``/``<date>`` tags (GPT-SoVITS'
reading). They differ in small ways (两 for 2, where zeros are read), so both are kept."""

from __future__ import annotations

import re
import string

_DIGITS = "零一二三四五六七八九"
_POINT = "点"
# "mid" system: 十百千万 are 10^1..10^4, then 亿兆京… step by 10^4 from 10^8
_UNITS = [(1, "十"), (2, "百"), (3, "千"), (4, "万")] + [
    (8 + 4 * i, unit) for i, unit in enumerate("亿兆京垓秭穰沟涧正载")]
_UNIT_CHAR = dict(_UNITS)

# Symbols of a reading: ("d", digit), ("u", power), ("p", 0) for the point, ("l", 2) for 两.
Symbol = tuple[str, int]


def _grouped(value: str) -> list[Symbol]:
    """An integer string as digits and units, a zero read where digits are skipped (一百零五)."""
    stripped = value.lstrip("0")
    if not stripped:
        return []
    if len(stripped) == 1:
        zero = [("d", 0)] if len(stripped) != len(value) else []
        return zero + [("d", int(stripped))]
    power = max(p for p, _ in _UNITS if p < len(stripped))
    return _grouped(value[:-power]) + [("u", power)] + _grouped(stripped[-power:])


def num2chn(number: str, alt_two: bool = True, use_units: bool = True) -> str:
    """``"12.5"`` -> ``"十二点五"``; without units digit by digit (``"2024"`` -> ``"二零二四"``)."""
    parts = number.split(".")
    if len(parts) > 2:
        raise ValueError(f"more than one point in {number!r}")
    whole, decimals = parts[0], (parts[1] if len(parts) == 2 else "")
    if use_units and len(whole) > 1:
        symbols = _grouped(whole)
    else:
        symbols = [("d", int(c)) for c in whole]
    if decimals:
        symbols += [("p", 0)] + [("d", int(c)) for c in decimals]
    if alt_two:
        # 两 for a 2 before 百/千/万/…, unless a 十 is next to it (二十, 十二万 keep 二)
        for i, (kind, value) in enumerate(symbols):
            if (kind, value) != ("d", 2):
                continue
            after = symbols[i + 1] if i + 1 < len(symbols) else None
            before = symbols[i - 1] if i > 0 else None
            before_ok = before is None or (before[0] == "u" and before[1] != 1)
            if after and after[0] == "u" and after[1] != 1 and before_ok:
                symbols[i] = ("l", 2)
    text = "".join(_render(symbol) for symbol in symbols)
    if text.startswith(_POINT):
        return _DIGITS[0] + text
    if len(text) >= 2 and text[0] == "一" and text[1] == "十":  # 一十五 is read 十五
        text = text[1:]
    return text


def _render(symbol: Symbol) -> str:
    kind, value = symbol
    if kind == "d":
        return _DIGITS[value]
    if kind == "u":
        return _UNIT_CHAR[value]
    return _POINT if kind == "p" else "两"


# --- TextNorm (the zh cleaner) ----------------------------------------------------------------

_SCALE = "亿|千万|百万|万|千|百"
_MONEY_UNIT = f"(({_SCALE})|({_SCALE}|)元|({_SCALE}|)块|角|毛|分)"  # alternation order decides the match
# measure words after a number ("3个", "5千克"); only whether one follows matters, so a class does
_MEASURE_WORDS = ("匹张座回场尾条个首阙阵网炮顶丘棵只支袭辆挑担颗壳窠曲墙群腔砣客贯扎捆刀令打手罗坡山岭江溪钟队"
                  "单双对出口头脚板跳枝件贴针线管名位身堂课本页家户层丝毫厘分钱两斤铢石钧锱忽寸尺丈里寻常铺程撮"
                  "勺合升斗盘碗碟叠桶笼盆盒杯斛锅簋篮罐瓶壶卮盏箩箱煲啖袋钵年月日季刻时周天秒旬纪岁世更夜春夏秋"
                  "冬代伏辈丸泡粒幢堆根道面片块")
_MEASURE = f"(?:[{_MEASURE_WORDS}]|[千微][克米])"

_DATE = re.compile(r"\D+((([089]\d|(19|20)\d{2})年)?(\d{1,2}月(\d{1,2}[日号])?)?)")
_MONEY = re.compile(rf"\D+((\d+(\.\d+)?)[多余几]?{_MONEY_UNIT}(\d{_MONEY_UNIT}?)?)")
_MOBILE = re.compile(r"\D((\+?86 ?)?1([38]\d|5[0-35-9]|7[678]|9[89])\d{8})\D")
_LANDLINE = re.compile(r"\D((0(10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})\D")
_FRACTION = re.compile(r"(\d+/\d+)")
_PERCENT = re.compile(r"(\d+(\.\d+)?%)")
_COUNTED = re.compile(rf"(\d+(\.\d+)?)[多余几]?{_MEASURE}")
_DIGIT_RUN = re.compile(r"(\d{4,32})")
_NUMBER = re.compile(r"(\d+(\.\d+)?)")
_LATIN_TWO = re.compile(r"(([a-zA-Z]+)二([a-zA-Z]+))")  # P2P, B2B: undo the 二

# every CJK / full-width punctuation mark TextNorm knows, plus ASCII's, becomes an ASCII comma
_PUNCT_RANGES = ((0xB7, 0xB7), (0x2013, 0x2014), (0x2018, 0x2019), (0x201B, 0x201F), (0x2026, 0x2027),
                 (0x3001, 0x3003), (0x3008, 0x3011), (0x3014, 0x301F), (0x3030, 0x3030), (0x303E, 0x303F),
                 (0xFE4F, 0xFE4F), (0xFF01, 0xFF0D), (0xFF0F, 0xFF0F), (0xFF1A, 0xFF20), (0xFF3B, 0xFF40),
                 (0xFF5B, 0xFF64))
_PUNCTUATION = string.punctuation + "".join(chr(c) for lo, hi in _PUNCT_RANGES for c in range(lo, hi + 1))
_PUNCT_TO_COMMA = str.maketrans(_PUNCTUATION, "," * len(_PUNCTUATION))


def _each(text: str, pattern: re.Pattern, convert) -> str:
    """Rewrite the first occurrence of each match's group 1, in order (TextNorm's replace-once loop)."""
    for found in [m.group(1) for m in pattern.finditer(text)]:
        text = text.replace(found, convert(found), 1)
    return text


def _date(date: str) -> str:
    year, sep, rest = date.strip().partition("年")
    if sep:
        year = num2chn(year, alt_two=False, use_units=False) + "年"
    else:
        year, rest = "", date
    month = day = ""
    if rest:
        month, sep, day = rest.strip().partition("月")
        if sep:
            month = num2chn(month) + "月"
        else:
            month, day = "", date
        if day:
            day = num2chn(day[:-1]) + day[-1]
    return year + month + day


def _money(money: str) -> str:
    for found in [m.group(1) for m in _NUMBER.finditer(money)]:
        money = money.replace(found, num2chn(found))
    return money


def _phone(number: str, landline: bool) -> str:
    parts = number.split("-") if landline else number.strip("+").split()
    return "".join(num2chn(part, alt_two=False, use_units=False) for part in parts)


def _fraction(fraction: str) -> str:
    numerator, denominator = fraction.split("/")
    return num2chn(denominator) + "分之" + num2chn(numerator)


def normalize_chinese(text: str) -> str:
    """Numbers read in Chinese (dates, money, phone numbers, fractions, percentages, counts, digit
    runs, plain numbers, in that order), then punctuation made commas."""
    text = "^" + text + "$"  # so the patterns that need a non-digit before a number see one
    text = _each(text, _DATE, _date)
    text = _each(text, _MONEY, _money)
    text = _each(text, _MOBILE, lambda s: _phone(s, landline=False))
    text = _each(text, _LANDLINE, lambda s: _phone(s, landline=True))
    text = _each(text, _FRACTION, _fraction)
    text = _each(text.replace("％", "%"), _PERCENT, lambda s: "百分之" + num2chn(s.strip().strip("%")))
    text = _each(text, _COUNTED, num2chn)
    text = _each(text, _DIGIT_RUN, lambda s: num2chn(s, alt_two=False, use_units=False))
    text = _each(text, _NUMBER, num2chn)
    for found in [m.groups() for m in _LATIN_TWO.finditer(text)]:
        text = text.replace(found[0], found[1] + "2" + found[2], 1)
    return text.lstrip("^").rstrip("$").translate(_PUNCT_TO_COMMA)


# --- the segmenter's SSML tags ----------------------------------------------------------------

_SSML_UNITS = ((8, "亿"), (4, "万"), (3, "千"), (2, "百"), (1, "十"))


def _ssml_grouped(value: str) -> list[str]:
    stripped = value.lstrip("0")
    if not stripped:
        return []
    if len(stripped) == 1:
        zero = [_DIGITS[0]] if len(stripped) < len(value) else []
        return zero + [_DIGITS["0123456789".index(stripped)]]
    power, unit = next((p, u) for p, u in _SSML_UNITS if p < len(stripped))
    return _ssml_grouped(value[:-power]) + [unit] + _ssml_grouped(value[-power:])


def _ssml_cardinal(value: str) -> str:
    if not value:
        return ""
    value = value.lstrip("0")
    if not value:
        return _DIGITS[0]
    symbols = _ssml_grouped(value)
    if len(symbols) >= 2 and symbols[0] == "一" and symbols[1] == "十":
        symbols = symbols[1:]
    return "".join(symbols)


def _ssml_digits(value: str) -> str:
    return "".join(_DIGITS["0123456789".index(c)] for c in value)


def ssml_num2str(value: str) -> str:
    """GPT-SoVITS' reading: ``"3.20"`` -> ``"三点二"``. Only ASCII digits (others raise, as upstream)."""
    parts = value.split(".")
    if len(parts) > 2:
        raise ValueError(f"more than one point in {value!r}")
    result = _ssml_cardinal(parts[0])
    decimals = parts[1].rstrip("0") if len(parts) == 2 else ""
    if decimals:
        result = (result or _DIGITS[0]) + _POINT + _ssml_digits(decimals)
    return result


def _digit_by_digit(text: str) -> str:
    ascii_digits = "0123456789"
    out = re.sub(r"\d+", lambda m: "".join(_DIGITS[ascii_digits.index(c)] if c in ascii_digits else ""
                                           for c in m.group()), text)
    return out.replace(".", _POINT)


def _amount(text: str) -> str:
    return re.sub(r"\d+", lambda m: ssml_num2str(m.group()), text).replace(".", _POINT)


def _nonzero(value: str, suffix: str, read) -> str:
    value = read(value)
    return f"{value}{suffix}" if value not in ("", "0") else ""


def _ssml_date(value: str) -> str:
    """``2024/8/24``, ``2024-08``, ``08-24``, ``24``, with an optional ``hh:mm[:ss]`` after a space."""
    if value.strip() == "":
        return ""
    value = re.sub(r"日", "", re.sub(r"[/._|年月]", "-", value))
    fields = value.split(" ")
    if len(fields) == 1 and ":" in fields[0]:
        clock, fields = fields[0], []
    else:
        clock = fields[1] if len(fields) >= 2 else ""
    ymd = ""
    if fields:
        year = month = day = ""
        parts = fields[0].split("-")
        if len(parts) == 3:
            year, month, day = parts
        elif len(parts) == 2:
            if len(parts[0]) == 4:
                year, month = parts
            else:
                month, day = parts
        elif parts[0]:
            if len(parts[0]) == 4:
                year = parts[0]
            else:
                day = parts[0]
        joined = (_nonzero(year, "年", _digit_by_digit) + _nonzero(month, "月", _amount)
                  + _nonzero(day, "日", _amount))
        ymd = re.sub(r"([年|月|日])+", r"\1", joined)
    pieces = re.sub(r"[/.\-：_]", ":", clock).split(":")
    hours = minutes = seconds = ""
    if len(pieces) == 3:
        hours, minutes, seconds = pieces
    elif len(pieces) == 2:
        hours, minutes = pieces
    elif pieces[0]:
        hours = f"{pieces[0]}点"
    if len(pieces) > 1:
        hours, minutes, seconds = (_nonzero(hours, "点", _amount), _nonzero(minutes, "分", _amount),
                                   _nonzero(seconds, "秒", _amount))
    return ymd + re.sub(r"([点|分|秒])+", r"\1", f"{hours}{minutes}{seconds}")


def ssml_to_chinese(tag: str, text: str) -> str | None:
    """The Chinese reading of an SSML-style tag's content, or None for other tags."""
    if tag == "telephone":
        return _digit_by_digit(text.replace("+86", "")).replace("一", "幺")
    if tag == "number":
        return _digit_by_digit(text)
    if tag == "currency":
        return _amount(text)
    if tag == "date":
        return _ssml_date(text)
    return None
