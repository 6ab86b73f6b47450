"""ACE-Step 1.5 adapters of every kind (LoRA, DoRA, LoKr, LoHa) on its DiT: each written in every
format its kind exports to and loaded back by acedist's generation path and by each consumer's own
loading code that runs here: diffusers' ``load_lora_weights`` (LoRA, DoRA), peft's
``PeftModel.from_pretrained`` on upstream's module names (upstream 1.5's adapter folder), LyCORIS
rebuilt from the file's ``lokr_config`` as upstream 1.5's LoKr loader does; ComfyUI's files key by
key and through its arithmetic."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from acestep_dist.config import TrainConfig
from acestep_dist.families.adapters import ALPHA, AdapterSpec, AdapterWeights, split_key
from test_adapters import FAMILY_KINDS, _comfyui_weight, with_random_adapter
from test_export import _upstream_named

torch.set_num_threads(1)

KINDS = FAMILY_KINDS
PRESET = "attention+mlp"


def _load(model):
    from acestep_dist.families.ace_step_15 import AceStep15

    return AceStep15.load(str(model), ("transformer", "condition_encoder", "text_encoder", "tokenizer", "vae"))


def _inputs(transformer) -> dict:
    dims = transformer.config
    generator = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 20, dims.audio_acoustic_hidden_dim, generator=generator),
                timestep=torch.tensor([0.5]), timestep_r=torch.tensor([0.5]),
                encoder_hidden_states=torch.randn(1, 6, dims.hidden_size, generator=generator),
                context_latents=torch.randn(1, 20, dims.in_channels - dims.audio_acoustic_hidden_dim,
                                            generator=generator), return_dict=False)


def _trained(model, kind: str):
    from acestep_dist.families.ace_step_15.lora_formats import targets_of
    from acestep_dist.families.ace_step_15.options import lora_targets

    config = TrainConfig(**KINDS[kind], lora_preset=PRESET)
    transformer = _load(model).components.transformer
    state = with_random_adapter(transformer, config, lora_targets(PRESET))
    return transformer, AdapterWeights(AdapterSpec.from_config(config), state, targets_of(lora_targets(PRESET)))


def _export(weights, root, formats):
    from acestep_dist.families.ace_step_15 import lora_formats

    writers = {"diffusers": lambda: lora_formats.write_diffusers(weights, root / "diffusers"),
               "peft": lambda: lora_formats.write_peft(weights, root / "peft"),
               "comfyui": lambda: lora_formats.write_comfyui(weights, root / "comfyui" / "x.safetensors"),
               "lycoris": lambda: lora_formats.write_lycoris(weights, root / "lycoris")}
    return {name: writers[name]() for name in formats}


@pytest.mark.parametrize("kind", KINDS)
def test_every_export_of_every_kind_loads_with_the_trained_output(kind, tiny_turbo, tmp_path):
    from peft import PeftModel

    from acestep_dist.families.ace_step_15.generation import load_lora_into
    from acestep_dist.families.ace_step_15.lora_formats import read_lora
    from acestep_dist.families import get as get_family

    trained, weights = _trained(tiny_turbo, kind)
    inputs = _inputs(trained)
    with torch.no_grad():
        expected = trained(**inputs)[0]
        assert float((_load(tiny_turbo).components.transformer(**inputs)[0] - expected).abs().max()) > 1e-3
    formats = get_family("ace-step-1.5").adapter_formats(kind)
    assert formats == {"lora": ("diffusers", "peft", "comfyui"), "dora": ("diffusers", "peft", "comfyui"),
                       "lokr": ("peft", "comfyui", "lycoris"), "loha": ("peft", "comfyui")}[kind]
    files = _export(weights, tmp_path, formats)
    for name, path in files.items():
        read = read_lora(path)
        assert read.spec == weights.spec and read.modules == weights.modules, name
        # acedist generate's path (diffusers' own load_lora_weights for LoRA / DoRA, peft for the others)
        family = _load(tiny_turbo)
        pipe = family.pipeline()
        load_lora_into(pipe, family, str(path))
        with torch.no_grad():
            assert float((pipe.transformer(**inputs)[0] - expected).abs().max()) <= 1e-5, name
    # upstream 1.5's adapter folder: PeftModel.from_pretrained on its decoder's module names
    upstream = PeftModel.from_pretrained(_upstream_named(_load(tiny_turbo).components.transformer), str(files["peft"]))
    assert json.loads((files["peft"] / "adapter_config.json").read_text())["peft_type"] == kind.upper().replace("DORA", "LORA")
    with torch.no_grad():
        assert float((upstream(**inputs)[0] - expected).abs().max()) <= 1e-5


def test_a_lokr_loads_through_upstreams_lycoris_path(tiny_turbo, tmp_path):
    """Upstream 1.5's LoKr loader: LyCORIS's network built over the decoder from the file's
    ``lokr_config`` (every Linear, as its preset does), ``apply_to``, then ``load_weights``."""
    from lycoris import LycorisNetwork, create_lycoris
    from safetensors import safe_open

    trained, weights = _trained(tiny_turbo, "lokr")
    inputs = _inputs(trained)
    with torch.no_grad():
        expected = trained(**inputs)[0]
    file = _export(weights, tmp_path, ("lycoris",))["lycoris"]
    with safe_open(str(file), "pt") as f:
        config = json.loads(f.metadata()["lokr_config"])
    decoder = _upstream_named(_load(tiny_turbo).components.transformer)
    logging.disable(logging.WARNING)
    try:
        LycorisNetwork.apply_preset({"unet_target_name": config["target_modules"], "target_name": config["target_modules"]})
        network = create_lycoris(decoder, 1.0, linear_dim=config["linear_dim"], linear_alpha=config["linear_alpha"],
                                 algo="lokr", factor=config["factor"], decompose_both=config["decompose_both"],
                                 use_tucker=False, use_scalar=False, full_matrix=False, bypass_mode=False,
                                 rs_lora=False, unbalanced_factorization=False)
    finally:
        logging.disable(logging.NOTSET)
    network.apply_to()
    network.load_weights(str(file))
    with torch.no_grad():
        assert float((decoder(**inputs)[0] - expected).abs().max()) <= 1e-5
    # the file upstream's trainer saves: every Linear of the DiT, the untrained ones at LyCORIS's start
    # (one factor zero), with its lokr_config; read back as the trained adapter alone
    from acestep_dist.families.ace_step_15.generation import load_lora_into
    from acestep_dist.families.ace_step_15.lora_formats import read_lora

    upstream_file = tmp_path / "upstream" / "lokr_weights.safetensors"
    upstream_file.parent.mkdir()
    network.save_weights(str(upstream_file), torch.float32, {"lokr_config": json.dumps(config)})
    read = read_lora(upstream_file)
    assert read.modules == weights.modules and any("left out" in note for note in read.notes)
    family = _load(tiny_turbo)
    pipe = family.pipeline()
    load_lora_into(pipe, family, str(upstream_file))
    with torch.no_grad():
        assert float((pipe.transformer(**inputs)[0] - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_the_comfyui_file_has_comfyuis_keys_and_arithmetic(kind, tiny_turbo, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    from acestep_dist.families.ace_step_15.lora_formats import _to_upstream_module

    trained, weights = _trained(tiny_turbo, kind)
    state = load_file(str(_export(weights, tmp_path, ("comfyui",))["comfyui"]))
    base = _load(tiny_turbo).components.transformer
    merged = copy.deepcopy(trained)
    for layer in merged.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        assert key.startswith("diffusion_model.decoder.")  # ComfyUI's ACE-Step 1.5 map: upstream's module names
        name = key[len("diffusion_model.decoder."):]
        module = split_key(name)[0]
        modules.setdefault(module, {})[name[len(module) + 1:]] = tensor
    assert sorted(modules) == sorted(_to_upstream_module(m) for m in weights.modules)
    for module in weights.modules:
        parts = modules[_to_upstream_module(module)]
        assert ALPHA in parts and parts[ALPHA].ndim == 0
        base_weight = base.get_submodule(module).weight.detach()
        if kind == "dora":  # ComfyUI's DoRA arithmetic differs from training's (see adapters.to_lycoris)
            assert parts["dora_scale"].shape == (base_weight.shape[0], 1)
            continue
        merged_weight = merged.get_submodule(module).base_layer.weight.detach()
        assert float((_comfyui_weight(base_weight, parts) - merged_weight).abs().max()) <= 1e-5, module


def test_a_lokr_factor_lycoris_orders_the_other_way_is_refused_before_writing(tmp_path):
    from acestep_dist.errors import UserError
    from acestep_dist.families.ace_step_15.lora_formats import write_lycoris

    # a 16-wide layer split by factor 8 gives (8, 2) in peft; LyCORIS would build (2, 8)
    weights = AdapterWeights(AdapterSpec("lokr", 2, 2.0, decompose_factor=8),
                             {"layers.0.self_attn.to_q.lokr_w1": torch.ones(8, 8), "layers.0.self_attn.to_q.lokr_w2": torch.ones(2, 2)})
    with pytest.raises(UserError, match="lokr_factor 8 splits width 16 as 8 x 2"):
        write_lycoris(weights, tmp_path / "lycoris")
    assert not (tmp_path / "lycoris").exists()
