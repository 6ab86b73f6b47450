"""The optimizers a run may choose and the weight average (``use_ema``): what each builds and does,
and the combinations refused before any worker starts."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from acestep_dist.config import TrainConfig
from acestep_dist.errors import UserError
from acestep_dist.train.ema import WeightsAverage
from acestep_dist.train.optimizers import build_optimizer, check_optimizer, deepspeed_settings

torch.set_num_threads(1)


def _groups(rates=(1e-2, 1e-2)):
    generator = torch.Generator().manual_seed(0)
    return [{"params": [torch.nn.Parameter(torch.randn(8, 6, generator=generator))], "lr": rate, "name": f"g{i}"}
            for i, rate in enumerate(rates)]


def _descend(optimizer, groups, steps=30) -> tuple[float, float]:
    """Loss of a quadratic before and after ``steps`` steps."""
    target = torch.ones(8, 6)
    parameters = [p for group in groups for p in group["params"]]
    losses = []
    for _ in range(steps):
        loss = sum(((p - target) ** 2).mean() for p in parameters)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses[0], losses[-1]


@pytest.mark.parametrize("name", ["adamw", "adafactor", "prodigy"])
def test_each_cpu_optimizer_descends(name):
    config = TrainConfig(optimizer=name, lr_warmup_steps=0, **({} if name == "prodigy" else {"learning_rate": 5e-2}))
    groups = _groups((config.learning_rate,) * 2)
    optimizer = build_optimizer(config, groups, world=1, use_gpu=False)
    assert type(optimizer).__name__ == {"adamw": "AdamW", "adafactor": "Adafactor", "prodigy": "Prodigy"}[name]
    # Prodigy starts from a tiny step size (d0 1e-6) and grows it over its first tens of steps
    first, last = _descend(optimizer, groups, steps=60)
    assert last < 0.5 * first, (name, first, last)
    if name == "adafactor":  # factored: a row and a column vector per matrix, no momentum
        state = optimizer.state[groups[0]["params"][0]]
        assert state["exp_avg_sq_row"].shape == (8,) and state["exp_avg_sq_col"].shape == (6,)
        assert "exp_avg" not in state
    if name == "prodigy":  # it learnt a step size far from its start
        assert optimizer.param_groups[0]["d"] > 1e3 * optimizer.param_groups[0]["d0"]


def test_prodigy_takes_the_learning_rate_as_a_multiplier():
    assert TrainConfig(optimizer="prodigy").learning_rate == 1.0
    assert TrainConfig(optimizer="prodigy", learning_rate=0.5).learning_rate == 0.5
    assert TrainConfig().learning_rate == 1e-4
    with pytest.raises(UserError, match="different learning rates"):
        build_optimizer(TrainConfig(optimizer="prodigy"), _groups((1.0, 0.5)), world=1, use_gpu=False)


def test_settings_of_another_optimizer_or_of_an_unused_average_are_refused():
    with pytest.raises(ValidationError, match="prodigy_d_coef applies to optimizer prodigy"):
        TrainConfig(prodigy_d_coef=2.0)
    with pytest.raises(ValidationError, match="use_ema is false"):
        TrainConfig(ema_decay=0.99)
    TrainConfig(use_ema=True, ema_decay=0.99, ema_device="cpu", optimizer="prodigy", prodigy_d_coef=0.5)


@pytest.mark.parametrize("settings, world, gpu, message", [
    (dict(optimizer="adamw8bit"), 1, False, "runs on CUDA GPUs"),
    (dict(optimizer="adamw8bit", offload_optimizer=True), 1, True, "choose one"),
    (dict(optimizer="prodigy", zero_stage=2), 2, False, "use zero_stage 0"),
    (dict(use_ema=True, zero_stage=3), 1, False, "ZeRO-3 splits them"),
])
def test_what_cannot_run_where_the_run_trains_is_refused_on_the_driver(settings, world, gpu, message):
    with pytest.raises(UserError, match=message):
        check_optimizer(TrainConfig(**settings), world, gpu)


def test_what_can_run_passes_the_driver():
    check_optimizer(TrainConfig(optimizer="prodigy", zero_stage=0), 2, False)
    check_optimizer(TrainConfig(optimizer="prodigy", zero_stage=2), 1, False)  # one worker holds it whole
    check_optimizer(TrainConfig(optimizer="prodigy", zero_stage=2), 8, True)  # statistics summed on CUDA
    check_optimizer(TrainConfig(optimizer="adamw8bit"), 8, True)
    assert deepspeed_settings(TrainConfig()) == {}
    assert deepspeed_settings(TrainConfig(optimizer="adafactor")) == {"zero_allow_untested_optimizer": True}


def test_the_average_follows_its_formula_and_swaps_in_for_saving():
    module = torch.nn.Linear(3, 2)
    module.bias.requires_grad_(False)  # frozen: not averaged
    average = WeightsAverage(module, decay=0.9, device="cpu")
    assert set(average.average) == {"weight"}
    start = module.weight.detach().clone()
    expected = start.clone()
    for step in range(3):
        with torch.no_grad():
            module.weight.add_(1.0)
        average.update()
        expected = 0.9 * expected + 0.1 * module.weight.detach()
    torch.testing.assert_close(average.average["weight"], expected)
    current = module.weight.detach().clone()
    with average.swapped_in():
        torch.testing.assert_close(module.weight.detach(), expected)
    torch.testing.assert_close(module.weight.detach(), current)  # the trained weights are back
    restored = WeightsAverage(module, decay=0.9, device="cpu")
    restored.load(average.state())
    torch.testing.assert_close(restored.average["weight"], expected)
    with pytest.raises(ValueError, match="does not fit"):
        restored.load({"other": torch.zeros(1)})


def test_zero_gradient_bucket_fits_what_trains():
    """ZeRO's gradient bucket is as large as the trained parameters (within DeepSpeed's 5e8 default,
    at least 1e7): DeepSpeed would otherwise hold 1 GB of GPU memory for a LoRA of a few million."""
    from acestep_dist.train.loop import deepspeed_config

    lora = deepspeed_config(TrainConfig(zero_stage=2), 2, True, trainable_parameters=7_000_000)
    assert lora["zero_optimization"]["reduce_bucket_size"] == 10_000_000
    middle = deepspeed_config(TrainConfig(zero_stage=3), 2, True, trainable_parameters=88_000_000)
    assert middle["zero_optimization"]["reduce_bucket_size"] == 88_000_000
    full = deepspeed_config(TrainConfig(zero_stage=1, model_type="full"), 8, True, trainable_parameters=1_575_458_880)
    assert full["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert "reduce_bucket_size" not in deepspeed_config(TrainConfig(zero_stage=0), 2, True, 7_000_000)["zero_optimization"]
