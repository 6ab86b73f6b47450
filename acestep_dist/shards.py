"""Shards: the sample schema, the atomic writer, the reader and verification.

A sample is ``__key__`` + ``meta.json`` + ``tensors.safetensors`` (``latent_mean``, ``latent_std``
``[T, C]`` bf16; ``text_states`` ``[L, D]`` bf16, unpadded; ``lyric_ids`` ``[N]`` int32; and
``alt_text_states_{i}`` for each alternative caption, sampled at training time) in a plain
WebDataset tar. No pickles. A shard is written as ``.tar.tmp`` and renamed into place when complete;
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
from typing import Any, Iterable, Iterator, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

TENSOR_FIELD = "tensors.safetensors"
META_FIELD = "meta.json"
TENSOR_DTYPES = {"latent_mean": torch.bfloat16, "latent_std": torch.bfloat16, "text_states": torch.bfloat16,
                 "lyric_ids": torch.int32}
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


ALT_TEXT_PREFIX = "alt_text_states_"


def _dtype(name: str) -> torch.dtype:
    return torch.bfloat16 if name.startswith(ALT_TEXT_PREFIX) else TENSOR_DTYPES[name]


def pack_tensors(latent_mean: torch.Tensor, latent_std: torch.Tensor, text_states: torch.Tensor,
                 lyric_ids: torch.Tensor, alt_text_states: Sequence[torch.Tensor] = ()) -> bytes:
    tensors = {"latent_mean": latent_mean, "latent_std": latent_std, "text_states": text_states, "lyric_ids": lyric_ids}
    tensors.update({f"{ALT_TEXT_PREFIX}{i}": states for i, states in enumerate(alt_text_states)})
    return save_safetensors({k: v.detach().to("cpu", _dtype(k)).contiguous() for k, v in tensors.items()})


def unpack_tensors(blob: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors(blob)


@dataclass
class EncodedSample:
    key: str
    meta: dict[str, Any]
    tensors: bytes  # pack_tensors(...)

    def summary(self, shard: str) -> dict[str, Any]:
        """The manifest row of this sample."""
        return {"key": self.key, "shard": shard, "duration": self.meta["duration"], "frames": self.meta["frames"],
                "text_tokens": self.meta["text_tokens"], "lyric_tokens": self.meta["lyric_tokens"],
                "source": self.meta["source"], "offset": self.meta["offset"], "repeat": self.meta.get("repeat", 1),
                "alt_text_tokens": self.meta.get("alt_text_tokens", [])}


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
                fingerprint: str, plan: str) -> ShardMarker:
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
    marker = ShardMarker(index, hashing.sha.hexdigest(), hashing.size, [s.summary(shard_name(index)) for s in samples],
                         rejected, warnings, fingerprint, plan)
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


def iter_samples(fileobj) -> Iterator[dict[str, Any]]:
    """Samples of a shard as dicts: ``key``, ``meta``, and the tensors. Raises on a malformed shard."""
    current: dict[str, Any] = {}
    with tarfile.open(fileobj=fileobj, mode="r|", bufsize=1 << 20) as tar:  # big reads: parsing at disk speed
        for member in tar:
            if not member.isfile():
                raise ValueError(f"unexpected member {member.name!r} (not a regular file)")
            key, field_name = _safe_member(member.name)
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


def verify_shard(fs, root: str, marker: ShardMarker) -> ShardCheck:
    """Checksum, member count, unique keys and tensor shapes of one shard against its marker, in one
    read of the shard."""
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
                shapes = {k: tuple(sample[k].shape) for k in TENSOR_DTYPES if k in sample}
                want = {"latent_mean": row["frames"], "latent_std": row["frames"], "text_states": row["text_tokens"],
                        "lyric_ids": row["lyric_tokens"]}
                want.update({f"{ALT_TEXT_PREFIX}{i}": n for i, n in enumerate(row.get("alt_text_tokens", []))})
                for tensor, length in want.items():
                    if tensor not in sample:
                        problems.append(f"sample {key!r} lacks tensor {tensor}")
                    elif sample[tensor].shape[0] != length or sample[tensor].dtype != _dtype(tensor):
                        problems.append(f"sample {key!r}: {tensor} is {list(sample[tensor].shape)} "
                                        f"{sample[tensor].dtype}, manifest says {length} rows of {_dtype(tensor)}")
                if "latent_mean" in sample and "latent_std" in sample and sample["latent_mean"].shape != sample["latent_std"].shape:
                    problems.append(f"sample {key!r}: latent mean and std shapes differ")
                seen.append({"key": key, "meta": sample["meta"], "shapes": shapes})
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
