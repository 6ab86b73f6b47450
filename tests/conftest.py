"""Shared fixtures: tiny ACE-Step checkpoints built once per session, the shared test corpus."""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Two threads on two busy cores run ~50x slower than one.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
# Ray Train polls its workers every 2 s and starts a preemption watcher actor (one more Python
# process) per fit: ~5 s of each of the suite's ~30 fits on this machine, nothing a test looks at.
# Set here, they reach in-process fits and the commands tests start alike.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Token authentication stays on in the tests, as in use: one random token for every cluster the
# session starts (the embedded ones, the commands' own, the two-node one), held in the environment
# the commands inherit, never written to a file.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

# CI has the corpus beside the checkout; ACESTEP_CORPUS points elsewhere.
ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("ACESTEP_CORPUS") or ROOT.parent / "shared" / "corpus")
# cluster/local_cluster.py is a script beside the package, not part of it: the tests import it as `local_cluster`
sys.path.insert(0, str(ROOT / "cluster"))


def timestep_histograms(run: Path) -> dict[int, tuple]:
    """step -> (count, min, max, sum) of the ``train/timesteps`` histogram in a run's TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={HISTOGRAMS: 0}).Reload()
    return {event.step: (event.histogram_value.num, event.histogram_value.min, event.histogram_value.max,
                         round(event.histogram_value.sum, 5))
            for event in events.Histograms("train/timesteps")}


def train_scalars(run: Path, name: str) -> dict[int, float]:
    """step -> value of the scalar ``train/<name>`` in a run's TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={SCALARS: 0}).Reload()
    return {event.step: event.value for event in events.Scalars(f"train/{name}")}


def train_with_a_killed_worker(monkeypatch, config, data: Path, model: Path, run: Path, *, workers: int, rank: int,
                               step: int) -> None:
    """Train with ``max_failures: 1`` while worker ``rank`` SIGKILLs itself at the start of step
    ``step`` (after 8 s: Ray's controller registers a reported checkpoint by polling); the run must
    finish, restarted by Ray Train from the last checkpoint before ``step``."""
    from acestep_dist import faults
    from pipelines.train import run_train

    monkeypatch.setenv(faults.VARIABLE, faults.spec("train.micro_step", action="kill", delay=8, step=step, micro=0,
                                                    rank=rank, first_step=0))
    try:
        result = run_train(config.model_copy(update={"max_failures": 1}), str(data), str(model), str(run),
                           workers=workers, log=lambda _: None)
    finally:
        monkeypatch.delenv(faults.VARIABLE)
    assert result.steps == (config.max_train_steps or result.steps)
    restarted_at = (step - 1) // config.checkpointing_steps * config.checkpointing_steps
    assert json.loads((run / "final" / "acedist_state.json").read_text())["started_at_step"] == restarted_at


def samples_by_key(out: Path) -> dict[str, dict]:
    """key -> sample of every sample in the shards of prep's output folder ``out``."""
    from acestep_dist.shards import iter_samples

    samples = {}
    for tar in sorted(out.glob("shard-*.tar")):
        with open(tar, "rb") as f:
            samples.update((sample["key"], sample) for sample in iter_samples(f))
    return samples


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"test corpus missing at {CORPUS} (CI must provide ../shared/corpus)")
        pytest.skip(f"test corpus not found at {CORPUS}; clone beside ../shared to run corpus tests")
    return CORPUS


def write_tiny(out: Path, variant: str = "turbo", **options) -> Path:
    """A tiny ACE-Step 1.5 checkpoint, written by the family through the registry."""
    from acestep_dist.families import get

    return get("ace-step-1.5").write_tiny(out, variant, **options)


def _tiny(tmp_path_factory, variant: str) -> Path:
    return write_tiny(tmp_path_factory.mktemp(f"tiny-{variant}") / "model", variant)


@pytest.fixture(scope="session")
def tiny_turbo(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "turbo")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "base")


@pytest.fixture(scope="session")
def tiny_xl(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "xl-sft")


@pytest.fixture(scope="session")
def prep_model(tmp_path_factory) -> Path:
    """A tiny turbo checkpoint with a 4-channel VAE latent: the cheapest VAE, so corpus preps stay fast."""
    return write_tiny(tmp_path_factory.mktemp("prep-model") / "model", "turbo", latent_dim=4)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray instance for the in-process prep tests (each run would otherwise start its own)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", object_store_memory=400 * 1024**2,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory, corpus, prep_model, ray_session) -> Path:
    """The 12 corpus songs, 6 s each, prepared with the tiny 4-channel model: training tests' data."""
    from acestep_dist.config import PrepConfig
    from pipelines.prep import EXIT_OK, run_prep

    out = tmp_path_factory.mktemp("train-shards") / "shards"
    result = run_prep(str(corpus / "music"), str(prep_model), str(out), PrepConfig(max_duration=6), log=lambda _: None)
    assert result.exit_code == EXIT_OK
    return out


@dataclass(frozen=True)
class LocalCluster:
    jobs: str  # the head's job API (on loopback), for `ray job submit --address`
    temp_dir: Path  # its folder, for local_cluster's kill_raylet and rejoin


@pytest.fixture(scope="session")
def two_nodes() -> LocalCluster:
    """A two-node Ray cluster on this machine (two raylets of 1 CPU each, started by cluster/local_cluster.py,
    token authentication on), one for all tests that use it (they run last, see below: an idle cluster
    costs CPU)."""
    import local_cluster

    temp = Path(f"/tmp/acedist-test-{os.getpid()}-{random.randrange(10**6)}")  # short: Ray's socket paths
    port, dashboard = random.randrange(20000, 30000), random.randrange(30000, 40000)
    try:
        local_cluster.start(nodes=2, port=port, temp_dir=temp, cpus_per_node=1, object_store_mb=300,
                            dashboard_port=dashboard)
        yield LocalCluster(f"http://127.0.0.1:{dashboard}", temp)
    finally:
        local_cluster.stop(temp)


def submit_job(jobs: str, *acedist: str, env: dict[str, str], timeout: float = 900, wait: bool = True,
               submission_id: str | None = None, job_env: dict[str, str] | None = None):
    """``ray job submit -- python -m acestep_dist.cli ACEDIST...`` to the job API ``jobs``, as a user
    submits to theirs; the command's exit status is the job's (``wait=False``: it returns once the
    job is submitted; see `job_outcome`). The job runs in another directory,
    so every path given is absolute (as the driver resolves them anyway), and it finds the cluster
    through RAY_ADDRESS, set by Ray for the job. ``job_env``: variables for the job (its runtime env).
    No ``--working-dir``: the package is installed on
    the nodes (as the recipes install it), and here both raylets share one session folder, where
    each unpacks an uploaded working dir again, under the other's running job."""
    command = [_ray_command(), "job", "submit", "--address", jobs]
    command += [] if wait else ["--no-wait"]
    command += ["--submission-id", submission_id] if submission_id else []
    command += ["--runtime-env-json", json.dumps({"env_vars": job_env})] if job_env else []
    command += ["--", sys.executable, "-m", "acestep_dist.cli", *acedist]
    for _ in range(30):
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        # a head that has just started may not have its job agent up yet: Ray says to try again (no job was made)
        if "No available agent to submit job" not in result.stderr:
            return result
        time.sleep(2.0)
    return result


def job_outcome(jobs: str, submission_id: str, env: dict[str, str], timeout: float = 900) -> tuple[str, str]:
    """``(status, logs)`` of a job submitted with ``wait=False``, once it has ended."""
    ray = _ray_command()
    logs = subprocess.run([ray, "job", "logs", "--address", jobs, "--follow", submission_id], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout).stdout
    status = subprocess.run([ray, "job", "status", "--address", jobs, submission_id], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=120)
    # "Job 'ID' succeeded" (Ray's words, coloured) or "Status for job 'ID': FAILED"
    found = re.search(r"\b(succeeded|failed|stopped|pending|running)\b", status.stdout + status.stderr, re.IGNORECASE)
    return found.group(1).upper() if found else f"UNKNOWN ({status.stdout[-500:]} {status.stderr[-500:]})", logs


def _ray_command() -> str:
    return str(Path(sys.executable).with_name("ray"))


def pytest_collection_modifyitems(items):
    """The tests on the two-node cluster run last, one after another: the session's one cluster
    starts for them and stops with the session, instead of idling through the tests between them."""
    on_cluster = [item for item in items if "two_nodes" in getattr(item, "fixturenames", ())]
    if on_cluster:
        items[:] = [item for item in items if item not in on_cluster] + on_cluster


# Ten optimizer steps of a global batch of 2, a checkpoint every 5, no LoRA dropout (dropout masks
# depend on how a batch is split over workers, so equality across layouts needs it off).
TRAIN_COMMON = dict(max_train_steps=10, checkpointing_steps=5, learning_rate=5e-3, lr_warmup_steps=2,
                    lora_dropout=0.0, gradient_accumulation_steps=1, log_interval=5, seed=3)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, train_shards, prep_model, ray_session) -> Path:
    """A LoRA run: 1 worker x batch 2, ZeRO-2, validation renders every 5 steps."""
    from acestep_dist.config import TrainConfig
    from pipelines.train import run_train

    run = tmp_path_factory.mktemp("train") / "reference"
    config = TrainConfig(**TRAIN_COMMON, train_batch_size=2, zero_stage=2, validation_step_interval=5,
                         validation_audio_duration=2.0, validation_prompt="calm piano",
                         validation_lyrics="[verse]\nla la")
    result = run_train(config, str(train_shards), str(prep_model), str(run), workers=1, log=lambda _: None)
    assert result.steps == 10
    return run


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, train_shards, prep_model, ray_session) -> Path:
    """A full fine-tune of the DiT and the lyric encoder: 2 workers, ZeRO-3, gradient checkpointing."""
    from acestep_dist.config import TrainConfig
    from pipelines.train import run_train

    run = tmp_path_factory.mktemp("train") / "full"
    config = TrainConfig(**{**TRAIN_COMMON, "max_train_steps": 2, "checkpointing_steps": 2, "learning_rate": 1e-3},
                         model_type="full", lyrics_embedder_train=True, lyrics_embedder_lr=1e-3, zero_stage=3,
                         gradient_checkpointing=True, train_batch_size=1)
    run_train(config, str(train_shards), str(prep_model), str(run), workers=2, log=lambda _: None)
    return run
