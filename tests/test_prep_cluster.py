"""The same prep, submitted as a Ray job to a two-node Ray cluster (two raylets on this machine, token
authentication on), gives the same samples."""

import json
import sys
from pathlib import Path

import torch

from acestep_dist.config import PrepConfig
from acestep_dist.shards import iter_samples
from pipelines.prep import EXIT_OK

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster"))
import local_cluster  # noqa: E402  (the two_nodes fixture in conftest.py starts it)
from conftest import submit_job  # noqa: E402


def _samples(out: Path) -> dict:
    found = {}
    for tar in sorted(out.glob("shard-*.tar")):
        with open(tar, "rb") as f:
            found.update({s["key"]: s for s in iter_samples(f)})
    return found


def test_two_node_prep_gives_the_same_keys_and_tensors(tmp_path, corpus, prep_model, two_nodes, train_shards):
    # train_shards: the same songs and settings prepared locally (in one big shard; samples do not depend on it)
    settings = {"max_duration": 6, "shard_size_mb": 0.002}
    on_cluster = tmp_path / "cluster"
    env = dict(local_cluster.cluster_env(), RAY_DATA_DISABLE_PROGRESS_BARS="1")
    result = submit_job(two_nodes, "prep", str(corpus / "music"), "--model", str(prep_model), "--out", str(on_cluster),
                        *[f"{k}={v}" for k, v in settings.items()], env=env)
    assert result.returncode == EXIT_OK, result.stdout[-2000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout + result.stderr  # the job's status, as `ray job submit` reports it
    # ... made with these settings but for the shard size
    same = {k: v for k, v in PrepConfig(**settings).model_dump().items() if k != "shard_size_mb"}
    prepared_with = json.loads((train_shards / "prep_report.json").read_text())["config"]
    assert {k: prepared_with[k] for k in same} == same
    expected, got = _samples(train_shards), _samples(on_cluster)
    assert set(got) == set(expected) and len(got) == 12
    for key in expected:
        assert torch.equal(got[key]["latent_mean"], expected[key]["latent_mean"])
        assert torch.equal(got[key]["text_states"], expected[key]["text_states"])
    report = json.loads((on_cluster / "prep_report.json").read_text())
    assert report["samples"] == 12
