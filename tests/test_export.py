"""`acedist export` and `acedist generate`: files diffusers, upstream (PEFT) and ComfyUI load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from acestep_dist.audio import read_audio_simple
from acestep_dist.config import TrainConfig
from acestep_dist.errors import UserError
from acestep_dist.export import export
from acestep_dist.families.ace_step_15 import AceStep15
from acestep_dist.families.ace_step_15.lora_formats import read_lora
from acestep_dist.generate import GenerateRequest, generate
from acestep_dist.families.ace_step_15.training import LORA_FILE
from acestep_dist.families.ace_step_15.training import build_trainable

from conftest import TRAIN_COMMON

ROOT = Path(__file__).resolve().parents[1]
PROMPT = dict(prompt="calm piano ballad", lyrics="[verse]\nsoft light", duration=1.0, language="en", bpm=90,
              steps=4, guidance=1.0, shift=3.0, seed=11)


@pytest.fixture(scope="module")
def exported(reference_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "lora"
    export(reference_run, out, "all", name="mylora", log=lambda _: None)
    return out


def _diffusers_render(model: Path, lora_dir: Path | None) -> torch.Tensor:
    from diffusers import AceStepPipeline

    pipe = AceStepPipeline.from_pretrained(model)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))  # no scale given: the header's alpha must be honoured
    out = pipe(prompt=PROMPT["prompt"], lyrics=PROMPT["lyrics"], audio_duration=PROMPT["duration"],
               vocal_language="en", bpm=PROMPT["bpm"], num_inference_steps=PROMPT["steps"],
               guidance_scale=PROMPT["guidance"], shift=PROMPT["shift"],
               generator=torch.Generator("cpu").manual_seed(PROMPT["seed"]), output_type="pt")
    return out.audios[0].float()


def _ours(model: Path, out: Path, lora: str | None) -> torch.Tensor:
    generate(str(model), GenerateRequest.text(**PROMPT), out, lora=lora, log=lambda _: None)
    audio, rate = read_audio_simple(out)
    assert rate == 48000
    return torch.from_numpy(audio).float()


def test_the_diffusers_lora_renders_the_same_audio_in_diffusers_and_acedist(exported, prep_model, tmp_path):
    theirs = _diffusers_render(prep_model, exported / "diffusers")
    ours = _ours(prep_model, tmp_path / "ours.wav", str(exported / "diffusers" / "pytorch_lora_weights.safetensors"))
    assert ours.shape == theirs.shape == (2, 48000)
    assert (ours - theirs).abs().max() <= 1e-5
    base = _ours(prep_model, tmp_path / "base.wav", None)
    assert (base - ours).abs().max() > 1e-3  # the LoRA changes the sound
    # every spelling of the same LoRA renders the same audio
    for other in (exported / "peft", exported / "comfyui" / "mylora.safetensors"):
        assert (_ours(prep_model, tmp_path / "other.wav", str(other)) - ours).abs().max() <= 1e-5, other


def _upstream_named(transformer: torch.nn.Module) -> torch.nn.Module:
    """The DiT with upstream's module names (q_proj k_proj v_proj o_proj), as PEFT sees upstream's decoder.
    diffusers' attention code reads to_q / to_out, so those become views of the renamed modules."""
    for module in list(transformer.modules()):
        if hasattr(module, "to_q") and hasattr(module, "to_out"):
            names = {"q_proj": module.to_q, "k_proj": module.to_k, "v_proj": module.to_v, "o_proj": module.to_out[0]}
            dropout = module.to_out[1] if len(module.to_out) > 1 else torch.nn.Identity()
            for name in ("to_q", "to_k", "to_v", "to_out"):
                del module._modules[name]
            for name, child in names.items():
                module.add_module(name, child)
            module.__class__ = type("Upstream" + type(module).__name__, (type(module),), {
                "to_q": property(lambda self: self.q_proj), "to_k": property(lambda self: self.k_proj),
                "to_v": property(lambda self: self.v_proj),
                "to_out": property(lambda self, d=dropout: [self.o_proj, d]),
            })
    return transformer


def test_the_peft_folder_loads_into_an_upstream_named_dit(exported, reference_run, prep_model):
    from peft import PeftModel

    config = json.loads((exported / "peft" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"]) == (8, 16.0)
    keys = set(load_file(exported / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.layers.0.cross_attn.o_proj.lora_B.weight" in keys

    # our trained model: the DiT with the run's adapter, as the trainer builds it
    ours = AceStep15.load(str(prep_model), ("transformer", "condition_encoder", "text_encoder", "tokenizer"))
    build_trainable(ours, TrainConfig(**{**TRAIN_COMMON, "init_lora": str(reference_run / "final" / LORA_FILE)}))
    ours.components.transformer.eval()
    upstream = _upstream_named(AceStep15.load(str(prep_model), ("transformer",)).components.transformer)
    upstream = PeftModel.from_pretrained(upstream, str(exported / "peft"))
    generator = torch.Generator().manual_seed(0)
    dims = ours.components.transformer.config
    inputs = dict(
        hidden_states=torch.randn(1, 50, dims.audio_acoustic_hidden_dim, generator=generator),
        timestep=torch.tensor([0.6]), timestep_r=torch.tensor([0.6]),
        encoder_hidden_states=torch.randn(1, 12, dims.hidden_size, generator=generator),
        context_latents=torch.randn(1, 50, dims.in_channels - dims.audio_acoustic_hidden_dim, generator=generator),
        return_dict=False,
    )
    with torch.no_grad():
        expected = ours.components.transformer(**inputs)[0]
        got = upstream(**inputs)[0]
        plain = _upstream_named(AceStep15.load(str(prep_model), ("transformer",)).components.transformer)(**inputs)[0]
    assert (got - expected).abs().max() <= 1e-5
    assert (plain - expected).abs().max() > 1e-4


def test_the_comfyui_file_has_exactly_the_expected_keys(exported, reference_run):
    state = load_file(exported / "comfyui" / "mylora.safetensors")
    trained = read_lora(reference_run / "final" / "lora.safetensors")
    upstream_modules = {m.replace("to_q", "q_proj").replace("to_k", "k_proj").replace("to_v", "v_proj")
                        .replace("to_out.0", "o_proj") for m in trained.modules}
    expected = set()
    for module in upstream_modules:
        expected |= {f"diffusion_model.decoder.{module}.{part}" for part in ("lora_A.weight", "lora_B.weight", "alpha")}
    assert set(state) == expected
    assert all(float(v) == 16.0 for k, v in state.items() if k.endswith(".alpha"))


def write_upstream_layout(upstream: Path, diffusers_dir: Path, root: Path, folder: str) -> Path:
    """Upstream's checkpoints/ folder: the exported variant folder beside the base's VAE and Qwen3."""
    shutil.copytree(upstream, root / folder)
    shutil.copytree(diffusers_dir / "vae", root / "vae")
    shutil.copytree(diffusers_dir / "text_encoder", root / "Qwen3-Embedding-0.6B")
    for file in (diffusers_dir / "tokenizer").iterdir():
        shutil.copy(file, root / "Qwen3-Embedding-0.6B" / file.name)
    return root / folder


def test_full_fine_tune_exports_load_in_diffusers_and_as_upstream(full_run, prep_model, tmp_path):
    from diffusers import AceStepTransformer1DModel

    out = tmp_path / "export"
    export(full_run, out, "all", log=lambda _: None)
    assert (out / "README.txt").is_file()
    # what acedist renders with the trained weights swapped into the base model
    family = AceStep15.load(str(prep_model))
    family.components.transformer = AceStepTransformer1DModel.from_pretrained(full_run / "final" / "transformer")
    family.components.condition_encoder.lyric_encoder.load_state_dict(
        load_file(full_run / "final" / "lyric_encoder.safetensors"))
    from acestep_dist.records import Record

    record = Record(key="x", audio="", caption=PROMPT["prompt"], lyrics=PROMPT["lyrics"], bpm=PROMPT["bpm"],
                    language="en", duration=PROMPT["duration"])
    ours = family.generate(record, duration=1.0, seed=PROMPT["seed"], steps=4, guidance=1.0, shift=3.0)[0]
    assert (_diffusers_render(out / "diffusers", None) - ours).abs().max() <= 1e-5
    base = AceStep15.load(str(prep_model)).generate(record, duration=1.0, seed=PROMPT["seed"], steps=4, guidance=1.0,
                                                     shift=3.0)[0]
    assert (base - ours).abs().max() > 1e-4

    upstream_root = tmp_path / "checkpoints"
    variant = write_upstream_layout(out / "upstream", out / "diffusers", upstream_root, "acestep-v15-turbo")
    as_upstream = AceStep15.load(str(variant))
    assert as_upstream.components.layout == "upstream"
    got = as_upstream.generate(record, duration=1.0, seed=PROMPT["seed"], steps=4, guidance=1.0, shift=3.0)[0]
    assert (got - ours).abs().max() <= 1e-5


def test_a_lora_for_another_variant_or_size_fails_clearly(exported, tiny_base, tiny_xl, prep_model, tmp_path):
    lora = str(exported / "diffusers" / "pytorch_lora_weights.safetensors")
    with pytest.raises(UserError, match="trained on variant 'turbo', the model is 'base'"):
        generate(str(tiny_base), GenerateRequest.text(**PROMPT), tmp_path / "a.wav", lora=lora, log=lambda _: None)
    comfy = exported / "comfyui" / "mylora.safetensors"  # strip the provenance: the shapes must still be checked
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(comfy), bare)
    with pytest.raises(UserError, match="another model size"):
        generate(str(tiny_xl), GenerateRequest.text(**PROMPT), tmp_path / "b.wav", lora=str(bare), log=lambda _: None)
    peft = tmp_path / "peft"
    shutil.copytree(exported / "peft", peft)
    config = json.loads((peft / "adapter_config.json").read_text())
    (peft / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(UserError, match="rank 8, the adapter config says 4"):
        generate(str(prep_model), GenerateRequest.text(**PROMPT), tmp_path / "c.wav", lora=str(peft), log=lambda _: None)


def test_cli_export_and_generate(reference_run, prep_model, tmp_path):
    cli = [sys.executable, "-m", "acestep_dist.cli"]
    done = subprocess.run(cli + ["export", str(reference_run), "--out", str(tmp_path / "e"), "--format", "comfyui"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "e" / "comfyui").glob("*.safetensors")) and not (tmp_path / "e" / "peft").exists()
    lyrics = tmp_path / "lyrics.txt"
    lyrics.write_text("[chorus]\nhello")
    done = subprocess.run(cli + ["generate", "--model", str(prep_model), "--lora", str(tmp_path / "e" / "comfyui"
                                 / "reference.safetensors"), "--prompt", "lofi", "--lyrics", str(lyrics),
                                 "--duration", "1.5", "--steps", "2", "--out", str(tmp_path / "x.flac")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    audio, rate = read_audio_simple(tmp_path / "x.flac")
    assert rate == 48000 and audio.shape == (2, 72000)
    bad = subprocess.run(cli + ["export", str(tmp_path), "--out", str(tmp_path / "f")], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 1 and "is not an acedist run" in bad.stderr and "Traceback" not in bad.stderr
