"""Turning the paths a user gives the driver into references every Ray worker can follow.

Ray workers do not share the driver's working directory (Ray Train runs each worker inside the
run's folder in Ray's session directory; remote nodes have their own). A relative path must
therefore be made absolute on the driver, before it is handed to Ray: resolved in a worker it
names another file, or nothing, and a relative model folder then reads as a hub id.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def is_url(text: str) -> bool:
    """An fsspec URL (``s3://``, ``gs://``, ``file://`` ...) rather than a local path."""
    return "://" in text


def local_path(text: str | os.PathLike) -> str:
    """A local path made absolute (``~`` expanded); URLs unchanged. The path need not exist yet."""
    text = os.fspath(text)
    if is_url(text):
        return text
    return str(Path(text).expanduser().absolute())


def local_or_hub(text: str | os.PathLike) -> str:
    """A model or dataset argument: a local file or folder (made absolute) wins over a hub id
    spelled the same way (``org/name`` is also a relative path); anything that names nothing here
    stays as given, for the loader to treat as a hub id or reject."""
    text = os.fspath(text)
    if not is_url(text) and Path(text).expanduser().exists():
        return local_path(text)
    return text


# endings of the text files lyrics come in: a one-line value ending so names a file, never the words
LYRICS_FILE_SUFFIXES = (".txt", ".lyrics", ".lrc", ".md")


def looks_like_path(value: str) -> bool:
    """One line with a path separator or a lyrics-file ending (``words/song.txt``, ``song.lrc``)."""
    if "\n" in value:
        return False
    separators = {"/", os.sep, os.altsep} - {None}
    return any(s in value for s in separators) or Path(value).suffix.lower() in LYRICS_FILE_SUFFIXES


def existing_file_text(value: str | None, max_path_chars: int = 4096, option: str = "lyrics") -> str | None:
    """``value`` itself, or the text of the file it names (a one-line value that is a file):
    options such as ``validation_lyrics`` and ``generate --lyrics`` take the lyrics or a lyrics file.

    A one-line value that looks like a path (``looks_like_path``) but names no file is an error, not
    the lyrics: a mistyped ``lyrics.txt`` would otherwise be sung. Lyrics with a line break are
    always taken as they are. ``option`` names the setting in messages."""
    if value is None or "\n" in value or len(value) > max_path_chars:
        return value
    path = Path(value).expanduser()
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError:  # a long line of lyrics is no file name
        is_file = is_dir = False
    if is_file:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"{option} file {value}: not readable as UTF-8 text ({error})") from None
    if looks_like_path(value):
        what = "is a folder, not a file" if is_dir else "does not exist"
        raise UserError(f"{option} file {value} {what} (a one-line value containing / or ending in "
                        f"{', '.join(LYRICS_FILE_SUFFIXES)} names a lyrics file; to sing such a line, end it "
                        f"with a line break)")
    return value
