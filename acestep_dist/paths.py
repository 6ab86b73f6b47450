"""Turning the paths a user gives the driver into references every Ray worker can follow.

Ray workers do not share the driver's working directory (Ray Train runs each worker inside the
run's folder in Ray's session directory; remote nodes have their own). A relative path must
therefore be made absolute on the driver, before it is handed to Ray: resolved in a worker it
names another file, or nothing, and a relative model folder then reads as a hub id.
"""

from __future__ import annotations

import os
from pathlib import Path


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


def existing_file_text(value: str | None, max_path_chars: int = 4096) -> str | None:
    """``value`` itself, or the text of the file it names (a one-line value that is a file):
    options such as ``validation_lyrics`` take the lyrics or a lyrics file."""
    if value is None or "\n" in value or len(value) > max_path_chars:
        return value
    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # a long line of lyrics is no file name
        return value
    return path.read_text(encoding="utf-8") if is_file else value
