"""Prodigy and the weight average through the real training stage (Ray Train, DeepSpeed) on the tiny
ACE-Step 1.5 model. (Adafactor under ZeRO-2 and the average under ZeRO-2 train in
tests/test_train_adapters.py, with LoHa and DoRA.)"""

from __future__ import annotations

import json

import pytest
import torch

from acestep_dist.config import TrainConfig
from acestep_dist.export import export
from acestep_dist.families.ace_step_15.lora_formats import read_lora
from conftest import TRAIN_COMMON, train_scalars, train_with_a_killed_worker

torch.set_num_threads(1)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_prodigy_with_a_weight_average_resumes_and_splits_over_workers_exactly(tmp_path, train_shards, prep_model,
                                                                                monkeypatch):
    """Prodigy (its step size estimated from the run so far) and the weight average are restored from
    checkpoint 2 after a worker dies, and 2 workers x batch 1 end where 1 worker x batch 2 ends."""
    from pipelines.train import run_train

    config = TrainConfig(**{**TRAIN_COMMON, "max_train_steps": 4, "checkpointing_steps": 2, "log_interval": 1,
                            "learning_rate": 1.0, "lr_warmup_steps": 1},
                         # d0: a start that moves the weights from step 1 (the default 1e-6 needs tens of steps)
                         optimizer="prodigy", prodigy_d0=1e-3, use_ema=True, ema_decay=0.5, zero_stage=0)
    one = tmp_path / "one"
    run_train(config.model_copy(update={"train_batch_size": 2}), str(train_shards), str(prep_model), str(one),
              workers=1, log=lambda _: None)

    two = tmp_path / "two"
    train_with_a_killed_worker(monkeypatch, config, train_shards, prep_model, two, workers=2, rank=0, step=3)

    weights = {run: read_lora(run / "final" / "lora.safetensors").state for run in (one, two)}
    averages = {run: read_lora(run / "final" / "ema" / "lora.safetensors").state for run in (one, two)}
    # the average lags the weights by a step's change or more: a restart that lost it (or Prodigy's
    # step size) would be off by about that much, far beyond the all-reduce rounding allowed here
    # (measured: lag 4.7e-4, the runs 4.6e-8 apart)
    assert _max_difference(weights[one], averages[one]) > 1e-4
    assert _max_difference(weights[one], weights[two]) < 2e-6
    assert _max_difference(averages[one], averages[two]) < 2e-6
    losses = train_scalars(one, "loss")
    assert all(torch.isfinite(torch.tensor(list(losses.values()))))

    state = json.loads((one / "final" / "ema" / "acedist_state.json").read_text())
    assert state["averaged"] == {"decay": 0.5, "of_step": 4}
    written = export(one, tmp_path / "export", "comfyui", ema=True, log=lambda _: None)
    exported = read_lora(written[0])
    for module in exported.modules:
        weight = torch.randn(exported.shape(module), generator=torch.Generator().manual_seed(0))
        average = read_lora(one / "final" / "ema" / "lora.safetensors")
        torch.testing.assert_close(exported.delta(module, weight), average.delta(module, weight), rtol=0, atol=1e-6)
