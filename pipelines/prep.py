"""`acedist prep` as a Ray program: any music dataset -> verified WebDataset shards.

Runs on an embedded local Ray cluster by default, on a running cluster with ``--address``, and
as a job: ``ray job submit --working-dir . -- acedist prep SOURCE --model M --out DIR``. The model's
family (``acestep_dist.families``) encodes the audio and texts and declares the sample schema;
this program knows no family.

Shard membership is fixed by the sorted input order, so a rerun plans the same shards; finished
shards (tar + marker, sha256 verified, same plan) are kept and the rest are redone. The driver
writes each shard by temporary file and rename as soon as its last row arrives (rows stream back
in input order), so a killed run never leaves a partial shard visible. One run at a time holds
``--out``, and prep deletes or replaces only files its state lists as its own
(``acestep_dist.prep_output``).

Counting is per input (a source row): an input is accepted when at least one of its windows is
written, else rejected with one reason; a dropped window of an accepted input is a warning.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from acestep_dist import faults
from acestep_dist.config import PrepConfig
from acestep_dist.errors import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL
from acestep_dist.families import Family, ModelDescription, open_model, plugin_env, worker_reference
from acestep_dist.paths import local_or_hub, local_path
from acestep_dist.prep import OK, AudioEncoder, TextEncoder, decode_row, expand_windows, plan_input, window_count
from acestep_dist.prep_output import SOURCE_AUDIO_DIR, OutputFolder, OutputLock
from acestep_dist.records import Record
from acestep_dist.ray_cluster import init_ray
from acestep_dist.shards import EncodedSample, ShardMarker, file_sha256, marker_name, shard_name, write_shard
from acestep_dist.sources import SourceListing, load_source
from acestep_dist.storage import open_fs

FORMAT_VERSION = 3  # 2: markers reject and warn per input (with its key); 3: family and schema recorded
SUMMARY_FILES = ("manifest.jsonl", "errors.jsonl", "warnings.jsonl")
# config keys that change only how fast prep runs, not what it writes
_RUNTIME_KEYS = {"decode_workers", "encoder_actors", "encode_batch_size"}
DECODE_TASK_MEMORY = 512 * 1024**2


@dataclass
class PrepResult:
    report: dict[str, Any]
    exit_code: int


def _fingerprint(family: Family, description: ModelDescription, config: PrepConfig, options,
                 feature_sources: dict[str, str]) -> str:
    settings = {k: v for k, v in config.model_dump().items() if k not in _RUNTIME_KEYS}
    blob = json.dumps({"format": FORMAT_VERSION, **family.schema.identity(), "model": description.fingerprint,
                       "config": settings, "family_options": options.model_dump(),
                       # parts beyond the fingerprinted encoders that computed optional tensors
                       **({"feature_sources": feature_sources} if feature_sources else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _records_per_shard(config: PrepConfig, family: Family, description: ModelDescription, options=None) -> int:
    bytes_per_record = family.sample_bytes(description, config.max_duration, options)
    return max(1, int(config.shard_size_mb * 1e6 // max(bytes_per_record, 1.0)))


def _plan_inputs(records: Sequence[Record], config: PrepConfig) -> list[dict]:
    """Every input probed and planned once (file headers only, threads overlap the reads)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda record: plan_input(record, config), records))


def _pack_shards(counts: Sequence[int], windows_per_shard: int) -> list[list[int]]:
    """Consecutive inputs (their positions) per shard, up to the shard's window budget, given how
    many windows each input becomes (an input is never split)."""
    shards: list[list[int]] = []
    current: list[int] = []
    used = 0
    for position, windows in enumerate(counts):
        if current and used + windows > windows_per_shard:
            shards.append(current)
            current, used = [], 0
        current.append(position)
        used += windows
    if current:
        shards.append(current)
    return shards


def _plan_hash(records: Sequence[Record]) -> str:
    blob = json.dumps([r.to_dict() for r in records], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_marker(fs, root: str, index: int) -> ShardMarker | None:
    path = f"{root}/{marker_name(index)}"
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "r") as f:
            return ShardMarker.from_json(f.read())
    except (ValueError, TypeError, KeyError):
        return None


def _finished(fs, root: str, index: int, plan: str) -> ShardMarker | None:
    """The marker of a shard that is complete, verified and of the current plan; else None."""
    marker = _read_marker(fs, root, index)
    tar = f"{root}/{shard_name(index)}"
    if marker is None or getattr(marker, "plan", None) != plan or not fs.exists(tar):
        return None
    if file_sha256(fs, tar) != (marker.sha256, marker.bytes):
        return None
    return marker


@dataclass(frozen=True)
class Resources:
    vae_actors: int
    text_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    cpus_per_task: float


def _plan_resources(config: PrepConfig) -> Resources:
    """Actor pools and per-task CPUs sized to the cluster.

    With GPUs each encoder actor takes a GPU (or half of the only one) and no CPU. On CPUs only,
    the actors together reserve at most half of the cluster's CPUs, so decode tasks always find
    room (actors holding every CPU starve the decode stage and the job hangs), and a small
    cluster (< 4 CPUs, e.g. two 1-CPU nodes) gets half-CPU tasks: whole-CPU requests would
    fragment (an actor holding half of each node's only CPU) and stall the job.
    """
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    cpu_task = 0.5 if cpus < 4 else 1.0
    if gpus:
        if config.encoder_actors:
            per_gpu = 1.0 if gpus >= 2 * config.encoder_actors else 0.5
            return Resources(config.encoder_actors, config.encoder_actors, per_gpu, 0.0, cpu_task)
        if gpus >= 2:
            return Resources(gpus // 2, gpus - gpus // 2, 1.0, 0.0, cpu_task)
        return Resources(1, 1, 0.5, 0.0, cpu_task)
    # CPU only: the VAE is the expensive stage, so extra actors go to it
    vae_actors = config.encoder_actors or max(1, int(cpus) // 4)
    text_actors = config.encoder_actors or 1
    cpu_actor = min(1.0, cpus / 2 / (vae_actors + text_actors))
    return Resources(vae_actors, text_actors, 0.0, cpu_actor, cpu_task)


def _build_dataset(rows: list[dict], family: str, model: str, config: PrepConfig, options: dict, sample_rate: int):
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in input order: shards complete one by one
    plan = _plan_resources(config)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    ds = ds.flat_map(expand_windows, num_cpus=plan.cpus_per_task)
    # A decode task holds one window (a 240 s window at 96 kHz peaks near 400 MB). Reserving that
    # memory also keeps Ray from fusing the tasks into the VAE actors, where decoding would run
    # one file at a time.
    ds = ds.map(decode_row, fn_kwargs={"config": config, "sample_rate": sample_rate}, num_cpus=plan.cpus_per_task,
                memory=DECODE_TASK_MEMORY, **({"concurrency": config.decode_workers} if config.decode_workers else {}))
    ds = ds.map(AudioEncoder, fn_constructor_kwargs={"family": family, "model": model, "options": options},
                compute=ActorPoolStrategy(size=plan.vae_actors), num_gpus=plan.gpus_per_actor, num_cpus=plan.cpus_per_actor)
    ds = ds.map_batches(TextEncoder, fn_constructor_kwargs={"family": family, "model": model, "config": config,
                                                            "options": options},
                        batch_size=config.encode_batch_size, compute=ActorPoolStrategy(size=plan.text_actors),
                        num_gpus=plan.gpus_per_actor, num_cpus=plan.cpus_per_actor)
    return ds


def _input_outcome(record: Record, rows: list[dict]) -> tuple[list[EncodedSample], list[dict], list[dict]]:
    """Samples, rejection (at most one) and warnings of one input from its window rows.

    An input is accepted when at least one window is written; its other windows' rejections become
    warnings. A rejection marked ``whole_input`` (a truncated file) rejects every window."""
    def problem(stage: str, reason: str) -> dict:
        return {"input": record.audio, "key": record.key, "stage": stage, "reason": reason}

    notes: dict[tuple[str, str], None] = {}  # the windows of an input share its probe warnings: once each
    for row in rows:
        for stage, message in json.loads(row["warnings"] or "[]"):
            notes[(stage, message)] = None
    warnings = [problem(stage, message) for stage, message in notes]
    bad = [row for row in rows if row["status"] != OK]
    condemned = [row for row in bad if row["whole_input"]]
    good = [] if condemned else [row for row in rows if row["status"] == OK]
    if not good:
        if not rows:
            return [], [problem("plan", "no audio windows")], warnings
        if condemned:  # the first says it best (later windows of a truncated file just find nothing)
            return [], [problem(condemned[0]["stage"], condemned[0]["reason"])], warnings
        reasons = list(dict.fromkeys(row["reason"] for row in bad))  # a split input's windows often agree
        return [], [problem(bad[0]["stage"], "; ".join(reasons))], warnings
    for row in bad:  # some windows of a split input
        end = row["offset"] + row["length"]
        warnings.append(problem(row["stage"], f"segment {row['window']} ({row['offset']:.0f}-{end:.0f} s) "
                                              f"dropped: {row['reason']}"))
    samples = [EncodedSample(row["key"], json.loads(row["meta"]), bytes(row["tensors"])) for row in good]
    return samples, [], warnings


def run_prep(
    source: str | SourceListing,
    model: str,
    out: str,
    config: PrepConfig,
    *,
    address: str | None = None,
    source_type: str | None = None,
    overwrite: bool = False,
    log=print,
) -> PrepResult:
    """Prepare ``source`` (a path, URL or hub id; or records already listed, as a ``SourceListing``)."""
    started = time.time()
    # Every path is made absolute here, on the driver: Ray's workers run in other directories.
    if not isinstance(source, SourceListing):
        source = local_or_hub(source)
    model, out = local_or_hub(model), local_path(out)
    fs, root = open_fs(out)
    fs.makedirs(root, exist_ok=True)
    with OutputLock(fs, root, out):
        output = OutputFolder(fs, root, out, log)
        output.check_ownership(overwrite)  # before anything is written there
        family, description = open_model(model)
        options = family.options(config)
        feature_sources = family.feature_sources(description, options)
        fingerprint = _fingerprint(family, description, config, options, feature_sources)
        output.check_family(family.schema.identity(), overwrite)
        output.check_fingerprint(fingerprint, overwrite)
        if isinstance(source, SourceListing):
            listing, described = source, f"{len(source.records)} records given in Python"
        else:
            cache_dir = Path(out) / SOURCE_AUDIO_DIR if "://" not in out else None
            listing, described = load_source(source, config, source_type, cache_dir=cache_dir), str(source)
        # only now, with the source readable, is earlier output of another fingerprint removed
        output.start(fingerprint, overwrite, {"model": model, "source": described, "config": config.model_dump(),
                                              **family.schema.identity()})
        job = _Job(family, description, model, options.model_dump(), fingerprint, config, feature_sources)
        return _prepare(listing, fs, root, out, output, job, address, started, log)


@dataclass(frozen=True)
class _Job:
    """What every stage of one prep run shares."""

    family: Family
    description: ModelDescription
    model: str  # as the user gave it, made absolute if a path
    options: dict  # the family's own settings, validated
    fingerprint: str
    config: PrepConfig
    feature_sources: dict[str, str]  # recorded in every shard marker

    @property
    def model_ref(self) -> str:
        return worker_reference(self.model, self.description)


def _plan_shards(listing, job: _Job) -> tuple[list[dict], list[list[int]], list[list[Record]], list[str]]:
    """Every input planned, packed into shards by the sorted input order: ``(planned inputs, input
    positions per shard, records per shard, plan hash per shard)``."""
    planned = _plan_inputs(listing.records, job.config)
    packed = _pack_shards([window_count(row) for row in planned],
                          _records_per_shard(job.config, job.family, job.description,
                                             job.family.prep_options.model_validate(job.options)))
    shards = [[listing.records[position] for position in members] for members in packed]
    plans = [_plan_hash(members) for members in shards]
    return planned, packed, shards, plans


def _finished_markers(fs, root: str, plans: list[str]) -> dict[int, ShardMarker]:
    """The markers of the shards an earlier run finished for the same plan."""
    markers: dict[int, ShardMarker] = {}
    for index, plan in enumerate(plans):
        marker = _finished(fs, root, index, plan)
        if marker is not None:
            markers[index] = marker
    return markers


def _claim_output_files(output: OutputFolder, todo: list[int]) -> None:
    # every file this run may write, listed in the state before any is written (one state write)
    output.claim(*(name for index in todo for final in (shard_name(index), marker_name(index))
                   for name in (final + ".tmp", final)),
                 *SUMMARY_FILES, *(name + ".tmp" for name in SUMMARY_FILES), "prep_report.json")


def _prepare(listing, fs, root, out, output: OutputFolder, job: _Job, address, started, log) -> PrepResult:
    planned, packed, shards, plans = _plan_shards(listing, job)
    output.remove_leftovers(len(shards))
    markers = _finished_markers(fs, root, plans)
    todo = [index for index in range(len(shards)) if index not in markers]
    _claim_output_files(output, todo)
    log(f"prep: {len(listing.records)} inputs in {len(shards)} shards ({len(markers)} already finished), "
        f"{len(listing.rejected)} rejected by the source")

    if todo:
        rows = [{**planned[member], "shard": index, "index": position}
                for index in todo for position, member in enumerate(packed[index])]
        _encode_and_write_shards(rows, todo, shards, plans, markers, fs, root, job, address, log)

    return _finish(fs, root, out, listing, shards, markers, job, started, log)


def _encode_and_write_shards(rows: list[dict], todo: list[int], shards: list[list[Record]], plans: list[str],
                             markers: dict[int, ShardMarker], fs, root, job: _Job, address, log) -> None:
    """Run the window ``rows`` of the shards still to do through the Ray pipeline and write each
    shard as soon as its rows are complete, adding its marker to ``markers``."""
    started_ray = init_ray(address, worker_env=plugin_env())
    try:
        dataset = _build_dataset(rows, job.family.name, job.model_ref, job.config, job.options,
                                 job.description.sample_rate)
        for index, shard_rows in _completed_shards(dataset.iter_rows(), todo, shards):
            _write_shard_from_rows(fs, root, index, shard_rows, shards[index], plans[index], markers, job, log)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _completed_shards(rows: Iterable[dict], todo: list[int],
                      shards: list[list[Record]]) -> Iterator[tuple[int, list[dict]]]:
    """``(shard index, its rows)`` for each shard of ``todo`` as soon as all its rows have arrived
    (the rest at the end), from the encoded rows, which stream in input order."""
    pending: dict[int, list[dict]] = {}
    expected = {index: len(shards[index]) for index in todo}
    seen_inputs: dict[int, set] = {index: set() for index in todo}
    for row in rows:
        index = int(row["shard"])
        pending.setdefault(index, []).append(row)
        seen_inputs[index].add(int(row["index"]))
        # windows of one input arrive together (input order): an input's rows are complete
        # once a later input of the same shard, or another shard, shows up
        for done in [i for i in pending if i != index and len(seen_inputs[i]) == expected[i]]:
            yield done, pending.pop(done)
    for index in list(pending):
        yield index, pending.pop(index)


def _shard_contents(records: list[Record], rows: list[dict]) -> tuple[list[EncodedSample], list[dict], list[dict]]:
    """Samples, rejections and warnings of a shard's inputs (``records``) from its window rows."""
    by_input: dict[int, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["index"], r["window"])):
        by_input.setdefault(int(row["index"]), []).append(row)
    samples, rejected, warnings = [], [], []
    for position, record in enumerate(records):
        written, bad, notes = _input_outcome(record, by_input.get(position, []))
        samples += written
        rejected += bad
        warnings += notes
    return samples, rejected, warnings


def _write_shard_from_rows(fs, root, index: int, rows: list[dict], records: list[Record], plan: str,
                           markers: dict[int, ShardMarker], job: _Job, log) -> None:
    faults.point("prep.before_shard", shards_written=len(markers))
    samples, rejected, warnings = _shard_contents(records, rows)
    marker = write_shard(fs, root, index, samples, rejected, warnings, job.fingerprint, plan, job.family.schema,
                         job.feature_sources)
    markers[index] = marker
    log(f"prep: wrote {shard_name(index)} ({len(samples)} samples, {marker.bytes / 1e6:.1f} MB)")


def _finish(fs, root, out, listing, shards, markers, job: _Job, started, log) -> PrepResult:
    manifest, rejected, warnings = [], [p.to_dict() for p in listing.rejected], [p.to_dict() for p in listing.warnings]
    total_bytes = 0
    for index in range(len(shards)):
        marker = markers[index]
        manifest += marker.samples
        rejected += marker.rejected
        warnings += marker.warnings
        total_bytes += marker.bytes
    for name, rows in zip(SUMMARY_FILES, (manifest, rejected, warnings)):
        with fs.open(f"{root}/{name}.tmp", "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        fs.mv(f"{root}/{name}.tmp", f"{root}/{name}")
    # per input, not per path: several rows may name one file, and a split input is one input
    rejected_later = sum(len(markers[index].rejected) for index in range(len(shards)))
    report = {
        "inputs": len(listing.records) + len(listing.rejected),
        "accepted": len(listing.records) - rejected_later,
        "rejected": len(listing.rejected) + rejected_later,
        "warned": _warned_inputs(listing, warnings),
        "samples": len(manifest),
        "shards": len(shards),
        "audio_seconds": round(sum(row["duration"] for row in manifest), 3),
        "bytes": total_bytes,
        "wall_seconds": round(time.time() - started, 2),
        "fingerprint": job.fingerprint,
        "model": job.model,
        **job.family.schema.identity(),
        "config": {**job.config.model_dump(), **job.options},
    }
    with fs.open(f"{root}/prep_report.json", "w") as f:
        json.dump(report, f, indent=1)
    width = max(len(k) for k in report)
    log("\n".join(["", "prep summary", "-" * 40] + [
        f"{k:<{width}}  {v}" for k, v in report.items() if k not in ("config",)] + [f"output{' ' * (width - 6)}  {out}"]))
    if report["samples"] == 0:
        return PrepResult(report, EXIT_FATAL)
    return PrepResult(report, EXIT_PARTIAL if report["rejected"] else EXIT_OK)


def _warned_inputs(listing: SourceListing, warnings: list[dict]) -> int:
    """Inputs with at least one warning. The pipeline's warnings name their input's key; the source's
    name a path (or a manifest line), taken as that record's when exactly one record has the path."""
    records_of: dict[str, list[str]] = {}
    for record in listing.records:
        records_of.setdefault(record.audio, []).append(record.key)
    warned = set()
    for row in warnings:
        if row.get("key"):
            warned.add(("key", row["key"]))
        elif len(records_of.get(row["input"], [])) == 1:
            warned.add(("key", records_of[row["input"]][0]))
        else:
            warned.add(("input", row["input"]))
    return len(warned)
