"""`acedist train --nodes 2` on a two-node Ray cluster (two raylets on this machine)."""

import subprocess
import sys
from pathlib import Path

from acestep_dist.config import TrainConfig
from acestep_dist.families.ace_step_15.lora_formats import read_lora
from pipelines.train import run_train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster"))
import local_cluster  # noqa: E402

SETTINGS = dict(max_train_steps=4, checkpointing_steps=2, learning_rate=5e-3, lr_warmup_steps=0, lora_dropout=0.0,
                gradient_accumulation_steps=1, train_batch_size=1, seed=5)


def test_two_node_training_gives_the_weights_of_one_process(tmp_path, train_shards, prep_model, two_nodes):
    on_cluster = tmp_path / "cluster-run"
    result = subprocess.run(
        [sys.executable, "-m", "acestep_dist.cli", "train", "--data", str(train_shards), "--model", str(prep_model),
         "--output", str(on_cluster), "--nodes", "2", "--address", two_nodes]
        + [f"{k}={v}" for k, v in SETTINGS.items()],
        capture_output=True, text=True, env=local_cluster.cluster_env(), cwd=ROOT, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "weights in" in result.stdout

    local = tmp_path / "local-run"  # one worker with the same global batch of 2, on the test's own Ray
    run_train(TrainConfig(**{**SETTINGS, "train_batch_size": 2}), str(train_shards), str(prep_model), str(local),
              workers=1, log=lambda _: None)
    got, want = (read_lora(run / "final" / "lora.safetensors").state_dict for run in (on_cluster, local))
    assert got.keys() == want.keys()
    assert max(float((got[k] - want[k]).abs().max()) for k in got) <= 1e-5
