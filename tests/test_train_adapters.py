"""DoRA, LoKr and LoHa through the real training stage (Ray Train, DeepSpeed) on the tiny ACE-Step 1.5
model: each trains and its export reads back as the trained adapter in every format; a LoKr run on an
int8 base on two workers, one of which dies after the middle checkpoint, ends with the weights of the
same run uninterrupted (ZeRO-2's optimizer partitions of both ranks restored, the replaced rank
included, the base quantized again identically); LoHa trains on an fp8 base under ZeRO-3."""

from __future__ import annotations

import json

import pytest
import torch

from acestep_dist.config import TrainConfig
from acestep_dist.errors import UserError
from acestep_dist.export import export
from acestep_dist.families.ace_step_15.lora_formats import read_lora
from conftest import TRAIN_COMMON, timestep_histograms, train_with_a_killed_worker

torch.set_num_threads(1)

KINDS = {"dora": dict(adapter="dora", lora_rank=4, lora_alpha=8.0,
                      use_ema=True, ema_decay=0.5),  # and the weight average under ZeRO-2
         "lokr": dict(adapter="lokr", lora_rank=2, lora_alpha=4.0, lokr_decompose_both=True,
                      adapter_module_dropout=0.2,  # the module dropout draws are keyed too: resume stays exact
                      base_model_precision="int8-torchao"),
         "loha": dict(adapter="loha", lora_rank=4, lora_alpha=8.0, zero_stage=3, base_model_precision="fp8-torchao",
                      optimizer="adafactor")}  # and an optimizer DeepSpeed's ZeRO was not tested with


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_an_adapter_kind_trains_and_exports(kind, tmp_path, train_shards, prep_model, monkeypatch):
    from pipelines.train import run_train

    common = {k: v for k, v in TRAIN_COMMON.items() if k != "lora_dropout"}  # a LoRA / DoRA setting
    # LoKr: 2 workers x batch 1 (its killed-worker restart below needs the same layout: module dropout
    # draws are keyed per rank); the others 1 worker x batch 2
    workers = 2 if kind == "lokr" else 1
    config = TrainConfig(**{**common, "max_train_steps": 4, "checkpointing_steps": 2, "train_batch_size": 2 // workers,
                            "zero_stage": 2, "lr_warmup_steps": 0, "log_interval": 2, **KINDS[kind]})
    whole = tmp_path / "whole"
    assert run_train(config, str(train_shards), str(prep_model), str(whole), workers=workers,
                     log=lambda _: None).steps == 4
    trained = read_lora(whole / "final" / "lora.safetensors")
    assert trained.spec.kind == kind and trained.spec.rank == config.lora_rank
    state = json.loads((whole / "final" / "acedist_state.json").read_text())
    assert state["config"]["adapter"] == kind and state["config"]["optimizer"] == config.optimizer
    if kind != "dora":  # LoKr and LoHa trained on a quantized base: every worker says what it quantized
        frozen = state["frozen_base"]
        assert frozen["precision"] == config.base_model_precision and frozen["layers"] > 0
        assert frozen["bytes_after"] < 0.3 * frozen["bytes_before"]
    else:
        assert "frozen_base" not in state

    # it trained: the part peft starts at zero (so the adapter starts as no change) has moved
    zero_at_start = {"dora": "lora_B.weight", "lokr": "lokr_w1_a", "loha": "hada_w2_a"}[kind]
    moved = [k for k in trained.state if k.endswith(zero_at_start)]
    assert moved and all(float(trained.state[k].abs().max()) > 0 for k in moved)

    if kind == "lokr":  # the richest state (split factors, module dropout draws); the others' is plain tensors
        _killed_worker_resumes_exactly(config, trained, whole, tmp_path, train_shards, prep_model, monkeypatch)

    if kind == "dora":  # the average of the weights, saved as they are, lags them and exports like them
        average = read_lora(whole / "final" / "ema" / "lora.safetensors")
        assert average.spec == trained.spec
        assert max(float((average.state[k] - trained.state[k]).abs().max()) for k in trained.state) > 1e-5
        (exported,) = export(whole, tmp_path / "average", "comfyui", ema=True, log=lambda _: None)
        assert read_lora(exported).state.keys() and read_lora(exported).spec == trained.spec
    if kind == "loha":  # a format whose consumers cannot build the kind is refused, naming those that can
        with pytest.raises(UserError, match="LoHa exports as peft, comfyui; not diffusers"):
            export(whole, tmp_path / "refused", "diffusers", log=lambda _: None)
        with pytest.raises(UserError, match="trained without use_ema"):
            export(whole, tmp_path / "none", "comfyui", ema=True, log=lambda _: None)
    written = export(whole, tmp_path / "export", "all", log=lambda _: None)
    assert {p.relative_to(tmp_path / "export").parts[0] for p in written} == set(
        {"dora": ("diffusers", "peft", "comfyui"), "lokr": ("peft", "comfyui", "lycoris"),
         "loha": ("peft", "comfyui")}[kind])
    for path in written:
        read = read_lora(path)
        assert read.spec == trained.spec, path
        for module in trained.modules:  # the same change to a weight (DoRA's depends on the weight: any will do)
            weight = torch.randn(trained.shape(module), generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(read.delta(module, weight), trained.delta(module, weight), rtol=0, atol=1e-6)
    assert f"{trained.spec.describe()}" in (tmp_path / "export" / "README.txt").read_text()


def _killed_worker_resumes_exactly(config, trained, whole, tmp_path, train_shards, prep_model, monkeypatch) -> None:
    """Rank 1 SIGKILLs itself in step 3, after checkpoint 2 (8 s: Ray's controller registers a
    reported checkpoint by polling); Ray Train restarts the group from that checkpoint and the run
    ends with the uninterrupted run's weights, and logs the same timesteps (the replaced rank's too)."""
    resumed = tmp_path / "resumed"
    train_with_a_killed_worker(monkeypatch, config, train_shards, prep_model, resumed, workers=2, rank=1, step=3)
    again = read_lora(resumed / "final" / "lora.safetensors")
    assert again.state.keys() == trained.state.keys()
    assert max(float((again.state[k] - trained.state[k]).abs().max()) for k in trained.state) <= 1e-6
    assert timestep_histograms(resumed) == timestep_histograms(whole)
