"""ACE-Step v1 DiT parity with upstream: forward cases, encode/decode, loading, checkpointing, LoRA.

The reference tensors come from running upstream's own modules with tiny random weights
(``../shared/v1/fixtures``); the lyric Conformer there is 48 wide / 4 heads / 96 units / 2 blocks,
a size that its config.json does not record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from safetensors.torch import load_file  # noqa: E402

from acestep_dist.families.ace_step_v1.lyric_encoder import (  # noqa: E402
    RELEASED_LYRIC_ENCODER,
    lyric_encoder_config_from_shapes,
    resolve_lyric_encoder_config,
)
from acestep_dist.families.ace_step_v1.transformer import (  # noqa: E402
    ACEStepTransformer2DModel,
    lyric_encoder_config_from_files,
)

SHARED = Path(os.environ.get("ACESTEP_SHARED") or Path(__file__).resolve().parents[2].parent / "shared")
FIXTURES = SHARED / "v1" / "fixtures"
TOL = 1e-5
FIXTURE_LYRIC_ENCODER = {"output_size": 48, "attention_heads": 4, "linear_units": 96, "num_blocks": 2}
INPUTS = (
    "hidden_states",
    "attention_mask",
    "encoder_text_hidden_states",
    "text_attention_mask",
    "speaker_embeds",
    "lyric_token_idx",
    "lyric_mask",
    "timestep",
)
ENCODE_INPUTS = INPUTS[2:7]
# upstream's config/zh_rap_lora_config.json targets
LORA_TARGETS = ["speaker_embedder", "linear_q", "linear_k", "linear_v", "to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def fixtures() -> Path:
    if not (FIXTURES / "forward_cases.safetensors").is_file():
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"v1 fixtures missing at {FIXTURES} (CI must provide ../shared/v1/fixtures)")
        pytest.skip(f"v1 fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="module")
def cases(fixtures) -> dict[str, torch.Tensor]:
    # Cloned: load_file's tensors may be misaligned, which moves MKL results by ~6e-7.
    return {key: value.clone() for key, value in load_file(fixtures / "forward_cases.safetensors").items()}


@pytest.fixture(scope="module")
def model(fixtures) -> ACEStepTransformer2DModel:
    return ACEStepTransformer2DModel.from_pretrained(fixtures / "transformer").eval()


def case_inputs(cases, index: int) -> dict:
    inputs = {name: cases[f"case{index}.{name}"] for name in INPUTS}
    if f"case{index}.ssl_hidden_states.0" in cases:
        inputs["ssl_hidden_states"] = [cases[f"case{index}.ssl_hidden_states.{k}"] for k in (0, 1)]
    return inputs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("index", [0, 1, 2])
def test_forward_case_matches_upstream(model, cases, index):
    inputs = case_inputs(cases, index)
    with torch.no_grad():
        out = model(**inputs, return_dict=True)
        hidden, mask = model.encode(**{name: inputs[name] for name in ENCODE_INPUTS})

    assert out.sample.shape == cases[f"case{index}.output.sample"].shape
    assert max_diff(out.sample, cases[f"case{index}.output.sample"]) < TOL
    assert max_diff(hidden, cases[f"case{index}.encode.encoder_hidden_states"]) < TOL
    assert mask.dtype == torch.float32
    assert torch.equal(mask, cases[f"case{index}.encode.encoder_hidden_mask"])
    if index == 0:
        assert [name for name, _ in out.proj_losses] == ["mert", "m-hubert"]
        for name, loss in out.proj_losses:
            assert max_diff(loss.reshape(1), cases[f"case0.output.proj_loss.{name}"]) < TOL
    else:
        assert out.proj_losses == []


def test_ragged_ssl_targets_match_batched(model, cases):
    """Upstream's trainer passes per-sample SSL lists of different lengths."""
    inputs = case_inputs(cases, 0)
    mert, hubert = inputs["ssl_hidden_states"]
    ragged = [[mert[0], mert[1, :20]], [hubert[0], hubert[1, :9]]]
    with torch.no_grad():
        batched = dict(model(**inputs).proj_losses)
        losses = dict(model(**{**inputs, "ssl_hidden_states": ragged}).proj_losses)
        alone = [dict(model(**{k: v[b : b + 1] for k, v in inputs.items() if k != "ssl_hidden_states"},
                            ssl_hidden_states=[mert[b : b + 1], hubert[b : b + 1]]).proj_losses) for b in (0, 1)]
    assert max_diff(batched["mert"], (alone[0]["mert"] + alone[1]["mert"]) / 2) < TOL
    assert losses["mert"].item() != batched["mert"].item()  # the shorter target changed sample 1's term
    assert torch.isfinite(losses["m-hubert"])


def test_forward_equals_decode_of_encode(model, cases):
    for index in range(3):
        inputs = case_inputs(cases, index)
        ssl = inputs.pop("ssl_hidden_states", None)
        with torch.no_grad():
            out = model(**inputs, ssl_hidden_states=ssl)
            hidden, mask = model.encode(**{name: inputs[name] for name in ENCODE_INPUTS})
            sample, losses = model.decode(
                inputs["hidden_states"],
                inputs["attention_mask"],
                hidden,
                mask,
                inputs["timestep"],
                ssl_hidden_states=ssl,
                output_length=inputs["hidden_states"].shape[-1],
                return_dict=False,
            )
        assert torch.equal(out.sample, sample)
        assert [(n, v.item()) for n, v in out.proj_losses] == [(n, v.item()) for n, v in losses]


def test_output_length_pads_or_cuts(model, cases):
    inputs = case_inputs(cases, 1)
    with torch.no_grad():
        hidden, mask = model.encode(**{name: inputs[name] for name in ENCODE_INPUTS})
        args = (inputs["hidden_states"], inputs["attention_mask"], hidden, mask, inputs["timestep"])
        full = model.decode(*args, output_length=41).sample
        longer = model.decode(*args, output_length=45).sample
        shorter = model.decode(*args, output_length=30).sample
    assert torch.equal(longer[..., :41], full) and not longer[..., 41:].any()
    assert torch.equal(shorter, full[..., :30])


# ------------------------------------------------------------------------------------------ loading
def test_from_pretrained_infers_lyric_encoder_size(model, fixtures):
    config = json.loads((fixtures / "transformer" / "config.json").read_text())
    assert "lyric_encoder_config" not in config  # upstream never writes it
    assert model.config.lyric_encoder_config == FIXTURE_LYRIC_ENCODER
    encoder = model.lyric_encoder
    assert len(encoder.encoders) == 2
    assert encoder.encoders[0].self_attn.h == 4 and encoder.encoders[0].self_attn.d_k == 12
    assert encoder.encoders[0].feed_forward.w_1.out_features == 96
    assert encoder.output_size == 48
    weights = fixtures / "transformer" / "diffusion_pytorch_model.safetensors"
    assert lyric_encoder_config_from_files([weights]) == FIXTURE_LYRIC_ENCODER
    assert set(model.state_dict()) == set(load_file(weights))


def test_lyric_encoder_size_from_shapes_and_defaults():
    shapes = {
        "lyric_encoder.after_norm.weight": [1024],
        **{f"lyric_encoder.encoders.{i}.self_attn.pos_bias_u": [16, 64] for i in range(6)},
        "lyric_encoder.encoders.0.feed_forward.w_1.weight": [4096, 1024],
    }
    assert lyric_encoder_config_from_shapes(shapes) == RELEASED_LYRIC_ENCODER
    prefixed = {"transformer." + key: shape for key, shape in shapes.items()}
    assert lyric_encoder_config_from_shapes(prefixed) == RELEASED_LYRIC_ENCODER
    assert resolve_lyric_encoder_config(None, 1024) == RELEASED_LYRIC_ENCODER
    with pytest.raises(ValueError, match="must equal lyric_hidden_size"):
        resolve_lyric_encoder_config({"output_size": 64}, 48)
    with pytest.raises(ValueError, match="unknown"):
        resolve_lyric_encoder_config({"heads": 4}, 48)


def test_save_pretrained_round_trip(model, cases, tmp_path):
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "ACEStepTransformer2DModel"
    assert saved["lyric_encoder_config"] == FIXTURE_LYRIC_ENCODER
    again = ACEStepTransformer2DModel.from_pretrained(tmp_path).eval()
    inputs = case_inputs(cases, 2)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, again(**inputs).sample)


def test_sharded_checkpoint_without_size_in_config(model, cases, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    del config["lyric_encoder_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    again = ACEStepTransformer2DModel.from_pretrained(tmp_path).eval()
    assert again.config.lyric_encoder_config == FIXTURE_LYRIC_ENCODER
    inputs = case_inputs(cases, 1)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, again(**inputs).sample)


def test_explicit_lyric_encoder_config_is_recorded():
    tiny = ACEStepTransformer2DModel(
        num_layers=1, attention_head_dim=8, num_attention_heads=2, speaker_embedding_dim=4, text_embedding_dim=8,
        ssl_encoder_depths=[0], ssl_latent_dims=[4], ssl_names=["mert"], lyric_encoder_vocab_size=16,
        lyric_hidden_size=8, lyric_encoder_config={"attention_heads": 2, "linear_units": 12, "num_blocks": 1},
    )
    assert tiny.config.lyric_encoder_config == {"output_size": 8, "attention_heads": 2, "linear_units": 12, "num_blocks": 1}
    assert tiny.lyric_encoder.encoders[0].self_attn.pos_bias_u.shape == (2, 4)


# ------------------------------------------------------------------------------------------ training
def test_gradient_checkpointing_same_output_and_gradients(model, cases):
    calls = []

    def counting_checkpoint(module, *args):
        calls.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    inputs = case_inputs(cases, 0)
    results = []
    try:
        model.train()  # dropout in the lyric encoder: the same seed must give the same masks
        for enable in (False, True):
            if enable:
                model.enable_gradient_checkpointing(counting_checkpoint)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            out = model(**inputs)
            loss = out.sample.square().mean() + sum(value for _, value in out.proj_losses)
            loss.backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            results.append((out.sample.detach(), grads))
    finally:
        model.disable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
        model.eval()

    assert calls.count("LinearTransformerBlock") == 3 and calls.count("ConformerEncoderLayer") == 2
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    assert torch.equal(plain, ckpt)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in ("transformer_blocks.0.attn.to_q.weight", "lyric_encoder.encoders.0.self_attn.linear_q.weight",
                 "speaker_embedder.weight", "projectors.1.4.weight"):
        assert plain_grads[name].abs().sum() > 0
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6, rtol=1e-5), name


def test_lora_on_upstream_targets(fixtures, cases):
    peft = pytest.importorskip("peft")
    lora_model = ACEStepTransformer2DModel.from_pretrained(fixtures / "transformer")
    lora_model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    wrapped = {name.rsplit(".lora_A", 1)[0] for name, _ in lora_model.named_parameters() if ".lora_A." in name}
    # per block: attn + cross_attn x (to_q, to_k, to_v, to_out.0); 3 per Conformer block; the speaker embedder
    assert len(wrapped) == 3 * 8 + 2 * 3 + 1
    assert "speaker_embedder" in wrapped and "transformer_blocks.2.cross_attn.to_out.0" in wrapped
    assert "lyric_encoder.encoders.1.self_attn.linear_v" in wrapped
    out = lora_model(**case_inputs(cases, 1)).sample
    out.square().mean().backward()
    trainable = [p for p in lora_model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


@pytest.mark.parametrize("mode", ["cast", "autocast"])
def test_bfloat16(model, cases, mode):
    inputs = case_inputs(cases, 2)
    reference = cases["case2.output.sample"]
    with torch.no_grad():
        if mode == "cast":
            half = ACEStepTransformer2DModel.from_pretrained(FIXTURES / "transformer", torch_dtype=torch.bfloat16).eval()
            sample = half(**inputs).sample  # float32 inputs are cast to the weights' dtype
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                sample = model(**inputs).sample
    assert sample.dtype == torch.bfloat16
    assert torch.isfinite(sample.float()).all()
    assert max_diff(sample, reference) < 0.1 * reference.abs().max().item()


def test_mask_padding_makes_a_padded_sample_predict_as_it_would_alone():
    """Upstream lets padding reach real frames (patch GroupNorm statistics, the FFN's time conv, the
    condition's rotary positions after padded caption tokens); ``mask_padding`` (our trainer's mode)
    closes each, so exact batching holds. Off, upstream's behaviour stays (the fixtures above)."""
    from acestep_dist.families.ace_step_v1.tiny import transformer_config

    torch.manual_seed(0)
    model = ACEStepTransformer2DModel(**transformer_config()).eval()
    generator = torch.Generator().manual_seed(1)
    frames, text_tokens, lyric_tokens = [20, 33], [5, 9], [12, 4]
    x = torch.zeros(2, 8, 16, 33)
    mask = torch.zeros(2, 33)
    text, text_mask = torch.zeros(2, 9, 32), torch.zeros(2, 9, dtype=torch.long)
    lyrics, lyric_mask = torch.zeros(2, 12, dtype=torch.long), torch.zeros(2, 12, dtype=torch.long)
    for i in range(2):
        x[i, ..., : frames[i]] = torch.randn(8, 16, frames[i], generator=generator)
        mask[i, : frames[i]] = 1
        text[i, : text_tokens[i]] = torch.randn(text_tokens[i], 32, generator=generator)
        text_mask[i, : text_tokens[i]] = 1
        lyrics[i, : lyric_tokens[i]] = torch.randint(3, 6000, (lyric_tokens[i],), generator=generator)
        lyric_mask[i, : lyric_tokens[i]] = 1
    timestep = torch.tensor([300.0, 700.0])

    def run(rows, cut):
        return model(x[rows, ..., :cut[0]], mask[rows, :cut[0]], text[rows, :cut[1]], text_mask[rows, :cut[1]],
                     torch.zeros(len(range(*rows.indices(2))), 512), lyrics[rows, :cut[2]], lyric_mask[rows, :cut[2]],
                     timestep[rows]).sample

    with torch.no_grad():
        for exact in (True, False):
            model.mask_padding = exact
            batched = run(slice(0, 2), (33, 9, 12))
            for i in range(2):
                alone = run(slice(i, i + 1), (frames[i], text_tokens[i], lyric_tokens[i]))
                difference = float((batched[i, ..., : frames[i]] - alone[0]).abs().max())
                if exact:
                    assert difference <= 1e-5, (i, difference)
                elif i == 0:
                    assert difference > 1e-3  # upstream's: the padding leaks
