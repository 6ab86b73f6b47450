"""Losing a node: on the two-node local cluster (token auth on), a worker node's raylet is SIGKILLed
while a submitted prep or training job has work on it, and the node then joins again (as a
replaced machine or a restarted pod does). Prep ends with the samples of an undisturbed run; training,
with ``max_failures``, restarts from its last checkpoint and ends with an undisturbed run's weights.
What happens when the node does not come back is in cluster/README.md ("When a node is lost").

The prep test is also the test of prep submitted to a cluster (an undisturbed two-node prep job
would check a subset of what it checks, for another half minute of CI)."""

import json
import secrets
import time

import pytest
import torch

from acestep_dist import faults
from acestep_dist.config import PrepConfig
from acestep_dist.families.ace_step_15.lora_formats import read_lora

import local_cluster  # cluster/, on the path by conftest.py (whose two_nodes fixture starts the cluster)
from conftest import TRAIN_COMMON, job_outcome, samples_by_key, submit_job

pytestmark = pytest.mark.slow  # a two-node cluster and Ray jobs: minutes

LOST = 1  # the worker node that is lost (node 0 is the head, where the jobs' drivers run)


def _wait_for(condition, what: str, timeout: float = 600.0, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")


def _lose_and_rejoin(cluster) -> None:
    """Node LOST's raylet killed (the node's workers end with it); the node joins again after a pause."""
    try:
        local_cluster.kill_raylet(cluster.temp_dir, LOST)
        time.sleep(3.0)  # the cluster runs without it for a while
    finally:
        local_cluster.rejoin(cluster.temp_dir, LOST)  # also when the kill failed: later tests need both nodes


def test_prep_that_loses_a_node_mid_job_writes_the_samples_of_an_undisturbed_run(tmp_path, corpus, prep_model,
                                                                               two_nodes, train_shards):
    # train_shards: the same songs and settings prepared locally, undisturbed (shard size aside)
    out = tmp_path / "cluster"
    env = dict(local_cluster.cluster_env(), RAY_DATA_DISABLE_PROGRESS_BARS="1")
    job = f"acedist-prep-{secrets.token_hex(4)}"
    settings = {"max_duration": 6, "shard_size_mb": 0.002}  # a shard per song: shards finish one by one
    submitted = submit_job(two_nodes.jobs, "prep", str(corpus / "music"), "--model", str(prep_model), "--out", str(out),
                           *[f"{k}={v}" for k, v in settings.items()], env=env, wait=False, submission_id=job)
    assert submitted.returncode == 0, submitted.stderr[-3000:]

    def working_on_lost_node():
        # Ray Data's tasks and actors show as ray::Map(...), ray::FlatMap(...), ray::MapWorker(...);
        # an actor still in its constructor holds no rows yet
        running = [name for name in (command.split(" ")[0] for command in
                                     local_cluster.node_processes(two_nodes.temp_dir, LOST).values())
                   if name.startswith("ray::") and "Map" in name and not name.endswith(".__init__")]
        assert not (out / "prep_report.json").exists(), "the job ended before node 1 had any of its work"
        return running

    lost_work = _wait_for(working_on_lost_node, "node 1 to run one of the job's Ray Data tasks or actors")
    _lose_and_rejoin(two_nodes)
    status, logs = job_outcome(two_nodes.jobs, job, env)
    assert status == "SUCCEEDED", f"lost while node 1 ran {lost_work}:\n{logs[-4000:]}"

    # the local run was made with these settings but for the shard size
    same = {k: v for k, v in PrepConfig(**settings).model_dump().items() if k != "shard_size_mb"}
    prepared_with = json.loads((train_shards / "prep_report.json").read_text())["config"]
    assert {k: prepared_with[k] for k in same} == same
    expected, got = samples_by_key(train_shards), samples_by_key(out)
    assert set(got) == set(expected) and len(got) == 12
    for key in expected:
        assert torch.equal(got[key]["latent_mean"], expected[key]["latent_mean"])
        assert torch.equal(got[key]["text_states"], expected[key]["text_states"])
    report = json.loads((out / "prep_report.json").read_text())
    assert report["samples"] == 12 and report["rejected"] == 0


def test_training_that_loses_a_node_restarts_from_its_checkpoint_and_ends_with_the_undisturbed_weights(
        tmp_path, train_shards, prep_model, two_nodes, reference_run):
    run = tmp_path / "cluster-run"
    env = local_cluster.cluster_env()
    # Both workers stop before step 7 of the first attempt (never after a restart, which starts at 5),
    # so the node is lost at a known point: after checkpoint 5, before the run ends.
    hold = faults.spec("train.micro_step", step=7, micro=0, first_step=0)
    settings = dict(TRAIN_COMMON, train_batch_size=1, zero_stage=2, max_failures=1)
    job = f"acedist-train-{secrets.token_hex(4)}"
    submitted = submit_job(two_nodes.jobs, "train", "--data", str(train_shards), "--model", str(prep_model),
                           "--output", str(run), "--nodes", "2", *[f"{k}={v}" for k, v in settings.items()],
                           env=env, wait=False, submission_id=job, job_env={faults.VARIABLE: hold})
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    # the first checkpoint (step 5) as Ray's controller has registered it: it writes its snapshot
    # of the run's checkpoints then (a restart resumes from the snapshot's newest)
    snapshot = run / "checkpoint_manager_snapshot.json"
    _wait_for(lambda: snapshot.exists() and "checkpoint_2" in snapshot.read_text(), "the run's first checkpoint")
    assert any(command.startswith("ray::RayTrainWorker")
               for command in local_cluster.node_processes(two_nodes.temp_dir, LOST).values())
    _lose_and_rejoin(two_nodes)
    status, logs = job_outcome(two_nodes.jobs, job, env)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "[FailurePolicy] RETRY" in logs  # Ray Train restarted the worker group: max_failures at work
    assert "train: done at step 10" in logs

    state = json.loads((run / "final" / "acedist_state.json").read_text())
    assert (state["started_at_step"], state["step"], state["world_size"]) == (5, 10, 2)
    # reference_run: the same recipe and global batch, one worker, undisturbed
    got, want = (read_lora(r / "final" / "lora.safetensors").state for r in (run, reference_run))
    assert got.keys() == want.keys()
    assert max(float((got[k] - want[k]).abs().max()) for k in got) <= 1e-5
