"""Shards: the atomic writer, the one tar reader, and verification against a family's schema.

A sample is ``__key__`` + ``meta.json`` + ``tensors.safetensors`` in a plain WebDataset tar. No
pickles. The tensors are those of the model family's ``SampleSchema`` (``families/base.py``: names,
dtypes, length axes; e.g. ACE-Step 1.5 stores ``latent_mean`` / ``latent_std`` ``[T, C]`` bf16,
``text_states`` ``[L, D]`` bf16, ``lyric_ids`` int32, and ``alt_text_states_{i}`` per alternative
caption); the meta holds the record's texts, the lengths the schema measures (``frames``, ...), and
the family and schema version, which markers and the prep state repeat. A shard is written as ``.tar.tmp`` and renamed into place when complete;
its marker ``shard-NNNNNN.json`` (sha256, bytes, members, rejections, warnings) is renamed into place
after it, so a shard with a marker is finished, and anything else is redone on a rerun.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

if TYPE_CHECKING:
    from .families.base import SampleSchema

TENSOR_FIELD = "tensors.safetensors"
META_FIELD = "meta.json"
# Fixed tar mtime: a rerun writes byte-identical shards from identical samples.
_MTIME = 0


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def marker_name(index: int) -> str:
    return f"shard-{index:06d}.json"


MANIFEST_FILE = "manifest.jsonl"
# what training reads from each manifest row (``repeat`` and ``alt_text_tokens`` have defaults)
MANIFEST_REQUIRED = ("key", "shard", "frames")


class ShardFormatError(ValueError):
    """A shard member that cannot be what it claims to be; the message names the sample."""


def unpack_tensors(blob: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors(blob)


def length_fields(schema: "SampleSchema") -> list[str]:
    """The meta fields of a sample that hold lengths: the schema's counts and their alternatives'."""
    from .families.base import alt_count

    return [*schema.counts, *(alt_count(count) for count in schema.caption_counts)]


@dataclass
class EncodedSample:
    key: str
    meta: dict[str, Any]
    tensors: bytes  # SampleSchema.pack(...)

    def summary(self, shard: str, schema: "SampleSchema") -> dict[str, Any]:
        """The manifest row of this sample: where it is, and every length its schema measures."""
        row = {"key": self.key, "shard": shard, "duration": self.meta["duration"], "source": self.meta["source"],
               "offset": self.meta["offset"], "repeat": self.meta.get("repeat", 1)}
        row.update({name: self.meta[name] for name in length_fields(schema) if name in self.meta})
        return row


@dataclass
class ShardMarker:
    index: int
    sha256: str
    bytes: int
    samples: list[dict[str, Any]]  # manifest rows
    rejected: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    fingerprint: str = ""
    plan: str = ""  # hash of the records planned into this shard
    family: str | None = None  # None: written before families were recorded (ACE-Step 1.5, schema 1)
    schema_version: int | None = None
    # optional tensor -> identity of the model part that computed it (Family.feature_sources)
    feature_sources: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(vars(self), indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ShardMarker":
        return cls(**json.loads(text))


class _HashingReader:
    """Counts and hashes what is read through it, so one pass over a shard both checks its members
    and its checksum."""

    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what passes through to the real file."""

    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)


def write_shard(fs, root: str, index: int, samples: list[EncodedSample], rejected: list[dict], warnings: list[dict],
                fingerprint: str, plan: str, schema: "SampleSchema",
                feature_sources: dict[str, str] | None = None) -> ShardMarker:
    """Write shard ``index`` and then its marker, each by temporary file and rename."""
    import webdataset as wds

    final = f"{root}/{shard_name(index)}"
    temporary = final + ".tmp"
    with fs.open(temporary, "wb") as raw:
        hashing = _HashingWriter(raw)
        with wds.TarWriter(hashing, mtime=_MTIME, encoder=False) as writer:
            for sample in samples:
                meta = json.dumps(sample.meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
                writer.write({"__key__": sample.key, META_FIELD: meta, TENSOR_FIELD: sample.tensors})
    fs.mv(temporary, final)
    marker = ShardMarker(index, hashing.sha.hexdigest(), hashing.size,
                         [s.summary(shard_name(index), schema) for s in samples], rejected, warnings, fingerprint, plan,
                         schema.family, schema.version, dict(feature_sources or {}))
    marker_path = f"{root}/{marker_name(index)}"
    with fs.open(marker_path + ".tmp", "w") as f:
        f.write(marker.to_json())
    fs.mv(marker_path + ".tmp", marker_path)
    return marker


def file_sha256(fs, path: str) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def _safe_member(name: str) -> tuple[str, str]:
    """(key, field) of a tar member; names that could escape a folder are refused."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ValueError(f"unsafe member name {name!r}")
    base = path.name
    stem, dot, field_name = base.partition(".")
    if not dot:
        raise ValueError(f"member {name!r} has no field extension")
    return str(path.parent / stem) if str(path.parent) != "." else stem, field_name


def iter_members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, field, member) of every member of an open shard, checked: regular files with safe names
    only. Verification streams members this way; the training index reads their offsets."""
    for member in tar:
        if not member.isfile():
            raise ShardFormatError(f"unexpected member {member.name!r} (not a regular file)")
        try:
            key, field_name = _safe_member(member.name)
        except ValueError as error:
            raise ShardFormatError(str(error)) from None
        yield key, field_name, member


def iter_samples(fileobj) -> Iterator[dict[str, Any]]:
    """Samples of a shard as dicts: ``key``, ``meta``, and the tensors. Raises on a malformed shard."""
    current: dict[str, Any] = {}
    with tarfile.open(fileobj=fileobj, mode="r|", bufsize=1 << 20) as tar:  # big reads: parsing at disk speed
        for key, field_name, member in iter_members(tar):
            data = tar.extractfile(member).read()
            if current and current["key"] != key:
                yield _finish(current)
                current = {}
            current.setdefault("key", key)
            current[field_name] = data
    if current:
        yield _finish(current)


def decode_meta(key: str, blob: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(blob)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise ShardFormatError(f"sample {key!r}: {META_FIELD} is not JSON ({error})") from None
    if not isinstance(meta, dict):
        raise ShardFormatError(f"sample {key!r}: {META_FIELD} is not a JSON object")
    return meta


def decode_tensors(key: str, blob: bytes) -> dict[str, torch.Tensor]:
    try:
        return unpack_tensors(blob)
    except SafetensorError as error:
        raise ShardFormatError(f"sample {key!r}: {TENSOR_FIELD} is not readable safetensors ({error})") from None


def _finish(raw: dict[str, Any]) -> dict[str, Any]:
    missing = {META_FIELD, TENSOR_FIELD} - raw.keys()
    if missing:
        raise ShardFormatError(f"sample {raw['key']!r} lacks {', '.join(sorted(missing))}")
    sample = {"key": raw["key"], "meta": decode_meta(raw["key"], raw[META_FIELD])}
    sample.update(decode_tensors(raw["key"], raw[TENSOR_FIELD]))
    return sample


def duplicate_keys(located: Iterable[tuple[str, str]]) -> list[str]:
    """One message per key that occurs more than once; ``located`` yields (key, where it is)."""
    places: dict[str, list[str]] = defaultdict(list)
    for key, where in located:
        places[key].append(where)
    return [f"key {key!r} occurs {len(where)} times: {', '.join(where)}"
            for key, where in places.items() if len(where) > 1]


def read_manifest(fs, path: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line number, row) of every usable line of a ``manifest.jsonl``, and one problem per line that
    is not a JSON object with the fields training reads (``line N: ...``)."""
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    with fs.open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
                problems.append(f"line {number}: not JSON ({error})")
                continue
            if not isinstance(row, dict):
                problems.append(f"line {number}: not a JSON object")
                continue
            missing = [name for name in MANIFEST_REQUIRED if name not in row]
            if missing:
                problems.append(f"line {number}: lacks {', '.join(repr(m) for m in missing)}")
            elif not (isinstance(row["key"], str) and isinstance(row["shard"], str) and isinstance(row["frames"], int)):
                problems.append(f"line {number}: key and shard must be strings and frames an integer")
            else:
                rows.append((number, row))
    return rows, problems


@dataclass
class ShardCheck:
    shard: str
    problems: list[str]
    samples: list[dict[str, Any]]  # key, meta and tensor shapes of each readable sample


def verify_shard(fs, root: str, marker: ShardMarker, schema: "SampleSchema") -> ShardCheck:
    """Checksum, member count, unique keys and tensors (the schema's names, dtypes and the marker's
    lengths) of one shard against its marker, in one read of the shard."""
    name = shard_name(marker.index)
    path = f"{root}/{name}"
    if not fs.exists(path):
        return ShardCheck(name, ["missing shard file"], [])
    problems: list[str] = []
    expected = {row["key"]: row for row in marker.samples}
    seen: list[dict[str, Any]] = []
    first_position: dict[str, int] = {}
    read_error = None
    with fs.open(path, "rb") as f:
        hashing = _HashingReader(f)
        try:
            for position, sample in enumerate(iter_samples(hashing)):
                key = sample["key"]
                if key in first_position:
                    problems.append(f"key {key!r} occurs twice in the shard: samples {first_position[key]} and {position}")
                    continue
                first_position[key] = position
                row = expected.get(key)
                if row is None:
                    problems.append(f"sample {key!r} is not in the manifest")
                    continue
                tensors = {name: value for name, value in sample.items() if name not in ("key", "meta")}
                try:
                    problems += [f"sample {key!r}: {problem}" for problem in schema.problems(tensors, row)]
                except (KeyError, TypeError, ValueError) as error:  # a marker row without a length the schema needs
                    problems.append(f"sample {key!r}: its marker row lacks a length ({error})")
                seen.append({"key": key, "meta": sample["meta"],
                             "shapes": {name: tuple(value.shape) for name, value in tensors.items()}})
        except ShardFormatError as error:
            read_error = f"cannot read: {error}"
        except Exception as error:  # corruption shows up as any of tarfile, safetensors, JSON or UTF-8 errors
            read_error = f"cannot read: {type(error).__name__}: {error}"
        hashing.drain()  # the checksum covers the whole file, also after a member failed to read
    if (hashing.sha.hexdigest(), hashing.size) != (marker.sha256, marker.bytes):
        # first: flipped or missing bytes explain every other problem
        problems.insert(0, f"checksum mismatch: sha256 {hashing.sha.hexdigest()[:12]}... ({hashing.size} bytes), "
                           f"marker says {marker.sha256[:12]}... ({marker.bytes} bytes)")
    if read_error:
        problems.append(read_error)
    missing = set(expected) - {s["key"] for s in seen}
    if missing and not read_error:
        problems.append(f"{len(missing)} manifest samples missing from the shard (e.g. {sorted(missing)[0]!r})")
    return ShardCheck(name, problems, seen)


def marker_schema(marker: ShardMarker, where: str) -> "SampleSchema":
    """The schema a shard was written with, from its marker (markers from before families were
    recorded are ACE-Step 1.5's schema 1). A schema version the family no longer writes is refused."""
    from .errors import UserError
    from .families import LEGACY_FAMILY, LEGACY_SCHEMA_VERSION, get

    family = get(marker.family or LEGACY_FAMILY)
    version = marker.schema_version or LEGACY_SCHEMA_VERSION
    if version != family.schema.version:
        raise UserError(f"{where} holds {family.name} samples of schema version {version}; this acedist reads "
                        f"version {family.schema.version}: rerun `acedist prep` with --overwrite to rewrite them")
    return family.schema
