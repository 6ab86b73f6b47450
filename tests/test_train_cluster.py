"""`acedist train --nodes 2`, then `acedist export`, submitted as Ray jobs to a two-node Ray cluster
(two raylets on this machine, token authentication on)."""

import pytest
import torch

from acestep_dist.families.ace_step_15.lora_formats import read_lora

import local_cluster  # cluster/, on the path by conftest.py
from conftest import TRAIN_COMMON, submit_job, timestep_histograms  # TRAIN_COMMON: the reference_run fixture's settings

pytestmark = pytest.mark.slow  # a two-node cluster and Ray jobs: minutes

# one worker of batch 1 on each node: reference_run's global batch of 2, its recipe and ZeRO stage
SETTINGS = dict(TRAIN_COMMON, train_batch_size=1, zero_stage=2)


def test_two_node_training_gives_the_weights_of_one_process(tmp_path, train_shards, prep_model, two_nodes,
                                                            reference_run):
    on_cluster = tmp_path / "cluster-run"
    env = local_cluster.cluster_env()
    result = submit_job(two_nodes.jobs, "train", "--data", str(train_shards), "--model", str(prep_model),
                        "--output", str(on_cluster), "--nodes", "2", *[f"{k}={v}" for k, v in SETTINGS.items()], env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "train: on CPU: no GPU on the cluster's live nodes" in result.stdout  # --gpus-per-node auto, said
    assert "weights in" in result.stdout
    exported = tmp_path / "exported"
    result = submit_job(two_nodes.jobs, "export", str(on_cluster), "--out", str(exported), "--format", "comfyui", env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    [comfy] = (exported / "comfyui").glob("*.safetensors")

    # reference_run: one worker with the same global batch of 2 (batch 2), on the test session's own Ray
    got, want = (read_lora(run / "final" / "lora.safetensors").state for run in (on_cluster, reference_run))
    assert got.keys() == want.keys()
    assert max(float((got[k] - want[k]).abs().max()) for k in got) <= 1e-5
    # the job's export: ComfyUI's file, read back, is the trained adapter
    back = read_lora(comfy).state
    assert back.keys() == got.keys() and all(torch.equal(back[k], got[k]) for k in got)
    # the histogram gathers both workers' timesteps: keyed draws, so the same ones as one worker
    assert timestep_histograms(on_cluster) == timestep_histograms(reference_run)
