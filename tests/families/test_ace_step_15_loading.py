"""Loading ACE-Step 1.5 checkpoints: diffusers layout, upstream layout, variants, bad folders."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file, save_file

from acestep_dist.errors import ModelLoadError
from acestep_dist.families.ace_step_15 import AceStep15, detect_variant, load_components
from acestep_dist.families.ace_step_15.keymap import upstream_config
from acestep_dist.records import Record

# Upstream ACE-Step 1.5 module names, spelled out here independently of the loader's key map.
UPSTREAM_NAMES = [
    (".to_q.", ".q_proj."),
    (".to_k.", ".k_proj."),
    (".to_v.", ".v_proj."),
    (".to_out.0.", ".o_proj."),
    (".norm_q.", ".q_norm."),
    (".norm_k.", ".k_norm."),
]


def _upstream_name(key: str) -> str:
    key = "." + key
    for diffusers_name, upstream_name in UPSTREAM_NAMES:
        key = key.replace(diffusers_name, upstream_name)
    return key[1:]


def write_upstream_copy(diffusers_dir: Path, root: Path, folder: str) -> Path:
    """The tiny checkpoint as upstream ships it: checkpoints/<variant>/ + vae/ + Qwen3-Embedding-0.6B/."""
    variant_dir = root / folder
    variant_dir.mkdir(parents=True)
    dit = load_file(diffusers_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    cond = load_file(diffusers_dir / "condition_encoder" / "diffusion_pytorch_model.safetensors")
    upstream = {}
    for key, value in dit.items():
        key = key.replace("proj_in_conv.", "proj_in.1.").replace("proj_out_conv.", "proj_out.1.")
        upstream["decoder." + _upstream_name(key)] = value
    for key, value in cond.items():
        if key == "null_condition_emb":
            upstream["null_condition_emb"] = value
        elif key != "silence_latent":
            upstream["encoder." + _upstream_name(key)] = value
    # the 5 Hz audio codec lives in the same file upstream; text2music does not use it
    upstream["tokenizer.quantizer.project_in.weight"] = torch.zeros(6, 4)
    upstream["detokenizer.proj_out.weight"] = torch.zeros(8, 4)
    save_file(upstream, variant_dir / "model.safetensors")
    torch.save(cond["silence_latent"].transpose(1, 2).contiguous(), variant_dir / "silence_latent.pt")

    dit_config = json.loads((diffusers_dir / "transformer" / "config.json").read_text())
    cond_config = json.loads((diffusers_dir / "condition_encoder" / "config.json").read_text())
    config = upstream_config(dit_config, cond_config)
    (variant_dir / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copytree(diffusers_dir / "vae", root / "vae")
    text_dir = root / "Qwen3-Embedding-0.6B"
    shutil.copytree(diffusers_dir / "text_encoder", text_dir)
    for file in (diffusers_dir / "tokenizer").iterdir():
        shutil.copy(file, text_dir / file.name)
    return variant_dir


def _state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("fixture, folder", [("tiny_turbo", "acestep-v15-turbo"), ("tiny_xl", "acestep-v15-xl-sft")])
def test_upstream_layout_loads_and_gives_identical_outputs(request, tmp_path, fixture, folder):
    diffusers_dir = request.getfixturevalue(fixture)
    variant_dir = write_upstream_copy(diffusers_dir, tmp_path / "checkpoints", folder)
    ours = AceStep15.load(diffusers_dir)
    for path in (variant_dir, tmp_path / "checkpoints"):  # the variant folder, or its parent with one variant
        upstream = AceStep15.load(path)
        assert upstream.components.layout == "upstream"
        assert upstream.variant == ours.variant
        for part in ("transformer", "condition_encoder", "vae", "text_encoder"):
            expected, got = _state(getattr(ours.components, part)), _state(getattr(upstream.components, part))
            assert expected.keys() == got.keys()
            assert all(torch.equal(expected[k], got[k]) for k in expected), part
    record = Record(key="x", caption="calm piano", lyrics="[verse]\nla la", bpm=90, keyscale="C major",
                    timesignature="4", language="en", duration=1.0)
    audio_ours = ours.generate(record, duration=1.0, seed=3, steps=3, guidance=3.0)
    audio_upstream = upstream.generate(record, duration=1.0, seed=3, steps=3, guidance=3.0)
    assert (audio_ours - audio_upstream).abs().max() <= 1e-6, (audio_ours - audio_upstream).abs().max()


def test_variants_are_read_from_the_checkpoint(tiny_turbo, tiny_base, tiny_xl):
    assert load_components(tiny_turbo, ()).variant.name == "turbo"
    assert load_components(tiny_base, ()).variant.name == "base"
    assert load_components(tiny_xl, ()).variant.name == "xl-sft"
    # configs as the diffusers converter writes them for real checkpoints
    assert detect_variant({"hidden_size": 2048, "is_turbo": True, "model_version": "turbo"}).name == "turbo"
    assert detect_variant({"hidden_size": 2048, "is_turbo": False, "model_version": "sft"}).name == "sft"
    assert detect_variant({"hidden_size": 2048, "is_turbo": False, "model_version": None}).name == "base"
    assert detect_variant({"hidden_size": 2560, "encoder_hidden_size": 2048, "is_turbo": True}).name == "xl-turbo"
    assert detect_variant({"hidden_size": 2048, "model_version": "turbo-shift1"}).name == "turbo-shift1"
    custom = detect_variant({"hidden_size": 2048}, {"timestep_mu": -0.8, "timestep_sigma": 0.5})
    assert (custom.timestep_sampler.mu, custom.timestep_sampler.sigma) == (-0.8, 0.5)


def test_only_the_requested_parts_are_loaded(tiny_turbo):
    components = load_components(tiny_turbo, ("vae", "tokenizer"))
    assert components.vae is not None and components.tokenizer is not None
    assert components.transformer is None and components.text_encoder is None
    with pytest.raises(RuntimeError, match="without transformer"):
        AceStep15(components).pipeline()


def test_bad_checkpoints_fail_with_a_clear_message(tmp_path, tiny_turbo):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_components(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither a diffusers ACE-Step folder"):
        load_components(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_components("acestep-dist-tests/no-such-model", local_files_only=True)

    root = tmp_path / "checkpoints"
    variant_dir = write_upstream_copy(tiny_turbo, root, "acestep-v15-turbo")
    shutil.copytree(variant_dir, root / "acestep-v15-base")
    with pytest.raises(ModelLoadError, match="several ACE-Step variants"):
        load_components(root)
    shutil.rmtree(root / "vae")
    with pytest.raises(ModelLoadError, match="no vae/ folder"):
        load_components(variant_dir, ("vae",))
    state = load_file(variant_dir / "model.safetensors")
    state.pop(next(k for k in state if k.startswith("decoder.")))
    save_file(state, variant_dir / "model.safetensors")
    with pytest.raises(ModelLoadError, match="weights do not fit AceStepTransformer1DModel"):
        load_components(variant_dir, ("transformer",))


def test_hub_ids_load_from_the_hugging_face_cache(tmp_path, monkeypatch, tiny_turbo):
    """The hub code path, with the cache filled by hand (tests cannot reach the hub)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    for repo, make in (("acedist/tiny-diffusers", lambda d: shutil.copytree(tiny_turbo, d)),
                       ("acedist/tiny-upstream", lambda d: write_upstream_copy(tiny_turbo, d, "acestep-v15-turbo"))):
        repo_dir = cache / f"models--{repo.replace('/', '--')}"
        make(repo_dir / "snapshots" / revision)
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    diffusers_layout = load_components("acedist/tiny-diffusers", ("transformer",), local_files_only=True)
    assert diffusers_layout.layout == "diffusers" and diffusers_layout.variant.name == "turbo"
    one_variant = load_components("acedist/tiny-upstream/acestep-v15-turbo", ("transformer", "vae"), local_files_only=True)
    assert one_variant.layout == "upstream" and one_variant.source.endswith("acestep-v15-turbo")
    expected = AceStep15.load(tiny_turbo, ("transformer",)).components.transformer.state_dict()
    assert all(torch.equal(v, one_variant.transformer.state_dict()[k]) for k, v in expected.items())
