"""The adapter kinds, family-independent: peft builds and trains them, ``AdapterWeights`` computes
the change peft merges, and the LyCORIS spelling applies the same change through LyCORIS itself and
through ComfyUI's loader arithmetic (ComfyUI is not a pip package: its formulas from
``comfy/weight_adapter/{lora,lokr,loha,base}.py`` are written out below)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from acestep_dist.errors import UserError
from acestep_dist.families.adapters import (ALPHA, AdapterSpec, AdapterWeights, from_lycoris, split_key,
                                            to_lycoris)

torch.set_num_threads(1)

# (name, spec): every kind, LoKr in each of its shapes (one factor split, both split, both whole,
# a factor other than the square root's)
SPECS = [
    ("lora", AdapterSpec("lora", 4, 8.0)),
    ("lora-rslora", AdapterSpec("lora", 4, 8.0, use_rslora=True)),
    ("dora", AdapterSpec("dora", 4, 8.0)),
    ("lokr", AdapterSpec("lokr", 2, 6.0)),
    ("lokr-both", AdapterSpec("lokr", 2, 6.0, decompose_both=True)),
    ("lokr-whole", AdapterSpec("lokr", 16, 6.0)),
    ("lokr-factor", AdapterSpec("lokr", 2, 6.0, decompose_factor=4)),
    ("loha", AdapterSpec("loha", 4, 8.0)),
]


# each kind as the family tests put it on a real DiT (LoKr at a rank that splits its larger factor)
FAMILY_KINDS = {
    "lora": dict(adapter="lora", lora_rank=4, lora_alpha=8.0, use_rslora=True),
    "dora": dict(adapter="dora", lora_rank=4, lora_alpha=8.0),
    "lokr": dict(adapter="lokr", lora_rank=2, lora_alpha=6.0),
    "loha": dict(adapter="loha", lora_rank=4, lora_alpha=8.0),
}


def with_random_adapter(model: torch.nn.Module, config, targets) -> dict[str, torch.Tensor]:
    """``model`` (eval mode) with ``config``'s adapter on ``targets``, its tensors moved off their
    start as training would; returns peft's state dict of it."""
    from peft import get_peft_model_state_dict

    from acestep_dist.families.common import adapter_config, adapter_parameters

    torch.manual_seed(1)
    model.add_adapter(adapter_config(config, targets), adapter_name="default")
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name="default").items()}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(48, 96)
        self.down = torch.nn.Linear(96, 48)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _trained(spec: AdapterSpec, seed: int = 0):
    """(base net, peft-wrapped copy with random adapter tensors, AdapterWeights of them)."""
    from peft import get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    base = Net()
    model = get_peft_model(copy.deepcopy(base), spec.peft_config(["up", "down"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "magnitude" in name else 0.0) * p)
    state = {k[len("base_model.model."):]: v.detach().clone()
             for k, v in get_peft_model_state_dict(model).items()}
    return base, model, AdapterWeights(spec, state, ("up", "down"))


def _merged_change(base: Net, model) -> dict[str, torch.Tensor]:
    merged = copy.deepcopy(model).merge_and_unload()
    return {m: getattr(merged, m).weight.detach() - getattr(base, m).weight.detach() for m in ("up", "down")}


def _comfyui_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """ComfyUI's ``calculate_weight`` at strength 1 for one module's tensors (LyCORIS spelling; LoRA,
    LoKr, LoHa)."""
    alpha = float(parts[ALPHA]) if ALPHA in parts else None
    if "hada_w1_a" in parts:
        scale = alpha / parts["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return weight + scale * (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
    if any(k.startswith("lokr_") for k in parts):
        dim = None
        w1, w2 = parts.get("lokr_w1"), parts.get("lokr_w2")
        if w1 is None:
            dim, w1 = parts["lokr_w1_b"].shape[0], parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        if w2 is None:
            dim, w2 = parts["lokr_w2_b"].shape[0], parts["lokr_w2_a"] @ parts["lokr_w2_b"]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        return weight + scale * torch.kron(w1, w2)
    down, up = parts.get("lora_down.weight", parts.get("lora_A.weight")), parts.get("lora_up.weight", parts.get("lora_B.weight"))
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    return weight + scale * (up @ down)


@pytest.mark.parametrize("name,spec", SPECS, ids=[n for n, _ in SPECS])
def test_the_change_is_what_peft_merges(name, spec):
    base, model, weights = _trained(spec)
    weights.check_complete("test")
    expected = _merged_change(base, model)
    for module in ("up", "down"):
        delta = weights.delta(module, getattr(base, module).weight.detach())
        assert weights.shape(module) == tuple(delta.shape)
        torch.testing.assert_close(delta, expected[module], rtol=0, atol=1e-5)
    # another alpha (and rsLoRA switched) makes the same change
    rescaled = weights.rescaled(weights.spec.alpha * 3, use_rslora=not weights.spec.use_rslora)
    for module in ("up", "down"):
        torch.testing.assert_close(rescaled.delta(module, getattr(base, module).weight.detach()), expected[module],
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,spec", SPECS, ids=[n for n, _ in SPECS])
def test_the_lycoris_spelling_applies_the_same_change_in_comfyui_and_lycoris(name, spec):
    from lycoris import create_lycoris_from_weights

    base, model, weights = _trained(spec)
    expected = _merged_change(base, model)
    lycoris = to_lycoris(weights)
    for module, parts in lycoris.items():
        assert parts[ALPHA].ndim == 0  # ComfyUI reads it with .item()
        if spec.kind == "dora":  # 2-D, so ComfyUI applies it to any layer shape; its arithmetic: see to_lycoris
            assert parts["dora_scale"].shape == (parts["lora_up.weight"].shape[0], 1)
            continue
        weight = getattr(base, module).weight.detach()
        torch.testing.assert_close(_comfyui_weight(weight, parts) - weight, expected[module], rtol=0, atol=1e-5)
    # LyCORIS itself (upstream ACE-Step 1.5's LoKr path) on a fresh copy of the base
    flat = {f"lycoris_{module}.{part}": tensor for module, parts in lycoris.items() for part, tensor in parts.items()}
    target = copy.deepcopy(base)
    logging.disable(logging.WARNING)
    try:
        network, _ = create_lycoris_from_weights(1.0, "", target, weights_sd=flat)
    finally:
        logging.disable(logging.NOTSET)
    network.apply_to()
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(target(x), model(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,spec", SPECS, ids=[n for n, _ in SPECS])
def test_read_back_from_the_lycoris_spelling_peft_rebuilds_the_adapter(name, spec):
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    base, model, weights = _trained(spec)
    read = from_lycoris({m: {split_key(f"{m}.{k}")[1]: v for k, v in parts.items()}
                         for m, parts in to_lycoris(weights).items()}, "test")
    assert read.spec.kind == spec.kind and not read.notes
    if spec.kind != "lokr" or name != "lokr-whole":
        assert read.spec.rank == spec.rank
    assert read.spec.decompose_both == spec.decompose_both and read.spec.decompose_factor == spec.decompose_factor
    rebuilt = copy.deepcopy(base)
    inject_adapter_in_model(read.spec.peft_config(read.modules), rebuilt)
    result = set_peft_model_state_dict(rebuilt, read.state)
    assert not result.unexpected_keys
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=1e-5)


def test_bad_adapter_tensors_are_refused_naming_the_module():
    _, _, lora = _trained(AdapterSpec("lora", 4, 8.0))
    parts = {m: {split_key(f"{m}.{k}")[1]: v for k, v in p.items()} for m, p in to_lycoris(lora).items()}
    broken = copy.deepcopy(parts)
    del broken["up"]["lora_B.weight"]
    with pytest.raises(UserError, match="up: a LoRA module needs lora_A.weight, lora_B.weight; missing lora_B.weight"):
        from_lycoris(broken, "f.safetensors")
    _, _, loha = _trained(AdapterSpec("loha", 4, 8.0))
    mixed = {"up": parts["up"], **{m: {split_key(f"{m}.{k}")[1]: v for k, v in p.items()}
                                   for m, p in to_lycoris(loha).items() if m == "down"}}
    with pytest.raises(UserError, match="mix adapter kinds"):
        from_lycoris(mixed, "f.safetensors")
    other_rank = copy.deepcopy(parts)
    other_rank["up"]["lora_A.weight"] = torch.zeros(2, 48)
    other_rank["up"]["lora_B.weight"] = torch.zeros(96, 2)
    with pytest.raises(UserError, match="different ranks"):
        from_lycoris(other_rank, "f.safetensors")
    no_alpha = copy.deepcopy(parts)
    for module in no_alpha.values():
        del module[ALPHA]
    assert from_lycoris(no_alpha, "f").spec.scale == 1.0  # what ComfyUI applies, and said
    assert from_lycoris(no_alpha, "f").notes
    with pytest.raises(UserError, match="not one of lora, dora, lokr, loha"):
        AdapterSpec("oft", 4, 4.0)
    assert split_key("layers.0.attn.to_q.lokr_w1_a") == ("layers.0.attn.to_q", "lokr_w1_a")
    assert split_key("x.lora_up.weight") == ("x", "lora_B.weight") and split_key("x.weight") is None


@pytest.mark.parametrize("name,spec", SPECS, ids=[n for n, _ in SPECS])
def test_the_shapes_peft_builds_are_predicted_and_misfits_named(name, spec):
    from acestep_dist.families.adapters import expected_shapes, fit_problem

    _, _, weights = _trained(spec)
    for module, (out, inp) in (("up", (96, 48)), ("down", (48, 96))):
        assert {k: tuple(v.shape) for k, v in weights.parts(module).items()} == expected_shapes(spec, out, inp)
        assert fit_problem(weights, module, out, inp) is None
    assert "another model size" in fit_problem(weights, "up", 96, 40)
    other = AdapterSpec(spec.kind, spec.rank * 2 if spec.kind != "lokr" else 1, spec.alpha, decompose_both=True)
    assert "are not those of a" in fit_problem(AdapterWeights(other, weights.state), "up", 96, 48)
