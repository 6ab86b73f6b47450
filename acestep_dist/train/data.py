"""Training data: an index over prep's shards, the deterministic order of every epoch, and a reader.

Every worker builds the same index (shards in name order, members in tar order) and the same
per-epoch permutation of it (each sample repeated ``repeat`` times, shuffled from the seed and the
epoch). Optimizer step ``s`` consumes positions ``[s * G, (s + 1) * G)`` of that order, G being the
global batch; each micro-step of each rank takes its own contiguous slice. The order therefore
does not depend on the number of workers: 2 workers x batch 1 see exactly the samples of 1 worker
x batch 2, and a resumed run continues from the step number alone.

Samples are read by seeking to their tensor members (offsets from the index; the meta is never
read), so a shuffled epoch never streams whole shards and memory stays at one batch. The shard
markers name the family and schema the samples were written with; the reader hands out the
schema's tensors (with the drawn caption's copies) and the family's ``collate`` batches them. Before any worker starts, the driver checks
every shard against its marker (``verify_training_shards``); a sample that still cannot be read in a
worker raises ``ShardReadError`` naming the shard and the key.
"""

from __future__ import annotations

import hashlib
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..families.base import SampleSchema, alt_count
from ..shards import (MANIFEST_FILE, TENSOR_FIELD, ShardFormatError, ShardMarker, decode_tensors, duplicate_keys,
                      iter_members, marker_schema, read_manifest, verify_shard)


class ShardReadError(UserError):
    """A sample a worker cannot read; the message names the shard and the key."""


@dataclass(frozen=True)
class SampleRef:
    key: str
    shard: str  # path or URL of the tar
    tensor_offset: int
    tensor_size: int
    repeat: int
    alternatives: int  # alternative captions stored beside the caption


@dataclass
class TrainingData:
    """A prep output as training reads it: every sample in a fixed order, the schema its family
    wrote, and each shard's marker (what the driver verifies against)."""

    refs: list[SampleRef]
    schema: SampleSchema
    markers: dict[str, ShardMarker]  # shard file name -> marker
    # the optional tensors every sample holds -> the identity of the part that computed them
    # (recorded by prep in the markers; "" when it recorded none)
    stored: dict[str, str]

    @property
    def family(self) -> str:
        return self.schema.family


def _manifest_rows(fs, root: str, data: str) -> list[dict[str, Any]]:
    """The manifest's rows, refused unless every line is usable and every key occurs once."""
    manifest_path = f"{root}/{MANIFEST_FILE}"
    if not fs.exists(manifest_path):
        raise UserError(f"{data} is not an `acedist prep` output (no {MANIFEST_FILE})")
    rows, problems = read_manifest(fs, manifest_path)
    if problems:
        more = f" (and {len(problems) - 1} more lines)" if len(problems) > 1 else ""
        raise UserError(f"{data}/{MANIFEST_FILE} {problems[0]}{more}; run `acedist inspect {data}`")
    # a dict by key would keep the last of two rows and silently drop the other sample
    duplicated = duplicate_keys((row["key"], f"line {n} ({row['shard']})") for n, row in rows)
    if duplicated:
        more = f" (and {len(duplicated) - 1} more keys)" if len(duplicated) > 1 else ""
        raise UserError(f"{data}/{MANIFEST_FILE}: {duplicated[0]}{more}; every sample needs a key of its own "
                        f"(two inputs of the prep source map to one key?)")
    if not rows:
        raise UserError(f"{data} holds no samples ({MANIFEST_FILE} is empty)")
    for _, row in rows:
        name = row["shard"]
        if "/" in name or name.startswith("."):
            raise UserError(f"manifest names an unsafe shard path {name!r}")
    return [row for _, row in rows]


def _marker_file(shard: str) -> str:
    return shard[: -len(".tar")] + ".json" if shard.endswith(".tar") else shard + ".json"


def _read_markers(fs, root: str, data: str, shards: Sequence[str]) -> tuple[dict[str, ShardMarker], SampleSchema]:
    """Each shard's marker, and the one schema they were all written with."""
    markers: dict[str, ShardMarker] = {}
    for name in shards:
        marker_path = f"{root}/{_marker_file(name)}"
        try:
            with fs.open(marker_path, "r", encoding="utf-8") as f:
                markers[name] = ShardMarker.from_json(f.read())
        except FileNotFoundError:
            raise UserError(f"shard {name} of {data} has no marker {_marker_file(name)} (prep did not finish it?); "
                            f"rerun `acedist prep` to complete it") from None
        except (ValueError, TypeError) as error:
            raise UserError(f"{data}/{_marker_file(name)} is unreadable ({error}); run `acedist inspect {data}`") from None
    schemas = {name: marker_schema(marker, data) for name, marker in markers.items()}
    identities = {(schema.family, schema.version) for schema in schemas.values()}
    if len(identities) > 1:
        found = ", ".join(f"{family} v{version}" for family, version in sorted(identities))
        raise UserError(f"{data} mixes samples of several model families or schema versions ({found}); "
                        f"prepare each family into its own folder")
    return markers, next(iter(schemas.values()))


def open_training_data(data: str) -> TrainingData:
    """Every sample of the prep output ``data`` (folder or fsspec URL), in a fixed order, located
    by its tensor member's offset (headers only: member data is skipped by seeking)."""
    from ..storage import open_fs

    fs, root = open_fs(data)
    manifest = {row["key"]: row for row in _manifest_rows(fs, root, data)}
    shard_names = sorted({row["shard"] for row in manifest.values()})
    markers, schema = _read_markers(fs, root, data, shard_names)
    alternatives = alt_count(schema.caption_counts[0]) if schema.caption_counts else None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    refs: list[SampleRef] = []
    for name in shard_names:
        path = f"{root}/{name}"
        url = path if protocol in ("file", "local") else f"{protocol}://{path}"
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for key, field, info in iter_members(tar):
                    if field in members.setdefault(key, {}):
                        raise UserError(f"shard {url} holds sample {key!r} twice (its {field} at bytes "
                                        f"{members[key][field].offset_data} and {info.offset_data}); "
                                        f"run `acedist inspect {data}`")
                    members[key][field] = info
        except (OSError, tarfile.TarError, ShardFormatError) as error:
            raise UserError(f"cannot read shard {url}: {error}; run `acedist inspect {data}`") from None
        for key, fields in members.items():
            row = manifest.get(key)
            if row is None or row["shard"] != name or TENSOR_FIELD not in fields:
                continue  # not this shard's in the manifest: an unfinished or foreign member is never trained on
            tensors = fields[TENSOR_FIELD]
            refs.append(SampleRef(key, url, tensors.offset_data, tensors.size, int(row.get("repeat", 1)),
                                  len(row.get(alternatives, [])) if alternatives else 0))
    missing = set(manifest) - {r.key for r in refs}
    if missing:
        raise UserError(f"{len(missing)} samples of the manifest are not in the shards (e.g. {sorted(missing)[0]!r}); "
                        f"run `acedist inspect {data}`")
    return TrainingData(refs, schema, markers, _stored_features(schema, manifest.values(), markers, data))


def _stored_features(schema: SampleSchema, rows, markers: dict[str, ShardMarker], data: str) -> dict[str, str]:
    """The optional tensors every sample holds (its manifest row has their count), each with the one
    identity all shards recorded for the part that computed it."""
    stored = {}
    rows = list(rows)
    for spec in schema.tensors:
        if not spec.optional or not all(row.get(spec.length) is not None for row in rows):
            continue
        sources = {marker.feature_sources.get(spec.name, "") for marker in markers.values()}
        if len(sources) > 1:
            raise UserError(f"the shards of {data} hold {spec.name} computed by different models "
                            f"({', '.join(sorted(s or 'unrecorded' for s in sources))}); prepare them again with one model")
        stored[spec.name] = sources.pop()
    return stored


def verify_training_shards(data: str, training: TrainingData, log: Callable[[str], None] = print,
                           threads: int = 8) -> None:
    """Check every shard the run reads against its marker, on the driver, before any worker starts:
    sha256 and size, one sample per key, readable tensors of the schema with the marker's lengths.

    Why the driver and not lazily in each worker: workers read single members by seeking, so a
    worker could only check a shard's checksum by reading all of it, and with a shuffled epoch every
    worker touches every shard: W workers would read the dataset W extra times, and a bad shard
    would surface hours in. One pass here costs one read of the data (about 250 MB/s per thread
    measured on a busy machine, hashing and parsing; threads overlap shards) and stops the run
    before it spends GPU time on garbage."""
    from ..storage import open_fs

    fs, root = open_fs(data)
    markers = training.markers
    total = sum(marker.bytes for marker in markers.values())
    log(f"train: verifying {len(markers)} shard(s), {total / 1e9:.2f} GB, against their markers")
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(markers)))) as pool:
        checks = list(pool.map(lambda marker: verify_shard(fs, root, marker, training.schema), markers.values()))
    bad = [check for check in checks if check.problems]
    if bad:
        described = "; ".join(f"{check.shard}: {check.problems[0]}" for check in bad[:3])
        more = f" (and {len(bad) - 3} more shards)" if len(bad) > 3 else ""
        raise UserError(f"{len(bad)} shard(s) of {data} do not match their markers, refusing to train on them: "
                        f"{described}{more}; run `acedist inspect {data}` for the full report")
    log(f"train: shards verified in {time.perf_counter() - started:.1f} s")


def _seed(*parts: int | str) -> int:
    """A 63-bit seed from any parts: independent streams per (seed, epoch, position, ...)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Item:
    """One draw of the epoch order: which sample, at which epoch position, with which caption."""

    ref: int  # index into the SampleRef list
    epoch: int
    position: int
    caption: int  # 0: the caption; i > 0: alternative caption i - 1


class EpochPlan:
    """The global order of samples per epoch and the slice each (step, micro-step, rank) trains on."""

    def __init__(self, refs: Sequence[SampleRef], seed: int, micro_batch: int, accumulation: int, world_size: int):
        self.refs = refs
        self.seed = seed
        self.micro_batch, self.accumulation, self.world_size = micro_batch, accumulation, world_size
        self.global_batch = micro_batch * accumulation * world_size
        self._expanded = np.repeat(np.arange(len(refs)), [r.repeat for r in refs])
        self.epoch_size = len(self._expanded)
        self.steps_per_epoch = self.epoch_size // self.global_batch  # the incomplete last batch is dropped
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the data has {self.epoch_size} samples (repeats included), fewer than one global batch of "
                f"{self.global_batch} (train_batch_size {micro_batch} x gradient_accumulation_steps {accumulation} "
                f"x {world_size} workers); lower one of them"
            )
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            rng = np.random.default_rng(_seed(self.seed, "epoch", epoch))
            self._orders = {epoch: self._expanded[rng.permutation(self.epoch_size)]}  # keep one epoch
        return self._orders[epoch]

    def caption_choice(self, ref: int, epoch: int, position: int) -> int:
        """Caption or one of the alternatives, uniformly, drawn per epoch position (a song repeated
        2000 times in an epoch draws 2000 times)."""
        choices = 1 + self.refs[ref].alternatives
        if choices == 1:
            return 0
        return int(np.random.default_rng(_seed(self.seed, "caption", epoch, position)).integers(choices))

    def micro_batch_items(self, step: int, micro: int, rank: int) -> list[Item]:
        """Items of optimizer step ``step`` (0-based, counted over all epochs), micro-step ``micro``, ``rank``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch + (micro * self.world_size + rank) * self.micro_batch
        order = self.order(epoch)
        items = []
        for position in range(start, start + self.micro_batch):
            ref = int(order[position])
            items.append(Item(ref, epoch, position, self.caption_choice(ref, epoch, position)))
        return items

    def generator(self, item: Item) -> torch.Generator:
        """The sample's own random stream (t, dropout of the condition, posterior and flow noise)."""
        return torch.Generator().manual_seed(_seed(self.seed, "noise", item.epoch, item.position))


class SampleReader:
    """Reads samples' tensors by seeking into shards (the meta is never read: training needs only
    the tensors); keeps one open file per shard."""

    def __init__(self, refs: Sequence[SampleRef], schema: SampleSchema):
        self.refs, self.schema = refs, schema
        self._files: dict[str, Any] = {}

    def _read(self, ref: SampleRef, offset: int, size: int) -> bytes:
        import fsspec

        try:
            handle = self._files.get(ref.shard)
            if handle is None:
                handle = self._files[ref.shard] = fsspec.open(ref.shard, "rb").open()
            handle.seek(offset)
            data = handle.read(size)
        except OSError as error:
            raise ShardReadError(f"shard {ref.shard}, sample {ref.key!r}: cannot read ({error})") from None
        if len(data) != size:
            raise ShardReadError(f"shard {ref.shard}, sample {ref.key!r}: the shard is shorter than its index says "
                                 f"(changed since training started?); run `acedist inspect` on the data")
        return data

    def read(self, item: Item) -> dict[str, Any]:
        """The schema's tensors of the item's sample, with the caption it drew (``key`` and
        ``caption_index`` beside them)."""
        ref = self.refs[item.ref]
        try:
            tensors = decode_tensors(ref.key, self._read(ref, ref.tensor_offset, ref.tensor_size))
        except ShardFormatError as error:  # the data changed after the driver verified it
            raise ShardReadError(f"shard {ref.shard}, {error}; run `acedist inspect` on the data") from None
        try:
            chosen = self.schema.for_caption(tensors, item.caption)
        except KeyError as missing:
            raise ShardReadError(f"shard {ref.shard}, sample {ref.key!r} lacks tensor {missing.args[0]}; "
                                 f"run `acedist inspect` on the data") from None
        return {**chosen, "key": ref.key, "caption_index": item.caption}

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __getstate__(self):  # open files stay with their process (DataLoader workers reopen)
        return {"refs": self.refs, "schema": self.schema, "_files": {}}


class MicroBatches(torch.utils.data.Dataset):
    """Map-style dataset of this rank's micro-batches from ``first_step`` on (one item = one micro-batch),
    so a DataLoader can prefetch them in worker processes and resume from any step."""

    def __init__(self, plan: EpochPlan, reader: SampleReader, rank: int, first_step: int, last_step: int):
        self.plan, self.reader, self.rank = plan, reader, rank
        self.first_step, self.last_step = first_step, last_step

    def __len__(self) -> int:
        return (self.last_step - self.first_step) * self.plan.accumulation

    def __getitem__(self, index: int) -> dict[str, Any]:
        step, micro = divmod(index, self.plan.accumulation)
        step += self.first_step
        items = self.plan.micro_batch_items(step, micro, self.rank)
        return {"step": step, "micro": micro, "items": items, "samples": [self.reader.read(i) for i in items]}


def iterate_micro_batches(plan: EpochPlan, reader: SampleReader, rank: int, first_step: int, last_step: int,
                          workers: int = 0) -> Iterator[dict[str, Any]]:
    dataset = MicroBatches(plan, reader, rank, first_step, last_step)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=4 if workers else None, persistent_workers=False)
    yield from loader
