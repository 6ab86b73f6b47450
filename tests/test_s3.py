"""`s3://` for `acedist prep --out`, `acedist train --data/--output` and `acedist export RUN`, against a real
S3 endpoint: moto's server on 127.0.0.1, configured as a MinIO or Ceph user configures one (AWS_ENDPOINT_URL
and credentials in the environment). Credentials are enforced: a request without the test user's key is
refused. Ray is started before these variables are set, so its processes do not inherit them: what reaches
Ray's controller and workers was passed on by acedist, as it must be on a cluster."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

from acestep_dist.config import PrepConfig, TrainConfig
from acestep_dist.errors import UserError
from acestep_dist.families.ace_step_15.lora_formats import read_lora
from acestep_dist.inspect_report import inspect_output
from acestep_dist.shards import iter_samples
from pipelines.prep import EXIT_OK, run_prep
from pipelines.train import run_train

from conftest import TRAIN_COMMON

BUCKET = "acedist-test"
SHARDS = f"s3://{BUCKET}/shards"
RUN = f"s3://{BUCKET}/runs/lora"
PREP = PrepConfig(max_duration=6, shard_size_mb=0.1)  # the train_shards fixture's samples, three songs a shard
AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                 "AWS_EC2_METADATA_DISABLED")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3(ray_session):
    """An S3 endpoint on 127.0.0.1 that checks credentials; yields an s3fs client of its own for the checks."""
    import boto3
    import requests
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in failure reports
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in AWS_VARIABLES}
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="acedist")
        iam.put_user_policy(UserName="acedist", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="acedist")["AccessKey"]
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()  # enforce from now
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=key["AccessKeyId"],
                          AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"], AWS_DEFAULT_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true")  # no instance-metadata lookups for credentials
        client = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        client.mkdir(BUCKET)
        with pytest.raises(PermissionError):  # the endpoint does check credentials
            s3fs.S3FileSystem(key="AKIAUNKNOWN", secret="x", skip_instance_cache=True).ls(BUCKET)
        yield client
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def _tar_samples(data: bytes) -> list[str]:
    import io

    return [sample["key"] for sample in iter_samples(io.BytesIO(data))]


class _Watcher(threading.Thread):
    """Lists the output prefix while prep runs: every visible shard must be whole, every visible marker's shard
    must be visible too."""

    def __init__(self, client, prefix: str):
        super().__init__(daemon=True)
        self.client, self.prefix = client, prefix
        self.stop, self.problems, self.states = threading.Event(), [], set()

    def run(self) -> None:
        checked: set[str] = set()
        while not self.stop.is_set():
            names = {p.rsplit("/", 1)[-1] for p in self.client.find(self.prefix)}
            tars = {n for n in names if n.startswith("shard-") and n.endswith(".tar")}
            markers = {n for n in names if n.startswith("shard-") and n.endswith(".json")}
            self.states.add(len(markers))
            self.problems += [f"marker {m} before its shard" for m in markers if m[:-5] + ".tar" not in tars]
            for tar in sorted(tars - checked):
                try:
                    if not _tar_samples(self.client.cat_file(f"{self.prefix}/{tar}")):
                        self.problems.append(f"{tar} visible and empty")
                except (tarfile.TarError, ValueError) as error:
                    self.problems.append(f"{tar} visible but incomplete: {error}")
                checked.add(tar)
            time.sleep(0.1)


def _samples_by_key(read_tars) -> dict[str, dict]:
    import io

    samples = {}
    for data in read_tars:
        for sample in iter_samples(io.BytesIO(data)):
            samples[sample["key"]] = sample
    return samples


def _s3_samples(client) -> dict[str, dict]:
    return _samples_by_key(client.cat_file(p) for p in sorted(client.glob(f"{BUCKET}/shards/shard-*.tar")))


def _local_samples(folder: Path) -> dict[str, dict]:
    return _samples_by_key(p.read_bytes() for p in sorted(folder.glob("shard-*.tar")))


def _assert_same_samples(got: dict, expected: dict) -> None:
    assert set(got) == set(expected) and len(got) == 12
    for key in expected:
        assert got[key]["meta"] == expected[key]["meta"], key
        for tensor in ("latent_mean", "latent_std", "text_states", "lyric_ids"):
            assert torch.equal(got[key][tensor], expected[key][tensor]), (key, tensor)


@pytest.fixture(scope="module")
def s3_shards(s3, corpus, prep_model):
    """`acedist prep` into s3://, watched while it writes."""
    watcher = _Watcher(s3, f"{BUCKET}/shards")
    watcher.start()
    try:
        result = run_prep(str(corpus / "music"), str(prep_model), SHARDS, PREP, log=lambda _: None)
    finally:
        watcher.stop.set()
        watcher.join()
    return result, watcher


@pytest.mark.slow
def test_prep_writes_shards_to_s3_atomically_and_resumes(s3, s3_shards, train_shards, corpus, prep_model):
    result, watcher = s3_shards
    assert result.exit_code == EXIT_OK and result.report["samples"] == 12
    shards = sorted(s3.glob(f"{BUCKET}/shards/shard-*.tar"))
    assert len(shards) == result.report["shards"] == 4
    assert watcher.problems == []
    assert len(watcher.states) >= 3, watcher.states  # it saw shards appear one by one, not just the end
    # the same samples as a local prep of the same songs and settings (train_shards: one big shard)
    _assert_same_samples(_s3_samples(s3), _local_samples(train_shards))
    for name in ("manifest.jsonl", "errors.jsonl", "warnings.jsonl", "prep_report.json"):
        assert s3.isfile(f"{BUCKET}/shards/{name}"), name
    manifest = s3.cat_file(f"{BUCKET}/shards/manifest.jsonl")
    report, code = inspect_output(SHARDS, log=lambda _: None)  # `acedist inspect s3://...`
    assert code == 0 and report["samples"] == 12
    assert s3.isfile(f"{BUCKET}/shards/inspect_report.json") and s3.size(f"{BUCKET}/shards/inspect_report.png") > 1000

    # What an interrupted run leaves: shard 1 renamed but its marker not yet; shard 2 not written;
    # shard 3 overwritten by garbage (its checksum no longer matches); a temporary file of a write in flight.
    prefix = f"{BUCKET}/shards"
    s3.rm(f"{prefix}/shard-000001.json")
    s3.rm([f"{prefix}/shard-000002.tar", f"{prefix}/shard-000002.json"])
    s3.pipe(f"{prefix}/shard-000003.tar", b"\0" * 1024)
    s3.pipe(f"{prefix}/shard-000002.tar.tmp", s3.cat_file(f"{prefix}/shard-000000.tar")[:3000])
    kept = s3.info(f"{prefix}/shard-000000.tar")["LastModified"]
    time.sleep(1.1)  # S3 times have one-second resolution

    lines = []
    again = run_prep(str(corpus / "music"), str(prep_model), SHARDS, PREP, log=lines.append)
    assert again.exit_code == EXIT_OK
    assert any("(1 already finished)" in line for line in lines), lines
    # what acedist inspect wrote there is not prep's: named and left alone
    assert any("leaving alone" in line and "inspect_report.json" in line for line in lines), lines
    assert s3.info(f"{prefix}/shard-000000.tar")["LastModified"] == kept  # verified and kept, not rewritten
    assert not s3.glob(f"{prefix}/*.tmp")
    assert sorted(s3.glob(f"{prefix}/shard-*.json")) == [f"{prefix}/shard-{i:06d}.json" for i in range(4)]
    assert s3.cat_file(f"{prefix}/manifest.jsonl") == manifest
    _assert_same_samples(_s3_samples(s3), _local_samples(train_shards))


def _config(steps: int, **overrides) -> TrainConfig:
    # a constant learning rate: a run of 4 steps resumed to 6 then trains exactly as a run of 6; LoRA dropout on
    # (the README: its masks are keyed by (seed, step), so a resumed run continues bit-exactly with it too)
    return TrainConfig(**{**TRAIN_COMMON, "max_train_steps": steps, "checkpointing_steps": 2, "lr_scheduler": "constant",
                          "train_batch_size": 2, "zero_stage": 2, "checkpoints_total_limit": 2,
                          "lora_dropout": 0.1, **overrides})


def _checkpoints(s3) -> list[str]:
    return sorted(p for p in s3.glob(f"{BUCKET}/runs/lora/checkpoint_*") if s3.isdir(p))


@pytest.fixture(scope="module")
def s3_run(s3, s3_shards, prep_model):
    """4 steps on the S3 shards into s3://.../runs/lora (validation render at step 4), then resumed to 6."""
    first = run_train(_config(4, validation_step_interval=4, validation_audio_duration=1.0,
                              validation_prompt="calm piano"), SHARDS, str(prep_model), RUN, workers=1,
                      log=lambda _: None)
    checkpoints_after_first = _checkpoints(s3)
    with pytest.raises(UserError, match="already holds a run"):
        run_train(_config(6), SHARDS, str(prep_model), RUN, workers=1, log=lambda _: None)
    resumed = run_train(_config(6), SHARDS, str(prep_model), RUN, workers=1, resume=True, log=lambda _: None)
    return first, checkpoints_after_first, resumed


@pytest.mark.slow
def test_train_reads_s3_shards_checkpoints_to_s3_and_resumes(s3, s3_run, train_shards, prep_model, tmp_path):
    first, checkpoints_after_first, resumed = s3_run
    assert first.steps == 4 and resumed.steps == 6
    assert first.final == resumed.final == f"{RUN}/final"
    assert len(checkpoints_after_first) == 2  # steps 2 and 4
    run = f"{BUCKET}/runs/lora"
    # checkpoints_total_limit: 2 kept of the 3 the two runs wrote; the newest holds step 6
    checkpoints = _checkpoints(s3)
    assert len(checkpoints) == 2
    steps = sorted(json.loads(s3.cat_file(f"{c}/acedist_state.json"))["step"] for c in checkpoints)
    assert steps == [4, 6]
    state = json.loads(s3.cat_file(f"{run}/final/acedist_state.json"))
    assert (state["step"], state["started_at_step"]) == (6, 4)
    assert s3.glob(f"{run}/tb/events.out.tfevents.*")
    assert [p.rsplit("/", 1)[-1] for p in s3.glob(f"{run}/samples/*.wav")] == ["step-4.wav"]

    # an uninterrupted local run of 6 steps on the local shards trains the same LoRA
    local = tmp_path / "local"
    run_train(_config(6), str(train_shards), str(prep_model), str(local), workers=1, log=lambda _: None)
    s3.get_file(f"{run}/final/lora.safetensors", str(tmp_path / "s3-lora.safetensors"))
    got = read_lora(tmp_path / "s3-lora.safetensors").state
    expected = read_lora(local / "final" / "lora.safetensors").state
    assert got.keys() == expected.keys()
    assert max(float((got[k] - expected[k]).abs().max()) for k in got) <= 1e-6


class _RequestLog(logging.Handler):
    """The S3 server's request lines (werkzeug logs one per request) while in use."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self):
        logger = logging.getLogger("werkzeug")
        self._level, self._propagate = logger.level, logger.propagate
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger("werkzeug")
        logger.removeHandler(self)
        logger.setLevel(self._level)
        logger.propagate = self._propagate


@pytest.mark.slow
def test_export_reads_a_run_from_s3(s3, s3_run, prep_model, tmp_path):
    from diffusers import AceStepPipeline

    from acestep_dist.export import export

    out = tmp_path / "export"
    export(RUN, out, "all", log=lambda _: None)
    s3.get_file(f"{BUCKET}/runs/lora/final/lora.safetensors", str(tmp_path / "final.safetensors"))
    trained = read_lora(tmp_path / "final.safetensors").state
    exported = read_lora(out / "diffusers" / "pytorch_lora_weights.safetensors").state
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    assert (out / "peft" / "adapter_config.json").is_file() and (out / "comfyui" / "lora.safetensors").is_file()
    assert RUN in (out / "README.txt").read_text() and "step 6" in (out / "README.txt").read_text()
    pipe = AceStepPipeline.from_pretrained(prep_model)
    pipe.load_lora_weights(str(out / "diffusers"))
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())

    # one checkpoint folder: only its weights are read, not the DeepSpeed states
    checkpoint = _checkpoints(s3)[0]
    assert s3.glob(f"{checkpoint}/engine/*optim_states*")
    requests = _RequestLog()
    with requests:
        export(f"s3://{checkpoint}", tmp_path / "from-checkpoint", "comfyui", name="ckpt", log=lambda _: None)
    assert any("lora.safetensors" in line for line in requests.lines)
    assert not [line for line in requests.lines if "/engine/" in line and "GET" in line]
    assert (tmp_path / "from-checkpoint" / "comfyui" / "ckpt.safetensors").is_file()
    assert "step 4" in (tmp_path / "from-checkpoint" / "README.txt").read_text()
    with pytest.raises(UserError, match="is not an acedist run"):
        export(f"s3://{BUCKET}/shards", tmp_path / "nothing", log=lambda _: None)


def test_s3_without_s3fs_is_one_error_line_naming_the_extra():
    code = ("import sys; sys.modules['s3fs'] = None; from acestep_dist.cli import main; "
            "sys.argv = ['acedist', 'inspect', 's3://bucket/shards']; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Error: s3://bucket/shards:" in done.stderr and "pip install 'acestep-dist[s3]'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_export_of_a_full_fine_tune_from_s3_downloads_its_transformer_folder(s3, full_run, tmp_path):
    from safetensors.torch import load_file

    from acestep_dist.export import export

    s3.put(str(full_run / "final"), f"{BUCKET}/runs/full/final", recursive=True)
    assert s3.isfile(f"{BUCKET}/runs/full/final/transformer/config.json")
    export(f"s3://{BUCKET}/runs/full", tmp_path / "export", "all", log=lambda _: None)
    local = load_file(full_run / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    exported = load_file(tmp_path / "export" / "diffusers" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert local.keys() == exported.keys() and all(torch.equal(local[k], exported[k]) for k in local)
    assert (tmp_path / "export" / "upstream" / "model.safetensors").is_file()
    assert "and the lyric encoder" in (tmp_path / "export" / "README.txt").read_text()
