"""ACE-Step v1 adapters of every kind (LoRA, DoRA, LoKr, LoHa) on its real DiT: written in each
format the kind exports to, loaded back by acedist and by each consumer's own loading code that
runs here (diffusers' ``load_lora_adapter``, what upstream's ``load_lora`` calls), with the outputs
of the adapted model; ComfyUI's files checked key by key and through its arithmetic."""

from __future__ import annotations

import copy

import pytest
import torch

from acestep_dist.config import TrainConfig
from acestep_dist.errors import UserError
from acestep_dist.families import get as get_family
from acestep_dist.families.adapters import ALPHA, AdapterSpec, AdapterWeights, split_key
from test_adapters import FAMILY_KINDS, _comfyui_weight, with_random_adapter

torch.set_num_threads(1)

FAMILY = get_family("ace-step-v1")
PRESET = "upstream"  # speaker embedder, lyric encoder and DiT attention: every kind of layer v1 adapts
KINDS = FAMILY_KINDS
# ComfyUI's part names per kind (comfy/weight_adapter/{lora,lokr,loha}.py)
COMFY_PARTS = {"lora": {"lora_A.weight", "lora_B.weight", ALPHA},
               "dora": {"lora_A.weight", "lora_B.weight", "dora_scale", ALPHA},
               "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", ALPHA},
               "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", ALPHA}}


@pytest.fixture(scope="module")
def transformer_dir(tmp_path_factory):
    return FAMILY.write_tiny(tmp_path_factory.mktemp("v1-adapters") / "tiny", "base", seed=0) / "ace_step_transformer"


def _base(transformer_dir):
    from acestep_dist.families.ace_step_v1.transformer import ACEStepTransformer2DModel

    return ACEStepTransformer2DModel.from_pretrained(str(transformer_dir)).eval()


def _inputs() -> dict:
    generator = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 8, 16, 24, generator=generator), attention_mask=torch.ones(1, 24),
                encoder_text_hidden_states=torch.randn(1, 5, 32, generator=generator),
                text_attention_mask=torch.ones(1, 5, dtype=torch.long), speaker_embeds=torch.randn(1, 512, generator=generator),
                lyric_token_idx=torch.tensor([[261, 30, 40, 2]]), lyric_mask=torch.ones(1, 4, dtype=torch.long),
                timestep=torch.tensor([500.0]))


def _trained(transformer_dir, kind: str):
    """The DiT with a ``kind`` adapter of random (trained-like) tensors, its weights as a run saves them."""
    from acestep_dist.families.ace_step_v1.options import lora_targets
    from acestep_dist.families.ace_step_v1.lora_formats import targets_of

    config = TrainConfig(**KINDS[kind], lora_preset=PRESET)
    model = _base(transformer_dir)
    state = with_random_adapter(model, config, lora_targets(PRESET))
    weights = AdapterWeights(AdapterSpec.from_config(config), state)
    weights.targets = targets_of(weights.modules)
    return config, model, weights


@pytest.mark.parametrize("kind", KINDS)
def test_each_export_loads_with_the_trained_output(kind, transformer_dir, tmp_path):
    from acestep_dist.families.ace_step_v1.lora_formats import load_lora_into, read_lora, write_comfyui, write_upstream

    _, trained, weights = _trained(transformer_dir, kind)
    inputs = _inputs()
    with torch.no_grad():
        expected, plain = trained(**inputs).sample, _base(transformer_dir)(**inputs).sample
    assert float((expected - plain).abs().max()) > 1e-3  # the adapter changes the output
    formats = FAMILY.adapter_formats(kind)
    assert formats == (("upstream", "comfyui") if kind in ("lora", "dora") else ("comfyui",))
    files = {"comfyui": write_comfyui(weights, tmp_path / "comfyui.safetensors", {"family": "ace-step-v1"})}
    if "upstream" in formats:
        files["upstream"] = write_upstream(weights, tmp_path / "upstream" / "pytorch_lora_weights.safetensors")
    for name, file in files.items():
        read = read_lora(file)
        assert read.spec == weights.spec and read.modules == weights.modules, name  # the trained spec comes back
        model = _base(transformer_dir)
        load_lora_into(model, file)
        with torch.no_grad():
            assert float((model(**inputs).sample - expected).abs().max()) <= 1e-5, name
    if "upstream" in files:
        # upstream's load_lora: diffusers' load_lora_adapter with prefix None, at weight 1.0
        model = _base(transformer_dir)
        model.load_lora_adapter(str(files["upstream"]), adapter_name="ace_step_lora", prefix=None)
        with torch.no_grad():
            assert float((model(**inputs).sample - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_the_comfyui_file_has_comfyuis_keys_and_arithmetic(kind, transformer_dir, tmp_path):
    from safetensors.torch import load_file

    from acestep_dist.families.ace_step_v1.lora_formats import write_comfyui

    _, trained, weights = _trained(transformer_dir, kind)
    state = load_file(str(write_comfyui(weights, tmp_path / "c.safetensors")))
    base = _base(transformer_dir)
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(trained)
    for layer in merged.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()  # peft's own arithmetic: the weight training's forward used
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        assert key.startswith("diffusion_model.")  # ComfyUI's map for ACE-Step v1: diffusion_model.<module>.*
        name = key[len("diffusion_model."):]
        module = split_key(name)[0]
        modules.setdefault(module, {})[name[len(module) + 1:]] = tensor  # the part as spelled in the file
    assert sorted(modules) == weights.modules
    for module, parts in modules.items():
        assert set(parts) <= COMFY_PARTS[kind] and ALPHA in parts, (module, sorted(parts))
        base_weight = base.get_submodule(module).weight.detach()
        if kind == "dora":  # its arithmetic differs from training's (see adapters.to_lycoris)
            assert parts["dora_scale"].shape == (base_weight.shape[0], 1)
            continue
        merged_weight = merged.get_submodule(module).base_layer.weight.detach()
        assert float((_comfyui_weight(base_weight, parts) - merged_weight).abs().max()) <= 1e-5, module


def test_init_lora_must_be_the_runs_kind_and_shape(transformer_dir, tmp_path):
    from acestep_dist.families.ace_step_v1.lora_formats import check_init_lora, load_init_lora, read_lora, write_comfyui
    from acestep_dist.families.ace_step_v1.options import lora_targets

    config, _, weights = _trained(transformer_dir, "lokr")
    file = write_comfyui(weights, tmp_path / "lokr.safetensors")
    base = _base(transformer_dir)
    # the same kind and shapes, another alpha: continued with the same change to every weight
    run = TrainConfig(**{**KINDS["lokr"], "lora_alpha": 2.0}, lora_preset=PRESET, init_lora=str(file))
    loaded = load_init_lora(run, lora_targets(PRESET), base)
    assert loaded.spec.alpha == 2.0
    for module in weights.modules:
        torch.testing.assert_close(loaded.delta(module), weights.delta(module), rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="is a LoKr; this run trains a LoRA"):
        check_init_lora(read_lora(file), TrainConfig(lora_preset=PRESET, init_lora=str(file)), lora_targets(PRESET), base)
    with pytest.raises(UserError, match="does not fit this run: rank 2 \\(lora_rank is 3\\)"):
        check_init_lora(read_lora(file), TrainConfig(**{**KINDS["lokr"], "lora_rank": 3}, lora_preset=PRESET,
                                                     init_lora=str(file)), lora_targets(PRESET), base)
    with pytest.raises(ValueError, match="lokr_decompose_both does not apply to adapter .loha."):
        TrainConfig(adapter="loha", lokr_decompose_both=True)
